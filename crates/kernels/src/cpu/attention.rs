//! Scaled dot-product attention, flash-style: keys are processed in tiles with an online softmax,
//! so nothing of size [q_len, kv_len] is ever held; the backward recomputes the probabilities from
//! the saved per-row logsumexp.
//!
//! Work is split over (batch, head, block of rows), a partition fixed by the sizes. Every output
//! element is produced by one task with a fixed summation order, so results do not depend on the
//! thread count. The backward runs two passes to avoid racing on shared gradients: one over query
//! rows for `dq`, one over key blocks for `dk`/`dv` (each key walks all queries of its head group).

use std::borrow::Cow;

use rayon::prelude::*;

use super::expf::expf;
use super::{reduce, wide_fn};

/// Sizes of one attention call. Query head `h` reads key/value head `h / (q_heads / kv_heads)` (GQA;
/// MQA when `kv_heads == 1`). `qk_dim` may differ from `v_dim` (MLA: 192 vs 128).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnShape {
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub qk_dim: usize,
    pub v_dim: usize,
    pub scale: f32,
    /// Query `i` sees keys `j <= i + (kv_len - q_len)` (bottom-right aligned, so a query block at the
    /// end of a cached sequence works).
    pub causal: bool,
}

/// Keys per tile of the online softmax, and query rows per tile in the dk/dv pass.
const TILE: usize = 64;
/// Query rows per rayon task in the forward and the dq pass.
const QUERY_BLOCK: usize = 16;
/// Keys per rayon task in the dk/dv pass.
const KEY_BLOCK: usize = 32;

/// Where the rows of a key or value tensor `[batch, kv_heads, kv_len, dim]` lie in its slice: row
/// `j` of head `h` of batch `b` starts at `b * batch + h * head + j * row`, its `dim` values
/// contiguous. A decode cache's view of the first positions of a longer buffer has `head` and
/// `batch` strides of the buffer's capacity, and an MLA latent's value (its first columns) a `row`
/// stride wider than the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowLayout {
    pub batch: usize,
    pub head: usize,
    pub row: usize,
}

impl RowLayout {
    /// Rows of `dim` packed head after head: `[batch, kv_heads, kv_len, dim]` row-major.
    pub fn contiguous(kv_heads: usize, kv_len: usize, dim: usize) -> Self {
        RowLayout { batch: kv_heads * kv_len * dim, head: kv_len * dim, row: dim }
    }

    /// Elements a slice must hold for `batch` x `heads` heads of `len` rows of `dim` in this
    /// layout.
    pub fn span(&self, batch: usize, heads: usize, len: usize, dim: usize) -> usize {
        if batch == 0 || heads == 0 || len == 0 || dim == 0 {
            return 0;
        }
        (batch - 1) * self.batch + (heads - 1) * self.head + (len - 1) * self.row + dim
    }
}

/// `q`: [batch, q_heads, q_len, qk_dim], `k`: [batch, kv_heads, kv_len, qk_dim],
/// `v`: [batch, kv_heads, kv_len, v_dim] -> `o`: [batch, q_heads, q_len, v_dim], `lse`: [batch, q_heads, q_len].
pub fn attention_forward(shape: &AttnShape, q: &[f32], k: &[f32], v: &[f32], o: &mut [f32], lse: &mut [f32]) {
    let s = *shape;
    s.check(q, k, v, "attention_forward");
    let (k_rows, v_rows) = (s.k_layout(), s.v_layout());
    attention_forward_strided(shape, q, (k, k_rows), (v, v_rows), o, lse);
}

/// [`attention_forward`] with keys and values laid out as `RowLayout`s say (the same bits as
/// their contiguous copies): a decode step reads its cache where it lies.
pub fn attention_forward_strided(
    shape: &AttnShape,
    q: &[f32],
    (k, k_rows): (&[f32], RowLayout),
    (v, v_rows): (&[f32], RowLayout),
    o: &mut [f32],
    lse: &mut [f32],
) {
    let s = *shape;
    s.check_heads("attention_forward");
    assert_eq!(q.len(), s.q_rows() * s.qk_dim, "attention_forward: q is not [batch, q_heads, q_len, qk_dim]");
    assert!(k_rows.row >= s.qk_dim && v_rows.row >= s.v_dim, "attention_forward: rows overlap");
    assert!(
        k.len() >= k_rows.span(s.batch, s.kv_heads, s.kv_len, s.qk_dim),
        "attention_forward: k is too short for [batch, kv_heads, kv_len, qk_dim] in {k_rows:?}"
    );
    assert!(
        v.len() >= v_rows.span(s.batch, s.kv_heads, s.kv_len, s.v_dim),
        "attention_forward: v is too short for [batch, kv_heads, kv_len, v_dim] in {v_rows:?}"
    );
    assert_eq!(o.len(), s.q_rows() * s.v_dim, "attention_forward: o is not [batch, q_heads, q_len, v_dim]");
    assert_eq!(lse.len(), s.q_rows(), "attention_forward: lse is not [batch, q_heads, q_len]");
    if s.q_rows() == 0 {
        return;
    }
    if let Some(w) = s.widened() {
        // Zero-width rows hold nothing: the widened heads are contiguous zeros.
        let (k, v) = (s.widen_qk(k, s.kv_rows()), s.widen_v(v, s.kv_rows()));
        let k = if s.qk_dim == 0 { (&k[..], w.k_layout()) } else { (&k[..], k_rows) };
        let v = if s.v_dim == 0 { (&v[..], w.v_layout()) } else { (&v[..], v_rows) };
        let q = s.widen_qk(q, s.q_rows());
        let mut o_scratch = vec![0.0; if s.v_dim == 0 { s.q_rows() } else { 0 }];
        let o = if s.v_dim == 0 { &mut o_scratch[..] } else { o };
        return attention_forward_strided(&w, &q, k, v, o, lse);
    }
    // The query rows of a key/value head's group are contiguous: one task's transposed key tile
    // serves rows of every head of the group (all of them at once in a decode step, q_len = 1).
    let group_rows = s.group() * s.q_len;
    o.par_chunks_mut(group_rows * s.v_dim).zip(lse.par_chunks_mut(group_rows)).enumerate().for_each(
        |(bkv, (o, lse))| {
            let head = s.group_rows(bkv, q, (k, k_rows), (v, v_rows));
            o.par_chunks_mut(QUERY_BLOCK * s.v_dim)
                .zip(lse.par_chunks_mut(QUERY_BLOCK))
                .enumerate()
                .for_each(|(block, (o, lse))| forward_block_wide(&s, &head, block * QUERY_BLOCK, o, lse));
        },
    );
}

