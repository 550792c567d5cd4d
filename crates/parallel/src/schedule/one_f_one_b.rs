//! 1F1B (PipeDream-Flush, as in Megatron-LM): rank r warms up with PP-1-r forwards, then
//! alternates one forward and one full backward, then drains the remaining backwards. At most
//! PP-r micro-batches are alive on rank r.

use super::{straight_path, Method, Op, OpList, Schedule};

pub(super) fn generate(pp: usize, micro: usize) -> Schedule {
    let ranks = (0..pp).map(|r| rank_ops(pp, micro, r, None)).collect();
    Schedule { method: Method::OneFOneB, stages: pp, micro, paths: vec![straight_path(pp, micro)], ranks }
}

/// Rank `r`'s 1F1B order. With `defer = Some(k)` every backward is input-only and its W waits in
/// a FIFO; a W runs right after a b whenever more than k are waiting, and the rest at the end.
pub(super) fn rank_ops(pp: usize, micro: usize, r: usize, defer: Option<usize>) -> Vec<Op> {
    let warmup = (pp - 1 - r).min(micro);
    let mut list = OpList::default();
    (0..warmup).for_each(|_| list.forward(0));
    for i in 0..micro {
        if i + warmup < micro {
            list.forward(0);
        }
        list.backward(0, defer.is_some());
        if defer.is_some_and(|k| list.deferred.len() > k) {
            list.weight();
        }
    }
    while !list.deferred.is_empty() {
        list.weight();
    }
    list.ops
}
