//! HF `tokenizer.json` through the `tokenizers` crate against the ids HF's Python implementation
//! gave (`scripts/make_tokenizer_fixture.py`).

mod common;

use whale_model::tokenizer::{tokenizer_for, HfTokenizer, Tokenizer};

/// The fixture `name`'s tokenizer, checked against the ids and decodings HF's `tokenizers`
/// (Python, oniguruma regexes) gave for each text.
fn encodes_and_decodes_as_hf(name: &str) -> HfTokenizer {
    let dir = common::fixture(name);
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let tok = HfTokenizer::from_file(&dir.join("tokenizer.json"), None, None).unwrap();
    assert_eq!(tok.vocab_size() as u64, expected["vocab_size"].as_u64().unwrap(), "{name}");
    assert_eq!(tok.eos_id() as u64, expected["eos"].as_u64().unwrap(), "{name}: <|endoftext|> found by name");
    for case in expected["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let ids = tok.encode(text).unwrap();
        assert_eq!(ids, want, "{name}: {text:?}");
        assert_eq!(tok.decode(&ids), case["decoded"].as_str().unwrap(), "{name}: {text:?}");
    }
    tok
}

#[test]
fn qwen2_and_llama3_style_pipelines_encode_as_hf() {
    // A Split on each model's regex before a regex-free ByteLevel, NFC (Qwen2), digits in threes
    // and ignore_merges (Llama-3), `<think>` an added non-special token (R1-Distill-Qwen).
    let qwen2 = encodes_and_decodes_as_hf("tokenizer_qwen2");
    assert_eq!(qwen2.encode("<think>").unwrap(), vec![qwen2.special_id("<think>").unwrap()]);
    encodes_and_decodes_as_hf("tokenizer_llama3");
}

