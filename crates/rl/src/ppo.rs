//! The PPO baseline (spec/rl.md section 4): one completion per prompt, a value model (a scalar
//! head on a copy of the trunk), the per-token KL penalty folded into the reward, GAE, clipped
//! policy and value losses. It uses GRPO's rollout budget (`prompts_per_step * group_size`
//! completions per step), learning rate, tasks and rewards, so the two compare like for like.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use whale_parallel::model::checkpoint::{load_file, save_file, write_dir_atomically, write_json_synced, SaveDType};
use whale_parallel::model::tensor::optim::{clip_grad_norm, AdamW, LrSchedule};
use whale_parallel::model::tensor::{no_grad, DType, Device, ParamStore, Tensor};
use whale_parallel::model::tokenizer::Tokenizer;
use whale_parallel::model::{load_pretrained, moved_to, CausalLm};

use crate::grpo::{
    grpo_loss, rollout_metrics, split_rows, to_parallel, GrpoConfig, LossInputs, LossStats, RlRun, Scored, StepLog,
};
use crate::rewards::RewardSet;
use crate::rollout::{logprobs, sample_groups, score, PackedBatch};
use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PpoConfig {
    /// Weight of the per-token KL penalty `l_old - l_ref` (k1) in the reward.
    pub kl_coef: f32,
    pub gamma: f64,
    /// GAE's lambda (TRL 0.95; verl and OpenRLHF 1.0).
    pub lam: f64,
    pub cliprange: f32,
    pub cliprange_value: f32,
    /// Critic learning rate as a multiple of the policy's (verl: 1e-5 vs 1e-6).
    pub critic_lr_scale: f32,
    /// Passes over each rollout: 1 by default, verl's (TRL's is 4), as GRPO's `num_iterations`
    /// is 1, so that GRPO and PPO compare on the same updates per rollout.
    pub ppo_epochs: usize,
    /// Whiten advantages over the batch's tokens.
    pub whiten_advantages: bool,
    /// Subtracted from the score of a completion that never wrote EOS (TRL's
    /// `missing_eos_penalty`: pushes completions to end within `max_new_tokens`); none by default.
    pub missing_eos_penalty: Option<f64>,
}

impl Default for PpoConfig {
    fn default() -> Self {
        PpoConfig {
            kl_coef: 0.05,
            gamma: 1.0,
            lam: 0.95,
            cliprange: 0.2,
            cliprange_value: 0.2,
            critic_lr_scale: 10.0,
            ppo_epochs: 1,
            whiten_advantages: true,
            missing_eos_penalty: None,
        }
    }
}

/// The score a completion's last token receives: its total reward, less `missing_eos_penalty`
/// when it never wrote EOS (TRL); an unscored row (no reward applied: NaN, `active` false) gets
/// 0 and is left out of the loss.
pub fn final_score(s: &Scored, active: bool, missing_eos_penalty: Option<f64>) -> f64 {
    if !active {
        return 0.0;
    }
    let penalty = if s.rollout.truncated { missing_eos_penalty.unwrap_or(0.0) } else { 0.0 };
    s.scores.total - penalty
}

