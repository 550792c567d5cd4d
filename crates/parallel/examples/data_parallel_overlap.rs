//! How much gradient communication the data-parallel step hides behind the backward, on a
//! modelled link: DeepSeek-V3 tiny on 2 LocalComm ranks, with and without overlap.
//!
//! `cargo run --release -p whale-parallel --example data_parallel_overlap [latency_ms] [MB/s]`
//! (default 0.2 ms and 400 MB/s: less communication than one backward, so all of it could hide).

use std::time::{Duration, Instant};

use whale_model::tensor::Rng;
use whale_model::{DeepSeekV3, DeepSeekV3Config};
use whale_parallel::comm::{Comm, LinkModel, LocalComm};
use whale_parallel::data_parallel::{DataParallelConfig, DataParallelTrainer, ShardedData};
use whale_parallel::trainer::{TokenWalk, TrainConfig, Trainer};

const WORLD: usize = 2;
const STEPS: usize = 6;

/// Mean over the timed steps (after the first, which also rebuilds the buckets) of rank 0's
/// step time, exposed communication (waited for after the backward) and modelled communication,
/// and the number of buckets.
fn run(link: LinkModel, overlap: bool, rebuild_buckets: bool) -> (Duration, Duration, Duration, usize) {
    let out = LocalComm::run_with(WORLD, Some(link), |comm| {
        let config = TrainConfig { steps: STEPS as u64, micro_batch: 4, seq_len: 32, ..TrainConfig::default() };
        let inner = Box::new(TokenWalk { rng: Rng::new(1), vocab: 64, max_step: 3 });
        let data = Box::new(ShardedData { inner, rank: comm.rank(), world: WORLD });
        let model = DeepSeekV3::new(DeepSeekV3Config::tiny(), 7).expect("model");
        let trainer = Trainer::new(model, config, data).expect("trainer");
        let dp =
            DataParallelConfig { overlap, rebuild_buckets, bucket_bytes: 256 << 10, ..DataParallelConfig::default() };
        let mut t = DataParallelTrainer::new(trainer, comm, dp).expect("data parallel");
        t.train_step().expect("step");
        let (mut step, mut exposed) = (Duration::ZERO, Duration::ZERO);
        let modelled0 = comm.stats().modelled;
        for _ in 1..STEPS {
            let t0 = Instant::now();
            t.train_step().expect("step");
            step += t0.elapsed();
            exposed += t.exposed_comm;
        }
        let n = (STEPS - 1) as u32;
        (step / n, exposed / n, (comm.stats().modelled - modelled0) / n, t.bucket_sizes().len())
    });
    out[0]
}

fn main() {
    let args: Vec<f64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let latency = Duration::from_secs_f64(args.first().copied().unwrap_or(0.2) / 1e3);
    let bandwidth = args.get(1).copied().unwrap_or(400.0) * 1e6;
    let link = LinkModel { latency, bandwidth };
    println!("DeepSeek-V3 tiny, {WORLD} ranks, 4 x 32 tokens per rank, link {latency:?} + bytes / {bandwidth:.0} B/s");
    println!("{:>22} {:>8} {:>8} {:>9} {:>8}", "", "step ms", "exposed", "modelled", "buckets");
    let free = LinkModel { latency: Duration::ZERO, bandwidth: f64::INFINITY };
    let rows = [
        ("free link, serial", free, false, true),
        ("free link, overlapped", free, true, true),
        ("serial", link, false, true),
        ("overlapped, no rebuild", link, true, false),
        ("overlapped", link, true, true),
    ];
    for (name, link, overlap, rebuild) in rows {
        let (step, exposed, modelled, buckets) = run(link, overlap, rebuild);
        println!("{name:>22} {:>8.1} {:>8.1} {:>9.1} {buckets:>8}", ms(step), ms(exposed), ms(modelled));
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
