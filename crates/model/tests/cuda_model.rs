//! DeepSeek-V3 (the tiny preset: MLA, DeepSeekMoE with the bias-balanced gate, MTP) on a GPU
//! against the same model on the CPU: the loss and every gradient of one backward, then the loss
//! of each of three AdamW steps with the balancing update; then three steps in bf16, and in
//! bf16 with FP8 GEMMs (DeepSeek-V3's recipe); recomputed sublayers against kept ones; then
//! greedy, speculative and FP8-release decoding,
//! each GPU token checked against the CPU's logits for the same prefix. Skipped, saying so,
//! without a GPU.

mod common;

use common::emulator::run_gpu_tests_on_the_emulated_driver;
use common::gpu_training::{gpu, gradients_agree, losses_agree, tokens};
use whale_model::checkpoint::SaveDType;
use whale_model::generate::{CacheMode, CausalLm, SamplingConfig};
use whale_model::nn::Recompute;
use whale_model::testing::assert_greedy_agrees;
use whale_model::{DeepSeekV3, DeepSeekV3Config};
use whale_tensor::checkpoint::recomputations;
use whale_tensor::fp8::Fp8Recipe;
use whale_tensor::{DType, Device, Rng, Tensor};

/// Every GPU test of this file on the emulated driver (whale-kernels' tests/common/emulator.rs):
/// tiny DeepSeek-V3 on whale-tensor's CUDA backend, as it is, over the host emulation of the
/// kernels, trained (f32, bf16, FP8 GEMMs) and decoding (greedy, speculative, an FP8 release)
/// against the CPU, each in a child process (about 20 s of a debug build on two cores).
#[test]
fn the_model_on_the_emulated_driver_in_emulation() {
    run_gpu_tests_on_the_emulated_driver("the_model_on_the_emulated_driver_in_emulation", &[], &[]);
}

#[test]
fn tiny_deepseek_v3_trains_the_same_on_a_gpu() {
    let Some(device) = gpu("tiny_deepseek_v3_trains_the_same_on_a_gpu") else { return };
    let cfg = DeepSeekV3Config::tiny();
    let cpu = DeepSeekV3::new(cfg.clone(), 11).unwrap();
    let gpu = cpu.to_device(&device).unwrap();
    assert!(gpu.params.iter().all(|(_, p)| p.device() == Device::Cuda(0)), "every weight moved");
    let (ids, targets) = (tokens(&cfg, 2, 12, 100), tokens(&cfg, 2, 12, 200));
    gradients_agree(&cpu, &gpu, &ids, &targets);
    losses_agree(&cpu, &gpu, 300, 1e-4, "f32");
}

#[test]
fn tiny_deepseek_v3_trains_in_bf16_and_with_fp8_gemms_on_a_gpu_as_on_the_cpu() {
    // With the FP8 dispatch too: its rounding and the experts' UE8M0 input tiles on the GPU.
    let Some(device) = gpu("tiny_deepseek_v3_trains_in_bf16_and_with_fp8_gemms_on_a_gpu_as_on_the_cpu") else { return };
    let cfg = DeepSeekV3Config::tiny();
    let cases =
        [("bf16", false, false), ("fp8 (bf16 activations)", true, false), ("fp8 and the FP8 dispatch", true, true)];
    for (what, fp8, dispatch) in cases {
        let mut cpu = DeepSeekV3::new(cfg.clone(), 12).unwrap();
        let mut gpu = cpu.to_device(&device).unwrap();
        for m in [&mut cpu, &mut gpu] {
            m.compute_dtype = DType::BF16;
            m.set_fp8(fp8.then_some(Fp8Recipe::F32_ACCUMULATION));
            m.set_fp8_dispatch(dispatch);
        }
        // Every op rounds its result to bf16 on both devices; where the devices' f32 values
        // differ in their last bits, a rounding lands one bf16 step (2^-8) apart, and FP8 codes
        // one E4M3 step: rare, small, and averaged over the loss's tokens, well inside 1e-2.
        losses_agree(&cpu, &gpu, 500, 1e-2, what);
    }
}

/// Recomputed sublayers on the GPU: the loss and every gradient the bits of keeping them (the
/// kernels are deterministic; the region runs the same launches twice), in f32 and with FP8
/// GEMMs.
#[test]
fn recomputed_sublayers_give_the_same_gradients_on_a_gpu() {
    let Some(device) = gpu("recomputed_sublayers_give_the_same_gradients_on_a_gpu") else { return };
    let cfg = DeepSeekV3Config::tiny();
    let (ids, targets) = (tokens(&cfg, 2, 12, 400), tokens(&cfg, 2, 12, 401));
    for fp8 in [false, true] {
        let mut m = DeepSeekV3::new(cfg.clone(), 14).unwrap().to_device(&device).unwrap();
        if fp8 {
            m.compute_dtype = DType::BF16;
            m.set_fp8(Some(Fp8Recipe::F32_ACCUMULATION));
        }
        let mut run = |recompute: Recompute| -> Vec<Vec<u32>> {
            m.set_recompute(recompute);
            let loss = m.forward(&ids, Some(&targets)).unwrap().loss.unwrap();
            loss.backward().unwrap();
            let bits = |t: Tensor| t.to_vec_f32().unwrap().into_iter().map(f32::to_bits).collect::<Vec<u32>>();
            let mut all = vec![bits(loss)];
            all.extend(m.params.iter().map(|(name, p)| bits(p.take_grad().unwrap_or_else(|| panic!("{name}")))));
            all
        };
        let kept = run(Recompute::default());
        let before = recomputations();
        assert!(run(Recompute { attention: true, mlp: true }) == kept, "fp8 {fp8}: recomputing changed a gradient");
        assert!(recomputations() > before, "the regions were rerun");
    }
}