impl PpoConfig {
    /// An error naming the first key out of range, of these settings or of the GRPO settings PPO
    /// shares (`config`).
    pub fn validate(&self, config: &GrpoConfig) -> Result<()> {
        config.validate()?;
        if self.ppo_epochs == 0 {
            return Err(Error::Rl("ppo config `ppo_epochs`: must be at least 1".into()));
        }
        if config.num_iterations != 1 {
            return Err(Error::Rl(format!(
                "grpo config `num_iterations` = {}: GRPO's passes over a rollout; PPO's are `ppo_epochs`",
                config.num_iterations
            )));
        }
        // GRPO's own knobs, which PPO would silently ignore: only their defaults are accepted.
        let d = GrpoConfig::default();
        let grpo_only = [
            ("beta", config.beta != d.beta, "PPO's KL penalty is `ppo.kl_coef`"),
            ("epsilon", config.epsilon != d.epsilon, "PPO clips at `ppo.cliprange`"),
            ("epsilon_high", config.epsilon_high != d.epsilon_high, "PPO clips at `ppo.cliprange`"),
            ("loss_type", config.loss_type != d.loss_type, "PPO's loss is per token"),
            ("scale_rewards", config.scale_rewards != d.scale_rewards, "PPO's advantages come from GAE"),
            ("ref_sync_every", config.ref_sync_every != d.ref_sync_every, "PPO's reference stays the base"),
            ("dynamic_sampling", config.dynamic_sampling != d.dynamic_sampling, "a GRPO group filter"),
            ("max_resample_rounds", config.max_resample_rounds != d.max_resample_rounds, "a GRPO group filter"),
            ("mask_truncated", config.mask_truncated != d.mask_truncated, "a GRPO loss mask"),
            ("process_supervision", config.process_supervision != d.process_supervision, "GRPO's step advantages"),
        ];
        if let Some((key, _, why)) = grpo_only.iter().find(|(_, set, _)| *set) {
            return Err(Error::Rl(format!("grpo config `{key}` is GRPO's and PPO does not use it ({why}); drop it")));
        }
        let rewards = RewardSet::parse(&config.rewards, config.max_new_tokens)?;
        if let Some((r, _)) = rewards.entries.iter().find(|(r, _)| r.compares_within_group()) {
            return Err(Error::Rl(format!(
                "reward `{}` compares a prompt's completions with each other, and PPO samples one per prompt \
                 (it would always be 0); drop it",
                r.name()
            )));
        }
        if !(self.kl_coef >= 0.0 && self.critic_lr_scale > 0.0 && self.cliprange > 0.0 && self.cliprange_value > 0.0) {
            return Err(Error::Rl(
                "ppo config: `kl_coef` must be >= 0 and `critic_lr_scale`, `cliprange`, `cliprange_value` > 0".into(),
            ));
        }
        if let Some(p) = self.missing_eos_penalty.filter(|p| !(p.is_finite() && *p >= 0.0)) {
            return Err(Error::Rl(format!("ppo config `missing_eos_penalty` = {p}: must be a finite value >= 0")));
        }
        if !((0.0..=1.0).contains(&self.gamma) && (0.0..=1.0).contains(&self.lam)) {
            return Err(Error::Rl(format!(
                "ppo config `gamma` = {}, `lam` = {}: GAE's discount and lambda must be in [0, 1]",
                self.gamma, self.lam
            )));
        }
        Ok(())
    }
}

/// Generalised advantage estimation over one completion (spec 4.3):
/// `delta_t = r_t + gamma V_{t+1} - V_t` (V after the last token is 0), `A_t = delta_t +
/// gamma lambda A_{t+1}`, returns `A_t + V_t`.
pub fn gae(rewards: &[f64], values: &[f64], gamma: f64, lam: f64) -> (Vec<f64>, Vec<f64>) {
    let n = rewards.len();
    let (mut adv, mut next_adv) = (vec![0.0; n], 0.0);
    for t in (0..n).rev() {
        let next_v = if t + 1 < n { values[t + 1] } else { 0.0 };
        let delta = rewards[t] + gamma * next_v - values[t];
        next_adv = delta + gamma * lam * next_adv;
        adv[t] = next_adv;
    }
    let returns = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, returns)
}

/// One value per token of each completion.
pub type PerToken = Vec<Vec<f64>>;

/// PPO's advantages and returns for a batch (spec 4.3), from each completion's per-token rewards
/// and value estimates: [`gae`] per completion with `(gamma, lambda)`, then, with
/// `whiten_advantages`, the advantages of the `active` completions whitened together over their
/// tokens (verl's `compute_gae_advantage_return`, TRL's PPO). An inactive completion (no reward
/// applied) gets advantage 0 and is left out of the whitening. An error gives the counts when
/// the three lists differ in length, or names the first completion whose rewards and values do.
pub fn ppo_advantages(
    rewards: &[Vec<f64>],
    values: &[Vec<f64>],
    active: &[bool],
    (gamma, lam): (f64, f64),
    whiten_advantages: bool,
) -> Result<(PerToken, PerToken)> {
    if values.len() != rewards.len() || active.len() != rewards.len() {
        return Err(Error::Rl(format!(
            "ppo_advantages: {} completions' rewards, {} values, {} active flags",
            rewards.len(),
            values.len(),
            active.len()
        )));
    }
    if let Some(i) = rewards.iter().zip(values).position(|(r, v)| r.len() != v.len()) {
        return Err(Error::Rl(format!(
            "ppo_advantages: completion {i} has {} rewards and {} values",
            rewards[i].len(),
            values[i].len()
        )));
    }
    let (mut advantages, returns): (Vec<_>, Vec<_>) =
        rewards.iter().zip(values).map(|(r, v)| gae(r, v, gamma, lam)).unzip();
    if whiten_advantages {
        whiten(&mut advantages, active);
    }
    for (a, _) in advantages.iter_mut().zip(active).filter(|(_, &on)| !on) {
        a.fill(0.0);
    }
    Ok((advantages, returns))
}

