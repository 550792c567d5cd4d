//! Attention launchers (kernels/attention.cu): training attention (forward and backward) and MLA
//! decode over the latent cache. The `_dev` calls work on buffers already on the GPU (benchmarks,
//! a device tensor); the others copy host slices in and out (tests).
//!
//! Each call runs the tiled kernels (FlashAttention-2 on the CUDA cores) of the narrowest instance
//! that holds its heads: the forward up to 576 x 512 (MLA decode: [c ; k_pe] and c), the backward
//! up to 256 x 256. Wider heads, a GPU without the shared memory an instance needs, or more than
//! 65535 (batch, KV head) pairs fall back to the simple kernels (one block per row). A forward
//! with too few blocks to fill the GPU (decode of a few sequences) splits the keys across blocks
//! and merges the splits' outputs by their logsumexps (flash-decoding).

use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::{cuda, rows_config, Gpu, GpuError, Result, THREADS};
use crate::cpu::attention::AttnShape;

/// Widest head (qk_dim or v_dim) the simple kernels' per-thread slices hold.
const MAX_WIDTH: usize = 8 * THREADS as usize;

/// Which tiled kernel: its shared memory layout differs.
#[derive(Debug, Clone, Copy)]
enum Pass {
    Forward,
    Dq,
    Dkv,
}

/// One tiled kernel instance, the twin of a `Tiles<DQ, DV, BM, BN, T, KC, NC, TX>` of
/// kernels/attention.cu.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Tiled {
    kernel: &'static str,
    /// Widest qk_dim and v_dim it takes.
    qk: usize,
    v: usize,
    /// Rows a block owns (queries; keys in the dk/dv pass) and rows per streamed tile.
    rows: usize,
    tile: usize,
    threads: u32,
    /// Dynamic shared memory in bytes: the kernel's layout, which it checks (trapping when short).
    smem: usize,
}

const fn max(a: usize, b: usize) -> usize {
    if a > b {
        a
    } else {
        b
    }
}

/// The instance `Tiles<dq, dv, bm, bn, t, kc, nc, _>` of `pass` (rows are padded by 4 floats).
const fn tiled(kernel: &'static str, pass: Pass, [dq, dv, bm, bn, t, kc, nc]: [usize; 7]) -> Tiled {
    let (lq, lv, lc, lp) = (dq + 4, dv + 4, kc + 4, bm + 4);
    let floats = match pass {
        Pass::Forward => bm * lq + 2 * max(bn * lc, nc * lv) + bn * lp + bm,
        Pass::Dq => bm * lq + bm * lv + 2 * max(bn * lc, nc * lq) + bn * lp + bm,
        Pass::Dkv => bm * lq + bm * lv + 2 * max(bn * lc, max(nc * lq, nc * lv)) + 2 * bn * lp,
    };
    Tiled { kernel, qk: dq, v: dv, rows: bm, tile: bn, threads: t as u32, smem: 4 * floats }
}

/// Forward instances, narrowest first.
const FORWARD: [Tiled; 4] = [
    tiled("attention_forward_d128_f32", Pass::Forward, [128, 128, 64, 64, 128, 64, 32]),
    tiled("attention_forward_q256_v128_f32", Pass::Forward, [256, 128, 64, 64, 128, 32, 16]),
    tiled("attention_forward_d256_f32", Pass::Forward, [256, 256, 64, 64, 256, 64, 16]),
    tiled("attention_forward_q576_v512_f32", Pass::Forward, [576, 512, 32, 128, 256, 32, 8]),
];

