//! Attention (kernels/attention.cu) against the CPU twin: the simple kernels (one block per row)
//! and the tiled ones (flash-style, split keys for decode), forward and backward.

use crate::common::{assert_close, assert_lse, gpu, values};
use whale_kernels::cpu::attention::{attention_backward, attention_forward, AttnShape};
use whale_kernels::cuda::{AttentionKernels, Gpu};

/// Each case's forward (and with `backward` its gradients) on each of `kernel_sets`, against the
/// CPU twin. Online softmax and the gradients' sums (over keys for dq, over the group's queries
/// for dk and dv) run in another order than the CPU's: f32 rounding. Fully masked rows (causal
/// with more queries than keys, or no keys): zeros and an lse of -inf.
fn check(g: &Gpu, kernel_sets: &[AttentionKernels], cases: &[(&str, AttnShape)], seed: u32, backward: bool) {
    for &kernels in kernel_sets {
        g.set_attention_kernels(kernels);
        for (i, &(what, s)) in cases.iter().enumerate() {
            let what = format!("{kernels:?}: {what}");
            let (qr, kr) = (s.batch * s.q_heads * s.q_len, s.batch * s.kv_heads * s.kv_len);
            let seed = seed + 4 * i as u32;
            let (q, k, v) =
                (values(qr * s.qk_dim, seed), values(kr * s.qk_dim, seed + 1), values(kr * s.v_dim, seed + 2));
            let (mut o, mut lse) = (vec![0.0; qr * s.v_dim], vec![0.0; qr]);
            attention_forward(&s, &q, &k, &v, &mut o, &mut lse);
            let (go, glse) = g.attention_forward(&s, &q, &k, &v).unwrap();
            assert_close(&format!("{what} o"), &go, &o, 1e-5);
            assert_lse(&what, &glse, &lse);
            if backward {
                let d_o = values(qr * s.v_dim, seed + 3);
                let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
                attention_backward(&s, &q, &k, &v, &o, &lse, &d_o, &mut dq, &mut dk, &mut dv);
                let (gdq, gdk, gdv) = g.attention_backward(&s, &q, &k, &v, &o, &lse, &d_o).unwrap();
                assert_close(&format!("{what} dq"), &gdq, &dq, 1e-5);
                assert_close(&format!("{what} dk"), &gdk, &dk, 1e-5);
                assert_close(&format!("{what} dv"), &gdv, &dv, 1e-5);
            }
        }
    }
}

const EVERY_SET: [AttentionKernels; 3] =
    [AttentionKernels::Simple, AttentionKernels::TiledForward, AttentionKernels::Tiled];

#[test]
fn attention_forward_matches_the_cpu_for_training_and_mla_decode() {
    let Some(g) = gpu("attention_forward_matches_the_cpu_for_training_and_mla_decode") else { return };
    let shape = |batch, heads, lens, dims, scale: f32, causal| AttnShape {
        scale,
        ..AttnShape::new(batch, heads, lens, dims, causal)
    };
    // MLA decode, absorbed: one KV head whose key is [c ; k_pe] and whose value is c (V3: 512 + 64
    // and 512, scale 1 / sqrt(128 + 64)).
    let mla = 192f32.powf(-0.5);
    let cases = [
        ("training", shape(2, (4, 2), (33, 33), (24, 16), 24f32.powf(-0.5), true)),
        ("tile-ragged causal GQA", shape(2, (4, 2), (200, 200), (64, 40), 0.125, true)),
        ("more queries than keys", shape(1, (2, 1), (130, 70), (36, 20), 0.17, true)),
        ("non-causal, distinct widths", shape(1, (2, 2), (70, 200), (33, 17), 0.17, false)),
        ("MLA training heads", shape(1, (2, 2), (100, 130), (192, 128), mla, true)),
        ("heads of 256", shape(1, (2, 1), (70, 90), (200, 160), 0.07, true)),
        ("wider than the tiled kernels", shape(1, (2, 1), (4, 50), (600, 520), 0.04, true)),
        // A small decode: 8 heads over a 300-token cache (c of 64, k_pe of 16).
        ("small MLA decode", shape(1, (8, 1), (1, 300), (80, 64), 0.11, true)),
        // Few sequences: the keys are split across blocks and the splits merged.
        ("MLA decode, 3 sequences", shape(3, (16, 1), (1, 700), (576, 512), mla, true)),
        ("MLA decode, 2 new tokens", shape(2, (16, 1), (2, 300), (576, 512), mla, true)),
        // Enough blocks to fill an H200 without splitting the keys.
        ("MLA decode, 9 sequences of 128 heads", shape(9, (128, 1), (2, 260), (576, 512), mla, true)),
        ("zero-width keys", shape(1, (2, 1), (3, 5), (0, 4), 0.5, true)),
        ("zero-width values", shape(1, (2, 1), (3, 5), (4, 0), 0.5, true)),
        ("no keys", shape(1, (2, 1), (3, 0), (4, 4), 0.5, false)),
    ];
    check(&g, &[AttentionKernels::Simple, AttentionKernels::Tiled], &cases, 22, false);
}

