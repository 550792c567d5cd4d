//! RL on a GPU against the same on the CPU: GRPO's loss and every gradient for the same rollouts
//! (f32, and bf16 as `--precision bf16` computes);
//! a GRPO step (policy and reference on the GPU), its checkpoint resumed onto the GPU, and a PPO
//! step (critic there too); a dense Qwen2-style student's greedy decoding and SFT, and the reward
//! model's Bradley-Terry training, loss by loss. Without a GPU each body runs with the CPU in the
//! GPU's place (saying so), which checks the bodies and the CPU's own device plumbing; in CI they
//! all run on the emulated driver too (`the_rl_gpu_tests_pass_on_the_emulated_driver_in_emulation`).

#[allow(dead_code)]
#[path = "../../kernels/tests/common/emulator.rs"]
mod emulator;

use whale_rl::grpo::{aggregation_weights, grpo_loss, GrpoConfig, GrpoTrainer, LossInputs, LossType};
use whale_rl::parallel::model::config::DeepSeekV3Config;
use whale_rl::parallel::model::generate::{CacheMode, SamplingConfig};
use whale_rl::parallel::model::tensor::{DType, Device, Rng};
use whale_rl::parallel::model::testing::assert_greedy_agrees;
use whale_rl::parallel::model::tokenizer::{CharTokenizer, Tokenizer};
use whale_rl::parallel::model::{CausalLm, DeepSeekV3, DenseConfig, DenseModel};
use whale_rl::ppo::{PpoConfig, PpoTrainer};
mod common;

use common::{assert_close, reversal_pair};
use whale_rl::reward_model::{PreferencePair, RewardModel};
use whale_rl::rollout::{sample_groups, score, PackedBatch, RolloutConfig};
use whale_rl::sft::{sft, Example, SftConfig};
use whale_rl::tasks::{Split, TaskSet};

/// GPU 0 (the emulated one under `WHALE_EMULATED_GPU`), or the CPU after saying that the test
/// compares the CPU with itself.
fn gpu(test: &str) -> Device {
    if emulator::on_the_emulated_driver() {
        emulator::emulated_gpu(test).expect("the emulated driver");
    }
    if !Device::cuda_is_available(0) {
        eprintln!("{test}: no CUDA driver or GPU on this machine; the CPU stands in for it");
        return Device::Cpu;
    }
    Device::cuda(0).unwrap()
}

/// Every test of this file on the emulated driver (whale-tensor's CUDA backend over whale-kernels'
/// launchers), each in a child process (about 20 s of a debug build on two cores).
#[test]
fn the_rl_gpu_tests_pass_on_the_emulated_driver_in_emulation() {
    emulator::run_gpu_tests_on_the_emulated_driver(
        "the_rl_gpu_tests_pass_on_the_emulated_driver_in_emulation",
        &[],
        &[],
    );
}

fn tiny(seed: u64) -> DeepSeekV3 {
    DeepSeekV3::new(DeepSeekV3Config::tiny(), seed).unwrap()
}

