//! Data, expert and pipeline parallelism together: meshes of dp x ep x pp ranks on LocalComm take
//! the steps one rank takes accumulating the same global batch (the mean loss over the same
//! micro-batches): every rank's copy ends equal to every other's, close to the single rank's,
//! with the same losses and the same MoE balancing biases; impossible meshes are refused.

use std::sync::OnceLock;

use whale_model::nn::Recompute;
use whale_model::tensor::checkpoint::recomputations;
use whale_model::tensor::Rng;
use whale_model::{DeepSeekV3, DeepSeekV3Config};
use whale_parallel::comm::{Comm, LocalComm};
use whale_parallel::data_parallel::DataParallelConfig;
use whale_parallel::parallel_trainer::{Mesh, ParallelTrainer};
use whale_parallel::schedule::Method;
use whale_parallel::trainer::{DataSource, StepMetrics, TokenWalk, TrainConfig, Trainer};

const STEPS: u64 = 3;
/// Micro-batches (of one sequence) per optimizer step, over all replicas.
const GLOBAL_MICRO: usize = 8;

fn walk() -> Box<dyn DataSource> {
    Box::new(TokenWalk { rng: Rng::new(5), vocab: 64, max_step: 3 })
}

fn trainer(grad_accum: usize, data: Box<dyn DataSource>) -> Trainer {
    trainer_of(DeepSeekV3Config::tiny(), grad_accum, data)
}

fn trainer_of(model: DeepSeekV3Config, grad_accum: usize, data: Box<dyn DataSource>) -> Trainer {
    // lr 3e-3 decaying to 3e-4 (the defaults) after 2 warm-up steps; the MTP loss weighs 0.3 (the
    // preset's), then 0.1 in the last step: every way of taking a step must use the schedule.
    let config = TrainConfig {
        steps: STEPS,
        micro_batch: 1,
        grad_accum,
        seq_len: 16,
        warmup: 2,
        mtp_weight_from: Some((2, 0.1)),
        ..Default::default()
    };
    Trainer::new(DeepSeekV3::new(model, 11).unwrap(), config, data).unwrap()
}

/// What a run ends with: weights and buffers (the balancing biases) by name, the step metrics,
/// and AdamW's first moment after the first step (a tenth of the first step's clipped gradient).
struct Outcome {
    weights: Vec<(String, Vec<f32>)>,
    metrics: Vec<StepMetrics>,
    first_gradient: Vec<(String, Vec<f32>)>,
    /// The AdamW state after the last step (both moments of every parameter).
    optimizer: Vec<(String, Vec<f32>)>,
    /// The most nodes a token of the rank's last micro-batch was sent to (0: one rank).
    max_nodes: usize,
}

/// First moments by parameter name.
fn first_moments(t: &Trainer) -> Vec<(String, Vec<f32>)> {
    let state = t.opt.state_tensors().unwrap().into_iter().filter(|(n, _)| n.ends_with(".exp_avg"));
    state.map(|(n, s)| (n, s.to_vec_f32().unwrap())).collect()
}

fn outcome(t: &Trainer, metrics: Vec<StepMetrics>, first_gradient: Vec<(String, Vec<f32>)>) -> Outcome {
    let mut weights: Vec<_> = t.model.params.iter().map(|(n, p)| (n.to_string(), p.to_vec_f32().unwrap())).collect();
    weights.extend(t.model.buffers.iter().map(|(n, b)| (n.clone(), b.to_vec_f32().unwrap())));
    let state = t.opt.state_tensors().unwrap().into_iter();
    let optimizer = state.map(|(n, s)| (n, s.to_vec_f32().unwrap())).collect();
    Outcome { weights, metrics, first_gradient, optimizer, max_nodes: 0 }
}

/// One rank accumulating every step's micro-batches, `micro_batch` sequences each.
fn one_rank(micro_batch: usize) -> Outcome {
    let mut t = trainer(GLOBAL_MICRO / micro_batch, walk());
    t.config.micro_batch = micro_batch;
    let mut metrics = vec![t.train_step().unwrap()];
    let first = first_moments(&t);
    metrics.extend((1..STEPS).map(|_| t.train_step().unwrap()));
    outcome(&t, metrics, first)
}

