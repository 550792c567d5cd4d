//! Tokenizers. One trait; a built-in character-level tokenizer whose special tokens (the R1
//! template's tags, BOS/EOS/PAD) are single tokens. (HF `tokenizer.json` support arrives with the
//! inference issue.)

use crate::{Error, Result};

pub trait Tokenizer: Send + Sync {
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
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
}