/// Backward instances (dq pass, dk/dv pass), narrowest first.
const BACKWARD: [(Tiled, Tiled); 3] = [
    (
        tiled("attention_backward_dq_d128_f32", Pass::Dq, [128, 128, 64, 64, 256, 32, 16]),
        tiled("attention_backward_dkv_d128_f32", Pass::Dkv, [128, 128, 64, 64, 256, 64, 32]),
    ),
    (
        tiled("attention_backward_dq_q256_v128_f32", Pass::Dq, [256, 128, 64, 64, 256, 64, 16]),
        tiled("attention_backward_dkv_q256_v128_f32", Pass::Dkv, [256, 128, 64, 64, 256, 64, 16]),
    ),
    (
        tiled("attention_backward_dq_d256_f32", Pass::Dq, [256, 256, 64, 64, 256, 64, 16]),
        tiled("attention_backward_dkv_d256_f32", Pass::Dkv, [256, 256, 64, 64, 256, 64, 16]),
    ),
];

/// Each tiled kernel and its dynamic shared memory, which `Gpu::new` allows it.
pub(super) const SHARED_MEMORY: [(&str, usize); FORWARD.len() + 2 * BACKWARD.len()] = {
    let mut all = [("", 0); FORWARD.len() + 2 * BACKWARD.len()];
    let mut i = 0;
    while i < FORWARD.len() {
        all[i] = (FORWARD[i].kernel, FORWARD[i].smem);
        i += 1;
    }
    let mut j = 0;
    while j < BACKWARD.len() {
        all[i + 2 * j] = (BACKWARD[j].0.kernel, BACKWARD[j].0.smem);
        all[i + 2 * j + 1] = (BACKWARD[j].1.kernel, BACKWARD[j].1.smem);
        j += 1;
    }
    all
};

/// Threads of a block of attention_combine_f32.
const COMBINE_THREADS: u32 = 128;

/// Lengths of one call's buffers: q, k, v, then o (or dO) and lse when the call has them.
struct Lens {
    q: usize,
    k: usize,
    v: usize,
    o_lse: Option<(usize, usize)>,
}

/// Errors unless buffers of `lens` hold `s`'s tensors: exactly (host slices) or at least (device
/// buffers, which are never empty).
fn check(s: &AttnShape, what: &str, lens: Lens, exact: bool) -> Result<()> {
    let ok = |have: usize, need: usize| if exact { have == need } else { have >= need };
    let (q_rows, kv_rows) = (s.batch * s.q_heads * s.q_len, s.batch * s.kv_heads * s.kv_len);
    // The kernels count rows (and the simple ones their blocks) in 32-bit ints.
    if q_rows > i32::MAX as usize || kv_rows > i32::MAX as usize {
        return Err(GpuError::Shape(format!(
            "{what}: {q_rows} query rows and {kv_rows} key rows of {s:?}; the kernels take at most {} of each",
            i32::MAX
        )));
    }
    let fits = s.kv_heads > 0
        && s.q_heads % s.kv_heads == 0
        && ok(lens.q, q_rows * s.qk_dim)
        && ok(lens.k, kv_rows * s.qk_dim)
        && ok(lens.v, kv_rows * s.v_dim)
        && lens.o_lse.is_none_or(|(o, lse)| ok(o, q_rows * s.v_dim) && ok(lse, q_rows))
        && s.qk_dim <= MAX_WIDTH
        && s.v_dim <= MAX_WIDTH;
    if fits {
        Ok(())
    } else {
        Err(GpuError::Shape(format!("{what}: buffers do not match {s:?} (qk_dim and v_dim at most {MAX_WIDTH})")))
    }
}

/// The scratch and outputs of [`Gpu::attention_backward_dev`]: `dq`, `dk`, `dv` shaped like q,
/// k, v, and `delta` (`[batch, q_heads, q_len]`, `D = dot(dO, O)` per query row).
#[derive(Debug)]
pub struct AttnGrads {
    pub dq: CudaSlice<f32>,
    pub dk: CudaSlice<f32>,
    pub dv: CudaSlice<f32>,
    pub delta: CudaSlice<f32>,
}