const PPO_FILE: &str = "ppo.json";
const HEAD: &str = "value_head.weight";
const HEAD_FILE: &str = "value_head.safetensors";
const PPO_SALT: u64 = 0x7070_6F00;

/// A value model: the policy's trunk (a copy) with a scalar head on the final hidden states.
#[derive(Debug)]
pub struct ValueModel {
    pub trunk: Box<dyn CausalLm>,
    /// `[1, hidden]`.
    pub head: Tensor,
    /// The trunk's weights and the head, as one store for the optimizer.
    pub params: ParamStore,
}

impl ValueModel {
    fn with_head(trunk: Box<dyn CausalLm>, head: &Tensor) -> Result<Self> {
        let mut params = ParamStore::new();
        for (name, t) in trunk.params().iter() {
            params.insert(name, t)?;
        }
        // On the trunk's device, in a buffer of its own.
        let head = head.to_dtype(DType::F32)?.to_device(&trunk.device())?.contiguous()?.deep_clone()?;
        let head = params.insert(HEAD, &head)?;
        Ok(ValueModel { trunk, head, params })
    }

    /// A copy of `policy`'s weights with a zero head (every value starts at 0).
    pub fn from_policy(policy: &dyn CausalLm) -> Result<Self> {
        let head = Tensor::zeros(&[1, policy.hidden_size()], DType::F32, &Device::Cpu)?;
        Self::with_head(policy.duplicate()?, &head)
    }

    /// The trunk in HF layout plus `value_head.safetensors`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.trunk.save_pretrained(dir, SaveDType::F32)?;
        let head: BTreeMap<String, Tensor> = [(HEAD.to_string(), self.head.clone())].into_iter().collect();
        Ok(save_file(&dir.join(HEAD_FILE), &head, SaveDType::F32)?)
    }

    /// Reads what [`ValueModel::save`] wrote, onto `device`.
    pub fn from_pretrained(dir: &Path, device: &Device) -> Result<Self> {
        let path = dir.join(HEAD_FILE);
        let mut tensors = load_file(&path)?;
        let head = tensors
            .remove(HEAD)
            .ok_or_else(|| Error::Rl(format!("{}: no `{HEAD}` tensor (not a value head)", path.display())))?;
        Self::with_head(moved_to(load_pretrained(dir)?, device)?, &head)
    }

    /// `[n, len - 1]` values of the states before each next token of the packed batch.
    pub fn values(&self, batch: &PackedBatch) -> Result<Tensor> {
        let cols = batch.len - 1;
        let h = self.trunk.hidden_states(&batch.ids.narrow(1, 0, cols)?)?.to_dtype(DType::F32)?;
        Ok(h.matmul(&self.head.t()?)?.squeeze(2)?)
    }
}

/// `0.5 * sum(w * max((V - G)^2, (V_clip - G)^2))` with `V_clip = V_old + clip(V - V_old, +-eps)`.
pub fn value_loss(values: &Tensor, old: &Tensor, returns: &Tensor, weights: &Tensor, eps: f32) -> Result<Tensor> {
    let clipped = old.add(&values.sub(old)?.clamp(-eps, eps)?)?;
    let a = values.sub(returns)?.sqr()?;
    let b = clipped.sub(returns)?.sqr()?;
    Ok(a.maximum(&b)?.mul(weights)?.sum_all()?.mul_scalar(0.5)?)
}

