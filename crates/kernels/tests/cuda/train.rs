//! The CUDA kernels of the training path against their CPU twins: the MoE gate, FP8 block
//! quantisation of weights and dequantisation (attention backward: attention.rs). Without a GPU these tests print
//! that they were skipped and why.

use crate::common::{gpu, values};
use whale_kernels::cpu::fp8::{Fp8Blocks, Fp8Format, ScaleFormat};
use whale_kernels::cpu::router::{combine_weights, route, select_experts, RouterConfig};
use whale_kernels::cuda::Gpu;

/// `|got - want| <= tol * |want|`, element by element.
fn assert_relative(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * w.abs(), "{what}[{i}]: GPU {g} vs CPU {w}");
    }
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn moe_route_matches_the_cpu_ties_included() {
    let Some(g) = gpu("moe_route_matches_the_cpu_ties_included") else { return };
    moe_route_ties_included(&g);
    let small = RouterConfig {
        n_experts: 12,
        n_group: 3,
        topk_group: 2,
        top_k: 3,
        sigmoid: true,
        norm_topk_prob: true,
        routed_scaling_factor: 1.0,
    };
    assert!(g.moe_route(&[0.0; 10], None, &small).is_err(), "logits that are not rows of E are an error");
    assert!(g.moe_route(&[0.0; 12], None, &RouterConfig { top_k: 13, ..small }).is_err(), "top_k > E is an error");
}

fn moe_route_ties_included(g: &Gpu) {
    let v3 = RouterConfig {
        n_experts: 256,
        n_group: 8,
        topk_group: 4,
        top_k: 8,
        sigmoid: true,
        norm_topk_prob: true,
        routed_scaling_factor: 2.5,
    };
    let small = RouterConfig { n_experts: 12, n_group: 3, topk_group: 2, top_k: 3, routed_scaling_factor: 1.0, ..v3 };
    // V2-236B-like: softmax, group max, no bias, no renormalisation; and V2-Lite's single group.
    let v2 = RouterConfig {
        n_experts: 64,
        n_group: 8,
        topk_group: 3,
        top_k: 6,
        sigmoid: false,
        norm_topk_prob: false,
        routed_scaling_factor: 16.0,
    };
    let greedy = RouterConfig { n_group: 1, topk_group: 1, routed_scaling_factor: 1.0, ..v2 };
    let cases = [("V3", v3, 64, true), ("small", small, 37, true), ("V2", v2, 20, false), ("greedy", greedy, 9, false)];
    for (seed, (what, cfg, t, biased)) in cases.into_iter().enumerate() {
        let e = cfg.n_experts;
        // Logits on a coarse grid and a bias of five levels: many exact ties, inside groups, between
        // group scores and at the k-th place. Token 0 is all zeros: everything ties.
        let mut logits: Vec<f32> = values(t * e, 30 + seed as u32).iter().map(|v| (2.0 * v).round() / 2.0).collect();
        logits[..e].fill(0.0);
        let bias: Vec<f32> = (0..e).map(|i| 0.05 * ((i * 7 % 5) as f32 - 2.0)).collect();
        let bias = biased.then_some(&bias[..]);

        let got = g.moe_route(&logits, bias, &cfg).unwrap();
        let cpu = route(&logits, bias, &cfg);
        // expf on the GPU and exp on the CPU differ in the last bits; a softmax also sums its E
        // exponentials in another order.
        let tol = if cfg.sigmoid { 1e-6 } else { 4e-6 };
        assert_relative(&format!("{what} scores"), &got.scores, &cpu.scores, tol);
        // The selection exactly, on the GPU's own affinities (so no last-bit difference can flip a
        // near tie), and against the CPU twin end to end.
        let choice: Vec<f32> = match bias {
            Some(b) => got.scores.iter().enumerate().map(|(i, s)| s + b[i % e]).collect(),
            None => got.scores.clone(),
        };
        assert_eq!(got.ids, select_experts(&choice, &cfg), "{what} ids on the GPU's scores");
        assert_eq!(got.ids, cpu.ids, "{what} ids");
        let want = combine_weights(&got.scores, &got.ids, &cfg);
        assert_relative(&format!("{what} weights"), &got.weights, &want, 1e-6);
        assert_relative(&format!("{what} weights end to end"), &got.weights, &cpu.weights, 2.0 * tol);
        if !biased {
            // An all-tied token keeps the first groups and takes the first experts.
            assert_eq!(got.ids[..cfg.top_k], (0..cfg.top_k).collect::<Vec<_>>()[..], "{what}: ties to the lower index");
        }
    }
    // A NaN affinity ranks first on both (as in torch.topk), ahead of the largest number.
    let one_group =
        RouterConfig { n_experts: 4, n_group: 1, topk_group: 1, top_k: 2, routed_scaling_factor: 1.0, ..v3 };
    let logits = [0.0, 1.0, 2.0, f32::NAN];
    let got = g.moe_route(&logits, None, &one_group).unwrap();
    assert_eq!((got.ids.clone(), route(&logits, None, &one_group).ids), (vec![3, 2], vec![3, 2]), "NaN first");
    // With groups, a NaN makes its group's score NaN (torch's topk-sum and max): group 0 would
    // lose on its numbers, is kept for its NaN, and the NaN expert is chosen first.
    let logits = [-3.0, f32::NAN, -3.0, -3.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0];
    // (A softmax spreads the NaN over the whole row: every score ties, the first experts win.)
    for (cfg, want) in [(small, vec![1, 8, 9]), (RouterConfig { sigmoid: false, ..small }, vec![0, 1, 2])] {
        let got = g.moe_route(&logits, None, &cfg).unwrap();
        assert_eq!((got.ids, route(&logits, None, &cfg).ids), (want.clone(), want), "a NaN's group, {cfg:?}");
    }
}

