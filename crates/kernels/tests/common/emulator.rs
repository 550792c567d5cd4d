//! The CUDA kernels on the CPU, behind an emulated CUDA driver: every module of the manifest
//! compiled for host emulation (kernels/emulate/cuda_host.h: a fiber per CUDA thread, real
//! barriers, shared memory that starts as garbage) into a shared library, and
//! kernels/emulate/driver.cpp (with cublas.cpp's GEMMs) loaded in the place of the GPU's driver.
//! whale-kernels' launchers then run unchanged on the CPU, so the GPU tests' bodies check, in CI,
//! every launcher and kernel against the same CPU twins as on a GPU: indexing, tiling, edges,
//! launch shapes and argument lists. The driver's memory is stricter than a GPU's (see driver.cpp):
//! overruns, freed buffers, writes to `const` inputs and reads of memory never written show. The
//! hardware is the GPU run's to check.
//!
//! Shared by the GPU test files of whale-kernels (tests/common) and, through `#[path]`, of the
//! crates above it, whose GPU tests run on the emulated driver the same way.

use std::collections::BTreeSet;
use std::ffi::{c_char, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use whale_kernels::cuda::{manifest, source_hash, Gpu};

/// Whether the emulation can be built here: g++ and the kernel sources are present. If not, says
/// why `test` is skipped (or fails it under `WHALE_EMULATION=required`, as CI sets it).
pub fn can_emulate(test: &str) -> bool {
    if !have_gxx(test) {
        return false;
    }
    if !kernels_dir().join("emulate").is_dir() {
        eprintln!(
            "{test}: skipped, the kernel sources are not at {} (a test binary moved to another machine)",
            kernels_dir().display()
        );
        return false;
    }
    true
}

/// The emulation library of every module (built once per test process, rebuilt only when the
/// sources change). A module that does not build fails the test with the compiler's message.
fn module_libraries() -> &'static [PathBuf] {
    static BUILT: OnceLock<Result<Vec<PathBuf>, String>> = OnceLock::new();
    match BUILT.get_or_init(build_modules) {
        Ok(libs) => libs,
        Err(e) => panic!("building the host emulation: {e}"),
    }
}

fn build_modules() -> Result<Vec<PathBuf>, String> {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("emulate");
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let modules: Vec<_> = manifest::MODULES.iter().collect();
    // Two compilers at a time: CI machines have two cores.
    std::thread::scope(|s| {
        let chunks: Vec<_> = modules.chunks(modules.len().div_ceil(2)).collect();
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| s.spawn(|| chunk.iter().map(|m| compile(m, &out)).collect::<Vec<_>>()))
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("a compile thread")).collect()
    })
}

/// The emulated driver and cuBLAS (`libcuda.so` and `libcublas.so` by their sonames), built once
/// per test process.
fn driver_libraries() -> Result<&'static [PathBuf; 2], String> {
    static BUILT: OnceLock<Result<[PathBuf; 2], String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("emulate");
        std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
        let build = |name: &str, soname: &str| {
            let source = kernels_dir().join(format!("emulate/{name}.cpp"));
            let text = std::fs::read_to_string(&source).map_err(|e| format!("{}: {e}", source.display()))?;
            build_library(name, &text, &out, &[&format!("-Wl,-soname,{soname}"), "-ldl"])
        };
        Ok([build("driver", "libcuda.so")?, build("cublas", "libcublas.so")?])
    });
    built.as_ref().map_err(Clone::clone)
}

/// The emulated driver and cuBLAS, once loaded.
static DRIVER: OnceLock<Result<[libloading::Library; 2], String>> = OnceLock::new();

