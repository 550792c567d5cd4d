//! Project automation, run as `cargo xtask <command>` (an alias in `.cargo/config.toml`).
//!
//! - `bench [FILTER]`: runs the criterion benches and writes a markdown summary with each bench's
//!   whale / baseline ratio to `target/bench-summary.md`.
//! - `build-kernels [--check]`: compiles `kernels/*.cu` to PTX for sm_90 and sm_80 (and sm_89
//!   where a kernel uses Ada's FP8 mma) with a pinned CUDA 13.0 nvcc and regenerates the manifest
//!   the kernels crate embeds.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  bench [FILTER] [--out FILE]   run the criterion benches (a bench target's name, e.g. gpu or fp8,
                                runs that target; any other FILTER only the benches matching it)
                                and write a markdown summary of every bench with its ratio to
                                the baseline measured in the same run (default: target/bench-summary.md)
  build-kernels [--check]       compile kernels/*.cu to PTX for sm_90/sm_80 and regenerate the
                                kernel manifest; --check fails when the committed PTX is stale
";

const BUILD_KERNELS_HELP: &str = "\
usage: cargo xtask build-kernels [--check]

Compiles every kernels/*.cu to PTX for sm_90 (compute_90a where a kernel uses wgmma) and sm_80,
writes the PTX and a manifest (kernel names, a hash of the sources) into crates/kernels, which
embeds them. Uses nvcc from NVCC, PATH or CUDA_HOME, otherwise the pinned CUDA 13.0 compiler from
PyPI installed into .cuda/13.0. --check fails when the committed PTX does not match the sources.

Kernels using wgmma (marked `// uses: wgmma` in their source) compile for compute_90a; those using
FP8 mma.sync (`// uses: sm_89`) for sm_89 too, which Ada GPUs load. Where ptxas
sits beside nvcc or on PATH, every PTX is validated with it for its target (else it says so).
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

use whale_kernels::cuda::ptx_recipe::{
    ADA_MARK, ADA_TARGET, CUDA_RELEASE, NVCC_FLAGS, TARGETS, WGMMA_ARCH, WGMMA_MARK,
};

/// What `pip` installs when no nvcc is found: the CUDA release of [`CUDA_RELEASE`].
const PIP_PACKAGES: [&str; 5] = [
    "nvidia-cuda-nvcc==13.0.88",
    "nvidia-cuda-crt==13.0.88",
    "nvidia-nvvm==13.0.88",
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-cuda-cccl==13.0.85",
];

/// PTX without its comment lines: nvcc's header (its exact version and build id) is all that
/// differs between the patch releases of one CUDA release, so `--check` compares the rest.
fn ptx_code(ptx: &[u8]) -> Vec<&[u8]> {
    ptx.split(|&b| b == b'\n').filter(|l| !l.trim_ascii_start().starts_with(b"//")).collect()
}

fn build_kernels(args: &[String]) -> Result<(), String> {
    if args.iter().any(|a| a == "-h" || a == "--help") {
        print!("{BUILD_KERNELS_HELP}");
        return Ok(());
    }
    let check = args.iter().any(|a| a == "--check");
    if let Some(other) = args.iter().find(|a| *a != "--check") {
        return Err(format!("build-kernels: unexpected argument `{other}`"));
    }
    let root = workspace_root();
    let src_dir = root.join("kernels");
    let ptx_dir = src_dir.join("ptx");
    let nvcc = find_nvcc(&root)?;
    let version = run_capture(Command::new(&nvcc).arg("--version"))?;
    if !version.contains(&format!("release {CUDA_RELEASE},")) {
        return Err(format!(
            "{} is not CUDA {CUDA_RELEASE} (newer nvcc emits PTX the CUDA {CUDA_RELEASE} driver cannot load):\n{version}",
            nvcc.display()
        ));
    }
    let ptxas = find_ptxas(&nvcc);
    if ptxas.is_none() {
        println!("no ptxas beside {} or on PATH: the PTX is compiled but not validated", nvcc.display());
    }
    let hash_sources = || whale_kernels::cuda::source_hash(&src_dir).map_err(|e| format!("{}: {e}", src_dir.display()));
    let hash = hash_sources()?;
    // Everything is compiled here first: a failure part-way leaves the committed PTX and manifest
    // as they were.
    let out_dir = target_dir().join(if check { "ptx-check" } else { "ptx-build" });
    let _ = std::fs::remove_dir_all(&out_dir);
    std::fs::create_dir_all(&out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&src_dir)
        .map_err(|e| format!("{}: {e}", src_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    let mut modules = Vec::new();
    for src in &sources {
        let stem = src.file_stem().expect("a file").to_string_lossy().to_string();
        let text = std::fs::read_to_string(src).map_err(|e| format!("{}: {e}", src.display()))?;
        let marked = |mark: &str| text.lines().any(|l| l.trim() == mark);
        let (wgmma, ada) = (marked(WGMMA_MARK), marked(ADA_MARK));
        for (suffix, arch, sass) in targets(ada) {
            let (arch, sass) = if wgmma && suffix == "sm_90" { WGMMA_ARCH } else { (arch, sass) };
            let out = out_dir.join(format!("{stem}.{suffix}.ptx"));
            let include = format!("-I{}", src_dir.display());
            run_capture(
                Command::new(&nvcc)
                    .args(NVCC_FLAGS)
                    .arg(&include)
                    .arg(format!("-arch={arch}"))
                    .arg("-o")
                    .arg(&out)
                    .arg(src),
            )?;
            if let Some(ptxas) = &ptxas {
                let null = out_dir.join("ptxas-check.cubin");
                run_capture(Command::new(ptxas).arg(format!("-arch={sass}")).arg(&out).arg("-o").arg(&null))
                    .map_err(|e| format!("ptxas rejects {}: {e}", out.display()))?;
            }
        }
        modules.push(Module { stem, kernels: kernel_names(&text), wgmma, ada });
        println!("compiled {}", src.display());
    }
    if hash_sources()? != hash {
        return Err("kernels/ changed while it was being compiled: run the build again".into());
    }
    let manifest = rustfmt(&root, &render_manifest(&modules, hash))?;
    let manifest_path = root.join("crates/kernels/src/cuda/manifest.rs");
    let ptx_names: Vec<String> = modules
        .iter()
        .flat_map(|m| targets(m.ada).map(move |(suffix, _, _)| format!("{}.{suffix}.ptx", m.stem)))
        .collect();
    if check {
        let committed = std::fs::read_to_string(&manifest_path).unwrap_or_default();
        let mut stale: Vec<String> = Vec::new();
        if committed != manifest {
            stale.push(manifest_path.display().to_string());
        }
        for name in &ptx_names {
            let (new, old) = (std::fs::read(out_dir.join(name)), std::fs::read(ptx_dir.join(name)));
            if !matches!((&new, &old), (Ok(n), Ok(o)) if ptx_code(n) == ptx_code(o)) {
                stale.push(name.clone());
            }
        }
        if !stale.is_empty() {
            return Err(format!("stale: {} (run `cargo xtask build-kernels`)", stale.join(", ")));
        }
        println!("PTX and manifest are up to date with kernels/*.cu");
        return Ok(());
    }
    // Each file replaced by a rename, the manifest (which stamps the PTX as current) last.
    std::fs::create_dir_all(&ptx_dir).map_err(|e| format!("{}: {e}", ptx_dir.display()))?;
    for name in &ptx_names {
        // (copied beside its place first: the target folder may be on another file system)
        let (tmp, dest) = (ptx_dir.join(format!("{name}.tmp")), ptx_dir.join(name));
        std::fs::copy(out_dir.join(name), &tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    }
    let tmp = manifest_path.with_extension("rs.tmp");
    std::fs::write(&tmp, manifest).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &manifest_path).map_err(|e| format!("{}: {e}", manifest_path.display()))?;
    println!("wrote {} PTX modules and {}", modules.len(), manifest_path.display());
    Ok(())
}

/// `extern "C" __global__ void [__launch_bounds__(..)] NAME(` in a source: the kernels a module
/// exports.
fn kernel_names(text: &str) -> Vec<String> {
    text.split("extern \"C\" __global__ void ")
        .skip(1)
        .filter_map(|rest| {
            let rest = rest.trim_start();
            let rest = match rest.strip_prefix("__launch_bounds__") {
                Some(bounds) => &bounds[bounds.find(')')? + 1..],
                None => rest,
            };
            rest.split('(').next().map(|n| n.trim().to_string())
        })
        .collect()
}

/// One compiled `kernels/*.cu`: its kernels, and whether it uses wgmma (`sm_90` built for
/// compute_90a) or Ada's FP8 mma (built for sm_89 too).
struct Module {
    stem: String,
    kernels: Vec<String>,
    wgmma: bool,
    ada: bool,
}

/// The targets a module is built for: every one of [`TARGETS`], and [`ADA_TARGET`] with `ada`.
fn targets(ada: bool) -> impl Iterator<Item = (&'static str, &'static str, &'static str)> {
    TARGETS.into_iter().chain(ada.then_some(ADA_TARGET))
}

fn render_manifest(modules: &[Module], hash: u64) -> String {
    let mut out = String::from(
        "// @generated by `cargo xtask build-kernels` from kernels/*.cu; do not edit.\n\
         //! The embedded PTX of every CUDA kernel module and the stamp of the sources it was built from.\n\n\
         use super::PtxModule;\n\n",
    );
    out.push_str(&format!(
        "/// FNV-1a of the build recipe and `kernels/*.cu` (see [`super::source_hash`]).\npub const SOURCE_HASH: u64 = {hash:#018x};\n\n"
    ));
    out.push_str("pub const MODULES: &[PtxModule] = &[\n");
    for Module { stem, kernels, wgmma, ada } in modules {
        let names: Vec<String> = kernels.iter().map(|k| format!("\"{k}\"")).collect();
        let sm_89 = match ada {
            true => format!("Some(include_str!(\"../../../../kernels/ptx/{stem}.sm_89.ptx\"))"),
            false => "None".to_string(),
        };
        out.push_str(&format!(
            "    PtxModule {{\n        name: \"{stem}\",\n        kernels: &[{}],\n        sm_90a: {wgmma},\n        \
             sm_90: include_str!(\"../../../../kernels/ptx/{stem}.sm_90.ptx\"),\n        \
             sm_89: {sm_89},\n        \
             sm_80: include_str!(\"../../../../kernels/ptx/{stem}.sm_80.ptx\"),\n    }},\n",
            names.join(", ")
        ));
    }
    out.push_str("];\n");
    out
}

/// `text` formatted by rustfmt with the workspace's settings, so the generated file is what
/// `cargo fmt` would leave.
fn rustfmt(root: &Path, text: &str) -> Result<String, String> {
    use std::io::Write;
    let mut child = Command::new("rustfmt")
        .args(["--edition", "2021"])
        .current_dir(root)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run rustfmt: {e}"))?;
    child.stdin.take().expect("piped").write_all(text.as_bytes()).map_err(|e| format!("rustfmt: {e}"))?;
    let out = child.wait_with_output().map_err(|e| format!("rustfmt: {e}"))?;
    if !out.status.success() {
        return Err(format!("rustfmt rejected the manifest:\n{}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// ptxas beside `nvcc` (a path), or on PATH (nvcc found there by its bare name): the one that runs.
fn find_ptxas(nvcc: &Path) -> Option<PathBuf> {
    let beside = nvcc.parent().filter(|d| !d.as_os_str().is_empty()).map(|d| d.join("ptxas"));
    let works = |p: &PathBuf| Command::new(p).arg("--version").output().is_ok_and(|o| o.status.success());
    beside.into_iter().chain([PathBuf::from("ptxas")]).find(works)
}

/// nvcc from `NVCC`, PATH or CUDA_HOME, else the pinned one from PyPI in `.cuda/13.0` (installed on
/// first use with pip).
fn find_nvcc(root: &Path) -> Result<PathBuf, String> {
    let works = |p: &Path| Command::new(p).arg("--version").output().is_ok_and(|o| o.status.success());
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("NVCC") {
        candidates.push(PathBuf::from(p));
    }
    candidates.push(PathBuf::from("nvcc"));
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        candidates.push(PathBuf::from(home).join("bin/nvcc"));
    }
    let pinned = root.join(".cuda/13.0");
    let pip_nvcc = pinned.join("nvidia/cu13/bin/nvcc");
    candidates.push(pip_nvcc.clone());
    if let Some(found) = candidates.iter().find(|p| works(p)) {
        return Ok(found.clone());
    }
    println!("no nvcc found: installing the pinned CUDA {CUDA_RELEASE} compiler from PyPI into {}", pinned.display());
    let python = if Command::new("python3").arg("--version").output().is_ok() { "python3" } else { "python" };
    let status = Command::new(python)
        .args(["-m", "pip", "install", "--no-deps", "--target"])
        .arg(&pinned)
        .args(PIP_PACKAGES)
        .status()
        .map_err(|e| format!("cannot run pip: {e}"))?;
    if !status.success() || !works(&pip_nvcc) {
        return Err(format!("installing nvcc with pip failed ({status}); set NVCC or CUDA_HOME"));
    }
    Ok(pip_nvcc)
}

/// Runs `cmd`; its stdout, or an error with its stderr.
fn run_capture(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{cmd:?} failed:\n{}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
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
    cmd.current_dir(workspace_root()).args(["bench", "-p", "whale-benches"]);
    // The name of a bench target (`gpu`, `fp8`) runs that target whole (and the summary shows
    // all of its groups); anything else filters the benchmarks of every target by name.
    let target =
        filter.as_deref().is_some_and(|f| workspace_root().join("benches/benches").join(format!("{f}.rs")).exists());
    match &filter {
        Some(f) if target => {
            cmd.args(["--bench", f]);
        }
        Some(f) => {
            cmd.args(["--", f]);
        }
        None => {}
    }
    // The GPU benchmarks write their own table (each row beside its baseline, rates and ratios),
    // which is the summary: their criterion ids are not `whale`/`baseline` pairs.
    let gpu_table = (target && filter.as_deref() == Some("gpu")).then(|| target_dir().join("gpu-bench.md"));
    if let Some(path) = &gpu_table {
        let _ = std::fs::remove_file(path);
        cmd.env("WHALE_GPU_BENCH_OUT", path);
    }
    let started = std::time::SystemTime::now();
    let status = cmd.status().map_err(|e| format!("cannot run cargo bench: {e}"))?;
    if !status.success() {
        return Err(format!("cargo bench failed ({status})"));
    }
    let table = match &gpu_table {
        // The bench printed its table as it finished.
        Some(path) => {
            let Ok(table) = std::fs::read_to_string(path) else {
                println!("no GPU table: the GPU benchmarks found no GPU (see above)");
                return Ok(());
            };
            table
        }
        None => {
            let rows = collect(&target_dir().join("criterion"), filter.as_deref().filter(|_| !target), started)?;
            let table = render(&rows);
            print!("\n{table}");
            table
        }
    };
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
    /// What one iteration processes, when the bench declares a throughput.
    throughput: Option<Throughput>,
}

/// A bench's declared work per iteration (criterion's `Throughput`).
enum Throughput {
    /// Elements: tokens, or FLOPs where the bench counts them (the FP8 GEMMs and linear layer).
    Elements(f64),
    Bytes(f64),
}

fn mean_ns(path: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["mean"]["point_estimate"].as_f64()
}

fn throughput(path: &Path) -> Option<Throughput> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let t = &v["throughput"];
    t["Elements"]
        .as_f64()
        .map(Throughput::Elements)
        .or_else(|| t["Bytes"].as_f64().or_else(|| t["BytesDecimal"].as_f64()).map(Throughput::Bytes))
}

/// The groups under `dir` (criterion's folder) matching `filter` that this run measured: those
/// whose estimates were written since `since` (older ones are earlier runs' figures, and a
/// baseline left from one is not paired with a new whale time).
fn collect(dir: &Path, filter: Option<&str>, since: std::time::SystemTime) -> Result<Vec<Row>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e} (did the benches run?)", dir.display()))?;
    let fresh = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).is_ok_and(|t| t >= since);
    let estimates = |group: &str, who: &str| dir.join(group).join(who).join("new").join("estimates.json");
    let measured_now = |group: &str| fresh(&estimates(group, "whale")) || fresh(&estimates(group, "baseline"));
    let mut rows: Vec<Row> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|g| g != "report" && filter.is_none_or(|f| g.contains(f)) && measured_now(g))
        .map(|group| {
            let at = |who: &str| Some(estimates(&group, who)).filter(|p| fresh(p)).and_then(|p| mean_ns(&p));
            let throughput = throughput(&dir.join(&group).join("whale").join("new").join("benchmark.json"));
            Row { whale: at("whale"), baseline: at("baseline"), throughput, group }
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
        let per_second = |n: f64| n / (r.whale.unwrap_or(f64::NAN) / 1e9);
        let rate = match r.throughput {
            Some(Throughput::Elements(n)) if r.whale.is_some() => format!("{:.3e} elem/s", per_second(n)),
            Some(Throughput::Bytes(n)) if r.whale.is_some() => {
                format!("{:.2} GiB/s", per_second(n) / (1u64 << 30) as f64)
            }
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
         throughput is what the bench declares per second: elements (tokens; FLOPs for the FP8 GEMMs \
         and linear layer) or bytes; \
         `—` marks a bench with no baseline (an absolute measurement).\n",
    );
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn kernel_names_skip_launch_bounds() {
        let src = "extern \"C\" __global__ void a_f32(int x) {}\n\
                   extern \"C\" __global__ void __launch_bounds__(256, 1) b_mma(int y) {}";
        assert_eq!(super::kernel_names(src), ["a_f32", "b_mma"]);
    }
}