pub struct PpoTrainer {
    pub policy: Box<dyn CausalLm>,
    pub reference: Option<Box<dyn CausalLm>>,
    pub critic: ValueModel,
    pub opt: AdamW,
    pub critic_opt: AdamW,
    pub ppo: PpoConfig,
    /// The shared budget, learning rate, tasks, rewards and logs.
    pub run: RlRun,
}

impl std::fmt::Debug for PpoTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PpoTrainer(step {} of {})", self.run.step, self.run.config.steps)
    }
}

/// Whitens every completion token's value over the batch: `(x - mean) / sqrt(var + 1e-8)` with
/// the unbiased variance, the mean not added back (TRL's `masked_whiten`).
fn whiten(x: &mut [Vec<f64>], active: &[bool]) {
    let all: Vec<f64> = x.iter().zip(active).filter(|(_, &on)| on).flat_map(|(r, _)| r.iter().copied()).collect();
    if all.len() < 2 {
        return;
    }
    let mean = all.iter().sum::<f64>() / all.len() as f64;
    let var = all.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (all.len() - 1) as f64;
    let scale = 1.0 / (var + 1e-8).sqrt();
    x.iter_mut()
        .zip(active)
        .filter(|(_, &on)| on)
        .for_each(|(r, _)| r.iter_mut().for_each(|v| *v = (*v - mean) * scale));
}

impl PpoTrainer {
    pub fn new(
        policy: Box<dyn CausalLm>,
        config: GrpoConfig,
        ppo: PpoConfig,
        tokenizer: Box<dyn Tokenizer>,
    ) -> Result<Self> {
        ppo.validate(&config)?;
        let reference = if ppo.kl_coef > 0.0 { Some(policy.duplicate()?) } else { None };
        let critic = ValueModel::from_policy(&*policy)?;
        Ok(PpoTrainer {
            opt: AdamW::new(config.adamw())?,
            critic_opt: AdamW::new(config.adamw())?,
            policy,
            reference,
            critic,
            ppo,
            run: RlRun::new(config, tokenizer, PPO_SALT)?,
        })
    }

    pub fn log_to(&mut self, metrics: &Path, completions: &Path) -> Result<()> {
        self.run.log_to(metrics, completions)
    }

    pub fn done(&self) -> bool {
        self.run.done()
    }

    /// The policy, its reference and the critic's trunk compute in `dtype` (see
    /// [`crate::grpo::GrpoTrainer::set_compute_dtype`]); the value head reads the trunk's
    /// hidden states in f32.
    pub fn set_compute_dtype(&mut self, dtype: DType) {
        self.policy.set_compute_dtype(dtype);
        self.reference.iter_mut().for_each(|r| r.set_compute_dtype(dtype));
        self.critic.trunk.set_compute_dtype(dtype);
    }