/// A [`Gpu`] on the emulated driver (kernels/emulate/driver.cpp, with cublas.cpp's GEMMs):
/// whale-kernels' launchers, as they are, over the host emulation of every module. Loaded into
/// this process as `libcuda.so`, the driver is what cudarc finds from then on, so a process that
/// calls this has no real GPU: the GPU test binaries run their GPU tests this way in a child
/// process of their own ([`run_gpu_tests_on_the_emulated_driver`], `WHALE_EMULATED_GPU`). `None`
/// where [`can_emulate`] says no.
pub fn emulated_gpu(test: &str) -> Option<Gpu> {
    if !can_emulate(test) {
        return None;
    }
    let driver = DRIVER.get_or_init(|| {
        // RTLD_GLOBAL: the loader matches cudarc's later dlopen("libcuda.so") (and "libcublas.so")
        // to these libraries by their sonames.
        let open = |lib: &PathBuf| -> Result<libloading::Library, String> {
            // SAFETY: our library, whose initialisers only set up empty tables.
            let opened = unsafe { libloading::os::unix::Library::open(Some(lib), libc_flags()) }
                .map_err(|err| format!("{}: {err}", lib.display()))?;
            Ok(opened.into())
        };
        let [driver, cublas] = driver_libraries()?;
        let (cuda, cublas) = (open(driver)?, open(cublas)?);
        // SAFETY: the function is defined by driver.cpp with this signature.
        let add =
            unsafe { cuda.get::<unsafe extern "C" fn(*const c_char) -> i32>(b"whale_emulated_driver_add_module\0") }
                .map_err(|err| err.to_string())?;
        for lib in module_libraries() {
            let path = CString::new(lib.to_string_lossy().as_bytes()).expect("a path");
            // SAFETY: a NUL-terminated path to a library built from launch.h.
            if unsafe { add(path.as_ptr()) } != 0 {
                return Err(format!("the emulated driver could not load {}", lib.display()));
            }
        }
        Ok([cuda, cublas])
    });
    if let Err(err) = driver {
        panic!("{test}: building the emulated driver: {err}");
    }
    Some(Gpu::new(0).unwrap_or_else(|err| panic!("{test}: the emulated GPU does not open: {err}")))
}

