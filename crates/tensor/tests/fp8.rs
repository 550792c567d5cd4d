//! FP8 dtypes and the FP8 linear layer.
//!
//! The casts are checked code by code against the formats written out from their definitions
//! (independently of the codec). The FP8 linear layer is checked against its plain twin, a
//! composition of dequantized operands and f32 matmuls, in all three GEMMs. Quantization is
//! piecewise constant, so a finite-difference test of it would see steps, not a slope; the
//! recipe's gradient is the straight-through one, which the twin defines exactly, and it is also
//! checked to stay close to the f32 layer's gradient (whose own finite-difference test is in
//! gradcheck.rs).

use whale_tensor::fp8::{Fp8Format, Fp8Recipe, ScaleFormat, BLOCK};
use whale_tensor::testing::randn;
use whale_tensor::{DType, Device, Tensor};

/// `(format, dtype, mantissa bits, bias)`.
const FORMATS: [(Fp8Format, DType, u32, i32); 2] =
    [(Fp8Format::E4M3, DType::F8E4M3, 3, 7), (Fp8Format::E5M2, DType::F8E5M2, 2, 15)];

/// The value of a code from the format's definition; `None` for NaN, `Some(inf)` for infinity.
fn definition(dtype: DType, m_bits: u32, bias: i32, code: u8) -> Option<f64> {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((code & 0x7F) >> m_bits) as i32;
    let m = (code & ((1 << m_bits) - 1)) as i32;
    let top = (1 << (7 - m_bits)) - 1;
    match dtype {
        DType::F8E4M3 if code & 0x7F == 0x7F => return None,
        DType::F8E5M2 if e == top => return if m == 0 { Some(sign * f64::INFINITY) } else { None },
        _ => {}
    }
    let (significand, exp) = if e == 0 { (m, 1 - bias) } else { ((1 << m_bits) + m, e - bias) };
    Some(sign * significand as f64 * 2f64.powi(exp - m_bits as i32))
}

#[test]
fn every_code_of_both_formats_casts_to_f32_and_back() {
    for (format, dtype, m_bits, bias) in FORMATS {
        let codes: Vec<u8> = (0..=255).collect();
        let t = Tensor::from_fp8_codes(codes.clone(), &[256], format).unwrap();
        assert_eq!(t.dtype(), dtype);
        let values = t.to_dtype(DType::F32).unwrap().to_vec_f32().unwrap();
        for (&code, &v) in codes.iter().zip(&values) {
            match definition(dtype, m_bits, bias, code) {
                None => assert!(v.is_nan(), "{dtype:?} {code:#04x} should be NaN, got {v}"),
                Some(want) => assert_eq!(v as f64, want, "{dtype:?} {code:#04x}"),
            }
        }
        // Back from f32 and from bf16 (every FP8 value is exact in both): the same codes, with
        // NaNs mapping to the canonical NaN of their sign.
        for source in [DType::F32, DType::BF16] {
            let back = Tensor::from_vec(values.clone(), &[256], &Device::Cpu)
                .unwrap()
                .to_dtype(source)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
                .fp8_codes()
                .unwrap();
            for (&code, &b) in codes.iter().zip(&back) {
                if values[code as usize].is_nan() {
                    assert_eq!(b, (code & 0x80) | 0x7F, "{dtype:?} NaN {code:#04x} from {source:?}");
                } else {
                    assert_eq!(b, code, "{dtype:?} {code:#04x} from {source:?}");
                }
            }
        }
    }
}

fn cast(x: f32, dtype: DType) -> f32 {
    Tensor::from_vec(vec![x], &[1], &Device::Cpu).unwrap().to_dtype(dtype).unwrap().to_vec_f32().unwrap()[0]
}

