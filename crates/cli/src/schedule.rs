//! `whale schedule`: builds a pipeline schedule, simulates it under a cost model and prints each
//! rank's bubble against the DeepSeek-V3 table's formula, the peak activations and the total
//! time; optionally draws the timeline as an SVG.

use std::path::PathBuf;

use anyhow::Result;
use whale_rl::parallel::schedule::svg::timeline_svg;

use crate::pretrain::write_atomically;
use whale_rl::parallel::schedule::{fmt_time, simulate, Cost, Method, Schedule};

#[derive(clap::Args, Debug)]
pub struct ScheduleArgs {
    /// 1f1b, zb1p (ZB-H1), dualpipe or dualpipev.
    #[arg(long, default_value = "dualpipe")]
    pub method: Method,
    /// Pipeline stages (the table's PP). DualPipeV runs them on PP/2 ranks, two stages each.
    #[arg(long, default_value_t = 8)]
    pub pp: usize,
    /// Micro-batches in all (DualPipe: both directions together; at least 2*PP and even).
    #[arg(long, default_value_t = 20)]
    pub micro: usize,
    /// Draw the timeline into this SVG file.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Time of a forward chunk.
    #[arg(long, default_value_t = 1.0)]
    pub f: f64,
    /// Time of a full backward chunk (input + weight gradients); an input-only b takes B - W.
    #[arg(long, default_value_t = 2.0)]
    pub b: f64,
    /// Time of a weight-gradient backward chunk.
    #[arg(long, default_value_t = 1.0)]
    pub w: f64,
    /// Time of an overlapped forward + backward pair (F&B). Default F + B: overlapping hides
    /// communication but saves no compute.
    #[arg(long)]
    pub fb: Option<f64>,
    /// Point-to-point latency between neighbouring ranks.
    #[arg(long, default_value_t = 0.0)]
    pub comm: f64,
    /// Also print each rank's op list.
    #[arg(long)]
    pub ops: bool,
}

pub fn run(a: ScheduleArgs) -> Result<()> {
    let cost = Cost { f: a.f, b: a.b, w: a.w, fb: a.fb.unwrap_or(a.f + a.b), comm: a.comm };
    let schedule = Schedule::new(a.method, a.pp, a.micro)?;
    let timeline = simulate(&schedule, &cost)?;
    let method = a.method;
    let ranks = schedule.ranks.len();
    println!("{method}: PP={} stages on {ranks} ranks, {} micro-batches", a.pp, a.micro);
    println!(
        "cost: F={} B={} (b={} input + W={} weight) F&B={} comm={}",
        fmt_time(cost.f),
        fmt_time(cost.b),
        fmt_time(cost.b - cost.w),
        fmt_time(cost.w),
        fmt_time(cost.fb),
        fmt_time(cost.comm)
    );
    println!("{:>5} {:>10} {:>10} {:>12} {:>5}", "rank", "busy", "bubble", "activations", "ops");
    for (r, rank) in timeline.ranks.iter().enumerate() {
        println!(
            "{r:>5} {:>10} {:>10} {:>12} {:>5}",
            fmt_time(rank.busy),
            fmt_time(rank.bubble),
            rank.peak_activations,
            rank.spans.len()
        );
        if a.ops {
            println!("      {}", schedule.notation(r));
        }
    }
    println!(
        "bubble: {} on the worst rank; table {} = {}",
        fmt_time(timeline.max_bubble()),
        method.bubble_formula(),
        fmt_time(method.table_bubble(a.pp, &cost))
    );
    if !method.table_assumes(a.pp, a.micro, &cost) {
        println!("note: the table assumes {}; here the simulated bubble may differ", method.table_assumptions());
    }
    println!("peak activations: {} (table: {})", timeline.peak_activations(), method.table_activations(a.pp));
    println!("total time: {}", fmt_time(timeline.total));
    if let Some(path) = &a.svg {
        write_atomically(path, &timeline_svg(&schedule, &timeline, &cost))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