/// The environment that puts another program (a binary of this workspace, run as a child) on the
/// emulated driver: `LD_LIBRARY_PATH` leads to a folder where the driver and cuBLAS are
/// `libcuda.so` and `libcublas.so`, so cudarc's `dlopen` finds them, and
/// `WHALE_EMULATED_MODULES` names every module's library for the driver's `cuInit` to register.
/// `None` where [`can_emulate`] says no.
pub fn emulated_driver_env(test: &str) -> Option<[(String, String); 2]> {
    if !can_emulate(test) {
        return None;
    }
    let [driver, cublas] =
        driver_libraries().unwrap_or_else(|err| panic!("{test}: building the emulated driver: {err}"));
    // One folder per build of the two (their names carry the stamps of their sources).
    let stem = |p: &Path| p.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
    let folder = driver.with_file_name(format!("ld-{}-{}", stem(driver), stem(cublas)));
    std::fs::create_dir_all(&folder).unwrap_or_else(|e| panic!("{test}: {}: {e}", folder.display()));
    // Folders of older builds, whose libraries build_library has removed, go.
    let out = folder.parent().expect("the emulation's folder");
    for entry in std::fs::read_dir(out).unwrap_or_else(|e| panic!("{test}: {}: {e}", out.display())).flatten() {
        if entry.file_name().to_string_lossy().starts_with("ld-") && entry.path() != folder {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    for (name, lib) in [("libcuda.so", driver), ("libcublas.so", cublas)] {
        match std::os::unix::fs::symlink(lib, folder.join(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => panic!("{test}: {}: {e}", folder.display()),
            _ => {}
        }
    }
    let modules: Vec<String> = module_libraries().iter().map(|m| m.to_string_lossy().into_owned()).collect();
    Some([
        ("LD_LIBRARY_PATH".to_string(), folder.to_string_lossy().into_owned()),
        ("WHALE_EMULATED_MODULES".to_string(), modules.join(":")),
    ])
}

/// The emulated driver's newest complaint (what a failed call or launch said on stderr), or an
/// empty string; `None` outside a process on the emulated driver.
pub fn emulated_driver_last_error() -> Option<String> {
    let driver = DRIVER.get()?.as_ref().ok()?;
    // SAFETY: defined by driver.cpp with this signature.
    let last =
        unsafe { driver[0].get::<unsafe extern "C" fn(*mut c_char, usize)>(b"whale_emulated_driver_last_error\0") }
            .ok()?;
    let mut text = vec![0 as c_char; 1024];
    // SAFETY: the driver writes at most `len` bytes, NUL included.
    unsafe { last(text.as_mut_ptr(), text.len()) };
    // SAFETY: NUL-terminated above.
    Some(unsafe { std::ffi::CStr::from_ptr(text.as_ptr()) }.to_string_lossy().into_owned())
}

/// RTLD_NOW | RTLD_GLOBAL.
fn libc_flags() -> std::ffi::c_int {
    libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL
}

/// Whether g++ is here to build the emulation; if not, says that `test` is skipped, or fails it
/// under `WHALE_EMULATION=required` (CI).
pub fn have_gxx(test: &str) -> bool {
    if Command::new("g++").arg("--version").output().is_ok() {
        return true;
    }
    assert!(
        std::env::var("WHALE_EMULATION").as_deref() != Ok("required"),
        "{test}: WHALE_EMULATION=required, but there is no g++ on this machine to build the emulation"
    );
    eprintln!("{test}: skipped, no g++ on this machine to build the emulation");
    false
}

/// The repository's kernels/ directory.
pub fn kernels_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../kernels");
    // One spelling for every crate that includes this file: the paths go into the libraries'
    // stamps, and test binaries that spelled them apart rebuilt every library in turn.
    dir.canonicalize().unwrap_or(dir)
}

/// The g++ flags of every emulation build: C++20, warnings as errors, the host's CUDA headers,
/// no FMA contraction (`a * b + c` rounds twice, as `__fmul_rn` / `__fadd_rn` and a CPU twin do).
/// Where the CPU has FMA instructions, `fmaf` (the kernels' explicit fused multiply-adds) is one
/// (the same single rounding as glibc's call, which had been a tenth of the emulation's time).
pub fn gxx_flags() -> Vec<String> {
    let dir = kernels_dir();
    #[cfg(target_arch = "x86_64")]
    let fma = std::is_x86_feature_detected!("fma").then(|| "-mfma".to_string());
    #[cfg(not(target_arch = "x86_64"))]
    let fma: Option<String> = None;
    [
        "-std=c++20",
        "-O2",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-Wno-unknown-pragmas",
        // Kernels read shared memory as float4 and float alike, as CUDA code does.
        "-fno-strict-aliasing",
        "-ffp-contract=off",
        "-DWHALE_HOST_EMULATION",
    ]
    .map(String::from)
    .into_iter()
    .chain([format!("-I{}", dir.display()), format!("-I{}", dir.join("emulate/include").display())])
    .chain(fma)
    .collect()
}

/// Writes module `m`'s translation unit (its `.cu`, then launch.h's table of its kernels) and
/// builds it into a shared library; returns the library's path.
fn compile(m: &whale_kernels::cuda::PtxModule, out: &Path) -> Result<PathBuf, String> {
    let table: String = m.kernels.iter().map(|k| format!(" WHALE_KERNEL({k})")).collect();
    let text = format!(
        "// Generated by crates/kernels/tests/common/emulator.rs.\n#include \"{}\"\n#include \"emulate/launch.h\"\nWHALE_EMULATE_MODULE({table})\n",
        kernels_dir().join(format!("{}.cu", m.name)).display()
    );
    build_library(m.name, &text, out, &["-include", "emulate/cuda_host.h"])
}

/// Builds the translation unit `text` into `out`/lib`name`-`stamp`.so with the emulation's flags
/// and `extra` ones, unless a build of the same sources is there; older builds of `name` go.
fn build_library(name: &str, text: &str, out: &Path, extra: &[&str]) -> Result<PathBuf, String> {
    let flags: Vec<String> = gxx_flags().into_iter().chain(extra.iter().map(|f| f.to_string())).collect();
    let lib = out.join(format!("lib{name}-{:016x}.so", sources_stamp(&format!("{text}\n{}", flags.join(" ")))?));
    if lib.exists() {
        return Ok(lib);
    }
    // This process's own source and partial library: another test process building the same
    // module at the same time must not rewrite a file this g++ reads.
    let source = out.join(format!("{name}.{}.cpp", std::process::id()));
    std::fs::write(&source, text).map_err(|e| format!("{}: {e}", source.display()))?;
    let partial = out.join(format!("{name}.so.{}.partial", std::process::id()));
    let build = Command::new("g++")
        .args(&flags)
        .args(["-fPIC", "-shared", "-fvisibility=hidden"])
        .arg("-o")
        .arg(&partial)
        .arg(&source)
        .output()
        .map_err(|e| format!("running g++: {e}"))?;
    if !build.status.success() {
        return Err(format!("g++ {}:\n{}", source.display(), String::from_utf8_lossy(&build.stderr)));
    }
    let _ = std::fs::remove_file(&source); // kept above, for a failed build's message
    std::fs::rename(&partial, &lib).map_err(|e| format!("{}: {e}", lib.display()))?;
    // Builds of older sources go (a process still holding one keeps its mapping).
    let prefix = format!("lib{name}-");
    for entry in std::fs::read_dir(out).map_err(|e| format!("{}: {e}", out.display()))?.flatten() {
        let stale = entry.file_name().to_str().is_some_and(|n| n.starts_with(&prefix) && entry.path() != lib);
        if stale {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(lib)
}

/// A stamp of everything a module's library is built from: its translation unit (with the
/// flags), the kernel sources (the manifest's stamp) and the emulation headers.
fn sources_stamp(unit: &str) -> Result<u64, String> {
    let dir = kernels_dir();
    let mut h = source_hash(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut headers = Vec::new();
    for sub in ["emulate", "emulate/include"] {
        let d = dir.join(sub);
        for entry in std::fs::read_dir(&d).map_err(|e| format!("{}: {e}", d.display()))? {
            let path = entry.map_err(|e| e.to_string())?.path();
            if path.extension().is_some_and(|x| x == "h") {
                headers.push(path);
            }
        }
    }
    headers.sort();
    let mut eat = |bytes: &[u8]| {
        for &b in bytes.iter().chain(&[0u8]) {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    eat(unit.as_bytes());
    for path in headers {
        eat(path.to_string_lossy().as_bytes());
        eat(&std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?);
    }
    Ok(h)
}

/// Whether this process's GPU tests run on the emulated driver.
pub fn on_the_emulated_driver() -> bool {
    std::env::var_os("WHALE_EMULATED_GPU").is_some()
}

/// Runs this test binary's GPU tests (those matching `only`, or all when it is empty; never the
/// emulation's, the source stamp or `skip`) on the emulated driver, each in a child process of its
/// own, as many at a time as the machine has cores; fails `test` with the children's output if any
/// fails. Returns the kernels the children launched (`None` where [`can_emulate`] says no).
pub fn run_gpu_tests_on_the_emulated_driver(test: &str, only: &[&str], skip: &[&str]) -> Option<BTreeSet<String>> {
    run_gpu_tests_on_the_emulated_driver_with(test, only, skip, &[])
}

/// [`run_gpu_tests_on_the_emulated_driver`], with `env` set in the children (the driver's modes:
/// `WHALE_EMULATED_EAGER_COPIES`, kernels/emulate/driver.cpp).
pub fn run_gpu_tests_on_the_emulated_driver_with(
    test: &str,
    only: &[&str],
    skip: &[&str],
    env: &[(&str, &str)],
) -> Option<BTreeSet<String>> {
    if !can_emulate(test) {
        return None;
    }
    // Built here, once, before the children load them (they would each build every library,
    // all at once, on a cold cache).
    module_libraries();
    driver_libraries().unwrap_or_else(|err| panic!("{test}: building the emulated driver: {err}"));
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("emulate");
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut list = Command::new(&exe);
    list.args(["--list", "--format=terse", "--skip", "in_emulation", "--skip", "the_embedded_ptx"]).args(only);
    for s in skip {
        list.args(["--skip", s]);
    }
    let listed = list.output().expect("listing the test binary's tests");
    assert!(listed.status.success(), "{test}: listing the tests: {}", String::from_utf8_lossy(&listed.stderr));
    let names: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(String::from)
        .collect();
    assert!(!names.is_empty(), "{test}: no GPU test to run on the emulated driver");

    // One child per test: the children share the cores, the slowest test sets the time.
    let next = std::sync::atomic::AtomicUsize::new(0);
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(names.len());
    let run_one = |name: &str| {
        let log = out.join(format!("launches-{}-{name}.txt", std::process::id()));
        let _ = std::fs::remove_file(&log);
        let run = Command::new(&exe)
            .env("WHALE_EMULATED_GPU", "1")
            .env("WHALE_EMULATED_LAUNCHES", &log)
            .envs(env.iter().copied())
            .args(["--test-threads=1", "--exact", name])
            .output()
            .expect("running the test binary again");
        let text = format!("{}{}", String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
        let launched: Vec<String> =
            std::fs::read_to_string(&log).unwrap_or_default().lines().map(String::from).collect();
        let _ = std::fs::remove_file(&log);
        (run.status.success(), text, launched)
    };
    let mut runs: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(name) = names.get(i) else { break mine };
                        mine.push((i, run_one(name)));
                    }
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("a child's runner")).collect()
    });
    runs.sort_by_key(|(i, _)| *i);
    let mut launched = BTreeSet::new();
    for (i, (ok, text, kernels)) in runs {
        let name = &names[i];
        println!("{name} on the emulated driver:\n{text}");
        assert!(ok, "{test}: {name} failed on the emulated driver:\n{text}");
        let no_gpu = text.contains("skipped, no CUDA driver") || text.contains("the CPU stands in");
        assert!(!no_gpu, "{test}: {name}'s child found no emulated GPU:\n{text}");
        assert!(text.contains("test result: ok. 1 passed"), "{test}: the child did not run {name}:\n{text}");
        launched.extend(kernels);
    }
    Some(launched)
}