/// The reference, and how far it is from itself when the same sequences are split into other
/// micro-batches (one rank, two sequences each): weights more than 1e-6 apart and the worst
/// difference.
fn reference() -> &'static (Outcome, (usize, f32)) {
    static RUN: OnceLock<(Outcome, (usize, f32))> = OnceLock::new();
    RUN.get_or_init(|| {
        let single = one_rank(1);
        let noise = weight_distance(&one_rank(2), &single);
        (single, noise)
    })
}

fn run(mesh: Mesh, dp: DataParallelConfig) -> Vec<Outcome> {
    run_with(mesh, dp, STEPS, |_| {})
}

/// `steps` steps on `mesh`, each rank's trainer [`trainer`]'s on its shard, then changed by
/// `setup`.
fn run_with(mesh: Mesh, dp: DataParallelConfig, steps: u64, setup: impl Fn(&mut Trainer) + Sync) -> Vec<Outcome> {
    LocalComm::run(mesh.world_size(), |comm| {
        let data = Box::new(mesh.shard(comm.rank(), walk()));
        let mut t = trainer(GLOBAL_MICRO / mesh.dp, data);
        setup(&mut t);
        let mut t = ParallelTrainer::new(t, comm, mesh, dp.clone()).unwrap();
        let mut metrics = vec![t.train_step().unwrap()];
        let first = first_moments(t.trainer());
        metrics.extend((1..steps).map(|_| t.train_step().unwrap()));
        let max_nodes = t.max_nodes_per_token();
        Outcome { max_nodes, ..outcome(&t.into_trainer().unwrap(), metrics, first) }
    })
}

fn bits(w: &[(String, Vec<f32>)]) -> Vec<u32> {
    w.iter().flat_map(|(_, v)| v.iter().map(|x| x.to_bits())).collect()
}

fn biases(o: &Outcome) -> Vec<&[f32]> {
    o.weights.iter().filter(|(n, _)| n.ends_with("e_score_correction_bias")).map(|(_, v)| v.as_slice()).collect()
}

/// The mesh's steps are one rank's: the first step's gradient of every parameter, and every
/// step's losses, gradient norm and expert loads.
///
/// The mesh adds each gradient over replicas, stages (the embedding feeds the first stage and the
/// MTP module), expert-parallel partial sums and micro-batches in another order than one rank's
/// accumulation, so gradients agree to f32 rounding: 2e-5 of each tensor's largest entry, as for
/// expert parallelism alone (tests/expert_parallel.rs). A replica, stage or expert owner whose
/// gradients were dropped or counted twice, or a wrong loss scale, is far outside that; the
/// losses and gradient norms (1e-5 relative) check the later steps.
fn assert_same_steps(a: &Outcome, b: &Outcome, what: &str) {
    assert_eq!(a.first_gradient.len(), b.first_gradient.len(), "{what}: parameters with AdamW state");
    for ((name, x), (_, y)) in a.first_gradient.iter().zip(&b.first_gradient) {
        let scale = y.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-12);
        let worst = x.iter().zip(y).fold(0.0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(worst <= 2e-5 * scale, "{what}: first gradient of {name} off by {worst} (scale {scale})");
    }
    assert_eq!(a.metrics.len(), b.metrics.len());
    for (x, y) in a.metrics.iter().zip(&b.metrics) {
        let close = |p: f64, q: f64| (p - q).abs() <= 1e-5 * q.abs();
        assert!(close(x.loss, y.loss), "{what}: step {} loss {} vs {}", x.step, x.loss, y.loss);
        assert!(close(x.main_loss, y.main_loss), "{what}: step {} main loss", x.step);
        assert!(close(x.mtp_loss.unwrap(), y.mtp_loss.unwrap()), "{what}: step {} MTP loss", x.step);
        let (gx, gy) = (x.grad_norm, y.grad_norm);
        assert!(close(gx, gy), "{what}: step {} gradient norm {gx} vs {gy}", x.step);
        assert_eq!(x.expert_load, y.expert_load, "{what}: step {}: the reported load is the global one", x.step);
        assert_eq!(x.lr, y.lr);
        assert_eq!(x.mtp_weight, y.mtp_weight);
    }
}