#[test]
fn hf_tokenizer_json_encodes_and_decodes_like_hf() {
    let dir = common::fixture("tokenizer");
    let tok = encodes_and_decodes_as_hf("tokenizer");
    // The R1 tags are single special tokens.
    assert_eq!(tok.encode("<think>").unwrap(), vec![tok.special_id("<think>").unwrap()]);
    // Without a tokenizer.json a checkpoint directory gets the character tokenizer.
    assert_eq!(tokenizer_for(&common::fixture("qwen2_tied")).unwrap().vocab_size(), 62);
    assert_eq!(tokenizer_for(&dir).unwrap().vocab_size(), tok.vocab_size());
    let err = HfTokenizer::from_file(&dir.join("missing.json"), None, None).unwrap_err().to_string();
    assert!(err.contains("missing.json"), "{err}");

    // BOS/EOS ids: generation_config.json's before config.json's (R1-Distill-Qwen's config.json
    // gives its end-of-sentence id as BOS).
    let ids = whale_tensor::testing::TempDir::new("tokenizer-ids");
    std::fs::copy(dir.join("tokenizer.json"), ids.join("tokenizer.json")).unwrap();
    std::fs::write(ids.join("config.json"), r#"{"bos_token_id": 3, "eos_token_id": 3}"#).unwrap();
    std::fs::write(ids.join("generation_config.json"), r#"{"bos_token_id": 4, "eos_token_id": [3, 5]}"#).unwrap();
    let t = tokenizer_for(&ids).unwrap();
    assert_eq!((t.bos_id(), t.eos_id()), (4, 3));
    // An id that is no u32 (it would wrap to another token) or no id is an error naming the file
    // and key.
    // The primary EOS (or BOS) outside the vocabulary would never stop a generation.
    std::fs::write(ids.join("generation_config.json"), r#"{"bos_token_id": 4, "eos_token_id": [200000, 5]}"#).unwrap();
    let err = tokenizer_for(&ids).err().expect("refused").to_string();
    assert!(err.contains("generation_config.json") && err.contains("eos_token_id 200000"), "{err}");
    std::fs::write(ids.join("generation_config.json"), "{}").unwrap();
    std::fs::write(ids.join("config.json"), r#"{"bos_token_id": 999999, "eos_token_id": 3}"#).unwrap();
    let err = tokenizer_for(&ids).err().expect("refused").to_string();
    assert!(err.contains("config.json") && err.contains("bos_token_id 999999"), "{err}");
    for bad in ["4294967296", "[3, -1]", "\"</s>\""] {
        std::fs::write(ids.join("generation_config.json"), format!(r#"{{"eos_token_id": {bad}}}"#)).unwrap();
        let err = tokenizer_for(&ids).err().expect("refused").to_string();
        assert!(err.contains("generation_config.json") && err.contains("eos_token_id"), "{bad}: {err}");
    }
    // A subword model without its tokenizer.json is an error, not the character tokenizer.
    let bare = whale_tensor::testing::TempDir::new("bare-checkpoint");
    std::fs::write(bare.join("config.json"), r#"{"vocab_size": 32000}"#).unwrap();
    let err = tokenizer_for(&bare).err().expect("refused").to_string();
    assert!(err.contains("tokenizer.json") && err.contains("32000"), "{err}");
}

#[test]
fn a_tokenizer_config_naming_what_tokenizer_json_lacks_is_refused() {
    // transformers acts on these tokenizer_config.json settings; tokenizer.json alone would
    // encode the text otherwise, so they are refused, naming the file and the key.
    let fixture = common::fixture("tokenizer");
    let dir = whale_tensor::testing::TempDir::new("tokenizer-config");
    std::fs::copy(fixture.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    let think = tokenizer_for(&dir).unwrap().special_id("<think>").unwrap();
    let config = |text: &str| std::fs::write(dir.join("tokenizer_config.json"), text).unwrap();
    // What tokenizer.json holds, as strings or AddedToken objects, with the same ids: accepted.
    config(&format!(
        r#"{{"eos_token": "<|endoftext|>", "bos_token": {{"content": "<|endoftext|>"}}, "pad_token": null,
            "split_special_tokens": false, "added_tokens_decoder": {{"{think}": {{"content": "<think>"}}}}}}"#
    ));
    tokenizer_for(&dir).unwrap();
    for (text, words) in [
        (r#"{"split_special_tokens": true}"#.to_string(), "split_special_tokens"),
        (r#"{"eos_token": "<|im_end|>"}"#.to_string(), "eos_token `<|im_end|>` is not in tokenizer.json"),
        (r#"{"additional_special_tokens": [{"content": "<tool>"}]}"#.to_string(), "`<tool>`"),
        (format!(r#"{{"added_tokens_decoder": {{"{}": {{"content": "<think>"}}}}}}"#, think + 1), "but"),
    ] {
        config(&text);
        let err = tokenizer_for(&dir).err().expect("refused").to_string();
        assert!(err.contains("tokenizer_config.json") && err.contains(words), "{text}: {err}");
    }
    // A Llama tokenizer's add_bos_token / add_eos_token, which transformers builds the
    // post-processor from: accepted where tokenizer.json's template does the same.
    config(r#"{}"#);
    let tok = tokenizer_for(&dir).unwrap();
    let probe = tok.encode_prompt("a").unwrap();
    let (adds_bos, adds_eos) = (probe.first() == Some(&tok.bos_id()), probe.last() == Some(&tok.eos_id()));
    let llama = |bos: bool, eos: bool| {
        config(&format!(
            r#"{{"tokenizer_class": "LlamaTokenizerFast", "add_bos_token": {bos}, "add_eos_token": {eos}}}"#
        ));
        tokenizer_for(&dir).map(|_| ()).map_err(|e| e.to_string())
    };
    llama(adds_bos, adds_eos).unwrap();
    let err = llama(!adds_bos, adds_eos).unwrap_err();
    assert!(err.contains("tokenizer_config.json") && err.contains("add_bos_token"), "{err}");
    let err = llama(adds_bos, !adds_eos).unwrap_err();
    assert!(err.contains("add_eos_token"), "{err}");
    // clean_up_tokenization_spaces: true makes decoding drop the space before punctuation and
    // contractions, as HF's decode does; without it the text comes back as written.
    let text = "it is n't so , is it ?";
    for (flag, want) in [("false", text), ("true", "it isn't so, is it?")] {
        config(&format!(r#"{{"clean_up_tokenization_spaces": {flag}}}"#));
        let tok = tokenizer_for(&dir).unwrap();
        assert_eq!(tok.decode(&tok.encode(text).unwrap()), want, "clean_up_tokenization_spaces {flag}");
    }
}

#[test]
fn prompts_get_the_post_processors_tokens_and_nothing_is_truncated_or_padded() {
    // The fixture with a truncation to 2 tokens, right padding to 32 and a BOS template, as some
    // checkpoints' tokenizer.json carry them.
    let dir = common::fixture("tokenizer");
    let plain = HfTokenizer::from_file(&dir.join("tokenizer.json"), None, None).unwrap();
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap()).unwrap();
    let bos = plain.special_id("<|endoftext|>").unwrap();
    json["truncation"] =
        serde_json::json!({"direction": "Right", "max_length": 2, "strategy": "LongestFirst", "stride": 0});
    json["padding"] = serde_json::json!({"strategy": {"Fixed": 32}, "direction": "Right", "pad_to_multiple_of": null,
        "pad_id": bos, "pad_type_id": 0, "pad_token": "<|endoftext|>"});
    json["post_processor"] = serde_json::json!({"type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [bos], "tokens": ["<|endoftext|>"]}}});
    let tmp = whale_tensor::testing::TempDir::new("tokenizer-template");
    std::fs::write(tmp.join("tokenizer.json"), json.to_string()).unwrap();
    let tok = HfTokenizer::from_file(&tmp.join("tokenizer.json"), None, None).unwrap();
    let text = "twelve plus seven makes nineteen";
    let ids = plain.encode(text).unwrap();
    assert!(ids.len() > 2);
    assert_eq!(tok.encode(text).unwrap(), ids, "neither truncated nor padded");
    assert_eq!(tok.encode_prompt(text).unwrap(), [&[bos][..], &ids].concat(), "BOS from the template");
    assert_eq!(plain.encode_prompt(text).unwrap(), ids, "no template, nothing added");
    // A padding block whose id is no token is refused, naming the file.
    json["padding"]["pad_id"] = serde_json::json!(1_000_000);
    std::fs::write(tmp.join("tokenizer.json"), json.to_string()).unwrap();
    let err = HfTokenizer::from_file(&tmp.join("tokenizer.json"), None, None).unwrap_err().to_string();
    assert!(err.contains("pad_id 1000000") && err.contains("tokenizer.json"), "{err}");
}

#[test]
fn a_checkpoints_tokenizer_stops_at_every_listed_eos_and_saves_back_the_same() {
    let fixture = common::fixture("tokenizer");
    let dir = whale_tensor::testing::TempDir::new("tokenizer-checkpoint");
    std::fs::copy(fixture.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    std::fs::write(dir.join("config.json"), r#"{"vocab_size": 353, "eos_token_id": 5}"#).unwrap();
    let generation = r#"{"bos_token_id": 4, "eos_token_id": [5, 7, 100000]}"#;
    std::fs::write(dir.join("generation_config.json"), generation).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"model_max_length": 128}"#).unwrap();
    // transformers 5 keeps the chat template in a file of its own.
    std::fs::write(dir.join("chat_template.jinja"), "{% for m in messages %}{{ m['content'] }}{% endfor %}").unwrap();
    let tok = tokenizer_for(&dir).unwrap();
    // EOS first, then each id the configs list, once; one outside the vocabulary is never sampled.
    assert_eq!(tok.eos_id(), 5);
    assert_eq!(tok.stop_ids(), [5, 7]);

    // Saved into a checkpoint (whose config.json the model writes), it reads back the same.
    let saved = whale_tensor::testing::TempDir::new("tokenizer-saved");
    std::fs::write(saved.join("config.json"), r#"{"vocab_size": 353, "eos_token_id": 5}"#).unwrap();
    tok.save_pretrained(&saved).unwrap();
    for file in ["tokenizer.json", "generation_config.json", "tokenizer_config.json", "chat_template.jinja"] {
        assert_eq!(std::fs::read(saved.join(file)).unwrap(), std::fs::read(dir.join(file)).unwrap(), "{file}");
    }
    assert!(!saved.join("special_tokens_map.json").exists(), "only the files it came with");
    let back = tokenizer_for(&saved).unwrap();
    assert_eq!((back.bos_id(), back.eos_id(), back.stop_ids()), (tok.bos_id(), tok.eos_id(), tok.stop_ids()));
    // As HF's generate: generation_config.json's list where it has one, config.json's only
    // without it (not their union).
    let other = whale_tensor::testing::TempDir::new("tokenizer-stops");
    std::fs::copy(fixture.join("tokenizer.json"), other.join("tokenizer.json")).unwrap();
    std::fs::write(other.join("config.json"), r#"{"vocab_size": 353, "eos_token_id": [5, 9]}"#).unwrap();
    assert_eq!(tokenizer_for(&other).unwrap().stop_ids(), [5, 9]);
    std::fs::write(other.join("generation_config.json"), r#"{"eos_token_id": 7}"#).unwrap();
    assert_eq!(tokenizer_for(&other).unwrap().stop_ids(), [7]);
    let text = "12+7=<think>2+7=9</think><answer>19</answer>";
    assert_eq!(back.encode(text).unwrap(), tok.encode(text).unwrap());

    // A generation config that does not parse is an error naming it, not ids silently dropped.
    std::fs::write(dir.join("generation_config.json"), r#"{"eos_token_id": [5, 7"#).unwrap();
    let err = tokenizer_for(&dir).err().expect("refused").to_string();
    assert!(err.contains("generation_config.json"), "{err}");

    // The character tokenizer writes nothing: a checkpoint without tokenizer.json reads it back.
    let chars = whale_tensor::testing::TempDir::new("tokenizer-chars");
    tokenizer_for(&common::fixture("qwen2_tied")).unwrap().save_pretrained(&chars).unwrap();
    assert_eq!(std::fs::read_dir(&chars).unwrap().count(), 0);
}
