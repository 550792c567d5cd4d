//! The CUDA kernels on the CPU: every module of the manifest compiled for host emulation
//! (kernels/emulate/cuda_host.h: a fiber per CUDA thread, real barriers, shared memory that
//! starts as garbage) into a shared library, and launched by name with a pointer to each
//! argument, as `cuLaunchKernel` launches the PTX. The GPU tests' bodies run on it in CI, against
//! the same CPU twins (tests/emulate.rs), so a kernel's indexing, tiling and edges are checked on
//! machines without a GPU; the hardware is the GPU run's to check. Each buffer reaches the kernel
//! as a copy that ends against an inaccessible page (inputs read-only): reading or writing past
//! it is a launch error naming the thread and block.
//!
//! Shared by the GPU test files of whale-kernels (tests/common) and, through `#[path]`, of the
//! crates above it, whose GPU tests run on the emulated driver the same way.

use std::ffi::{c_char, c_void, CStr, CString};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use whale_kernels::cuda::{manifest, source_hash, Gpu};

/// A launch's shape: `grid` blocks of `block` threads with `smem` bytes of dynamic shared memory.
#[derive(Debug, Clone, Copy)]
pub struct Launch {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub smem: u32,
}

impl Launch {
    pub fn new(grid: (u32, u32, u32), block: (u32, u32, u32), smem: u32) -> Launch {
        Launch { grid, block, smem }
    }
}

/// One kernel argument: a buffer (the kernel gets a pointer to its first element) or a value.
#[derive(Debug)]
pub struct Arg<'a> {
    kind: ArgKind,
    _borrow: PhantomData<&'a mut ()>,
}

#[derive(Debug)]
enum ArgKind {
    Buffer { ptr: *mut c_void, elem: usize, len: usize, writable: bool },
    Value { words: Box<[u64]>, size: usize },
}

impl<'a> Arg<'a> {
    /// A buffer the kernel reads (a `const T*` parameter).
    pub fn input<T>(s: &'a [T]) -> Arg<'a> {
        let kind = ArgKind::Buffer {
            ptr: s.as_ptr() as *mut c_void,
            elem: size_of::<T>(),
            len: size_of_val(s),
            writable: false,
        };
        Arg { kind, _borrow: PhantomData }
    }

    /// A buffer the kernel writes.
    pub fn output<T>(s: &'a mut [T]) -> Arg<'a> {
        let kind =
            ArgKind::Buffer { ptr: s.as_mut_ptr().cast(), elem: size_of::<T>(), len: size_of_val(s), writable: true };
        Arg { kind, _borrow: PhantomData }
    }

    /// A value parameter: a number, or a `repr(C)` struct passed by value (8-byte aligned at
    /// most, as the kernels' are).
    pub fn value<T: Copy>(v: T) -> Arg<'a> {
        assert!(align_of::<T>() <= 8, "a kernel value argument aligned to {} bytes", align_of::<T>());
        let mut words = vec![0u64; size_of::<T>().div_ceil(8)].into_boxed_slice();
        // SAFETY: the words hold size_of::<T>() bytes at an alignment of 8 >= T's; T is Copy, and
        // the kernel only reads the bytes back as its parameter's type, which the signature check
        // holds to T's size.
        unsafe { std::ptr::write_unaligned(words.as_mut_ptr() as *mut T, v) };
        Arg { kind: ArgKind::Value { words, size: size_of::<T>() }, _borrow: PhantomData }
    }
}

/// kernels/emulate/launch.h's `emu::Param`.
#[repr(C)]
struct Param {
    size: u32,
    pointee: u32,
}

type SignatureFn = unsafe extern "C" fn(*const c_char, *mut *const Param, *mut u32) -> i32;
type LaunchFn = unsafe extern "C" fn(
    *const c_char,
    *const u32,
    *const u32,
    u32,
    i32,
    *mut *mut c_void,
    *const i64,
    *const i32,
    *mut c_char,
    usize,
) -> i32;

#[derive(Debug)]
struct Module {
    name: &'static str,
    kernels: &'static [&'static str],
    lib: libloading::Library,
    path: PathBuf,
}

/// Every emulated module, loaded.
#[derive(Debug)]
pub struct Emulator {
    modules: Vec<Module>,
}

/// The emulation runs one kernel at a time (its state is global, as a GPU's would be).
static RUNNING: Mutex<()> = Mutex::new(());

/// The emulator, built once per test process, or `None` after saying why the test is skipped
/// (no g++ on this machine; with `WHALE_EMULATION=required`, as CI sets it, that fails the test
/// instead). A module that does not build fails the test with the compiler's message.
pub fn emulator(test: &str) -> Option<&'static Emulator> {
    static BUILT: OnceLock<Result<Emulator, String>> = OnceLock::new();
    if !have_gxx(test) {
        return None;
    }
    if !kernels_dir().join("emulate").is_dir() {
        eprintln!(
            "{test}: skipped, the kernel sources are not at {} (a test binary moved to another machine)",
            kernels_dir().display()
        );
        return None;
    }
    match BUILT.get_or_init(Emulator::build) {
        Ok(e) => Some(e),
        Err(e) => panic!("building the host emulation: {e}"),
    }
}