/// Backward of [`attention_forward`]; `dq`, `dk`, `dv` are overwritten.
pub fn attention_backward(
    shape: &AttnShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    d_o: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let s = *shape;
    s.check(q, k, v, "attention_backward");
    assert_eq!(o.len(), s.q_rows() * s.v_dim, "attention_backward: o is not [batch, q_heads, q_len, v_dim]");
    assert_eq!(d_o.len(), o.len(), "attention_backward: d_o is not [batch, q_heads, q_len, v_dim]");
    assert_eq!(lse.len(), s.q_rows(), "attention_backward: lse is not [batch, q_heads, q_len]");
    assert_eq!(dq.len(), q.len(), "attention_backward: dq is not shaped like q");
    assert_eq!(dk.len(), k.len(), "attention_backward: dk is not shaped like k");
    assert_eq!(dv.len(), v.len(), "attention_backward: dv is not shaped like v");
    if let Some(w) = s.widened() {
        let (q, k, v) = (s.widen_qk(q, s.q_rows()), s.widen_qk(k, s.kv_rows()), s.widen_v(v, s.kv_rows()));
        let (o, d_o) = (s.widen_v(o, s.q_rows()), s.widen_v(d_o, s.q_rows()));
        let (mut dq_scratch, mut dk_scratch, mut dv_scratch) = (vec![], vec![], vec![]);
        let (dq, dk) = if s.qk_dim == 0 {
            dq_scratch.resize(s.q_rows(), 0.0);
            dk_scratch.resize(s.kv_rows(), 0.0);
            (&mut dq_scratch[..], &mut dk_scratch[..])
        } else {
            (dq, dk)
        };
        let dv = if s.v_dim == 0 {
            dv_scratch.resize(s.kv_rows(), 0.0);
            &mut dv_scratch[..]
        } else {
            dv
        };
        return attention_backward(&w, &q, &k, &v, &o, lse, &d_o, dq, dk, dv);
    }

    // Pass 1, over query rows: dq, and D_i = dot(dO_i, O_i) for pass 2.
    let mut delta = vec![0.0f32; s.q_rows()];
    if s.q_rows() > 0 {
        let group_rows = s.group() * s.q_len;
        dq.par_chunks_mut(group_rows * s.qk_dim).zip(delta.par_chunks_mut(group_rows)).enumerate().for_each(
            |(bkv, (dq, delta))| {
                let head = s.group_rows(bkv, q, (k, s.k_layout()), (v, s.v_layout()));
                let rows = bkv * group_rows..(bkv + 1) * group_rows;
                let o = &o[rows.start * s.v_dim..rows.end * s.v_dim];
                let d_o = &d_o[rows.start * s.v_dim..rows.end * s.v_dim];
                let lse = &lse[rows];
                dq.par_chunks_mut(QUERY_BLOCK * s.qk_dim).zip(delta.par_chunks_mut(QUERY_BLOCK)).enumerate().for_each(
                    |(block, (dq, delta))| dq_block_wide(&s, &head, o, d_o, lse, block * QUERY_BLOCK, dq, delta),
                );
            },
        );
    }

    // Pass 2, over key blocks: dk and dv, each key summing over every query head of its group.
    if s.kv_rows() > 0 {
        let grads = QueryGrads { q, d_o, lse, delta: &delta };
        dk.par_chunks_mut(s.kv_len * s.qk_dim).zip(dv.par_chunks_mut(s.kv_len * s.v_dim)).enumerate().for_each(
            |(bkv, (dk, dv))| {
                dk.par_chunks_mut(KEY_BLOCK * s.qk_dim)
                    .zip(dv.par_chunks_mut(KEY_BLOCK * s.v_dim))
                    .enumerate()
                    .for_each(|(block, (dk, dv))| dkv_block_wide(&s, bkv, k, v, &grads, block * KEY_BLOCK, dk, dv));
            },
        );
    }
}

/// The query rows of one (batch, key/value head)'s group of query heads, head after head (packed
/// row `p` is query `p % q_len`), and that key/value head's rows (row `j` at `j * k_row`, `j *
/// v_row`).
struct Head<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    k_row: usize,
    v_row: usize,
}

/// Per-query inputs of the dk/dv pass, all batches and heads.
struct QueryGrads<'a> {
    q: &'a [f32],
    d_o: &'a [f32],
    lse: &'a [f32],
    delta: &'a [f32],
}

impl AttnShape {
    /// A shape with the usual softmax scale `1 / sqrt(qk_dim)`.
    pub fn new(
        batch: usize,
        (q_heads, kv_heads): (usize, usize),
        (q_len, kv_len): (usize, usize),
        (qk_dim, v_dim): (usize, usize),
        causal: bool,
    ) -> AttnShape {
        let scale = 1.0 / (qk_dim as f32).sqrt();
        AttnShape { batch, q_heads, kv_heads, q_len, kv_len, qk_dim, v_dim, scale, causal }
    }

