//! SFT batching and training, rejection sampling's filter, and the Bradley-Terry reward model.

use whale_rl::parallel::model::tensor::{no_grad, DType, Device, Tensor};
use whale_rl::parallel::model::tokenizer::{CharTokenizer, Tokenizer};
use whale_rl::parallel::model::{CausalLm, DeepSeekV3, DeepSeekV3Config, DenseConfig, DenseModel, IGNORE_INDEX};
mod common;

use common::reversal_pair;
use whale_rl::reward_model::{LearnedReward, PreferencePair, RewardModel};
use whale_rl::rewards::{Reward, Sample};
use whale_rl::sft::{fit_for_sft, fitting, rejection_sample, sft, sft_batch, Example, SftConfig};
use whale_rl::tasks::language::translate;
use whale_rl::tasks::{Language, Problem};

#[test]
fn sft_rows_learn_only_the_completion_and_its_eos() {
    let tok = CharTokenizer::new();
    let ex = Example { prompt: "1+2=".into(), completion: "<think></think><answer>3</answer>".into() };
    let (ids, targets, lengths) = sft_batch(&tok, &[&ex], 12, false).unwrap();
    assert_eq!(lengths, [10]);
    let (ids, targets) = (ids.to_vec_i64().unwrap(), targets.to_vec_i64().unwrap());
    let mut full: Vec<i64> =
        tok.encode("1+2=<think></think><answer>3</answer>").unwrap().iter().map(|&t| t as i64).collect();
    full.push(tok.eos_id() as i64);
    assert_eq!(full.len(), 10, "tags are single tokens");
    assert_eq!(ids[..10], full[..]);
    assert!(ids[10..].iter().all(|&t| t == tok.pad_id() as i64));
    // Positions 0..3 predict prompt tokens: ignored; position 3 predicts <think>, position 8 EOS.
    assert!(targets[..3].iter().all(|&t| t == IGNORE_INDEX));
    assert_eq!(targets[3..9], full[4..10]);
    assert!(targets[9..].iter().all(|&t| t == IGNORE_INDEX));
    let (_, t2, _) = sft_batch(&tok, &[&ex], 12, true).unwrap();
    assert_eq!(t2.to_vec_i64().unwrap()[..3], full[1..4]);
    // Cut to seq_len: the row keeps its first seq_len + 1 tokens.
    let (cut, cut_t, lengths) = sft_batch(&tok, &[&ex], 6, false).unwrap();
    assert_eq!(lengths, [6]);
    assert_eq!(cut.to_vec_i64().unwrap(), full[..6].to_vec());
    assert_eq!(cut_t.to_vec_i64().unwrap()[5], full[6]);
    // A short example: EOS is the last target, then padding is ignored.
    let short = Example { prompt: "1=".into(), completion: "1".into() };
    let (ids, targets, lengths) = sft_batch(&tok, &[&short], 6, false).unwrap();
    assert_eq!(lengths, [4]);
    let t = targets.to_vec_i64().unwrap();
    assert_eq!(t, vec![IGNORE_INDEX, tok.encode("1").unwrap()[0] as i64, tok.eos_id() as i64, -100, -100, -100]);
    assert_eq!(ids.to_vec_i64().unwrap()[3..], [tok.eos_id() as i64, tok.pad_id() as i64, tok.pad_id() as i64]);
}

#[test]
fn sft_fits_a_small_dataset_for_both_model_families() {
    let tok = CharTokenizer::new();
    let data: Vec<Example> = (0..6)
        .map(|i| Example { prompt: format!("{i}+{i}="), completion: format!("<answer>{}</answer>", 2 * i) })
        .collect();
    let cfg = SftConfig { steps: 40, batch: 6, seq_len: 20, lr: 3e-3, warmup: 2, ..SftConfig::default() };
    let models: Vec<Box<dyn CausalLm>> = vec![
        Box::new(DeepSeekV3::new(DeepSeekV3Config::tiny(), 1).unwrap()),
        Box::new(DenseModel::new(DenseConfig::student(tok.vocab_size()), 1).unwrap()),
    ];
    for m in models {
        let logs = sft(&*m, &tok, &data, &cfg, |_| {}).unwrap();
        let (first, last) = (logs[0].loss, logs.last().unwrap().loss);
        assert!(last < 0.3 * first, "{m:?}: loss {first} -> {last}");
    }
    assert!(sft(&DenseModel::new(DenseConfig::student(62), 1).unwrap(), &tok, &[], &cfg, |_| {}).is_err());
    // "9+9=" + "<answer>18</answer>" + EOS is 4 + 4 + 1 = 9 tokens (tags are one token): seq_len
    // 8 fits it, 7 would cut its EOS and is refused, naming the setting and the length that fits.
    let m = DenseModel::new(DenseConfig::student(tok.vocab_size()), 1).unwrap();
    let long = [Example { prompt: "9+9=".into(), completion: "<answer>18</answer>".into() }];
    let fits = SftConfig { steps: 1, batch: 1, seq_len: 8, ..SftConfig::default() };
    assert!(sft(&m, &tok, &long, &fits, |_| {}).is_ok());
    let err = sft(&m, &tok, &long, &SftConfig { seq_len: 7, ..fits }, |_| {}).unwrap_err().to_string();
    assert!(err.contains("`seq_len` = 7") && err.contains("at least 8"), "{err}");
    for (bad, key) in [
        (SftConfig { lr: -1e-3, ..fits }, "`lr`"),
        (SftConfig { min_lr: 1.0, ..fits }, "`min_lr`"),
        (SftConfig { grad_clip: 0.0, ..fits }, "`grad_clip`"),
        (SftConfig { batch: usize::MAX / 4, ..fits }, "`batch`"),
    ] {
        let err = sft(&m, &tok, &long, &bad, |_| {}).unwrap_err().to_string();
        assert!(err.contains(key), "{err}");
    }
    // Sampled traces are filtered to what fits instead.
    let short = Example { prompt: "1+1=".into(), completion: "<answer>2</answer>".into() };
    let (kept, dropped) = fitting(&tok, vec![long[0].clone(), short.clone()], 7).unwrap();
    assert_eq!((kept, dropped), (vec![short], 1));
}

