//! The CUDA kernels: the embedded PTX is current (checked on every machine, no nvcc needed), and
//! on a machine with a GPU every kernel agrees with its CPU twin. Without a GPU those tests print
//! that they were skipped and why.

use std::path::Path;

use whale_kernels::cpu::adamw::{adamw_step, AdamWStep};
use whale_kernels::cpu::attention::{attention_forward, AttnShape};
use whale_kernels::cpu::cross_entropy::{cross_entropy_backward, cross_entropy_forward};
use whale_kernels::cpu::embedding::{embedding_backward, embedding_forward};
use whale_kernels::cpu::fp8::{Fp8Blocks, Fp8Format, ScaleFormat};
use whale_kernels::cpu::fp8_gemm::{fp8_gemm, Accumulation};
use whale_kernels::cpu::rmsnorm::{rmsnorm_backward, rmsnorm_forward};
use whale_kernels::cpu::rope::{rope_half, rope_interleaved};
use whale_kernels::cpu::softmax::{softmax_backward, softmax_forward};
use whale_kernels::cpu::swiglu::{swiglu_backward, swiglu_forward};
use whale_kernels::cuda::{device_count, manifest, source_hash, Gpu};

#[test]
fn the_embedded_ptx_was_built_from_the_current_sources() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../kernels");
    let hash = source_hash(&dir).unwrap();
    assert_eq!(
        hash,
        manifest::SOURCE_HASH,
        "kernels/*.cu changed since the PTX was generated: run `cargo xtask build-kernels`"
    );
    assert!(!manifest::MODULES.is_empty());
    for m in manifest::MODULES {
        for (arch, ptx) in [("sm_90", m.sm_90), ("sm_80", m.sm_80)] {
            assert!(ptx.contains(&format!(".target {arch}")), "{}: {arch} PTX has the wrong target", m.name);
            for k in m.kernels {
                assert!(ptx.contains(&format!(".entry {k}(")), "{}: {k} is missing from its {arch} PTX", m.name);
            }
        }
    }
}

/// The GPU, or `None` after saying why the test is skipped.
fn gpu(test: &str) -> Option<Gpu> {
    if device_count() == 0 {
        eprintln!("{test}: skipped, no CUDA driver or GPU on this machine");
        return None;
    }
    Some(Gpu::new(0).expect("a visible GPU opens"))
}

/// Deterministic values in about [-2, 2].
fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 4.0 - 2.0
        })
        .collect()
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}[{i}]: GPU {g} vs CPU {w}");
    }
}

#[test]
fn elementwise_kernels_match_the_cpu() {
    let Some(g) = gpu("elementwise_kernels_match_the_cpu") else { return };
    let (a, b) = (values(1000, 1), values(1000, 2));
    let add: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    let mul: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x * y).collect();
    assert_eq!(g.add(&a, &b).unwrap(), add);
    assert_eq!(g.mul(&a, &b).unwrap(), mul);
    let mut sw = vec![0.0; 1000];
    swiglu_forward(&a, &b, &mut sw);
    // expf on the GPU and exp on the CPU differ in the last bits.
    assert_close("swiglu", &g.swiglu_forward(&a, &b).unwrap(), &sw, 1e-6);
}

#[test]
fn row_kernels_match_the_cpu() {
    let Some(g) = gpu("row_kernels_match_the_cpu") else { return };
    for dim in [7, 256, 1000] {
        let rows = 5;
        let (x, w) = (values(rows * dim, 3), values(dim, 4));
        let (mut y, mut rstd) = (vec![0.0; rows * dim], vec![0.0; rows]);
        rmsnorm_forward(&x, &w, dim, 1e-6, &mut y, &mut rstd);
        let (gy, grstd) = g.rmsnorm_forward(&x, &w, dim, 1e-6).unwrap();
        // Sums in another order (a tree in shared memory) and rsqrtf: f32 rounding.
        assert_close("rmsnorm y", &gy, &y, 1e-5);
        assert_close("rmsnorm rstd", &grstd, &rstd, 1e-5);
        let mut s = vec![0.0; rows * dim];
        softmax_forward(&x, dim, &mut s);
        assert_close("softmax", &g.softmax_forward(&x, dim).unwrap(), &s, 1e-5);
    }
}

