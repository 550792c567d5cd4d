//! Views, dtypes, devices, errors, and the values of a few ops checked by hand.

use whale_tensor::testing::randn;
use whale_tensor::{DType, Device, Error, Tensor};

fn t(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
}

#[test]
fn views_share_storage() {
    let x = randn(&[4, 6], 1);
    let views = [
        x.t().unwrap(),
        x.narrow(1, 2, 3).unwrap(),
        x.reshape(&[2, 12]).unwrap(),
        x.unsqueeze(0).unwrap().squeeze(0).unwrap(),
        x.permute(&[1, 0]).unwrap(),
        x.narrow(0, 0, 1).unwrap().broadcast_as(&[3, 4, 6]).unwrap(),
        x.split(&[2, 4], 1).unwrap()[1].clone(),
    ];
    for v in &views {
        assert!(v.same_storage(&x), "{v:?} copied");
    }
    // A non-contiguous view copies only when reshaped.
    assert!(!x.t().unwrap().reshape(&[24]).unwrap().same_storage(&x));
    assert_eq!(x.t().unwrap().to_vec2_f32().unwrap()[1][2], x.to_vec2_f32().unwrap()[2][1]);
}

/// argmax's indices are exact past f32's 2^24 (they were carried as f32: 2^24 + 1 read back as
/// 2^24), and max gathers the value there; an empty dimension has no argmax.
#[test]
fn argmax_is_exact_for_long_dimensions_and_refuses_empty_ones() {
    let n = (1 << 24) + 2;
    let mut v = vec![0.0f32; n];
    v[n - 1] = 1.0;
    let x = Tensor::from_vec(v, &[1, n], &Device::Cpu).unwrap();
    assert_eq!(x.argmax(1).unwrap().to_vec::<i64>().unwrap(), vec![n as i64 - 1]);
    let empty = Tensor::zeros(&[2, 0], DType::F32, &Device::Cpu).unwrap();
    let err = empty.argmax(1).unwrap_err().to_string();
    assert!(err.contains("argmax") && err.contains("empty"), "{err}");
    assert!(empty.max(1).is_err());
    // Nothing to reduce over zero rows: an empty result, not an error.
    assert_eq!(Tensor::zeros(&[0, 3], DType::F32, &Device::Cpu).unwrap().argmax(1).unwrap().dims(), &[0]);
}

