//! ZB1P, the "ZB-H1" schedule of Zero Bubble Pipeline Parallelism (Qi et al., 2023): 1F1B's
//! order with every backward split into the input gradient (b, on the critical path) and the
//! weight gradient (W, free to move). Rank r keeps up to r weight gradients deferred: the later
//! the rank, the earlier its last b ends, and its deferred Ws fill the cool-down bubble that
//! 1F1B leaves there. Peak memory stays at PP live micro-batches as in 1F1B: rank r holds PP-1-r
//! warm-up forwards, one steady-state forward and r deferred Ws.

use super::{one_f_one_b, straight_path, Method, Schedule};

pub(super) fn generate(pp: usize, micro: usize) -> Schedule {
    let ranks = (0..pp).map(|r| one_f_one_b::rank_ops(pp, micro, r, Some(r))).collect();
    Schedule { method: Method::Zb1p, stages: pp, micro, paths: vec![straight_path(pp, micro)], ranks }
}
