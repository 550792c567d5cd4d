//! CUDA launchers: the kernels of `kernels/*.cu`, compiled to PTX by `cargo xtask
//! build-kernels` and embedded here ([`manifest`]), each beside its CPU twin in [`crate::cpu`].
//!
//! [`Gpu::new`] opens a device through the CUDA driver, loaded at run time: on a machine without
//! CUDA it returns [`GpuError::NoDriver`] instead of panicking (cudarc panics when the driver
//! library is missing, so `is_culib_present` is checked first). The launchers here take and return
//! host slices (copy in, launch, copy out), which is what tests and the GPU check need; a device
//! tensor backend keeps its buffers on the GPU and launches the same kernels.

mod attention;
mod blas;
mod dispatch;
mod fp8;
mod fp8_gemm;
pub mod manifest;
mod router;
mod rows;
mod tensor_ops;

pub use attention::AttnGrads;
pub use blas::{BlasFloat, GemmShape};
/// The CUDA bindings these launchers use, for crates that hold their buffers.
pub use cudarc;
pub use dispatch::DispatchIndices;
pub use fp8_gemm::{Fp8GemmKernel, Fp8Operand, Fp8View, WGMMA_SHARED_BYTES};
pub use tensor_ops::{BinaryOp, MidReduction, Strided, StridedElement, UnaryOp, MAX_RANK};

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;

use crate::cpu::adamw::AdamWStep;

/// One `.cu` file's PTX for the two targets and the kernels it defines.
#[derive(Debug, Clone, Copy)]
pub struct PtxModule {
    pub name: &'static str,
    pub kernels: &'static [&'static str],
    /// `sm_90` is built for compute_90a (it uses wgmma, `// uses: wgmma` in its source), which
    /// only an sm_90 device loads; others load `sm_80`, whose kernels trap and are never chosen.
    pub sm_90a: bool,
    /// For sm_90 (Hopper) and newer.
    pub sm_90: &'static str,
    /// For sm_89 (Ada) and newer below sm_90, in a module whose kernels use Ada's FP8 tensor
    /// cores (`// uses: sm_89` in its source); other modules load `sm_80` there.
    pub sm_89: Option<&'static str>,
    /// For sm_80 (Ampere) and newer.
    pub sm_80: &'static str,
}

/// How `cargo xtask build-kernels` compiles each `kernels/*.cu` to PTX. It is part of
/// [`source_hash`], so changing it makes the embedded PTX stale as a source change does.
pub mod ptx_recipe {
    /// The CUDA release of the nvcc used (newer ones emit PTX its driver cannot load).
    pub const CUDA_RELEASE: &str = "13.0";
    /// nvcc's flags, before `-I<kernels>`, `-arch=...` and the output.
    pub const NVCC_FLAGS: [&str; 3] = ["-ptx", "-O3", "-std=c++17"];
    /// (file suffix, nvcc `-arch`, ptxas `-arch` to validate with) per embedded target.
    pub const TARGETS: [(&str, &str, &str); 2] = [("sm_90", "compute_90", "sm_90"), ("sm_80", "compute_80", "sm_80")];
    /// A source holding this line uses wgmma: its `sm_90` PTX is built for [`WGMMA_ARCH`].
    pub const WGMMA_MARK: &str = "// uses: wgmma";
    /// (nvcc `-arch`, ptxas `-arch`) of a wgmma module's `sm_90` PTX.
    pub const WGMMA_ARCH: (&str, &str) = ("compute_90a", "sm_90a");
    /// A source holding this line uses FP8 `mma.sync` (sm_89+): it is built for [`ADA_TARGET`]
    /// too.
    pub const ADA_MARK: &str = "// uses: sm_89";
    /// (file suffix, nvcc `-arch`, ptxas `-arch`) of the extra target of an [`ADA_MARK`] module.
    pub const ADA_TARGET: (&str, &str, &str) = ("sm_89", "compute_89", "sm_89");
}

