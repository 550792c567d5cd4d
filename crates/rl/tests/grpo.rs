//! GRPO's maths (spec/rl.md section 7's tests) and the rollout plumbing it stands on.

mod common;

use common::assert_close;
use whale_rl::grpo::{
    aggregation_weights, checkable_steps, grid, group_advantages, grpo_loss, process_advantages, score_rollouts,
    GrpoConfig, GrpoTrainer, LossInputs, LossStats, LossType, ScaleRewards,
};
use whale_rl::parallel::model::config::DeepSeekV3Config;
use whale_rl::parallel::model::generate::CacheMode;
use whale_rl::parallel::model::tensor::testing::GradCheck;
use whale_rl::parallel::model::tensor::{Device, Rng, Tensor};
use whale_rl::parallel::model::tokenizer::{CharTokenizer, Tokenizer};
use whale_rl::parallel::model::{CausalLm, DeepSeekV3};
use whale_rl::ppo::{ppo_advantages, value_loss};
use whale_rl::rewards::{RewardSet, Sample};
use whale_rl::rollout::{sample_groups, score, PackedBatch, PromptTemplate, Rollout, RolloutConfig};
use whale_rl::tasks::{Problem, Split, TaskSet};

fn tiny_model(seed: u64) -> DeepSeekV3 {
    DeepSeekV3::new(DeepSeekV3Config::tiny(), seed).unwrap()
}

/// An RL error as the gradient checker's (tensor) error.
fn tensor_error(e: whale_rl::Error) -> whale_rl::parallel::model::tensor::Error {
    whale_rl::parallel::model::tensor::Error::InvalidArgument { op: "rl loss", msg: e.to_string() }
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

#[test]
fn advantages_are_group_normalised_with_sample_std() {
    // Dr. GRPO's worked example: rewards [1,1,1,0] -> +0.58 x3, -1.73 (ddof = 1, +1e-4).
    let a = group_advantages(&[1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0], 4, ScaleRewards::Group);
    let s1 = (1.0f64 / 3.0).sqrt(); // std of [1,0,1,0] with ddof 1 = sqrt(1/3)
    assert!(close(a[0], 0.5 / (s1 + 1e-4), 1e-12));
    assert!(close(a[1], -0.5 / (s1 + 1e-4), 1e-12));
    assert!(close(a[4], 0.25 / (0.5 + 1e-4), 1e-12), "{}", a[4]);
    assert!(close(a[7], -0.75 / (0.5 + 1e-4), 1e-12));
    // Equal rewards: exactly zero advantage.
    assert_eq!(group_advantages(&[1.0, 1.0, 1.0], 3, ScaleRewards::Group), vec![0.0; 3]);
    // No scaling (Dr. GRPO) and batch scaling.
    assert_eq!(group_advantages(&[1.0, 0.0, 1.0, 1.0], 2, ScaleRewards::None), vec![0.5, -0.5, 0.0, 0.0]);
    let b = group_advantages(&[1.0, 0.0, 1.0, 1.0], 2, ScaleRewards::Batch);
    assert!(close(b[0], 0.5 / (0.5 + 1e-4), 1e-12), "{b:?}");
    // A NaN reward (no reward applied) is out of the baseline and gets 0.
    let c = group_advantages(&[1.0, f64::NAN, 0.0], 3, ScaleRewards::None);
    assert_eq!(c, vec![0.5, 0.0, -0.5]);
}

#[test]
fn process_advantages_sum_the_normalised_rewards_of_later_steps() {
    // Two completions, steps ending at tokens: A: (1, r=1), (3, r=0); B: (2, r=1).
    let steps = vec![vec![(1, 1.0), (3, 0.0)], vec![(2, 1.0)]];
    let (mean, std) = (2.0 / 3.0, (1.0f64 / 3.0).sqrt());
    // Scaled by the group's std, the batch's, or not at all, as outcome rewards are.
    for (scale, div) in
        [(ScaleRewards::Group, std + 1e-4), (ScaleRewards::Batch, 0.25 + 1e-4), (ScaleRewards::None, 1.0)]
    {
        let adv = process_advantages(&steps, &[4, 3], scale, 0.25);
        let n = |r: f64| (r - mean) / div;
        assert!(close(adv[0][0], n(1.0) + n(0.0), 1e-12));
        assert!(close(adv[0][1], n(1.0) + n(0.0), 1e-12));
        assert!(close(adv[0][2], n(0.0), 1e-12));
        assert!(close(adv[0][3], n(0.0), 1e-12));
        assert!(adv[1].iter().all(|&a| close(a, n(1.0), 1e-12)));
    }
}

#[test]
fn addition_steps_are_checked_one_by_one() {
    let p = Problem {
        task: "add".into(),
        prompt: "12+7=".into(),
        answer: "19".into(),
        solution: "<think>2+7+0=9;1+0+0=1</think><answer>19</answer>".into(),
    };
    let text = "<think>2+7+0=9;1+0+0=2</think><answer>29</answer><eos>";
    let steps = checkable_steps(&p, text, false).unwrap();
    assert_eq!(steps.iter().map(|s| s.1).collect::<Vec<_>>(), vec![1.0, 0.0, 0.0]);
    assert_eq!(&text[..steps[0].0], "<think>2+7+0=9");
    assert_eq!(&text[..steps[1].0], "<think>2+7+0=9;1+0+0=2");
    assert_eq!(steps[2].0, text.len(), "the answer step ends with the completion");
    // The answer step is right as the accuracy reward is: not when the completion ran out of
    // tokens after it.
    let right = "<think>2+7+0=9;1+0+0=1</think><answer>19</answer>";
    assert_eq!(checkable_steps(&p, right, false).unwrap().last().unwrap().1, 1.0);
    assert_eq!(checkable_steps(&p, right, true).unwrap().last().unwrap().1, 0.0);
    // No reasoning block: one wrong step up to the answer, then the answer.
    let bare = "xy<answer>19</answer>";
    assert_eq!(checkable_steps(&p, bare, false).unwrap(), vec![(2, 0.0), (bare.len(), 1.0)]);
    let count = Problem { task: "countdown".into(), ..p };
    assert!(checkable_steps(&count, text, false).is_none());
}

#[test]
fn process_supervision_scores_every_completion_of_a_checkable_group_by_its_steps() {
    let tok = CharTokenizer::new();
    let add = Problem {
        task: "add".into(),
        prompt: "12+7=".into(),
        answer: "19".into(),
        solution: "<think>2+7+0=9;1+0+0=1</think><answer>19</answer>".into(),
    };
    let count = Problem { task: "countdown".into(), prompt: "c3,7t10=".into(), answer: "3+7".into(), ..add.clone() };
    let problems = [add, count];
    let texts = [
        "<think>2+7+0=9;1+0+0=1</think><answer>19</answer>",
        "<answer>18</answer>", // no reasoning block: still scored by its (wrong) steps
        "<think></think><answer>3+7</answer>",
        "<answer>1</answer>",
    ];
    let rollouts: Vec<Rollout> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| Rollout {
            problem: i / 2,
            prompt: tok.encode(&problems[i / 2].prompt).unwrap(),
            // As sampled: the completion and its EOS.
            tokens: tok.encode(t).unwrap().into_iter().chain([tok.eos_id()]).collect(),
            sample_logprobs: vec![0.0; t.len()],
            truncated: false,
            text: t.to_string(),
        })
        .collect();
    let rewards = RewardSet::parse("accuracy", 64).unwrap();
    let scores = rollouts
        .iter()
        .map(|r| {
            let sample =
                Sample { problem: &problems[r.problem], text: &r.text, tokens: r.tokens.len(), truncated: false };
            rewards.score(&sample).unwrap()
        })
        .collect::<Vec<_>>();
    let cfg = GrpoConfig { process_supervision: true, group_size: 2, rewards: "accuracy".into(), ..Default::default() };
    // A score list that does not match the rollouts is an error, not a shorter batch.
    let mut fewer: Vec<_> = scores.clone();
    fewer.pop();
    let err = score_rollouts(rollouts.clone(), fewer, &problems, &cfg, &tok).unwrap_err().to_string();
    assert!(err.contains("3 scores for 4 rollouts"), "{err}");
    let scored = score_rollouts(rollouts, scores, &problems, &cfg, &tok).unwrap();
    // Group one's steps: [1, 1, 1] and [0, 0]; mean 0.6, std sqrt(0.3).
    let n = |r: f64| (r - 0.6) / (0.3f64.sqrt() + 1e-4);
    let first = &scored[0].advantages;
    assert!(close(first[0], 3.0 * n(1.0), 1e-9), "{first:?}");
    // The first step ends with the token before `;` (`<think>` is one token).
    let semi = scored[0].rollout.tokens.iter().position(|&t| t == tok.encode(";").unwrap()[0]).unwrap();
    assert!(close(first[semi - 1], 3.0 * n(1.0), 1e-9) && close(first[semi], 2.0 * n(1.0), 1e-9), "{first:?}");
    // The EOS token is the answer step's last: stopping is trained.
    assert_eq!(scored[0].rollout.tokens.last(), Some(&tok.eos_id()));
    assert!(close(*first.last().unwrap(), n(1.0), 1e-9));
    let second = &scored[1].advantages;
    assert!(close(second[0], 2.0 * n(0.0), 1e-9) && close(*second.last().unwrap(), n(0.0), 1e-9), "{second:?}");
    // Countdown has no checkable steps: its group keeps the outcome advantages (+-0.7071).
    let out = 0.5 / (0.5f64.sqrt() + 1e-4);
    assert!(scored[2].advantages.iter().all(|&a| close(a, out, 1e-9)));
    assert!(scored[3].advantages.iter().all(|&a| close(a, -out, 1e-9)));
}

