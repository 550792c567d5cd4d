//! Project automation, run as `cargo xtask <command>` (an alias in `.cargo/config.toml`).
//!
//! - `bench [FILTER]`: runs the criterion benches and writes a markdown summary with each bench's
//!   whale / baseline ratio to `target/bench-summary.md`.
//! - `build-kernels`: compiles `kernels/*.cu` to PTX (arrives with the CUDA issue).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  bench [FILTER] [--out FILE]   run the criterion benches (optionally only those matching FILTER)
                                and write a markdown summary of every bench with its ratio to
                                the baseline measured in the same run (default: target/bench-summary.md)
  build-kernels [--check]       compile kernels/*.cu to PTX for sm_90/sm_80 and regenerate the
                                kernel manifest; --check fails when the committed PTX is stale
";

const BUILD_KERNELS_HELP: &str = "\
usage: cargo xtask build-kernels [--check]

Compiles every kernels/*.cu to PTX for sm_90 (compute_90a where a kernel uses wgmma) and sm_80,
writes the PTX and a manifest (kernel names, a hash of the sources) into crates/kernels, which
embeds them. Uses nvcc from PATH or CUDA_HOME, otherwise the pinned CUDA 13.0 compiler from PyPI
installed into .cuda/13.0. --check fails when the committed PTX does not match the sources.

Status: the CUDA kernels and this command arrive with the CUDA issue; there are no .cu sources yet.
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("bench") => bench(&args[1..]),
        Some("build-kernels") => build_kernels(&args[1..]),
        Some("-h" | "--help" | "help") | None => {
            print!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(format!("unknown command `{other}`\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"))
}

fn build_kernels(args: &[String]) -> Result<(), String> {
    if args.iter().any(|a| a == "-h" || a == "--help") {
        print!("{BUILD_KERNELS_HELP}");
        return Ok(());
    }
    Err("build-kernels: there are no CUDA sources yet (they arrive with the CUDA issue); see --help".into())
}

fn bench(args: &[String]) -> Result<(), String> {
    let mut filter = None;
    let mut out = target_dir().join("bench-summary.md");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--out" => out = PathBuf::from(it.next().ok_or("--out needs a file")?),
            "-h" | "--help" => {
                print!("{USAGE}");
                return Ok(());
            }
            f if filter.is_none() => filter = Some(f.to_string()),
            extra => return Err(format!("unexpected argument `{extra}`")),
        }
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root()).args(["bench", "-p", "whale-benches", "--"]);
    if let Some(f) = &filter {
        cmd.arg(f);
    }
    let status = cmd.status().map_err(|e| format!("cannot run cargo bench: {e}"))?;
    if !status.success() {
        return Err(format!("cargo bench failed ({status})"));
    }
    let rows = collect(&target_dir().join("criterion"), filter.as_deref())?;
    let table = render(&rows);
    print!("\n{table}");
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    std::fs::write(&out, &table).map_err(|e| format!("{}: {e}", out.display()))?;
    println!("summary written to {}", out.display());
    Ok(())
}

/// One benchmark group: mean times in nanoseconds.
struct Row {
    group: String,
    whale: Option<f64>,
    baseline: Option<f64>,
    /// Elements (tokens) per iteration, when the bench declares a throughput.
    elements: Option<f64>,
}

fn mean_ns(path: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["mean"]["point_estimate"].as_f64()
}

fn elements(path: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["throughput"]["Elements"].as_f64()
}

fn collect(dir: &Path, filter: Option<&str>) -> Result<Vec<Row>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e} (did the benches run?)", dir.display()))?;
    let mut rows: Vec<Row> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|g| g != "report" && filter.is_none_or(|f| g.contains(f)))
        .map(|group| {
            let at = |f: &str| mean_ns(&dir.join(&group).join(f).join("new").join("estimates.json"));
            let elements = elements(&dir.join(&group).join("whale").join("new").join("benchmark.json"));
            Row { whale: at("whale"), baseline: at("baseline"), elements, group }
        })
        .filter(|r| r.whale.is_some() || r.baseline.is_some())
        .collect();
    rows.sort_by(|a, b| a.group.cmp(&b.group));
    Ok(rows)
}

fn fmt_time(ns: Option<f64>) -> String {
    match ns {
        None => "—".into(),
        Some(ns) if ns >= 1e9 => format!("{:.3} s", ns / 1e9),
        Some(ns) if ns >= 1e6 => format!("{:.3} ms", ns / 1e6),
        Some(ns) => format!("{:.1} µs", ns / 1e3),
    }
}

fn render(rows: &[Row]) -> String {
    let mut s =
        String::from("| bench | whale | baseline | whale / baseline | whale throughput |\n|---|---:|---:|---:|---:|\n");
    for r in rows {
        let ratio = match (r.whale, r.baseline) {
            (Some(w), Some(b)) if b > 0.0 => format!("{:.3}", w / b),
            _ => "—".into(),
        };
        let rate = match (r.elements, r.whale) {
            (Some(n), Some(w)) if w > 0.0 => format!("{:.0} /s", n / (w / 1e9)),
            _ => "—".into(),
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            r.group,
            fmt_time(r.whale),
            fmt_time(r.baseline),
            ratio,
            rate
        ));
    }
    s.push_str(
        "\nMean time per iteration (criterion). A ratio below 1 means whale is faster than its baseline; \
         throughput is elements (tokens) per second where the bench declares it; \
         `—` marks a bench with no baseline (an absolute measurement).\n",
    );
    s
}