#[test]
fn fp8_weight_blocks_and_dequantisation_match_the_cpu() {
    let Some(g) = gpu("fp8_weight_blocks_and_dequantisation_match_the_cpu") else { return };
    fp8_weight_blocks(&g);
    let bad = g.fp8_quantize_128x128(&[0.0; 10], (3, 4), ScaleFormat::F32);
    assert!(bad.is_err(), "a buffer that is not [rows, cols] is an error");
}

fn fp8_weight_blocks(g: &Gpu) {
    for (seed, (rows, cols)) in [(200, 300), (128, 128), (257, 129), (3, 5)].into_iter().enumerate() {
        // Magnitudes that change from block to block, so one shared scale would be wrong, and an
        // all-zero block (if the shape has a second block column) for the 1e-4 clamp.
        let mut x: Vec<f32> = values(rows * cols, 50 + seed as u32)
            .iter()
            .enumerate()
            .map(|(i, v)| v * 10f32.powi(((i / cols) / 128 + (i % cols) / 128) as i32 % 4 - 2))
            .collect();
        for r in 0..rows.min(128) {
            for c in 128..cols.min(256) {
                x[r * cols + c] = 0.0;
            }
        }
        for sf in [ScaleFormat::F32, ScaleFormat::Ue8m0] {
            let cpu = Fp8Blocks::quantize(&x, rows, cols, (128, 128), Fp8Format::E4M3, sf);
            let got = g.fp8_quantize_128x128(&x, (rows, cols), sf).unwrap();
            assert_eq!(bits(&got.scales), bits(&cpu.scales), "[{rows}, {cols}] block scales, {sf:?}");
            assert_eq!(got.codes, cpu.codes, "[{rows}, {cols}] E4M3 codes (CUDA's converter against ours), {sf:?}");
            assert_eq!((got.rows, got.cols, got.block, got.format), (rows, cols, (128, 128), Fp8Format::E4M3));
        }

        // Dequantisation of both tilings and both formats, power-of-two scales too: exact.
        for block in [(128, 128), (1, 128)] {
            for fmt in [Fp8Format::E4M3, Fp8Format::E5M2] {
                for sf in [ScaleFormat::F32, ScaleFormat::Ue8m0] {
                    let q = Fp8Blocks::quantize(&x, rows, cols, block, fmt, sf);
                    let back = g.fp8_dequantize(&q).unwrap();
                    assert_eq!(bits(&back), bits(&q.dequantize()), "[{rows}, {cols}] {block:?} {fmt:?} {sf:?}");
                }
            }
        }
    }
}