/// Log-probs as variables, the others as constants, for the loss-level tests.
fn inputs(l: &[Vec<f32>], old: &[Vec<f32>], reference: &[Vec<f32>], adv: &[Vec<f32>], w: &[Vec<f32>]) -> LossInputs {
    LossInputs {
        logprobs: grid(l).unwrap().variable(),
        old: grid(old).unwrap(),
        reference: Some(grid(reference).unwrap()),
        advantages: grid(adv).unwrap(),
        weights: grid(w).unwrap(),
    }
}

#[test]
fn on_policy_loss_is_zero_but_its_gradient_is_the_closed_form() {
    // mu = 1: old = current, so rho = 1 and no clip binds. Two completions of lengths 3 and 2,
    // advantages +1 / -1 (a centred group), grpo aggregation weights 1 / (G |o_i|).
    let l = vec![vec![-0.5f32, -1.2, -0.1], vec![-2.0, -0.3, 0.0]];
    let reference = vec![vec![-0.7f32, -1.0, -0.4], vec![-1.5, -0.2, 0.0]];
    let adv = vec![vec![1.0f32; 3], vec![-1.0; 3]];
    let w = vec![vec![1.0 / 6.0; 3], vec![0.25, 0.25, 0.0]];
    let beta = 0.04;
    let inp = inputs(&l, &l, &reference, &adv, &w);
    let (loss, stats) = grpo_loss(&inp, 0.2, 0.2, 0.0).unwrap();
    assert!(loss.to_scalar().unwrap().abs() < 1e-6, "the mu = 1 loss value is ~0");
    assert_eq!((stats.clip_low, stats.clip_high), (0.0, 0.0), "no clipping at rho = 1");
    loss.backward().unwrap();
    let g0 = inp.logprobs.grad().unwrap().to_vec_f32().unwrap();
    assert!(g0.iter().any(|&g| g.abs() > 0.1), "but the gradient is not zero");

    // With the KL term: d loss / d l = -w (A + beta (pi_ref / pi - 1)) (spec 1.2).
    let inp = inputs(&l, &l, &reference, &adv, &w);
    let (loss, stats) = grpo_loss(&inp, 0.2, 0.2, beta).unwrap();
    loss.backward().unwrap();
    let g = inp.logprobs.grad().unwrap().to_vec_f32().unwrap();
    for i in 0..2 {
        for t in 0..3 {
            let k = i * 3 + t;
            let want = -w[i][t] as f64
                * (adv[i][t] as f64 + beta as f64 * ((reference[i][t] - l[i][t]) as f64).exp() - beta as f64);
            assert!(close(g[k] as f64, want, 1e-5), "token ({i},{t}): {} vs {want}", g[k]);
        }
    }
    // The KL statistic is the mean k3 over the weighted tokens, and k3 >= 0.
    let k3: f64 = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
        .iter()
        .map(|&(i, t)| {
            let d = (reference[i][t] - l[i][t]) as f64;
            d.exp() - d - 1.0
        })
        .sum();
    assert!(close(stats.kl, k3, 1e-5) && stats.tokens == 5.0, "{stats:?}");
}

#[test]
fn ppo_value_loss_takes_the_larger_of_the_clipped_and_unclipped_errors() {
    // TRL's 0.5 * max((V - G)^2, (V_clip - G)^2), V_clip = V_old + clip(V - V_old, +-0.2).
    let t = |v: &[f32]| Tensor::from_vec(v.to_vec(), &[1, v.len()], &Device::Cpu).unwrap();
    let (old, returns, w) = (t(&[0.0, 0.3, -0.2]), t(&[2.0, 0.5, 0.4]), t(&[1.0, 0.5, 2.0]));
    // Token 0 moved past the clip toward G: its clipped error (0.2 - 2)^2 = 3.24 is the larger,
    // and the clip passes no gradient. Token 1 stays inside: (0.35 - 0.5)^2. Token 2 moved past
    // the clip away from G: its own error (-0.7 - 0.4)^2 = 1.21 is the larger.
    let values = t(&[1.0, 0.35, -0.7]).variable();
    let loss = value_loss(&values, &old, &returns, &w, 0.2).unwrap();
    let want = 0.5 * (3.24 + 0.5 * 0.0225 + 2.0 * 1.21);
    assert!(close(loss.to_scalar().unwrap() as f64, want, 1e-6), "{} vs {want}", loss.to_scalar().unwrap());
    loss.backward().unwrap();
    let g = values.grad().unwrap().to_vec_f32().unwrap();
    let want = [0.0, 0.5 * 0.5 * 2.0 * (0.35 - 0.5), 0.5 * 2.0 * 2.0 * (-0.7 - 0.4)];
    for (a, b) in g.iter().zip(want) {
        assert!(close(*a as f64, b, 1e-5), "{g:?} vs {want:?}");
    }
    // And against finite differences at these points (none within eps of a kink).
    GradCheck::default()
        .run(&[t(&[1.0, 0.35, -0.7])], |v| value_loss(&v[0], &old, &returns, &w, 0.2).map_err(tensor_error))
        .unwrap();
}