#[test]
fn grpo_loss_and_gradients_on_a_gpu_match_the_cpu() {
    let device = gpu("grpo_loss_and_gradients_on_a_gpu_match_the_cpu");
    let cpu = tiny(7);
    let on_gpu = cpu.to_device(&device).unwrap();
    let tok = CharTokenizer::new();
    let problems = TaskSet::parse("add:1-2").unwrap().problems(2, 5, Split::Train);
    let cfg = RolloutConfig {
        group_size: 3,
        temperature: 0.8,
        top_p: None,
        top_k: None,
        max_new_tokens: 10,
        cache: CacheMode::Absorb,
        template: whale_rl::rollout::PromptTemplate::Plain,
    };
    // The same rollouts for both devices (sampled once, on the CPU).
    let rollouts = sample_groups(&cpu, &tok, &problems, &cfg, &mut Rng::new(3)).unwrap();
    let refs: Vec<_> = rollouts.iter().collect();
    let lengths: Vec<usize> = rollouts.iter().map(|r| r.tokens.len()).collect();
    // Old log-probs 0.3 away from the current ones, alternately above and below, and advantages
    // of alternating sign: both sides of the clip bind on some tokens, and the KL term is live.
    let shifts: Vec<Vec<f32>> =
        lengths.iter().map(|&n| (0..n).map(|t| if t % 2 == 0 { 0.3 } else { -0.3 }).collect()).collect();
    let advantages: Vec<Vec<f32>> =
        lengths.iter().enumerate().map(|(i, &n)| vec![if i % 2 == 0 { 1.0 } else { -0.5 }; n]).collect();
    let run = |model: &DeepSeekV3, device: &Device| {
        let batch = PackedBatch::new(&refs, &tok, device).unwrap();
        let s = score(model, &batch, cfg.temperature).unwrap();
        assert_eq!(s.logprobs.device(), *device, "log-probs on the model's device");
        let old = s.logprobs.detach().sub(&batch.scatter_tokens(&shifts).unwrap()).unwrap();
        let entropy = s.entropy_over(&batch.mask).0;
        let inputs = LossInputs {
            reference: Some(old.add_scalar(0.1).unwrap()),
            old,
            logprobs: s.logprobs,
            advantages: batch.scatter_tokens(&advantages).unwrap(),
            weights: aggregation_weights(LossType::Grpo, &batch, 0..refs.len(), &[true; 6], &lengths, 1, 10).unwrap(),
        };
        let (loss, stats) = grpo_loss(&inputs, 0.2, 0.28, 0.04).unwrap();
        loss.backward().unwrap();
        (loss.to_scalar().unwrap(), stats, entropy)
    };
    let (lc, sc, ec) = run(&cpu, &Device::Cpu);
    let (lg, sg, eg) = run(&on_gpu, &device);
    assert!((lc - lg).abs() <= 1e-4 * lc.abs().max(1e-3), "GRPO loss: GPU {lg} vs CPU {lc}");
    assert_eq!((sg.tokens, sg.clip_low, sg.clip_high), (sc.tokens, sc.clip_low, sc.clip_high), "clip counts");
    assert!(sc.clip_low > 0.0 && sc.clip_high > 0.0, "both clips bind somewhere: {sc:?}");
    assert!((sg.kl - sc.kl).abs() <= 1e-4 * sc.kl.abs(), "KL: GPU {} vs CPU {}", sg.kl, sc.kl);
    assert!((eg - ec).abs() <= 1e-4 * ec, "entropy: GPU {eg} vs CPU {ec}");
    each_gradient_pair(&cpu, &on_gpu, |name, c, g| assert_close(g, c, 1e-4, &format!("grad of {name}, GPU vs CPU")));

    // Post-training in bf16 (`--precision bf16`): both devices round every op's result to bf16,
    // and where their f32 values differ in the last bits a rounding lands one bf16 step (2^-8)
    // apart. Averaged over the loss's tokens that stays far inside 1e-2; a gradient, through a
    // backward of such roundings, within a few steps (3e-2 relative; measured on the emulated
    // driver: the loss 1e-7 apart, the gradients 0.2-0.9%).
    let mut cpu16 = tiny(7);
    CausalLm::set_compute_dtype(&mut cpu16, DType::BF16);
    let gpu16 = cpu16.to_device(&device).unwrap();
    assert_eq!(CausalLm::compute_dtype(&gpu16), DType::BF16, "the copy computes in bf16 too");
    let f32_loss = lc;
    let (lc, sc, ec) = run(&cpu16, &Device::Cpu);
    let (lg, sg, eg) = run(&gpu16, &device);
    assert!(lc != f32_loss, "bf16 computes otherwise than f32");
    assert!((lc - lg).abs() <= 1e-2 * lc.abs().max(1e-3), "bf16 GRPO loss: GPU {lg} vs CPU {lc}");
    assert!((sg.kl - sc.kl).abs() <= 1e-2 * sc.kl.abs(), "bf16 KL: GPU {} vs CPU {}", sg.kl, sc.kl);
    assert!((eg - ec).abs() <= 1e-2 * ec, "bf16 entropy: GPU {eg} vs CPU {ec}");
    each_gradient_pair(&cpu16, &gpu16, |name, c, g| {
        let norm = c.iter().map(|x| x * x).sum::<f32>().sqrt();
        let diff = c.iter().zip(g).map(|(x, y)| (x - y) * (x - y)).sum::<f32>().sqrt();
        assert!(diff <= 3e-2 * norm, "bf16 grad of {name}: GPU {diff} from CPU (norm {norm})");
    });
}

/// Runs `check(name, cpu, gpu)` on each parameter's gradient values, CPU model first; a gradient
/// that only one of the two models has fails the test.
fn each_gradient_pair(cpu: &DeepSeekV3, gpu: &DeepSeekV3, check: impl Fn(&str, &[f32], &[f32])) {
    for ((name, c), (_, g)) in cpu.params.iter().zip(gpu.params.iter()) {
        match (c.grad(), g.grad()) {
            (None, None) => {}
            (Some(c), Some(g)) => check(name, &c.to_vec_f32().unwrap(), &g.to_vec_f32().unwrap()),
            _ => panic!("{name}: a gradient on one device only"),
        }
    }
}

fn small_run() -> GrpoConfig {
    GrpoConfig {
        steps: 2,
        prompts_per_step: 3,
        // A fresh policy's groups differ only where a completion stops before the length limit
        // (the format and overlong rewards see it): eight per group make one likely.
        group_size: 8,
        max_new_tokens: 10,
        micro_batch: 6,
        beta: 0.05,
        num_iterations: 2,
        warmup: 0,
        lr: 1e-3,
        rewards: "accuracy,format:0.5,overlong".into(),
        tasks: "add:1".into(),
        log_completions_every: 0,
        ..GrpoConfig::default()
    }
}

fn lm_head(policy: &dyn CausalLm) -> Vec<f32> {
    policy.params().get("lm_head.weight").unwrap().to_vec_f32().unwrap()
}