    fn q_rows(&self) -> usize {
        self.batch * self.q_heads * self.q_len
    }

    fn kv_rows(&self) -> usize {
        self.batch * self.kv_heads * self.kv_len
    }

    /// Query heads per key/value head.
    fn group(&self) -> usize {
        self.q_heads / self.kv_heads
    }

    fn check_heads(&self, what: &str) {
        assert!(
            self.q_heads == 0 || (self.kv_heads > 0 && self.q_heads % self.kv_heads == 0),
            "{what}: q_heads {} is not a multiple of kv_heads {}",
            self.q_heads,
            self.kv_heads
        );
    }

    fn check(&self, q: &[f32], k: &[f32], v: &[f32], what: &str) {
        self.check_heads(what);
        assert_eq!(q.len(), self.q_rows() * self.qk_dim, "{what}: q is not [batch, q_heads, q_len, qk_dim]");
        assert_eq!(k.len(), self.kv_rows() * self.qk_dim, "{what}: k is not [batch, kv_heads, kv_len, qk_dim]");
        assert_eq!(v.len(), self.kv_rows() * self.v_dim, "{what}: v is not [batch, kv_heads, kv_len, v_dim]");
    }

    /// Heads of width 0 still define the attention pattern (all scores 0 when `qk_dim == 0`) and
    /// the logsumexp. They run as heads of width 1 holding zeros, which give exactly the same
    /// results; this is the shape to run then, `None` when no width is 0.
    fn widened(&self) -> Option<AttnShape> {
        (self.qk_dim == 0 || self.v_dim == 0).then_some(AttnShape {
            qk_dim: self.qk_dim.max(1),
            v_dim: self.v_dim.max(1),
            ..*self
        })
    }

    /// `x` ([rows, qk_dim]) as [rows, 1] zeros when `qk_dim == 0`, else unchanged.
    fn widen_qk<'a>(&self, x: &'a [f32], rows: usize) -> Cow<'a, [f32]> {
        if self.qk_dim == 0 {
            Cow::Owned(vec![0.0; rows])
        } else {
            Cow::Borrowed(x)
        }
    }

    /// `x` ([rows, v_dim]) as [rows, 1] zeros when `v_dim == 0`, else unchanged.
    fn widen_v<'a>(&self, x: &'a [f32], rows: usize) -> Cow<'a, [f32]> {
        if self.v_dim == 0 {
            Cow::Owned(vec![0.0; rows])
        } else {
            Cow::Borrowed(x)
        }
    }

    /// Number of keys query row `i` sees: `j <= i + kv_len - q_len`, i.e. `j < i + 1 + kv_len - q_len`.
    fn visible(&self, i: usize) -> usize {
        if self.causal {
            (i + 1 + self.kv_len).saturating_sub(self.q_len).min(self.kv_len)
        } else {
            self.kv_len
        }
    }

    /// First query row that sees key `j` (the inverse of [`Self::visible`]); `q_len` if none does.
    fn first_query(&self, j: usize) -> usize {
        if self.causal {
            (j + self.q_len).saturating_sub(self.kv_len).min(self.q_len)
        } else {
            0
        }
    }

    /// Keys `[batch, kv_heads, kv_len, qk_dim]` packed row-major.
    fn k_layout(&self) -> RowLayout {
        RowLayout::contiguous(self.kv_heads, self.kv_len, self.qk_dim)
    }

    /// Values `[batch, kv_heads, kv_len, v_dim]` packed row-major.
    fn v_layout(&self) -> RowLayout {
        RowLayout::contiguous(self.kv_heads, self.kv_len, self.v_dim)
    }

    /// Slices of the query heads of key/value head `bkv = b * kv_heads + kv` (query heads
    /// `b * q_heads + kv * group ..` onwards, contiguous) and of that key/value head's rows.
    fn group_rows<'a>(
        &self,
        bkv: usize,
        q: &'a [f32],
        (k, k_rows): (&'a [f32], RowLayout),
        (v, v_rows): (&'a [f32], RowLayout),
    ) -> Head<'a> {
        let rows = self.group() * self.q_len;
        let (b, kv) = (bkv / self.kv_heads.max(1), bkv % self.kv_heads.max(1));
        let k_span = k_rows.span(1, 1, self.kv_len, self.qk_dim);
        let v_span = v_rows.span(1, 1, self.kv_len, self.v_dim);
        Head {
            q: &q[bkv * rows * self.qk_dim..][..rows * self.qk_dim],
            k: &k[b * k_rows.batch + kv * k_rows.head..][..k_span],
            v: &v[b * v_rows.batch + kv * v_rows.head..][..v_span],
            k_row: k_rows.row,
            v_row: v_rows.row,
        }
    }

    /// Keys visible to packed row `p` of a group ([`Head`]).
    fn visible_packed(&self, p: usize) -> usize {
        self.visible(p % self.q_len)
    }

    /// Keys visible to any of the packed rows `row0..row0 + rows`.
    fn visible_any(&self, row0: usize, rows: usize) -> usize {
        (row0..row0 + rows).map(|p| self.visible_packed(p)).max().unwrap_or(0)
    }
}

// The blocks, built for AVX2 + FMA where the CPU has them (the same bits; `wide_fn!`).
wide_fn!(fn forward_block_wide => forward_block(s: &AttnShape, head: &Head, row0: usize, o: &mut [f32], lse: &mut [f32]));
wide_fn!(fn dq_block_wide => dq_block(
    s: &AttnShape, head: &Head, o: &[f32], d_o: &[f32], lse: &[f32], row0: usize, dq: &mut [f32], delta: &mut [f32],
));
wide_fn!(fn dkv_block_wide => dkv_block(
    s: &AttnShape, bkv: usize, k: &[f32], v: &[f32], g: &QueryGrads, key0: usize, dk: &mut [f32], dv: &mut [f32],
));

