//! Tokenizers. One trait; a built-in character-level tokenizer whose special tokens (the R1
//! template's tags, BOS/EOS/PAD) are single tokens, and HF `tokenizer.json` files through the
//! `tokenizers` crate (encode/decode without a chat template).

use std::path::Path;

use crate::{Error, Result};

pub trait Tokenizer: Send + Sync {
    /// The ids of `text` as it is (no BOS or other template tokens added).
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    /// The ids of a prompt as HF's `tokenizer(prompt)` gives them: with the special tokens the
    /// tokenizer's post-processor adds (Llama 3's and R1-Distill's BOS). The character tokenizer
    /// adds none.
    fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        self.encode(text)
    }
    fn decode(&self, ids: &[u32]) -> String;
    fn vocab_size(&self) -> usize;
    fn bos_id(&self) -> u32;
    fn eos_id(&self) -> u32;
    fn pad_id(&self) -> u32;
    /// The id of a special token such as `<think>`.
    fn special_id(&self, token: &str) -> Option<u32>;
}

/// The special tokens, in id order (ids 0..7).
pub const SPECIAL_TOKENS: [&str; 7] = ["<pad>", "<bos>", "<eos>", "<think>", "</think>", "<answer>", "</answer>"];

/// The characters the embedded tasks use, after the special tokens.
pub const CHARSET: &str = "0123456789+-*/=%()[]{};:,.?! abcdefghijklmnopqrstuvwxyz";

/// Maps each character of [`CHARSET`] and each special token to one id.
#[derive(Debug, Clone)]
pub struct CharTokenizer {
    chars: Vec<char>,
}

impl Default for CharTokenizer {
    fn default() -> Self {
        CharTokenizer { chars: CHARSET.chars().collect() }
    }
}

impl CharTokenizer {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Tokenizer for CharTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(text.len());
        let mut rest = text;
        'outer: while let Some(c) = rest.chars().next() {
            if c == '<' {
                for (id, tok) in SPECIAL_TOKENS.iter().enumerate() {
                    if let Some(r) = rest.strip_prefix(tok) {
                        out.push(id as u32);
                        rest = r;
                        continue 'outer;
                    }
                }
            }
            let id = self.chars.iter().position(|&x| x == c).ok_or_else(|| {
                Error::Model(format!("character {c:?} is not in the character tokenizer's vocabulary"))
            })?;
            out.push((SPECIAL_TOKENS.len() + id) as u32);
            rest = &rest[c.len_utf8()..];
        }
        Ok(out)
    }

    fn decode(&self, ids: &[u32]) -> String {
        let n = SPECIAL_TOKENS.len();
        ids.iter()
            .map(|&i| {
                let i = i as usize;
                if i < n {
                    SPECIAL_TOKENS[i].to_string()
                } else {
                    self.chars.get(i - n).map_or_else(|| "\u{fffd}".to_string(), |c| c.to_string())
                }
            })
            .collect()
    }

    fn vocab_size(&self) -> usize {
        SPECIAL_TOKENS.len() + self.chars.len()
    }

    fn bos_id(&self) -> u32 {
        1
    }

    fn eos_id(&self) -> u32 {
        2
    }

    fn pad_id(&self) -> u32 {
        0
    }

    fn special_id(&self, token: &str) -> Option<u32> {
        SPECIAL_TOKENS.iter().position(|&t| t == token).map(|i| i as u32)
    }
}

/// An HF `tokenizer.json` (what Qwen2, Llama and DeepSeek checkpoints ship).
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
}

impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HfTokenizer(vocab {}, bos {}, eos {}, pad {})", self.vocab_size(), self.bos, self.eos, self.pad)
    }
}

/// Names the BOS/EOS tokens go by in the common families, most specific first.
const BOS_NAMES: [&str; 4] = ["<｜begin▁of▁sentence｜>", "<|begin_of_text|>", "<s>", "<|endoftext|>"];
const EOS_NAMES: [&str; 5] = ["<｜end▁of▁sentence｜>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<|endoftext|>"];

impl HfTokenizer {
    /// Loads `path`; BOS/EOS/PAD ids are the given ones, else found by their usual names.
    pub fn from_file(path: &Path, bos: Option<u32>, eos: Option<u32>) -> Result<Self> {
        let mut inner = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::file(path, e))?;
        let find = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let eos = eos.or_else(|| find(&EOS_NAMES)).ok_or_else(|| {
            Error::file(path, "no end-of-sequence token (none of the usual names; give its id in config.json)")
        })?;
        let bos = bos.or_else(|| find(&BOS_NAMES)).unwrap_or(eos);
        let pad = inner.get_padding().map(|p| p.pad_id).unwrap_or(eos);
        // A truncation or padding a tokenizer.json carries would cut a prompt or pad it before
        // generation; transformers turns both off unless a call asks for them.
        inner.with_truncation(None).map_err(|e| Error::file(path, e))?;
        inner.with_padding(None);
        Ok(HfTokenizer { inner, bos, eos, pad })
    }
}

