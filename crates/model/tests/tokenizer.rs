//! HF `tokenizer.json` through the `tokenizers` crate against the ids HF's Python implementation
//! gave (`scripts/make_tokenizer_fixture.py`).

mod common;

use whale_model::tokenizer::{tokenizer_for, HfTokenizer, Tokenizer};

#[test]
fn hf_tokenizer_json_encodes_and_decodes_like_transformers() {
    let dir = common::fixture("tokenizer");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let tok = HfTokenizer::from_file(&dir.join("tokenizer.json"), None, None).unwrap();
    assert_eq!(tok.vocab_size() as u64, expected["vocab_size"].as_u64().unwrap());
    assert_eq!(tok.eos_id() as u64, expected["eos"].as_u64().unwrap(), "<|endoftext|> found by name");
    for case in expected["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let ids = tok.encode(text).unwrap();
        assert_eq!(ids, want, "{text:?}");
        assert_eq!(tok.decode(&ids), case["decoded"].as_str().unwrap());
    }
    // The R1 tags are single special tokens.
    assert_eq!(tok.encode("<think>").unwrap(), vec![tok.special_id("<think>").unwrap()]);
    // Without a tokenizer.json a checkpoint directory gets the character tokenizer.
    assert_eq!(tokenizer_for(&common::fixture("qwen2_tied")).unwrap().vocab_size(), 62);
    assert_eq!(tokenizer_for(&dir).unwrap().vocab_size(), tok.vocab_size());
    let err = HfTokenizer::from_file(&dir.join("missing.json"), None, None).unwrap_err().to_string();
    assert!(err.contains("missing.json"), "{err}");
}