#[test]
fn casts_round_ties_to_even_through_subnormals_and_overflow_like_torch() {
    let e4 = DType::F8E4M3;
    assert_eq!(cast(1.0625, e4), 1.0, "halfway 1 and 1.125: to the even mantissa");
    assert_eq!(cast(1.1875, e4), 1.25);
    assert_eq!(cast(2f32.powi(-9), e4), 2f32.powi(-9), "smallest subnormal");
    assert_eq!(cast(2f32.powi(-10), e4), 0.0, "half the smallest subnormal: ties to zero");
    assert_eq!(cast(3.0 * 2f32.powi(-10), e4), 2f32.powi(-8), "1.5 quanta: ties to 2");
    assert_eq!(cast(0.96875 * 2f32.powi(-6), e4), 2f32.powi(-6), "rounds up into the normals");
    assert_eq!(cast(464.0, e4), 448.0, "halfway 448 and the NaN pattern: ties to 448");
    assert!(cast(465.0, e4).is_nan(), "E4M3 has no infinity: a cast overflows to NaN");
    assert!(cast(f32::INFINITY, e4).is_nan());
    assert_eq!(cast(-0.0, e4).to_bits(), (-0.0f32).to_bits());
    let e5 = DType::F8E5M2;
    assert_eq!(cast(60000.0, e5), 57344.0);
    assert_eq!(cast(61440.0, e5), f32::INFINITY, "halfway: ties to the even code, infinity");
    assert_eq!(cast(-1e6, e5), f32::NEG_INFINITY);
    assert_eq!(cast(2f32.powi(-16), e5), 2f32.powi(-16));
    assert!(cast(f32::NAN, e5).is_nan() && cast(f32::NAN, e4).is_nan());
    assert_eq!(DType::F8E4M3.round_f32(1.0625), 1.0);
    assert_eq!(DType::F8E4M3.size_in_bytes(), 1);
}

#[test]
fn quantize_fp8_rounds_within_half_a_step_of_each_blocks_scale_and_checks_its_scale_grid() {
    let x = randn(&[3, 300], 1).mul_scalar(1000.0).unwrap();
    let (codes, scales) = x.quantize_fp8((1, BLOCK), Fp8Format::E4M3, ScaleFormat::F32).unwrap();
    assert_eq!((codes.dtype(), scales.dims()), (DType::F8E4M3, &[3usize, 3][..]));
    let back = Tensor::dequantize_fp8(&codes, &scales, (1, BLOCK)).unwrap().to_vec_f32().unwrap();
    let (xv, sv) = (x.to_vec_f32().unwrap(), scales.to_vec_f32().unwrap());
    for (i, (a, b)) in xv.iter().zip(&back).enumerate() {
        // Each element's own tile: its scale is the tile's amax / 448, and the element the
        // nearest E4M3 value of a / scale (well within half the top binade's step, 16).
        let (row, tile) = (i / 300, (i % 300) / BLOCK);
        let amax = xv[row * 300 + tile * BLOCK..row * 300 + ((tile + 1) * BLOCK).min(300)]
            .iter()
            .fold(0.0f32, |m, v| m.max(v.abs()));
        let s = sv[row * 3 + tile];
        assert_eq!(s, amax / 448.0, "element {i}'s tile scale");
        let nearest = Fp8Format::E4M3.decode(Fp8Format::E4M3.encode_saturating(a / s)) * s;
        assert_eq!(*b, nearest, "element {i}: {a}");
        assert!((a - b).abs() <= 16.0 * s * 1.000001, "element {i}: {a} vs {b}");
    }
    let wrong = Tensor::zeros(&[2, 2], DType::F32, &Device::Cpu).unwrap();
    let err = Tensor::dequantize_fp8(&codes, &wrong, (1, BLOCK)).unwrap_err().to_string();
    assert!(err.contains("[3, 3]"), "{err}");
    assert!(randn(&[2, 3, 4], 1).quantize_fp8((1, BLOCK), Fp8Format::E4M3, ScaleFormat::F32).is_err());
}

