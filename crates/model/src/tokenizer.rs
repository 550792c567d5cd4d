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
    /// One past its largest id: the ids it can give and decode. A model's embedding table may
    /// have more rows (padding: the tiny preset's 64 for the character tokenizer's 62, Qwen2's
    /// 151,936 for 151,665 tokens); generation stays below this ([`SamplingConfig::limited_to`]).
    ///
    /// [`SamplingConfig::limited_to`]: crate::generate::SamplingConfig::limited_to
    fn vocab_size(&self) -> usize;
    fn bos_id(&self) -> u32;
    fn eos_id(&self) -> u32;
    fn pad_id(&self) -> u32;
    /// The id of a special token such as `<think>`.
    fn special_id(&self, token: &str) -> Option<u32>;
    /// Every token that ends a generation: EOS, and for a checkpoint's tokenizer
    /// ([`tokenizer_for`]) each `eos_token_id` its generation_config.json lists, or config.json
    /// without one (Llama 3 lists several, and HF's `generate` stops at any of them).
    fn stop_ids(&self) -> Vec<u32> {
        vec![self.eos_id()]
    }
    /// Writes into the checkpoint directory `dir` the files [`tokenizer_for`] reads this
    /// tokenizer back from, as HF's `tokenizer.save_pretrained` does (none for the character
    /// tokenizer, which `tokenizer_for` falls back to).
    fn save_pretrained(&self, _dir: &Path) -> Result<()> {
        Ok(())
    }
}

/// A shared tokenizer is one: runs hand the same one to several trainers.
impl<T: Tokenizer + ?Sized> Tokenizer for std::sync::Arc<T> {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        (**self).encode(text)
    }
    fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        (**self).encode_prompt(text)
    }
    fn decode(&self, ids: &[u32]) -> String {
        (**self).decode(ids)
    }
    fn vocab_size(&self) -> usize {
        (**self).vocab_size()
    }
    fn bos_id(&self) -> u32 {
        (**self).bos_id()
    }
    fn eos_id(&self) -> u32 {
        (**self).eos_id()
    }
    fn pad_id(&self) -> u32 {
        (**self).pad_id()
    }
    fn special_id(&self, token: &str) -> Option<u32> {
        (**self).special_id(token)
    }
    fn stop_ids(&self) -> Vec<u32> {
        (**self).stop_ids()
    }
    fn save_pretrained(&self, dir: &Path) -> Result<()> {
        (**self).save_pretrained(dir)
    }
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
    stops: Vec<u32>,
    /// One past its largest id (added tokens included): its vocabulary size even where the ids
    /// have gaps, which a count of its tokens would miss.
    id_bound: usize,
    /// The files it was read from (name, bytes), written back as they were by `save_pretrained`.
    files: Vec<(String, Vec<u8>)>,
    /// tokenizer_config.json's `clean_up_tokenization_spaces`: decoding then drops the space
    /// before punctuation and contractions, as HF's `decode` does.
    clean_up_spaces: bool,
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
        let bytes = std::fs::read(path).map_err(|e| Error::file(path, e))?;
        let mut inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| Error::file(path, e))?;
        let find = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let eos = eos.or_else(|| find(&EOS_NAMES)).ok_or_else(|| {
            Error::file(path, "no end-of-sequence token (none of the usual names; give its id in config.json)")
        })?;
        let bos = bos.or_else(|| find(&BOS_NAMES)).unwrap_or(eos);
        let padding_id = inner.get_padding().map(|p| p.pad_id);
        let pad = padding_id.unwrap_or(eos);
        // A truncation or padding a tokenizer.json carries would cut a prompt or pad it before
        // generation; transformers turns both off unless a call asks for them.
        inner.with_truncation(None).map_err(|e| Error::file(path, e))?;
        inner.with_padding(None);
        let id_bound = inner.get_vocab(true).values().max().map_or(0, |&id| id as usize + 1);
        // A padding block's id must be a token: rows padded with it would fail in the embedding
        // far from this file.
        if let Some(pad) = padding_id.filter(|&id| id as usize >= id_bound) {
            return Err(Error::file(path, format!("padding.pad_id {pad} is outside the tokenizer's {id_bound} ids")));
        }
        Ok(HfTokenizer {
            inner,
            bos,
            eos,
            pad,
            stops: vec![eos],
            id_bound,
            files: vec![(TOKENIZER_FILE.into(), bytes)],
            clean_up_spaces: false,
        })
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
        let text = self.inner.decode(ids, false).unwrap_or_else(|e| format!("<undecodable: {e}>"));
        if !self.clean_up_spaces {
            return text;
        }
        // HF's `clean_up_tokenization`, in its order.
        [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m")]
            .into_iter()
            .chain([(" 's", "'s"), (" 've", "'ve"), (" 're", "'re")])
            .fold(text, |t, (from, to)| t.replace(from, to))
    }

    fn vocab_size(&self) -> usize {
        self.id_bound
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

    fn stop_ids(&self) -> Vec<u32> {
        self.stops.clone()
    }

    fn save_pretrained(&self, dir: &Path) -> Result<()> {
        for (name, bytes) in &self.files {
            crate::checkpoint::write_synced(&dir.join(name), bytes)?;
        }
        Ok(())
    }
}

