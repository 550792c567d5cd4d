//! Pipeline parallelism on LocalComm ranks with an injected link latency (every message arrives
//! `latency` after it is sent), DualPipe with its forward/backward pairs overlapped (whale)
//! against 1F1B (baseline) on the same stages and micro-batches; both do the same compute per
//! rank, and DualPipe's pairs let one half compute while the other waits for a message:
//! - one step (forward, backward, gradient sum) of the `tiny` preset on 4 stages x 8
//!   micro-batches, where the waits are the pipeline's activation and gradient transfers;
//! - one full training step on a dp 2 x ep 2 x pp 2 mesh (4 micro-batches per replica), where
//!   every MoE layer also waits for its expert dispatch and combine all-to-alls;
//! - one training step on 4 expert-parallel ranks over a 20 MB/s link, the dispatch in FP8
//!   (whale) against f32 (baseline).

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use whale_benches::config;
use whale_model::block::FeedForward;
use whale_model::tensor::{DType, Device, Rng, Tensor};
use whale_model::{DeepSeekV3, DeepSeekV3Config};
use whale_parallel::comm::{Comm, LinkModel, LocalComm};
use whale_parallel::data_parallel::DataParallelConfig;
use whale_parallel::expert_parallel::{EpComms, ExpertParallel};
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

/// Seconds of `iters` training steps on `mesh` (4 micro-batches per replica), the MoE dispatch
/// in FP8 or not, after one warm-up step: the slowest rank's time (schedules leave different
/// ranks last in a step).
fn mesh_steps(mesh: Mesh, fp8_dispatch: bool, link: LinkModel, iters: u64) -> Duration {
    let times = LocalComm::run_with(mesh.world_size(), Some(link), |comm| {
        let config = TrainConfig { micro_batch: 2, seq_len: 32, grad_accum: 4, fp8_dispatch, ..TrainConfig::default() };
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
    let pipelined = |schedule| Mesh { dp: 2, ep: 2, pp: 2, schedule, ep_nodes: 1 };
    let mut g = c.benchmark_group("parallel_step_tiny_dp2_ep2_pp2_m4_latency5ms");
    g.sample_size(10);
    g.bench_function("whale", |b| b.iter_custom(|iters| mesh_steps(pipelined(Method::DualPipe), false, link, iters)));
    g.bench_function("baseline", |b| {
        b.iter_custom(|iters| mesh_steps(pipelined(Method::OneFOneB), false, link, iters))
    });
    g.finish();
}

/// DeepSeek-V3's low-precision communication: a step of 4 expert-parallel ranks whose dispatch
/// (and the gradients back to the experts) moves as E4M3 codes with power-of-two scales
/// (whale) against f32 (baseline), on a link slow enough for the all-to-alls' bytes to count.
/// The FP8 side also pays for rounding, encoding and checking its rows.
fn fp8_dispatch(c: &mut Criterion) {
    let link = LinkModel { latency: Duration::ZERO, bandwidth: 20e6 };
    let ep = Mesh { dp: 4, ep: 4, ..Mesh::default() };
    let mut g = c.benchmark_group("ep_step_tiny_dp4_ep4_m4_20MBps_fp8_vs_f32_dispatch");
    g.sample_size(10);
    g.bench_function("whale", |b| b.iter_custom(|iters| mesh_steps(ep, true, link, iters)));
    g.bench_function("baseline", |b| b.iter_custom(|iters| mesh_steps(ep, false, link, iters)));
    g.finish();

    // The MoE layer alone (a step adds the data-parallel gradient sum, whose bytes it does not
    // change): forward and backward of 1024 tokens a rank.
    let mut g = c.benchmark_group("ep_moe_layer_tiny_4ranks_t1024_20MBps_fp8_vs_f32_dispatch");
    g.sample_size(10);
    g.bench_function("whale", |b| b.iter_custom(|iters| moe_layer_steps(true, link, iters)));
    g.bench_function("baseline", |b| b.iter_custom(|iters| moe_layer_steps(false, link, iters)));
    g.finish();
}

/// Seconds of `iters` forward and backward passes of the tiny preset's first MoE layer on 4
/// expert-parallel ranks, 1024 tokens each: the slowest rank's time.
fn moe_layer_steps(fp8_dispatch: bool, link: LinkModel, iters: u64) -> Duration {
    let model = DeepSeekV3::new(DeepSeekV3Config::tiny(), 0).expect("model");
    let times = LocalComm::run_with(4, Some(link), |comm| {
        let FeedForward::Moe(moe) = &model.duplicate().expect("copy").layers[1].mlp else { panic!("an MoE layer") };
        let mut moe = moe.clone();
        moe.fp8_dispatch = fp8_dispatch;
        let comms = EpComms::new(Arc::from(comm.split(0, comm.rank()).expect("split"))).expect("comms");
        ExpertParallel::install(&comms, 4, &mut moe).expect("expert parallelism");
        let d = model.config.hidden_size;
        let x = Tensor::randn(&[1, 1024, d], 0.0, 1.0, DType::F32, &mut Rng::new(comms.forward.rank() as u64))
            .expect("tokens")
            .variable();
        let t0 = Instant::now();
        for _ in 0..iters {
            moe.forward(&x, None).expect("forward").output.sum_all().expect("sum").backward().expect("backward");
        }
        t0.elapsed()
    });
    times.into_iter().max().expect("ranks")
}

criterion_group! {
    name = benches;
    config = config();
    targets = pipeline, mesh, fp8_dispatch
}
criterion_main!(benches);