/// The greedy checker, on the CPU alone: it passes the CPU's own greedy tokens (cached decoding
/// against the full forward) and fails a token that is not the argmax.
#[test]
fn greedy_agrees_passes_the_cpus_own_tokens_and_fails_a_wrong_one() {
    let cfg = DeepSeekV3Config::tiny();
    let cpu = DeepSeekV3::new(cfg.clone(), 13).unwrap();
    let prompt: Vec<u32> = (0..7).map(|i| (i * 5 + 3) % cfg.vocab_size as u32).collect();
    let mut tokens =
        cpu.generate(std::slice::from_ref(&prompt), &SamplingConfig::greedy(6, vec![]), &mut Rng::new(1)).unwrap()[0]
            .tokens
            .clone();
    assert_greedy_agrees(&cpu, &prompt, &tokens, 1e-4, "the CPU's own tokens");
    tokens[5] = (tokens[5] + 1) % cfg.vocab_size as u32;
    let check = std::panic::AssertUnwindSafe(|| assert_greedy_agrees(&cpu, &prompt, &tokens, 1e-4, "a wrong token"));
    let wrong = std::panic::catch_unwind(check);
    assert!(wrong.is_err(), "a token other than the argmax must fail");
}

#[test]
fn tiny_deepseek_v3_generates_the_same_tokens_on_a_gpu() {
    let Some(device) = gpu("tiny_deepseek_v3_generates_the_same_tokens_on_a_gpu") else { return };
    let cfg = DeepSeekV3Config::tiny();
    let cpu = DeepSeekV3::new(cfg.clone(), 13).unwrap();
    let gpu = cpu.to_device(&device).unwrap();
    let prompt: Vec<u32> = (0..7).map(|i| (i * 5 + 3) % cfg.vocab_size as u32).collect();
    // Greedy decoding over both MLA caches (the absorbed one runs the MLA decode kernel), and
    // MTP speculative decoding (exact under greedy verification). f32 on both devices: the
    // logits agree to about 1e-6 of their scale, so 1e-4 leaves only true near-ties open.
    for cache in [CacheMode::Naive, CacheMode::Absorb] {
        let mut sampling = SamplingConfig::greedy(12, vec![]);
        sampling.cache = cache;
        let g = gpu.generate(std::slice::from_ref(&prompt), &sampling, &mut Rng::new(1)).unwrap();
        assert_greedy_agrees(&cpu, &prompt, &g[0].tokens, 1e-4, &format!("{cache:?} cache"));
    }
    let (g, _) = gpu
        .generate_speculative(
            &prompt,
            &SamplingConfig { cache: CacheMode::Absorb, ..SamplingConfig::greedy(12, vec![]) },
            &mut Rng::new(0),
        )
        .unwrap();
    assert_greedy_agrees(&cpu, &prompt, &g.tokens, 1e-4, "MTP speculative decoding");
}

#[test]
fn decode_caches_append_in_place_on_a_gpu_in_f32_and_bf16() {
    let Some(device) = gpu("decode_caches_append_in_place_on_a_gpu_in_f32_and_bf16") else { return };
    for dtype in [DType::F32, DType::BF16] {
        common::cache_buffer_appends_in_place(&device, dtype);
    }
}

#[test]
fn an_fp8_release_decodes_on_a_gpu_with_its_weights_kept_in_fp8() {
    let Some(device) = gpu("an_fp8_release_decodes_on_a_gpu_with_its_weights_kept_in_fp8") else { return };
    let cfg = DeepSeekV3Config::tiny();
    let dir = std::env::temp_dir().join(format!("whale-cuda-fp8-release-{}", std::process::id()));
    DeepSeekV3::new(cfg.clone(), 14).unwrap().save_pretrained_fp8(&dir, SaveDType::F32).unwrap();
    let cpu = DeepSeekV3::from_pretrained_fp8(&dir).unwrap();
    let gpu = cpu.to_device(&device).unwrap();
    let stored: Vec<_> = gpu.state_dict().into_values().filter(|t| t.dtype() == DType::F8E4M3).collect();
    assert!(!stored.is_empty() && stored.iter().all(|t| t.device() == Device::Cuda(0)), "FP8 codes on the GPU");
    let prompt: Vec<u32> = (0..5).map(|i| (i * 7 + 2) % cfg.vocab_size as u32).collect();
    let sampling = SamplingConfig::greedy(10, vec![]);
    let g = gpu.generate(std::slice::from_ref(&prompt), &sampling, &mut Rng::new(2)).unwrap();
    // Activations are quantized to E4M3 (a step of 1/8 of a value's power of two) before each
    // FP8 GEMM: where the devices' sums differ in the last bits, a value on a rounding boundary
    // takes the neighbouring code on one of them, which moves the logits by up to about 1e-2 of
    // their scale. Tokens whose CPU margin is wider than that must match exactly.
    assert_greedy_agrees(&cpu, &prompt, &g[0].tokens, 1e-2, "FP8 release");
    std::fs::remove_dir_all(&dir).ok();
}
