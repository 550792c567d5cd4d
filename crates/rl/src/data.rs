//! The pretraining data source: corpus documents tokenized and packed into rows. A row starts at
//! a document boundary and holds whole documents while they fit; the rest is padding whose
//! targets are ignored. A document longer than a row is an error, not cut: cut before its answer
//! and EOS, it would teach the model traces that never end.

use serde_json::{json, Value};
use whale_parallel::model::tensor::{Device, Tensor};
use whale_parallel::model::tokenizer::Tokenizer;
use whale_parallel::model::IGNORE_INDEX;
use whale_parallel::trainer::DataSource;

use crate::tasks::Corpus;

pub struct CorpusData<T: Tokenizer> {
    pub corpus: Corpus,
    pub tokenizer: T,
    /// A tokenized document drawn but not yet placed (it did not fit the previous row).
    pending: Option<Vec<u32>>,
}

impl<T: Tokenizer> std::fmt::Debug for CorpusData<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CorpusData(cursor {})", self.corpus.cursor)
    }
}

impl<T: Tokenizer> CorpusData<T> {
    pub fn new(corpus: Corpus, tokenizer: T) -> Self {
        CorpusData { corpus, tokenizer, pending: None }
    }

    fn next_doc(&mut self) -> whale_parallel::Result<Vec<u32>> {
        if let Some(d) = self.pending.take() {
            return Ok(d);
        }
        let text = self.corpus.next_document();
        Ok(self.tokenizer.encode(&text)?)
    }

    /// Draws `documents` documents and refuses a `seq` that cannot hold the longest of them in a
    /// row, naming the length it needs: run on a fresh source before training, so that a task
    /// too long for the rows is an error before anything is written, not one mid-run.
    pub fn check_fit(&mut self, seq: usize, documents: usize) -> whale_parallel::Result<()> {
        let mut longest = Vec::new();
        for _ in 0..documents {
            let doc = self.next_doc()?;
            if doc.len() > longest.len() {
                longest = doc;
            }
        }
        too_long(&self.tokenizer, &longest, seq)
    }
}

/// The error for a document of more than `seq + 1` tokens (a row's inputs and targets).
fn too_long(tok: &dyn Tokenizer, doc: &[u32], seq: usize) -> whale_parallel::Result<()> {
    if doc.len() <= seq + 1 {
        return Ok(());
    }
    Err(whale_parallel::Error::Train(format!(
        "a pretraining document of {} tokens does not fit a row of seq_len {seq} (+1 for the last target), so it would \
         be cut before its end: {:?}; set seq_len to at least {}",
        doc.len(),
        tok.decode(doc),
        doc.len() - 1
    )))
}

impl<T: Tokenizer + 'static> DataSource for CorpusData<T> {
    fn next_batch(&mut self, batch: usize, seq: usize) -> whale_parallel::Result<(Tensor, Tensor)> {
        let pad = self.tokenizer.pad_id();
        let (mut ids, mut targets) = (Vec::with_capacity(batch * seq), Vec::with_capacity(batch * seq));
        for _ in 0..batch {
            // seq + 1 tokens give seq inputs and seq next-token targets.
            let mut row: Vec<u32> = Vec::with_capacity(seq + 1);
            loop {
                let doc = self.next_doc()?;
                too_long(&self.tokenizer, &doc, seq)?;
                if row.len() + doc.len() <= seq + 1 {
                    row.extend(doc);
                } else {
                    self.pending = Some(doc);
                    break;
                }
                if row.len() == seq + 1 {
                    break;
                }
            }
            let real = row.len();
            row.resize(seq + 1, pad);
            ids.extend(row[..seq].iter().map(|&t| t as i64));
            targets.extend((1..=seq).map(|i| if i < real { row[i] as i64 } else { IGNORE_INDEX }));
        }
        Ok((
            Tensor::from_vec(ids, &[batch, seq], &Device::Cpu)?,
            Tensor::from_vec(targets, &[batch, seq], &Device::Cpu)?,
        ))
    }

    fn state(&self) -> Value {
        let (rng, cursor) = self.corpus.state();
        json!({ "rng": rng, "cursor": cursor, "pending": self.pending })
    }

    fn restore(&mut self, state: &Value) -> whale_parallel::Result<()> {
        let bad = |what: &str| whale_parallel::Error::Train(format!("data state: bad or missing `{what}`"));
        let rng: [u64; 4] = serde_json::from_value(state["rng"].clone()).map_err(|_| bad("rng"))?;
        let cursor = state["cursor"].as_u64().ok_or_else(|| bad("cursor"))?;
        self.pending = serde_json::from_value(state["pending"].clone()).map_err(|_| bad("pending"))?;
        self.corpus.restore(rng, cursor).map_err(|e| whale_parallel::Error::Train(format!("data state: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::TaskSet;
    use whale_parallel::model::tokenizer::CharTokenizer;

    #[test]
    fn rows_hold_whole_documents_and_resume_exactly() {
        let mk =
            || CorpusData::new(Corpus::new(TaskSet::parse("add:2-3").unwrap(), 0.5, 1).unwrap(), CharTokenizer::new());
        let mut a = mk();
        let (ids, targets) = a.next_batch(4, 48).unwrap();
        let (ids, targets) = (ids.to_vec::<i64>().unwrap(), targets.to_vec::<i64>().unwrap());
        let tok = CharTokenizer::new();
        for r in 0..4 {
            let row: Vec<u32> = ids[r * 48..(r + 1) * 48].iter().map(|&t| t as u32).collect();
            let text = tok.decode(&row);
            assert!(text.chars().next().unwrap().is_ascii_digit(), "row starts a document: {text}");
            // Targets are the inputs shifted by one, ignored over padding.
            for i in 0..47 {
                let (t, next) = (targets[r * 48 + i], ids[r * 48 + i + 1]);
                assert!(t == next || (t == IGNORE_INDEX && next == 0), "row {r} pos {i}");
            }
        }
        let state = a.state();
        let mut b = mk();
        b.restore(&state).unwrap();
        assert_eq!(
            a.next_batch(3, 48).unwrap().0.to_vec::<i64>().unwrap(),
            b.next_batch(3, 48).unwrap().0.to_vec::<i64>().unwrap()
        );
    }

    #[test]
    fn a_document_longer_than_a_row_is_refused_not_cut() {
        // 3-4 digit additions run to 55 tokens: rows of 44 would cut half of them before their
        // answer and EOS.
        let mk = || CorpusData::new(Corpus::new(TaskSet::parse("add").unwrap(), 0.0, 1).unwrap(), CharTokenizer::new());
        let err = mk().check_fit(44, 512).unwrap_err().to_string();
        assert!(err.contains("seq_len 44") && err.contains("at least 5"), "{err}");
        let err = mk().next_batch(8, 44).unwrap_err().to_string();
        assert!(err.contains("does not fit a row of seq_len 44"), "{err}");
        mk().check_fit(54, 512).unwrap();
        let (_, targets) = mk().next_batch(8, 54).unwrap();
        // Every row ends its document: its last real target is the EOS.
        let tok = CharTokenizer::new();
        let t = targets.to_vec::<i64>().unwrap();
        for row in t.chunks(54) {
            let last = row.iter().rev().find(|&&x| x != IGNORE_INDEX).unwrap();
            assert_eq!(*last, tok.eos_id() as i64);
        }
    }
}