/// FNV-1a (64-bit) over the build recipe ([`ptx_recipe`]) and then the `.cu` and `.cuh` files of
/// `dir` in name order (name, 0, contents, 0): the stamp the manifest records, so a plain `cargo
/// test` notices PTX older than its sources or its recipe.
pub fn source_hash(dir: &Path) -> std::io::Result<u64> {
    use ptx_recipe::*;
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu" || x == "cuh"))
        .collect();
    files.sort();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes.iter().chain(&[0u8]) {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    eat(CUDA_RELEASE.as_bytes());
    NVCC_FLAGS.iter().for_each(|f| eat(f.as_bytes()));
    TARGETS.iter().flat_map(|&(a, b, c)| [a, b, c]).for_each(|t| eat(t.as_bytes()));
    [WGMMA_MARK, WGMMA_ARCH.0, WGMMA_ARCH.1].iter().for_each(|t| eat(t.as_bytes()));
    [ADA_MARK, ADA_TARGET.0, ADA_TARGET.1, ADA_TARGET.2].iter().for_each(|t| eat(t.as_bytes()));
    for f in files {
        eat(f.file_name().expect("a file").to_string_lossy().as_bytes());
        eat(&std::fs::read(&f)?);
    }
    Ok(h)
}

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no CUDA driver library on this machine")]
    NoDriver,
    #[error("GPU {ordinal} does not exist ({count} visible)")]
    NoDevice { ordinal: usize, count: usize },
    #[error("CUDA {what}: {msg}")]
    Cuda { what: String, msg: String },
    #[error("{0}")]
    Shape(String),
}

/// A buffer of `have` values where a launch needs `n`: an error naming `what` (buffers may be
/// longer than a launch needs, never shorter).
fn need(what: &str, have: usize, n: usize) -> Result<()> {
    if have < n {
        return Err(GpuError::Shape(format!("{what}: a buffer of {have} values where {n} are needed")));
    }
    Ok(())
}

fn cuda(what: &str) -> impl Fn(cudarc::driver::DriverError) -> GpuError + '_ {
    move |e| GpuError::Cuda { what: what.to_string(), msg: format!("{e:?}") }
}

pub type Result<T> = std::result::Result<T, GpuError>;

/// The GPUs this process can use: 0 without a CUDA driver (checked before touching it).
pub fn device_count() -> usize {
    // SAFETY: only probes whether the driver library can be loaded.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return 0;
    }
    CudaContext::device_count().map(|n| n.max(0) as usize).unwrap_or(0)
}

/// One GPU with every kernel module loaded.
#[derive(Debug)]
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    functions: HashMap<&'static str, CudaFunction>,
    /// Architecture-specific modules the driver would not load, with its reason; see
    /// [`Gpu::unloaded_modules`].
    unloaded: Vec<String>,
    blas: OnceLock<cudarc::cublas::CudaBlas>,
    /// Compute capability (major, minor): 9.0 is Hopper.
    pub arch: (u32, u32),
    /// Which GPU of the machine.
    pub ordinal: usize,
    /// The attention kernels launched, as `AttentionKernels as u8`; see
    /// [`Gpu::set_attention_kernels`].
    attention: std::sync::atomic::AtomicU8,
    /// The FP8 GEMM kernel preferred, as `Fp8GemmKernel as u8`; see [`Gpu::set_fp8_gemm_kernel`].
    fp8_gemm: std::sync::atomic::AtomicU8,
    /// Streaming multiprocessors (132 on an H200).
    pub multiprocessors: usize,
}

/// The attention kernels a [`Gpu`] launches: one block per query (or key) row ("simple"), or
/// flash-style tiles in shared memory (kernels/attention.cu; the simple ones where a shape does
/// not fit). Every set is checked against the CPU twin by the GPU tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKernels {
    Simple = 0,
    /// Tiled forward, simple backward.
    TiledForward = 1,
    /// Tiled both ways: the default (the backward 31 times the simple one's rate on an H200 at
    /// 16 heads x 2048 tokens x 128; scripts/reports/).
    Tiled = 2,
}

const THREADS: u32 = 256;

