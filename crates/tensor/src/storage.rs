//! Tensor storage: a flat buffer per dtype on the host, or an f32 buffer on a GPU. Storage is
//! shared (views) and sits behind a lock so an optimizer can update parameters in place.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LockResult, RwLock, RwLockReadGuard, RwLockWriteGuard};

use half::{bf16, f16};
use whale_kernels::cpu::fp8::{Fp8Format, Overflow};
use whale_kernels::cuda::cudarc::driver::CudaSlice;
use whale_kernels::cuda::Gpu;

use crate::dtype::to_bf16;
use crate::layout::Layout;
use crate::{DType, Device, Error, Result};

#[derive(Debug, Clone)]
pub enum CpuStorage {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    /// FP8 codes (E4M3 `fn`).
    F8E4M3(Vec<u8>),
    /// FP8 codes (E5M2).
    F8E5M2(Vec<u8>),
    U32(Vec<u32>),
    I64(Vec<i64>),
}

impl CpuStorage {
    pub fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::F16(_) => DType::F16,
            CpuStorage::F8E4M3(_) => DType::F8E4M3,
            CpuStorage::F8E5M2(_) => DType::F8E5M2,
            CpuStorage::U32(_) => DType::U32,
            CpuStorage::I64(_) => DType::I64,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            CpuStorage::F32(v) => v.len(),
            CpuStorage::BF16(v) => v.len(),
            CpuStorage::F16(v) => v.len(),
            CpuStorage::F8E4M3(v) | CpuStorage::F8E5M2(v) => v.len(),
            CpuStorage::U32(v) => v.len(),
            CpuStorage::I64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Float values of a view, converted to f32, in row-major order.
    pub(crate) fn gather_f32(&self, layout: &Layout) -> Vec<f32> {
        match self {
            CpuStorage::F32(v) => layout.gather(v),
            CpuStorage::BF16(v) => layout.gather(v).into_iter().map(f32::from).collect(),
            CpuStorage::F16(v) => layout.gather(v).into_iter().map(f32::from).collect(),
            CpuStorage::F8E4M3(v) => decode(v, layout, Fp8Format::E4M3),
            CpuStorage::F8E5M2(v) => decode(v, layout, Fp8Format::E5M2),
            CpuStorage::U32(v) => layout.gather(v).into_iter().map(|x| x as f32).collect(),
            CpuStorage::I64(v) => layout.gather(v).into_iter().map(|x| x as f32).collect(),
        }
    }

    /// Integer values of a view, in row-major order; an error for float storage.
    pub(crate) fn gather_i64(&self, op: &'static str, layout: &Layout) -> Result<Vec<i64>> {
        match self {
            CpuStorage::U32(v) => Ok(layout.gather(v).into_iter().map(i64::from).collect()),
            CpuStorage::I64(v) => Ok(layout.gather(v)),
            _ => Err(Error::UnsupportedDType { op, dtype: self.dtype(), why: "indices must be u32 or i64" }),
        }
    }

    /// FP8 codes (`format`'s bit patterns).
    pub(crate) fn from_fp8_codes(codes: Vec<u8>, format: Fp8Format) -> CpuStorage {
        match format {
            Fp8Format::E4M3 => CpuStorage::F8E4M3(codes),
            Fp8Format::E5M2 => CpuStorage::F8E5M2(codes),
        }
    }

    /// Stores f32 values as `dtype` (round to nearest even for bf16/f16/FP8, with FP8 overflow
    /// following torch's casts; integers truncate).
    pub(crate) fn from_f32(values: Vec<f32>, dtype: DType) -> CpuStorage {
        match dtype {
            DType::F32 => CpuStorage::F32(values),
            DType::BF16 => CpuStorage::BF16(values.iter().map(|&x| to_bf16(x)).collect()),
            DType::F16 => CpuStorage::F16(values.into_iter().map(f16::from_f32).collect()),
            DType::F8E4M3 => CpuStorage::F8E4M3(encode(&values, Fp8Format::E4M3)),
            DType::F8E5M2 => CpuStorage::F8E5M2(encode(&values, Fp8Format::E5M2)),
            DType::U32 => CpuStorage::U32(values.into_iter().map(|x| x as u32).collect()),
            DType::I64 => CpuStorage::I64(values.into_iter().map(|x| x as i64).collect()),
        }
    }