/// Weights more than 1e-6 apart, and the largest difference.
fn weight_distance(a: &Outcome, b: &Outcome) -> (usize, f32) {
    let (mut off, mut worst) = (0, 0.0f32);
    for ((na, va), (nb, vb)) in a.weights.iter().zip(&b.weights) {
        assert_eq!(na, nb);
        for (x, y) in va.iter().zip(vb) {
            worst = worst.max((x - y).abs());
            off += ((x - y).abs() > 1e-6) as usize;
        }
    }
    (off, worst)
}

fn check(dp: usize, ep: usize, pp: usize, schedule: Method) -> Vec<Outcome> {
    check_mesh(Mesh { dp, ep, pp, schedule, ep_nodes: 1 })
}

fn check_mesh(mesh: Mesh) -> Vec<Outcome> {
    let t0 = std::time::Instant::now();
    let ranks = run(mesh, DataParallelConfig::default());
    let seconds = t0.elapsed().as_secs_f64();
    let what = mesh.to_string();
    assert_eq!(ranks.len(), mesh.world_size());
    for (r, rank) in ranks.iter().enumerate() {
        // Every rank applied the same update to the same weights: the copies are one model, and
        // every rank reports the same step.
        assert!(bits(&rank.weights) == bits(&ranks[0].weights), "{what}: rank {r}'s copy differs from rank 0's");
        for (m, m0) in rank.metrics.iter().zip(&ranks[0].metrics) {
            assert_eq!(StepMetrics { tokens_per_s: 0.0, ..m.clone() }, StepMetrics { tokens_per_s: 0.0, ..m0.clone() });
        }
    }
    let (single, (noise_off, noise_worst)) = reference();
    assert_same_steps(&ranks[0], single, &what);
    // The balancing biases moved by the global load: equal on every rank (above) and to one rank's.
    let b0 = biases(&ranks[0]);
    assert!(b0.iter().any(|b| b.iter().any(|&x| x != 0.0)), "the balancing biases should move");
    assert_eq!(b0, biases(single), "{what}: balancing biases");
    // The weights after a few AdamW steps: AdamW divides by each gradient's magnitude, so where a
    // gradient is itself near rounding level, rounding can move a weight by a good part of a step
    // (lr = 3e-3), and later steps spread the difference. One rank differs from itself that much
    // when the same sequences are grouped into other micro-batches (measured: 52k of 1.3M weights
    // more than 1e-6 apart, the worst 3.7e-4). The mesh must stay within twice that (measured:
    // 9.8k to 66k, worst 1.9e-4 to 4.3e-4); a lost or reversed update moves a weight by lr.
    let (off, worst) = weight_distance(&ranks[0], single);
    eprintln!("{what}: {seconds:.2} s; {off} weights more than 1e-6 from one rank's, worst {worst:.1e}");
    assert!(off <= 2 * noise_off, "{what}: {off} weights differ by more than 1e-6 (one rank from itself: {noise_off})");
    assert!(worst <= 2.0 * noise_worst, "{what}: a weight differs by {worst} (one rank from itself: {noise_worst})");
    ranks
}