const MAX_BLOCKS: u32 = 65_535;

/// The most elements a grid-stride kernel takes: they index with 32-bit `unsigned`, and
/// `i + gridDim.x * blockDim.x` must not wrap past it.
pub const MAX_GRID_ELEMENTS: usize = (u32::MAX - MAX_BLOCKS * THREADS) as usize;

/// A grid-stride launch over `n` elements; more than [`MAX_GRID_ELEMENTS`] is an error (a
/// count cast to 32 bits would silently cover only part of the tensor).
fn grid_for(n: usize) -> Result<LaunchConfig> {
    if n > MAX_GRID_ELEMENTS {
        return Err(GpuError::Shape(format!(
            "{n} elements: the CUDA kernels index with 32 bits, at most {MAX_GRID_ELEMENTS} per launch"
        )));
    }
    let blocks = (n as u32).div_ceil(THREADS).clamp(1, MAX_BLOCKS);
    Ok(LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 })
}

/// One block per row of `width` values, reducing in shared memory: `THREADS` threads, or for a
/// narrower row the least power of two (at least a warp) that gives each value its own thread.
/// The kernels stride their rows by `blockDim.x` and reduce in a tree, so the narrower block sums
/// the same products in the same order (the wide one's extra threads only add zeros first) and
/// skips the idle threads' rounds of barriers.
/// More than 2^31 - 1 rows (the grid's x limit) or a row wider than 32 bits index is an error,
/// never a count cast short that would cover only part of the tensor.
fn rows_config(rows: usize, width: usize) -> Result<LaunchConfig> {
    count32("rows", rows)?;
    count32("row width", width)?;
    let threads = (width.next_power_of_two() as u32).clamp(32, THREADS);
    Ok(LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 4 * threads })
}

/// `n` as a launch count (a grid dimension, or a length a kernel indexes with `int`): an error
/// above `i32::MAX`.
fn count32(what: &str, n: usize) -> Result<u32> {
    if n > i32::MAX as usize {
        return Err(GpuError::Shape(format!("{n} {what}: a CUDA launch takes at most {} here", i32::MAX)));
    }
    Ok(n as u32)
}

