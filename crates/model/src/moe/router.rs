//! The gate (spec section 2.2, V3's `noaux_tc`): affinities `s = sigmoid(W_g x)`, selection on
//! `s + b` restricted to the `topk_group` best groups (group score = sum of its top-2), weights
//! from the unbiased `s`, normalised and scaled by `routed_scaling_factor`.

use whale_kernels::cpu::router::{select_experts, RouterConfig};
use whale_tensor::{Device, Tensor};

use crate::config::DeepSeekV3Config;
use crate::nn::ParamBuilder;
use crate::Result;

#[derive(Debug, Clone)]
pub struct Router {
    /// `gate.weight`: `[n_routed_experts, hidden]`.
    pub weight: Tensor,
    /// `gate.e_score_correction_bias`: `[n_routed_experts]`, used only to choose experts; moved
    /// by the balancing update, never by gradients. Present for sigmoid scoring.
    pub e_score_correction_bias: Option<Tensor>,
    pub sigmoid: bool,
    pub n_group: usize,
    pub topk_group: usize,
    pub top_k: usize,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f32,
}

/// The routing decision for `T` tokens.
#[derive(Debug, Clone)]
pub struct Routing {
    /// `[T, E]` affinities (differentiable).
    pub scores: Tensor,
    /// `[T, K]` combine weights of the chosen experts (differentiable).
    pub weights: Tensor,
    /// `T * K` chosen expert ids, token-major.
    pub experts: Vec<usize>,
    /// Tokens routed to each expert.
    pub load: Vec<usize>,
}

impl Router {
    pub fn new(b: &mut ParamBuilder<'_>, cfg: &DeepSeekV3Config) -> Result<Self> {
        let e = cfg.n_routed_experts;
        let sigmoid = cfg.scoring_func == "sigmoid";
        Ok(Router {
            weight: b.weight("weight", &[e, cfg.hidden_size])?,
            e_score_correction_bias: if sigmoid {
                Some(b.buffer_zeros("e_score_correction_bias", &[e])?)
            } else {
                None
            },
            sigmoid,
            n_group: cfg.n_group,
            topk_group: cfg.topk_group,
            top_k: cfg.num_experts_per_tok,
            norm_topk_prob: cfg.norm_topk_prob,
            routed_scaling_factor: cfg.routed_scaling_factor as f32,
        })
    }

    pub fn n_experts(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Routes `x`: `[T, hidden]`. Gating runs in f32 whatever the compute dtype (spec 2.2).
    pub fn route(&self, x: &Tensor) -> Result<Routing> {
        let logits = x.to_dtype(whale_tensor::DType::F32)?.matmul(&self.weight.t()?)?;
        let scores = if self.sigmoid { logits.sigmoid()? } else { logits.softmax_last_dim()? };
        let e = self.n_experts();
        let t = x.dims()[0];
        let mut choice = scores.to_vec_f32()?;
        if let Some(b) = &self.e_score_correction_bias {
            let b = b.to_vec_f32()?;
            for row in choice.chunks_mut(e) {
                row.iter_mut().zip(&b).for_each(|(s, b)| *s += b);
            }
        }
        // Group-limited top-k, ties to the lower index (the twin of the GPU gate's selection).
        let experts = select_experts(&choice, &self.kernel_config());
        let mut load = vec![0usize; e];
        experts.iter().for_each(|&i| load[i] += 1);

        let idx =
            Tensor::from_vec(experts.iter().map(|&i| i as i64).collect::<Vec<_>>(), &[t, self.top_k], &Device::Cpu)?;
        let mut weights = scores.gather(1, &idx)?;
        if self.norm_topk_prob {
            weights = weights.div(&weights.sum_keepdim(1)?.add_scalar(1e-20)?)?;
        }
        let weights = weights.mul_scalar(self.routed_scaling_factor)?;
        Ok(Routing { scores, weights, experts, load })
    }

    /// This gate's sizes and options, as the kernels' routing twin (`whale_kernels::cpu::router`)
    /// and the GPU gate take them.
    pub fn kernel_config(&self) -> RouterConfig {
        RouterConfig {
            n_experts: self.n_experts(),
            n_group: self.n_group,
            topk_group: self.topk_group,
            top_k: self.top_k,
            sigmoid: self.sigmoid,
            norm_topk_prob: self.norm_topk_prob,
            routed_scaling_factor: self.routed_scaling_factor,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(n_group: usize, topk_group: usize, top_k: usize) -> Router {
        Router {
            weight: Tensor::zeros(&[8, 1], whale_tensor::DType::F32, &Device::Cpu).unwrap(),
            e_score_correction_bias: None,
            sigmoid: true,
            n_group,
            topk_group,
            top_k,
            norm_topk_prob: true,
            routed_scaling_factor: 1.0,
        }
    }

    #[test]
    fn group_limit_uses_the_top2_sum_and_masks_with_minus_infinity() {
        // Groups of 2: g0 = {0.9, 0.0} sums 0.9; g1 = {0.5, 0.5} sums 1.0; g2, g3 negative.
        let row = [0.9, 0.0, 0.5, 0.5, -0.1, -0.2, -0.3, -0.4];
        let r = router(4, 1, 2);
        let select = |r: &Router, row: &[f32]| select_experts(row, &r.kernel_config());
        assert_eq!(select(&r, &row), vec![2, 3], "only group 1 is kept, though expert 0 scores highest");
        // All kept scores negative: masked experts must not win (they would with a 0.0 fill).
        let neg = [-0.9, -0.8, -0.5, -0.6, -3.0, -3.0, -3.0, -3.0];
        assert_eq!(select(&router(4, 2, 2), &neg), vec![2, 3]);
    }
}