/// The largest vocabulary a checkpoint without a tokenizer.json may have: its model was trained
/// with the character tokenizer.
const CHAR_MODEL_VOCAB_LIMIT: u64 = 1024;

/// A JSON file of `dir`, `Null` when it is absent; an error naming it when it cannot be read or
/// parsed (its BOS/EOS ids would otherwise be silently replaced).
pub(crate) fn json_of(dir: &Path, file: &str) -> Result<serde_json::Value> {
    let path = dir.join(file);
    if !path.exists() {
        return Ok(serde_json::Value::Null);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::file(&path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::file(&path, e))
}

/// The tokenizer's settings file beside `tokenizer.json` (special tokens, the chat template).
pub(crate) const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// A special token as tokenizer_config.json and special_tokens_map.json give one: a string, or
/// an AddedToken object with its `content`.
pub(crate) fn token_content(v: &serde_json::Value) -> Option<String> {
    v.as_str().or_else(|| v["content"].as_str()).map(str::to_string)
}

/// Refuses a `tokenizer_config.json` whose settings transformers would act on but
/// `tokenizer.json` does not hold, so that the text is never silently encoded otherwise: special
/// tokens split as text (`split_special_tokens`), or a special or added token that is not in
/// `tokenizer.json` (with its id, for `added_tokens_decoder`), which transformers would add.
/// Returns the config (null without the file), for the settings the tokenizer honours.
fn check_tokenizer_config(dir: &Path, tok: &HfTokenizer) -> Result<serde_json::Value> {
    let config = json_of(dir, TOKENIZER_CONFIG_FILE)?;
    let refuse = |msg: String| Err(Error::file(dir.join(TOKENIZER_CONFIG_FILE), msg));
    if config["split_special_tokens"].as_bool() == Some(true) {
        return refuse("split_special_tokens: true (special tokens encoded as plain text) is not supported".into());
    }
    let mut wanted: Vec<(String, String, Option<u32>)> = Vec::new();
    for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
        if let Some(c) = token_content(&config[key]) {
            wanted.push((key.into(), c, None));
        }
    }
    for v in config["additional_special_tokens"].as_array().into_iter().flatten() {
        if let Some(c) = token_content(v) {
            wanted.push(("additional_special_tokens".into(), c, None));
        }
    }
    for (id, v) in config["added_tokens_decoder"].as_object().into_iter().flatten() {
        let id = id.parse::<u32>().ok();
        if let (Some(c), Some(id)) = (token_content(v), id) {
            wanted.push(("added_tokens_decoder".into(), c, Some(id)));
        }
    }
    for (key, token, id) in wanted {
        match (tok.inner.token_to_id(&token), id) {
            (None, _) => {
                return refuse(format!(
                    "{key} `{token}` is not in {TOKENIZER_FILE} (transformers would add it as a new token)"
                ))
            }
            (Some(found), Some(id)) if found != id => {
                return refuse(format!("{key}: `{token}` has id {id} here but {found} in {TOKENIZER_FILE}"));
            }
            _ => {}
        }
    }
    // transformers 4 rebuilds a Llama tokenizer's post-processor from these flags
    // (`LlamaTokenizerFast.update_post_processor`), transformers 5 drops them when there is a
    // tokenizer.json: a template that disagrees with them puts a BOS (or EOS) on prompts under
    // one version and not the other, so the tokenizer is refused as ambiguous.
    if config["tokenizer_class"].as_str().is_some_and(|c| c.starts_with("LlamaTokenizer")) {
        let probe = tok.encode_prompt("a")?;
        let adds =
            [("add_bos_token", probe.first() == Some(&tok.bos)), ("add_eos_token", probe.last() == Some(&tok.eos))];
        for (key, adds) in adds {
            if let Some(want) = config[key].as_bool().filter(|&want| want != adds) {
                let does = if adds { "adds one" } else { "adds none" };
                return refuse(format!(
                    "{key}: {want}, but {TOKENIZER_FILE}'s post-processor {does} (transformers 4 follows the flag, \
                     5 the post-processor)"
                ));
            }
        }
    }
    Ok(config)
}