/// Key splits of a forward of `blocks` blocks over `key_tiles` key tiles on `sms` multiprocessors,
/// and key tiles per split: when the rows alone give at most half the multiprocessors a block
/// (decode of a few sequences), enough splits to give each about one.
fn key_splits(blocks: usize, key_tiles: usize, sms: usize) -> (usize, usize) {
    let want = if blocks * 2 <= sms { (sms / blocks.max(1)).min(key_tiles) } else { 1 };
    let per_split = key_tiles.div_ceil(want.max(1)).max(1);
    (key_tiles.div_ceil(per_split).max(1), per_split)
}

/// The simple kernels' launch: a block per row, each thread owning strided slices of the wider of
/// the two head widths.
fn simple_config(rows: usize, s: &AttnShape) -> Result<LaunchConfig> {
    rows_config(rows, s.qk_dim.max(s.v_dim))
}

fn tiled_config(t: &Tiled, (x, y, z): (usize, usize, usize)) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (x as u32, y as u32, z as u32),
        block_dim: (t.threads, 1, 1),
        shared_mem_bytes: t.smem as u32,
    }
}

impl Gpu {
    /// The first of `instances` that holds `s`'s heads on this GPU (shared memory, grid height);
    /// `None`: the simple kernels (also when they are the chosen ones).
    fn tiled_for(
        &self,
        instances: impl IntoIterator<Item = Tiled>,
        s: &AttnShape,
        backward: bool,
    ) -> Result<Option<Tiled>> {
        let chosen = match self.attention_kernels() {
            super::AttentionKernels::Simple => false,
            super::AttentionKernels::TiledForward => !backward,
            super::AttentionKernels::Tiled => true,
        };
        if !chosen {
            return Ok(None);
        }
        let attr = CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN;
        let smem = self.ctx.attribute(attr).map_err(cuda("reading the shared memory per block"))?.max(0) as usize;
        let grid_fits = s.batch * s.kv_heads <= 65_535;
        Ok(instances.into_iter().find(|t| s.qk_dim <= t.qk && s.v_dim <= t.v && t.smem <= smem && grid_fits))
    }

    /// `t`'s kernel, allowed its shared memory by `Gpu::new` (`tiled_for` chose `t` because it fits).
    fn tiled_function(&self, t: &Tiled) -> &cudarc::driver::CudaFunction {
        self.function(t.kernel)
    }

