//! Pipeline parallelism on LocalComm ranks with an injected link latency (every message arrives
//! `latency` after it is sent), DualPipe with its forward/backward pairs overlapped (whale)
//! against 1F1B (baseline) on the same stages and micro-batches; both do the same compute per
//! rank, and DualPipe's pairs let one half compute while the other waits for a message:
//! - one step (forward, backward, gradient sum) of the `tiny` preset on 4 stages x 8
//!   micro-batches, where the waits are the pipeline's activation and gradient transfers;
//! - one full training step on a dp 2 x ep 2 x pp 2 mesh (4 micro-batches per replica), where
//!   every MoE layer also waits for its expert dispatch and combine all-to-alls.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use whale_benches::config;
use whale_model::tensor::{Device, Rng, Tensor};
use whale_model::{DeepSeekV3, DeepSeekV3Config};
use whale_parallel::comm::{Comm, LinkModel, LocalComm};
use whale_parallel::data_parallel::DataParallelConfig;
use whale_parallel::parallel_trainer::{Mesh, ParallelTrainer};
use whale_parallel::pipeline::{run_step, Execution, MicroBatch, StagePlan};
use whale_parallel::schedule::{Method, Schedule};
use whale_parallel::trainer::{TokenWalk, TrainConfig, Trainer};

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

/// Seconds of `iters` training steps on a dp 2 x ep 2 x pp 2 mesh running `schedule`, after one
/// warm-up step: the slowest rank's time (schedules leave different ranks last in a step).
fn mesh_steps(schedule: Method, link: LinkModel, iters: u64) -> Duration {
    let mesh = Mesh { dp: 2, ep: 2, pp: 2, schedule, ep_nodes: 1 };
    let times = LocalComm::run_with(mesh.world_size(), Some(link), |comm| {
        let config = TrainConfig { micro_batch: 2, seq_len: 32, grad_accum: 4, ..TrainConfig::default() };
        let walk = Box::new(TokenWalk { rng: Rng::new(1), vocab: 64, max_step: 3 });
        let data = Box::new(mesh.shard(comm.rank(), walk));
        let model = DeepSeekV3::new(DeepSeekV3Config::tiny(), 0).expect("model");
        let trainer = Trainer::new(model, config, data).expect("trainer");
        let mut t = ParallelTrainer::new(trainer, comm, mesh, DataParallelConfig::default()).expect("mesh");
        t.train_step().expect("warm-up step");
        let t0 = Instant::now();
        for _ in 0..iters {
            t.train_step().expect("step");
        }
        t0.elapsed()
    });
    times.into_iter().max().expect("ranks")
}

fn mesh(c: &mut Criterion) {
    let link = LinkModel { latency: Duration::from_millis(5), bandwidth: f64::INFINITY };
    let mut g = c.benchmark_group("parallel_step_tiny_dp2_ep2_pp2_m4_latency5ms");
    g.sample_size(10);
    g.bench_function("whale", |b| b.iter_custom(|iters| mesh_steps(Method::DualPipe, link, iters)));
    g.bench_function("baseline", |b| b.iter_custom(|iters| mesh_steps(Method::OneFOneB, link, iters)));
    g.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = pipeline, mesh
}
criterion_main!(benches);