/// Forward for packed query rows `row0..row0 + lse.len()` of one group ([`Head`]), writing their
/// `o` rows and `lse`.
#[inline(always)]
fn forward_block(s: &AttnShape, head: &Head, row0: usize, o: &mut [f32], lse: &mut [f32]) {
    let (dqk, dv) = (s.qk_dim, s.v_dim);
    let rows = lse.len();
    // Running max and sum of exp(score - max) of each row; `o` holds the unnormalised sum.
    let mut max = [f32::NEG_INFINITY; QUERY_BLOCK];
    let mut sum = [0.0f32; QUERY_BLOCK];
    let mut k_t = vec![0.0f32; dqk * TILE];
    let mut p = [0.0f32; TILE];
    o.fill(0.0);
    // Tiles outer, rows inner: one transposed tile of keys serves the whole block of rows.
    let keys = s.visible_any(row0, rows);
    for t0 in (0..keys).step_by(TILE) {
        let t1 = (t0 + TILE).min(keys);
        transpose_tile(&head.k[t0 * head.k_row..], t1 - t0, head.k_row, &mut k_t);
        for r in 0..rows {
            let end = s.visible_packed(row0 + r).min(t1);
            if end <= t0 {
                continue;
            }
            scores(&head.q[(row0 + r) * dqk..][..dqk], &k_t, s.scale, &mut p);
            let p = &mut p[..end - t0];
            let tile_max = reduce::max(p);
            let o = &mut o[r * dv..][..dv];
            if tile_max > max[r] {
                let alpha = expf(max[r] - tile_max);
                sum[r] *= alpha;
                o.iter_mut().for_each(|x| *x *= alpha);
                max[r] = tile_max;
            }
            // Two loops, so that the exponentials vectorise; the sum keeps its order.
            p.iter_mut().for_each(|x| *x = expf(*x - max[r]));
            sum[r] = p.iter().fold(sum[r], |acc, &x| acc + x);
            add_weighted_rows(o, p, &head.v[t0 * head.v_row..], head.v_row);
        }
    }
    for r in 0..rows {
        if s.visible_packed(row0 + r) == 0 {
            // A fully masked row: output zeros (already there) and an empty logsumexp.
            lse[r] = f32::NEG_INFINITY;
            continue;
        }
        o[r * dv..][..dv].iter_mut().for_each(|x| *x /= sum[r]);
        lse[r] = max[r] + sum[r].ln();
    }
}

/// dq for packed query rows `row0..row0 + delta.len()` of one group ([`Head`]; `o`, `d_o`, `lse` are
/// the group's), and `delta = dot(dO, O)` of the same rows.
#[inline(always)]
fn dq_block(
    s: &AttnShape,
    head: &Head,
    o: &[f32],
    d_o: &[f32],
    lse: &[f32],
    row0: usize,
    dq: &mut [f32],
    delta: &mut [f32],
) {
    let (dqk, dv) = (s.qk_dim, s.v_dim);
    let rows = delta.len();
    for (r, delta) in delta.iter_mut().enumerate() {
        let i = row0 + r;
        *delta = reduce::dot::<DOT_LANES>(&d_o[i * dv..][..dv], &o[i * dv..][..dv]);
    }
    let (mut k_t, mut v_t) = (vec![0.0f32; dqk * TILE], vec![0.0f32; dv * TILE]);
    let (mut p, mut dp) = ([0.0f32; TILE], [0.0f32; TILE]);
    dq.fill(0.0);
    let keys = s.visible_any(row0, rows);
    for t0 in (0..keys).step_by(TILE) {
        let t1 = (t0 + TILE).min(keys);
        transpose_tile(&head.k[t0 * head.k_row..], t1 - t0, head.k_row, &mut k_t);
        transpose_tile(&head.v[t0 * head.v_row..], t1 - t0, head.v_row, &mut v_t);
        for r in 0..rows {
            let i = row0 + r;
            let end = s.visible_packed(i).min(t1);
            if end <= t0 {
                continue;
            }
            scores(&head.q[i * dqk..][..dqk], &k_t, s.scale, &mut p);
            scores(&d_o[i * dv..][..dv], &v_t, 1.0, &mut dp);
            // The scores in `p` become dS = P * (dP - D).
            for (x, &dp) in p[..end - t0].iter_mut().zip(&dp) {
                let prob = expf(*x - lse[i]);
                *x = prob * (dp - delta[r]);
            }
            add_weighted_rows(&mut dq[r * dqk..][..dqk], &p[..end - t0], &head.k[t0 * head.k_row..], head.k_row);
        }
    }
    dq.iter_mut().for_each(|x| *x *= s.scale);
}