    /// Copies `src` (the same dtype, `outer * block` values) into `outer` blocks of `block`
    /// values of this buffer, the first at `at`, each `stride` after the previous.
    pub(crate) fn write_blocks(
        &mut self,
        at: usize,
        stride: usize,
        outer: usize,
        block: usize,
        src: &CpuStorage,
    ) -> crate::Result<()> {
        fn copy<T: Copy>(dst: &mut [T], src: &[T], at: usize, stride: usize, block: usize) {
            for (o, chunk) in src.chunks_exact(block).enumerate() {
                dst[at + o * stride..][..block].copy_from_slice(chunk);
            }
        }
        debug_assert_eq!(src.len(), outer * block);
        match (self, src) {
            (CpuStorage::F32(d), CpuStorage::F32(s)) => copy(d, s, at, stride, block),
            (CpuStorage::BF16(d), CpuStorage::BF16(s)) => copy(d, s, at, stride, block),
            (CpuStorage::F16(d), CpuStorage::F16(s)) => copy(d, s, at, stride, block),
            (CpuStorage::F8E4M3(d), CpuStorage::F8E4M3(s)) | (CpuStorage::F8E5M2(d), CpuStorage::F8E5M2(s)) => {
                copy(d, s, at, stride, block)
            }
            (CpuStorage::U32(d), CpuStorage::U32(s)) => copy(d, s, at, stride, block),
            (CpuStorage::I64(d), CpuStorage::I64(s)) => copy(d, s, at, stride, block),
            (d, s) => {
                return Err(crate::Error::DTypeMismatch { op: "write_window", lhs: d.dtype(), rhs: s.dtype() });
            }
        }
        Ok(())
    }

    pub(crate) fn gather_same(&self, layout: &Layout) -> CpuStorage {
        match self {
            CpuStorage::F32(v) => CpuStorage::F32(layout.gather(v)),
            CpuStorage::BF16(v) => CpuStorage::BF16(layout.gather(v)),
            CpuStorage::F16(v) => CpuStorage::F16(layout.gather(v)),
            CpuStorage::F8E4M3(v) => CpuStorage::F8E4M3(layout.gather(v)),
            CpuStorage::F8E5M2(v) => CpuStorage::F8E5M2(layout.gather(v)),
            CpuStorage::U32(v) => CpuStorage::U32(layout.gather(v)),
            CpuStorage::I64(v) => CpuStorage::I64(layout.gather(v)),
        }
    }
}

fn decode(codes: &[u8], layout: &Layout, format: Fp8Format) -> Vec<f32> {
    let table = format.decode_table();
    layout.gather(codes).into_iter().map(|c| table[c as usize]).collect()
}

fn encode(values: &[f32], format: Fp8Format) -> Vec<u8> {
    values.iter().map(|&x| format.encode(x, Overflow::Ieee)).collect()
}

/// A buffer as the tensors that view it share it, with a version counter that every write
/// through [`SharedStorage::write`] (the in-place ops: optimizer steps, `write_window`, `assign`)
/// bumps. Autograd records the versions of an op's inputs and output when it records the op and
/// refuses to run its backward once one has changed: PyTorch's version counter, so an in-place
/// write between a forward and its backward is an error instead of gradients from the new values.
#[derive(Debug)]
pub struct SharedStorage {
    lock: RwLock<Storage>,
    version: AtomicU64,
}

impl SharedStorage {
    pub fn new(storage: Storage) -> Arc<SharedStorage> {
        Arc::new(SharedStorage { lock: RwLock::new(storage), version: AtomicU64::new(0) })
    }

    pub fn read(&self) -> LockResult<RwLockReadGuard<'_, Storage>> {
        self.lock.read()
    }

    /// The buffer, to change in place: a new version.
    pub fn write(&self) -> LockResult<RwLockWriteGuard<'_, Storage>> {
        self.version.fetch_add(1, Ordering::Relaxed);
        self.lock.write()
    }

    /// How many in-place writes this buffer has had.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Relaxed)
    }
}

