//! DualPipeV (deepseek-ai/DualPipe `dualpipev.py`, Sea AI Lab's "cut-in-half" of DualPipe):
//! PP stages on PP/2 ranks, rank r holding stage r (chunk 0) and stage PP-1-r (chunk 1). Every
//! micro-batch enters at rank 0, runs down chunk 0 to the last rank, turns there without
//! communication and runs back up chunk 1; the loss is computed on rank 0. Each rank's ops are
//! DualPipe's eight steps with the rank index as the distance to the end, so DualPipeV(PP, M)
//! equals ranks 0..PP/2 of DualPipe(PP, 2M) op for op. No parameters are duplicated.

use super::{dualpipe::eight_steps, Method, Path, Place, Schedule};

pub(super) fn generate(pp: usize, micro: usize) -> Result<Schedule, &'static str> {
    if pp < 2 || pp % 2 != 0 {
        return Err("DualPipeV needs an even number of stages (two per rank)");
    }
    if micro < pp {
        return Err("DualPipeV needs at least PP micro-batches (2 per rank)");
    }
    let ranks = pp / 2;
    let ops = (0..ranks).map(|r| eight_steps(ranks, micro, r, 0)).collect();
    let down = (0..ranks).map(|rank| Place { rank, chunk: 0 });
    let up = (0..ranks).rev().map(|rank| Place { rank, chunk: 1 });
    let path = Path { micro, stages: down.chain(up).collect() };
    Ok(Schedule { method: Method::DualPipeV, stages: pp, micro, paths: vec![path], ranks: ops })
}
