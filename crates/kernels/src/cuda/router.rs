//! MoE gate launcher (kernels/router.cu): affinities, group-limited top-k and combine weights.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{count32, cuda, Gpu, GpuError, Result, THREADS};
use crate::cpu::router::{Routed, RouterConfig};

/// Static shared memory a block may use without opting in.
const SHARED_LIMIT: usize = 48 * 1024;

impl Gpu {
    /// The gate from `logits` (`[T, E]`) and the optional `e_score_correction_bias` (`[E]`): ids
    /// and combine weights `[T, K]`, affinities `[T, E]` (twin: `cpu::router::route`). One block
    /// per token.
    pub fn moe_route(&self, logits: &[f32], bias: Option<&[f32]>, cfg: &RouterConfig) -> Result<Routed> {
        let (e, k, groups) = (cfg.n_experts, cfg.top_k, cfg.n_group);
        let shared = 4 * (3 * e + 2 * THREADS as usize + 2 * groups);
        let fits = e > 0
            && logits.len() % e == 0
            && (1..=e).contains(&k)
            && groups > 0
            && bias.is_none_or(|b| b.len() == e)
            && shared <= SHARED_LIMIT;
        if !fits {
            return Err(GpuError::Shape(format!(
                "moe route: {} logits, bias {:?} for {cfg:?} (1 <= top_k <= E, n_group >= 1, E at most about {})",
                logits.len(),
                bias.map(<[f32]>::len),
                (SHARED_LIMIT / 4 - 2 * THREADS as usize) / 3
            )));
        }
        let t = logits.len() / e;
        let mut routed = Routed { ids: vec![], weights: vec![], scores: vec![] };
        if t == 0 {
            return Ok(routed);
        }
        let (dl, db) = (self.upload(logits)?, self.upload(bias.unwrap_or(&[0.0]))?);
        let (mut ids, mut weights, mut scores) =
            (self.zeros::<u32>(t * k)?, self.zeros::<f32>(t * k)?, self.zeros::<f32>(t * e)?);
        let dims = [e, groups, cfg.topk_group, k].map(|x| x as u32);
        let flags = [bias.is_some(), cfg.sigmoid, cfg.norm_topk_prob].map(i32::from);
        let mut l = self.stream.launch_builder(self.function("moe_route_f32"));
        l.arg(&dl).arg(&db).arg(&flags[0]).arg(&mut ids).arg(&mut weights).arg(&mut scores);
        for d in &dims {
            l.arg(d);
        }
        l.arg(&flags[1]).arg(&flags[2]).arg(&cfg.routed_scaling_factor);
        let launch = LaunchConfig {
            grid_dim: (count32("tokens", t)?, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        // SAFETY: one block per token reads its row of E logits and the E-float bias (a dummy,
        // never read, when absent), writes its K ids and weights and E scores; the shared memory
        // holds the layout the kernel documents, and top_k <= E so every round finds an expert.
        unsafe { l.launch(launch) }.map_err(cuda("moe_route_f32"))?;
        routed.ids = self.download(&ids, t * k)?.into_iter().map(|i| i as usize).collect();
        routed.weights = self.download(&weights, t * k)?;
        routed.scores = self.download(&scores, t * e)?;
        Ok(routed)
    }
}
