//! The `whale` binary end to end: a run killed with SIGKILL while it checkpoints every step still
//! resumes; an existing run is never overwritten; config files reject unknown keys; plots render.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn whale() -> Command {
    Command::new(env!("CARGO_BIN_EXE_whale"))
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("whale-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const SMALL: [&str; 10] =
    ["--micro-batch", "2", "--seq-len", "24", "--eval-problems", "2", "--k", "2", "--tasks", "add:2"];

fn checkpoint_step(run: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(run.join("checkpoint/trainer.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?["step"].as_u64()
}

#[test]
fn sigkill_during_checkpointing_leaves_a_resumable_run() {
    let dir = tmpdir("kill");
    let run = dir.join("run");
    for attempt in 0..3u64 {
        let mut child = whale()
            .args(["pretrain", "--out", run.to_str().unwrap(), "--steps", "100000", "--checkpoint-every", "1"])
            .args(SMALL)
            .args(if attempt > 0 { vec!["--resume"] } else { vec![] })
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Wait until a few checkpoints exist, then kill at an arbitrary moment of the next one.
        let start = Instant::now();
        while checkpoint_step(&run).unwrap_or(0) < 2 + 2 * attempt && start.elapsed() < Duration::from_secs(120) {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(7 * (attempt + 1)));
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
    }
    // Whatever moment the kill hit, the run resumes (from checkpoint or checkpoint.old).
    let out = whale()
        .args(["pretrain", "--out", run.to_str().unwrap(), "--resume", "--steps", "1"])
        .args(SMALL)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("resuming") && stdout.contains("pass@1"), "{stdout}");
}

#[test]
fn an_existing_run_is_not_overwritten_and_bad_config_keys_are_named() {
    let dir = tmpdir("guard");
    let run = dir.join("run");
    let ok = whale().args(["pretrain", "--out", run.to_str().unwrap(), "--steps", "2"]).args(SMALL).output().unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let again =
        whale().args(["pretrain", "--out", run.to_str().unwrap(), "--steps", "2"]).args(SMALL).output().unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));

    let cfg = dir.join("run.toml");
    std::fs::write(&cfg, "steps = 2\nlearning_rate = 0.1\n").unwrap();
    let bad = whale()
        .args(["pretrain", "--config", cfg.to_str().unwrap(), "--out", dir.join("r2").to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("learning_rate") && err.contains("run.toml"), "{err}");

    let plot = whale().args(["plot", run.to_str().unwrap()]).output().unwrap();
    assert!(plot.status.success(), "{}", String::from_utf8_lossy(&plot.stderr));
    for chart in ["loss.svg", "lr.svg", "max_vio.svg", "expert_load.svg"] {
        let svg = std::fs::read_to_string(run.join(chart)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("polyline") || svg.contains("<rect"), "{chart}");
    }
}