impl Gpu {
    /// Opens GPU `ordinal` and loads the PTX for its architecture.
    pub fn new(ordinal: usize) -> Result<Gpu> {
        // SAFETY: only probes whether the driver library can be loaded.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(GpuError::NoDriver);
        }
        let count = device_count();
        if ordinal >= count {
            return Err(GpuError::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal).map_err(cuda("opening the device"))?;
        let (major, minor) = ctx.compute_capability().map_err(cuda("reading the compute capability"))?;
        let stream = ctx.default_stream();
        let sms = ctx.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT);
        let multiprocessors = sms.map_err(cuda("reading the multiprocessor count"))?.max(1) as usize;
        let (mut functions, mut unloaded) = (HashMap::new(), Vec::new());
        for m in manifest::MODULES {
            let hopper = if m.sm_90a { (major, minor) == (9, 0) } else { major >= 9 };
            let ptx = match m.sm_89 {
                _ if hopper => m.sm_90,
                Some(ada) if (major, minor) >= (8, 9) => ada,
                _ => m.sm_80,
            };
            let module = match ctx.load_module(Ptx::from_src(ptx)) {
                Ok(module) => module,
                // An architecture-specific module only holds kernels that are never the only
                // choice (the launchers fall back): a driver that will not load it costs those
                // kernels, not the GPU.
                Err(e) if m.sm_90a && hopper => {
                    unloaded.push(format!("{}: {e}", m.name));
                    continue;
                }
                Err(e) => return Err(cuda(m.name)(e)),
            };
            for &k in m.kernels {
                functions.insert(k, module.load_function(k).map_err(cuda(k))?);
            }
        }
        let gpu = Gpu {
            ctx,
            stream,
            functions,
            unloaded,
            blas: OnceLock::new(),
            arch: (major as u32, minor as u32),
            ordinal,
            attention: (AttentionKernels::Tiled as u8).into(),
            fp8_gemm: (Fp8GemmKernel::TensorCore as u8).into(),
            multiprocessors,
        };
        gpu.allow_shared_memory()?;
        Ok(gpu)
    }

    /// Chooses the attention kernels of this GPU's later launches.
    pub fn set_attention_kernels(&self, kernels: AttentionKernels) {
        self.attention.store(kernels as u8, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn attention_kernels(&self) -> AttentionKernels {
        match self.attention.load(std::sync::atomic::Ordering::Relaxed) {
            0 => AttentionKernels::Simple,
            1 => AttentionKernels::TiledForward,
            _ => AttentionKernels::Tiled,
        }
    }

    /// The architecture-specific modules (compute_90a) this GPU's driver would not load, each
    /// with the driver's reason: their kernels are not offered (`runs_fp8_gemm` says no).
    pub fn unloaded_modules(&self) -> &[String] {
        &self.unloaded
    }

    /// Whether kernel `name` was loaded.
    pub fn has_kernel(&self, name: &str) -> bool {
        self.functions.contains_key(name)
    }

    fn function(&self, name: &str) -> &CudaFunction {
        self.functions.get(name).unwrap_or_else(|| panic!("kernel `{name}` is not in the manifest"))
    }

    /// Allows each kernel that takes more than the default 48 KB of dynamic shared memory (the
    /// tiled attention kernels, the wgmma GEMM) what it takes, once, where this GPU has it (the
    /// launchers fall back from an instance that does not fit: `tiled_for`, `runs_fp8_gemm`).
    fn allow_shared_memory(&self) -> Result<()> {
        let attr = cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN;
        let most = self.ctx.attribute(attr).map_err(cuda("reading the shared memory per block"))?.max(0) as usize;
        let dynamic = cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
        self.ctx.bind_to_thread().map_err(cuda("binding the context"))?;
        let wgmma = (Fp8GemmKernel::Wgmma.entry(), WGMMA_SHARED_BYTES);
        for (name, bytes) in attention::SHARED_MEMORY.into_iter().chain([wgmma]) {
            if let Some(f) = self.functions.get(name).filter(|_| bytes <= most) {
                f.set_attribute(dynamic, bytes as i32).map_err(cuda(name))?;
            }
        }
        Ok(())
    }

    fn upload<T: cudarc::driver::DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream.clone_htod(host).map_err(cuda("copy to the GPU"))
    }

    /// [`Gpu::upload`], with one zero for an empty slice (the driver allocates nothing empty;
    /// kernels never read a zero-width buffer).
    fn upload_nonempty<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        host: &[T],
    ) -> Result<CudaSlice<T>> {
        if host.is_empty() {
            self.zeros(1)
        } else {
            self.upload(host)
        }
    }

    fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros::<T>(n.max(1)).map_err(cuda("allocating"))
    }

    fn download<T: cudarc::driver::DeviceRepr + Default + Clone>(
        &self,
        dev: &CudaSlice<T>,
        n: usize,
    ) -> Result<Vec<T>> {
        let mut v = self.stream.clone_dtoh(dev).map_err(cuda("copy from the GPU"))?;
        v.truncate(n);
        Ok(v)
    }

    fn binary(&self, kernel: &str, a: &[f32], b: &[f32]) -> Result<Vec<f32>> {
        if a.len() != b.len() {
            return Err(GpuError::Shape(format!("{kernel}: {} and {} elements", a.len(), b.len())));
        }
        let n = a.len();
        let (da, db, mut out) = (self.upload(a)?, self.upload(b)?, self.zeros::<f32>(n)?);
        let n32 = n as u32;
        let mut l = self.stream.launch_builder(self.function(kernel));
        l.arg(&da).arg(&db).arg(&mut out).arg(&n32);
        // SAFETY: the kernel reads `n` floats of `da` and `db` and writes `n` of `out`, all
        // allocated with at least that many.
        unsafe { l.launch(grid_for(n)?) }.map_err(cuda(kernel))?;
        self.download(&out, n)
    }

    /// `a + b`.
    pub fn add(&self, a: &[f32], b: &[f32]) -> Result<Vec<f32>> {
        self.binary("add_f32", a, b)
    }

    /// `a * b`.
    pub fn mul(&self, a: &[f32], b: &[f32]) -> Result<Vec<f32>> {
        self.binary("mul_f32", a, b)
    }

    /// `silu(gate) * up` (twin: `cpu::swiglu::swiglu_forward`).
    pub fn swiglu_forward(&self, gate: &[f32], up: &[f32]) -> Result<Vec<f32>> {
        if gate.len() != up.len() {
            return Err(GpuError::Shape(format!("swiglu: {} and {} elements", gate.len(), up.len())));
        }
        let n = gate.len();
        let (dg, du, mut out) = (self.upload_nonempty(gate)?, self.upload_nonempty(up)?, self.zeros::<f32>(n)?);
        self.swiglu_forward_dev(&dg.slice(..), &du.slice(..), &mut out, n)?;
        self.download(&out, n)
    }

    /// RMSNorm of each row of `x` (`[rows, dim]`): `(y, rstd)` (twin: `cpu::rmsnorm::rmsnorm_forward`).
    pub fn rmsnorm_forward(&self, x: &[f32], w: &[f32], dim: usize, eps: f32) -> Result<(Vec<f32>, Vec<f32>)> {
        if dim == 0 || x.len() % dim != 0 || w.len() != dim {
            return Err(GpuError::Shape(format!("rmsnorm: {} values, weight {}, dim {dim}", x.len(), w.len())));
        }
        let rows = x.len() / dim;
        let (dx, dw) = (self.upload_nonempty(x)?, self.upload(w)?);
        let (mut y, mut rstd) = (self.zeros::<f32>(x.len())?, self.zeros::<f32>(rows)?);
        self.rmsnorm_forward_dev((&dx.slice(..), &dw.slice(..)), (&mut y, &mut rstd), (rows, dim, eps))?;
        Ok((self.download(&y, x.len())?, self.download(&rstd, rows)?))
    }

    /// Softmax of each row (twin: `cpu::softmax::softmax_forward`).
    pub fn softmax_forward(&self, x: &[f32], dim: usize) -> Result<Vec<f32>> {
        if dim == 0 || x.len() % dim != 0 {
            return Err(GpuError::Shape(format!("softmax: {} values, dim {dim}", x.len())));
        }
        let (dx, mut y) = (self.upload_nonempty(x)?, self.zeros::<f32>(x.len())?);
        self.softmax_forward_dev(&dx.slice(..), &mut y, (x.len() / dim, dim))?;
        self.download(&y, x.len())
    }

    /// SwiGLU backward: `(dgate, dup)` (twin: `cpu::swiglu::swiglu_backward`).
    pub fn swiglu_backward(&self, gate: &[f32], up: &[f32], dout: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let n = gate.len();
        if up.len() != n || dout.len() != n {
            return Err(GpuError::Shape("swiglu backward: buffers differ in length".into()));
        }
        let up_ = |x: &[f32]| self.upload_nonempty(x);
        let (dg, du, dd) = (up_(gate)?, up_(up)?, up_(dout)?);
        let (mut dgate, mut dup) = (self.zeros::<f32>(n)?, self.zeros::<f32>(n)?);
        self.swiglu_backward_dev((&dg.slice(..), &du.slice(..), &dd.slice(..)), &mut dgate, &mut dup, n)?;
        Ok((self.download(&dgate, n)?, self.download(&dup, n)?))
    }

    /// RMSNorm backward: `(dx, dweight)` from the forward's `rstd` (twin:
    /// `cpu::rmsnorm::rmsnorm_backward`).
    pub fn rmsnorm_backward(&self, x: &[f32], w: &[f32], rstd: &[f32], dy: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let (dim, rows) = (w.len(), rstd.len());
        if x.len() != rows * dim || dy.len() != x.len() {
            return Err(GpuError::Shape(format!("rmsnorm backward: {} values for [{rows}, {dim}]", x.len())));
        }
        let up = |v: &[f32]| self.upload_nonempty(v);
        let (dx_in, dw_in, dr, ddy) = (up(x)?, up(w)?, up(rstd)?, up(dy)?);
        let (mut dx, mut dw) = (self.zeros::<f32>(x.len())?, self.zeros::<f32>(dim)?);
        let inputs = (&dx_in.slice(..), &dw_in.slice(..), &dr.slice(..), &ddy.slice(..));
        self.rmsnorm_backward_dev(inputs, (&mut dx, &mut dw), (rows, dim))?;
        Ok((self.download(&dx, x.len())?, self.download(&dw, dim)?))
    }

    /// Softmax backward per row from the forward's output (twin: `cpu::softmax::softmax_backward`).
    pub fn softmax_backward(&self, y: &[f32], dy: &[f32], dim: usize) -> Result<Vec<f32>> {
        if dim == 0 || y.len() % dim != 0 || dy.len() != y.len() {
            return Err(GpuError::Shape(format!("softmax backward: {} values, dim {dim}", y.len())));
        }
        let (dyv, ddy, mut dx) = (self.upload_nonempty(y)?, self.upload_nonempty(dy)?, self.zeros::<f32>(y.len())?);
        self.softmax_backward_dev((&dyv.slice(..), &ddy.slice(..)), &mut dx, (y.len() / dim, dim))?;
        self.download(&dx, y.len())
    }

    /// Fused cross-entropy: `(loss, lse)` per row (twin: `cpu::cross_entropy::cross_entropy_forward`).
    pub fn cross_entropy_forward(
        &self,
        logits: &[f32],
        vocab: usize,
        targets: &[i64],
        ignore: i64,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let rows = targets.len();
        self.check_targets(logits, vocab, targets, ignore)?;
        let (dl, dt) = (self.upload_nonempty(logits)?, self.upload_nonempty(targets)?);
        let (mut loss, mut lse) = (self.zeros::<f32>(rows)?, self.zeros::<f32>(rows)?);
        self.cross_entropy_forward_dev((&dl.slice(..), &dt, ignore), (&mut loss, &mut lse), (rows, vocab))?;
        Ok((self.download(&loss, rows)?, self.download(&lse, rows)?))
    }

    /// `dlogits` of the fused cross-entropy (twin: `cpu::cross_entropy::cross_entropy_backward`).
    pub fn cross_entropy_backward(
        &self,
        logits: &[f32],
        vocab: usize,
        targets: &[i64],
        ignore: i64,
        lse: &[f32],
        dloss: &[f32],
    ) -> Result<Vec<f32>> {
        let rows = targets.len();
        self.check_targets(logits, vocab, targets, ignore)?;
        if lse.len() != rows || dloss.len() != rows {
            return Err(GpuError::Shape("cross entropy backward: lse and dloss must have one value per row".into()));
        }
        let (dl, dt) = (self.upload_nonempty(logits)?, self.upload_nonempty(targets)?);
        let (dlse, dd) = (self.upload_nonempty(lse)?, self.upload_nonempty(dloss)?);
        let mut dx = self.zeros::<f32>(logits.len())?;
        let rows_in = (&dlse.slice(..), &dd.slice(..));
        self.cross_entropy_backward_dev((&dl.slice(..), &dt, ignore), rows_in, &mut dx, (rows, vocab))?;
        self.download(&dx, logits.len())
    }

    fn check_targets(&self, logits: &[f32], vocab: usize, targets: &[i64], ignore: i64) -> Result<()> {
        if vocab == 0 || logits.len() != targets.len() * vocab {
            return Err(GpuError::Shape(format!(
                "cross entropy: {} logits for {} rows of {vocab}",
                logits.len(),
                targets.len()
            )));
        }
        if let Some(t) = targets.iter().find(|&&t| t != ignore && !(0..vocab as i64).contains(&t)) {
            return Err(GpuError::Shape(format!("cross entropy: target {t} is outside a vocabulary of {vocab}")));
        }
        Ok(())
    }

    /// Rotary embedding of `x` `[outer, seq, heads, d]` with tables `[seq, d/2]`; `inverse` rotates
    /// back (twins: `cpu::rope::rope_interleaved` / `rope_half`).
    pub fn rope(
        &self,
        x: &[f32],
        cos: &[f32],
        sin: &[f32],
        (outer, seq, heads, d): (usize, usize, usize, usize),
        interleaved: bool,
        inverse: bool,
    ) -> Result<Vec<f32>> {
        if d % 2 != 0 || x.len() != outer * seq * heads * d || cos.len() != seq * d / 2 || sin.len() != cos.len() {
            return Err(GpuError::Shape(format!("rope: {} values for [{outer}, {seq}, {heads}, {d}]", x.len())));
        }
        let up = |v: &[f32]| self.upload_nonempty(v);
        let (dx, dc, ds, mut y) = (up(x)?, up(cos)?, up(sin)?, self.zeros::<f32>(x.len())?);
        let tables = (&dx.slice(..), &dc.slice(..), &ds.slice(..));
        self.rope_dev(tables, &mut y, (outer, seq, heads, d), (interleaved, inverse))?;
        self.download(&y, x.len())
    }

    /// Rows `ids` of `table` (`[rows, dim]`) (twin: `cpu::embedding::embedding_forward`).
    pub fn embedding_forward(&self, table: &[f32], dim: usize, ids: &[u32]) -> Result<Vec<f32>> {
        self.check_ids(table.len(), dim, ids)?;
        let (dt, di) = (self.upload_nonempty(table)?, self.upload_nonempty(ids)?);
        let mut out = self.zeros::<f32>(ids.len() * dim)?;
        self.embedding_forward_dev((&dt.slice(..), &di), &mut out, (ids.len(), dim))?;
        self.download(&out, ids.len() * dim)
    }

    /// The table's gradient: `dout` rows added into rows `ids` of a `table_len`-float table
    /// (twin: `cpu::embedding::embedding_backward`).
    pub fn embedding_backward(&self, dout: &[f32], dim: usize, ids: &[u32], table_len: usize) -> Result<Vec<f32>> {
        self.check_ids(table_len, dim, ids)?;
        if dout.len() != ids.len() * dim {
            return Err(GpuError::Shape(format!(
                "embedding backward: {} values for {} ids of {dim}",
                dout.len(),
                ids.len()
            )));
        }
        let (dd, di, mut dt) = (self.upload_nonempty(dout)?, self.upload_nonempty(ids)?, self.zeros::<f32>(table_len)?);
        self.embedding_backward_dev((&dd.slice(..), &di), &mut dt, (ids.len(), dim))?;
        self.download(&dt, table_len)
    }

    fn check_ids(&self, table_len: usize, dim: usize, ids: &[u32]) -> Result<()> {
        let rows = table_len.checked_div(dim).unwrap_or(0);
        if dim == 0 || table_len % dim != 0 {
            return Err(GpuError::Shape(format!("embedding: a table of {table_len} values is not rows of {dim}")));
        }
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= rows) {
            return Err(GpuError::Shape(format!("embedding: id {id} is outside a table of {rows} rows")));
        }
        Ok(())
    }

    /// One fused AdamW step in place on device buffers of `n` values (twin:
    /// `cpu::adamw::adamw_step`; both take their scalars from `AdamWScalars`).
    pub fn adamw_step_dev(
        &self,
        param: &mut cudarc::driver::CudaViewMut<'_, f32>,
        grad: &cudarc::driver::CudaView<'_, f32>,
        moments: (&mut CudaSlice<f32>, &mut CudaSlice<f32>),
        n: usize,
        hp: &AdamWStep,
    ) -> Result<()> {
        self.adamw("adamw_step_f32", param, grad, moments, n, hp)
    }

    /// [`Gpu::adamw_step_dev`] with bf16 moments (DeepSeek-V3's recipe), in one launch: each
    /// moment widened to f32, one f32 step, rounded back to nearest even (twin: the CPU step on
    /// the widened moments, rounded with `half::bf16::from_f32`).
    pub fn adamw_step_bf16_dev(
        &self,
        param: &mut cudarc::driver::CudaViewMut<'_, f32>,
        grad: &cudarc::driver::CudaView<'_, f32>,
        moments: (&mut CudaSlice<half::bf16>, &mut CudaSlice<half::bf16>),
        n: usize,
        hp: &AdamWStep,
    ) -> Result<()> {
        self.adamw("adamw_step_bf16_moments", param, grad, moments, n, hp)
    }

    /// Launches an AdamW `kernel` whose moments are stored as `T`.
    fn adamw<T: cudarc::driver::DeviceRepr>(
        &self,
        kernel: &'static str,
        param: &mut cudarc::driver::CudaViewMut<'_, f32>,
        grad: &cudarc::driver::CudaView<'_, f32>,
        (m, v): (&mut CudaSlice<T>, &mut CudaSlice<T>),
        n: usize,
        hp: &AdamWStep,
    ) -> Result<()> {
        if param.len() < n || grad.len() < n || m.len() < n || v.len() < n {
            return Err(GpuError::Shape(format!("adamw: buffers shorter than {n} values")));
        }
        if n == 0 {
            return Ok(());
        }
        let s = crate::cpu::adamw::AdamWScalars::new(hp);
        let (n32, from_m) = (n as u32, i32::from(s.lerp_from_m));
        let mut l = self.stream.launch_builder(self.function(kernel));
        l.arg(param).arg(grad).arg(m).arg(v).arg(&n32);
        l.arg(&s.decay).arg(&s.lerp_coeff).arg(&from_m).arg(&s.beta2).arg(&s.one_minus_beta2);
        l.arg(&s.bias_correction2_sqrt).arg(&s.eps).arg(&s.neg_step_size);
        // SAFETY: one thread per element of four buffers holding at least `n` values of the
        // kernel's types (f32 parameters and gradients, moments of T).
        unsafe { l.launch(grid_for(n)?) }.map_err(cuda(kernel))?;
        Ok(())
    }

    /// One fused AdamW step in place from host slices (see [`Gpu::adamw_step_dev`]).
    pub fn adamw_step(
        &self,
        param: &mut [f32],
        grad: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        hp: &AdamWStep,
    ) -> Result<()> {
        self.adamw_host("adamw_step_f32", param, grad, (m, v), hp)
    }

    /// One fused AdamW step with bf16 moments in place from host slices (see
    /// [`Gpu::adamw_step_bf16_dev`]).
    pub fn adamw_step_bf16(
        &self,
        param: &mut [f32],
        grad: &[f32],
        m: &mut [half::bf16],
        v: &mut [half::bf16],
        hp: &AdamWStep,
    ) -> Result<()> {
        self.adamw_host("adamw_step_bf16_moments", param, grad, (m, v), hp)
    }

    /// Copies the buffers in, runs AdamW `kernel` on them (see [`Gpu::adamw`]), copies them back.
    fn adamw_host<T>(
        &self,
        kernel: &'static str,
        param: &mut [f32],
        grad: &[f32],
        (m, v): (&mut [T], &mut [T]),
        hp: &AdamWStep,
    ) -> Result<()>
    where
        T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + Default + Clone,
    {
        let n = param.len();
        if grad.len() != n || m.len() != n || v.len() != n {
            return Err(GpuError::Shape("adamw: buffers differ in length".into()));
        }
        let (mut dp, dg) = (self.upload_nonempty(param)?, self.upload_nonempty(grad)?);
        let (mut dm, mut dv) = (self.upload_nonempty(m)?, self.upload_nonempty(v)?);
        self.adamw(kernel, &mut dp.slice_mut(..), &dg.slice(..), (&mut dm, &mut dv), n, hp)?;
        param.copy_from_slice(&self.download(&dp, n)?);
        m.clone_from_slice(&self.download(&dm, n)?);
        v.clone_from_slice(&self.download(&dv, n)?);
        Ok(())
    }
}
