//! The CUDA kernels that have a host emulation (kernels/emulate/*.cpp): each driver includes its
//! kernel's `.cu` with `WHALE_HOST_EMULATION`, which swaps sm90.cuh's PTX for
//! kernels/emulate/sm90_host.h (a std::thread per CUDA thread, cp.async that lands when waited
//! for, wgmma computed from its descriptors), runs it and compares it with the product computed
//! directly. This checks a kernel's own logic (indexing, swizzle, pipeline, edges) on machines
//! without a GPU; the hardware is the GPU tests' to check (tests/cuda.rs).

use std::path::{Path, PathBuf};
use std::process::Command;

#[test]
fn kernels_run_in_host_emulation_match_the_direct_products() {
    const TEST: &str = "kernels_run_in_host_emulation_match_the_direct_products";
    if Command::new("g++").arg("--version").output().is_err() {
        eprintln!("{TEST}: skipped, no g++ on this machine to build the emulation");
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../kernels/emulate");
    let mut drivers: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "cpp"))
        .collect();
    drivers.sort();
    assert!(!drivers.is_empty(), "no drivers in {}", dir.display());
    for src in drivers {
        let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join(src.file_stem().expect("a file name"));
        let build = Command::new("g++")
            .args(["-std=c++20", "-O2", "-pthread", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas"])
            .arg("-DWHALE_HOST_EMULATION")
            .arg("-o")
            .arg(&exe)
            .arg(&src)
            .output()
            .expect("running g++");
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        assert!(build.status.success(), "g++ {}:\n{}", src.display(), text(&build.stderr));
        let run = Command::new(&exe).output().unwrap_or_else(|e| panic!("{}: {e}", exe.display()));
        println!("{} (host emulation):\n{}", src.display(), text(&run.stdout));
        assert!(run.status.success(), "{}:\n{}{}", src.display(), text(&run.stdout), text(&run.stderr));
    }
}
