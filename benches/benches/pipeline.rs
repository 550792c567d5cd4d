//! Pipeline parallelism on LocalComm ranks with an injected link latency (every message arrives
//! `latency` after it is sent): one training step (forward, backward, gradient sum) of the `tiny`
//! preset on 4 stages and 8 micro-batches, DualPipe with its forward/backward pairs overlapped
//! (whale) against 1F1B (baseline) on the same stages and micro-batches. Both runs do the same
//! compute per rank; DualPipe's pairs let one half compute while the other waits for a message.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use whale_benches::config;
use whale_model::tensor::{Device, Rng, Tensor};
use whale_model::{DeepSeekV3, DeepSeekV3Config};
use whale_parallel::comm::{Comm, LinkModel, LocalComm};
use whale_parallel::pipeline::{run_step, Execution, MicroBatch, StagePlan};
use whale_parallel::schedule::{Method, Schedule};

fn micro_batches(n: usize, batch: usize, seq: usize) -> Vec<MicroBatch> {
    let mut rng = Rng::new(3);
    (0..n)
        .map(|_| {
            let ids: Vec<i64> = (0..batch * seq).map(|_| rng.below(64) as i64).collect();
            let targets: Vec<i64> = ids.iter().skip(1).copied().chain([-100]).collect();
            MicroBatch {
                input_ids: Tensor::from_vec(ids, &[batch, seq], &Device::Cpu).expect("ids"),
                targets: Tensor::from_vec(targets, &[batch, seq], &Device::Cpu).expect("targets"),
            }
        })
        .collect()
}

/// Wall time of `iters` steps of `method` on its ranks.
fn steps(method: Method, models: &[DeepSeekV3], micro: &[MicroBatch], link: LinkModel, iters: u64) -> Duration {
    let schedule = Schedule::new(method, 4, micro.len()).expect("schedule");
    let plan = StagePlan::even(4, 4).expect("plan");
    let t0 = Instant::now();
    for _ in 0..iters {
        LocalComm::run_with(schedule.ranks.len(), Some(link), |comm| {
            let model = &models[comm.rank()];
            run_step(comm, &schedule, &plan, model, micro, Execution::default()).expect("step");
            model.params.zero_grad();
        });
    }
    t0.elapsed()
}

fn pipeline(c: &mut Criterion) {
    let model = DeepSeekV3::new(DeepSeekV3Config::tiny(), 0).expect("model");
    let models: Vec<DeepSeekV3> = (0..4).map(|_| model.duplicate().expect("copy")).collect();
    let micro = micro_batches(8, 4, 32);
    for latency_ms in [0u64, 5] {
        let link = LinkModel { latency: Duration::from_millis(latency_ms), bandwidth: f64::INFINITY };
        let mut g = c.benchmark_group(format!("pipeline_step_tiny_pp4_m8_latency{latency_ms}ms"));
        g.sample_size(10);
        g.bench_function("whale", |b| b.iter_custom(|iters| steps(Method::DualPipe, &models, &micro, link, iters)));
        g.bench_function("baseline", |b| b.iter_custom(|iters| steps(Method::OneFOneB, &models, &micro, link, iters)));
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = config();
    targets = pipeline
}
criterion_main!(benches);