/// A [`Gpu`] on the emulated driver (kernels/emulate/driver.cpp, with cublas.cpp's GEMMs):
/// whale-kernels' launchers, as they are, over the host emulation of every module. Loaded into this process as `libcuda.so`,
/// the driver is what cudarc finds from then on, so a process that calls this has no real GPU:
/// tests/cuda.rs runs its GPU tests this way in a child process of their own
/// (`WHALE_EMULATED_GPU`). `None` where [`emulator`] is.
pub fn emulated_gpu(test: &str) -> Option<Gpu> {
    static DRIVER: OnceLock<Result<[libloading::Library; 2], String>> = OnceLock::new();
    let e = emulator(test)?;
    let driver = DRIVER.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("emulate");
        // RTLD_GLOBAL: the loader matches cudarc's later dlopen("libcuda.so") (and "libcublas.so")
        // to these libraries by their sonames.
        let open = |name: &str, soname: &str| -> Result<libloading::Library, String> {
            let source = kernels_dir().join(format!("emulate/{name}.cpp"));
            let text = std::fs::read_to_string(&source).map_err(|e| format!("{}: {e}", source.display()))?;
            let lib = build_library(name, &text, &out, &[&format!("-Wl,-soname,{soname}"), "-ldl"])?;
            // SAFETY: our library, whose initialisers only set up empty tables.
            let opened = unsafe { libloading::os::unix::Library::open(Some(&lib), libc_flags()) }
                .map_err(|err| format!("{}: {err}", lib.display()))?;
            Ok(opened.into())
        };
        let (cuda, cublas) = (open("driver", "libcuda.so")?, open("cublas", "libcublas.so")?);
        // SAFETY: the function is defined by driver.cpp with this signature.
        let add =
            unsafe { cuda.get::<unsafe extern "C" fn(*const c_char) -> i32>(b"whale_emulated_driver_add_module\0") }
                .map_err(|err| err.to_string())?;
        for m in &e.modules {
            let path = CString::new(m.path.to_string_lossy().as_bytes()).expect("a path");
            // SAFETY: a NUL-terminated path to a library built from launch.h.
            if unsafe { add(path.as_ptr()) } != 0 {
                return Err(format!("the emulated driver could not load {}", m.path.display()));
            }
        }
        Ok([cuda, cublas])
    });
    if let Err(err) = driver {
        panic!("{test}: building the emulated driver: {err}");
    }
    Some(Gpu::new(0).unwrap_or_else(|err| panic!("{test}: the emulated GPU does not open: {err}")))
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
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../kernels")
}

/// The g++ flags of every emulation build: C++20, warnings as errors, the host's CUDA headers,
/// no FMA contraction (`a * b + c` rounds twice, as `__fmul_rn` / `__fadd_rn` and a CPU twin do).
pub fn gxx_flags() -> Vec<String> {
    let dir = kernels_dir();
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
    .collect()
}

impl Emulator {
    fn build() -> Result<Emulator, String> {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("emulate");
        std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
        let modules: Vec<_> = manifest::MODULES.iter().collect();
        // Two compilers at a time: CI machines have two cores.
        let libs = std::thread::scope(|s| {
            let chunks: Vec<_> = modules.chunks(modules.len().div_ceil(2)).collect();
            let handles: Vec<_> = chunks
                .into_iter()
                .map(|chunk| s.spawn(|| chunk.iter().map(|m| compile(m, &out)).collect::<Vec<_>>()))
                .collect();
            handles.into_iter().flat_map(|h| h.join().expect("a compile thread")).collect::<Result<Vec<_>, _>>()
        })?;
        let mut loaded = Vec::new();
        for (m, path) in modules.into_iter().zip(libs) {
            // SAFETY: the library was just built from our kernel sources and launch.h, whose
            // static initialisers only fill constant tables.
            let lib = unsafe { libloading::Library::new(&path) }.map_err(|e| format!("{}: {e}", path.display()))?;
            loaded.push(Module { name: m.name, kernels: m.kernels, lib, path });
        }
        Ok(Emulator { modules: loaded })
    }

