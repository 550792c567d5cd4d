//! Every reference fixture (the tensor, model, RL and parallel crates' tests/fixtures) was written
//! by the script in the repo as it is now: its provenance (reference.safetensors' metadata, or
//! expected.json's `provenance`) names the script and an FNV-1a hash of the script's text,
//! compared here with the file's, as the PTX's source hash is. A script changed since its fixtures
//! were written fails until they are rewritten (the scripts need torch with transformers, or TRL
//! and verl, in a venv, or lm-evaluation-harness's files, or a checkout of deepseek-ai/DualPipe
//! or DeepSeek-V3: see each script's header).

use std::path::Path;

/// FNV-1a over the bytes, as scripts/provenance.py computes it.
fn fnv1a64(data: &[u8]) -> String {
    let h = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3));
    format!("{h:016x}")
}

/// (generator, hash) of one fixture directory's provenance.
fn provenance(dir: &Path) -> (String, String) {
    let field = |get: &dyn Fn(&str) -> Option<String>, key: &str| {
        get(key).unwrap_or_else(|| panic!("{}: no `{key}` in its provenance", dir.display()))
    };
    let reference = dir.join("reference.safetensors");
    if reference.exists() {
        let bytes = std::fs::read(&reference).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let meta = meta.metadata().clone().unwrap_or_default();
        let get = |k: &str| meta.get(k).cloned();
        return (field(&get, "generator"), field(&get, "generator_fnv1a64"));
    }
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let get = |k: &str| expected["provenance"][k].as_str().map(String::from);
    (field(&get, "generator"), field(&get, "generator_fnv1a64"))
}

#[test]
fn every_fixture_was_written_by_its_script_as_it_is_now() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    // The model's fixtures (HF transformers, tokenizers, DeepSeek's inference code), the RL
    // crate's (TRL, verl, lm-evaluation-harness's MATH grader), the pipeline schedules'
    // (deepseek-ai/DualPipe) and AdamW's (torch).
    let in_dir = |dir: &str| -> Vec<_> {
        let mut dirs: Vec<_> = std::fs::read_dir(root.join(dir)).unwrap().map(|e| e.unwrap().path()).collect();
        dirs.sort();
        dirs
    };
    let (model, rl) = (in_dir("crates/model/tests/fixtures"), in_dir("crates/rl/tests/fixtures"));
    let (parallel, tensor) = (in_dir("crates/parallel/tests/fixtures"), in_dir("crates/tensor/tests/fixtures"));
    assert!(model.len() >= 12 && rl.len() >= 3 && !parallel.is_empty() && !tensor.is_empty());
    for dir in model.into_iter().chain(rl).chain(parallel).chain(tensor) {
        let (generator, hash) = provenance(&dir);
        let script = root.join(&generator);
        let text = std::fs::read(&script).unwrap_or_else(|e| panic!("{}: {generator}: {e}", dir.display()));
        assert_eq!(
            fnv1a64(&text),
            hash,
            "{}: {generator} changed since it wrote this fixture: rerun it (.venv/bin/python {generator})",
            dir.display()
        );
    }
}