#[test]
fn adamw_matches_the_cpu() {
    let Some(g) = gpu("adamw_matches_the_cpu") else { return };
    let n = 5000;
    let (mut p, grad, mut m, mut v) = (values(n, 5), values(n, 6), values(n, 7), values(n, 8));
    v.iter_mut().for_each(|x| *x = x.abs());
    let (mut p2, mut m2, mut v2) = (p.clone(), m.clone(), v.clone());
    let hp = AdamWStep { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step: 3 };
    adamw_step(&mut p, &grad, &mut m, &mut v, &hp);
    g.adamw_step(&mut p2, &grad, &mut m2, &mut v2, &hp).unwrap();
    assert_close("adamw param", &p2, &p, 1e-6);
    assert_close("adamw m", &m2, &m, 1e-6);
    assert_close("adamw v", &v2, &v, 1e-6);
}

#[test]
fn fp8_kernels_match_the_cpu() {
    let Some(g) = gpu("fp8_kernels_match_the_cpu") else { return };
    // Ragged: 130 rows (two weight blocks), K = 300 (three tiles, one partial).
    let (m, n, k) = (33, 130, 300);
    let x: Vec<f32> = values(m * k, 9).iter().enumerate().map(|(i, v)| v * (1 + i % 5) as f32).collect();
    let cpu = Fp8Blocks::quantize(&x, m, k, (1, 128), Fp8Format::E4M3, ScaleFormat::F32);
    let gpu_q = g.fp8_quantize_1x128(&x, m, k).unwrap();
    assert_eq!(gpu_q.scales, cpu.scales, "tile scales");
    assert_eq!(gpu_q.codes, cpu.codes, "E4M3 codes (CUDA's converter against ours)");
    let w = values(n * k, 10);
    let wq = Fp8Blocks::quantize(&w, n, k, (128, 128), Fp8Format::E4M3, ScaleFormat::F32);
    let want = fp8_gemm(&cpu, &wq, Accumulation::F32);
    let got = g.fp8_gemm(&cpu, &wq).unwrap();
    let scale = want.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        // Each block's partial sum runs in another order than the CPU's GEMM: f32 rounding.
        assert!((a - b).abs() <= 1e-5 * scale, "fp8 gemm[{i}]: GPU {a} vs CPU {b}");
    }
}

#[test]
fn backward_kernels_match_the_cpu() {
    let Some(g) = gpu("backward_kernels_match_the_cpu") else { return };
    let n = 999;
    let (gate, up, dout) = (values(n, 11), values(n, 12), values(n, 13));
    let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
    swiglu_backward(&gate, &up, &dout, Some(&mut dg), Some(&mut du));
    let (gdg, gdu) = g.swiglu_backward(&gate, &up, &dout).unwrap();
    assert_close("swiglu dgate", &gdg, &dg, 1e-5);
    assert_close("swiglu dup", &gdu, &du, 1e-5);

    let (rows, dim) = (6, 300);
    let (x, w, dy) = (values(rows * dim, 14), values(dim, 15), values(rows * dim, 16));
    let (mut y, mut rstd) = (vec![0.0; rows * dim], vec![0.0; rows]);
    rmsnorm_forward(&x, &w, dim, 1e-6, &mut y, &mut rstd);
    let (mut dx, mut dw) = (vec![0.0; rows * dim], vec![0.0; dim]);
    rmsnorm_backward(&x, &w, &rstd, &dy, dim, Some(&mut dx), Some(&mut dw));
    let (gdx, gdw) = g.rmsnorm_backward(&x, &w, &rstd, &dy).unwrap();
    assert_close("rmsnorm dx", &gdx, &dx, 1e-5);
    assert_close("rmsnorm dweight", &gdw, &dw, 1e-5);

    let mut s = vec![0.0; rows * dim];
    softmax_forward(&x, dim, &mut s);
    let mut ds = vec![0.0; rows * dim];
    softmax_backward(&s, &dy, dim, &mut ds);
    assert_close("softmax dx", &g.softmax_backward(&s, &dy, dim).unwrap(), &ds, 1e-5);
}

#[test]
fn cross_entropy_matches_the_cpu() {
    let Some(g) = gpu("cross_entropy_matches_the_cpu") else { return };
    let (rows, vocab) = (9, 1000);
    let logits: Vec<f32> = values(rows * vocab, 17).iter().map(|v| 4.0 * v).collect();
    let targets: Vec<i64> = (0..rows as i64).map(|r| if r == 4 { -100 } else { (r * 97) % vocab as i64 }).collect();
    let (mut loss, mut lse) = (vec![0.0; rows], vec![0.0; rows]);
    cross_entropy_forward(&logits, vocab, &targets, -100, &mut loss, &mut lse);
    let (gl, glse) = g.cross_entropy_forward(&logits, vocab, &targets, -100).unwrap();
    assert_close("cross entropy loss", &gl, &loss, 1e-5);
    assert_close("cross entropy lse", &glse, &lse, 1e-5);
    let dloss = values(rows, 18);
    let mut dx = vec![0.0; rows * vocab];
    cross_entropy_backward(&logits, vocab, &targets, -100, &lse, &dloss, &mut dx);
    assert_close(
        "cross entropy dlogits",
        &g.cross_entropy_backward(&logits, vocab, &targets, -100, &lse, &dloss).unwrap(),
        &dx,
        1e-5,
    );
    assert!(g.cross_entropy_forward(&logits, vocab, &[5000; 9], -100).is_err(), "an out-of-range target is an error");
}