#[test]
fn grpo_and_ppo_train_on_a_gpu_and_a_checkpoint_resumes_there() {
    let device = gpu("grpo_and_ppo_train_on_a_gpu_and_a_checkpoint_resumes_there");
    let tok = || Box::new(CharTokenizer::new());
    let policy: Box<dyn CausalLm> = Box::new(tiny(8).to_device(&device).unwrap());
    let mut t = GrpoTrainer::new(policy, small_run(), tok()).unwrap();
    let w0 = lm_head(&*t.policy);
    let log = t.train_step().unwrap();
    for key in ["reward", "policy_loss", "kl", "entropy", "grad_norm"] {
        assert!(log.get(key).is_finite(), "GRPO {key}: {}", log.get(key));
    }
    assert!(log.get("frac_reward_zero_std") < 1.0, "some group has an advantage to learn from");
    assert!(lm_head(&*t.policy) != w0, "the policy moved");
    assert!(t.policy.params().iter().all(|(_, p)| p.device() == device), "the policy stayed on the GPU");

    let dir = std::env::temp_dir().join(format!("whale-cuda-rl-{}", std::process::id()));
    t.save_checkpoint(&dir).unwrap();
    let mut resumed = GrpoTrainer::resume(&dir, tok(), &device).unwrap();
    assert_eq!(resumed.policy.device(), device);
    assert!(lm_head(&*resumed.policy) == lm_head(&*t.policy), "the checkpoint holds the GPU's weights");
    assert_eq!(resumed.run.step, 1);
    assert!(resumed.train_step().unwrap().get("policy_loss").is_finite());
    let _ = std::fs::remove_dir_all(&dir);

    let policy: Box<dyn CausalLm> = Box::new(tiny(5).to_device(&device).unwrap());
    let cfg = GrpoConfig { beta: 0.0, num_iterations: 1, ..small_run() };
    let mut ppo = PpoTrainer::new(policy, cfg, PpoConfig::default(), tok()).unwrap();
    assert_eq!(ppo.critic.head.device(), device, "the value head follows its trunk");
    let head0 = ppo.critic.head.to_vec_f32().unwrap();
    let log = ppo.train_step().unwrap();
    for key in ["reward", "policy_loss", "value_loss", "kl", "entropy"] {
        assert!(log.get(key).is_finite(), "PPO {key}: {}", log.get(key));
    }
    assert!(ppo.critic.head.to_vec_f32().unwrap() != head0, "the value head learned");
}

#[test]
fn a_dense_student_and_the_reward_model_train_on_a_gpu_as_on_the_cpu() {
    let device = gpu("a_dense_student_and_the_reward_model_train_on_a_gpu_as_on_the_cpu");
    let tok = CharTokenizer::new();
    let data: Vec<Example> = (0..6)
        .map(|i| Example { prompt: format!("{i}+{i}="), completion: format!("<answer>{}</answer>", 2 * i) })
        .collect();
    let cfg = SftConfig { steps: 4, batch: 6, seq_len: 20, lr: 3e-3, warmup: 1, ..SftConfig::default() };
    let cpu = DenseModel::new(DenseConfig::student(tok.vocab_size()), 1).unwrap();
    let on_gpu = CausalLm::to_device(&cpu, &device).unwrap();
    assert_eq!(on_gpu.device(), device);
    // Greedy decoding with the dense model's per-head K/V cache, judged against the CPU's logits.
    let prompt = tok.encode("12+7=").unwrap();
    let greedy = SamplingConfig::greedy(12, vec![]);
    let g = on_gpu.generate(std::slice::from_ref(&prompt), &greedy, &mut Rng::new(1)).unwrap();
    assert_greedy_agrees(&cpu, &prompt, &g[0].tokens, 1e-4, "dense greedy decoding");
    let losses =
        |m: &dyn CausalLm| sft(m, &tok, &data, &cfg, |_| {}).unwrap().iter().map(|l| l.loss).collect::<Vec<_>>();
    let (lc, lg) = (losses(&cpu), losses(&*on_gpu));
    for (step, (c, g)) in lc.iter().zip(&lg).enumerate() {
        assert!((c - g).abs() <= 1e-4 * c.abs(), "dense SFT step {step}: loss {g} on the GPU vs {c} on the CPU");
    }

    let pairs: Vec<PreferencePair> =
        ["abc", "dog", "cat", "sun", "moon", "tree"].iter().map(|w| reversal_pair(w)).collect();
    let policy = tiny(2);
    let train = |policy: &dyn CausalLm| {
        let mut rm = RewardModel::from_policy(policy).unwrap();
        (rm.train(&tok, &pairs[..4], &pairs[4..], 5, 4, 3e-3, 0).unwrap(), rm)
    };
    let ((rc, _), (rg, rm_gpu)) = (train(&policy), train(&policy.to_device(&device).unwrap()));
    assert_eq!(rm_gpu.model.head.device(), device);
    assert!(
        (rc.final_loss - rg.final_loss).abs() <= 1e-4 * rc.final_loss.abs(),
        "reward model loss: GPU {} vs CPU {}",
        rg.final_loss,
        rc.final_loss
    );
}