#[test]
fn the_reward_model_learns_preferences_with_the_bradley_terry_loss() {
    let tok = CharTokenizer::new();
    let policy = DeepSeekV3::new(DeepSeekV3Config::tiny(), 2).unwrap();
    let mut rm = RewardModel::from_policy(&policy).unwrap();
    let words = ["abc", "dog", "cat", "sun", "moon", "tree", "bird", "fish", "lamp", "rock", "wind", "leaf"];
    let pairs: Vec<PreferencePair> = words.iter().map(|w| reversal_pair(w)).collect();
    let report = rm.train(&tok, &pairs[..8], &pairs[8..], 40, 8, 3e-3, 0).unwrap();
    assert!(report.final_loss < 0.3, "{report:?}");
    assert_eq!(report.heldout_accuracy, 1.0, "{report:?}");
    let p = &pairs[9];
    assert!(rm.score(&tok, &p.prompt, &p.chosen).unwrap() > rm.score(&tok, &p.prompt, &p.rejected).unwrap());

    // As a reward: it scores non-reasoning prompts and leaves reasoning ones to the rules; text
    // its tokenizer cannot read (which sampling within its ids never gives) and a model that
    // fails are errors, never a silent "no reward" that would leave one completion of a group
    // on its rule rewards alone.
    let problem = |task: &str, prompt: &str| Problem {
        task: task.into(),
        prompt: prompt.into(),
        answer: String::new(),
        solution: String::new(),
    };
    let tokenizer = std::sync::Arc::new(tok.clone());
    let score = |learned: &LearnedReward, p: &Problem| -> Result<Option<f64>, whale_rl::Error> {
        learned.score(&Sample { problem: p, text: "<think></think><answer>god</answer>", tokens: 9, truncated: false })
    };
    let d = rm.model.head.dims()[1];
    let learned = LearnedReward { model: std::sync::Arc::new(rm), tokenizer: tokenizer.clone() };
    assert!(score(&learned, &problem("reverse", "rdog=")).unwrap().is_some_and(f64::is_finite));
    assert_eq!(score(&learned, &problem("add", "1+2=")).unwrap(), None, "reasoning prompts are the rules'");
    let err = score(&learned, &problem("reverse", "r\u{fffd}=")).unwrap_err().to_string();
    assert!(err.contains("cannot read a completion back"), "{err}");
    // A head that does not fit its trunk: the model itself fails.
    let mut broken = RewardModel::from_policy(&policy).unwrap();
    broken.model.head = Tensor::zeros(&[1, d + 1], DType::F32, &Device::Cpu).unwrap();
    let broken = LearnedReward { model: std::sync::Arc::new(broken), tokenizer };
    let err = score(&broken, &problem("reverse", "rdog=")).unwrap_err().to_string();
    assert!(err.contains("the learned reward model failed"), "{err}");
}

#[test]
fn rejection_keeps_templated_completions_wholly_in_the_prompts_script() {
    let digits = Problem { task: "add".into(), prompt: "12+7=".into(), answer: "19".into(), solution: String::new() };
    let letters = translate(&digits, Language::Letters);
    assert!(fit_for_sft(&digits, "<think>2+7+0=9;1+0+0=1</think><answer>19</answer>"));
    assert!(fit_for_sft(&letters, "<think>m+u+k=w;l+k+k=l</think><answer>lw</answer>"));
    // Right answers all, but: the answer in the other script, the reasoning in it, no template.
    assert!(!fit_for_sft(&letters, "<think>m+u+k=w;l+k+k=l</think><answer>19</answer>"));
    assert!(!fit_for_sft(&digits, "<think>2+7+0=9;1+0+0=1</think><answer>lw</answer>"));
    assert!(!fit_for_sft(&letters, "<think>2+7+0=9;l+k+k=l</think><answer>lw</answer>"));
    assert!(!fit_for_sft(&digits, "<answer>19</answer>"));
}