#[test]
fn meshes_of_every_kind_take_one_rank_steps() {
    check(2, 2, 1, Method::OneFOneB); // experts over the replicas, one stage
    check(4, 4, 1, Method::OneFOneB); // two experts a rank: a token's top-2 can be on two ranks
    check(4, 2, 1, Method::OneFOneB); // two expert-parallel groups, each expert on two replicas
    check(1, 1, 2, Method::OneFOneB); // a pipeline alone
    check(2, 1, 2, Method::DualPipe); // PP = 2 needs an even count of at least 4 micro-batches
    let dualpipe = check(2, 2, 2, Method::DualPipe); // overlapped pairs with expert all-to-alls on both halves
    let all = check(2, 2, 2, Method::Zb1p); // all three, with ZeroBubble's deferred weight gradients

    // Recomputed sublayers change no bits: not in DualPipe's overlapped pairs, nor in ZB1P's
    // split backward (its B pass recomputes for the input gradients, the deferred W pass again).
    let recompute = Recompute { attention: true, mlp: true };
    for (ranks, schedule) in [(&dualpipe, Method::DualPipe), (&all, Method::Zb1p)] {
        let mesh = Mesh { dp: 2, ep: 2, pp: 2, schedule, ep_nodes: 1 };
        let before = recomputations();
        let recomputed = run_with(mesh, DataParallelConfig::default(), STEPS, |t| t.set_recompute(recompute));
        // Every rank's attention and expert regions (2 ranks x 2 stages x 8 micro-batches at least).
        assert!(recomputations() - before >= 32, "{mesh}: the regions were not rerun");
        for (rank, plain) in recomputed.iter().zip(ranks) {
            assert!(bits(&rank.weights) == bits(&plain.weights), "{mesh} recomputing: weights");
            assert!(bits(&rank.first_gradient) == bits(&plain.first_gradient), "{mesh} recomputing: gradients");
        }
    }

    // Node-limited routing: 4 expert-parallel ranks on 2 nodes, the tiny preset's 2 router groups
    // (4 experts each, on one node's 2 ranks) with topk_group 1: a token's top-2 may go to two
    // ranks, but of one node.
    let nodes = check_mesh(Mesh { dp: 4, ep: 4, ep_nodes: 2, ..Mesh::default() });
    assert!(nodes.iter().all(|r| r.max_nodes == 1), "a token reached more nodes than topk_group");
    assert!(all.iter().all(|r| r.max_nodes == 1), "one node: every token reaches it");

    // ZeRO-1 over the world: AdamW on each rank's shard is the same arithmetic, so the same bits,
    // and the trainer each rank gets back holds the whole AdamW state, gathered from the shards.
    let mesh = Mesh { dp: 2, ep: 2, pp: 2, schedule: Method::Zb1p, ep_nodes: 1 };
    let zero1 = run(mesh, DataParallelConfig { zero1: true, ..DataParallelConfig::default() });
    assert!(!all[0].optimizer.is_empty());
    for rank in &zero1 {
        assert!(bits(&rank.weights) == bits(&all[0].weights), "ZeRO-1 changes no bits");
        assert!(bits(&rank.optimizer) == bits(&all[0].optimizer), "ZeRO-1's gathered AdamW state");
    }
}

#[test]
fn node_limited_routing_bounds_the_nodes_a_token_reaches() {
    // 4 expert-parallel ranks on 2 nodes (2 ranks and 4 experts a node, the tiny preset's two
    // router groups), and 2 ranks on 2 nodes (one a node). Free to pick experts of both groups
    // (topk_group 2), some token reaches both nodes; limited to one group, none does.
    let four = Mesh { dp: 4, ep: 4, ep_nodes: 2, ..Mesh::default() };
    let two = Mesh { dp: 2, ep: 2, ep_nodes: 2, ..Mesh::default() };
    for (mesh, topk_group, most) in [(four, 2, 2), (four, 1, 1), (two, 2, 2)] {
        let nodes = LocalComm::run(mesh.world_size(), |comm| {
            let cfg = DeepSeekV3Config { topk_group, ..DeepSeekV3Config::tiny() };
            let t = trainer_of(cfg, GLOBAL_MICRO / mesh.dp, Box::new(mesh.shard(comm.rank(), walk())));
            let mut t = ParallelTrainer::new(t, comm, mesh, DataParallelConfig::default()).unwrap();
            t.train_step().unwrap();
            t.max_nodes_per_token()
        });
        assert_eq!(nodes.iter().max(), Some(&most), "{mesh}, topk_group {topk_group}: nodes per token {nodes:?}");
    }
}

#[test]
fn a_world_of_one_is_the_plain_trainer() {
    let ranks = run(Mesh::default(), DataParallelConfig::default());
    let single = &reference().0;
    assert!(bits(&ranks[0].weights) == bits(&single.weights));
    assert!(bits(&ranks[0].first_gradient) == bits(&single.first_gradient));
    let losses = |o: &Outcome| o.metrics.iter().map(|m| m.loss).collect::<Vec<_>>();
    assert_eq!(losses(&ranks[0]), losses(single));
}

#[test]
fn a_world_of_one_asked_for_zero1_is_the_plain_trainer_across_a_checkpoint() {
    // One rank steps its own optimizer: a checkpoint mid-run must not reset it to a ZeRO-1
    // shard that never stepped.
    let dir = whale_model::tensor::testing::TempDir::new("one-rank-zero1");
    let comm = LocalComm::single();
    let dp = DataParallelConfig { zero1: true, ..DataParallelConfig::default() };
    let mut t = ParallelTrainer::new(trainer(GLOBAL_MICRO, walk()), &comm, Mesh::default(), dp).unwrap();
    let mut metrics = vec![t.train_step().unwrap()];
    let first = first_moments(t.trainer());
    t.save_checkpoint(&dir.join("checkpoint")).unwrap();
    metrics.extend((1..STEPS).map(|_| t.train_step().unwrap()));
    let ran = outcome(&t.into_trainer().unwrap(), metrics, first);
    assert!(bits(&ran.weights) == bits(&reference().0.weights));
}

