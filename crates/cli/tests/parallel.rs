//! `whale pretrain` on a mesh of LocalComm ranks: data, expert and pipeline parallelism together
//! train, checkpoint (rank 0 only, the single-rank layout) and resume; impossible layouts are
//! refused, with the reason, before anything is written.

use std::path::Path;
use std::process::{Command, Output};

use whale_rl::parallel::model::tensor::testing::TempDir;

/// A fresh folder for this test's runs (removed when the test passes).
fn scratch(name: &str) -> TempDir {
    TempDir::new(&format!("cli-parallel-{name}"))
}

/// `whale pretrain --out run` with small settings and `flags`.
fn pretrain(run: &Path, flags: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_whale"));
    cmd.args(["pretrain", "--out", run.to_str().unwrap()]).args(SMALL).args(flags).output().unwrap()
}

/// A run's checkpoint/trainer.json, parsed.
fn trainer_state(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("checkpoint/trainer.json")).unwrap()).unwrap()
}

/// As `SMALL` in tests/cli.rs, with two micro-batches per replica for the pipeline.
const SMALL: [&str; 12] = [
    "--micro-batch",
    "2",
    "--grad-accum",
    "2",
    "--seq-len",
    "30",
    "--eval-problems",
    "2",
    "--k",
    "2",
    "--tasks",
    "add:2",
];

#[test]
fn dp_ep_pp_pretraining_checkpoints_like_one_rank_and_resumes() {
    let dir = scratch("mesh");
    let run = dir.join("run");
    // The two expert-parallel ranks on two nodes: node-limited routing over tiny's two groups.
    let mesh = ["--dp", "2", "--ep", "2", "--ep-nodes", "2", "--pp", "2", "--schedule", "1f1b"];
    let out = pretrain(&run, &[&mesh[..], &["--steps", "2"]].concat());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains("dp 2 x ep 2 over 2 nodes x pp 2 (1f1b), 4 ranks") && stdout.contains("pass@1"),
        "{stdout}"
    );
    // tiny's topk_group 1: every token on one node.
    assert!(stdout.contains("the last step's tokens reached at most 1 of 2 nodes (topk_group 1)"), "{stdout}");
    // One checkpoint, one metrics line per step (rank 0 writes them), the evaluation.
    let state = trainer_state(&run);
    assert_eq!(state["step"], 2);
    assert_eq!(state["config"]["grad_accum"], 2);
    for file in ["checkpoint/model.safetensors", "checkpoint/optimizer.safetensors", "eval.json", "settings.json"] {
        assert!(run.join(file).exists(), "{file}");
    }
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 2, "{metrics}");

    let more = pretrain(&run, &[&mesh[..], &["--resume", "--steps", "3"]].concat());
    let stdout = String::from_utf8_lossy(&more.stdout);
    assert!(more.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&more.stderr));
    assert!(stdout.contains("resuming") && stdout.contains("at step 2 of 3"), "{stdout}");
    assert_eq!(std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().count(), 3);
}

#[test]
fn impossible_layouts_are_refused_with_the_reason() {
    let dir = scratch("refused");
    let cases: [(&[&str], &str); 6] = [
        (&["--ep", "3"], "ep (3) must divide dp (1)"),
        (&["--dp", "3", "--ep", "3"], "8 routed experts do not split evenly over 3"),
        (&["--pp", "5"], "cannot split 4 decoder layers into 5 pipeline stages"),
        (&["--pp", "2", "--schedule", "dualpipe"], "DualPipe needs at least 2*PP micro-batches"),
        (&["--dp", "2", "--ep", "2", "--ep-nodes", "3"], "ep_nodes (3) must divide ep (2)"),
        (&["--dp", "4", "--ep", "4", "--ep-nodes", "4"], "n_group is 2 for 4 nodes"),
    ];
    for (i, (flags, reason)) in cases.into_iter().enumerate() {
        let run = dir.join(format!("run{i}"));
        let out = pretrain(&run, flags);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?} should fail");
        assert!(err.contains(reason) && err.contains("--dp"), "{flags:?}: {err}");
        assert!(!run.exists(), "{flags:?}: nothing is written");
    }
}

#[test]
fn an_fp8_dispatch_over_expert_parallel_ranks_takes_one_ranks_first_step() {
    let dir = scratch("fp8-dispatch");
    let (one, two) = (dir.join("one"), dir.join("two"));
    // The same global batch: one rank accumulating 4 micro-batches, or 2 replicas of 2 (SMALL's).
    // (SMALL but its --grad-accum.)
    let run = |dir: &Path, flags: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_whale"));
        cmd.args(["pretrain", "--out", dir.to_str().unwrap()]).args(&SMALL[..2]).args(&SMALL[4..]);
        cmd.args(flags).output().unwrap()
    };
    let ok = |out: Output| assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    ok(run(&one, &["--steps", "1", "--grad-accum", "4", "--fp8-dispatch"]));
    ok(run(&two, &["--steps", "1", "--grad-accum", "2", "--dp", "2", "--ep", "2", "--fp8-dispatch"]));
    let first = |run: &Path| -> serde_json::Value {
        let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        serde_json::from_str(text.lines().next().unwrap()).unwrap()
    };
    let (a, b) = (first(&one), first(&two));
    for key in ["loss", "grad_norm"] {
        let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
        assert!((x - y).abs() <= 1e-5 * y.abs(), "{key}: one rank {x}, two {y}");
    }
    assert_eq!(trainer_state(&two)["config"]["fp8_dispatch"], true);

    // A setting of the run like --precision: the resumed run keeps it, and may not turn it off,
    // nor a plain run's on.
    ok(run(&one, &["--resume", "--steps", "2", "--grad-accum", "4"]));
    let trainer = trainer_state(&one);
    assert_eq!((trainer["step"].as_u64(), trainer["config"]["fp8_dispatch"].as_bool()), (Some(2), Some(true)));
    let plain = dir.join("plain");
    ok(run(&plain, &["--steps", "1", "--grad-accum", "4"]));
    for (run_dir, flag) in [(&one, "--fp8-dispatch=false"), (&plain, "--fp8-dispatch")] {
        let out = run(run_dir, &["--resume", "--steps", "3", "--grad-accum", "4", flag]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("--fp8-dispatch"), "{flag}: {err}");
    }
}