impl Tokenizer for HfTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| Error::Model(format!("tokenizer: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(|e| Error::Model(format!("tokenizer: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, false).unwrap_or_else(|e| format!("<undecodable: {e}>"))
    }

    fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    fn bos_id(&self) -> u32 {
        self.bos
    }

    fn eos_id(&self) -> u32 {
        self.eos
    }

    fn pad_id(&self) -> u32 {
        self.pad
    }

    fn special_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// The largest vocabulary a checkpoint without a tokenizer.json may have: its model was trained
/// with the character tokenizer.
const CHAR_MODEL_VOCAB_LIMIT: u64 = 1024;

/// A JSON file of `dir`, `Null` when it is absent or unreadable.
fn json_of(dir: &Path, file: &str) -> serde_json::Value {
    std::fs::read_to_string(dir.join(file)).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
}

/// The tokenizer of a checkpoint directory: its `tokenizer.json` when there is one (BOS/EOS ids
/// from generation_config.json, else config.json, when they give them: R1-Distill-Qwen's
/// config.json names the end-of-sentence token as its BOS, its generation_config.json the right
/// one), else the built-in character tokenizer, for a model whose vocabulary it can be.
pub fn tokenizer_for(dir: &Path) -> Result<Box<dyn Tokenizer>> {
    let path = dir.join("tokenizer.json");
    let (cfg, generation) = (json_of(dir, "config.json"), json_of(dir, "generation_config.json"));
    if !path.exists() {
        // Our own runs' models round their vocabulary up a little (the presets have 64 ids or
        // so); one of thousands is a subword model whose tokenizer is missing.
        let chars = CharTokenizer::new();
        if let Some(vocab) = cfg["vocab_size"].as_u64().filter(|&v| v > CHAR_MODEL_VOCAB_LIMIT) {
            return Err(Error::file(
                &path,
                format!(
                    "missing: a vocabulary of {vocab} needs the checkpoint's own tokenizer (the built-in character \
                     tokenizer has {} ids)",
                    chars.vocab_size()
                ),
            ));
        }
        return Ok(Box::new(chars));
    }
    let id = |k: &str| {
        [&generation, &cfg].into_iter().find_map(|v| v[k].as_u64().or_else(|| v[k][0].as_u64())).map(|x| x as u32)
    };
    Ok(Box::new(HfTokenizer::from_file(&path, id("bos_token_id"), id("eos_token_id"))?))
}

/// The tokens that end a generation from the checkpoint at `dir`: the tokenizer's EOS and every
/// `eos_token_id` its config.json and generation_config.json list (Llama 3 lists several, and
/// HF's `generate` stops at any of them).
pub fn stop_tokens_for(dir: &Path, tok: &dyn Tokenizer) -> Vec<u32> {
    let mut stop = vec![tok.eos_id()];
    for file in ["config.json", "generation_config.json"] {
        let v = json_of(dir, file);
        let ids = match &v["eos_token_id"] {
            serde_json::Value::Array(a) => a.iter().filter_map(|x| x.as_u64()).collect(),
            x => x.as_u64().into_iter().collect::<Vec<_>>(),
        };
        stop.extend(ids.into_iter().filter_map(|x| u32::try_from(x).ok()).filter(|&x| (x as usize) < tok.vocab_size()));
    }
    let mut seen = std::collections::HashSet::new();
    stop.retain(|t| seen.insert(*t));
    stop
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_single_tokens_and_round_trip() {
        let t = CharTokenizer::new();
        let text = "12+7=<think>2+7=9</think><answer>19</answer><eos>";
        let ids = t.encode(text).unwrap();
        assert_eq!(t.decode(&ids), text);
        assert_eq!(ids.iter().filter(|&&i| i == t.special_id("<think>").unwrap()).count(), 1);
        assert_eq!(ids.len(), "12+7=".len() + 1 + "2+7=9".len() + 1 + 1 + 2 + 1 + 1);
        assert!(t.vocab_size() <= 64, "fits the tiny preset's vocabulary");
        assert!(t.encode("A").is_err());
        // A lone '<' that starts no special token is an ordinary (unknown here) character.
        assert!(t.encode("<x").is_err());
    }

    #[test]
    fn generation_stops_at_every_eos_the_configs_list() {
        let dir = std::env::temp_dir().join(format!("whale-stop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let t = CharTokenizer::new();
        assert_eq!(stop_tokens_for(&dir, &t), [t.eos_id()], "no configs: the tokenizer's EOS");
        std::fs::write(dir.join("config.json"), r#"{"eos_token_id": 5}"#).unwrap();
        std::fs::write(dir.join("generation_config.json"), r#"{"eos_token_id": [5, 7, 100000]}"#).unwrap();
        // Deduplicated, in order; an id outside the vocabulary cannot be generated anyway.
        assert_eq!(stop_tokens_for(&dir, &t), [t.eos_id(), 5, 7]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