/// dk and dv for keys `key0..key0 + dk.len() / qk_dim` of key/value head `bkv = b * kv_heads + kv`.
#[inline(always)]
fn dkv_block(
    s: &AttnShape,
    bkv: usize,
    k: &[f32],
    v: &[f32],
    g: &QueryGrads,
    key0: usize,
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let (dqk, dvd) = (s.qk_dim, s.v_dim);
    let keys = dk.len() / dqk;
    let k = &k[(bkv * s.kv_len + key0) * dqk..][..keys * dqk];
    let v = &v[(bkv * s.kv_len + key0) * dvd..][..keys * dvd];
    let (mut q_t, mut d_o_t) = (vec![0.0f32; dqk * TILE], vec![0.0f32; dvd * TILE]);
    let (mut p, mut ds) = ([0.0f32; TILE], [0.0f32; TILE]);
    dk.fill(0.0);
    dv.fill(0.0);
    let (b, kv_head) = (bkv / s.kv_heads, bkv % s.kv_heads);
    for h in kv_head * s.group()..(kv_head + 1) * s.group() {
        let rows = (b * s.q_heads + h) * s.q_len..(b * s.q_heads + h + 1) * s.q_len;
        let q = &g.q[rows.start * dqk..rows.end * dqk];
        let d_o = &g.d_o[rows.start * dvd..rows.end * dvd];
        let (lse, delta) = (&g.lse[rows.clone()], &g.delta[rows]);
        // Query tiles outer, keys inner: one transposed tile of q and dO serves the whole key block.
        for i0 in (s.first_query(key0)..s.q_len).step_by(TILE) {
            let i1 = (i0 + TILE).min(s.q_len);
            transpose_tile(&q[i0 * dqk..], i1 - i0, dqk, &mut q_t);
            transpose_tile(&d_o[i0 * dvd..], i1 - i0, dvd, &mut d_o_t);
            for j in 0..keys {
                let first = s.first_query(key0 + j).max(i0);
                if first >= i1 {
                    continue;
                }
                // The same products summed in the same order as the forward: identical scores.
                let (kj, vj) = (&k[j * dqk..][..dqk], &v[j * dvd..][..dvd]);
                scores(kj, &q_t, s.scale, &mut p);
                scores(vj, &d_o_t, 1.0, &mut ds); // dP for now; dS below
                let tile = first - i0..i1 - i0;
                for (r, i) in tile.clone().zip(first..i1) {
                    let prob = expf(p[r] - lse[i]);
                    (p[r], ds[r]) = (prob, prob * (ds[r] - delta[i]));
                }
                add_weighted_rows(&mut dv[j * dvd..][..dvd], &p[tile.clone()], &d_o[first * dvd..], dvd);
                add_weighted_rows(&mut dk[j * dqk..][..dqk], &ds[tile], &q[first * dqk..], dqk);
            }
        }
    }
    dk.iter_mut().for_each(|x| *x *= s.scale);
}

/// Writes `n <= TILE` rows of `dim` (row `j` at `rows[j * stride..]`) transposed into `out`
/// ([dim, TILE]), zero past column n.
#[inline(always)]
fn transpose_tile(rows: &[f32], n: usize, stride: usize, out: &mut [f32]) {
    let dim = out.len() / TILE;
    for (c, col) in out.chunks_exact_mut(TILE).enumerate() {
        for (j, x) in col[..n].iter_mut().enumerate() {
            *x = rows[j * stride + c];
        }
        col[n..].fill(0.0);
    }
    debug_assert!(n == 0 || rows.len() >= (n - 1) * stride + dim);
}

/// `out[j] = scale * dot(x, row j of the tile)` for every column of a transposed tile `t`
/// ([x.len(), TILE]): a register-blocked axpy over `x` instead of TILE horizontal reductions. Each
/// entry sums `x[c] * t[c, j]` in order of `c`.
#[inline(always)]
fn scores(x: &[f32], t: &[f32], scale: f32, out: &mut [f32; TILE]) {
    out.fill(0.0);
    add_weighted_rows(out, x, t, TILE);
    out.iter_mut().for_each(|s| *s *= scale);
}

/// Output elements [`add_weighted_rows`] holds in registers while the rows stream by. Each update
/// is a multiply then an add (never contracted to an FMA, so both builds give the same bits): 8
/// AVX registers of independent elements keep both vector ports busy, about 1.25x the throughput
/// of 4. The width does not change the bits: each element sums its rows in order whatever it is.
const LANES: usize = 64;
/// Partial sums of `delta = dot(dO, O)` (this fixes its summation order).
const DOT_LANES: usize = 32;