    /// Attention forward on device buffers into `o` and `lse` (see [`Gpu::attention_forward`]).
    pub fn attention_forward_dev(
        &self,
        s: &AttnShape,
        (q, k, v): (&CudaSlice<f32>, &CudaSlice<f32>, &CudaSlice<f32>),
        o: &mut CudaSlice<f32>,
        lse: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let lens = Lens { q: q.len(), k: k.len(), v: v.len(), o_lse: Some((o.len(), lse.len())) };
        check(s, "attention", lens, false)?;
        let q_rows = s.batch * s.q_heads * s.q_len;
        if q_rows == 0 {
            return Ok(());
        }
        let dims = [s.q_heads, s.kv_heads, s.q_len, s.kv_len, s.qk_dim, s.v_dim].map(|x| x as u32);
        let causal = i32::from(s.causal);
        let Some(t) = self.tiled_for(FORWARD, s, false)? else {
            let mut l = self.stream.launch_builder(self.function("attention_forward_f32"));
            l.arg(q).arg(k).arg(v).arg(o).arg(lse);
            for d in &dims {
                l.arg(d);
            }
            l.arg(&s.scale).arg(&causal);
            // SAFETY: one block per query row reads its q row and its KV head's rows (shapes checked
            // above), writes its o row and lse; v_dim fits the per-thread slices.
            unsafe { l.launch(simple_config(q_rows, s)?) }.map_err(cuda("attention_forward_f32"))?;
            return Ok(());
        };
        let heads = s.batch * s.kv_heads;
        let row_tiles = (s.q_heads / s.kv_heads * s.q_len).div_ceil(t.rows);
        let (splits, per_split) = key_splits(row_tiles * heads, s.kv_len.div_ceil(t.tile), self.multiprocessors);
        let per_split = per_split as u32;
        let cfg = tiled_config(&t, (row_tiles, heads, splits));
        if splits == 1 {
            let mut l = self.stream.launch_builder(self.tiled_function(&t));
            l.arg(q).arg(k).arg(v).arg(o).arg(lse);
            for d in &dims {
                l.arg(d);
            }
            l.arg(&s.scale).arg(&causal).arg(&per_split);
            // SAFETY: a block per tile of its (batch, KV head)'s packed query rows reads those q
            // rows and the head's k and v rows (shapes checked above) and writes the rows' o and
            // lse; its shared memory is its instance's layout (the kernel checks the size).
            unsafe { l.launch(cfg) }.map_err(cuda(t.kernel))?;
            return Ok(());
        }
        let mut o_part = self.zeros::<f32>(splits * q_rows * s.v_dim)?;
        let mut lse_part = self.zeros::<f32>(splits * q_rows)?;
        let mut l = self.stream.launch_builder(self.tiled_function(&t));
        l.arg(q).arg(k).arg(v).arg(&mut o_part).arg(&mut lse_part);
        for d in &dims {
            l.arg(d);
        }
        l.arg(&s.scale).arg(&causal).arg(&per_split);
        // SAFETY: as above, split z writing its rows of o_part [splits, q_rows, v_dim] and
        // lse_part [splits, q_rows].
        unsafe { l.launch(cfg) }.map_err(cuda(t.kernel))?;
        let (rows, vd, splits) = (q_rows as u32, s.v_dim as u32, splits as u32);
        let mut l = self.stream.launch_builder(self.function("attention_combine_f32"));
        l.arg(&o_part).arg(&lse_part).arg(o).arg(lse).arg(&rows).arg(&vd).arg(&splits);
        let cfg = LaunchConfig { grid_dim: (rows, 1, 1), block_dim: (COMBINE_THREADS, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: one block per query row reads its splits' rows of o_part and lse_part and writes
        // its o row and lse.
        unsafe { l.launch(cfg) }.map_err(cuda("attention_combine_f32"))?;
        Ok(())
    }

    /// Attention forward with an online softmax: `(o, lse)` (twin:
    /// `cpu::attention::attention_forward`). Grouped-query heads and bottom-right causal masking;
    /// with one KV head whose value is the latent this is MLA's decode over its latent cache.
    pub fn attention_forward(
        &self,
        shape: &AttnShape,
        q: &[f32],
        k: &[f32],
        v: &[f32],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        check(shape, "attention", Lens { q: q.len(), k: k.len(), v: v.len(), o_lse: None }, true)?;
        let q_rows = shape.batch * shape.q_heads * shape.q_len;
        let (dq, dk, dv) = (self.upload_nonempty(q)?, self.upload_nonempty(k)?, self.upload_nonempty(v)?);
        let (mut o, mut lse) = (self.zeros::<f32>(q_rows * shape.v_dim)?, self.zeros::<f32>(q_rows)?);
        self.attention_forward_dev(shape, (&dq, &dk, &dv), &mut o, &mut lse)?;
        Ok((self.download(&o, q_rows * shape.v_dim)?, self.download(&lse, q_rows)?))
    }

    /// Attention backward on device buffers (see [`Gpu::attention_backward`]); every buffer of
    /// `grads` is overwritten.
    pub fn attention_backward_dev(
        &self,
        s: &AttnShape,
        (q, k, v): (&CudaSlice<f32>, &CudaSlice<f32>, &CudaSlice<f32>),
        (o, lse, d_o): (&CudaSlice<f32>, &CudaSlice<f32>, &CudaSlice<f32>),
        grads: &mut AttnGrads,
    ) -> Result<()> {
        let what = "attention backward";
        check(s, what, Lens { q: q.len(), k: k.len(), v: v.len(), o_lse: Some((o.len(), lse.len())) }, false)?;
        let g = Lens {
            q: grads.dq.len(),
            k: grads.dk.len(),
            v: grads.dv.len(),
            o_lse: Some((d_o.len(), grads.delta.len())),
        };
        check(s, what, g, false)?;
        let (q_rows, kv_rows) = (s.batch * s.q_heads * s.q_len, s.batch * s.kv_heads * s.kv_len);
        if q_rows == 0 || kv_rows == 0 {
            // No queries: keys get no gradient. No keys: every row is fully masked (its output
            // is 0, so is its delta = rowsum(dO * O)). Every buffer is written, as documented.
            self.stream.memset_zeros(&mut grads.delta).map_err(cuda(what))?;
            self.stream.memset_zeros(&mut grads.dq).map_err(cuda(what))?;
            self.stream.memset_zeros(&mut grads.dk).map_err(cuda(what))?;
            return self.stream.memset_zeros(&mut grads.dv).map_err(cuda(what));
        }
        let dims = [s.q_heads, s.kv_heads, s.q_len, s.kv_len, s.qk_dim, s.v_dim].map(|x| x as u32);
        let causal = i32::from(s.causal);
        let heads = s.batch * s.kv_heads;

        // Pass 1 (dq and delta) before pass 2 (dk, dv), which reads delta.
        let (kernel, cfg) = match self.tiled_for(BACKWARD.map(|p| p.0), s, true)? {
            Some(t) => (self.tiled_function(&t), tiled_config(&t, ((q_rows / heads).div_ceil(t.rows), heads, 1))),
            None => (self.function("attention_backward_dq_f32"), simple_config(q_rows, s)?),
        };
        let mut l = self.stream.launch_builder(kernel);
        l.arg(q).arg(k).arg(v).arg(o).arg(lse).arg(d_o).arg(&mut grads.dq).arg(&mut grads.delta);
        for d in &dims {
            l.arg(d);
        }
        l.arg(&s.scale).arg(&causal);
        // SAFETY: a block per query row (simple) or per tile of a (batch, KV head)'s packed query
        // rows (tiled) reads those rows of q, o, dO and lse and the head's k and v rows (shapes
        // checked above), writes their dq rows and delta; the simple kernel's slices hold qk_dim,
        // the tiled one's shared memory is its instance's layout (the kernel checks the size).
        unsafe { l.launch(cfg) }.map_err(cuda("attention_backward_dq"))?;

        let (kernel, cfg) = match self.tiled_for(BACKWARD.map(|p| p.1), s, true)? {
            Some(t) => (self.tiled_function(&t), tiled_config(&t, (s.kv_len.div_ceil(t.rows), heads, 1))),
            None => (self.function("attention_backward_dkv_f32"), simple_config(kv_rows, s)?),
        };
        let mut l = self.stream.launch_builder(kernel);
        l.arg(q).arg(k).arg(v).arg(d_o).arg(lse).arg(&grads.delta).arg(&mut grads.dk).arg(&mut grads.dv);
        for d in &dims {
            l.arg(d);
        }
        l.arg(&s.scale).arg(&causal);
        // SAFETY: a block per key row (simple) or per key tile of a (batch, KV head) (tiled) reads
        // those k and v rows and the q, dO, lse and delta rows of the head's query group, writes
        // their dk and dv rows; widths and shared memory as in pass 1.
        unsafe { l.launch(cfg) }.map_err(cuda("attention_backward_dkv"))?;
        Ok(())
    }

    /// Zeroed gradient buffers for [`Gpu::attention_backward_dev`] on `s`.
    pub fn attention_grads(&self, s: &AttnShape) -> Result<AttnGrads> {
        let (q_rows, kv_rows) = (s.batch * s.q_heads * s.q_len, s.batch * s.kv_heads * s.kv_len);
        Ok(AttnGrads {
            dq: self.zeros(q_rows * s.qk_dim)?,
            dk: self.zeros(kv_rows * s.qk_dim)?,
            dv: self.zeros(kv_rows * s.v_dim)?,
            delta: self.zeros(q_rows)?,
        })
    }

    /// Attention backward from the forward's `o` and `lse`: `(dq, dk, dv)` shaped like `q`, `k`,
    /// `v` (twin: `cpu::attention::attention_backward`). Two passes, no atomics: each query tile
    /// writes its `dq` and `D = dot(dO, O)`, then each key tile sums over every query of its
    /// group's heads for its `dk` and `dv`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward(
        &self,
        shape: &AttnShape,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        o: &[f32],
        lse: &[f32],
        d_o: &[f32],
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let what = "attention backward";
        check(shape, what, Lens { q: q.len(), k: k.len(), v: v.len(), o_lse: Some((o.len(), lse.len())) }, true)?;
        if d_o.len() != o.len() {
            return Err(GpuError::Shape(format!("{what}: dO has {} values, o {}", d_o.len(), o.len())));
        }
        let up = |x: &[f32]| self.upload_nonempty(x);
        let (dq, dk, dv) = (up(q)?, up(k)?, up(v)?);
        let (d_o_dev, o_dev, lse_dev) = (up(d_o)?, up(o)?, up(lse)?);
        let mut grads = self.attention_grads(shape)?;
        self.attention_backward_dev(shape, (&dq, &dk, &dv), (&o_dev, &lse_dev, &d_o_dev), &mut grads)?;
        Ok((self.download(&grads.dq, q.len())?, self.download(&grads.dk, k.len())?, self.download(&grads.dv, v.len())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_memory_is_the_kernels_layout() {
        // ForwardSmem, DqSmem and DkvSmem of kernels/attention.cu's instances, in bytes. An H100
        // or H200 gives a block up to 227 KB (two blocks of d128's forward and dq pass, and of
        // q256_v128's forward, share a multiprocessor); an A100 163 KB.
        let forward: Vec<usize> = FORWARD.iter().map(|t| t.smem).collect();
        assert_eq!(forward, [86_272, 102_656, 119_040, 129_664]);
        let backward: Vec<(usize, usize)> = BACKWARD.iter().map(|(dq, dkv)| (dq.smem, dkv.smem)).collect();
        assert_eq!(backward, [(103_680, 137_216), (152_832, 169_984), (185_600, 202_752)]);
        assert!(FORWARD.iter().chain(BACKWARD.iter().flat_map(|(a, b)| [a, b])).all(|t| t.smem <= 227 * 1024));
    }

    #[test]
    fn rows_past_32_bits_are_a_shape_error() {
        let s = |q_len: usize| AttnShape {
            batch: 2,
            q_heads: 8,
            kv_heads: 1,
            q_len,
            kv_len: q_len,
            qk_dim: 1,
            v_dim: 1,
            scale: 1.0,
            causal: true,
        };
        let lens = |s: &AttnShape| {
            let (q, kv) = (s.batch * s.q_heads * s.q_len, s.batch * s.kv_heads * s.kv_len);
            Lens { q, k: kv, v: kv, o_lse: Some((q, q)) }
        };
        let fits = s(1 << 26); // 2^30 query rows
        assert!(check(&fits, "attention", lens(&fits), true).is_ok());
        let over = s(1 << 27); // 2^31
        let err = check(&over, "attention", lens(&over), true).unwrap_err().to_string();
        assert!(err.contains("2147483648 query rows"), "{err}");
    }

    #[test]
    fn keys_are_split_only_when_the_rows_leave_the_gpu_idle() {
        // V3 decode of 32 sequences (4 tiles of 32 heads each) on 132 multiprocessors: one wave.
        assert_eq!(key_splits(128, 32, 132), (1, 32));
        // One sequence: a split per key tile, up to a block per multiprocessor.
        assert_eq!(key_splits(4, 32, 132), (32, 1));
        assert_eq!(key_splits(4, 1000, 132), (33, 31));
        assert_eq!(key_splits(30, 100, 132), (4, 25));
        assert_eq!(key_splits(3, 1, 132), (1, 1));
        assert_eq!(key_splits(3, 0, 132), (1, 1));
    }
}