    /// Writes a checkpoint directory atomically: policy, critic, reference, both optimizers, the
    /// PPO settings and the run state.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        let extra: Vec<(&str, &dyn CausalLm)> = self.reference.iter().map(|r| ("reference", &**r)).collect();
        let opts = [("optimizer", &self.opt), ("critic_optimizer", &self.critic_opt)];
        Ok(write_dir_atomically(dir, |tmp| {
            let ppo = serde_json::to_value(&self.ppo).expect("serialisable");
            write_json_synced(&tmp.join(PPO_FILE), &ppo)?;
            self.critic.save(&tmp.join("critic")).map_err(to_parallel)?;
            self.run.save(tmp, &*self.policy, &opts, &extra).map_err(to_parallel)
        })?)
    }

    /// Continues from a checkpoint of [`PpoTrainer::save_checkpoint`], its models (policy,
    /// reference, critic) on `device`.
    pub fn resume(dir: &Path, tokenizer: Box<dyn Tokenizer>, device: &Device) -> Result<Self> {
        let (run, policy, dir) = RlRun::load(dir, tokenizer, PPO_SALT, None)?;
        let policy = moved_to(policy, device)?;
        let path = dir.join(PPO_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::Rl(format!("{}: {e}", path.display())))?;
        let ppo: PpoConfig = serde_json::from_str(&text).map_err(|e| Error::Rl(format!("{}: {e}", path.display())))?;
        ppo.validate(&run.config).map_err(|e| Error::Rl(format!("{}: {e}", path.display())))?;
        let reference =
            if ppo.kl_coef > 0.0 { Some(moved_to(load_pretrained(&dir.join("reference"))?, device)?) } else { None };
        let critic = ValueModel::from_pretrained(&dir.join("critic"), device)?;
        let (mut opt, mut critic_opt) = (AdamW::new(run.config.adamw())?, AdamW::new(run.config.adamw())?);
        run.load_optimizer(&dir, "optimizer", &mut opt, policy.params())?;
        run.load_optimizer(&dir, "critic_optimizer", &mut critic_opt, &critic.params)?;
        Ok(PpoTrainer { policy, reference, critic, opt, critic_opt, ppo, run })
    }

    /// Drops this step's gradients and reports `what` went wrong (a non-finite loss or norm).
    fn abandon_step(&self, what: String) -> Error {
        self.policy.params().zero_grad();
        self.critic.params.zero_grad();
        Error::Rl(format!("step {}: {what}", self.run.step))
    }

    pub fn train_step(&mut self) -> Result<StepLog> {
        let t0 = Instant::now();
        let (cfg, ppo) = (self.run.config.clone(), self.ppo.clone());
        let n = cfg.prompts_per_step * cfg.group_size;
        let problems = self.run.sample_problems(n);
        let rollout_cfg = crate::rollout::RolloutConfig { group_size: 1, ..cfg.rollout() };
        let rollouts = sample_groups(&*self.policy, &*self.run.tokenizer, &problems, &rollout_cfg, &mut self.run.rng)?;
        let t_sample = t0.elapsed().as_secs_f64();
        let scores = self.run.score(&rollouts, &problems)?;
        let mut scored: Vec<Scored> = rollouts
            .into_iter()
            .zip(scores)
            .map(|(rollout, scores)| Scored { rollout, scores, advantages: Vec::new() })
            .collect();
        let mut values = rollout_metrics(&scored, &self.run.rewards, 1);
        values.remove("frac_reward_zero_std");
        values.remove("reward_std");

        // Per chunk: frozen policy, reference and value estimates; then advantages and returns.
        let (tok, device) = (&*self.run.tokenizer, self.policy.device());
        let (minibatches, chunks) = split_rows(n, 1, cfg.minibatches, cfg.micro_batch);
        let packed: Vec<PackedBatch> = chunks
            .iter()
            .map(|c| PackedBatch::new(&scored[c.clone()].iter().map(|s| &s.rollout).collect::<Vec<_>>(), tok, &device))
            .collect::<Result<_>>()?;
        // A completion no reward applies to (its total is NaN) teaches nothing, as in GRPO (whose
        // advantage for it is 0): it is left out of whitening and of both losses, rather than
        // trained as a score of 0.
        let active: Vec<bool> = scored.iter().map(|s| s.scores.total.is_finite()).collect();
        // Per completion: its frozen log-probs and value estimates, and its per-token rewards.
        let (mut old, mut old_values, mut token_rewards) = (Vec::new(), Vec::new(), Vec::new());
        // The logged KL covers the completions the loss trains on (`active`).
        let (mut kl_sum, mut kl_tokens) = (0.0, 0usize);
        for (c, batch) in chunks.iter().zip(&packed) {
            let (lp, rf, v) = no_grad(|| -> Result<(Tensor, Option<Tensor>, Tensor)> {
                let lp = logprobs(&*self.policy, batch, cfg.temperature)?.detach();
                let rf = match &self.reference {
                    Some(r) => Some(logprobs(&**r, batch, cfg.temperature)?.detach()),
                    None => None,
                };
                Ok((lp, rf, self.critic.values(batch)?.detach()))
            })?;
            let (lpv, vv) = (lp.to_vec_f32()?, v.to_vec_f32()?);
            let rfv = rf.as_ref().map(|r| r.to_vec_f32()).transpose()?;
            for (j, i) in c.clone().enumerate() {
                let l_old = batch.row_tokens(&lpv, j);
                old.push(l_old.to_vec());
                old_values.push(batch.row_tokens(&vv, j).to_vec());
                // k1 = l_old - l_ref per token, as a penalty in the reward (spec 4.2).
                let k1: Vec<f64> = match &rfv {
                    Some(rf) => l_old.iter().zip(batch.row_tokens(rf, j)).map(|(&a, &b)| (a - b) as f64).collect(),
                    None => vec![0.0; l_old.len()],
                };
                if active[i] {
                    kl_sum += k1.iter().sum::<f64>();
                    kl_tokens += k1.len();
                }
                let mut r: Vec<f64> = k1.iter().map(|k| -(ppo.kl_coef as f64) * k).collect();
                if let Some(last) = r.last_mut() {
                    *last += final_score(&scored[i], active[i], ppo.missing_eos_penalty);
                }
                token_rewards.push(r);
            }
        }
        let estimates: PerToken = old_values.iter().map(|r| r.iter().map(|&x| x as f64).collect()).collect();
        let (advantages, returns) =
            ppo_advantages(&token_rewards, &estimates, &active, (ppo.gamma, ppo.lam), ppo.whiten_advantages)?;
        for (s, a) in scored.iter_mut().zip(&advantages) {
            s.advantages.clone_from(a);
        }

        let lr = cfg.schedule().lr(self.run.step);
        let (mut stats, mut pg_sum, mut vf_sum, mut entropy, mut grad_norm) =
            (LossStats::default(), 0.0, 0.0, 0.0, 0.0);
        let to_f32 = |row: &[f64]| -> Vec<f32> { row.iter().map(|&x| x as f32).collect() };
        for _ in 0..ppo.ppo_epochs {
            // Each epoch splits the completions into minibatches of a new random order (TRL's
            // `np.random.permutation` per PPO epoch); one minibatch takes them all, in any order.
            let order = match minibatches.len() {
                1 => (0..n).collect(),
                _ => self.run.rng.permutation(n),
            };
            for mb in &minibatches {
                // Token means over the minibatch: one optimizer update each.
                let rows = mb.rows.clone().map(|p| order[p]);
                let mb_tokens: usize = rows.filter(|&i| active[i]).map(|i| scored[i].rollout.tokens.len()).sum();
                let w = 1.0 / mb_tokens.max(1) as f32;
                for k in mb.chunks.clone() {
                    let c: Vec<usize> = chunks[k].clone().map(|p| order[p]).collect();
                    let batch =
                        PackedBatch::new(&c.iter().map(|&i| &scored[i].rollout).collect::<Vec<_>>(), tok, &device)?;
                    let per_row = |f: &dyn Fn(usize) -> Vec<f32>| {
                        batch.scatter_tokens(&c.iter().map(|&i| f(i)).collect::<Vec<_>>())
                    };
                    let weights = per_row(&|i| vec![if active[i] { w } else { 0.0 }; scored[i].rollout.tokens.len()])?;
                    let now = score(&*self.policy, &batch, cfg.temperature)?;
                    // Over the tokens the loss counts, as `tokens` below does.
                    entropy += now.entropy_over(&weights.to_vec_f32()?).0;
                    let inputs = LossInputs {
                        logprobs: now.logprobs,
                        old: per_row(&|i| old[i].clone())?,
                        reference: None,
                        advantages: per_row(&|i| to_f32(&advantages[i]))?,
                        weights: weights.clone(),
                    };
                    let (pg, s) = grpo_loss(&inputs, ppo.cliprange, ppo.cliprange, 0.0)?;
                    let v = self.critic.values(&batch)?;
                    let rets = per_row(&|i| to_f32(&returns[i]))?;
                    let vf =
                        value_loss(&v, &per_row(&|i| old_values[i].clone())?, &rets, &weights, ppo.cliprange_value)?;
                    let (pgv, vfv) = (pg.to_scalar()? as f64, vf.to_scalar()? as f64);
                    if !pgv.is_finite() || !vfv.is_finite() {
                        return Err(self.abandon_step(format!("PPO loss not finite (policy {pgv}, value {vfv})")));
                    }
                    pg.backward()?;
                    vf.backward()?;
                    pg_sum += pgv;
                    vf_sum += vfv;
                    stats.add(&s);
                }
                let norm = clip_grad_norm(self.policy.params(), cfg.grad_clip)?;
                let critic_norm = clip_grad_norm(&self.critic.params, cfg.grad_clip)?;
                if !norm.is_finite() || !critic_norm.is_finite() {
                    return Err(
                        self.abandon_step(format!("non-finite gradient norm (policy {norm}, critic {critic_norm})"))
                    );
                }
                grad_norm += norm;
                self.opt.step(self.policy.params(), lr)?;
                self.critic_opt.step(&self.critic.params, lr * ppo.critic_lr_scale)?;
                self.policy.params().zero_grad();
                self.critic.params.zero_grad();
            }
        }
        let tokens = stats.tokens.max(1.0);
        let updates = (ppo.ppo_epochs * minibatches.len()) as f64;
        values.insert("policy_loss".into(), pg_sum / updates);
        values.insert("value_loss".into(), vf_sum / updates);
        values.insert("grad_norm".into(), grad_norm / updates);
        values.insert("entropy".into(), entropy / tokens);
        values.insert("clip_ratio/low_mean".into(), stats.clip_low / tokens);
        values.insert("clip_ratio/high_mean".into(), stats.clip_high / tokens);
        values.insert("clip_ratio/region_mean".into(), (stats.clip_low + stats.clip_high) / tokens);
        if self.reference.is_some() {
            // The per-token mean of the penalty's k1 = l_old - l_ref at rollout time (GRPO's `kl`
            // is k3 under the current policy; TRL's PPO logs the per-sequence sum, objective/kl).
            values.insert("kl".into(), kl_sum / kl_tokens.max(1) as f64);
        }
        values.insert("learning_rate".into(), lr as f64);
        values.insert("sample_time".into(), t_sample);
        values.insert("step_time".into(), t0.elapsed().as_secs_f64());
        self.run.finish_step(values, &problems, &scored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_completion_without_eos_loses_the_missing_eos_penalty() {
        let row = |truncated: bool, total: f64| Scored {
            rollout: crate::rollout::Rollout {
                problem: 0,
                prompt: vec![1],
                tokens: vec![5, 6],
                sample_logprobs: vec![-0.1, -0.2],
                truncated,
                text: String::new(),
            },
            scores: crate::rewards::Scores { each: vec![Some(total)], total },
            advantages: vec![],
        };
        assert_eq!(final_score(&row(true, 1.0), true, Some(0.5)), 0.5);
        assert_eq!(final_score(&row(false, 1.0), true, Some(0.5)), 1.0, "it wrote EOS");
        assert_eq!(final_score(&row(true, 1.0), true, None), 1.0, "no penalty by default");
        assert_eq!(final_score(&row(true, f64::NAN), false, Some(0.5)), 0.0, "unscored rows stay out");
        let bad = PpoConfig { missing_eos_penalty: Some(f64::NAN), ..PpoConfig::default() };
        let err = bad.validate(&GrpoConfig::default()).unwrap_err().to_string();
        assert!(err.contains("missing_eos_penalty"), "{err}");
        // A group reward would be 0 for PPO's one completion per prompt, alone or restricted.
        let grouped = GrpoConfig { rewards: "accuracy,length".into(), ..GrpoConfig::default() };
        let err = PpoConfig::default().validate(&grouped).unwrap_err().to_string();
        assert!(err.contains("`length`") && err.contains("one per prompt"), "{err}");
        let restricted = crate::reward_model::ReasoningOnly(Box::new(crate::rewards::LengthReward));
        assert!(crate::rewards::Reward::compares_within_group(&restricted));
    }

    #[test]
    fn whitening_uses_the_unbiased_variance_over_every_token() {
        // Tokens 1, 2 | 3: mean 2, squared deviations 1 + 0 + 1 over n - 1 = 2: variance 1.
        let mut x = vec![vec![1.0, 2.0], vec![3.0]];
        whiten(&mut x, &[true, true]);
        let s = 1.0 / (1.0f64 + 1e-8).sqrt();
        assert_eq!(x, [vec![-s, 0.0], vec![s]]);
        // An unscored row neither counts nor changes.
        let mut y = vec![vec![1.0, 2.0], vec![100.0, -7.0], vec![3.0]];
        whiten(&mut y, &[true, false, true]);
        assert_eq!(y, [vec![-s, 0.0], vec![100.0, -7.0], vec![s]]);
    }
}
