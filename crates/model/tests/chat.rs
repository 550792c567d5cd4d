//! Chat templates rendered as HF transformers' `apply_chat_template` renders them (Jinja2 in its
//! sandbox): the texts and ids scripts/make_chat_reference.py recorded, for DeepSeek-R1's
//! template, a ChatML one, one that reaches the constructs templates use and one with
//! transformers' `{% generation %}` blocks.

mod common;

use std::path::Path;

use whale_model::chat::{ChatMessage, ChatTemplate};
use whale_model::tokenizer::tokenizer_for;

fn expected() -> serde_json::Value {
    let path = common::fixture("chat_templates/expected.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn messages(conversation: &serde_json::Value) -> Vec<ChatMessage> {
    let text = |m: &serde_json::Value, key: &str| m[key].as_str().unwrap().to_string();
    conversation.as_array().unwrap().iter().map(|m| ChatMessage::new(text(m, "role"), text(m, "content"))).collect()
}

/// Every recorded case of `template` (one of expected.json's) rendered by `chat`: the same text,
/// or an error carrying the template's own message where Jinja2 raised one.
fn renders_as_transformers(chat: &ChatTemplate, template: &serde_json::Value, expected: &serde_json::Value) -> usize {
    let name = template["name"].as_str().unwrap();
    let mut checked = 0;
    for case in template["cases"].as_array().unwrap() {
        let conversation = case["conversation"].as_str().unwrap();
        let agp = case["add_generation_prompt"].as_bool().unwrap();
        let got = chat.render(&messages(&expected["conversations"][conversation]), agp);
        let what = format!("{name}, {conversation}, add_generation_prompt {agp}");
        match (case["rendered"].as_str(), case["error"].as_str()) {
            (Some(want), _) => assert_eq!(got.unwrap(), want, "{what}"),
            (None, Some(message)) => {
                let err = got.expect_err(&what).to_string();
                assert!(err.contains(message) && err.contains("chat template"), "{what}: {err}");
            }
            _ => panic!("{what}: neither a text nor an error"),
        }
        checked += 1;
    }
    checked
}

#[test]
fn templates_render_as_transformers_renders_them() {
    let expected = expected();
    let special: Vec<(String, String)> = expected["special_tokens"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    let mut cases = 0;
    for template in expected["templates"].as_array().unwrap() {
        let chat = ChatTemplate::new(template["source"].as_str().unwrap(), "expected.json", special.clone());
        cases += renders_as_transformers(&chat, template, &expected);
    }
    assert_eq!(cases, 36, "every recorded case");
}

/// A checkpoint transformers saved: its chat_template.jinja and tokenizer_config.json's special
/// tokens give the same texts, and its tokenizer encodes them to `apply_chat_template`'s ids with
/// no BOS of its own (the template wrote it; `encode_prompt` would add a second).
#[test]
fn a_saved_checkpoints_template_renders_and_encodes_as_transformers() {
    let expected = expected();
    let dir = common::fixture("chat_templates/checkpoint");
    let chat = ChatTemplate::from_dir(&dir).unwrap().expect("a template");
    let chatml = expected["templates"].as_array().unwrap().iter().find(|t| t["name"] == "chatml").unwrap();
    assert_eq!(chat.source(), chatml["source"].as_str().unwrap());
    assert_eq!(renders_as_transformers(&chat, chatml, &expected), 8);
    let tok = tokenizer_for(&dir).unwrap();
    for template in expected["templates"].as_array().unwrap() {
        for case in template["cases"].as_array().unwrap() {
            let (Some(text), Some(ids)) = (case["rendered"].as_str(), case["ids"].as_array()) else { continue };
            let want: Vec<u32> = ids.iter().map(|x| x.as_u64().unwrap() as u32).collect();
            assert_eq!(tok.encode(text).unwrap(), want, "{}: {text:?}", template["name"]);
            let with_bos = tok.encode_prompt(text).unwrap();
            let bos = tok.special_id(expected["special_tokens"]["bos_token"].as_str().unwrap()).unwrap();
            assert_eq!((with_bos[0], &with_bos[1..]), (bos, &want[..]), "the post-processor adds a BOS");
        }
    }
}

fn write(dir: &Path, file: &str, text: &str) {
    std::fs::write(dir.join(file), text).unwrap();
}

/// Where transformers finds a template: chat_template.jinja before tokenizer_config.json's
/// `chat_template`, which is a string or a list of named templates (`default` is used); special
/// tokens as strings or AddedToken objects, special_tokens_map.json's in their place for a config
/// without `added_tokens_decoder` (as transformers 5.25 renders these files); none at all is no
/// template; a list without `default`, or named templates in additional_chat_templates/ alone,
/// is an error naming the file.
#[test]
fn a_checkpoints_template_is_found_where_transformers_looks() {
    let dir = std::env::temp_dir().join(format!("whale-chat-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let user = [ChatMessage::new("user", "hi")];
    assert!(ChatTemplate::from_dir(&dir).unwrap().is_none(), "no files, no template");
    write(&dir, "tokenizer_config.json", r#"{"eos_token": "</s>"}"#);
    assert!(ChatTemplate::from_dir(&dir).unwrap().is_none(), "a config without one");
    let template = "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}{{ eos_token }}{% endfor %}";
    let mut config = serde_json::json!({
        "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false},
        "eos_token": "</s>",
        "chat_template": template,
    });
    write(&dir, "tokenizer_config.json", &config.to_string());
    write(&dir, "special_tokens_map.json", r#"{"bos_token": "<unused>"}"#);
    let render = |dir: &Path| ChatTemplate::from_dir(dir).unwrap().unwrap().render(&user, false).unwrap();
    assert_eq!(render(&dir), "<unused>user: hi</s>", "an older config: the map's BOS replaces its own");
    config["added_tokens_decoder"] = serde_json::json!({});
    write(&dir, "tokenizer_config.json", &config.to_string());
    assert_eq!(render(&dir), "<s>user: hi</s>", "the config's AddedToken BOS; the map is not read");
    let named = serde_json::json!({
        "eos_token": "</s>",
        "chat_template": [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": template}],
    });
    write(&dir, "tokenizer_config.json", &named.to_string());
    assert_eq!(render(&dir), "<unused>user: hi</s>");
    write(&dir, "chat_template.jinja", "jinja file: {{ messages[0].content }}");
    assert_eq!(render(&dir), "jinja file: hi", "chat_template.jinja comes first");
    std::fs::create_dir(dir.join("additional_chat_templates")).unwrap();
    assert_eq!(render(&dir), "jinja file: hi", "beside named templates too");
    std::fs::remove_file(dir.join("chat_template.jinja")).unwrap();
    let err = ChatTemplate::from_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("additional_chat_templates") && err.contains("not supported"), "{err}");
    std::fs::remove_dir(dir.join("additional_chat_templates")).unwrap();
    write(&dir, "tokenizer_config.json", r#"{"chat_template": [{"name": "tool_use", "template": "x"}]}"#);
    let err = ChatTemplate::from_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("tokenizer_config.json") && err.contains("default"), "{err}");
    // A template that does not parse names its file and line.
    write(&dir, "tokenizer_config.json", r#"{"chat_template": "line one\n{% if %}"}"#);
    let err = ChatTemplate::from_dir(&dir).unwrap().unwrap().render(&user, true).unwrap_err().to_string();
    assert!(err.contains("tokenizer_config.json") && err.contains("line 2"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
