//! A learned reward model for the prompts no rule can score (R1's stage 4 "helpfulness" reward,
//! spec/rl.md 1.8): a scalar head on the final hidden state of the completion's last token, on a
//! copy of a policy's trunk, trained on preference pairs with the Bradley-Terry loss
//! `-log sigmoid(r(chosen) - r(rejected))`.

use std::sync::Arc;

use serde::Serialize;
use whale_parallel::model::tensor::optim::{AdamW, AdamWConfig};
use whale_parallel::model::tensor::{no_grad, DType, Device, Rng, Tensor};
use whale_parallel::model::tokenizer::Tokenizer;
use whale_parallel::model::CausalLm;

use crate::ppo::ValueModel;
use crate::rewards::{Reward, Sample};
use crate::tasks::{Language, Problem};
use crate::{Error, Result};

/// A preferred and a dispreferred completion of one prompt. The chosen one ended (EOS); the
/// rejected one did unless `rejected_ended` is false (cut off at a length limit: the reward
/// model reads it without an EOS, as it reads a truncated rollout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreferencePair {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    pub rejected_ended: bool,
}

#[derive(Debug)]
pub struct RewardModel {
    pub model: ValueModel,
}

/// Training and held-out results of a reward model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RmReport {
    pub final_loss: f64,
    /// Share of held-out pairs where r(chosen) > r(rejected), a tie counting half (NaN without
    /// held-out pairs).
    pub heldout_accuracy: f64,
    pub train_pairs: usize,
    pub heldout_pairs: usize,
}

impl RewardModel {
    /// A copy of `policy` with a zero head.
    pub fn from_policy(policy: &dyn CausalLm) -> Result<Self> {
        Ok(RewardModel { model: ValueModel::from_policy(policy)? })
    }

    /// Rewards of `(prompt, completion, ended)` texts (`prompt + completion`, and EOS where
    /// ended), `[n]` (differentiable).
    fn rewards(&self, tok: &dyn Tokenizer, texts: &[(&str, &str, bool)]) -> Result<Tensor> {
        let rows: Vec<Vec<u32>> =
            texts.iter().map(|&(p, c, ended)| reward_row(tok, p, c, ended)).collect::<Result<_>>()?;
        self.rewards_of_rows(tok, &rows)
    }

    /// Rewards of token rows (read at each row's last token), `[n]` (differentiable).
    fn rewards_of_rows(&self, tok: &dyn Tokenizer, rows: &[Vec<u32>]) -> Result<Tensor> {
        let len = rows.iter().map(Vec::len).max().unwrap_or(1);
        let n = rows.len();
        let mut ids = Vec::with_capacity(n * len);
        let mut last = Vec::with_capacity(n);
        for (i, r) in rows.iter().enumerate() {
            ids.extend(r.iter().map(|&t| t as i64));
            ids.extend(std::iter::repeat_n(tok.pad_id() as i64, len - r.len()));
            last.push((i * len + r.len() - 1) as i64);
        }
        let ids = Tensor::from_vec(ids, &[n, len], &Device::Cpu)?;
        let h = self.model.trunk.hidden_states(&ids)?.to_dtype(DType::F32)?;
        let d = h.dims()[2];
        let at = Tensor::from_vec(last, &[n], &Device::Cpu)?;
        let picked = h.reshape(&[n * len, d])?.index_select(0, &at)?;
        Ok(picked.matmul(&self.model.head.t()?)?.reshape(&[n])?)
    }

    /// The reward of one completion that ended (no gradients).
    pub fn score(&self, tok: &dyn Tokenizer, prompt: &str, completion: &str) -> Result<f64> {
        self.score_as(tok, prompt, completion, true)
    }

    /// The reward of one completion, read with an EOS when it `ended` (no gradients).
    pub fn score_as(&self, tok: &dyn Tokenizer, prompt: &str, completion: &str, ended: bool) -> Result<f64> {
        self.score_row(tok, reward_row(tok, prompt, completion, ended)?)
    }

    /// The reward of one token row (no gradients).
    fn score_row(&self, tok: &dyn Tokenizer, row: Vec<u32>) -> Result<f64> {
        no_grad(|| Ok(self.rewards_of_rows(tok, &[row])?.to_vec_f32()?[0] as f64))
    }

