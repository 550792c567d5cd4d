//! Each fused op against its plain twin composed from primitive ops: values and gradients.

use whale_tensor::testing::{assert_close, randn};
use whale_tensor::{Device, Result, Tensor};

/// Runs `f` on fresh variables made from `inputs` and returns (output, gradients of sum(out * r)).
fn value_and_grads(inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Result<Tensor>) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Tensor> = inputs.iter().map(|t| t.deep_clone().unwrap().variable()).collect();
    let out = f(&vars).unwrap();
    let r = randn(out.dims(), 777);
    out.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
    // An input the function does not use has no gradient: zeros.
    (out.detach(), vars.iter().map(|v| v.grad().unwrap_or_else(|| v.zeros_like().unwrap())).collect())
}

fn assert_twins(
    inputs: &[Tensor],
    fused: impl Fn(&[Tensor]) -> Result<Tensor>,
    plain: impl Fn(&[Tensor]) -> Result<Tensor>,
) {
    let (a, ga) = value_and_grads(inputs, fused);
    let (b, gb) = value_and_grads(inputs, plain);
    assert_close(&a, &b, 1e-5, 1e-4);
    for (x, y) in ga.iter().zip(&gb) {
        assert_close(x, y, 1e-5, 1e-4);
    }
}

#[test]
fn softmax_matches_exp_over_sum() {
    let x = randn(&[4, 9], 1).mul_scalar(3.0).unwrap();
    assert_twins(
        std::slice::from_ref(&x),
        |t| t[0].softmax_last_dim(),
        |t| {
            let e = t[0].sub(&t[0].max_keepdim(1)?)?.exp()?;
            e.div(&e.sum_keepdim(1)?)
        },
    );
    assert_twins(&[x], |t| t[0].log_softmax_last_dim(), |t| t[0].sub(&t[0].logsumexp_keepdim(1)?));
}

#[test]
fn rms_norm_matches_composition() {
    let x = randn(&[3, 5, 16], 2);
    let w = randn(&[16], 3);
    assert_twins(
        &[x, w],
        |t| t[0].rms_norm(&t[1], 1e-6),
        |t| {
            let ms = t[0].sqr()?.mean_keepdim(2)?;
            t[0].mul(&ms.add_scalar(1e-6)?.rsqrt()?)?.mul(&t[1])
        },
    );
}

#[test]
fn cross_entropy_matches_log_softmax_and_gather() {
    let logits = randn(&[6, 11], 4);
    let targets = Tensor::from_vec(vec![0i64, 10, -1, 5, 5, 2], &[6], &Device::Cpu).unwrap();
    let kept = Tensor::from_vec(vec![0i64, 10, 5, 5, 2], &[5, 1], &Device::Cpu).unwrap();
    let rows = Tensor::from_vec(vec![0i64, 1, 3, 4, 5], &[5], &Device::Cpu).unwrap();
    assert_twins(
        &[logits],
        |t| t[0].cross_entropy(&targets, -1),
        |t| {
            let lp = t[0].log_softmax_last_dim()?.index_select(0, &rows)?;
            lp.gather(1, &kept)?.mean_all()?.neg()
        },
    );
}

#[test]
fn attention_matches_materialised_softmax() {
    let (b, hq, hk, sq, sk, dqk, dv) = (2, 4, 2, 7, 10, 8, 5);
    let q = randn(&[b, hq, sq, dqk], 5);
    let k = randn(&[b, hk, sk, dqk], 6);
    let v = randn(&[b, hk, sk, dv], 7);
    let scale = 1.0 / (dqk as f32).sqrt();
    // Causal mask aligned bottom-right: query i sees keys j <= i + (sk - sq).
    let mask: Vec<f32> = (0..sq).flat_map(|i| (0..sk).map(move |j| if j > i + sk - sq { 1.0 } else { 0.0 })).collect();
    let mask = Tensor::from_vec(mask, &[sq, sk], &Device::Cpu).unwrap();
    assert_twins(
        &[q, k, v],
        |t| Tensor::scaled_dot_product_attention(&t[0], &t[1], &t[2], scale, true),
        |t| {
            // Repeat kv heads for GQA: head h reads kv head h / (hq / hk).
            let expand = |x: &Tensor| -> Result<Tensor> {
                let (b, h, s, d) = (x.dims()[0], x.dims()[1], x.dims()[2], x.dims()[3]);
                x.unsqueeze(2)?.broadcast_as(&[b, h, hq / hk, s, d])?.reshape(&[b, hq, s, d])
            };
            let (k, v) = (expand(&t[1])?, expand(&t[2])?);
            let scores = t[0].matmul(&k.t()?)?.mul_scalar(scale)?.masked_fill(&mask, f32::NEG_INFINITY)?;
            scores.softmax_last_dim()?.matmul(&v)
        },
    );
}