#[test]
fn impossible_meshes_are_refused_with_the_reason() {
    let cfg = DeepSeekV3Config::tiny();
    let cases = [
        (Mesh { dp: 2, ep: 3, ..Mesh::default() }, 1, "ep (3) must divide dp (2)"),
        (Mesh { dp: 3, ep: 3, ..Mesh::default() }, 1, "8 routed experts do not split evenly over 3"),
        (Mesh { pp: 5, ..Mesh::default() }, 8, "cannot split 4 decoder layers into 5"),
        (Mesh { pp: 2, schedule: Method::DualPipe, ..Mesh::default() }, 2, "at least 2*PP micro-batches"),
        (Mesh { pp: 3, schedule: Method::DualPipeV, ..Mesh::default() }, 8, "even number of stages"),
        (Mesh { dp: 2, ep: 2, ep_nodes: 3, ..Mesh::default() }, 1, "ep_nodes (3) must divide ep (2)"),
        (Mesh { dp: 4, ep: 4, ep_nodes: 4, ..Mesh::default() }, 1, "n_group is 2 for 4 nodes"),
        (Mesh { ep_nodes: 0, ..Mesh::default() }, 1, "must be at least 1"),
    ];
    for (mesh, micro, words) in cases {
        let err = mesh.plan(&cfg, micro).unwrap_err().to_string();
        assert!(err.contains(words) && err.contains("parallel layout"), "{mesh}: {err}");
    }
    // A communicator of the wrong size.
    let comm = LocalComm::single();
    let mesh = Mesh { dp: 2, ..Mesh::default() };
    let err = ParallelTrainer::new(trainer(4, walk()), &comm, mesh, DataParallelConfig::default()).unwrap_err();
    assert!(err.to_string().contains("needs 2 ranks"), "{err}");
    assert_eq!(comm.world_size(), 1);
}

#[test]
fn on_a_pipelined_mesh_rank_zero_keeps_the_moving_average() {
    // Every rank's copy is the same after each step (the tests above), so rank 0's average is
    // the run's; the other ranks keep none.
    let mesh = Mesh { dp: 2, ep: 2, pp: 2, schedule: Method::OneFOneB, ep_nodes: 1 };
    let averages = LocalComm::run(mesh.world_size(), |comm| {
        let mut t = trainer(4, Box::new(mesh.shard(comm.rank(), walk())));
        let config = TrainConfig { ema_decay: Some(0.5), ..t.config.clone() };
        t = Trainer::new(DeepSeekV3::new(DeepSeekV3Config::tiny(), 11).unwrap(), config, t.data).unwrap();
        let mut t = ParallelTrainer::new(t, comm, mesh, DataParallelConfig::default()).unwrap();
        t.train_step().unwrap();
        let t = t.into_trainer().unwrap();
        t.ema_model().unwrap().map(|m| (weights_of(&m), weights_of(&t.model)))
    });
    let (average, weights) = averages[0].as_ref().expect("rank 0 keeps the average");
    assert!(averages[1..].iter().all(Option::is_none), "the other ranks keep none");
    // Half the initial weights and half the stepped ones: not the weights themselves.
    let initial = weights_of(&DeepSeekV3::new(DeepSeekV3Config::tiny(), 11).unwrap());
    let (mut moved, mut n) = (0, 0);
    for ((a, w), i) in average.iter().zip(weights).zip(&initial) {
        n += 1;
        moved += ((a - (w + i) / 2.0).abs() <= 1e-6 * (1.0 + a.abs()) && w != i) as usize;
    }
    assert!(moved * 2 > n, "{moved} of {n} averaged weights are halfway between");
}

/// Every parameter's values, in name order.
fn weights_of(m: &DeepSeekV3) -> Vec<f32> {
    m.params.iter().flat_map(|(_, p)| p.to_vec_f32().unwrap()).collect()
}

