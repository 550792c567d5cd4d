//! The `whale` binary end to end: a run killed with SIGKILL while it checkpoints every step still
//! resumes; an existing run is never overwritten; config files reject unknown keys; plots render;
//! pretraining and generation on a GPU (the emulated driver in CI) match the CPU.

#[allow(dead_code)]
#[path = "../../kernels/tests/common/emulator.rs"]
mod emulator;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use whale_rl::parallel::model::tensor::testing::TempDir;

fn whale() -> Command {
    Command::new(env!("CARGO_BIN_EXE_whale"))
}

fn tmpdir(name: &str) -> TempDir {
    TempDir::new(&format!("cli-{name}"))
}

const SMALL: [&str; 10] =
    ["--micro-batch", "2", "--seq-len", "30", "--eval-problems", "2", "--k", "2", "--tasks", "add:2"];

/// `whale r1-zero` from `base` into `run`: one step of 2 prompts x 2 samples, 2 held-out
/// problems at k = 2, a validation of 2 problems at step 0, then `extra` (the prompts: `--data
/// FILE` or a `--config`).
fn r1_zero_one_step(base: &Path, run: &Path, extra: &[&str]) -> std::process::Output {
    whale()
        .args(["r1-zero", "--base", base.to_str().unwrap(), "--out", run.to_str().unwrap(), "--steps", "1"])
        .args(["--prompts-per-step", "2", "--group-size", "2", "--eval-problems", "2", "--k", "2"])
        .args(["--validation-problems", "2"])
        .args(extra)
        .output()
        .unwrap()
}

/// `whale generate` of `checkpoint` continuing "12+7=" by up to `new` tokens, with `extra` flags.
fn generate(checkpoint: &Path, new: usize, extra: &[&str]) -> std::process::Output {
    let args = ["generate", "--checkpoint", checkpoint.to_str().unwrap(), "--prompt", "12+7=", "--max-new-tokens"];
    whale().args(args).arg(new.to_string()).args(extra).output().unwrap()
}

/// A copy of the files of checkpoint folder `from` in a new folder `to`.
fn copy_checkpoint(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
    }
}

/// `whale pretrain --out run --steps STEPS --warmup 1` with SMALL's settings, then `extra`.
fn pretrain_small(run: &Path, steps: &str, extra: &[&str]) -> std::process::Output {
    whale()
        .args(["pretrain", "--out", run.to_str().unwrap(), "--steps", steps, "--warmup", "1"])
        .args(SMALL)
        .args(extra)
        .output()
        .unwrap()
}

/// A JSON file (a run's settings.json, a checkpoint's trainer.json), parsed.
fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The lines of a run's metrics.jsonl.
fn metrics(run: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// [`metrics`] without what depends on the machine's speed (`tokens_per_s`, `*_time`): what a
/// run that must take the same steps as another logs the same.
fn metrics_but_speed(run: &Path) -> Vec<serde_json::Value> {
    let mut rows = metrics(run);
    for row in &mut rows {
        row.as_object_mut().unwrap().retain(|k, _| k != "tokens_per_s" && !k.ends_with("_time"));
    }
    rows
}

fn checkpoint_step(run: &Path) -> Option<u64> {
    saved_step(&run.join("checkpoint"))
}

/// The step of the checkpoint folder `dir`, if it holds a readable one.
fn saved_step(dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join("trainer.json")).ok()?;
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
    // Whatever moment the kill hit, the run resumes (from checkpoint or checkpoint.old), and a
    // validation line from after its checkpoint goes.
    std::fs::write(run.join("eval_history.jsonl"), "{\"step\": 999999, \"pass@1\": 0.0}\n").unwrap();
    // One step past the checkpoint the kill left (fewer than it holds are refused).
    let saved = ["checkpoint", "checkpoint.tmp", "checkpoint.old"].map(|d| saved_step(&run.join(d)));
    let steps = (saved.iter().flatten().max().copied().unwrap_or(0) + 1).to_string();
    let out = whale()
        .args(["pretrain", "--out", run.to_str().unwrap(), "--resume", "--steps", &steps])
        .args(SMALL)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("resuming") && stdout.contains("pass@1"), "{stdout}");
    assert!(!std::fs::read_to_string(run.join("eval_history.jsonl")).unwrap().contains("999999"));
    // The run's own settings: a flag that would change its corpus or evaluation is refused.
    let out = whale()
        .args(["pretrain", "--out", run.to_str().unwrap(), "--resume", "--steps", &steps, "--letters", "0.5"])
        .args(SMALL)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("--letters 0.5 (the run's: 0.25)"), "{stderr}");
}