#[test]
fn padding_does_not_move_a_moe_models_sft_loss() {
    // With a sequence-wise balance loss on, the MoE layers' loads must count the prompt and the
    // completion and leave the padding out: more padding, the same loss.
    let tok = CharTokenizer::new();
    let cfg = DeepSeekV3Config { seq_aux_alpha: 0.05, ..DeepSeekV3Config::tiny() };
    let model = DeepSeekV3::new(cfg, 3).unwrap();
    let examples: Vec<Example> = (0..3)
        .map(|i| Example { prompt: format!("{i}{i}+7="), completion: format!("<answer>{}</answer>", 11 * i + 7) })
        .collect();
    let refs: Vec<&Example> = examples.iter().collect();
    let loss = |seq_len: usize| {
        let (ids, targets, lengths) = sft_batch(&tok, &refs, seq_len, false).unwrap();
        no_grad(|| model.train_loss(&ids, &targets, &lengths)).unwrap().to_scalar().unwrap()
    };
    let (short, long) = (loss(20), loss(40));
    assert!((short - long).abs() <= 1e-6 * short.abs(), "{short} vs {long}");
}

/// A teacher that writes a scripted completion per row (row r of a decode batch follows
/// `scripts[r]`, one token per forward, then EOS); only what `generate` calls is here.
#[derive(Debug)]
struct ScriptedTeacher {
    scripts: Vec<Vec<u32>>,
    vocab: usize,
    params: whale_rl::parallel::model::tensor::ParamStore,
    forwards: std::sync::atomic::AtomicUsize,
}

impl CausalLm for ScriptedTeacher {
    fn vocab_size(&self) -> usize {
        self.vocab
    }
    fn hidden_size(&self) -> usize {
        1
    }
    fn num_layers(&self) -> usize {
        0
    }
    fn params(&self) -> &whale_rl::parallel::model::tensor::ParamStore {
        &self.params
    }
    fn max_positions(&self) -> usize {
        256
    }
    fn forward_cached(
        &self,
        ids: &Tensor,
        _: &mut whale_rl::parallel::model::generate::KvCache,
    ) -> whale_rl::parallel::model::Result<Tensor> {
        let (b, s) = (ids.dims()[0], ids.dims()[1]);
        let step = self.forwards.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut v = vec![-50.0f32; b * s * self.vocab];
        for r in 0..b {
            let next = self.scripts[r].get(step).copied().unwrap_or(CharTokenizer::new().eos_id());
            v[(r * s + s - 1) * self.vocab + next as usize] = 50.0;
        }
        Ok(Tensor::from_vec(v, &[b, s, self.vocab], &Device::Cpu)?)
    }
    fn logits(&self, _: &Tensor) -> whale_rl::parallel::model::Result<Tensor> {
        unreachable!("generate decodes through forward_cached")
    }
    fn hidden_states(&self, _: &Tensor) -> whale_rl::parallel::model::Result<Tensor> {
        unreachable!("generate decodes through forward_cached")
    }
    fn train_loss(&self, _: &Tensor, _: &Tensor, _: &[usize]) -> whale_rl::parallel::model::Result<Tensor> {
        unreachable!("not trained")
    }
    fn save_pretrained(
        &self,
        _: &std::path::Path,
        _: whale_rl::parallel::model::checkpoint::SaveDType,
    ) -> whale_rl::parallel::model::Result<()> {
        unreachable!("not saved")
    }
    fn duplicate(&self) -> whale_rl::parallel::model::Result<Box<dyn CausalLm>> {
        unreachable!("not copied")
    }
    fn to_device(&self, _: &Device) -> whale_rl::parallel::model::Result<Box<dyn CausalLm>> {
        unreachable!("not moved")
    }
}

#[test]
fn rejection_sampling_drops_correct_traces_that_hold_a_control_token() {
    // Two samples of one problem, both right and in the template; the second has a BOS inside
    // its reasoning, which decodes to markup SFT would teach.
    let tok = CharTokenizer::new();
    let clean = tok.encode("<think>2+7+0=9;1+0+0=1</think><answer>19</answer>").unwrap();
    let mut stray = clean.clone();
    stray.insert(3, tok.bos_id());
    let teacher = ScriptedTeacher {
        scripts: vec![clean, stray],
        vocab: tok.vocab_size(),
        params: Default::default(),
        forwards: Default::default(),
    };
    let problem = Problem { task: "add".into(), prompt: "12+7=".into(), answer: "19".into(), solution: String::new() };
    let (kept, stats) =
        rejection_sample(&teacher, &tok, &[problem], 2, 1.0, 64, &mut whale_rl::parallel::model::tensor::Rng::new(0))
            .unwrap();
    assert_eq!((stats.sampled, stats.correct, stats.accepted, stats.unique), (2, 2, 1, 1), "{kept:?}");
    assert_eq!(kept[0].completion, "<think>2+7+0=9;1+0+0=1</think><answer>19</answer>");
}