#[test]
fn an_fp8_dispatch_under_expert_parallelism_takes_one_ranks_fp8_dispatch_step() {
    // One step: the mesh's sums run in another order, so after an update its weights are one
    // rank's to f32 rounding only, and a value that close to a rounding boundary of E4M3 (a step
    // of 1/16) may round the other way, which a later step's loss and norm then show (measured:
    // the second step's gradient norm 6e-5 apart). The first step's tokens are the same bits on
    // both, so its gradients and losses agree as the plain mesh's do.
    let config = TrainConfig { fp8_dispatch: true, ..trainer(GLOBAL_MICRO, walk()).config };
    let mut t = Trainer::new(DeepSeekV3::new(DeepSeekV3Config::tiny(), 11).unwrap(), config, walk()).unwrap();
    assert!(t.model.fp8_dispatch(), "the trainer's switch reaches the model");
    let metrics = vec![t.train_step().unwrap()];
    let single = outcome(&t, metrics, first_moments(&t));
    assert_ne!(single.metrics[0].loss, reference().0.metrics[0].loss, "FP8 rounding changes the loss");

    let mesh = Mesh { dp: 2, ep: 2, ..Mesh::default() };
    let ranks = run_with(mesh, DataParallelConfig::default(), 1, |t| {
        t.config.fp8_dispatch = true;
        t.model.set_fp8_dispatch(true);
    });
    assert_same_steps(&ranks[0], &single, "dp 2 x ep 2, FP8 dispatch");
}

#[test]
fn a_batch_ramp_on_a_mesh_takes_one_ranks_growing_steps() {
    use whale_parallel::trainer::BatchRamp;
    // One rank taking `global[s]` micro-batches in step s, by hand.
    let by_hand = |global: [usize; 3]| {
        let mut t = trainer(global[0], walk());
        let mut metrics = vec![t.train_step().unwrap()];
        let first = first_moments(&t);
        for n in &global[1..] {
            t.config.grad_accum = *n;
            metrics.push(t.train_step().unwrap());
        }
        outcome(&t, metrics, first)
    };
    // 2 replicas of 2, 3, then 4 micro-batches (one more every 4 of the ramp's 8 sequences,
    // consumed 0, 4, 10), or of 4 then 6 (two more every 8: consumed 0, 8, 20), on data
    // parallelism alone (overlapping its gradient sums) and on whole meshes: 1F1B, and DualPipe,
    // whose counts must be even.
    let one = BatchRamp { start: 2, increment: 1, sequences: 8 };
    let two = BatchRamp { start: 4, increment: 2, sequences: 8 };
    let pipelined = Mesh { dp: 2, ep: 2, pp: 2, schedule: Method::OneFOneB, ep_nodes: 1 };
    let dualpipe = Mesh { schedule: Method::DualPipe, ..pipelined };
    let cases = [
        (Mesh { dp: 2, ..Mesh::default() }, one, 4, [4, 6, 8]),
        (pipelined, one, 4, [4, 6, 8]),
        (dualpipe, two, 6, [8, 12, 12]),
    ];
    for (mesh, ramp, grad_accum, global) in cases {
        let ranks = run_with(mesh, DataParallelConfig::default(), STEPS, |t| {
            t.config.grad_accum = grad_accum;
            t.config.batch_ramp = Some(ramp);
        });
        let tokens: Vec<usize> = ranks[0].metrics.iter().map(|m| m.tokens).collect();
        let counts: Vec<usize> = tokens.iter().map(|&x| x * global[0] / tokens[0]).collect();
        assert_eq!(counts, global, "{mesh}: global micro-batches");
        assert_same_steps(&ranks[0], &by_hand(global), &format!("{mesh}, ramped"));
    }

    // After a warmup of one step the schedule counts the mesh's sequences, over its dp replicas
    // (a pipeline's stages hold parts of one replica): consumed 4 then 10 of the run's 18.
    let clocked = |t: &mut Trainer| {
        t.config.grad_accum = 4;
        t.config.batch_ramp = Some(one);
        t.config.warmup = 1;
    };
    let ranks = run_with(pipelined, DataParallelConfig::default(), STEPS, clocked);
    let mut t = trainer(4, walk());
    clocked(&mut t);
    let cfg = t.config;
    assert_eq!((0..=STEPS).map(|s| cfg.sequences_in(s, 2)).collect::<Vec<_>>(), [0, 4, 10, 18]);
    for m in &ranks[0].metrics {
        assert_eq!(m.lr, cfg.lr_at(m.step, cfg.sequences_in(m.step, 2), 2), "step {}", m.step);
    }
    let one_replica = cfg.lr_at(2, cfg.sequences_in(2, 1), 1);
    assert_ne!(ranks[0].metrics[2].lr, one_replica, "the clock counts both replicas' sequences");

    // DualPipe refuses a ramp with an odd count on the way (4, 5, 6), naming it.
    let comm = LocalComm::single();
    let mut t = trainer(6, walk());
    t.config.batch_ramp = Some(BatchRamp { start: 4, increment: 1, sequences: 8 });
    let err = ParallelTrainer::new(t, &comm, dualpipe, DataParallelConfig::default()).unwrap_err().to_string();
    assert!(err.contains("batch ramp") && err.contains("takes 5") && err.contains("DualPipe"), "{err}");
}