#[test]
fn rope_matches_the_cpu_both_ways_and_both_pairings() {
    let Some(g) = gpu("rope_matches_the_cpu_both_ways_and_both_pairings") else { return };
    let (outer, seq, heads, d) = (2, 5, 3, 16);
    let x = values(outer * seq * heads * d, 19);
    let angles: Vec<f32> = (0..seq * d / 2).map(|i| (i / (d / 2)) as f32 * 0.37 / (1 + i % (d / 2)) as f32).collect();
    let (cos, sin): (Vec<f32>, Vec<f32>) = angles.iter().map(|a| (a.cos(), a.sin())).unzip();
    for interleaved in [true, false] {
        for inverse in [false, true] {
            let mut y = vec![0.0; x.len()];
            let f = if interleaved { rope_interleaved } else { rope_half };
            f(&x, &cos, &sin, outer, seq, heads, d, inverse, &mut y);
            let got = g.rope(&x, &cos, &sin, (outer, seq, heads, d), interleaved, inverse).unwrap();
            assert_close(&format!("rope interleaved={interleaved} inverse={inverse}"), &got, &y, 1e-6);
        }
    }
}

#[test]
fn embedding_matches_the_cpu() {
    let Some(g) = gpu("embedding_matches_the_cpu") else { return };
    let (rows, dim) = (50, 64);
    let table = values(rows * dim, 20);
    let ids: Vec<u32> = (0..37).map(|i| (i * 7 % rows) as u32).chain([3, 3, 3]).collect();
    let mut out = vec![0.0; ids.len() * dim];
    embedding_forward(&table, dim, &ids, &mut out);
    assert_eq!(g.embedding_forward(&table, dim, &ids).unwrap(), out);
    let dout = values(ids.len() * dim, 21);
    let mut dt = vec![0.0; rows * dim];
    embedding_backward(&dout, dim, &ids, &mut dt);
    // atomicAdd adds repeated ids in any order: f32 rounding.
    assert_close("embedding dtable", &g.embedding_backward(&dout, dim, &ids, rows * dim).unwrap(), &dt, 1e-6);
    assert!(g.embedding_forward(&table, dim, &[50]).is_err(), "an id past the table is an error");
}

#[test]
fn attention_forward_matches_the_cpu_for_training_and_mla_decode() {
    let Some(g) = gpu("attention_forward_matches_the_cpu_for_training_and_mla_decode") else { return };
    let training = AttnShape {
        batch: 2,
        q_heads: 4,
        kv_heads: 2,
        q_len: 33,
        kv_len: 33,
        qk_dim: 24,
        v_dim: 16,
        scale: 24f32.powf(-0.5),
        causal: true,
    };
    // MLA decode, absorbed: one new token, 8 heads over a 300-token latent cache (one KV head:
    // key [c ; k_pe] of 64 + 16, value c of 64).
    let decode = AttnShape {
        batch: 1,
        q_heads: 8,
        kv_heads: 1,
        q_len: 1,
        kv_len: 300,
        qk_dim: 80,
        v_dim: 64,
        scale: 0.11,
        causal: true,
    };
    for (what, s) in [("training", training), ("MLA decode", decode)] {
        let (qr, kr) = (s.batch * s.q_heads * s.q_len, s.batch * s.kv_heads * s.kv_len);
        let (q, k, v) = (values(qr * s.qk_dim, 22), values(kr * s.qk_dim, 23), values(kr * s.v_dim, 24));
        let (mut o, mut lse) = (vec![0.0; qr * s.v_dim], vec![0.0; qr]);
        attention_forward(&s, &q, &k, &v, &mut o, &mut lse);
        let (go, glse) = g.attention_forward(&s, &q, &k, &v).unwrap();
        // Online softmax in another order than the CPU's tiles: f32 rounding.
        assert_close(&format!("{what} o"), &go, &o, 1e-5);
        assert_close(&format!("{what} lse"), &glse, &lse, 1e-5);
    }
}