#[test]
fn hand_checked_values() {
    let a = t(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
    let b = t(&[1.0, 0.0, 0.0, 1.0, 1.0, 1.0], &[3, 2]);
    assert_eq!(a.matmul(&b).unwrap().to_vec_f32().unwrap(), vec![4.0, 5.0, 10.0, 11.0]);
    assert_eq!(a.sum(1).unwrap().to_vec_f32().unwrap(), vec![6.0, 15.0]);
    assert_eq!(a.max(0).unwrap().to_vec_f32().unwrap(), vec![4.0, 5.0, 6.0]);
    assert_eq!(a.argmax(1).unwrap().to_vec::<i64>().unwrap(), vec![2, 2]);
    let (v, i) = t(&[0.5, 3.0, 3.0, -1.0, 7.0], &[5]).topk(3).unwrap();
    assert_eq!(v.to_vec_f32().unwrap(), vec![7.0, 3.0, 3.0]);
    assert_eq!(i.to_vec::<i64>().unwrap(), vec![4, 1, 2], "ties go to the lower index");
    let c = Tensor::cat(&[a.clone(), a.clone()], 0).unwrap();
    assert_eq!(c.dims(), &[4, 3]);
    assert_eq!(
        a.add(&t(&[10.0, 20.0, 30.0], &[3])).unwrap().to_vec_f32().unwrap(),
        vec![11.0, 22.0, 33.0, 14.0, 25.0, 36.0]
    );
    let lse = t(&[0.0, 0.0], &[1, 2]).logsumexp(1).unwrap().to_scalar().unwrap();
    assert!((lse - std::f32::consts::LN_2).abs() < 1e-7);
    let ce =
        t(&[0.0, 0.0], &[1, 2]).cross_entropy(&Tensor::from_slice(&[1i64], &[1], &Device::Cpu).unwrap(), -100).unwrap();
    assert!((ce.to_scalar().unwrap() - std::f32::consts::LN_2).abs() < 1e-7);
}

#[test]
fn bf16_is_a_storage_format() {
    let x = t(&[1.0, 1.0 + 1.0 / 256.0, 3.0], &[3]).to_dtype(DType::BF16).unwrap();
    assert_eq!(x.dtype(), DType::BF16);
    // 1 + 2^-8 is not representable in bf16 (8 bits of mantissa): round to nearest even gives 1.
    assert_eq!(x.to_vec_f32().unwrap(), vec![1.0, 1.0, 3.0]);
    let y = x.mul(&x).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    assert_eq!(y.to_vec_f32().unwrap(), vec![1.0, 1.0, 9.0]);
    let h = t(&[0.1], &[1]).to_dtype(DType::F16).unwrap();
    assert_eq!(h.to_vec_f32().unwrap()[0], half::f16::from_f32(0.1).to_f32());
}

#[test]
fn a_missing_gpu_is_a_clear_error_not_a_panic() {
    // No machine has this many GPUs; without a CUDA driver every ordinal is missing.
    let missing = 4096;
    let err = Device::cuda(missing).unwrap_err();
    assert!(matches!(err, Error::DeviceUnavailable { .. }), "{err}");
    assert!(err.to_string().contains("CUDA") || err.to_string().contains("GPU 4096"), "{err}");
    let err = Tensor::zeros(&[2], DType::F32, &Device::Cuda(missing)).unwrap_err();
    assert!(matches!(err, Error::DeviceUnavailable { .. }));
    if !Device::cuda_is_available(0) {
        assert!(Device::cuda(0).is_err(), "no GPU here, so GPU 0 is an error");
    }
}

#[test]
fn bad_input_gets_named_errors() {
    // Sizes whose product overflows are refused, not wrapped to a small buffer.
    let huge = [1usize << 33, 1 << 31];
    let e = Tensor::zeros(&huge, DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("full") && e.contains("8589934592"), "{e}");
    let mut rng = whale_tensor::Rng::new(1);
    assert!(Tensor::randn(&huge, 0.0, 1.0, DType::F32, &mut rng).is_err());
    let a = randn(&[2, 3], 1);
    let e = a.matmul(&randn(&[4, 2], 2)).unwrap_err().to_string();
    assert!(e.contains("matmul") && e.contains("[2, 3]") && e.contains("[4, 2]"), "{e}");
    let e = a.add(&randn(&[4], 3)).unwrap_err().to_string();
    assert!(e.contains("add"), "{e}");
    let e = a.index_select(0, &Tensor::from_slice(&[5i64], &[1], &Device::Cpu).unwrap()).unwrap_err().to_string();
    assert!(e.contains("index_select") && e.contains('5'), "{e}");
    let e =
        a.cross_entropy(&Tensor::from_slice(&[0i64, 3], &[2], &Device::Cpu).unwrap(), -100).unwrap_err().to_string();
    assert!(e.contains("targets") && e.contains('3'), "{e}");
    assert!(a.transpose(0, 2).is_err());
    assert!(a.reshape(&[5]).is_err());
    // Overflowing sizes and offsets are errors, not views that wrap around to other memory
    // (2^63 + 1) * 2 wraps to 2 on 64 bits, and usize::MAX + 1 to 0.
    assert!(randn(&[2], 4).reshape(&[(1 << 63) + 1, 2]).is_err());
    let e = a.narrow(1, usize::MAX, 1).unwrap_err().to_string();
    assert!(e.contains("narrow") && e.contains("exceeds size 3"), "{e}");
    let cache = Tensor::zeros(&[2, 3], DType::F32, &Device::Cpu).unwrap();
    assert!(cache.write_window(1, usize::MAX, &Tensor::zeros(&[2, 1], DType::F32, &Device::Cpu).unwrap()).is_err());
    assert!(Tensor::from_vec(vec![1.0f32; 5], &[2, 3], &Device::Cpu).is_err());
    assert!(a.to_dtype(DType::I64).unwrap().exp().is_err());
    assert!(a.backward().is_err(), "backward from a non-scalar");
}

#[test]
fn integer_casts_are_exact_past_f32s_mantissa() {
    // A flat index of a large tensor (here 2^24 + 1) must not round through f32.
    let big = [(1i64 << 24) + 1, (1 << 31) + 3, 7];
    let t = Tensor::from_vec(big.to_vec(), &[3], &Device::Cpu).unwrap();
    let u = t.to_dtype(DType::U32).unwrap();
    assert_eq!(u.to_vec::<u32>().unwrap(), vec![(1 << 24) + 1, (1 << 31) + 3, 7]);
    assert_eq!(u.to_dtype(DType::I64).unwrap().to_vec::<i64>().unwrap(), big.to_vec());
    // Out of u32's range, it wraps as torch's cast does.
    let neg = Tensor::from_vec(vec![-1i64], &[1], &Device::Cpu).unwrap();
    assert_eq!(neg.to_dtype(DType::U32).unwrap().to_vec::<u32>().unwrap(), vec![u32::MAX]);
}

#[test]
fn a_bf16_mean_rounds_once_as_torchs() {
    // torch.tensor([1, 2, 258], dtype=torch.bfloat16).mean() is 87: the sum 261 rounded to bf16
    // (260) and then scaled would give 86.5.
    let x = t(&[1.0, 2.0, 258.0], &[3]).to_dtype(DType::BF16).unwrap();
    assert_eq!(x.mean(0).unwrap().to_vec_f32().unwrap(), vec![87.0]);
    assert_eq!(x.mean_all().unwrap().dtype(), DType::BF16);
    assert_eq!(x.mean_all().unwrap().to_vec_f32().unwrap(), vec![87.0]);
}

#[test]
fn a_mean_divides_its_sum_by_the_count_as_torchs() {
    // torch.tensor([7., 0., 0.]).mean() is 7 / 3 = 2.3333333 (0x40155555); times a rounded 1 / 3
    // it would be 2.3333335. The gradient is g / 3 likewise.
    let x = t(&[7.0, 0.0, 0.0], &[3]).variable();
    let m = x.mean_all().unwrap();
    assert_eq!(m.to_vec_f32().unwrap()[0].to_bits(), (7.0f32 / 3.0).to_bits());
    assert_eq!(x.mean(0).unwrap().to_vec_f32().unwrap()[0].to_bits(), (7.0f32 / 3.0).to_bits());
    m.mul_scalar(7.0).unwrap().backward().unwrap();
    assert_eq!(x.grad().unwrap().to_vec_f32().unwrap(), vec![7.0f32 / 3.0; 3]);
}

#[test]
fn bf16_rms_norm_and_swiglu_round_where_hf_does() {
    // HF's RMSNorm rounds x * rstd to bf16 before the weight multiplies it: x = [1, 1.75],
    // w = 1.75, x0 * rstd = 0.7016 -> 0.703125, times 1.75 = 1.23047 -> 1.234375 (torch 2.15's
    // fused F.rms_norm, DeepSeek's inference code, rounds once: 1.2265625).
    let bf = |v: &[f32]| t(v, &[v.len()]).to_dtype(DType::BF16).unwrap();
    let y = bf(&[1.0, 1.75]).rms_norm(&bf(&[1.75, 1.75]), 1e-6).unwrap();
    assert_eq!(y.to_vec_f32().unwrap()[0], 1.234375);
    // DeepSeek's and HF's silu(gate) * up rounds the activation first: silu(-1.3359375) =
    // -0.27811 -> -0.27734375, times 1.7734375 -> -0.4921875 (one rounding: -0.494140625).
    let y = Tensor::swiglu(&bf(&[-1.3359375]), &bf(&[1.7734375])).unwrap();
    assert_eq!(y.to_vec_f32().unwrap(), vec![-0.4921875]);
}

#[test]
fn dropout_keeps_each_value_with_probability_one_minus_p_scaled_by_its_inverse() {
    // A million ones at p = 0.3: about 70% kept (the standard deviation of the fraction is
    // 4.6e-4; 0.0025 is 5.4 of them), each exactly 1 / 0.7 in f32, the rest 0; the gradient
    // of the sum is the same mask. An inverted keep or a scale of 1 / p fails it.
    let n = 1_000_000;
    let x = Tensor::from_vec(vec![1.0f32; n], &[n], &Device::Cpu).unwrap().variable();
    let y = x.dropout(0.3, &mut whale_tensor::Rng::new(5)).unwrap();
    let (v, keep) = (y.to_vec_f32().unwrap(), 1.0f32 / 0.7);
    assert!(v.iter().all(|&e| e == 0.0 || e == keep), "values other than 0 and 1 / 0.7");
    let kept = v.iter().filter(|&&e| e != 0.0).count() as f64 / n as f64;
    assert!((kept - 0.7).abs() < 0.0025, "kept {kept}");
    y.sum_all().unwrap().backward().unwrap();
    assert_eq!(x.grad().unwrap().to_vec_f32().unwrap(), v, "the gradient is the mask");
    // bf16: the scale rounded to bf16 once, in the forward and the backward alike.
    let xb = x.detach().to_dtype(DType::BF16).unwrap();
    let vb = xb.dropout(0.3, &mut whale_tensor::Rng::new(5)).unwrap().to_vec_f32().unwrap();
    let keep_bf16 = half::bf16::from_f32(keep).to_f32();
    assert!(vb.iter().zip(&v).all(|(&b, &f)| b == if f == 0.0 { 0.0 } else { keep_bf16 }), "bf16: the same mask");
}
