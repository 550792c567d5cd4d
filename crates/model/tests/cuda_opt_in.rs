//! DeepSeek-V3 (the tiny preset) trained on a GPU with the opt-in kernel, on sm_90 the wgmma FP8
//! GEMM (twice the default's rate on an H200, with Hopper's limited-precision accumulation inside
//! each 128 of K), and the tiled attention backward (now the default too), against the same
//! model on the CPU, as tests/cuda_model.rs does with the default kernels. A test binary of its
//! own, because kernel choices belong to the GPU that every test of a process shares. Skipped,
//! saying so, without a GPU; in CI it runs on the emulated driver
//! (`the_opt_in_kernels_train_on_the_emulated_driver_in_emulation`).

mod common;

use common::emulator::run_gpu_tests_on_the_emulated_driver;
use common::gpu_training::{gpu, gradients_agree, losses_agree, losses_agree_on, tokens};
use whale_kernels::cuda::{AttentionKernels, Fp8GemmKernel};
use whale_model::{DeepSeekV3, DeepSeekV3Config};
use whale_tensor::fp8::Fp8Recipe;
use whale_tensor::DType;

/// The training below on the emulated driver, in a child process: the tiled attention backward
/// and the wgmma GEMM (the emulated GPU is an sm_90) inside a whole model's training, against the
/// CPU, in every CI run (on an H200 too: scripts/reports/).
#[test]
fn the_opt_in_kernels_train_on_the_emulated_driver_in_emulation() {
    run_gpu_tests_on_the_emulated_driver("the_opt_in_kernels_train_on_the_emulated_driver_in_emulation", &[], &[]);
}

#[test]
fn tiny_deepseek_v3_trains_on_the_opt_in_kernels_as_on_the_cpu() {
    const TEST: &str = "tiny_deepseek_v3_trains_on_the_opt_in_kernels_as_on_the_cpu";
    let Some(device) = gpu(TEST) else { return };
    let g = device.gpu().unwrap();
    g.set_attention_kernels(AttentionKernels::Tiled);
    let wgmma = g.runs_fp8_gemm(Fp8GemmKernel::Wgmma, 128);
    if wgmma {
        g.set_fp8_gemm_kernel(Fp8GemmKernel::Wgmma);
    } else {
        eprintln!("{TEST}: the wgmma FP8 GEMM part skipped, sm_{}{} does not run it", g.arch.0, g.arch.1);
    }
    let cfg = DeepSeekV3Config::tiny();

    // f32: every gradient, then three steps, through the tiled attention backward.
    let cpu = DeepSeekV3::new(cfg.clone(), 21).unwrap();
    let gpu = cpu.to_device(&device).unwrap();
    let (ids, targets) = (tokens(&cfg, 2, 12, 700), tokens(&cfg, 2, 12, 800));
    gradients_agree(&cpu, &gpu, &ids, &targets);
    losses_agree(&cpu, &gpu, 900, 1e-4, "f32, tiled attention backward");

    // bf16 with FP8 GEMMs: the wgmma kernel for Fprop, Dgrad and, over 2 x 16 tokens (K a
    // multiple of 16), the dense layers' Wgrad; the experts' Wgrad, over their tokens, falls back
    // where those are not. Bounds as in tests/cuda_model.rs: a bf16 or E4M3 rounding may land one
    // step apart.
    if wgmma {
        let mut cpu = DeepSeekV3::new(cfg.clone(), 22).unwrap();
        let mut gpu = cpu.to_device(&device).unwrap();
        for m in [&mut cpu, &mut gpu] {
            m.compute_dtype = DType::BF16;
            m.set_fp8(Some(Fp8Recipe::F32_ACCUMULATION));
        }
        losses_agree_on(&cpu, &gpu, (2, 16), 1000, 1e-2, "fp8 on the wgmma GEMM");
    }
}