    /// Runs `kernel` on `args`, checked against its parameters first (count, sizes, and the
    /// element size of each buffer). An error names the kernel and what went wrong: a wrong
    /// argument, or the emulation's failure (a deadlock, a misaligned copy, a `__trap`).
    pub fn launch(&self, kernel: &str, cfg: Launch, args: &mut [Arg<'_>]) -> Result<(), String> {
        let module = self
            .modules
            .iter()
            .find(|m| m.kernels.contains(&kernel))
            .ok_or_else(|| format!("{kernel}: no emulated module has this kernel"))?;
        let name = CString::new(kernel).expect("a kernel name");
        // SAFETY: both symbols are defined by WHALE_EMULATE_MODULE with these signatures.
        let (signature, launch) = unsafe {
            (
                module.lib.get::<SignatureFn>(b"whale_emulate_signature\0").map_err(|e| e.to_string())?,
                module.lib.get::<LaunchFn>(b"whale_emulate_launch\0").map_err(|e| e.to_string())?,
            )
        };
        let (mut params, mut n) = (std::ptr::null::<Param>(), 0u32);
        // SAFETY: the name is NUL-terminated; the out-pointers are valid.
        if unsafe { signature(name.as_ptr(), &mut params, &mut n) } != 0 {
            return Err(format!("{kernel}: not in module {}", module.name));
        }
        // SAFETY: the module's table holds `n` parameters for this kernel, for the library's life.
        let params = unsafe { std::slice::from_raw_parts(params, n as usize) };
        if params.len() != args.len() {
            return Err(format!("{kernel}: {} arguments for {} parameters", args.len(), params.len()));
        }
        for (i, (p, a)) in params.iter().zip(args.iter()).enumerate() {
            let fits = match a.kind {
                ArgKind::Buffer { elem, .. } => {
                    p.pointee as usize == elem && p.size as usize == size_of::<*mut c_void>()
                }
                ArgKind::Value { size, .. } => p.pointee == 0 && p.size as usize == size,
            };
            if !fits {
                return Err(format!(
                    "{kernel}: argument {i} is {:?}, the parameter takes {} bytes{}",
                    a.kind,
                    p.size,
                    if p.pointee > 0 { format!(" (a pointer to {}-byte values)", p.pointee) } else { String::new() }
                ));
            }
        }
        let mut pointers: Vec<*mut c_void> = args
            .iter_mut()
            .map(|a| match &mut a.kind {
                ArgKind::Buffer { ptr, .. } => ptr as *mut *mut c_void as *mut c_void,
                ArgKind::Value { words, .. } => words.as_mut_ptr() as *mut c_void,
            })
            .collect();
        let bytes: Vec<i64> = args
            .iter()
            .map(|a| match a.kind {
                ArgKind::Buffer { len, .. } => len as i64,
                ArgKind::Value { .. } => -1,
            })
            .collect();
        let writable: Vec<i32> =
            args.iter().map(|a| i32::from(matches!(a.kind, ArgKind::Buffer { writable: true, .. }))).collect();
        let (grid, block) = ([cfg.grid.0, cfg.grid.1, cfg.grid.2], [cfg.block.0, cfg.block.1, cfg.block.2]);
        let mut error = vec![0 as c_char; 512];
        let _one_at_a_time = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the arguments match the kernel's parameters (checked above), and `bytes` holds
        // each buffer's size; the buffers outlive the call (the kernel works on guarded copies).
        let rc = unsafe {
            launch(
                name.as_ptr(),
                grid.as_ptr(),
                block.as_ptr(),
                cfg.smem,
                0,
                pointers.as_mut_ptr(),
                bytes.as_ptr(),
                writable.as_ptr(),
                error.as_mut_ptr(),
                error.len(),
            )
        };
        if rc != 0 {
            // SAFETY: launch.h NUL-terminates the message within the buffer.
            let msg = unsafe { CStr::from_ptr(error.as_ptr()) }.to_string_lossy().into_owned();
            return Err(format!("{kernel}: {msg}"));
        }
        Ok(())
    }
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
    let source = out.join(format!("{name}.cpp"));
    std::fs::write(&source, text).map_err(|e| format!("{}: {e}", source.display()))?;
    let lib = out.join(format!("lib{name}-{:016x}.so", sources_stamp(text)?));
    if lib.exists() {
        return Ok(lib);
    }
    let partial = out.join(format!("{name}.so.{}.partial", std::process::id()));
    let build = Command::new("g++")
        .args(gxx_flags())
        .args(["-fPIC", "-shared", "-fvisibility=hidden"])
        .args(extra)
        .arg("-o")
        .arg(&partial)
        .arg(&source)
        .output()
        .map_err(|e| format!("running g++: {e}"))?;
    if !build.status.success() {
        return Err(format!("g++ {}:\n{}", source.display(), String::from_utf8_lossy(&build.stderr)));
    }
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

/// A stamp of everything a module's library is built from: its translation unit, the kernel
/// sources (the manifest's stamp) and the emulation headers.
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
/// emulation's, the source stamp or `skip`) in a child process on the emulated driver, one at a
/// time; fails `test` with the child's output if any fails.
pub fn run_gpu_tests_on_the_emulated_driver(test: &str, only: &[&str], skip: &[&str]) {
    if emulator(test).is_none() {
        return;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut cmd = std::process::Command::new(exe);
    cmd.env("WHALE_EMULATED_GPU", "1").args([
        "--test-threads=1",
        "--skip",
        "in_emulation",
        "--skip",
        "the_embedded_ptx",
    ]);
    cmd.args(only);
    for s in skip {
        cmd.args(["--skip", s]);
    }
    let out = cmd.output().expect("running the test binary again");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    assert!(out.status.success(), "{test}: GPU tests failed on the emulated driver:\n{text}");
    assert!(!text.contains("skipped, no CUDA driver"), "{test}: the child found no emulated GPU:\n{text}");
    assert!(!text.contains("test result: ok. 0 passed"), "{test}: the child ran no GPU test:\n{text}");
}