/// `out += sum_r w[r] * rows[r]`, row `r` of `out.len()` values starting at `rows[r * stride..]`.
/// Each output element accumulates in row order; a block of them is held in registers across all
/// the rows.
#[inline(always)]
fn add_weighted_rows(out: &mut [f32], w: &[f32], rows: &[f32], stride: usize) {
    let len = out.len();
    let row = |r: usize| &rows[r * stride..][..len];
    let (main, tail) = out.split_at_mut(len - len % LANES);
    for (c, out) in main.chunks_exact_mut(LANES).enumerate() {
        let mut acc: [f32; LANES] = (&*out).try_into().unwrap();
        for (r, &w) in w.iter().enumerate() {
            let row: &[f32; LANES] = row(r)[c * LANES..][..LANES].try_into().unwrap();
            for l in 0..LANES {
                acc[l] += w * row[l];
            }
        }
        out.copy_from_slice(&acc);
    }
    let start = main.len();
    for (r, &w) in w.iter().enumerate() {
        for (o, &x) in tail.iter_mut().zip(&row(r)[start..]) {
            *o += w * x;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_util::{assert_close, bits, Rng};

    /// Random q, k, v, d_o for a shape.
    fn inputs(s: &AttnShape, seed: u64) -> [Vec<f32>; 4] {
        let mut rng = Rng::new(seed);
        [
            rng.vec(s.q_rows() * s.qk_dim, 1.0),
            rng.vec(s.kv_rows() * s.qk_dim, 1.0),
            rng.vec(s.kv_rows() * s.v_dim, 1.0),
            rng.vec(s.q_rows() * s.v_dim, 1.0),
        ]
    }

    fn to_f64(x: &[f32]) -> Vec<f64> {
        x.iter().map(|&v| v as f64).collect()
    }

    /// The full probability matrix of query head (b, h) in f64, `None` for masked entries.
    fn reference_probs(s: &AttnShape, q: &[f64], k: &[f64], b: usize, h: usize) -> Vec<Vec<Option<f64>>> {
        let kv = b * s.kv_heads + h / (s.q_heads / s.kv_heads);
        (0..s.q_len)
            .map(|i| {
                let qi = &q[((b * s.q_heads + h) * s.q_len + i) * s.qk_dim..][..s.qk_dim];
                let scores: Vec<Option<f64>> = (0..s.kv_len)
                    .map(|j| {
                        let masked = s.causal && j as isize > i as isize + s.kv_len as isize - s.q_len as isize;
                        let kj = &k[(kv * s.kv_len + j) * s.qk_dim..][..s.qk_dim];
                        (!masked).then(|| s.scale as f64 * qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>())
                    })
                    .collect();
                let max = scores.iter().flatten().fold(f64::NEG_INFINITY, |m, &x| m.max(x));
                let sum: f64 = scores.iter().flatten().map(|x| (x - max).exp()).sum();
                scores.iter().map(|x| x.map(|x| (x - max).exp() / sum)).collect()
            })
            .collect()
    }

    /// f64 reference forward: (o, lse).
    fn reference_forward(s: &AttnShape, q: &[f64], k: &[f64], v: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let (mut o, mut lse) = (vec![0.0; s.q_rows() * s.v_dim], vec![f64::NEG_INFINITY; s.q_rows()]);
        for b in 0..s.batch {
            for h in 0..s.q_heads {
                let kv = b * s.kv_heads + h / (s.q_heads / s.kv_heads);
                for (i, probs) in reference_probs(s, q, k, b, h).iter().enumerate() {
                    let row = (b * s.q_heads + h) * s.q_len + i;
                    let qi = &q[row * s.qk_dim..][..s.qk_dim];
                    let mut scores = vec![];
                    for (j, p) in probs.iter().enumerate() {
                        if let Some(p) = p {
                            let kj = &k[(kv * s.kv_len + j) * s.qk_dim..][..s.qk_dim];
                            scores.push(s.scale as f64 * qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>());
                            for c in 0..s.v_dim {
                                o[row * s.v_dim + c] += p * v[(kv * s.kv_len + j) * s.v_dim + c];
                            }
                        }
                    }
                    if !scores.is_empty() {
                        let max = scores.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x));
                        lse[row] = max + scores.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
                    }
                }
            }
        }
        (o, lse)
    }

    /// f64 reference backward from the materialised probabilities: (dq, dk, dv).
    fn reference_backward(s: &AttnShape, q: &[f64], k: &[f64], v: &[f64], d_o: &[f64]) -> [Vec<f64>; 3] {
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        let scale = s.scale as f64;
        for b in 0..s.batch {
            for h in 0..s.q_heads {
                let kv = b * s.kv_heads + h / (s.q_heads / s.kv_heads);
                for (i, probs) in reference_probs(s, q, k, b, h).iter().enumerate() {
                    let row = (b * s.q_heads + h) * s.q_len + i;
                    let d_oi = &d_o[row * s.v_dim..][..s.v_dim];
                    // dP_ij = dO_i . v_j;  dS_ij = P_ij (dP_ij - sum_l P_il dP_il).
                    let dp: Vec<f64> = (0..s.kv_len)
                        .map(|j| {
                            d_oi.iter().zip(&v[(kv * s.kv_len + j) * s.v_dim..][..s.v_dim]).map(|(a, b)| a * b).sum()
                        })
                        .collect();
                    let d: f64 = probs.iter().zip(&dp).map(|(p, dp)| p.unwrap_or(0.0) * dp).sum();
                    for (j, p) in probs.iter().enumerate() {
                        let Some(p) = *p else { continue };
                        let ds = p * (dp[j] - d);
                        for c in 0..s.qk_dim {
                            dq[row * s.qk_dim + c] += scale * ds * k[(kv * s.kv_len + j) * s.qk_dim + c];
                            dk[(kv * s.kv_len + j) * s.qk_dim + c] += scale * ds * q[row * s.qk_dim + c];
                        }
                        for c in 0..s.v_dim {
                            dv[(kv * s.kv_len + j) * s.v_dim + c] += p * d_oi[c];
                        }
                    }
                }
            }
        }
        [dq, dk, dv]
    }

    fn run_forward(s: &AttnShape, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (mut o, mut lse) = (vec![f32::NAN; s.q_rows() * s.v_dim], vec![f32::NAN; s.q_rows()]);
        attention_forward(s, q, k, v, &mut o, &mut lse);
        (o, lse)
    }

    fn run_backward(s: &AttnShape, [q, k, v, d_o]: &[Vec<f32>; 4]) -> [Vec<f32>; 3] {
        let (o, lse) = run_forward(s, q, k, v);
        let (mut dq, mut dk, mut dv) = (vec![f32::NAN; q.len()], vec![f32::NAN; k.len()], vec![f32::NAN; v.len()]);
        attention_backward(s, q, k, v, &o, &lse, d_o, &mut dq, &mut dk, &mut dv);
        [dq, dk, dv]
    }

    /// Forward and backward against the f64 reference.
    fn check(s: AttnShape, seed: u64) {
        let data = inputs(&s, seed);
        let [q, k, v, d_o] = &data;
        let (q64, k64, v64, d_o64) = (to_f64(q), to_f64(k), to_f64(v), to_f64(d_o));

        let (o, lse) = run_forward(&s, q, k, v);
        let (want_o, want_lse) = reference_forward(&s, &q64, &k64, &v64);
        assert_close(&o, &want_o, 1e-5, "o");
        for (i, (&l, &w)) in lse.iter().zip(&want_lse).enumerate() {
            if w == f64::NEG_INFINITY {
                assert_eq!(l, f32::NEG_INFINITY, "lse[{i}] of a fully masked row");
                assert!(o[i * s.v_dim..][..s.v_dim].iter().all(|&x| x == 0.0), "o row {i} of a fully masked row");
            } else {
                assert!((l as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()), "lse[{i}]: {l} vs {w}");
            }
        }

        let [dq, dk, dv] = run_backward(&s, &data);
        let [want_dq, want_dk, want_dv] = reference_backward(&s, &q64, &k64, &v64, &d_o64);
        assert_close(&dq, &want_dq, 1e-5, "dq");
        assert_close(&dk, &want_dk, 1e-5, "dk");
        assert_close(&dv, &want_dv, 1e-5, "dv");
    }

    #[test]
    fn reference_backward_matches_finite_differences() {
        // Causal with q_len > kv_len, so the first query row sees no key at all.
        for s in [AttnShape::new(1, (2, 1), (3, 5), (4, 3), true), AttnShape::new(1, (2, 2), (4, 3), (3, 2), true)] {
            let [q, k, v, d_o] = inputs(&s, 17).map(|x| to_f64(&x));
            let [dq, dk, dv] = reference_backward(&s, &q, &k, &v, &d_o);
            let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
                reference_forward(&s, q, k, v).0.iter().zip(&d_o).map(|(o, d)| o * d).sum()
            };
            let h = 1e-5;
            let fd = |x: &[f64], i: usize, f: &dyn Fn(&[f64]) -> f64| {
                let (mut xp, mut xm) = (x.to_vec(), x.to_vec());
                xp[i] += h;
                xm[i] -= h;
                (f(&xp) - f(&xm)) / (2.0 * h)
            };
            for i in 0..q.len() {
                let g = fd(&q, i, &|x| loss(x, &k, &v));
                assert!((g - dq[i]).abs() < 1e-8, "dq[{i}]: fd {g} vs {}", dq[i]);
            }
            for i in 0..k.len() {
                let g = fd(&k, i, &|x| loss(&q, x, &v));
                assert!((g - dk[i]).abs() < 1e-8, "dk[{i}]: fd {g} vs {}", dk[i]);
            }
            for i in 0..v.len() {
                let g = fd(&v, i, &|x| loss(&q, &k, x));
                assert!((g - dv[i]).abs() < 1e-8, "dv[{i}]: fd {g} vs {}", dv[i]);
            }
        }
    }

    #[test]
    fn gqa_causal_odd_sizes_across_tiles() {
        check(AttnShape::new(2, (4, 2), (67, 67), (24, 20), true), 1);
        check(AttnShape::new(1, (4, 2), (131, 131), (33, 40), true), 2);
    }

    #[test]
    fn mqa_causal_short_query_block_at_the_end_of_the_keys() {
        check(AttnShape::new(1, (3, 1), (5, 130), (40, 33), true), 3);
        check(AttnShape::new(2, (2, 1), (70, 150), (16, 16), true), 4);
    }

    #[test]
    fn non_causal_with_distinct_head_dims() {
        check(AttnShape::new(1, (2, 2), (70, 45), (64, 32), false), 5);
        check(AttnShape::new(2, (4, 1), (3, 200), (7, 65), false), 6);
    }

    #[test]
    fn mla_sized_heads() {
        check(AttnShape::new(1, (2, 1), (80, 80), (192, 128), true), 7);
    }

    #[test]
    fn fully_masked_rows_give_zeros_and_no_gradient() {
        // Causal with q_len > kv_len: query i sees keys j <= i - 6, so rows 0..6 see nothing.
        let s = AttnShape::new(1, (2, 1), (9, 3), (5, 4), true);
        check(s, 8);
        let data = inputs(&s, 8);
        let (o, lse) = run_forward(&s, &data[0], &data[1], &data[2]);
        let [dq, _, _] = run_backward(&s, &data);
        for row in (0..6).chain(9..15) {
            assert_eq!(lse[row], f32::NEG_INFINITY);
            assert!(o[row * s.v_dim..][..s.v_dim].iter().all(|&x| x == 0.0));
            assert!(dq[row * s.qk_dim..][..s.qk_dim].iter().all(|&x| x == 0.0));
        }
        assert!(lse[6].is_finite());
        // No keys at all: every row is fully masked, causal or not.
        for causal in [false, true] {
            let s = AttnShape::new(1, (2, 1), (3, 0), (4, 4), causal);
            let data = inputs(&s, 9);
            let (o, lse) = run_forward(&s, &data[0], &data[1], &data[2]);
            assert!(o.iter().all(|&x| x == 0.0) && lse.iter().all(|&x| x == f32::NEG_INFINITY));
            let [dq, dk, dv] = run_backward(&s, &data);
            assert!(dq.iter().all(|&x| x == 0.0) && dk.is_empty() && dv.is_empty());
        }
    }

    #[test]
    fn zero_width_heads() {
        // qk_dim 0: every score is 0, so each row averages the values it sees.
        let s = AttnShape { scale: 0.5, ..AttnShape::new(1, (2, 1), (3, 5), (0, 4), true) };
        let data = inputs(&s, 13);
        let (o, lse) = run_forward(&s, &data[0], &data[1], &data[2]);
        let (want_o, want_lse) = reference_forward(&s, &[], &[], &to_f64(&data[2]));
        assert_close(&o, &want_o, 1e-6, "o");
        for (i, (&l, &w)) in lse.iter().zip(&want_lse).enumerate() {
            assert!((l as f64 - w).abs() < 1e-6, "lse[{i}]: {l} vs {w}");
        }
        let [dq, dk, dv] = run_backward(&s, &data);
        assert!(dq.is_empty() && dk.is_empty());
        let [_, _, want_dv] = reference_backward(&s, &[], &[], &to_f64(&data[2]), &to_f64(&data[3]));
        assert_close(&dv, &want_dv, 1e-6, "dv");

        // v_dim 0: no output, but the logsumexp is that of the scores as usual.
        let s0 = AttnShape::new(1, (2, 1), (3, 5), (4, 0), true);
        let s1 = AttnShape { v_dim: 3, ..s0 };
        let data = inputs(&s1, 14);
        let (_, want_lse) = run_forward(&s1, &data[0], &data[1], &data[2]);
        let (o, lse) = run_forward(&s0, &data[0], &data[1], &[]);
        assert!(o.is_empty());
        assert_eq!(lse, want_lse);
        let (mut dq, mut dk) = (vec![f32::NAN; data[0].len()], vec![f32::NAN; data[1].len()]);
        attention_backward(&s0, &data[0], &data[1], &[], &[], &lse, &[], &mut dq, &mut dk, &mut []);
        assert!(dq.iter().chain(&dk).all(|&x| x == 0.0));
    }

    #[test]
    fn empty_inputs_are_no_ops() {
        for s in [AttnShape::new(0, (4, 2), (8, 8), (8, 8), true), AttnShape::new(2, (4, 2), (0, 5), (8, 8), true)] {
            let data = inputs(&s, 10);
            let (o, lse) = run_forward(&s, &data[0], &data[1], &data[2]);
            assert!(o.is_empty() && lse.is_empty());
            let [dq, dk, dv] = run_backward(&s, &data);
            // With no queries, keys get no gradient.
            assert!(dq.is_empty() && dk.iter().chain(&dv).all(|&x| x == 0.0));
        }
    }

    #[test]
    fn independent_of_the_thread_count() {
        let s = AttnShape::new(2, (4, 2), (100, 120), (48, 40), true);
        let data = inputs(&s, 12);
        let run = |threads| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let (o, lse) = run_forward(&s, &data[0], &data[1], &data[2]);
                let [dq, dk, dv] = run_backward(&s, &data);
                [o, lse, dq, dk, dv].map(|x| bits(&x))
            })
        };
        assert_eq!(run(1), run(3));
    }

    /// Grouped heads share their key tiles (the rows of a group are packed into one task's
    /// blocks), which must not change a bit: GQA and MQA equal the same attention with every
    /// query head given its own copy of its key/value head, forward and dq, for prefill, for a
    /// query block spanning heads (q_len 5), and for a decode step.
    #[test]
    fn grouped_heads_equal_their_heads_with_copied_keys_bit_for_bit() {
        for (q_heads, kv_heads, q_len, kv_len) in [(4, 2, 100, 100), (8, 1, 5, 70), (6, 3, 1, 90), (8, 1, 1, 130)] {
            let s = AttnShape::new(2, (q_heads, kv_heads), (q_len, kv_len), (48, 40), true);
            let data = inputs(&s, 31);
            let group = q_heads / kv_heads;
            // K and V with each key/value head repeated for every query head of its group.
            let repeat = |x: &[f32], dim: usize| -> Vec<f32> {
                x.chunks(kv_len * dim).flat_map(|head| std::iter::repeat_n(head, group).flatten().copied()).collect()
            };
            let mha = AttnShape::new(2, (q_heads, q_heads), (q_len, kv_len), (48, 40), true);
            let copied = [data[0].clone(), repeat(&data[1], 48), repeat(&data[2], 40), data[3].clone()];
            let (o, lse) = run_forward(&s, &data[0], &data[1], &data[2]);
            let (o_mha, lse_mha) = run_forward(&mha, &copied[0], &copied[1], &copied[2]);
            assert_eq!(bits(&o), bits(&o_mha), "o of {s:?}");
            assert_eq!(bits(&lse), bits(&lse_mha), "lse of {s:?}");
            let [dq, ..] = run_backward(&s, &data);
            let [dq_mha, ..] = run_backward(&mha, &copied);
            assert_eq!(bits(&dq), bits(&dq_mha), "dq of {s:?}");
        }
    }

    #[test]
    fn deterministic() {
        let s = AttnShape::new(2, (4, 2), (100, 120), (48, 40), true);
        let data = inputs(&s, 11);
        let run = || {
            let (o, lse) = run_forward(&s, &data[0], &data[1], &data[2]);
            let [dq, dk, dv] = run_backward(&s, &data);
            [o, lse, dq, dk, dv].map(|x| bits(&x))
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn keys_and_values_read_in_place_give_the_bits_of_their_contiguous_copies() {
        // A decode cache: the first kv_len positions of buffers of `cap` positions per head, and
        // an MLA latent whose value is its first v_dim columns (rows of qk_dim).
        for (q_heads, kv_heads, q_len, kv_len, cap) in [(4, 2, 1, 70, 100), (8, 1, 3, 130, 131), (2, 2, 5, 5, 9)] {
            let (batch, qk, vd) = (2, 40, 24);
            let s = AttnShape::new(batch, (q_heads, kv_heads), (q_len, kv_len), (qk, vd), true);
            let mut rng = Rng::new(7);
            let q = rng.vec(s.q_rows() * qk, 1.0);
            let buffer = rng.vec(batch * kv_heads * cap * qk, 1.0);
            let k_rows = RowLayout { batch: kv_heads * cap * qk, head: cap * qk, row: qk };
            // The contiguous copies of the views: keys, and the latent's first vd columns.
            let (mut k, mut v) = (Vec::new(), Vec::new());
            for bh in 0..batch * kv_heads {
                for j in 0..kv_len {
                    let row = &buffer[bh * cap * qk + j * qk..][..qk];
                    k.extend_from_slice(row);
                    v.extend_from_slice(&row[..vd]);
                }
            }
            let (o, lse) = run_forward(&s, &q, &k, &v);
            let (mut o_view, mut lse_view) = (vec![f32::NAN; o.len()], vec![f32::NAN; lse.len()]);
            attention_forward_strided(&s, &q, (&buffer, k_rows), (&buffer, k_rows), &mut o_view, &mut lse_view);
            assert_eq!(bits(&o), bits(&o_view), "o of {s:?} in {cap} positions");
            assert_eq!(bits(&lse), bits(&lse_view), "lse of {s:?} in {cap} positions");
        }
    }
}