/// The token ids an HF config gives under `key` (`bos_token_id`, `eos_token_id`): one id, a list
/// (Llama 3 lists several EOS ids), or none when the key is absent or null. Anything else is an
/// error message for the caller to attach to its key and file: an id that does not fit a u32
/// would otherwise be silently wrapped to another token.
pub(crate) fn config_token_ids(config: &serde_json::Value, key: &str) -> std::result::Result<Vec<u32>, String> {
    use serde_json::Value;
    let id = |x: &Value| x.as_u64().and_then(|x| u32::try_from(x).ok());
    let bad = |x: &Value| format!("`{x}` is not a token id or a list of them");
    match &config[key] {
        Value::Null => Ok(vec![]),
        Value::Array(ids) => ids.iter().map(|x| id(x).ok_or_else(|| bad(x))).collect(),
        x => id(x).map(|x| vec![x]).ok_or_else(|| bad(x)),
    }
}

/// The tokenizer file of a checkpoint directory.
const TOKENIZER_FILE: &str = "tokenizer.json";

/// The files next to `tokenizer.json` that belong to the tokenizer (HF's `save_pretrained`
/// writes `tokenizer_config.json`, and `special_tokens_map.json` in transformers 4 or
/// `chat_template.jinja` in 5, where the chat template left tokenizer_config.json;
/// generation_config.json holds the BOS/EOS ids and stop tokens generation uses).
const COMPANION_FILES: [&str; 4] =
    ["tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json"];

/// The tokenizer of a checkpoint directory: its `tokenizer.json` when there is one (BOS/EOS ids
/// from generation_config.json, else config.json, when they give them: R1-Distill-Qwen's
/// config.json names the end-of-sentence token as its BOS, its generation_config.json the right
/// one), else the built-in character tokenizer, for a model whose vocabulary it can be. Its
/// [`Tokenizer::stop_ids`] are the EOS and every `eos_token_id` generation_config.json lists, or
/// config.json without one (within the vocabulary), and its [`Tokenizer::save_pretrained`]
/// writes `tokenizer.json` and the companion files the directory has, so a checkpoint trained
/// from this one reads back the same tokenizer.
pub fn tokenizer_for(dir: &Path) -> Result<Box<dyn Tokenizer>> {
    let path = dir.join(TOKENIZER_FILE);
    let (cfg, generation) = (json_of(dir, "config.json")?, json_of(dir, "generation_config.json")?);
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
    // Each config's ids per key, generation_config.json's first.
    let ids = |key: &str| -> Result<Vec<Vec<u32>>> {
        FILES
            .into_iter()
            .zip([&generation, &cfg])
            .map(|(file, v)| config_token_ids(v, key).map_err(|e| Error::file(dir.join(file), format!("{key}: {e}"))))
            .collect()
    };
    const FILES: [&str; 2] = ["generation_config.json", "config.json"];
    // The first id a key lists, generation_config.json's before config.json's, with its file.
    let first = |lists: &[Vec<u32>]| FILES.into_iter().zip(lists).find_map(|(file, ids)| Some((file, *ids.first()?)));
    let (bos, eos) = (ids("bos_token_id")?, ids("eos_token_id")?);
    let mut tok = HfTokenizer::from_file(&path, first(&bos).map(|x| x.1), first(&eos).map(|x| x.1))?;
    let vocab = tok.vocab_size();
    // The BOS and EOS the configs name must be tokens: an EOS outside the vocabulary never stops
    // a generation, and pads (EOS by default) fail in the embedding.
    for (key, lists) in [("bos_token_id", &bos), ("eos_token_id", &eos)] {
        if let Some((file, id)) = first(lists).filter(|&(_, id)| id as usize >= vocab) {
            return Err(Error::file(
                dir.join(file),
                format!("{key} {id} is outside the tokenizer's {vocab} ids ({})", path.display()),
            ));
        }
    }
    let config = check_tokenizer_config(dir, &tok)?;
    tok.clean_up_spaces = config["clean_up_tokenization_spaces"].as_bool() == Some(true);
    // The stops after the EOS: generation_config.json's list where it gives one, else
    // config.json's (HF's generate reads generation_config.json alone when it has the key).
    let stop_list = eos.iter().find(|l| !l.is_empty()).cloned().unwrap_or_default();
    tok.stops.extend(stop_list.into_iter().filter(|&x| (x as usize) < vocab));
    let mut seen = std::collections::HashSet::new();
    tok.stops.retain(|t| seen.insert(*t));
    for name in COMPANION_FILES {
        let file = dir.join(name);
        if file.exists() {
            tok.files.push((name.into(), std::fs::read(&file).map_err(|e| Error::file(&file, e))?));
        }
    }
    Ok(Box::new(tok))
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