#[test]
fn off_policy_loss_gradient_matches_finite_differences_and_clips() {
    // rho away from the kinks at 0.8 and 1.2: inside, clipped above with A > 0 (no gradient),
    // clipped below with A < 0 (no gradient), and outside the clip on the harmless side.
    let old = vec![vec![-1.0f32, -1.0, -1.0, -1.0]];
    let l = vec![vec![-0.9f32, -0.5, -1.5, -1.4]];
    let adv = vec![vec![0.7f32, 0.7, -0.4, 0.9]];
    let w = vec![vec![0.25f32; 4]];
    let reference = vec![vec![-1.1f32, -0.8, -1.2, -1.3]];
    let inp = inputs(&l, &old, &reference, &adv, &w);
    let (loss, stats) = grpo_loss(&inp, 0.2, 0.2, 0.1).unwrap();
    assert_eq!(stats.clip_high, 1.0, "token 1: rho = e^0.5 > 1.2 with A > 0");
    assert_eq!(stats.clip_low, 1.0, "token 2: rho = e^-0.5 < 0.8 with A < 0");
    loss.backward().unwrap();
    let g = inp.logprobs.grad().unwrap().to_vec_f32().unwrap();
    // Clipped tokens carry only the KL gradient.
    for t in [1usize, 2] {
        let kl_only = 0.25 * 0.1 * (1.0 - ((reference[0][t] - l[0][t]) as f64).exp());
        assert!(close(g[t] as f64, kl_only, 1e-5), "token {t}: {} vs {kl_only}", g[t]);
    }
    let check = GradCheck::default();
    let (o, r, a, wt) = (grid(&old).unwrap(), grid(&reference).unwrap(), grid(&adv).unwrap(), grid(&w).unwrap());
    check
        .run(&[grid(&l).unwrap()], |x| {
            let inp = LossInputs {
                logprobs: x[0].clone(),
                old: o.clone(),
                reference: Some(r.clone()),
                advantages: a.clone(),
                weights: wt.clone(),
            };
            Ok(grpo_loss(&inp, 0.2, 0.2, 0.1).map_err(tensor_error)?.0)
        })
        .unwrap();
}

#[test]
fn clip_higher_bounds_the_ratio_by_epsilon_high_above_and_epsilon_below() {
    // DAPO's clip-higher, eps_low 0.2 and eps_high 0.28: rho = 1.25 with A > 0 lies inside
    // [0.8, 1.28] (a gradient), rho = 1.3 past it (none); rho = 0.75 with A < 0 past 0.8 (none),
    // rho = 0.85 inside. Swapped bounds ([0.72, 1.2]) would clip the first and keep the third.
    let old = vec![vec![0.0f32; 4]];
    let l = vec![[1.25f32, 1.3, 0.75, 0.85].map(f32::ln).to_vec()];
    let adv = vec![vec![1.0f32, 1.0, -1.0, -1.0]];
    let w = vec![vec![1.0f32; 4]];
    let inp = inputs(&l, &old, &old, &adv, &w);
    let (loss, stats) = grpo_loss(&inp, 0.2, 0.28, 0.0).unwrap();
    assert_eq!((stats.clip_high, stats.clip_low), (1.0, 1.0), "{stats:?}");
    // -min(rho A, clip(rho) A) per token: -1.25, -1.28, 0.8, 0.85.
    let want = -1.25 - 1.28 + 0.8 + 0.85;
    assert!(close(loss.to_scalar().unwrap() as f64, want, 1e-6), "{} vs {want}", loss.to_scalar().unwrap());
    loss.backward().unwrap();
    let g = inp.logprobs.grad().unwrap().to_vec_f32().unwrap();
    // d(-rho A)/dl = -rho A where unclipped; 0 where the clip holds.
    let want = [-1.25, 0.0, 0.0, 0.85];
    for (t, (a, b)) in g.iter().zip(want).enumerate() {
        assert!(close(*a as f64, b, 1e-5), "token {t}: {g:?} vs {want:?}");
    }
}

fn rollout(prompt: usize, tokens: usize) -> Rollout {
    Rollout {
        problem: 0,
        prompt: vec![8; prompt],
        tokens: vec![9; tokens],
        sample_logprobs: vec![0.0; tokens],
        truncated: false,
        text: String::new(),
    }
}