#[test]
fn attention_reads_views_with_contiguous_rows_in_place_with_the_packed_bits() {
    // A decode cache: the first 9 of 16 positions of key and latent buffers; the value is the
    // latent's first 5 columns (MLA's absorbed cache). Values and gradients equal the packed
    // copies' to the bit.
    let q = randn(&[2, 4, 3, 8], 11);
    let k_buffer = randn(&[2, 2, 16, 8], 12);
    let latent = randn(&[2, 2, 16, 8], 13);
    let run = |pack: bool| {
        let vars: Vec<Tensor> = [&q, &k_buffer, &latent].iter().map(|t| t.deep_clone().unwrap().variable()).collect();
        let (k, v) = (vars[1].narrow(2, 0, 9).unwrap(), vars[2].narrow(2, 0, 9).unwrap().narrow(3, 0, 5).unwrap());
        assert!(!k.is_contiguous() && !v.is_contiguous());
        let (k, v) = if pack { (k.contiguous().unwrap(), v.contiguous().unwrap()) } else { (k, v) };
        let out = Tensor::scaled_dot_product_attention(&vars[0], &k, &v, 0.3, true).unwrap();
        out.mul(&randn(out.dims(), 14)).unwrap().sum_all().unwrap().backward().unwrap();
        let grads: Vec<Vec<f32>> = vars.iter().map(|v| v.grad().unwrap().to_vec_f32().unwrap()).collect();
        (out.to_vec_f32().unwrap(), grads)
    };
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    // No position cached yet: every row fully masked, zeros.
    let none = k_buffer.narrow(2, 0, 0).unwrap();
    let q1 = randn(&[2, 4, 1, 8], 15);
    let o = Tensor::scaled_dot_product_attention(&q1, &none, &none.narrow(3, 0, 5).unwrap(), 0.3, false).unwrap();
    assert_eq!(o.to_vec_f32().unwrap(), vec![0.0; 2 * 4 * 5]);
    let ((o, g), (o_packed, g_packed)) = (run(false), run(true));
    assert_eq!(bits(&o), bits(&o_packed), "output");
    for (i, (a, b)) in g.iter().zip(&g_packed).enumerate() {
        assert_eq!(bits(a), bits(b), "gradient of input {i}");
    }
}

#[test]
fn swiglu_matches_silu_times_up() {
    assert_twins(
        &[randn(&[4, 8], 8), randn(&[4, 8], 9)],
        |t| Tensor::swiglu(&t[0], &t[1]),
        |t| t[0].silu()?.mul(&t[1]),
    );
}

#[test]
fn grouped_matmul_matches_per_group_matmuls() {
    let sizes = [3usize, 0, 5, 1];
    let inputs: Vec<Tensor> =
        std::iter::once(randn(&[9, 6], 20)).chain((0..4).map(|i| randn(&[7, 6], 21 + i))).collect();
    assert_twins(
        &inputs,
        |t| Tensor::grouped_matmul(&t[0], &sizes, &t[1..]),
        |t| {
            let mut parts = Vec::new();
            let mut start = 0;
            for (e, &s) in sizes.iter().enumerate() {
                if s > 0 {
                    parts.push(t[0].narrow(0, start, s)?.matmul(&t[1 + e].t()?)?);
                }
                start += s;
            }
            Tensor::cat(&parts, 0)
        },
    );
}

#[test]
fn rope_matches_rotation_by_primitives() {
    // x [batch, seq, heads, d]; theta_i per position and pair. Half-rotated (HF's rotate_half):
    // (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) on the two halves; interleaved (DeepSeek's
    // complex product): each pair (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos).
    let (b, s, h, d) = (2, 5, 3, 8);
    let x = randn(&[b, s, h, d], 5);
    let (cos, sin) = whale_tensor::rope_tables(&[0, 1, 2, 7, 30], &whale_tensor::rope_inv_freq(d, 10_000.0)).unwrap();
    let per_position = |t: &Tensor| t.reshape(&[1, s, 1, d / 2]);
    let (c, sn) = (per_position(&cos).unwrap(), per_position(&sin).unwrap());
    use whale_tensor::RopeLayout;
    assert_twins(
        std::slice::from_ref(&x),
        |t| t[0].rope(&cos, &sin, RopeLayout::HalfRotated),
        |t| {
            let (x1, x2) = (t[0].narrow(3, 0, d / 2)?, t[0].narrow(3, d / 2, d / 2)?);
            Tensor::cat(&[x1.mul(&c)?.sub(&x2.mul(&sn)?)?, x2.mul(&c)?.add(&x1.mul(&sn)?)?], 3)
        },
    );
    assert_twins(
        &[x],
        |t| t[0].rope(&cos, &sin, RopeLayout::Interleaved),
        |t| {
            let pairs = t[0].reshape(&[b, s, h, d / 2, 2])?;
            let (x0, x1) = (pairs.narrow(4, 0, 1)?.squeeze(4)?, pairs.narrow(4, 1, 1)?.squeeze(4)?);
            let rotated = [x0.mul(&c)?.sub(&x1.mul(&sn)?)?, x0.mul(&sn)?.add(&x1.mul(&c)?)?];
            Tensor::stack(&rotated, 4)?.reshape(&[b, s, h, d])
        },
    );
}