#[test]
fn an_extended_run_validates_its_checkpoints_step_and_says_the_schedule_moved() {
    let dir = tmpdir("extend");
    let run = dir.join("run");
    let pretrain = |steps: &str, extra: &[&str]| {
        pretrain_small(&run, steps, &[&["--eval-every", "2", "--validation-problems", "3"], extra].concat())
    };
    let out = pretrain("2", &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The last step has no validation line (the final evaluation is that); extended, step 2 is
    // no longer the last and is validated when the run resumes there, as it would have been
    // had the run gone on (or had a crash fallen between its checkpoint and its validation).
    let history = run.join("eval_history.jsonl");
    assert!(std::fs::read_to_string(&history).unwrap_or_default().is_empty());
    let out = pretrain("4", &["--resume"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("--steps 4 (was 2) stretches the learning-rate schedule"), "{stdout}");
    let steps: Vec<u64> = std::fs::read_to_string(&history)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [2]);
    assert_eq!(read_json(&run.join("settings.json"))["validation_problems"], 3);
    // Fewer steps than the checkpoint took is refused, and the run's settings keep theirs.
    let out = pretrain("3", &["--resume"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--steps 3") && err.contains("already at step 4"), "{err}");
    assert_eq!(read_json(&run.join("settings.json"))["steps"], 4);
}

#[test]
fn recomputing_sublayers_trains_the_same_bits_and_a_resumed_run_may_change_it() {
    let dir = tmpdir("recompute");
    let pretrain = |run: &str, steps: &str, extra: &[&str]| {
        let out = pretrain_small(&dir.join(run), steps, extra);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    pretrain("plain", "4", &[]);
    pretrain("recomputed", "2", &["--recompute", "attention,mlp"]);
    pretrain("recomputed", "4", &["--resume", "--recompute", "mlp"]);
    // Every step's numbers but its speed.
    assert_eq!(metrics_but_speed(&dir.join("recomputed")), metrics_but_speed(&dir.join("plain")));
    assert_eq!(metrics(&dir.join("plain")).len(), 4);
    assert_eq!(
        read_json(&dir.join("recomputed/settings.json"))["recompute"],
        "mlp",
        "the resumed run's setting is kept"
    );
    let trainer = read_json(&dir.join("recomputed/checkpoint/trainer.json"));
    assert_eq!(trainer["config"]["recompute"], "mlp", "and the trainer's");

    let out = whale()
        .args(["pretrain", "--out", dir.join("bad").to_str().unwrap(), "--recompute", "norms"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--recompute") && err.contains("attention and/or mlp"), "{err}");
    assert!(!dir.join("bad").exists());
}

#[test]
fn the_fp8_swiglu_cache_trains_in_fp8_and_is_refused_elsewhere() {
    let dir = tmpdir("swiglu-cache");
    let (kept, cached) = (dir.join("kept"), dir.join("cached"));
    for (run, extra) in [(&kept, &[][..]), (&cached, &["--fp8-swiglu-cache"][..])] {
        let out = pretrain_small(run, "2", &[&["--precision", "fp8"], extra].concat());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    // The same forward (the first step's loss); the gradients are taken at the cached values.
    let (a, b) = (metrics(&kept), metrics(&cached));
    assert_eq!(a[0]["loss"], b[0]["loss"]);
    assert_ne!(a[0]["grad_norm"], b[0]["grad_norm"]);
    assert_eq!(read_json(&cached.join("settings.json"))["fp8_swiglu_cache"], true);
    assert_eq!(read_json(&cached.join("checkpoint/trainer.json"))["config"]["fp8_swiglu_cache"], true);
    // A setting of the run: a resume may not drop it.
    let out = pretrain_small(&cached, "3", &["--precision", "fp8", "--resume", "--fp8-swiglu-cache=false"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--fp8-swiglu-cache false (the run's: true)"), "{err}");
    // Without FP8 experts there is nothing to cache: refused before anything is written.
    let bad = dir.join("bad");
    let out = pretrain_small(&bad, "1", &["--fp8-swiglu-cache"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("fp8_swiglu_cache") && err.contains("precision fp8"), "{err}");
    assert!(!bad.exists());
}

#[test]
fn a_batch_ramp_grows_the_steps_and_bad_ramps_are_named() {
    let dir = tmpdir("batch-ramp");
    let run = dir.join("run");
    // 2 sequences a micro-batch, up to 2 a step: the second micro-batch from 4 sequences on.
    let out = pretrain_small(&run, "3", &["--grad-accum", "2", "--batch-ramp", "2:4"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("the batch grows from 2 sequences a step, 2 at a time, over the first 4"), "{stdout}");
    let tokens: Vec<u64> = metrics(&run).iter().map(|m| m["tokens"].as_u64().unwrap()).collect();
    // Real tokens (documents differ in length): one micro-batch's worth, again, then two.
    let ratio = |a: u64, b: u64| a as f64 / b as f64;
    assert!(ratio(tokens[1], tokens[0]) < 1.5 && ratio(tokens[2], tokens[1]) > 1.5, "consumed 0, 2, 4: {tokens:?}");
    let trainer = read_json(&run.join("checkpoint/trainer.json"));
    assert_eq!(trainer["config"]["batch_ramp"], serde_json::json!({ "start": 1, "increment": 1, "sequences": 4 }));
    assert_eq!(trainer["consumed_sequences"], 8, "2 + 2 + 4 sequences");

    let cases: [(&[&str], &str); 5] = [
        (&["--grad-accum", "2", "--batch-ramp", "3:4"], "multiple of --dp x --micro-batch (2)"),
        (&["--grad-accum", "2", "--batch-ramp", "4:4"], "below the whole batch (4 sequences"),
        (&["--grad-accum", "2", "--batch-ramp", "2"], "expected START[:INCREMENT]:SEQUENCES"),
        (&["--grad-accum", "4", "--batch-ramp", "2:4:8"], "INCREMENT must be a multiple"),
        // DualPipe on 2 stages: an even count of at least 4 micro-batches, not the ramp's 1.
        (&["--pp", "2", "--schedule", "dualpipe", "--grad-accum", "4", "--batch-ramp", "2:8"], "--batch-ramp 2:8"),
    ];
    for (flags, words) in cases {
        let bad = dir.join("bad");
        let out = whale().args(["pretrain", "--out", bad.to_str().unwrap()]).args(SMALL).args(flags).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(words), "{flags:?}: {err}");
        assert!(!bad.exists(), "{flags:?}");
    }
}

#[test]
fn an_ema_of_the_weights_is_evaluated_saved_and_resumed() {
    let dir = tmpdir("ema");
    let run = dir.join("run");
    let pretrain = |steps: &str, extra: &[&str]| pretrain_small(&run, steps, &[&["--ema", "0.9"], extra].concat());
    let out = pretrain("2", &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("| base, EMA of the weights (decay 0.9) |"), "{stdout}");
    assert!(run.join("checkpoint/ema.safetensors").exists());
    let out = pretrain("3", &["--resume"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The average's folder is a model `whale eval` reads, and its evaluation is kept beside it;
    // its weights are not the model's.
    assert!(run.join("ema/eval.json").exists());
    let read = |p: &str| std::fs::read(run.join(p)).unwrap();
    assert!(read("ema/model.safetensors") != read("checkpoint/model.safetensors"));
    let out = whale()
        .args(["eval", "--checkpoint", run.join("ema").to_str().unwrap(), "--tasks", "add:2", "--k", "2"])
        .args(["--problems", "2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Two data-parallel ranks: rank 0 keeps the average (the ranks' weights are the same).
    let mesh = dir.join("mesh");
    let out = pretrain_small(&mesh, "2", &["--ema", "0.9", "--dp", "2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(mesh.join("checkpoint/ema.safetensors").exists() && mesh.join("ema/eval.json").exists());

    // Refused before anything is written: a decay out of range.
    let bad = dir.join("bad");
    let out = whale().args(["pretrain", "--out", bad.to_str().unwrap(), "--ema", "1.5"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("ema_decay"), "{err}");
    assert!(!bad.exists());
}

#[test]
fn a_device_that_cannot_train_is_a_clear_error_before_anything_is_written() {
    let dir = tmpdir("device");
    let cases: [(&[&str], &str); 3] = [
        (&["--device", "gpu"], "expected cpu, cuda or cuda:N"),
        // No machine has this GPU (and without a CUDA driver, none at all).
        (&["--device", "cuda:4096"], "--device cuda:4096"),
        (&["--device", "cuda", "--dp", "2"], "one rank"),
    ];
    for (i, (flags, words)) in cases.iter().enumerate() {
        let run = dir.join(format!("run{i}"));
        let out =
            whale().args(["pretrain", "--out", run.to_str().unwrap(), "--steps", "1"]).args(*flags).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(words), "{flags:?}: {err}");
        assert!(!run.exists(), "{flags:?}: nothing is written");
    }
    // The post-training and evaluation commands take the same flag, and refuse it before reading
    // or writing anything.
    let base = dir.join("no-such-checkpoint");
    for (command, input) in [("r1-zero", "--base"), ("r1", "--from"), ("distill", "--from"), ("eval", "--checkpoint")] {
        let run = dir.join(command);
        let mut cmd = whale();
        cmd.args([command, input, base.to_str().unwrap(), "--device", "cuda:4096"]);
        if command != "eval" {
            cmd.args(["--out", run.to_str().unwrap()]);
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("--device cuda:4096"), "{command}: {err}");
        assert!(!run.exists(), "{command}: nothing is written");
    }
    // So is a --precision they do not compute in.
    for (command, input) in [("r1-zero", "--base"), ("r1", "--from"), ("distill", "--from")] {
        for (precision, words) in [("fp8", "pretraining's recipe"), ("fp16", "expected fp32 or bf16")] {
            let run = dir.join(command);
            let out = whale()
                .args([command, input, base.to_str().unwrap(), "--precision", precision])
                .args(["--out", run.to_str().unwrap()])
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success() && err.contains(words), "{command} --precision {precision}: {err}");
            assert!(!run.exists(), "{command}: nothing is written");
        }
    }
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
    // A run stopped before its first checkpoint (its logs and settings written, no checkpoint):
    // --resume starts it again, its logs rewritten from step 0.
    let early = dir.join("early");
    let ok = whale().args(["pretrain", "--out", early.to_str().unwrap(), "--steps", "2"]).args(SMALL).output().unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    std::fs::remove_dir_all(early.join("checkpoint")).unwrap();
    let again = whale().args(["pretrain", "--out", early.to_str().unwrap(), "--resume"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(again.status.success() && stdout.contains("starting it again"), "{stdout}{again:?}");
    assert_eq!(metrics(&early).iter().map(|m| m["step"].as_u64().unwrap()).collect::<Vec<_>>(), [0, 1]);
    assert_eq!(checkpoint_step(&early), Some(2));

    let cfg = dir.join("run.toml");
    std::fs::write(&cfg, "steps = 2\nlearning_rate = 0.1\n").unwrap();
    let bad = whale()
        .args(["pretrain", "--config", cfg.to_str().unwrap(), "--out", dir.join("r2").to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("learning_rate") && err.contains("run.toml"), "{err}");

    // The main job's --out is its run folder; one in use is refused before any work, and one
    // whose stages wrote nothing has nothing to resume.
    let all = dir.join("all");
    std::fs::create_dir_all(all.join("r1")).unwrap();
    let out = whale().args(["all", "--out", all.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("pass --resume"));
    assert!(!all.join("pretrain").exists());
    let out = whale().args(["all", "--resume", "--out", all.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("holds no main job to continue"));

    let plot = whale().args(["plot", run.to_str().unwrap()]).output().unwrap();
    assert!(plot.status.success(), "{}", String::from_utf8_lossy(&plot.stderr));
    for chart in ["loss.svg", "lr.svg", "max_vio.svg", "expert_load.svg"] {
        let svg = std::fs::read_to_string(run.join(chart)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("polyline") || svg.contains("<rect"), "{chart}");
    }
}

#[test]
fn shares_out_of_range_are_named_before_anything_is_written() {
    let dir = tmpdir("shares");
    for (key, value) in [("letters", "1.5"), ("imperfect", "-0.1"), ("mixing", "2")] {
        let run = dir.join(key);
        let out =
            whale().args(["pretrain", "--out", run.to_str().unwrap(), &format!("--{key}={value}")]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(&format!("`{key}` = {value}")), "--{key}: {err}");
        assert!(!run.exists(), "--{key}: nothing is written");
    }
    // So are the training schedules.
    for (flag, value, words) in [
        ("--lr-schedule", "linear", "unknown learning-rate schedule `linear`"),
        ("--mtp-weight-from", "650", "mtp_weight_from `650`: expected STEP:WEIGHT"),
        ("--mtp-weight-from", "650:-1", "`mtp_weight_from`"),
        // 3-4 digit additions do not fit the default rows: refused, not cut before their end.
        ("--tasks", "add", "set seq_len to at least"),
        // An evaluation of nothing would report 0.000; rows past the model's positions would
        // train angles no saved config admits.
        ("--eval-problems", "0", "--eval-problems 0"),
        ("--k", "0", "--k 0"),
        ("--seq-len", "300", "max_position_embeddings"),
    ] {
        let run = dir.join("schedule");
        let out = whale().args(["pretrain", "--out", run.to_str().unwrap(), flag, value]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(words), "{flag} {value}: {err}");
        assert!(!run.exists(), "{flag} {value}: nothing is written");
    }
    // r1-zero refuses its settings before it reads the base.
    let missing = dir.join("missing");
    let out = whale().args(["r1-zero", "--base", missing.to_str().unwrap(), "--letters", "2"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("`letters`"), "{err}");
    // Commands reading a config file: `whale <command> <input flag> missing --out <run> --config
    // <file holding config>` must fail naming `named` and leave <run> unwritten.
    let refused = |command: &str, input: &str, config: &str, named: &str| {
        let (run, cfg) = (dir.join(command), dir.join(format!("{command}.toml")));
        std::fs::write(&cfg, config).unwrap();
        let out = whale()
            .args([command, input, missing.to_str().unwrap(), "--out", run.to_str().unwrap()])
            .args(["--config", cfg.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(named), "{command}: {err}");
        assert!(!run.exists(), "{command}: nothing is written");
    };
    // PPO refuses a GRPO setting it has no use for; r1 and distill refuse shares the same way.
    refused("r1-zero", "--base", "algo = \"ppo\"\n[grpo]\nnum_iterations = 2\n", "`num_iterations` = 2");
    refused("r1-zero", "--base", "algo = \"ppo\"\n[grpo]\nbeta = 0.04\n", "`beta` is GRPO's");
    // --base sets the base: a config naming another is refused, not silently dropped.
    refused("r1-zero", "--base", "base = \"elsewhere\"\n", "differs from --base");
    for command in ["r1", "distill"] {
        refused(command, "--from", "letters = 2.0\n", "`letters` = 2");
    }
    // Their RL stages' settings too, before the stages ahead of them run.
    refused("r1", "--from", "[all_rl]\nminibatches = 64\n", "[all_rl]");
    refused("r1", "--from", "[rejection]\ntemperature = 0.0\n", "[rejection]");
    refused("r1", "--from", "[reward_model]\nsteps = 0\n", "[reward_model]");
    refused("distill", "--from", "[rl]\ngroup_size = 0\n", "[rl]");
    refused("r1", "--from", "k = 0\n", "`k` 0");
    refused("distill", "--from", "eval_problems = 0\n", "`eval_problems` 0");
    let out = whale().args(["r1-zero", "--base", missing.to_str().unwrap(), "--eval-problems", "0"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--eval-problems) 0"), "{err}");
    // So is a validation of no problems while validation is on (r1-zero's is, every 20 steps).
    let out =
        whale().args(["r1-zero", "--base", missing.to_str().unwrap(), "--validation-problems", "0"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--validation-problems) 0 with eval_every"), "{err}");
    refused("r1", "--from", "validation_problems = 0\n", "`validation_problems` 0");
}

#[test]
fn r1_zero_runs_grpo_and_ppo_on_a_base_checkpoint_and_reports_before_and_after() {
    let dir = tmpdir("r1zero");
    let base = dir.join("base");
    let out = whale().args(["pretrain", "--out", base.to_str().unwrap(), "--steps", "2"]).args(SMALL).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ckpt = base.join("checkpoint");
    for algo in ["grpo", "ppo"] {
        let run = dir.join(algo);
        let args = [
            "r1-zero",
            "--base",
            ckpt.to_str().unwrap(),
            "--out",
            run.to_str().unwrap(),
            "--algo",
            algo,
            "--prompts-per-step",
            "2",
            "--group-size",
            "2",
            "--eval-problems",
            "2",
            "--k",
            "2",
            "--tasks",
            "add:1",
            "--validation-problems",
            "2",
        ];
        let out = whale().args(args).args(["--steps", "2"]).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{algo}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("| base |") && stdout.contains("| R1-Zero") && stdout.contains("pass@1"), "{stdout}");
        let lines = metrics(&run);
        assert_eq!(lines.len(), 2, "one metrics line per step");
        let first = &lines[0];
        assert!(first["reward"].is_number() && first["completions/mean_length"].is_number(), "{first}");
        assert!(run.join("checkpoint/model.safetensors").exists() && run.join("eval_before.json").exists());
        assert!(std::fs::read_to_string(run.join("completions.jsonl")).unwrap().contains("\"completion\""));
        // The finished run is never overwritten, and --resume extends it.
        let again = whale().args(args).args(["--steps", "2"]).output().unwrap();
        assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("already holds a run"));
        let more = whale().args(args).args(["--resume", "--steps", "3"]).output().unwrap();
        let stdout = String::from_utf8_lossy(&more.stdout);
        let stderr = String::from_utf8_lossy(&more.stderr);
        assert!(
            more.status.success() && stdout.contains("resuming") && stdout.contains("step 2 of 3"),
            "{stdout}{stderr}"
        );
        assert_eq!(metrics(&run).len(), 3);
        // Resuming below the step reached, or on another prompt pool, is refused.
        let fewer = whale().args(args).args(["--resume", "--steps", "1"]).output().unwrap();
        assert!(String::from_utf8_lossy(&fewer.stderr).contains("already at step 3"), "{fewer:?}");
        // A validation written after the checkpoint (the run died before its next one) is
        // dropped on resume, so no step appears twice.
        let history = run.join("eval_history.jsonl");
        let mut lines = std::fs::read_to_string(&history).unwrap_or_default();
        lines.push_str("{\"step\": 4, \"pass@1\": 0.0}\n");
        std::fs::write(&history, lines).unwrap();
        let again = whale().args(args).args(["--resume", "--steps", "3"]).output().unwrap();
        assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
        let kept = std::fs::read_to_string(&history).unwrap();
        assert!(!kept.contains("\"step\":4") && !kept.contains("\"step\": 4"), "{kept}");
    }
    // A policy (and PPO's critic) recomputing its sublayers takes the same steps (the first two
    // of each run above), but for their times.
    let first_two = |run: &Path| metrics_but_speed(run).into_iter().take(2).collect::<Vec<_>>();
    // The runs above (2 steps of them) again into `name`, with `flags`.
    let again_with = |algo: &str, name: &str, flags: &[&str]| {
        let run = dir.join(format!("{algo}-{name}"));
        let out = whale()
            .args(["r1-zero", "--base", ckpt.to_str().unwrap(), "--out", run.to_str().unwrap(), "--steps", "2"])
            .args(["--prompts-per-step", "2", "--group-size", "2", "--eval-problems", "2", "--k", "2"])
            .args(["--tasks", "add:1", "--algo", algo, "--validation-problems", "2"])
            .args(flags)
            .output()
            .unwrap();
        assert!(out.status.success(), "{algo} {flags:?}: {}", String::from_utf8_lossy(&out.stderr));
        first_two(&run)
    };
    for algo in ["grpo", "ppo"] {
        assert_eq!(
            again_with(algo, "recompute", &["--recompute", "attention,mlp"]),
            first_two(&dir.join(algo)),
            "{algo}"
        );
        // In bf16 the same run computes otherwise, and still trains (finite logs).
        let logged = again_with(algo, "bf16", &["--precision", "bf16"]);
        assert_ne!(logged, first_two(&dir.join(algo)), "{algo}: bf16 changes the numbers");
        for m in &logged {
            assert!(m["entropy"].as_f64().is_some_and(f64::is_finite), "{algo} bf16: {m}");
        }
    }

    // A user's JSONL prompts instead of the generators.
    let data = dir.join("prompts.jsonl");
    std::fs::write(&data, "{\"prompt\": \"2+2=\", \"answer\": \"4\"}\n{\"prompt\": \"3+4=\", \"answer\": \"7\"}\n")
        .unwrap();
    let run = dir.join("jsonl");
    let out = r1_zero_one_step(&ckpt, &run, &["--data", data.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let logged = std::fs::read_to_string(run.join("completions.jsonl")).unwrap();
    assert!(logged.contains("\"2+2=\"") || logged.contains("\"3+4=\""), "{logged}");
    assert!(!logged.contains("\"input\""), "plain prompts are given as they are: {logged}");
    let resume = |extra: &[&str]| {
        whale()
            .args(["r1-zero", "--base", ckpt.to_str().unwrap(), "--out", run.to_str().unwrap(), "--resume"])
            .args(["--steps", "2"])
            .args(extra)
            .output()
            .unwrap()
    };
    let other = dir.join("other.jsonl");
    std::fs::write(&other, "{\"prompt\": \"5+4=\", \"answer\": \"9\"}\n").unwrap();
    let refused = resume(&["--data", other.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("trains on --data"), "{refused:?}");
    // Any other setting is the run's: a flag that changes one is refused, naming it; one that
    // repeats the run's value is not.
    let refused = resume(&["--lr", "0.5", "--group-size", "2"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("--lr 0.5") && !stderr.contains("group-size"), "{stderr}");
    let refused = resume(&["--config", data.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("drop --config"), "{refused:?}");
    // Without --data the run keeps its own pool.
    let out = resume(&[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let settings = read_json(&run.join("settings.json"));
    assert!(settings["data"].as_str().unwrap().ends_with("prompts.jsonl"), "{settings}");
    // Stopped before its first checkpoint: --resume starts it again.
    std::fs::remove_dir_all(run.join("checkpoint")).unwrap();
    let out = resume(&[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("starting it again"), "{stdout}{out:?}");
    assert_eq!(metrics(&run).iter().map(|m| m["step"].as_u64().unwrap()).collect::<Vec<_>>(), [0, 1]);
    // A prompt the base's tokenizer cannot read is named before anything trains.
    let upper = dir.join("upper.jsonl");
    let lines: String =
        (0..8).map(|i| format!("{{\"prompt\": \"What is {i}+2?\", \"answer\": \"{}\"}}\n", i + 2)).collect();
    std::fs::write(&upper, lines).unwrap();
    let out = r1_zero_one_step(&ckpt, &dir.join("upper"), &["--data", upper.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("--data") && stderr.contains("prompt \"What is"), "{stderr}");
    assert!(!dir.join("upper").join("metrics.jsonl").exists());
    // So is one too long for the model's positions (256 in this preset).
    let long = dir.join("long.jsonl");
    let lines: String =
        (0..8).map(|i| format!("{{\"prompt\": \"{}{i}+2=\", \"answer\": \"{}\"}}\n", "0".repeat(300), i + 2)).collect();
    std::fs::write(&long, lines).unwrap();
    let out = r1_zero_one_step(&ckpt, &dir.join("long"), &["--data", long.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("no room for a completion"), "{stderr}");
    assert!(!dir.join("long").exists(), "refused before anything is written");
    // And one of the held-out prompts alone (the pool fits): the evaluation's set is checked
    // before anything is written too.
    use whale_rl::tasks::Split;
    let lines: String = (0..80)
        .map(|i| {
            let long = format!("{}{i}+2=", "0".repeat(300));
            let prompt = if Split::of_line(&long) == Split::HeldOut { long } else { format!("{i}+2=") };
            format!("{{\"prompt\": \"{prompt}\", \"answer\": \"{}\"}}\n", i + 2)
        })
        .collect();
    assert!(lines.contains(&"0".repeat(300)), "some long prompt is held out");
    std::fs::write(&long, lines).unwrap();
    let out = r1_zero_one_step(&ckpt, &dir.join("long-held-out"), &["--data", long.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("no room for a completion"), "{stderr}");
    assert!(!dir.join("long-held-out").exists(), "refused before anything is written");
    // R1-Zero's template on the embedded tasks: its capitals are not in the character
    // tokenizer's vocabulary, which the held-out set's check names before anything is written.
    let out = r1_zero_one_step(&ckpt, &dir.join("templated"), &["--template", "r1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("--template r1") && stderr.contains("'A'"), "{stderr}");
    assert!(!dir.join("templated").exists(), "refused before anything is written");
    // A config file's `data` is the pool when no --data overrides it.
    let (cfg, from_file) = (dir.join("data.toml"), dir.join("from-file"));
    std::fs::write(&cfg, format!("data = {data:?}\n")).unwrap();
    let out = r1_zero_one_step(&ckpt, &from_file, &["--config", cfg.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let logged = std::fs::read_to_string(from_file.join("completions.jsonl")).unwrap();
    assert!(logged.contains("\"2+2=\"") || logged.contains("\"3+4=\""), "{logged}");
    let bad = whale().args(["r1-zero", "--base", dir.join("missing").to_str().unwrap()]).output().unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("missing"));
}

#[test]
fn an_hf_checkpoint_trains_with_its_own_tokenizer_and_its_runs_keep_it() {
    use whale_rl::parallel::model::checkpoint::SaveDType;
    use whale_rl::parallel::model::{DenseConfig, DenseModel};
    let dir = tmpdir("hf-tokenizer");
    // A one-layer Qwen2-style model over the fixture's byte-level BPE vocabulary (353 ids),
    // saved as HF does, with its tokenizer and generation config next to it.
    let base = dir.join("base");
    let cfg = DenseConfig {
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        head_dim: 16,
        ..DenseConfig::student(353)
    };
    DenseModel::new(cfg.clone(), 3).unwrap().save_pretrained(&base, SaveDType::F32).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures/tokenizer/tokenizer.json");
    std::fs::copy(&fixture, base.join("tokenizer.json")).unwrap();
    std::fs::write(base.join("generation_config.json"), r#"{"eos_token_id": [0, 5]}"#).unwrap();
    // Prompts the character tokenizer cannot spell (capitals): only the model's own reads them.
    let data = dir.join("prompts.jsonl");
    let lines: String =
        (1..=12).map(|i| format!("{{\"prompt\": \"Twelve plus {i}=\", \"answer\": \"{}\"}}\n", 12 + i)).collect();
    std::fs::write(&data, lines).unwrap();
    let run = dir.join("run");
    let out = r1_zero_one_step(&base, &run, &["--data", data.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The numbers it reports are on the file's held-out prompts, those training left out.
    let held = (1..=12)
        .filter(|i| whale_rl::tasks::Split::of_line(&format!("Twelve plus {i}=")) == whale_rl::tasks::Split::HeldOut);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let held = held.count();
    match held {
        0 => assert!(stderr.contains("has no held-out prompts"), "{stderr}"),
        n => assert!(stdout.contains(&format!("held-out: {} prompts of", n.min(2))), "{stdout}"),
    }
    // Its validations too: the held-out prompts after the final evaluation's 2, up to
    // --validation-problems 2 (none left: no validation, not the tasks').
    match held.saturating_sub(2).min(2) {
        _ if held == 0 => {}
        0 => assert!(stderr.contains("take every held-out prompt of"), "{stderr}"),
        v => assert!(stdout.contains(&format!("validation: {v} held-out prompts of")), "{stdout}"),
    }
    // In R1-Zero's template, which the run records and its evaluation is then asked in. The
    // template's ~270 tokens leave this model's 256 positions no room: refused before training,
    // and run on the same model with 1024.
    let templated = dir.join("templated");
    let r1_template = ["--data", data.to_str().unwrap(), "--template", "r1"];
    let out = r1_zero_one_step(&base, &templated, &r1_template);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("no room for a completion"), "{stderr}");
    let long = dir.join("base-1024");
    let long_cfg = DenseConfig { max_position_embeddings: 1024, ..cfg.clone() };
    DenseModel::new(long_cfg, 3).unwrap().save_pretrained(&long, SaveDType::F32).unwrap();
    for file in ["tokenizer.json", "generation_config.json"] {
        std::fs::copy(base.join(file), long.join(file)).unwrap();
    }
    let out = r1_zero_one_step(&long, &templated, &r1_template);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let settings = std::fs::read_to_string(templated.join("settings.json")).unwrap();
    assert!(settings.contains("\"template\": \"r1\""), "{settings}");
    // Its completions log each problem's prompt and the templated text the policy was given.
    let logged = std::fs::read_to_string(templated.join("completions.jsonl")).unwrap();
    let line: serde_json::Value = serde_json::from_str(logged.lines().next().unwrap()).unwrap();
    let (prompt, input) = (line["prompt"].as_str().unwrap(), line["input"].as_str().unwrap());
    assert!(prompt.starts_with("Twelve plus") && input.ends_with(&format!("User: {prompt}. Assistant:")), "{line}");
    let shown = whale()
        .args(["eval", "--checkpoint", templated.join("checkpoint").to_str().unwrap(), "--problems", "1", "--k", "1"])
        .args(["--data", data.to_str().unwrap(), "--all-lines", "--max-new-tokens", "4", "--show", "1"])
        .output()
        .unwrap();
    // (The run's settings.json says so: no --template needed.)
    assert!(String::from_utf8_lossy(&shown.stderr).contains("asking in the `r1` prompt template its run trained with"));
    let stdout = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.status.success() && stdout.contains("answer here </answer>. User: Twelve plus 1=. Assistant:"),
        "{stdout}"
    );
    for (flags, words) in [
        (&["--template", "qwen"][..], "[possible values: plain, r1]"),
        (&["--template", "r1", "--chat"][..], "cannot be used with"),
    ] {
        let refused = whale()
            .args(["eval", "--checkpoint", templated.join("checkpoint").to_str().unwrap()])
            .args(flags)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success() && stderr.contains(words), "{flags:?}: {stderr}");
    }
    // The checkpoint carries the tokenizer it trained with, so it evaluates and generates alone.
    let ckpt = run.join("checkpoint");
    assert_eq!(std::fs::read(ckpt.join("tokenizer.json")).unwrap(), std::fs::read(&fixture).unwrap());
    assert_eq!(std::fs::read_to_string(ckpt.join("generation_config.json")).unwrap(), r#"{"eos_token_id": [0, 5]}"#);
    // Sampled as the R1 paper's evaluations sample.
    let eval = whale()
        .args(["eval", "--checkpoint", ckpt.to_str().unwrap(), "--problems", "2", "--k", "2"])
        .args(["--data", data.to_str().unwrap(), "--all-lines", "--temperature", "0.6", "--top-p", "0.95"])
        .output()
        .unwrap();
    assert!(eval.status.success(), "{}", String::from_utf8_lossy(&eval.stderr));
    assert!(String::from_utf8_lossy(&eval.stdout).contains("(2 samples at T = 0.6, top-p 0.95)"));
    // pass@k is over samples: a temperature of 0 (greedy) is refused, and so are filters that
    // keep nothing or are not a probability.
    for (flags, words) in [
        (["--temperature", "0"], "--temperature 0"),
        (["--top-k", "0"], "--top-k 0: keeps no token"),
        (["--top-p", "1.5"], "--top-p 1.5: must be in (0, 1]"),
    ] {
        let refused = whale().args(["eval", "--checkpoint", ckpt.to_str().unwrap()]).args(flags).output().unwrap();
        assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains(words), "{flags:?}");
    }
    // As a chat model is asked: each prompt in the checkpoint's template with R1's \boxed{}
    // instruction, shown as the model read it; a checkpoint without a template is refused. The
    // problems are in MATH's own file format (`problem`, and the answer boxed in `solution`).
    let math = dir.join("math.jsonl");
    let lines: String = (1..=3)
        .map(|i| format!("{{\"problem\": \"Twelve plus {i}=\", \"solution\": \"So \\\\boxed{{{}}}.\"}}\n", 12 + i))
        .collect();
    std::fs::write(&math, lines).unwrap();
    let chat = |dir: &Path| {
        whale()
            .args(["eval", "--checkpoint", dir.to_str().unwrap(), "--problems", "2", "--k", "1", "--show", "1"])
            .args(["--data", math.to_str().unwrap(), "--all-lines", "--max-new-tokens", "4"])
            .args(["--chat", "--system", "Be brief.", "--boxed"])
            .output()
            .unwrap()
    };
    let no_template = chat(&ckpt);
    assert!(
        !no_template.status.success() && String::from_utf8_lossy(&no_template.stderr).contains("has no chat template")
    );
    let chat_ckpt = dir.join("chat");
    copy_checkpoint(&ckpt, &chat_ckpt);
    let template = "{% for m in messages %}[{{ m.role }}: {{ m.content }}]{% endfor %}\
                    {% if add_generation_prompt %}<think>\n{% endif %}";
    std::fs::write(chat_ckpt.join("chat_template.jinja"), template).unwrap();
    let asked = chat(&chat_ckpt);
    let stdout = String::from_utf8_lossy(&asked.stdout);
    assert!(asked.status.success(), "{}", String::from_utf8_lossy(&asked.stderr));
    let prompt = "[system: Be brief.][user: Twelve plus 1=\nPlease reason step by step, and put your final answer \
                  within \\boxed{}.]<think>\n";
    assert!(stdout.contains(prompt) && stdout.contains("chat template, answers in \\boxed{})"), "{stdout}");
    // A template that leaves no room for a completion is refused before any generation.
    std::fs::write(chat_ckpt.join("chat_template.jinja"), format!("{}{template}", "x".repeat(300))).unwrap();
    let long = chat(&chat_ckpt);
    let stderr = String::from_utf8_lossy(&long.stderr);
    assert!(
        !long.status.success() && stderr.contains("in the chat template: the prompt \"Twelve plus 1=\" is"),
        "{stderr}"
    );
    let generate = whale()
        .args(["generate", "--checkpoint", ckpt.to_str().unwrap(), "--prompt", "Twelve plus 7="])
        .args(["--greedy", "--max-new-tokens", "4"])
        .output()
        .unwrap();
    assert!(generate.status.success(), "{}", String::from_utf8_lossy(&generate.stderr));
    // The run resumes with its base's tokenizer; a checkpoint trained with another (here: one
    // without tokenizer.json, as runs wrote before they kept it) is refused.
    let resume = |steps: &str| {
        whale()
            .args(["r1-zero", "--base", base.to_str().unwrap(), "--out", run.to_str().unwrap(), "--resume"])
            .args(["--steps", steps])
            .output()
            .unwrap()
    };
    let out = resume("2");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_file(ckpt.join("tokenizer.json")).unwrap();
    let out = resume("3");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("another tokenizer"), "{stderr}");
    std::fs::copy(&fixture, ckpt.join("tokenizer.json")).unwrap();
    // The R1 stages pass text between --from's model and --base's: their tokenizers must agree.
    let chars = Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures/qwen2_tied");
    let out = whale()
        .args(["r1", "--stage", "rejection-sft", "--from", ckpt.to_str().unwrap(), "--base", chars.to_str().unwrap()])
        .args(["--out", dir.join("r1").to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("different tokenizers"), "{stderr}");
    assert!(!dir.join("r1").exists(), "refused before anything is written");
    // An R1 stage trains with it too, and a resumed run does not read back a stage checkpoint
    // trained with another.
    let cfg_file = dir.join("r1.toml");
    std::fs::write(&cfg_file, TINY_R1).unwrap();
    let r1 = |extra: &[&str]| {
        whale()
            .args(["r1", "--stage", "cold-start", "--from", base.to_str().unwrap()])
            .args(["--out", dir.join("r1-hf").to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = r1(&["--config", cfg_file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stage = dir.join("r1-hf/1-cold-start/checkpoint");
    assert_eq!(std::fs::read(stage.join("tokenizer.json")).unwrap(), std::fs::read(&fixture).unwrap());
    std::fs::remove_file(stage.join("tokenizer.json")).unwrap();
    let resumed = r1(&["--resume"]);
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    assert!(!resumed.status.success() && stderr.contains("another tokenizer"), "{stderr}");
    // A tokenizer with ids the model has no embedding for is refused, naming the checkpoint.
    let small = dir.join("small");
    DenseModel::new(DenseConfig { vocab_size: 100, ..cfg }, 3)
        .unwrap()
        .save_pretrained(&small, SaveDType::F32)
        .unwrap();
    std::fs::copy(&fixture, small.join("tokenizer.json")).unwrap();
    let out = whale()
        .args(["r1-zero", "--base", small.to_str().unwrap(), "--out", dir.join("r").to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("353 ids") && stderr.contains("small"), "{stderr}");
}

#[test]
fn info_reads_any_config_and_generate_continues_a_prompt() {
    let dir = tmpdir("info");
    // The V3 config alone (no weights): counts and cache sizes come from config.json.
    let v3 = dir.join("v3");
    std::fs::create_dir_all(&v3).unwrap();
    let cfg = whale_rl::parallel::model::DeepSeekV3Config::v3_671b().to_json_string().unwrap();
    std::fs::write(v3.join("config.json"), cfg).unwrap();
    let out = whale().args(["info", v3.to_str().unwrap()]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("| MLA absorb (latent + k_pe) | 576 | 1152 B | 68.6 KiB |"), "{stdout}");
    assert!(stdout.contains("| MLA naive (per-head K and V) | 40960 | 81920 B | 4.77 MiB |"), "{stdout}");
    assert!(stdout.contains("activated per token"), "{stdout}");
    let qwen = Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures/qwen2_tied");
    let out = whale().args(["info", qwen.to_str().unwrap()]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("2 KV heads") && stdout.contains("chat template: none"), "{stdout}");

    let base = dir.join("base");
    // Trained with DeepSeek-V3's FP8 recipe and bf16 optimizer moments.
    let out = whale()
        .args(["pretrain", "--out", base.to_str().unwrap(), "--steps", "2", "--precision", "fp8", "--moments", "bf16"])
        .args(SMALL)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ckpt = base.join("checkpoint");
    for (extra, how) in [
        (vec!["--greedy"], "greedy: --greedy"),
        (vec!["--speculative", "--cache", "naive"], "greedy: HF's defaults"),
        (
            vec!["--temperature", "0.8", "--top-p", "0.9"],
            "temperature 0.8, top-k 50, top-p 0.9: --temperature, --top-p over",
        ),
        (vec!["--speculative", "--temperature", "0.8", "--top-k", "5"], "top-k 5: --temperature, --top-k over"),
    ] {
        let out = generate(&ckpt, 6, &extra);
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && stdout.starts_with("12+7="), "{extra:?}: {stdout}{stderr}");
        assert!(stderr.contains("tokens/s") && stderr.contains(how), "{extra:?}: {stderr}");
        if extra.contains(&"--speculative") {
            assert!(stderr.contains("drafts accepted"), "{stderr}");
        }
    }
    // --chat puts the prompt (and --system's message before it) through the checkpoint's chat
    // template with the generation prompt; a checkpoint without one is refused, naming it.
    let out = generate(&ckpt, 2, &["--greedy", "--chat"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("has no chat template"), "{stderr}");
    let chat = dir.join("with-chat-template");
    copy_checkpoint(&ckpt, &chat);
    let template = "{% for m in messages %}{{ m.content }}{% endfor %}{% if add_generation_prompt %}<think>{% endif %}";
    std::fs::write(chat.join("chat_template.jinja"), template).unwrap();
    let out = whale().args(["info", chat.to_str().unwrap()]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("chat_template.jinja (whale generate --chat)"), "{stdout}");
    for (extra, rendered) in [(vec![], "12+7=<think>"), (vec!["--system", "1+1="], "1+1=12+7=<think>")] {
        let out = generate(&chat, 2, &[&["--greedy", "--chat"], &extra[..]].concat());
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && stdout.starts_with(rendered), "{extra:?}: {stdout}{stderr}");
        assert!(stderr.contains(&format!("prompt {} tokens", rendered.len() - "<think>".len() + 1)), "{stderr}");
    }
    // Without --greedy or --temperature, generation_config.json decides, as in HF's generate.
    let sampling = dir.join("with-generation-config");
    copy_checkpoint(&ckpt, &sampling);
    let generation = r#"{"do_sample": true, "temperature": 0.6, "top_p": 0.95, "repetition_penalty": 1.1}"#;
    std::fs::write(sampling.join("generation_config.json"), generation).unwrap();
    for (checkpoint, want) in [
        (&sampling, "sampled at temperature 0.6, top-k 50, top-p 0.95: generation_config.json)"),
        (&ckpt, "greedy: HF's defaults (no generation_config.json)"),
    ] {
        let out = generate(checkpoint, 4, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && stderr.contains(want), "{stderr}");
        assert_eq!(
            stderr.contains("repetition_penalty 1.1, which whale does not apply"),
            checkpoint == &sampling,
            "{stderr}"
        );
    }
    // A JSONL file: its held-out prompts (what training on it leaves out), or every line.
    let data = dir.join("sums.jsonl");
    let lines: String = (10..70).map(|a| format!("{{\"prompt\": \"{a}+7=\", \"answer\": \"{}\"}}\n", a + 7)).collect();
    std::fs::write(&data, lines).unwrap();
    let eval = |extra: &[&str]| {
        let out = whale()
            .args(["eval", "--checkpoint", ckpt.to_str().unwrap(), "--data", data.to_str().unwrap(), "--k", "1"])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let n: usize = stdout.split_once("evaluating ").unwrap().1.split(' ').next().unwrap().parse().unwrap();
        n
    };
    let held_out = eval(&[]);
    assert!(held_out > 0 && held_out < 20, "{held_out} of 60");
    assert_eq!(eval(&["--all-lines"]), 60);
    // Settings that would be ignored or sample from something else are refused.
    for (extra, words) in [
        (vec!["--top-p", "0.9"], "--temperature"),
        (vec!["--temperature", "0.8", "--top-p", "1.5"], "top_p 1.5 must be in (0, 1]"),
    ] {
        let out = generate(&ckpt, 6, &extra);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(words), "{extra:?}: {stderr}");
    }
    // Exported as an FP8 release and run with its weights kept in FP8.
    let fp8 = dir.join("fp8");
    let out = whale().args(["quantize", ckpt.to_str().unwrap(), "--out", fp8.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("E4M3"));
    let config = std::fs::read_to_string(fp8.join("config.json")).unwrap();
    assert!(config.contains("weight_block_size"), "{config}");
    // Stored as the release stores it: the rest in bf16, the router's bias and the scales in f32.
    let bytes = std::fs::read(fp8.join("model.safetensors")).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    for (name, dtype) in [
        ("model.embed_tokens.weight", "BF16"),
        ("model.layers.1.mlp.gate.e_score_correction_bias", "F32"),
        ("model.layers.1.self_attn.o_proj.weight", "F8_E4M3"),
        ("model.layers.1.self_attn.o_proj.weight_scale_inv", "F32"),
    ] {
        assert_eq!(header[name]["dtype"], dtype, "{name}");
    }
    // Never over an existing folder, the checkpoint least of all.
    let out = whale().args(["quantize", ckpt.to_str().unwrap(), "--out", ckpt.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("already exists"));
    let out = generate(&fp8, 4, &["--fp8"]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with("12+7="));
    // In bf16, as the reference's generate.py runs (with --fp8 its activations are quantised
    // from bf16), and evaluated so; fp8 is --fp8's, not --precision's.
    for extra in [&["--precision", "bf16"][..], &["--fp8", "--precision", "bf16"]] {
        let out = generate(&fp8, 4, extra);
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && stdout.starts_with("12+7="), "{extra:?}: {stdout}{stderr}");
    }
    assert_eq!(eval(&["--precision", "bf16"]), held_out);
    let out = generate(&fp8, 4, &["--precision", "fp8"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--fp8 runs"));
    // A checkpoint with an HF tokenizer keeps it, and its generation config, in the release.
    let with_tokenizer = dir.join("with-tokenizer");
    copy_checkpoint(&ckpt, &with_tokenizer);
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures/tokenizer/tokenizer.json");
    std::fs::copy(&fixture, with_tokenizer.join("tokenizer.json")).unwrap();
    std::fs::write(with_tokenizer.join("generation_config.json"), r#"{"eos_token_id": 0}"#).unwrap();
    let released = dir.join("fp8-with-tokenizer");
    let out = whale()
        .args(["quantize", with_tokenizer.to_str().unwrap(), "--out", released.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for file in ["tokenizer.json", "generation_config.json"] {
        assert_eq!(std::fs::read(released.join(file)).unwrap(), std::fs::read(with_tokenizer.join(file)).unwrap());
    }
    // No machine has this GPU: an error that names the flag, before anything loads.
    let out = whale()
        .args(["generate", "--checkpoint", ckpt.to_str().unwrap(), "--prompt", "1+1=", "--device", "cuda:4096"])
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--device cuda:4096"));
    let bad = whale().args(["generate", "--checkpoint", ckpt.to_str().unwrap(), "--prompt", "ABC"]).output().unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("not in the character tokenizer"));
}

const TINY_R1: &str = r#"
tasks = "add:1-2"
non_reasoning = "reverse:3"
eval_problems = 4
k = 2
eval_every = 1
validation_problems = 2
checkpoint_every = 1
[cold_start]
problems = 8
sft = { steps = 2, batch = 4 }
[reasoning_rl]
steps = 1
prompts_per_step = 2
group_size = 2
[rejection]
problems = 4
samples = 2
non_reasoning = 4
min_traces = 0
sft = { steps = 2, batch = 4 }
[reward_model]
train_pairs = 8
heldout_pairs = 4
steps = 2
batch = 2
[all_rl]
steps = 2
prompts_per_step = 2
group_size = 2
"#;

#[test]
fn r1_runs_its_four_stages_and_each_stage_alone() {
    let dir = tmpdir("r1");
    let base = dir.join("base");
    let out = whale().args(["pretrain", "--out", base.to_str().unwrap(), "--steps", "2"]).args(SMALL).output().unwrap();
    assert!(out.status.success());
    let cfg = dir.join("r1.toml");
    std::fs::write(&cfg, TINY_R1).unwrap();
    let ckpt = base.join("checkpoint");
    let run = dir.join("r1");
    let out = whale()
        .args([
            "r1",
            "--from",
            ckpt.to_str().unwrap(),
            "--out",
            run.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for stage in ["1-cold-start", "2-reasoning-rl", "3-rejection-sft", "4-all-scenarios-rl"] {
        assert!(run.join(stage).join("checkpoint/config.json").exists(), "{stage}");
        assert!(run.join(stage).join("eval.json").exists(), "{stage}");
    }
    assert!(stdout.contains("held-out pair accuracy"), "{stdout}");
    assert!(run.join("3-rejection-sft/data.jsonl").exists());
    // A --data prompt the tokenizer cannot read is named before stage 1 trains, nothing written.
    let upper = dir.join("upper.jsonl");
    let lines: String =
        (0..8).map(|i| format!("{{\"prompt\": \"What is {i}+2?\", \"answer\": \"{}\"}}\n", i + 2)).collect();
    std::fs::write(&upper, lines).unwrap();
    let refused_run = dir.join("r1-upper");
    let out = whale()
        .args(["r1", "--from", ckpt.to_str().unwrap(), "--out", refused_run.to_str().unwrap()])
        .args(["--config", cfg.to_str().unwrap(), "--data", upper.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("--data") && stderr.contains("prompt \"What is"), "{stderr}");
    assert!(!refused_run.exists(), "nothing is written");
    assert!(std::fs::read_to_string(run.join("2-reasoning-rl/eval_history.jsonl")).unwrap().lines().count() >= 2);
    // A run interrupted in stage 3 (its record never written): the same command refuses to
    // overwrite it and leaves its settings alone; --resume reads stages 1-2 back and runs stages 3
    // and 4 again (4 was trained on the old stage 3), with the run's settings and inputs.
    let (stage3, stage4) = (run.join("3-rejection-sft"), run.join("4-all-scenarios-rl"));
    std::fs::remove_file(stage3.join("stage.json")).unwrap();
    let settings = std::fs::read_to_string(run.join("settings.json")).unwrap();
    let again = |extra: &[&str]| {
        whale()
            .args(["r1", "--from", ckpt.to_str().unwrap(), "--out", run.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = again(&[]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--resume"));
    assert_eq!(std::fs::read_to_string(run.join("settings.json")).unwrap(), settings, "a refused run writes nothing");
    let out = again(&["--resume", "--config", cfg.to_str().unwrap()]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("drop --config"));
    let out = again(&["--resume", "--base", base.join("checkpoint").to_str().unwrap()]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--base"));
    // Stage 2 alone would start from --from (the base), not from this run's stage 1.
    let out = again(&["--resume", "--stage", "reasoning-rl"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--stage"), "{out:?}");
    // --from spelled another way (a trailing slash) names the run's own input. (The stages it
    // runs again compute in bf16: rejection sampling, SFT, the reward model and GRPO; a resumed
    // run may give another --precision.)
    let out = whale()
        .args(["r1", "--from", &format!("{}/", ckpt.display()), "--out", run.to_str().unwrap(), "--resume"])
        .args(["--precision", "bf16"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.matches("finished earlier").count(), 2, "{stdout}");
    for (stage, dir) in [("R1 stage 3 (rejection-sampling SFT)", &stage3), ("R1 stage 4 (all-scenario RL)", &stage4)] {
        assert!(stdout.contains(&format!("{stage} done in")) && dir.join("stage.json").exists(), "{stdout}");
    }
    assert!(stage4.join("reward_model.json").exists());
    // Interrupted in stage 4 after its step-1 checkpoint (its record never written; the
    // checkpoint's step set back to 1 as that checkpoint had it): --resume continues the stage
    // there, each log line once.
    std::fs::remove_file(stage4.join("stage.json")).unwrap();
    let state_path = stage4.join("checkpoint/rl_state.json");
    let mut state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    state["step"] = 1.into();
    std::fs::write(&state_path, state.to_string()).unwrap();
    let out = again(&["--resume"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.matches("finished earlier").count(), 3, "{stdout}");
    assert!(stdout.contains("R1 stage 4 (all-scenario RL): resuming at step 1 of 2"), "{stdout}");
    let steps = |file: &str| -> Vec<u64> {
        let text = std::fs::read_to_string(stage4.join(file)).unwrap();
        text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap()).collect()
    };
    assert_eq!(steps("metrics.jsonl"), [0, 1]);
    // Validation of the step it resumed at is redone (a crash right after the checkpoint would
    // have left it unwritten), once.
    assert_eq!(steps("eval_history.jsonl"), [0, 1, 2]);
    assert!(stage4.join("stage.json").exists());
    // One stage alone from a checkpoint, into its own folder.
    let alone = dir.join("alone");
    let from = run.join("1-cold-start/checkpoint");
    let out = whale()
        .args(["r1", "--stage", "reasoning-rl", "--from", from.to_str().unwrap(), "--out", alone.to_str().unwrap()])
        .args(["--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(alone.join("2-reasoning-rl/checkpoint").exists() && !alone.join("1-cold-start").exists());
    // The same stage recomputing its policy's sublayers takes the same steps but for their times.
    let recomputed = dir.join("alone-recomputed");
    let out = whale()
        .args([
            "r1",
            "--stage",
            "reasoning-rl",
            "--from",
            from.to_str().unwrap(),
            "--out",
            recomputed.to_str().unwrap(),
        ])
        .args(["--config", cfg.to_str().unwrap(), "--recompute", "attention,mlp"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stage = |run: &Path| metrics_but_speed(&run.join("2-reasoning-rl"));
    assert_eq!(stage(&recomputed), stage(&alone));
    let alone_settings = std::fs::read_to_string(alone.join("settings.json")).unwrap();
    let out = whale()
        .args(["r1", "--stage", "rejection-sft", "--from", from.to_str().unwrap(), "--out", alone.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--base"));
    let written = std::fs::read_to_string(alone.join("settings.json")).unwrap();
    assert!(written == alone_settings && !alone.join("3-rejection-sft").exists(), "refused before writing");
    // Nor does a stage 3 fine-tune on non-reasoning data alone when rejection sampling keeps no
    // trace (the first run allowed it with min_traces = 0).
    let rcfg = dir.join("rejection.toml");
    std::fs::write(&rcfg, "[rejection]\nproblems = 4\nsamples = 2\n").unwrap();
    let out = whale()
        .args(["r1", "--stage", "rejection-sft", "--from", from.to_str().unwrap(), "--out", alone.to_str().unwrap()])
        .args(["--base", ckpt.to_str().unwrap(), "--config", rcfg.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("`rejection.min_traces` = 1"), "{stderr}");
    assert!(!alone.join("3-rejection-sft/checkpoint").exists());
    // A teacher that solves nothing has nothing to distil: a clear error, not an empty student.
    let dcfg = dir.join("distill.toml");
    let tiny_distill = "tasks = \"add:1\"\ntrace_problems = 4\ntrace_samples = 2\neval_problems = 2\nk = 2\n\
                        [student_pretrain]\nsteps = 2\nbatch = 2\n[sft]\nsteps = 2\nbatch = 2\n\
                        [rl]\nsteps = 1\nprompts_per_step = 2\ngroup_size = 2\n";
    std::fs::write(&dcfg, tiny_distill).unwrap();
    let d = dir.join("d");
    let distill = |extra: &[&str]| {
        let mut command = whale();
        let out = command.args(["distill", "--from", ckpt.to_str().unwrap(), "--out", d.to_str().unwrap()]);
        let out = out.args(extra).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, said) = distill(&["--config", dcfg.to_str().unwrap()]);
    assert!(!ok && said.contains("nothing to distil") && said.contains("wrote 0 verified"), "{said}");
    // It keeps no traces, so a new run may take the folder. A run resumed with traces (here
    // written by hand, as a teacher that solves its problems would) trains the three arms
    // without sampling again...
    assert!(!d.join("traces.json").exists());
    let traces: Vec<serde_json::Value> = (1..5)
        .map(|a| serde_json::json!({"prompt": format!("{a}+4="), "completion": format!("<think>{a}+4+0={}</think><answer>{}</answer>", a + 4, a + 4)}))
        .collect();
    let stats = serde_json::json!({"sampled": 8, "correct": 4, "accepted": 4, "unique": 4});
    std::fs::write(d.join("traces.json"), serde_json::json!({"stats": stats, "traces": traces}).to_string()).unwrap();
    let (ok, said) = distill(&["--resume"]);
    assert!(ok && said.contains("traces from") && !said.contains("finished earlier"), "{said}");
    let eval = |arm: &str| std::fs::read_to_string(d.join(arm).join("eval.json")).unwrap();
    let (distilled, rl_only) = (eval("distilled"), eval("rl-only"));
    // ...and one cut short after its student base redoes only what it had not finished, to the
    // same numbers.
    std::fs::remove_file(d.join("distilled/arm.json")).unwrap();
    std::fs::remove_dir_all(d.join("rl-only")).unwrap();
    let (ok, said) = distill(&["--resume"]);
    assert!(ok && said.contains("student-base finished earlier"), "{said}");
    assert_eq!((eval("distilled"), eval("rl-only")), (distilled, rl_only));
    // Redone in bf16 (a resumed run may give another --precision), the arms train and are
    // evaluated too.
    std::fs::remove_file(d.join("distilled/arm.json")).unwrap();
    std::fs::remove_dir_all(d.join("rl-only")).unwrap();
    let (ok, said) = distill(&["--resume", "--precision", "bf16"]);
    assert!(ok && said.contains("student-base finished earlier") && d.join("rl-only/arm.json").exists(), "{said}");
    // A finished run is not started over, nor resumed with other settings or another teacher.
    let (ok, said) = distill(&[]);
    assert!(!ok && said.contains("pass --resume"), "{said}");
    let (ok, said) = distill(&["--resume", "--config", dcfg.to_str().unwrap()]);
    assert!(!ok && said.contains("drop --config"), "{said}");
    let out = whale()
        .args(["distill", "--resume", "--from", base.to_str().unwrap(), "--out", d.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--from"));
    // A mistyped student folder is refused before the teacher samples, and nothing is written.
    let d2 = dir.join("d2");
    let out = whale()
        .args(["distill", "--from", ckpt.to_str().unwrap(), "--out", d2.to_str().unwrap()])
        .args(["--student", dir.join("no-such-student").to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("no-such-student") && stderr.contains("no config.json"),
        "{stderr}"
    );
    assert!(!d2.exists());
}

/// What scripts/gpu-check.sh runs on the GPU, the `whale` binary as it is, on the emulated driver
/// (whale-kernels' tests/common/emulator.rs): `pretrain --device cuda` in f32 takes the CPU's
/// steps (losses and gradient norms), and in FP8 with bf16 moments, DeepSeek-V3's recipe, with
/// and without the FP8 dispatch and SwiGLU cache, it trains; `generate --device cuda` from the GPU-trained
/// checkpoint continues a prompt as the CPU does, and so does a V3.1 release of it kept in FP8.
/// The checkpoint written from the GPU is the one the CPU reads.
#[test]
fn pretrain_and_generate_on_a_gpu_match_the_cpu_on_the_emulated_driver_in_emulation() {
    let test = "pretrain_and_generate_on_a_gpu_match_the_cpu_on_the_emulated_driver_in_emulation";
    let Some(env) = emulator::emulated_driver_env(test) else { return };
    let dir = tmpdir("emulated-gpu");
    let run = |device: &str, precision: &str, moments: &str, v3_memory: bool| {
        let out_dir = dir.join(format!("{device}-{precision}-{v3_memory}"));
        let out = whale()
            .envs(env.clone())
            .args(["pretrain", "--out", out_dir.to_str().unwrap(), "--steps", "2", "--grad-accum", "1"])
            .args(["--device", device, "--precision", precision, "--moments", moments])
            .args(v3_memory.then_some(["--fp8-dispatch", "--fp8-swiglu-cache"]).into_iter().flatten())
            .args(SMALL)
            .output()
            .unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && stdout.contains("pass@1"), "{device} {precision}: {stdout}{stderr}");
        out_dir
    };
    // The tolerances of tiny DeepSeek-V3's training tests on the GPU (crates/model/tests/
    // cuda_model.rs): f32 agrees to rounding; in FP8 with bf16 activations and moments, a value
    // the devices round to neighbouring bf16 or E4M3 codes moves the loss by well under 1e-2.
    let gpu = run("cuda", "fp32", "fp32", false);
    let cases = [("fp32", "fp32", false, 1e-4), ("fp8", "bf16", false, 1e-2), ("fp8", "bf16", true, 1e-2)];
    // The last: with the FP8 dispatch and the experts' SwiGLU inputs cached in FP8.
    for (precision, moments, v3_memory, tolerance) in cases {
        let on_cpu = metrics(&run("cpu", precision, moments, v3_memory));
        let on_gpu =
            if precision == "fp32" { metrics(&gpu) } else { metrics(&run("cuda", precision, moments, v3_memory)) };
        assert_eq!(on_cpu.len(), on_gpu.len(), "{precision}: steps logged");
        for (step, (c, g)) in on_cpu.iter().zip(&on_gpu).enumerate() {
            for key in ["loss", "main_loss", "mtp_loss", "grad_norm"] {
                let (c, g) = (c[key].as_f64().unwrap(), g[key].as_f64().unwrap());
                let close = (c - g).abs() <= tolerance * c.abs();
                let what = format!("{precision} (FP8 dispatch and SwiGLU cache: {v3_memory})");
                assert!(close, "{what} step {step}: {key} {g} on the GPU, {c} on the CPU");
            }
        }
    }

    let checkpoint = gpu.join("checkpoint");
    let generate = |checkpoint: &Path, device: &str, flags: &[&str]| {
        let out = whale()
            .envs(env.clone())
            .args(["generate", "--checkpoint", checkpoint.to_str().unwrap(), "--prompt", "12+7="])
            .args(["--max-new-tokens", "8", "--greedy", "--device", device])
            .args(flags)
            .output()
            .unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && stderr.contains(&format!("on {device}")), "{device}: {stdout}{stderr}");
        stdout.into_owned()
    };
    let (on_gpu, on_cpu) = (generate(&checkpoint, "cuda", &[]), generate(&checkpoint, "cpu", &[]));
    assert_eq!(on_gpu, on_cpu, "greedy decoding on the GPU and on the CPU");
    // A DeepSeek-V3.1 release (UE8M0 activation scales) kept in FP8: the GPU's kernels take its
    // power-of-two scales, and decode as the CPU does.
    let release = dir.join("v31");
    let out =
        whale().args(["quantize", checkpoint.to_str().unwrap(), "--out", release.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let config_path = release.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["quantization_config"]["scale_fmt"] = serde_json::json!("ue8m0");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let fp8 = ["--fp8"];
    assert_eq!(generate(&release, "cuda", &fp8), generate(&release, "cpu", &fp8), "a V3.1 release kept in FP8");
}