#[test]
fn dr_grpo_weights_do_not_depend_on_completion_length_and_dapo_counts_the_whole_step() {
    let rs = [rollout(3, 2), rollout(2, 6), rollout(4, 4)];
    let refs: Vec<&Rollout> = rs.iter().collect();
    let lengths = [2usize, 6, 4];
    let active = [true; 3];
    let batch = PackedBatch::new(&refs, &CharTokenizer::new(), &Device::Cpu).unwrap();
    let weights = |lt| aggregation_weights(lt, &batch, 0..3, &active, &lengths, 1, 10).unwrap().to_vec_f32().unwrap();
    let row_weights = |w: &[f32], i: usize| batch.row_tokens(w, i).to_vec();
    let dr = weights(LossType::DrGrpo);
    for i in 0..3 {
        assert!(row_weights(&dr, i).iter().all(|&x| (x - 1.0 / 30.0).abs() < 1e-9), "dr_grpo: 1 / (B * max_len)");
    }
    let grpo = weights(LossType::Grpo);
    assert!(
        (row_weights(&grpo, 0)[0] - 1.0 / 6.0).abs() < 1e-7 && (row_weights(&grpo, 1)[0] - 1.0 / 18.0).abs() < 1e-7
    );
    // Each completion's weights sum to 1 / G under grpo; all tokens to 1 under dapo.
    let dapo = weights(LossType::Dapo);
    assert!((dapo.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    assert_eq!(dapo.iter().filter(|&&x| x > 0.0).count(), 12, "only completion tokens carry weight");
    // Split the step in two micro-batches: dapo weights are unchanged (global token count).
    let first = PackedBatch::new(&refs[..2], &CharTokenizer::new(), &Device::Cpu).unwrap();
    let w1 = aggregation_weights(LossType::Dapo, &first, 0..2, &active, &lengths, 2, 10).unwrap().to_vec_f32().unwrap();
    assert!(w1.iter().filter(|&&x| x > 0.0).all(|&x| (x - 1.0 / 12.0).abs() < 1e-9));
}

/// TRL's GRPOTrainer._compute_loss, run by scripts/make_rl_reference.py on four completions of
/// lengths 6, 3, 5 and 2 (a limit of 8, dr_grpo's divisor) with both clips binding: for each
/// aggregation (grpo, bnpo, dr_grpo, dapo), beta 0 and 0.04, and the step in one micro-batch or
/// two, the summed loss and the gradient at every completion token; with one micro-batch also
/// TRL's logged clip ratios and KL. Here each micro-batch is packed as a GRPO step packs it and
/// weighted by `aggregation_weights`. (One optimizer update a step: with `minibatches` > 1, dapo
/// divides each update by its own tokens, as verl's token-mean does; TRL divides every update by
/// the generation batch's tokens over the updates.)
#[test]
fn grpo_loss_and_its_aggregations_match_trl() {
    let e = fixture("trl_grpo_loss");
    let (l, old, reference) = (rows(&e["logprobs"]), rows(&e["old"]), rows(&e["reference"]));
    let lengths: Vec<usize> = l.iter().map(Vec::len).collect();
    // TRL's advantages are one per completion, broadcast over its tokens.
    let adv: Vec<Vec<f32>> = f32s(&e["advantages"]).iter().zip(&lengths).map(|(&a, &n)| vec![a; n]).collect();
    let number = |key: &str| e[key].as_f64().unwrap();
    let (eps_low, eps_high) = (number("epsilon_low") as f32, number("epsilon_high") as f32);
    let max_len = e["max_completion_length"].as_u64().unwrap() as usize;
    let rollouts: Vec<Rollout> = lengths.iter().map(|&n| rollout(2, n)).collect();
    let active = vec![true; lengths.len()];
    let cases = e["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 16, "4 aggregations x 2 betas x 2 micro-batchings");
    for case in cases {
        let loss_type: LossType = serde_json::from_value(case["loss_type"].clone()).unwrap();
        let beta = case["beta"].as_f64().unwrap() as f32;
        let micro: Vec<Vec<usize>> = serde_json::from_value(case["micro_batches"].clone()).unwrap();
        let name = format!("{loss_type:?}, beta {beta}, {} micro-batches", micro.len());
        let (mut loss, mut stats, mut grad) = (0.0f64, LossStats::default(), vec![Vec::new(); lengths.len()]);
        for rows in &micro {
            let refs: Vec<&Rollout> = rows.iter().map(|&i| &rollouts[i]).collect();
            let batch = PackedBatch::new(&refs, &CharTokenizer::new(), &Device::Cpu).unwrap();
            let pack = |v: &[Vec<f32>]| batch.scatter_tokens(&rows.iter().map(|&i| v[i].clone()).collect::<Vec<_>>());
            let span = rows[0]..rows[rows.len() - 1] + 1;
            let inp = LossInputs {
                logprobs: pack(&l).unwrap().variable(),
                old: pack(&old).unwrap(),
                reference: Some(pack(&reference).unwrap()),
                advantages: pack(&adv).unwrap(),
                weights: aggregation_weights(loss_type, &batch, span, &active, &lengths, micro.len(), max_len).unwrap(),
            };
            let (part, part_stats) = grpo_loss(&inp, eps_low, eps_high, beta).unwrap();
            part.backward().unwrap();
            loss += part.to_scalar().unwrap() as f64;
            stats.add(&part_stats);
            let g = inp.logprobs.grad().unwrap().to_vec_f32().unwrap();
            for (j, &i) in rows.iter().enumerate() {
                grad[i] = batch.row_tokens(&g, j).to_vec();
            }
        }
        // f32 arithmetic here against TRL's on float64 leaves: a few f32 roundings apart.
        let want = case["loss"].as_f64().unwrap();
        assert!(close(loss, want, 1e-5 * want.abs().max(1e-2)), "{name}: loss {loss} vs TRL's {want}");
        let want = rows(&case["grad"]);
        for (i, (got, want)) in grad.iter().zip(&want).enumerate() {
            assert_eq!(got.len(), want.len(), "{name}: completion {i}'s tokens");
        }
        assert_close(&grad.concat(), &want.concat(), 1e-5, &format!("{name}: d loss / d logprob vs TRL's"));
        if micro.len() == 1 {
            let mean = |sum: f64| sum / stats.tokens;
            assert_eq!(mean(stats.clip_low), case["clip_ratio_low"].as_f64().unwrap(), "{name}: clip_ratio/low_mean");
            assert_eq!(
                mean(stats.clip_high),
                case["clip_ratio_high"].as_f64().unwrap(),
                "{name}: clip_ratio/high_mean"
            );
            assert!(stats.clip_low > 0.0 && stats.clip_high > 0.0, "{name}: both clips bind somewhere");
            if beta > 0.0 {
                let want = case["kl"].as_f64().unwrap();
                assert!(close(mean(stats.kl), want, 1e-5 * want), "{name}: KL {} vs TRL's {want}", mean(stats.kl));
            }
        }
    }
}

/// A reference fixture of scripts/make_rl_reference.py.
fn fixture(name: &str) -> serde_json::Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/{name}/expected.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn f64s(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn f32s(v: &serde_json::Value) -> Vec<f32> {
    f64s(v).into_iter().map(|x| x as f32).collect()
}

fn rows(v: &serde_json::Value) -> Vec<Vec<f32>> {
    v.as_array().unwrap().iter().map(f32s).collect()
}

/// verl's own functions (verl.trainer.ppo.core_algos, run by scripts/make_rl_reference.py) on
/// four completions of lengths 6, 3, 5 and 2: GAE then whitening at two (gamma, lambda), the
/// clipped value loss and its gradient with predictions past the clip both ways, low_var_kl (k3)
/// and its gradient with verl's log-ratio clamp and k3's upper clamp binding, and GRPO's outcome
/// advantages for groups of four (one of equal rewards) and of one.
#[test]
fn ppo_and_grpo_arithmetic_match_verl() {
    let e = fixture("verl_ppo");
    let flat = |v: &serde_json::Value| rows(v).concat();

    // GAE in f64 on both sides (inputs f32 holds exactly): returns a few f64 roundings apart.
    // verl's masked means divide by the token count + 1e-8 (ours and TRL's by the count), which
    // moves its whitened advantages by about 1e-8 / 16 relative: 1e-8 holds them.
    let gae = &e["gae"];
    let rows64 = |v: &serde_json::Value| -> Vec<Vec<f64>> { v.as_array().unwrap().iter().map(f64s).collect() };
    let (rewards, values) = (rows64(&gae["rewards"]), rows64(&gae["values"]));
    let active = vec![true; rewards.len()];
    for case in gae["cases"].as_array().unwrap() {
        let (gamma, lam) = (case["gamma"].as_f64().unwrap(), case["lam"].as_f64().unwrap());
        let (advantages, returns) = ppo_advantages(&rewards, &values, &active, (gamma, lam), true).unwrap();
        let checks = [
            ("whitened advantages", advantages, &case["advantages"], 1e-8),
            ("returns", returns, &case["returns"], 1e-12),
        ];
        for (name, got, want, tol) in checks {
            for (i, (a, b)) in got.concat().iter().zip(rows64(want).concat()).enumerate() {
                assert!(close(*a, b, tol), "gamma {gamma}, lambda {lam}: {name}[{i}] {a} vs verl's {b}");
            }
        }
    }

    // Rows that do not line up are refused by index, not indexed out of bounds.
    let short = [values[..2].to_vec(), vec![values[2][..1].to_vec()], values[3..].to_vec()].concat();
    let err = ppo_advantages(&rewards, &short, &active, (1.0, 0.95), true).unwrap_err().to_string();
    assert!(err.contains("completion 2 has 5 rewards and 1 values"), "{err}");

    // The value loss over one row of every token, token-mean weights.
    let v = &e["value_loss"];
    let grid1 = |x: Vec<f32>| grid(&[x]).unwrap();
    let preds = grid1(flat(&v["vpreds"])).variable();
    let tokens = flat(&v["vpreds"]).len();
    let weights = grid1(vec![1.0 / tokens as f32; tokens]);
    let eps = v["cliprange_value"].as_f64().unwrap() as f32;
    let loss = value_loss(&preds, &grid1(flat(&v["old_values"])), &grid1(flat(&v["returns"])), &weights, eps).unwrap();
    let want = v["loss"].as_f64().unwrap();
    assert!(
        close(loss.to_scalar().unwrap() as f64, want, 1e-6),
        "value loss {} vs verl's {want}",
        loss.to_scalar().unwrap()
    );
    loss.backward().unwrap();
    let clipped = flat(&v["grad"]).iter().filter(|&&g| g == 0.0).count();
    assert!(clipped > 0 && clipped < tokens, "the clip binds on some tokens, not all ({clipped} of {tokens})");
    assert_close(&preds.grad().unwrap().to_vec_f32().unwrap(), &flat(&v["grad"]), 1e-6, "value loss gradient");

    // k3 is grpo_loss's KL term: zero advantages leave `beta * sum(w * k3)` with beta = w = 1.
    let k = &e["k3"];
    let l = flat(&k["logprob"]);
    let inp = LossInputs {
        logprobs: grid1(l.clone()).variable(),
        old: grid1(l.clone()),
        reference: Some(grid1(flat(&k["reference"]))),
        advantages: grid1(vec![0.0; l.len()]),
        weights: grid1(vec![1.0; l.len()]),
    };
    let (loss, stats) = grpo_loss(&inp, 0.2, 0.2, 1.0).unwrap();
    let want: Vec<f32> = flat(&k["k3"]);
    assert_eq!(want.iter().filter(|&&x| x == 10.0).count(), 3, "the fixture's three clamped tokens");
    let sum: f64 = want.iter().map(|&x| x as f64).sum();
    assert!(
        close(stats.kl, sum, 1e-6) && close(loss.to_scalar().unwrap() as f64, sum, 1e-6),
        "k3 sum {} vs verl's {sum}",
        stats.kl
    );
    loss.backward().unwrap();
    assert_close(&inp.logprobs.grad().unwrap().to_vec_f32().unwrap(), &flat(&k["grad"]), 1e-6, "k3 gradient");

    // Outcome advantages: the groups of four in one call, the groups of one in another.
    let o = &e["grpo_advantages"];
    let (r, want) = (f64s(&o["rewards"]), f64s(&o["advantages"]));
    assert_eq!(o["groups"], serde_json::json!([4, 4, 1, 1]));
    assert_eq!(o["epsilon"].as_f64(), Some(1e-4), "TRL's epsilon, which group_advantages uses");
    let got =
        [group_advantages(&r[..8], 4, ScaleRewards::Group), group_advantages(&r[8..], 1, ScaleRewards::Group)].concat();
    // verl holds a group of one's std as a float32 1, so its 1 + epsilon is rounded to f32
    // (2^-24 relative); without the epsilon the groups of one would be 1e-4 off.
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert!(close(*a, *b, 1e-7), "completion {i}: advantage {a} vs verl's {b}");
    }
}

/// Three samples per prompt of up to 12 tokens at `temperature`, through the absorbed cache.
fn three_samples_at(temperature: f32) -> RolloutConfig {
    RolloutConfig {
        group_size: 3,
        temperature,
        top_p: None,
        top_k: None,
        max_new_tokens: 12,
        cache: CacheMode::Absorb,
        template: PromptTemplate::Plain,
    }
}

#[test]
fn a_group_reward_compares_each_prompts_completions_with_each_other_alone() {
    use whale_rl::grpo::RlRun;
    use whale_rl::reward_model::ReasoningOnly;
    use whale_rl::rewards::LengthReward;
    let tok = CharTokenizer::new();
    let problems: Vec<Problem> = TaskSet::parse("add:1-3").unwrap().problems(3, 5, Split::Train);
    let rollouts = sample_groups(&tiny_model(7), &tok, &problems, &three_samples_at(1.0), &mut Rng::new(1)).unwrap();
    let samples: Vec<Sample> = rollouts.iter().map(|r| r.sample(&problems)).collect();
    let run = RlRun::new(GrpoConfig { rewards: "length".into(), ..GrpoConfig::default() }, Box::new(tok), 0).unwrap();
    let totals = |scores: Vec<whale_rl::rewards::Scores>| scores.iter().map(|s| s.total).collect::<Vec<f64>>();
    let got = totals(run.score(&rollouts, &problems).unwrap());
    let by_group: Vec<f64> = samples.chunks(3).flat_map(|g| totals(run.rewards.score_group(g).unwrap())).collect();
    assert_eq!(got, by_group);
    assert!(by_group.iter().any(|&r| r != 0.0), "lengths differ within a group: {by_group:?}");
    // Not the batch as one group: its shortest and longest completions would set every lambda.
    assert_ne!(got, totals(run.rewards.score_group(&samples).unwrap()));
    // Restricted to the reasoning prompts, the group is still compared within itself.
    let only = RewardSet { entries: vec![(Box::new(ReasoningOnly(Box::new(LengthReward))), 1.0)] };
    let restricted: Vec<f64> = samples.chunks(3).flat_map(|g| totals(only.score_group(g).unwrap())).collect();
    assert_eq!(restricted, by_group);
}

#[test]
fn scoring_a_rollout_gives_the_log_probs_it_was_sampled_with() {
    let model = tiny_model(7);
    let tok = CharTokenizer::new();
    let problems: Vec<Problem> = TaskSet::parse("add:1-3").unwrap().problems(3, 5, Split::Train);
    let cfg = three_samples_at(0.7);
    let rollouts = sample_groups(&model, &tok, &problems, &cfg, &mut Rng::new(1)).unwrap();
    assert_eq!(rollouts.len(), 9);
    assert!(rollouts.iter().all(|r| r.truncated != r.tokens.ends_with(&[tok.eos_id()])));
    // The tiny preset's 64 embedding rows pad the character tokenizer's 62 ids: only real ids
    // are sampled, and scored over the same 62 (the sampled log-probs match below).
    assert_eq!((model.config.vocab_size, tok.vocab_size()), (64, 62));
    assert!(rollouts.iter().flat_map(|r| &r.tokens).all(|&t| (t as usize) < tok.vocab_size()));
    // Ragged prompts (1-3 digit operands) and completions packed in one batch.
    let batch = PackedBatch::new(&rollouts.iter().collect::<Vec<_>>(), &tok, &Device::Cpu).unwrap();
    let s = score(&model, &batch, 0.7).unwrap();
    let lp = s.logprobs.to_vec_f32().unwrap();
    for (i, r) in rollouts.iter().enumerate() {
        let scored = batch.row_tokens(&lp, i);
        for (a, b) in scored.iter().zip(&r.sample_logprobs) {
            assert!((a - b).abs() < 2e-4, "rollout {i}: scored {a} vs sampled {b}");
        }
    }
    let (sum, count) = s.entropy_over(&batch.mask);
    assert_eq!(count, rollouts.iter().map(|r| r.tokens.len()).sum::<usize>() as f64, "every completion token");
    let mean = sum / count;
    assert!(mean > 0.0 && mean < (tok.vocab_size() as f64).ln() + 1e-6, "mean entropy {mean}");
    assert!(s.entropies.iter().zip(&batch.mask).all(|(&e, &m)| m != 0.0 || e == 0.0), "0 off the mask");
    // A loss's weights that leave out every row but the first keep only its tokens.
    let first: Vec<Vec<f32>> =
        rollouts.iter().enumerate().map(|(i, r)| vec![if i == 0 { 0.5 } else { 0.0 }; r.tokens.len()]).collect();
    let first = batch.scatter_tokens(&first).unwrap().to_vec_f32().unwrap();
    assert_eq!(s.entropy_over(&first).1, rollouts[0].tokens.len() as f64);
}

#[test]
fn a_group_with_constant_rewards_gives_no_policy_gradient() {
    let model = tiny_model(3);
    let tok = CharTokenizer::new();
    let problems = TaskSet::parse("add:2").unwrap().problems(2, 2, Split::Train);
    let cfg = RolloutConfig {
        group_size: 4,
        temperature: 1.0,
        top_p: None,
        top_k: None,
        max_new_tokens: 10,
        cache: CacheMode::Naive,
        template: PromptTemplate::Plain,
    };
    let rollouts = sample_groups(&model, &tok, &problems, &cfg, &mut Rng::new(4)).unwrap();
    // The first group's rewards are all equal, the second's are not.
    let adv = group_advantages(&[1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0], 4, ScaleRewards::Group);
    let batch = PackedBatch::new(&rollouts.iter().collect::<Vec<_>>(), &tok, &Device::Cpu).unwrap();
    let lengths: Vec<usize> = rollouts.iter().map(|r| r.tokens.len()).collect();
    let rows = |f: &dyn Fn(usize) -> f32| -> Vec<Vec<f32>> {
        lengths.iter().enumerate().map(|(i, &n)| vec![f(i); n]).collect()
    };
    let weights = aggregation_weights(LossType::Grpo, &batch, 0..8, &[true; 8], &lengths, 1, 10).unwrap();
    // The policy gradient of the batch, with every row's weight or with the first group's zeroed.
    let gradient = |keep_first_group: bool| -> Vec<f32> {
        let s = score(&model, &batch, 1.0).unwrap();
        let keep = batch.scatter_tokens(&rows(&|i| (keep_first_group || i >= 4) as u8 as f32)).unwrap();
        let inp = LossInputs {
            old: s.logprobs.detach(),
            logprobs: s.logprobs,
            reference: None,
            advantages: batch.scatter_tokens(&rows(&|i| adv[i] as f32)).unwrap(),
            weights: weights.mul(&keep).unwrap(),
        };
        grpo_loss(&inp, 0.2, 0.2, 0.0).unwrap().0.backward().unwrap();
        // (The MTP module's parameters take no part in the logits and have no gradient.)
        let g: Vec<f32> =
            model.params.iter().filter_map(|(_, p)| p.grad()).flat_map(|g| g.to_vec_f32().unwrap()).collect();
        model.params.zero_grad();
        g
    };
    let (with, without) = (gradient(true), gradient(false));
    assert!(without.iter().any(|&x| x != 0.0), "the mixed group moves the policy");
    let scale = without.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    for (a, b) in with.iter().zip(&without) {
        assert!((a - b).abs() <= 1e-6 * scale, "the constant group adds {} to a gradient of {b}", a - b);
    }
}

fn small_run(micro_batch: usize, loss_type: LossType) -> GrpoConfig {
    GrpoConfig {
        steps: 2,
        prompts_per_step: 3,
        group_size: 4,
        max_new_tokens: 10,
        micro_batch,
        loss_type,
        beta: 0.05,
        num_iterations: 2,
        minibatches: 1,
        warmup: 0,
        lr: 1e-3,
        rewards: "accuracy,format:0.5,overlong".into(),
        tasks: "add:1".into(),
        log_completions_every: 0,
        seed: 11,
        ..GrpoConfig::default()
    }
}

#[test]
fn micro_batching_does_not_change_the_update() {
    for lt in [LossType::Grpo, LossType::Dapo, LossType::DrGrpo] {
        let run = |mb: usize| {
            let mut t =
                GrpoTrainer::new(Box::new(tiny_model(5)), small_run(mb, lt), Box::new(CharTokenizer::new())).unwrap();
            let log = t.train_step().unwrap();
            (t.policy.params().get("lm_head.weight").unwrap().to_vec_f32().unwrap(), log)
        };
        let (whole, log) = run(64);
        let (split, _) = run(5);
        let diff = whole.iter().zip(&split).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(diff < 1e-6, "{lt:?}: max difference {diff}");
        for key in ["reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "entropy", "kl"] {
            assert!(log.get(key).is_finite(), "{key} logged");
        }
        assert!(log.get("kl") >= 0.0);
    }
}

#[test]
fn config_errors_name_the_key() {
    let bad = GrpoConfig { minibatches: 0, ..GrpoConfig::default() };
    let err = GrpoTrainer::new(Box::new(tiny_model(1)), bad, Box::new(CharTokenizer::new())).unwrap_err().to_string();
    assert!(err.contains("minibatches"), "{err}");
    // A negative clip would turn every update uphill, a zero one stop training; process
    // supervision has no place for the format reward.
    let d = GrpoConfig::default;
    for (cfg, key) in [
        (GrpoConfig { grad_clip: -1.0, ..d() }, "`grad_clip`"),
        (GrpoConfig { grad_clip: 0.0, ..d() }, "`grad_clip`"),
        (GrpoConfig { beta2: 1.0, ..d() }, "`beta2`"),
        (GrpoConfig { process_supervision: true, ..d() }, "`rewards`"),
        (GrpoConfig { epsilon: -0.1, ..d() }, "`epsilon`"),
        (GrpoConfig { epsilon: f32::NAN, ..d() }, "`epsilon`"),
        // A step's completions past what a batch holds (or past usize) fail at the check, not
        // in their first allocation.
        (GrpoConfig { prompts_per_step: 1 << 40, group_size: 1 << 30, ..d() }, "`prompts_per_step`"),
        (GrpoConfig { prompts_per_step: 1 << 20, group_size: 64, max_new_tokens: 1 << 10, ..d() }, "positions"),
    ] {
        assert!(cfg.validate().unwrap_err().to_string().contains(key), "{key}");
    }
    assert!(GrpoConfig { process_supervision: true, rewards: "accuracy:1".into(), ..d() }.validate().is_ok());
    // R1's clip ratio (spec 1.8; TRL takes it): no lower clip, the ratio being positive.
    assert!(GrpoConfig { epsilon: 10.0, ..d() }.validate().is_ok());
    let err = serde_json::from_str::<GrpoConfig>(r#"{"epsilon_hi": 0.3}"#).unwrap_err().to_string();
    assert!(err.contains("epsilon_hi"), "{err}");
    let fresh = GrpoConfig { rewards: "accuracy,speed".into(), ..GrpoConfig::default() };
    let err = GrpoTrainer::new(Box::new(tiny_model(1)), fresh, Box::new(CharTokenizer::new())).unwrap_err().to_string();
    assert!(err.contains("speed"), "{err}");
}

#[test]
fn gae_with_unit_gamma_and_lambda_and_no_kl_is_return_minus_value() {
    use whale_rl::ppo::gae;
    let values = [0.3, -0.2, 0.9, 0.1];
    let rewards = [0.0, 0.0, 0.0, 1.0];
    let (adv, ret) = gae(&rewards, &values, 1.0, 1.0);
    for t in 0..4 {
        assert!(close(adv[t], 1.0 - values[t], 1e-12), "A_{t} = R - V_t");
        assert!(close(ret[t], 1.0, 1e-12), "returns are the Monte-Carlo return");
    }
    // lambda = 0: one-step TD errors.
    let (adv0, _) = gae(&rewards, &values, 1.0, 0.0);
    assert!(close(adv0[0], values[1] - values[0], 1e-12));
    assert!(close(adv0[3], 1.0 - values[3], 1e-12));
    // gamma < 1 discounts the final reward.
    let (adv_g, _) = gae(&[0.0, 1.0], &[0.0, 0.0], 0.5, 1.0);
    assert!(close(adv_g[0], 0.5, 1e-12) && close(adv_g[1], 1.0, 1e-12));
}

#[test]
fn ppo_steps_train_the_policy_and_the_critic_on_the_same_budget() {
    use whale_rl::ppo::{PpoConfig, PpoTrainer};
    let cfg = GrpoConfig { beta: 0.0, num_iterations: 1, ..small_run(64, LossType::Grpo) };
    let mut t =
        PpoTrainer::new(Box::new(tiny_model(5)), cfg, PpoConfig::default(), Box::new(CharTokenizer::new())).unwrap();
    let head0 = t.critic.head.to_vec_f32().unwrap();
    let w0 = t.policy.params().get("lm_head.weight").unwrap().to_vec_f32().unwrap();
    let log = t.train_step().unwrap();
    assert_ne!(t.critic.head.to_vec_f32().unwrap(), head0, "the value head learned");
    assert_ne!(t.policy.params().get("lm_head.weight").unwrap().to_vec_f32().unwrap(), w0, "the policy moved");
    for key in ["reward", "policy_loss", "value_loss", "kl", "entropy", "completions/mean_length"] {
        assert!(log.get(key).is_finite(), "{key}: {}", log.get(key));
    }
    // The same number of completions per step as GRPO: prompts_per_step * group_size.
    assert!(log.get("num_tokens") >= (3 * 4 * 5) as f64);
    let bad = PpoConfig { ppo_epochs: 0, ..PpoConfig::default() };
    let err =
        PpoTrainer::new(Box::new(tiny_model(5)), small_run(64, LossType::Grpo), bad, Box::new(CharTokenizer::new()));
    assert!(err.unwrap_err().to_string().contains("ppo_epochs"));
    // GRPO's passes over a rollout are not PPO's: a setting PPO would ignore is an error.
    let err = PpoConfig::default().validate(&small_run(64, LossType::Grpo)).unwrap_err().to_string();
    assert!(err.contains("num_iterations"), "{err}");
    let grpo = GrpoConfig::default();
    assert!(PpoConfig::default().validate(&grpo).is_ok());
    let err = PpoConfig { lam: 1.5, ..PpoConfig::default() }.validate(&grpo).unwrap_err().to_string();
    assert!(err.contains("`lam` = 1.5"), "{err}");
}

#[test]
fn ppo_leaves_completions_no_reward_applies_to_out_of_its_losses() {
    use whale_rl::ppo::{PpoConfig, PpoTrainer};
    // The language reward does not apply to string reversal: every total is NaN. GRPO gives such
    // completions no advantage; PPO must not train them as a score of 0 either.
    let cfg = GrpoConfig {
        beta: 0.0,
        num_iterations: 1,
        rewards: "language".into(),
        tasks: "reverse:3".into(),
        ..small_run(64, LossType::Grpo)
    };
    let mut t =
        PpoTrainer::new(Box::new(tiny_model(5)), cfg, PpoConfig::default(), Box::new(CharTokenizer::new())).unwrap();
    let log = t.train_step().unwrap();
    assert_eq!((log.get("policy_loss"), log.get("value_loss")), (0.0, 0.0), "nothing to learn from");
}

#[test]
fn ppo_minibatches_are_separate_updates_whose_token_means_cover_the_batch() {
    use whale_rl::ppo::{PpoConfig, PpoTrainer};
    let run = |minibatches: usize, micro_batch: usize| {
        let cfg = GrpoConfig { beta: 0.0, num_iterations: 1, minibatches, ..small_run(micro_batch, LossType::Grpo) };
        let ppo = PpoConfig { kl_coef: 0.0, ..PpoConfig::default() };
        let mut t = PpoTrainer::new(Box::new(tiny_model(5)), cfg, ppo, Box::new(CharTokenizer::new())).unwrap();
        let log = t.train_step().unwrap();
        (lm_head(&*t.policy), log)
    };
    // One minibatch: micro-batching changes nothing (each chunk's weights are 1 / the batch's tokens).
    let (whole, log) = run(1, 64);
    let (split, _) = run(1, 5);
    let diff = whole.iter().zip(&split).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(diff < 1e-6, "micro-batches: max difference {diff}");
    assert!(log.get("grad_norm").is_finite() && log.get("grad_norm") > 0.0);
    // Three minibatches: three updates, a different end point, the same rollout.
    let (three, log3) = run(3, 64);
    assert_ne!(three, whole, "three updates move the policy differently from one");
    assert_eq!(log3.get("reward"), log.get("reward"), "the same rollout");
}

fn lm_head(policy: &dyn CausalLm) -> Vec<f32> {
    policy.params().get("lm_head.weight").unwrap().to_vec_f32().unwrap()
}

#[test]
fn grpo_and_ppo_resume_bit_identically_from_a_checkpoint() {
    use whale_rl::ppo::{PpoConfig, PpoTrainer};
    let dir = std::env::temp_dir().join(format!("whale-rl-resume-{}", std::process::id()));
    let cfg = GrpoConfig { steps: 3, ..small_run(64, LossType::Dapo) };
    let tok = || Box::new(CharTokenizer::new());

    let mut straight = GrpoTrainer::new(Box::new(tiny_model(8)), cfg.clone(), tok()).unwrap();
    let mut interrupted = GrpoTrainer::new(Box::new(tiny_model(8)), cfg.clone(), tok()).unwrap();
    straight.train_step().unwrap();
    interrupted.train_step().unwrap();
    interrupted.save_checkpoint(&dir.join("grpo")).unwrap();
    drop(interrupted);
    let mut resumed = GrpoTrainer::resume(&dir.join("grpo"), tok(), &Device::Cpu).unwrap();
    assert_eq!(resumed.run.step, 1);
    while !straight.done() {
        let (a, b) = (straight.train_step().unwrap(), resumed.train_step().unwrap());
        assert_eq!(a.get("reward"), b.get("reward"));
    }
    assert!(resumed.done());
    assert_eq!(lm_head(&*straight.policy), lm_head(&*resumed.policy));
    // A run with a KL term resumes against the reference it had, never a copy of the policy.
    std::fs::remove_dir_all(dir.join("grpo/reference")).unwrap();
    let err = GrpoTrainer::resume(&dir.join("grpo"), tok(), &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("reference"), "{err}");

    let ppo_cfg = GrpoConfig { beta: 0.0, num_iterations: 1, loss_type: LossType::Grpo, ..cfg.clone() };
    let mut straight = PpoTrainer::new(Box::new(tiny_model(8)), ppo_cfg.clone(), PpoConfig::default(), tok()).unwrap();
    let mut interrupted = PpoTrainer::new(Box::new(tiny_model(8)), ppo_cfg, PpoConfig::default(), tok()).unwrap();
    straight.train_step().unwrap();
    interrupted.train_step().unwrap();
    interrupted.save_checkpoint(&dir.join("ppo")).unwrap();
    let mut resumed = PpoTrainer::resume(&dir.join("ppo"), tok(), &Device::Cpu).unwrap();
    for _ in 0..2 {
        straight.train_step().unwrap();
        resumed.train_step().unwrap();
    }
    assert_eq!(lm_head(&*straight.policy), lm_head(&*resumed.policy));
    assert_eq!(straight.critic.head.to_vec_f32().unwrap(), resumed.critic.head.to_vec_f32().unwrap());
    // Its PPO settings are checked as a new run's are, naming the file.
    let ppo_file = dir.join("ppo/ppo.json");
    let mut saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&ppo_file).unwrap()).unwrap();
    saved["ppo_epochs"] = 0.into();
    std::fs::write(&ppo_file, saved.to_string()).unwrap();
    let err = PpoTrainer::resume(&dir.join("ppo"), tok(), &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("ppo.json") && err.contains("ppo_epochs"), "{err}");
    let err = GrpoTrainer::resume(&dir.join("nothing"), tok(), &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("nothing") && err.contains("rl_state.json"), "{err}");

    // Rewards built in code (R1's stage 4 filters accuracy to the reasoning prompts) are not
    // what the saved string says: a plain resume is refused, and a resume given them again
    // continues the run bit for bit.
    use whale_rl::reward_model::ReasoningOnly;
    use whale_rl::rewards::{Accuracy, Format, RewardSet};
    let in_code = || RewardSet {
        entries: vec![(Box::new(ReasoningOnly(Box::new(Accuracy::default()))), 1.0), (Box::new(Format), 0.1)],
    };
    let mut straight = GrpoTrainer::with_rewards(Box::new(tiny_model(8)), cfg.clone(), tok(), in_code()).unwrap();
    let mut interrupted = GrpoTrainer::with_rewards(Box::new(tiny_model(8)), cfg.clone(), tok(), in_code()).unwrap();
    straight.train_step().unwrap();
    interrupted.train_step().unwrap();
    interrupted.save_checkpoint(&dir.join("in-code")).unwrap();
    let err = GrpoTrainer::resume(&dir.join("in-code"), tok(), &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("resume_with_rewards"), "{err}");
    let other = RewardSet::parse("accuracy,format:0.5", 10).unwrap();
    let err = GrpoTrainer::resume_with_rewards(&dir.join("in-code"), tok(), &Device::Cpu, other).unwrap_err();
    assert!(err.to_string().contains("format:0.5"), "{err}");
    let mut resumed = GrpoTrainer::resume_with_rewards(&dir.join("in-code"), tok(), &Device::Cpu, in_code()).unwrap();
    straight.train_step().unwrap();
    resumed.train_step().unwrap();
    assert_eq!(lm_head(&*straight.policy), lm_head(&*resumed.policy));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_grpo_option_runs_a_step_with_finite_metrics() {
    let variants = [
        GrpoConfig { dynamic_sampling: true, max_resample_rounds: 1, ..small_run(64, LossType::Dapo) },
        GrpoConfig { mask_truncated: true, max_new_tokens: 4, ..small_run(64, LossType::Bnpo) },
        GrpoConfig {
            process_supervision: true,
            scale_rewards: ScaleRewards::None,
            rewards: "accuracy".into(),
            ..small_run(4, LossType::DrGrpo)
        },
        GrpoConfig {
            minibatches: 3,
            ref_sync_every: 1,
            scale_rewards: ScaleRewards::Batch,
            ..small_run(64, LossType::Grpo)
        },
        GrpoConfig {
            epsilon_high: Some(0.28),
            top_p: Some(0.9),
            rewards: "accuracy_gated,language,cosine".into(),
            ..small_run(64, LossType::Dapo)
        },
    ];
    for cfg in variants {
        let mut t = GrpoTrainer::new(Box::new(tiny_model(2)), cfg.clone(), Box::new(CharTokenizer::new())).unwrap();
        for _ in 0..2 {
            let log = t.train_step().unwrap();
            for key in ["policy_loss", "entropy", "clip_ratio/region_mean", "completions/mean_length", "grad_norm"] {
                assert!(log.get(key).is_finite(), "{cfg:?}: {key}");
            }
        }
        assert!(t.done());
    }
}

#[test]
fn grpo_and_ppo_train_in_bf16_on_f32_weights() {
    use whale_rl::parallel::model::tensor::DType;
    use whale_rl::ppo::{PpoConfig, PpoTrainer};
    let tok = CharTokenizer::new();
    // A bf16 model scores a batch as the f32 one does, to bf16 rounding: 8 mantissa bits, about
    // 4e-3 relative per op (measured: 3e-4 relative over the batch's summed log-probs, 3e-3
    // nats per token on average). A path that drops the dtype or mis-casts is off by order 1.
    let problems: Vec<Problem> = TaskSet::parse("add:1-3").unwrap().problems(3, 5, Split::Train);
    let cfg = three_samples_at(1.0);
    let mut bf16_model = tiny_model(7);
    CausalLm::set_compute_dtype(&mut bf16_model, DType::BF16);
    let rollouts = sample_groups(&bf16_model, &tok, &problems, &cfg, &mut Rng::new(1)).unwrap();
    let batch = PackedBatch::new(&rollouts.iter().collect::<Vec<_>>(), &tok, &Device::Cpu).unwrap();
    let (f32_lp, bf16_lp) = (score(&tiny_model(7), &batch, 1.0).unwrap(), score(&bf16_model, &batch, 1.0).unwrap());
    let (f32_lp, bf16_lp) = (f32_lp.logprobs.to_vec_f32().unwrap(), bf16_lp.logprobs.to_vec_f32().unwrap());
    let tokens: Vec<(f32, f32)> =
        f32_lp.iter().zip(&bf16_lp).zip(&batch.mask).filter(|(_, &m)| m != 0.0).map(|((&x, &y), _)| (x, y)).collect();
    let mean_diff = tokens.iter().map(|(x, y)| (x - y).abs()).sum::<f32>() / tokens.len() as f32;
    let total = tokens.iter().map(|(x, _)| x).sum::<f32>();
    let total_diff = tokens.iter().map(|(x, y)| x - y).sum::<f32>();
    assert!(mean_diff > 0.0 && mean_diff < 1e-2, "bf16 log-probs {mean_diff} nats a token from f32's");
    assert!(total_diff.abs() < 1e-3 * total.abs(), "summed log-probs: bf16 {total_diff} from f32's {total}");
    // Its samples score in bf16 as they were sampled in bf16, to the same rounding (a decode
    // step and a whole-sequence forward round differently; 2e-4 a token where both are f32).
    let mut diffs: Vec<f32> = Vec::new();
    for (i, r) in rollouts.iter().enumerate() {
        diffs.extend(batch.row_tokens(&bf16_lp, i).iter().zip(&r.sample_logprobs).map(|(x, y)| (x - y).abs()));
    }
    let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
    assert!(mean < 1e-2, "bf16 samples score {mean} nats a token from their sampled log-probs");

    // GRPO: the policy and its reference compute in bf16; the weights and AdamW stay f32.
    let mut t =
        GrpoTrainer::new(Box::new(tiny_model(5)), small_run(64, LossType::Grpo), Box::new(tok.clone())).unwrap();
    t.set_compute_dtype(DType::BF16);
    assert_eq!(t.policy.compute_dtype(), DType::BF16);
    assert_eq!(t.reference.as_ref().map(|r| r.compute_dtype()), Some(DType::BF16));
    let w0 = t.policy.params().get("lm_head.weight").unwrap().to_vec_f32().unwrap();
    let log = t.train_step().unwrap();
    let w1 = t.policy.params().get("lm_head.weight").unwrap();
    assert_eq!(w1.dtype(), DType::F32);
    assert_ne!(w1.to_vec_f32().unwrap(), w0, "the policy moved");
    for key in ["reward", "kl", "entropy", "policy_loss", "grad_norm"] {
        assert!(log.get(key).is_finite(), "{key}: {}", log.get(key));
    }
    assert!(log.get("kl") >= 0.0);

    // PPO: the critic's trunk too.
    let cfg = GrpoConfig { beta: 0.0, num_iterations: 1, ..small_run(64, LossType::Grpo) };
    let mut t = PpoTrainer::new(Box::new(tiny_model(5)), cfg, PpoConfig::default(), Box::new(tok)).unwrap();
    t.set_compute_dtype(DType::BF16);
    assert_eq!(t.critic.trunk.compute_dtype(), DType::BF16);
    assert_eq!(t.reference.as_ref().map(|r| r.compute_dtype()), Some(DType::BF16));
    let log = t.train_step().unwrap();
    for key in ["reward", "policy_loss", "value_loss", "kl"] {
        assert!(log.get(key).is_finite(), "{key}: {}", log.get(key));
    }
}