#[test]
fn attention_backward_matches_the_cpu() {
    let Some(g) = gpu("attention_backward_matches_the_cpu") else { return };
    let shape = AttnShape::new;
    let cases = [
        ("GQA causal training", shape(2, (4, 2), (40, 40), (24, 16), true)),
        ("non-causal, distinct widths", shape(1, (3, 1), (17, 29), (40, 33), false)),
        ("MLA-sized heads", shape(1, (2, 1), (48, 48), (192, 128), true)),
        ("causal query block at the end of the keys", shape(1, (2, 2), (5, 30), (8, 8), true)),
        // Causal with more queries than keys: rows 0..4 of each head see no key at all.
        ("fully masked rows", shape(1, (2, 1), (9, 5), (8, 8), true)),
        // Lengths that are not multiples of the tiles (64 rows by 64 keys).
        ("tile-ragged causal GQA", shape(2, (4, 2), (130, 130), (24, 40), true)),
        ("causal, 200 tokens", shape(1, (2, 2), (200, 200), (64, 64), true)),
        ("more queries than keys across tiles", shape(1, (2, 1), (130, 70), (36, 20), true)),
        ("non-causal across tiles", shape(1, (2, 2), (70, 200), (33, 17), false)),
        ("MLA training heads across tiles", shape(1, (2, 2), (100, 130), (192, 128), true)),
        ("heads of 256", shape(1, (2, 1), (70, 90), (200, 160), true)),
        ("wider than the tiled kernels", shape(1, (2, 1), (4, 50), (300, 260), true)),
        ("zero-width keys", AttnShape { scale: 0.5, ..shape(1, (2, 1), (3, 5), (0, 4), true) }),
        ("zero-width values", shape(1, (2, 1), (3, 5), (4, 0), true)),
    ];
    check(&g, &[AttentionKernels::Simple, AttentionKernels::Tiled], &cases, 40, true);
}

/// Every attention kernel, through its launcher, on shapes small enough for the emulated driver
/// (a fiber per thread): each tiled instance (heads up to 128, 192 x 128, 256, and MLA decode's
/// 576 x 512 with its keys split across blocks and merged), GQA, causal and not, fully masked
/// rows, no keys; on every kernel set. Decode is forward only, as in use (its 512-wide dot
/// products round too far for this bound in a backward, which no caller runs at that width).
#[test]
fn attention_kernels_match_the_cpu_on_small_shapes() {
    let Some(g) = gpu("attention_kernels_match_the_cpu_on_small_shapes") else { return };
    let shape = AttnShape::new;
    let mla = AttnShape { scale: 192f32.powf(-0.5), ..shape(2, (4, 1), (1, 140), (576, 512), true) };
    let cases = [
        ("GQA causal", shape(2, (4, 2), (9, 9), (24, 16), true)),
        ("non-causal, distinct widths", shape(1, (3, 1), (5, 11), (40, 33), false)),
        ("causal query block at the end of the keys", shape(1, (2, 2), (3, 12), (8, 8), true)),
        ("fully masked rows", shape(1, (2, 1), (9, 5), (8, 8), true)),
        ("no keys", shape(1, (2, 1), (3, 0), (4, 4), false)),
        ("MLA training heads", shape(1, (2, 1), (6, 7), (192, 128), true)),
        ("heads of 256", shape(1, (1, 1), (5, 6), (200, 160), true)),
    ];
    check(&g, &EVERY_SET, &cases, 90, true);
    check(&g, &EVERY_SET, &[("MLA decode, keys split", mla)], 130, false);
}
