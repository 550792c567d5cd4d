//! `whale schedule` end to end: it simulates DualPipe on 8 ranks with 20 micro-batches, prints
//! the bubble against the table and writes the timeline SVG; impossible shapes fail cleanly.

use std::process::Command;

fn whale() -> Command {
    Command::new(env!("CARGO_BIN_EXE_whale"))
}

#[test]
fn dualpipe_pp8_micro20_prints_the_bubble_and_draws_the_timeline() {
    let dir = std::env::temp_dir().join(format!("whale-cli-{}-schedule", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let svg = dir.join("out.svg");
    let _ = std::fs::remove_file(&svg);
    let out = whale()
        .args(["schedule", "--method", "dualpipe", "--pp", "8", "--micro", "20", "--svg", svg.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    // Defaults F=1, B=2, W=1, F&B=3: every rank idles (8/2-1)(3+2-3) = 6.
    assert!(stdout.contains("bubble: 6 on the worst rank; table (PP/2-1)(F&B+B-3W) = 6"), "{stdout}");
    assert!(stdout.contains("peak activations: 9 (table: 9)"), "{stdout}");
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg") && text.contains("Rank 7"), "{text}");
    assert!(!dir.join("out.svg.tmp").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_impossible_schedule_is_an_error_not_a_panic() {
    let out = whale().args(["schedule", "--method", "dualpipe", "--pp", "8", "--micro", "10"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("at least 2*PP micro-batches") && !stderr.contains("panicked"), "{stderr}");
    let out = whale().args(["schedule", "--method", "gpipe"]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("expected 1f1b, zb1p"));
}
