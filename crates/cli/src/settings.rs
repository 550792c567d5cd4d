//! Run settings from a config file (JSON or TOML) with command-line flags overriding them.
//! Unknown keys are an error that names the key and the file.

use std::path::Path;

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;

/// Reads `path` as JSON (`.json`) or TOML (anything else) into `T`, which rejects unknown keys.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
    let is_json = path.extension().is_some_and(|e| e == "json");
    let parsed = if is_json {
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{e}"))
    } else {
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{e}"))
    };
    parsed.with_context(|| format!("config file {}", path.display()))
}

/// The `letters` share a base was pretrained with, when the base is `<run>/checkpoint` of a
/// `whale pretrain` run (whose `<run>/settings.json` records it); `None` for any other folder.
pub fn pretrained_letters(base: &Path) -> Option<f64> {
    if base.file_name()? != "checkpoint" {
        return None;
    }
    let text = std::fs::read_to_string(base.parent()?.join("settings.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?.get("letters")?.as_f64()
}

/// A note on stderr when a run poses a `letters` share of its problems in letter numerals that
/// differs from the share its base was pretrained with: a digits-only base (`letters` 0) asked
/// letter-numeral problems is scored on text it never read, which is easy to miss.
pub fn note_letters_mismatch(base: &Path, letters: f64) {
    if let Some(pretrained) = pretrained_letters(base).filter(|&p| p != letters) {
        eprintln!(
            "note: {} was pretrained with letters = {pretrained}, but this run poses a share of {letters} of its \
             problems in letter numerals; set letters to {pretrained} to match",
            base.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pretrain_runs_letters_are_read_next_to_its_checkpoint() {
        let run = std::env::temp_dir().join(format!("whale-letters-{}", std::process::id()));
        std::fs::create_dir_all(run.join("checkpoint")).unwrap();
        let ckpt = run.join("checkpoint");
        assert_eq!(pretrained_letters(&ckpt), None, "no settings.json yet");
        std::fs::write(run.join("settings.json"), r#"{"tasks": "add", "letters": 0.0}"#).unwrap();
        assert_eq!(pretrained_letters(&ckpt), Some(0.0));
        assert_eq!(pretrained_letters(&run), None, "only a folder named checkpoint is a run's base");
        std::fs::write(run.join("settings.json"), r#"{"grpo": {"letters": 0.5}}"#).unwrap();
        assert_eq!(pretrained_letters(&ckpt), None, "not a pretrain run's settings");
        std::fs::write(run.join("settings.json"), "{ not json").unwrap();
        assert_eq!(pretrained_letters(&ckpt), None);
        std::fs::remove_dir_all(&run).unwrap();
    }
}
