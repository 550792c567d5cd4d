//! DualPipe (DeepSeek-V3 TR §3.2.1; deepseek-ai/DualPipe `dualpipe.py`): two copies of the
//! model fed from both ends at once. Rank r holds stage r of direction 0 (chunk 0, entering at
//! rank 0) and stage PP-1-r of direction 1 (chunk 1, entering at the last rank). In the steady
//! state every forward is overlapped with a backward of the other direction, so each one's
//! all-to-all and pipeline communication hides under the other's computation.
//!
//! The op order is the reference's eight steps (spec section 5.3), in terms of the rank's
//! "near" direction (the one entering closer to it) and its "far" direction.

use super::{Method, Op, OpList, Path, Place, Schedule};

pub(super) fn generate(pp: usize, micro: usize) -> Result<Schedule, &'static str> {
    if pp < 2 || pp % 2 != 0 {
        return Err("DualPipe needs an even number of stages (one per rank)");
    }
    if micro % 2 != 0 {
        return Err("DualPipe splits the micro-batches evenly between its two directions, so needs an even count");
    }
    if micro < 2 * pp {
        return Err("DualPipe needs at least 2*PP micro-batches");
    }
    let half = pp / 2;
    let ranks = (0..pp)
        .map(|r| {
            let near = u8::from(r >= half);
            eight_steps(half, micro / 2, r.min(pp - 1 - r), near)
        })
        .collect();
    let down = Path { micro: micro / 2, stages: (0..pp).map(|rank| Place { rank, chunk: 0 }).collect() };
    let up = Path { micro: micro / 2, stages: (0..pp).rev().map(|rank| Place { rank, chunk: 1 }).collect() };
    Ok(Schedule { method: Method::DualPipe, stages: pp, micro, paths: vec![down, up], ranks })
}

/// One rank's ops. `n` = half the ranks, `c` = micro-batches per direction, `h` = the rank's
/// distance to the nearer end, `near` = the chunk whose micro-batches enter closer to it. The
/// middle ranks (h = n-1) meet the far direction first: their first main-step pair runs as a
/// plain forward then a plain backward, which shortens the critical path.
pub(super) fn eight_steps(n: usize, c: usize, h: usize, near: u8) -> Vec<Op> {
    let far = 1 - near;
    let middle = h + 1 == n;
    let mut list = OpList::default();
    // 1: fill with forwards of the near direction.
    (0..2 * (n - h - 1)).for_each(|_| list.forward(near));
    // 2: forwards of both directions, alternating.
    for _ in 0..h + 1 {
        list.forward(near);
        list.forward(far);
    }
    // 3: the first far backwards, input-only, with their Ws right away to fill the wait.
    for _ in 0..n - h - 1 {
        list.backward(far, true);
        list.weight();
        list.forward(far);
    }
    // 4 (main): overlapped pairs, near forward with far backward, then the reverse.
    for i in 0..c + h + 1 - 2 * n {
        if i == 0 && middle {
            list.forward(near);
            list.backward(far, false);
        } else {
            list.pair(near, far);
        }
        list.pair(far, near);
    }
    // 5: the far forwards run out; far backwards alone, near backwards still paired.
    for _ in 0..n - h - 1 {
        list.backward(far, false);
        list.pair(far, near);
    }
    // 6: the last backwards of both directions. From iteration (h+1)/2 on (before its far
    // backward when h is odd, between the two when h is even) they are input-only, their Ws
    // deferred to fill the drain.
    let (steps, mut split) = (h + 1, false);
    for i in 0..steps {
        split |= i == steps / 2 && h % 2 == 1;
        list.backward(far, split);
        split |= i == steps / 2 && h % 2 == 0;
        list.backward(near, split);
    }
    // 7: deferred Ws interleaved with the remaining near backwards, input-only.
    for _ in 0..n - h - 1 {
        list.weight();
        list.backward(near, true);
    }
    // 8: the remaining Ws.
    (0..h + 1).for_each(|_| list.weight());
    list.ops
}