/// A tensor's buffer: on the host, or on a GPU.
#[derive(Debug)]
pub enum Storage {
    Cpu(CpuStorage),
    Cuda(CudaStorage),
}

/// A buffer on a GPU.
#[derive(Debug)]
pub struct CudaStorage {
    pub(crate) gpu: Arc<Gpu>,
    pub(crate) buf: CudaBuf,
}

/// What a GPU buffer holds: f32 or bf16 values, which every CUDA op computes on (bf16 widened to
/// f32), or FP8 codes, which only the FP8 ops read (dequantize, the FP8 linear of a stored FP8
/// weight). Other dtypes stay on the host.
#[derive(Debug)]
pub enum CudaBuf {
    F32(CudaSlice<f32>),
    /// bf16 bits: widened to f32 for every op that reads them, each result rounded back.
    Bf16(CudaSlice<bf16>),
    Fp8(CudaSlice<u8>, Fp8Format),
}

impl CudaStorage {
    /// Elements the buffer holds.
    pub(crate) fn len(&self) -> usize {
        match &self.buf {
            CudaBuf::F32(b) => b.len(),
            CudaBuf::Bf16(b) => b.len(),
            CudaBuf::Fp8(b, _) => b.len(),
        }
    }

    pub fn dtype(&self) -> DType {
        match &self.buf {
            CudaBuf::F32(_) => DType::F32,
            CudaBuf::Bf16(_) => DType::BF16,
            CudaBuf::Fp8(_, Fp8Format::E4M3) => DType::F8E4M3,
            CudaBuf::Fp8(_, Fp8Format::E5M2) => DType::F8E5M2,
        }
    }

    /// The f32 values; other storage is an error naming `op` (bf16 is widened by the caller).
    pub(crate) fn f32(&self, op: &'static str) -> Result<&CudaSlice<f32>> {
        match &self.buf {
            CudaBuf::F32(b) => Ok(b),
            _ => Err(Error::UnsupportedDType { op, dtype: self.dtype(), why: NOT_F32 }),
        }
    }

    /// The f32 values, to update in place (master weights are f32).
    pub(crate) fn f32_mut(&mut self, op: &'static str) -> Result<&mut CudaSlice<f32>> {
        let dtype = self.dtype();
        match &mut self.buf {
            CudaBuf::F32(b) => Ok(b),
            _ => Err(Error::UnsupportedDType { op, dtype, why: NOT_F32 }),
        }
    }
}

const NOT_F32: &str = "f32 storage is needed here (FP8 codes on a GPU feed only the FP8 ops; master weights \
                       are f32)";

impl Storage {
    pub fn dtype(&self) -> DType {
        match self {
            Storage::Cpu(s) => s.dtype(),
            Storage::Cuda(c) => c.dtype(),
        }
    }

    /// Elements the buffer holds.
    pub(crate) fn len(&self) -> usize {
        match self {
            Storage::Cpu(s) => s.len(),
            Storage::Cuda(c) => c.len(),
        }
    }

    /// The values on the host: borrowed for host storage, copied from the GPU otherwise. A failed
    /// copy is an error that names the device.
    pub(crate) fn host(&self, device: Device) -> Result<Cow<'_, CpuStorage>> {
        match self {
            Storage::Cpu(s) => Ok(Cow::Borrowed(s)),
            Storage::Cuda(c) => {
                let failed = crate::cuda::driver_error(device, "copying a tensor to the host");
                Ok(Cow::Owned(match &c.buf {
                    CudaBuf::F32(b) => CpuStorage::F32(c.gpu.stream.clone_dtoh(b).map_err(failed)?),
                    CudaBuf::Bf16(b) => CpuStorage::BF16(c.gpu.stream.clone_dtoh(b).map_err(failed)?),
                    CudaBuf::Fp8(b, format) => {
                        CpuStorage::from_fp8_codes(c.gpu.stream.clone_dtoh(b).map_err(failed)?, *format)
                    }
                }))
            }
        }
    }
}