#[test]
fn fp8_training_under_expert_parallelism_takes_one_ranks_step_to_fp8_rounding() {
    // FP8 GEMMs quantise activations in 1x128 tiles along a token's features, so the forward and
    // the input gradients of each token are the same bits wherever its expert runs. A weight
    // gradient quantises its operands along the tokens instead (128 tokens a tile, TR 3.3.2),
    // and under expert parallelism a routed expert's tokens arrive from both replicas in one
    // batch, tiled otherwise than one rank's micro-batches: those gradients agree to E4M3's
    // rounding (at most 1/16 relative; measured 0.9-2.5% RMS). Every other gradient is computed on the
    // micro-batches one rank takes, as the plain mesh's are (2e-5 of its largest entry: the
    // clip coefficient, from the whole norm, moves them all by 2e-6).
    use whale_parallel::trainer::Precision;
    let fp8 = |t: &mut Trainer| {
        t.config.precision = Precision::Fp8;
        Precision::Fp8.apply(&mut t.model);
    };
    let mut t = trainer(GLOBAL_MICRO, walk());
    fp8(&mut t);
    let metrics = vec![t.train_step().unwrap()];
    let single = outcome(&t, metrics, first_moments(&t));
    let ranks = run_with(Mesh { dp: 2, ep: 2, ..Mesh::default() }, DataParallelConfig::default(), 1, fp8);
    let mesh = &ranks[0];
    let (loss, want) = (mesh.metrics[0].loss, single.metrics[0].loss);
    assert!((loss - want).abs() <= 1e-5 * want, "loss {loss} vs one rank's {want}");
    let (mut routed, mut ones_apart) = (0, 0);
    assert_eq!(mesh.first_gradient.len(), single.first_gradient.len(), "parameters with AdamW state");
    for ((name, x), (_, y)) in mesh.first_gradient.iter().zip(&single.first_gradient) {
        let scale = y.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-12);
        let worst = x.iter().zip(y).fold(0.0f32, |m, (p, q)| m.max((p - q).abs()));
        if !name.contains(".mlp.experts.") {
            assert!(worst <= 2e-5 * scale, "{name}: off by {worst} (scale {scale})");
            continue;
        }
        let sq = |v: &mut dyn Iterator<Item = f32>| v.map(|d| d as f64 * d as f64).sum::<f64>();
        let off = (sq(&mut x.iter().zip(y).map(|(p, q)| p - q)) / sq(&mut y.iter().copied()).max(1e-60)).sqrt();
        assert!(off <= 1.0 / 16.0, "{name}: {off:.3} RMS from one rank's");
        routed += 1;
        ones_apart += (worst > 2e-5 * scale) as usize;
    }
    // Every routed expert was compared; some show the other tiling (they ran under expert
    // parallelism), the rest saw one replica's tokens alone.
    let c = DeepSeekV3Config::tiny();
    let moe_layers = (0..c.num_hidden_layers + c.num_nextn_predict_layers).filter(|&i| c.is_moe_layer(i)).count();
    assert_eq!(routed, moe_layers * c.n_routed_experts * 3, "every routed expert's 3 projections");
    assert!(ones_apart > 0, "no routed expert's gradient shows the other tiling");
}