    /// Bradley-Terry training on `train` (shuffled mini-batches of `batch` pairs, `steps`
    /// steps), then the pair accuracy on `heldout`.
    pub fn train(
        &mut self,
        tok: &dyn Tokenizer,
        train: &[PreferencePair],
        heldout: &[PreferencePair],
        steps: usize,
        batch: usize,
        lr: f32,
        seed: u64,
    ) -> Result<RmReport> {
        if train.is_empty() || batch == 0 {
            return Err(Error::Rl("reward model: no training pairs".into()));
        }
        let mut opt = AdamW::new(AdamWConfig { weight_decay: 0.0, ..AdamWConfig::default() })?;
        let mut rng = Rng::new(seed ^ 0xB7);
        let mut final_loss = f64::NAN;
        for step in 0..steps {
            let pairs: Vec<&PreferencePair> =
                (0..batch).map(|_| &train[rng.below(train.len() as u64) as usize]).collect();
            let mut texts: Vec<(&str, &str, bool)> =
                pairs.iter().map(|p| (p.prompt.as_str(), p.chosen.as_str(), true)).collect();
            texts.extend(pairs.iter().map(|p| (p.prompt.as_str(), p.rejected.as_str(), p.rejected_ended)));
            let r = self.rewards(tok, &texts)?;
            let margin = r.narrow(0, 0, batch)?.sub(&r.narrow(0, batch, batch)?)?;
            // -log sigmoid(m) = softplus(-m) = logsumexp([0, -m]).
            let zeros = margin.zeros_like()?;
            let loss = Tensor::stack(&[zeros, margin.neg()?], 1)?.logsumexp(1)?.mean_all()?;
            final_loss = loss.to_scalar()? as f64;
            if !final_loss.is_finite() {
                return Err(Error::Rl(format!("reward model step {step}: the loss is not finite")));
            }
            loss.backward()?;
            crate::clip_finite(&self.model.params, 1.0, || format!("reward model step {step}"))?;
            opt.step(&self.model.params, lr)?;
            self.model.params.zero_grad();
        }
        // A tie is half right (a coin flip would split it); no held-out pairs: not measured.
        let correct = heldout
            .iter()
            .map(|p| {
                let c = self.score(tok, &p.prompt, &p.chosen)?;
                let r = self.score_as(tok, &p.prompt, &p.rejected, p.rejected_ended)?;
                Ok(if c > r {
                    1.0
                } else if c == r {
                    0.5
                } else {
                    0.0
                })
            })
            .sum::<Result<f64>>()?;
        Ok(RmReport {
            final_loss,
            heldout_accuracy: if heldout.is_empty() { f64::NAN } else { correct / heldout.len() as f64 },
            train_pairs: train.len(),
            heldout_pairs: heldout.len(),
        })
    }
}

/// A trained reward model as a [`Reward`] for the non-reasoning prompts (tasks without numbers);
/// not applicable to the reasoning ones, which the rule rewards score.
pub struct LearnedReward {
    pub model: Arc<RewardModel>,
    pub tokenizer: Arc<dyn Tokenizer>,
}

impl std::fmt::Debug for LearnedReward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LearnedReward")
    }
}

impl Reward for LearnedReward {
    fn name(&self) -> &str {
        "reward_model"
    }

    fn score(&self, s: &Sample<'_>) -> Result<Option<f64>> {
        if Language::of_problem(s.problem).is_some() {
            return Ok(None);
        }
        let (tok, text) = (&*self.tokenizer, s.text);
        // Sampling stays within the tokenizer's ids, so every completion reads back; one that
        // did not would have no score comparable with its group's (a `None` here would leave it
        // its rule rewards alone), so it stops the run.
        // A truncated completion is scored as written, without the EOS it never produced (as
        // TRL's reward models read the sequence as generated): appending one would score a text
        // that runs to the limit as a finished answer.
        let row = reward_row(tok, &s.problem.prompt, text, !s.truncated)
            .map_err(|e| Error::Rl(format!("the learned reward cannot read a completion back: {e}")))?;
        let r = self.model.score_row(tok, row);
        Ok(Some(r.map_err(|e| Error::Rl(format!("the learned reward model failed: {e}")))?))
    }
}

/// `prompt + completion`, and the EOS when the completion `ended`, as the reward model reads it.
fn reward_row(tok: &dyn Tokenizer, prompt: &str, completion: &str, ended: bool) -> Result<Vec<u32>> {
    let mut row = crate::rollout::prompt_ids(tok, prompt)?;
    row.extend(tok.encode(completion)?);
    if ended {
        row.push(tok.eos_id());
    }
    Ok(row)
}

/// A rule reward applied only to reasoning prompts (tasks with numbers), `None` elsewhere.
pub struct ReasoningOnly(pub Box<dyn Reward>);

impl std::fmt::Debug for ReasoningOnly {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReasoningOnly({})", self.0.name())
    }
}

impl Reward for ReasoningOnly {
    fn name(&self) -> &str {
        self.0.name()
    }

    fn score(&self, s: &Sample<'_>) -> Result<Option<f64>> {
        match Language::of_problem(s.problem) {
            Some(_) => self.0.score(s),
            None => Ok(None),
        }
    }