/// The values a quantization stands for, through the public quantizer.
fn dequantized(x: &Tensor, block: (usize, usize)) -> Tensor {
    let (c, s) = x.quantize_fp8(block, Fp8Format::E4M3, ScaleFormat::F32).unwrap();
    Tensor::dequantize_fp8(&c, &s, block).unwrap()
}

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (a.to_vec_f32().unwrap(), b.to_vec_f32().unwrap());
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    a.iter().zip(&b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn rel_frobenius(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (a.to_vec_f32().unwrap(), b.to_vec_f32().unwrap());
    let d: f32 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
    (d / b.iter().map(|y| y * y).sum::<f32>()).sqrt()
}

#[test]
fn fp8_linear_equals_its_twin_of_dequantized_operands_in_all_three_gemms() {
    // Ragged everywhere: 6 tokens, 150 outputs (a partial weight block), 200 inputs.
    let (m, n, k) = (6, 150, 200);
    let x = randn(&[2, 3, k], 2).variable();
    let w = randn(&[n, k], 3).mul_scalar(0.1).unwrap().variable();
    let dy = randn(&[2, 3, n], 4);
    let y = x.fp8_linear(&w, &Fp8Recipe::default()).unwrap();
    y.mul(&dy).unwrap().sum_all().unwrap().backward().unwrap();

    let x2 = x.reshape(&[m, k]).unwrap().detach();
    let dy2 = dy.reshape(&[m, n]).unwrap();
    let wq = dequantized(&w.detach(), (BLOCK, BLOCK));
    let fprop = dequantized(&x2, (1, BLOCK)).matmul(&wq.t().unwrap()).unwrap();
    assert!(max_rel(&y.reshape(&[m, n]).unwrap(), &fprop) < 1e-5);
    let dgrad = dequantized(&dy2, (1, BLOCK)).matmul(&wq).unwrap();
    assert!(max_rel(&x.grad().unwrap().reshape(&[m, k]).unwrap(), &dgrad) < 1e-5);
    // Wgrad's operands are tiled along the tokens: quantize the transposes in 1x128 tiles.
    let dyt = dequantized(&dy2.t().unwrap().contiguous().unwrap(), (1, BLOCK));
    let xt = dequantized(&x2.t().unwrap().contiguous().unwrap(), (1, BLOCK));
    let wgrad = dyt.matmul(&xt.t().unwrap()).unwrap();
    assert!(max_rel(&w.grad().unwrap(), &wgrad) < 1e-5);
    assert_eq!(w.grad().unwrap().dtype(), DType::F32);

    // And all three stay near the f32 layer: E4M3 keeps 3 mantissa bits, so a few percent.
    let (xf, wf) = (x.detach().variable(), w.detach().variable());
    let yf = xf.matmul(&wf.t().unwrap()).unwrap();
    yf.mul(&dy).unwrap().sum_all().unwrap().backward().unwrap();
    for (what, fp8, f32) in [
        ("y", &y, &yf),
        ("dx", &x.grad().unwrap(), &xf.grad().unwrap()),
        ("dW", &w.grad().unwrap(), &wf.grad().unwrap()),
    ] {
        let e = rel_frobenius(fp8, f32);
        assert!(e < 0.05 && e > 1e-4, "{what}: relative error {e} against f32");
    }
}

#[test]
fn fp8_linear_gradients_scale_exactly_with_the_loss_however_small() {
    // Online scaling (scale = amax / 448 per tile) makes the three GEMMs scale-invariant: a loss
    // times a power of two gives every gradient times it, to the bit, down to gradients far
    // below the activations' 1e-4 amax floor (a floor on output-gradient tiles would scale them
    // for 1e-4 instead: at c = 2^-40 every code rounds to zero).
    let (x0, w0, r) = (randn(&[2, 3, 256], 5), randn(&[150, 256], 6).mul_scalar(0.1).unwrap(), randn(&[2, 3, 150], 7));
    let gradients = |c: f32| {
        let (x, w) = (x0.variable(), w0.variable());
        let y = x.fp8_linear(&w, &Fp8Recipe::default()).unwrap();
        y.mul(&r).unwrap().sum_all().unwrap().mul_scalar(c).unwrap().backward().unwrap();
        (x.grad().unwrap().to_vec_f32().unwrap(), w.grad().unwrap().to_vec_f32().unwrap())
    };
    let ((dx, dw), c) = (gradients(1.0), 2f32.powi(-40));
    let (dx_c, dw_c) = gradients(c);
    for (what, one, small) in [("dx", &dx, &dx_c), ("dW", &dw, &dw_c)] {
        assert!(one.iter().any(|&v| v != 0.0));
        for (i, (a, b)) in one.iter().zip(small).enumerate() {
            assert_eq!((a * c).to_bits(), b.to_bits(), "{what}[{i}]: {a} x 2^-40 vs {b}");
        }
    }
}

#[test]
fn the_emulated_14_bit_accumulator_stays_close_to_the_f32_one() {
    let x = randn(&[4, 512], 5);
    let w = randn(&[64, 512], 6).mul_scalar(0.05).unwrap();
    let fast = x.fp8_linear(&w, &Fp8Recipe::F32_ACCUMULATION).unwrap();
    let v3 = x.fp8_linear(&w, &Fp8Recipe::DEEPSEEK_V3).unwrap();
    let e = max_rel(&v3, &fast);
    assert!(e > 0.0 && e < 2e-3, "promoted 14-bit vs f32 partial sums: {e}");
}

#[test]
fn a_prequantized_weight_gives_the_same_output_and_keeps_its_dtype() {
    let x = randn(&[5, 130], 7).to_dtype(DType::BF16).unwrap().variable();
    let w = randn(&[40, 130], 8).mul_scalar(0.1).unwrap();
    let (codes, scale_inv) = w.quantize_fp8((BLOCK, BLOCK), Fp8Format::E4M3, ScaleFormat::F32).unwrap();
    let recipe = Fp8Recipe::default();
    let a = x.fp8_linear(&w, &recipe).unwrap();
    let b = x.fp8_linear_quantized(&codes, &scale_inv, &recipe).unwrap();
    assert_eq!(a.dtype(), DType::BF16);
    assert_eq!(a.to_vec_f32().unwrap(), b.to_vec_f32().unwrap());
    // The same Dgrad too: the stored weight's blocks are the master's quantised once.
    b.sum_all().unwrap().backward().unwrap();
    let from_codes = x.grad().unwrap().to_vec_f32().unwrap();
    x.zero_grad();
    a.sum_all().unwrap().backward().unwrap();
    assert_eq!(from_codes, x.grad().unwrap().to_vec_f32().unwrap());
    assert_eq!(x.grad().unwrap().dims(), &[5, 130]);
    let bad = Tensor::zeros(&[1, 1], DType::F32, &Device::Cpu).unwrap();
    assert!(x.fp8_linear_quantized(&codes, &bad, &recipe).is_err());
    assert!(x.fp8_linear_quantized(&w, &scale_inv, &recipe).is_err(), "f32 is not FP8 codes");
}

#[test]
fn fp8_linear_with_no_input_features_is_zeros_as_a_matmul() {
    // K = 0: torch's linear gives zeros of [.., out] and zero gradients; so does the f32 matmul.
    let x = Tensor::zeros(&[2, 3, 0], DType::F32, &Device::Cpu).unwrap().variable();
    let w = Tensor::zeros(&[4, 0], DType::F32, &Device::Cpu).unwrap().variable();
    let y = x.fp8_linear(&w, &Fp8Recipe::default()).unwrap();
    assert_eq!(y.dims(), [2, 3, 4]);
    assert_eq!(y.to_vec_f32().unwrap(), vec![0.0; 24]);
    y.sum_all().unwrap().backward().unwrap();
    assert_eq!(x.grad().unwrap().dims(), [2, 3, 0]);
    assert_eq!(w.grad().unwrap().dims(), [4, 0]);
    // No tokens: an empty output of the right shape, and zero weight gradients.
    let x = Tensor::zeros(&[0, 200], DType::F32, &Device::Cpu).unwrap().variable();
    let w = randn(&[150, 200], 1).variable();
    let y = x.fp8_linear(&w, &Fp8Recipe::default()).unwrap();
    assert_eq!(y.dims(), [0, 150]);
    y.sum_all().unwrap().backward().unwrap();
    assert!(w.grad().unwrap().to_vec_f32().unwrap().iter().all(|&g| g == 0.0));
}

/// Low-precision communication's rounding from its definition: per 1x128 tile along the last
/// dim, scale = the least power of two >= max(amax, floor) / 448, and each value the E4M3 value
/// nearest `v / scale` (ties to the even code, saturating at 448) times the scale.
fn comm_rounded_by_definition(x: &[f32], cols: usize, floor: f32) -> Vec<f32> {
    let grid: Vec<(f64, u8)> =
        (0..0x7Fu8).map(|c| (definition(DType::F8E4M3, 3, 7, c).expect("finite below 0x7F"), c)).collect();
    let nearest = |v: f64| -> f64 {
        let a = v.abs().min(448.0);
        let mut best = grid[0];
        for &(g, c) in &grid[1..] {
            let (d, db) = ((g - a).abs(), (best.0 - a).abs());
            if d < db || (d == db && c % 2 == 0) {
                best = (g, c);
            }
        }
        best.0.copysign(v)
    };
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(cols) {
        for tile in row.chunks(BLOCK) {
            let amax = tile.iter().fold(floor, |m, v| m.max(v.abs())) as f64;
            let scale = 2f64.powi((amax / 448.0).log2().ceil() as i32);
            out.extend(tile.iter().map(|&v| (nearest(v as f64 / scale) * scale) as f32));
        }
    }
    out
}

/// Rows of widely different magnitudes (one under the 1e-4 floor, one all zero), 200 columns:
/// a full tile and a partial one per row.
fn comm_rows() -> Tensor {
    let magnitudes = Tensor::from_vec(vec![1.0f32, 3e-3, 40.0, 2e-6, 0.0, 0.5], &[2, 3, 1], &Device::Cpu).unwrap();
    randn(&[2, 3, 200], 11).mul(&magnitudes).unwrap()
}

#[test]
fn fp8_comm_round_is_e4m3_with_power_of_two_tile_scales_and_a_straight_through_gradient() {
    for dtype in [DType::F32, DType::BF16] {
        let x = comm_rows().to_dtype(dtype).unwrap().variable();
        let y = x.fp8_comm_round().unwrap();
        assert_eq!((y.dtype(), y.dims()), (dtype, x.dims()));
        let got = y.to_vec_f32().unwrap();
        assert_eq!(got, comm_rounded_by_definition(&x.to_vec_f32().unwrap(), 200, 1e-4), "{dtype:?}");
        assert!(got != x.to_vec_f32().unwrap(), "{dtype:?}: the values were rounded");
        // Values on the grid stay where they are: rounding them again changes nothing.
        assert_eq!(y.detach().fp8_comm_round().unwrap().to_vec_f32().unwrap(), got);
        let r = randn(&[2, 3, 200], 12).to_dtype(dtype).unwrap();
        y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(x.grad().unwrap().to_vec_f32().unwrap(), r.to_vec_f32().unwrap(), "straight through");
    }
    let scalar = Tensor::from_vec(vec![1.0f32], &[], &Device::Cpu).unwrap();
    let err = scalar.fp8_comm_round().unwrap_err().to_string();
    assert!(err.contains("fp8_comm_round") && err.contains("rank"), "{err}");
}

#[test]
fn fp8_comm_round_grad_passes_values_and_rounds_their_gradient_however_small() {
    let x = comm_rows().variable();
    let y = x.fp8_comm_round_grad().unwrap();
    assert_eq!(y.to_vec_f32().unwrap(), x.to_vec_f32().unwrap(), "the values unchanged");
    // Gradients far under the activations' 1e-4 floor keep their bits' worth of E4M3.
    let r = comm_rows().mul_scalar(1e-7).unwrap();
    y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
    let got = x.grad().unwrap().to_vec_f32().unwrap();
    let want = comm_rounded_by_definition(&r.to_vec_f32().unwrap(), 200, whale_tensor::fp8::GRADIENT_MIN_AMAX);
    assert_eq!(got, want);
    let rv = r.to_vec_f32().unwrap();
    let worst =
        got.iter().zip(&rv).filter(|(_, &b)| b.abs() > 1e-12).map(|(a, b)| ((a - b) / b).abs()).fold(0.0, f32::max);
    assert!(worst > 0.0 && worst <= 1.0 / 16.0 + 1e-6, "rounded to E4M3's 3 mantissa bits: worst {worst}");
}

#[test]
fn an_fp8_linear_reading_power_of_two_input_tiles_takes_dispatched_values_as_they_are() {
    // Tokens as an FP8 dispatch delivers them: already E4M3 in 1x128 tiles with power-of-two
    // scales (rows of every magnitude, one under the 1e-4 floor, one all zero). A GEMM reading
    // its input with UE8M0 tiles uses exactly those values in Fprop (V3's expert GEMMs consume
    // the dispatched codes): its twin multiplies them unquantised. With f32 tile scales
    // (amax / 448) they are rounded a second time. Dgrad keeps the gradients' f32 tiles, and
    // Wgrad re-tiles the input along the tokens with power-of-two scales.
    let (m, n, k) = (6, 150, 200);
    let recipe = Fp8Recipe { input_scales: ScaleFormat::Ue8m0, ..Fp8Recipe::default() };
    let w = randn(&[n, k], 3).mul_scalar(0.1).unwrap();
    let wq = dequantized(&w, (BLOCK, BLOCK));
    // Each row against its own largest value (zero rows exactly).
    let rows_rel = |a: &Tensor, b: &Tensor| -> f32 {
        let (a, b) = (a.to_vec_f32().unwrap(), b.to_vec_f32().unwrap());
        let per_row = a.chunks(n).zip(b.chunks(n)).map(|(x, y)| {
            let scale = y.iter().fold(0.0f32, |s, v| s.max(v.abs()));
            let diff = x.iter().zip(y).fold(0.0f32, |d, (p, q)| d.max((p - q).abs()));
            if scale == 0.0 {
                diff
            } else {
                diff / scale
            }
        });
        per_row.fold(0.0, f32::max)
    };
    for dtype in [DType::F32, DType::BF16] {
        let dispatched = comm_rows().reshape(&[m, k]).unwrap().to_dtype(dtype).unwrap().fp8_comm_round().unwrap();
        let x = dispatched.detach().variable();
        let wv = w.detach().variable();
        let y = x.fp8_linear(&wv, &recipe).unwrap();
        let twin = dispatched.to_dtype(DType::F32).unwrap().matmul(&wq.t().unwrap()).unwrap();
        let exact = rows_rel(&y.to_dtype(DType::F32).unwrap(), &twin);
        let again = rows_rel(&x.fp8_linear(&w, &Fp8Recipe::default()).unwrap().to_dtype(DType::F32).unwrap(), &twin);
        let rounding = if dtype == DType::F32 { 1e-6 } else { 4e-3 }; // the output's own dtype
        assert!(exact < rounding, "{dtype:?}: the dispatched values as they are: {exact}");
        assert!(again > 1e-2, "{dtype:?}: f32 tile scales round them again: {again}");
        if dtype == DType::F32 {
            let dy = randn(&[m, n], 4);
            y.mul(&dy).unwrap().sum_all().unwrap().backward().unwrap();
            let dgrad = dequantized(&dy, (1, BLOCK)).matmul(&wq).unwrap();
            assert!(max_rel(&x.grad().unwrap(), &dgrad) < 1e-5, "Dgrad: f32 gradient tiles");
            let xt = dispatched.t().unwrap().contiguous().unwrap();
            let (codes, scales) = xt.quantize_fp8((1, BLOCK), Fp8Format::E4M3, ScaleFormat::Ue8m0).unwrap();
            let xt = Tensor::dequantize_fp8(&codes, &scales, (1, BLOCK)).unwrap();
            let dyt = dequantized(&dy.t().unwrap().contiguous().unwrap(), (1, BLOCK));
            let wgrad = dyt.matmul(&xt.t().unwrap()).unwrap();
            assert!(max_rel(&wv.grad().unwrap(), &wgrad) < 1e-5, "Wgrad: the input re-tiled in power-of-two tiles");
            let f32_tiles =
                dyt.matmul(&dequantized(&dispatched.t().unwrap().contiguous().unwrap(), (1, BLOCK)).t().unwrap());
            assert!(max_rel(&wv.grad().unwrap(), &f32_tiles.unwrap()) > 1e-4, "not f32 tiles");
        }
    }
}

/// Gradients of `sum(out * r)` for every input (zeros where none came), and the output.
fn output_and_gradients(inputs: &[Tensor], r: &Tensor, f: impl Fn(&[Tensor]) -> Tensor) -> (Vec<f32>, Vec<Vec<f32>>) {
    let vars: Vec<Tensor> = inputs.iter().map(|t| t.detach().variable()).collect();
    let out = f(&vars);
    out.mul(r).unwrap().sum_all().unwrap().backward().unwrap();
    let grads = vars.iter().map(|v| v.grad().map_or(vec![0.0; v.elem_count()], |g| g.to_vec_f32().unwrap())).collect();
    (out.to_vec_f32().unwrap(), grads)
}

/// A value rounded as the fused MLP caches it: E4M3 in 1x128 tiles with f32 scales, decoded.
fn cached(t: &Tensor) -> Tensor {
    let (rows, cols) = (t.elem_count() / t.dims()[t.rank() - 1], t.dims()[t.rank() - 1]);
    let (codes, scales) =
        t.reshape(&[rows, cols]).unwrap().quantize_fp8((1, BLOCK), Fp8Format::E4M3, ScaleFormat::F32).unwrap();
    Tensor::dequantize_fp8(&codes, &scales, (1, BLOCK)).unwrap().reshape(t.dims()).unwrap().to_dtype(t.dtype()).unwrap()
}

#[test]
fn the_fp8_swiglu_mlp_gives_the_plain_output_and_the_gradients_at_its_cached_values() {
    // 10 tokens, dim 256 (two tiles), 160 hidden (a partial block and tile): V3's MoE expert.
    let recipe = Fp8Recipe::default();
    let dispatched = Fp8Recipe { input_scales: ScaleFormat::Ue8m0, ..recipe };
    let weights: Vec<Tensor> = [(160, 256, 61), (160, 256, 62), (256, 160, 63)]
        .iter()
        .map(|&(o, i, s)| randn(&[o, i], s).mul_scalar(0.08).unwrap())
        .collect();
    for (dtype, recipes) in
        [(DType::F32, [recipe; 3]), (DType::BF16, [recipe; 3]), (DType::F32, [dispatched, dispatched, recipe])]
    {
        let x = randn(&[2, 5, 256], 60).to_dtype(dtype).unwrap();
        let r = randn(&[2, 5, 256], 64).to_dtype(dtype).unwrap();
        let inputs: Vec<Tensor> = std::iter::once(x.clone()).chain(weights.iter().cloned()).collect();
        let (fused, grads) = output_and_gradients(&inputs, &r, |v| {
            Tensor::fp8_swiglu_mlp((&v[0], &v[0]), [&v[1], &v[2], &v[3]], recipes).unwrap()
        });
        let plain = |v: &[Tensor]| {
            let gate = v[0].fp8_linear(&v[1], &recipes[0]).unwrap();
            let up = v[0].fp8_linear(&v[2], &recipes[1]).unwrap();
            Tensor::swiglu(&gate, &up).unwrap().fp8_linear(&v[3], &recipes[2]).unwrap()
        };
        let (kept, kept_grads) = output_and_gradients(&inputs, &r, plain);
        assert_eq!(fused, kept, "{dtype:?}: the output is the plain composition's");
        let w: Vec<&Tensor> = weights.iter().collect();
        let eval = whale_tensor::no_grad(|| Tensor::fp8_swiglu_mlp((&x, &x), [w[0], w[1], w[2]], recipes));
        assert_eq!(eval.unwrap().to_vec_f32().unwrap(), kept, "{dtype:?}: without a backward to come, too");

        // The twin, step by step: the down-projection and the SwiGLU's backward at the rounded
        // projections, whose gradients then go through the gate and up projections.
        let gate = whale_tensor::no_grad(|| x.fp8_linear(&weights[0], &recipes[0])).unwrap();
        let up = whale_tensor::no_grad(|| x.fp8_linear(&weights[1], &recipes[1])).unwrap();
        let at_cache = [cached(&gate), cached(&up), weights[2].clone()];
        let (_, down) = output_and_gradients(&at_cache, &r, |v| {
            Tensor::swiglu(&v[0], &v[1]).unwrap().fp8_linear(&v[2], &recipes[2]).unwrap()
        });
        let d_gate = Tensor::from_vec(down[0].clone(), gate.dims(), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        let d_up = Tensor::from_vec(down[1].clone(), up.dims(), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        let projections = [x.clone(), weights[0].clone(), weights[1].clone()];
        let vars: Vec<Tensor> = projections.iter().map(|t| t.detach().variable()).collect();
        let g = vars[0].fp8_linear(&vars[1], &recipes[0]).unwrap().mul(&d_gate).unwrap().sum_all().unwrap();
        let u = vars[0].fp8_linear(&vars[2], &recipes[1]).unwrap().mul(&d_up).unwrap().sum_all().unwrap();
        g.add(&u).unwrap().backward().unwrap();
        let twin: Vec<Vec<f32>> =
            vars.iter().map(|v| v.grad().unwrap().to_vec_f32().unwrap()).chain([down[2].clone()]).collect();
        for (i, name) in ["x", "gate", "up", "down"].iter().enumerate() {
            assert_eq!(grads[i], twin[i], "{dtype:?}: the gradient of {name}");
            // Close to the uncached MLP's: the cached projections move by E4M3's rounding (2^-4
            // of a value at most, ~3.6% RMS), the SwiGLU output by both of theirs; measured
            // 3.4-5.1% in RMS, within one E4M3 step.
            let (diff, norm) =
                grads[i].iter().zip(&kept_grads[i]).fold((0.0, 0.0), |(d, n), (a, b)| (d + (a - b).powi(2), n + b * b));
            let rel = (diff / norm).sqrt();
            assert!(rel > 0.0 && rel < 1.0 / 16.0, "{dtype:?}: the gradient of {name} is {rel} from the uncached one");
        }
    }
}

#[test]
fn the_fp8_swiglu_mlp_of_no_tokens_gives_zero_weight_gradients() {
    let recipe = [Fp8Recipe::default(); 3];
    let weights = [randn(&[160, 256], 1), randn(&[160, 256], 2), randn(&[256, 160], 3)];
    let inputs = [
        Tensor::zeros(&[0, 256], DType::F32, &Device::Cpu).unwrap(),
        weights[0].clone(),
        weights[1].clone(),
        weights[2].clone(),
    ];
    let r = Tensor::zeros(&[0, 256], DType::F32, &Device::Cpu).unwrap();
    let (out, grads) = output_and_gradients(&inputs, &r, |v| {
        Tensor::fp8_swiglu_mlp((&v[0], &v[0]), [&v[1], &v[2], &v[3]], recipe).unwrap()
    });
    assert!(out.is_empty());
    assert!(grads[1..].iter().all(|g| !g.is_empty() && g.iter().all(|&v| v == 0.0)));
    // A wrong shape is the FP8 linear layer's error.
    let err = Tensor::fp8_swiglu_mlp((&weights[2], &weights[2]), [&weights[0], &weights[1], &weights[2]], recipe)
        .unwrap_err();
    assert!(err.to_string().contains("fp8_linear"), "{err}");
}

#[test]
fn the_fp8_swiglu_mlp_splits_its_backward_as_zero_bubble_does() {
    // B (the input's gradient now) and W (the weights', later) each rerun the cached backward
    // for their own gradients: together, the full backward's bits.
    let recipes = [Fp8Recipe::default(); 3];
    let (x0, dy) = (randn(&[2, 5, 256], 70), randn(&[2, 5, 256], 71));
    let w0 =
        [randn(&[160, 256], 72), randn(&[160, 256], 73), randn(&[256, 160], 74)].map(|w| w.mul_scalar(0.08).unwrap());
    let run = |x: &Tensor, w: &[Tensor]| Tensor::fp8_swiglu_mlp((x, x), [&w[0], &w[1], &w[2]], recipes).unwrap();
    let grads = |x: &Tensor, w: &[Tensor]| -> Vec<Vec<f32>> {
        std::iter::once(x).chain(w).map(|t| t.grad().unwrap().to_vec_f32().unwrap()).collect()
    };
    let (x, w) = (x0.input_variable(), w0.clone().map(|w| w.variable()));
    run(&x, &w).backward_with_grad(&dy).unwrap();
    let full = grads(&x, &w);

    let (x, w) = (x0.input_variable(), w0.map(|w| w.variable()));
    let work = run(&x, &w).backward_split(Some(&dy)).unwrap();
    assert_eq!(x.grad().unwrap().to_vec_f32().unwrap(), full[0], "B: the input's gradient");
    assert!(w.iter().all(|w| w.grad().is_none()), "no weight gradient in the B pass");
    work.run().unwrap();
    assert_eq!(grads(&x, &w), full, "B then W");
}