    /// The wrapped reward's group scores over the reasoning prompts' completions, so that a
    /// group reward compares them with each other alone.
    fn score_group(&self, group: &[Sample<'_>]) -> Result<Vec<Option<f64>>> {
        let applies: Vec<bool> = group.iter().map(|s| Language::of_problem(s.problem).is_some()).collect();
        let kept: Vec<Sample> = group.iter().zip(&applies).filter(|(_, &a)| a).map(|(s, _)| *s).collect();
        let mut scores = crate::rewards::group_scores(&*self.0, &kept)?.into_iter();
        Ok(applies.iter().map(|&a| if a { scores.next().flatten() } else { None }).collect())
    }

    fn compares_within_group(&self) -> bool {
        self.0.compares_within_group()
    }

    fn uses_verifier(&self) -> bool {
        self.0.uses_verifier()
    }
}

/// The first half of `text`, never ending inside a `<tag>`.
fn cut_in_half(text: &str) -> String {
    let half: String = text.chars().take(text.chars().count() / 2).collect();
    match (half.rfind('<'), half.rfind('>')) {
        (Some(open), close) if close.is_none_or(|c| c < open) => half[..open].to_string(),
        _ => half,
    }
}

/// Preference pairs for `problems`: the reference solution is preferred to a worse response,
/// one of four kinds in turn: a wrong one (`corrupt`: one step wrong), one without its reasoning,
/// one that rambles on after its answer, and one cut off half-way without an EOS (what a rollout
/// truncated at the length limit is, which the learned reward then scores as written).
pub fn preference_pairs(
    problems: &[Problem],
    corrupt: impl Fn(&mut Rng, &Problem) -> String,
    seed: u64,
) -> Vec<PreferencePair> {
    let mut rng = Rng::new(seed);
    problems
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let good = &p.solution;
            let rejected = match i % 4 {
                0 => corrupt(&mut rng, p),
                1 => good.split_once("</think>").map_or_else(|| good.clone(), |(_, a)| a.to_string()),
                2 => format!("{good}{}", &p.prompt),
                _ => cut_in_half(good),
            };
            PreferencePair { prompt: p.prompt.clone(), chosen: good.clone(), rejected, rejected_ended: i % 4 != 3 }
        })
        .filter(|pair| pair.chosen != pair.rejected)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejected_responses_are_worse_and_still_tokenizable() {
        let p = Problem {
            task: "reverse".into(),
            prompt: "rabcd=".into(),
            answer: "dcba".into(),
            solution: "<think>d;c;b;a</think><answer>dcba</answer>".into(),
        };
        let pairs = preference_pairs(&vec![p; 8], |_, q| q.solution.replace("dcba", "dcbb"), 0);
        assert_eq!(pairs.len(), 8);
        let tok = whale_parallel::model::tokenizer::CharTokenizer::new();
        for pair in &pairs {
            assert_ne!(pair.chosen, pair.rejected);
            tok.encode(&pair.rejected).unwrap();
        }
        assert_eq!(pairs[1].rejected, "<answer>dcba</answer>");
        // The one cut off is read as a truncated rollout is: without an EOS.
        assert_eq!(pairs.iter().map(|p| p.rejected_ended).collect::<Vec<_>>()[..4], [true, true, true, false]);
        assert!(pairs[2].rejected.ends_with("</answer>rabcd="));
        assert_eq!(cut_in_half("<think>ab</think><answer>ba</answer>"), "<think>ab</think>");
        assert_eq!(cut_in_half("<think>abcdefgh</think>"), "<think>abcd");
    }

    #[test]
    fn a_truncated_completion_is_scored_without_an_eos() {
        use whale_parallel::model::config::DeepSeekV3Config;
        use whale_parallel::model::tokenizer::CharTokenizer;
        use whale_parallel::model::DeepSeekV3;
        let policy = DeepSeekV3::new(DeepSeekV3Config::tiny(), 3).unwrap();
        let rm = RewardModel::from_policy(&policy).unwrap();
        // A head that reads the hidden state (the zero one scores everything 0).
        let h = rm.model.head.elem_count();
        rm.model
            .head
            .with_f32_mut(|w| w.iter_mut().enumerate().for_each(|(i, x)| *x = (i as f32 / h as f32) - 0.5))
            .unwrap();
        let tok: Arc<dyn Tokenizer> = Arc::new(CharTokenizer::new());
        let reward = LearnedReward { model: Arc::new(rm), tokenizer: tok.clone() };
        let p = Problem { task: "reverse".into(), prompt: "rab=".into(), answer: "ba".into(), solution: String::new() };
        let text = "<think>b;a</think><answer>ba</answer>";
        let sample = |truncated| Sample { problem: &p, text, tokens: text.len() + 1, truncated };
        let (ended, cut) =
            (reward.score(&sample(false)).unwrap().unwrap(), reward.score(&sample(true)).unwrap().unwrap());
        let with_eos = reward.model.score_row(&*tok, reward_row(&*tok, &p.prompt, text, true).unwrap()).unwrap();
        let without = reward.model.score_row(&*tok, reward_row(&*tok, &p.prompt, text, false).unwrap()).unwrap();
        assert_eq!((ended, cut), (with_eos, without));
        assert_ne!(ended, cut, "the EOS is read");
    }
}
