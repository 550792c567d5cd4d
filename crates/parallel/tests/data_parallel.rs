//! Data parallelism: N ranks on LocalComm take the steps one rank takes on the whole batch, with
//! and without ZeRO-1, overlap and bucket rebuilding; the balancing biases agree across ranks.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use whale_model::tensor::Rng;
use whale_model::{DeepSeekV3, DeepSeekV3Config};
use whale_parallel::comm::{Comm, LocalComm};
use whale_parallel::data_parallel::{DataParallelConfig, DataParallelTrainer, ShardedData};
use whale_parallel::trainer::{DataSource, StepMetrics, TokenWalk, TrainConfig, Trainer};
use whale_parallel::Result;

const STEPS: u64 = 3;
/// Sequences per optimizer step, over all ranks.
const GLOBAL_BATCH: usize = 4;

fn walk() -> Box<dyn DataSource> {
    Box::new(TokenWalk { rng: Rng::new(5), vocab: 64, max_step: 3 })
}

fn config(micro_batch: usize, grad_accum: usize) -> TrainConfig {
    TrainConfig {
        steps: STEPS,
        micro_batch,
        grad_accum,
        seq_len: 16,
        lr: 3e-3,
        min_lr: 3e-4,
        warmup: 2,
        ..TrainConfig::default()
    }
}

fn trainer(micro_batch: usize, grad_accum: usize, data: Box<dyn DataSource>) -> Trainer {
    Trainer::new(DeepSeekV3::new(DeepSeekV3Config::tiny(), 11).unwrap(), config(micro_batch, grad_accum), data).unwrap()
}

/// What a run ends with: weights and buffers (the balancing biases) by name, AdamW state by name,
/// and the step metrics.
struct Outcome {
    weights: Vec<(String, Vec<f32>)>,
    optimizer: Vec<(String, Vec<f32>)>,
    metrics: Vec<StepMetrics>,
}

fn outcome(t: &Trainer, metrics: Vec<StepMetrics>) -> Outcome {
    let mut weights: Vec<_> = t.model.params.iter().map(|(n, p)| (n.to_string(), p.to_vec_f32().unwrap())).collect();
    weights.extend(t.model.buffers.iter().map(|(n, b)| (n.clone(), b.to_vec_f32().unwrap())));
    let optimizer = t.opt.state_tensors().unwrap().into_iter().map(|(n, s)| (n, s.to_vec_f32().unwrap())).collect();
    Outcome { weights, optimizer, metrics }
}

/// One rank's run over the same stream, computed once per (micro_batch, grad_accum) and shared
/// by the tests.
fn one_rank(micro_batch: usize, grad_accum: usize) -> &'static Outcome {
    static RUNS: Mutex<BTreeMap<(usize, usize), &'static Outcome>> = Mutex::new(BTreeMap::new());
    let mut runs = RUNS.lock().unwrap_or_else(|e| e.into_inner());
    runs.entry((micro_batch, grad_accum)).or_insert_with(|| {
        let mut t = trainer(micro_batch, grad_accum, walk());
        let metrics = (0..STEPS).map(|_| t.train_step().unwrap()).collect();
        Box::leak(Box::new(outcome(&t, metrics)))
    })
}

fn ranks(world: usize, grad_accum: usize, dp: DataParallelConfig) -> Vec<Outcome> {
    let micro = GLOBAL_BATCH / world / grad_accum;
    LocalComm::run(world, |comm| {
        let data = Box::new(ShardedData { inner: walk(), rank: comm.rank(), world });
        let mut t = DataParallelTrainer::new(trainer(micro, grad_accum, data), comm, dp.clone()).unwrap();
        let metrics = (0..STEPS).map(|_| t.train_step().unwrap()).collect();
        t.sync_optimizer().unwrap();
        outcome(&t.trainer, metrics)
    })
}

fn bits(w: &[(String, Vec<f32>)]) -> Vec<u32> {
    w.iter().flat_map(|(_, v)| v.iter().map(|x| x.to_bits())).collect()
}

/// Small buckets, so a tiny model has several (about 20) and rebuilding moves parameters.
fn dp(zero1: bool) -> DataParallelConfig {
    DataParallelConfig { bucket_bytes: 256 << 10, zero1, ..DataParallelConfig::default() }
}

/// `a` equals `b` up to the reassociation of sums over the batch.
///
/// One rank on the concatenated batch sums each weight's gradient over 4 sequences in one
/// reduction, the ranks over their shares and then across ranks: the gradients agree to f32
/// rounding (~1e-7 relative), the losses to 1e-6. AdamW then divides by the gradient's magnitude,
/// so an element whose gradient is itself at rounding level can move by a good part of a step
/// (lr = 3e-3) one way or the other. So: losses and gradient norms to 1e-5 relative, at most
/// 0.1% of the weights more than 1e-6 apart (measured: 145 and 211 of 1.3M for 2 and 4 ranks),
/// none more than lr / 10 (measured: 4.8e-5 and 7.7e-5). A rank that dropped the others'
/// gradients, or a wrong average, fails the first two.
fn assert_close(a: &Outcome, b: &Outcome, what: &str) {
    for (x, y) in a.metrics.iter().zip(&b.metrics) {
        assert!((x.loss - y.loss).abs() <= 1e-5 * y.loss, "{what}: step {} loss {} vs {}", x.step, x.loss, y.loss);
        let (gx, gy) = (x.grad_norm, y.grad_norm);
        assert!((gx - gy).abs() <= 1e-5 * gy, "{what}: step {} gradient norm {gx} vs {gy}", x.step);
    }
    let (mut worst, mut off, mut n) = (0.0f32, 0, 0);
    for ((na, va), (nb, vb)) in a.weights.iter().zip(&b.weights) {
        assert_eq!(na, nb);
        for (x, y) in va.iter().zip(vb) {
            worst = worst.max((x - y).abs());
            off += ((x - y).abs() > 1e-6) as usize;
            n += 1;
        }
    }
    assert!(off * 1000 <= n, "{what}: {off} of {n} weights differ by more than 1e-6");
    assert!(worst <= 3e-4, "{what}: a weight differs by {worst}");
}

fn biases(o: &Outcome) -> Vec<&[f32]> {
    o.weights.iter().filter(|(n, _)| n.ends_with("e_score_correction_bias")).map(|(_, v)| v.as_slice()).collect()
}

/// N ranks with one micro-batch each are bit for bit one rank accumulating the same N
/// micro-batches (each rank's gradient summed in rank order then scaled by 1/N, exactly as the
/// accumulation adds loss-scaled gradients, N being a power of two), and close to one rank on the
/// 4 sequences as one micro-batch. With ZeRO-1 too: the shards' AdamW is the same arithmetic, and
/// the clipping norm (an f64 sum in another order) rounds to the same f32 coefficient.
fn check_world(world: usize, zero1: bool) {
    let runs = ranks(world, 1, dp(zero1));
    let accumulated = one_rank(GLOBAL_BATCH / world, world);
    let concatenated = one_rank(GLOBAL_BATCH, 1);
    let what = format!("{world} ranks, zero1 {zero1}");
    for (r, run) in runs.iter().enumerate() {
        assert!(bits(&run.weights) == bits(&accumulated.weights), "{what}: rank {r} weights differ from accumulation");
        assert!(bits(&run.optimizer) == bits(&accumulated.optimizer), "{what}: rank {r} AdamW state differs");
        assert_close(run, concatenated, &what);
    }
    // The biases moved, by the global load: equal on every rank and to one rank's.
    let b0 = biases(&runs[0]);
    assert!(!b0.is_empty() && b0.iter().any(|b| b.iter().any(|&x| x != 0.0)), "the balancing biases should move");
    for run in &runs[1..] {
        assert_eq!(biases(run), b0);
    }
    assert_eq!(biases(accumulated), b0);
    let (l0, la) = (&runs[0].metrics[2].expert_load, &accumulated.metrics[2].expert_load);
    assert_eq!(l0, la, "{what}: the reported load is the global one");
}

#[test]
fn two_and_four_ranks_take_one_rank_steps_on_the_whole_batch() {
    check_world(2, false);
    check_world(4, false);
}

#[test]
fn zero1_shards_take_the_same_steps() {
    check_world(2, true);
    check_world(4, true);
}

#[test]
fn overlap_and_buckets_change_no_bits_and_accumulation_stays_close() {
    // Two micro-batches per rank: the sum over the four micro-batches is reassociated
    // ((g0 + g2) + (g1 + g3) against ((g0 + g1) + g2) + g3), so only close to one rank's.
    let overlapped = ranks(2, 2, dp(false));
    let serial = ranks(2, 2, DataParallelConfig { overlap: false, bucket_bytes: 64 << 20, ..dp(false) });
    let zero1 = ranks(2, 2, DataParallelConfig { overlap: false, ..dp(true) });
    for run in overlapped.iter().chain(&serial).chain(&zero1) {
        assert!(bits(&run.weights) == bits(&overlapped[0].weights), "bucketing and overlap change no bits");
    }
    assert_close(&overlapped[0], one_rank(1, 4), "2 ranks x 2 micro-batches");
}

#[test]
fn a_world_of_one_is_the_plain_trainer() {
    let comm = LocalComm::single();
    let mut t = DataParallelTrainer::new(trainer(2, 2, walk()), &comm, dp(true)).unwrap();
    assert_eq!(comm.world_size(), 1);
    let metrics = (0..STEPS).map(|_| t.train_step().unwrap()).collect();
    t.sync_optimizer().unwrap();
    let run = outcome(&t.trainer, metrics);
    let plain = one_rank(2, 2);
    assert!(bits(&run.weights) == bits(&plain.weights));
    assert!(bits(&run.optimizer) == bits(&plain.optimizer));
}

#[test]
fn rank_zero_keeps_the_moving_average_of_the_weights_all_ranks_hold() {
    // Every rank ends each step with the same weights (two ranks of one micro-batch are one rank
    // accumulating both, bit for bit): rank 0's average is the run's, across a checkpoint too,
    // and the other ranks keep none.
    let averaged = |micro, accum, data| {
        let cfg = TrainConfig { ema_decay: Some(0.75), ..config(micro, accum) };
        Trainer::new(DeepSeekV3::new(DeepSeekV3Config::tiny(), 11).unwrap(), cfg, data).unwrap()
    };
    let average_bits = |t: &Trainer| -> Option<Vec<u32>> {
        let average = t.ema()?.average().unwrap();
        Some(average.values().flat_map(|a| a.to_vec_f32().unwrap()).map(f32::to_bits).collect())
    };
    let mut one = averaged(2, 2, walk());
    (0..STEPS).for_each(|_| drop(one.train_step().unwrap()));
    let want = average_bits(&one).unwrap();

    let dir = whale_model::tensor::testing::TempDir::new("dp-ema");
    let ckpt = dir.join("checkpoint");
    let data = |rank| Box::new(ShardedData { inner: walk(), rank, world: 2 });
    LocalComm::run(2, |comm| {
        let mut t = DataParallelTrainer::new(averaged(2, 1, data(comm.rank())), comm, dp(true)).unwrap();
        t.train_step().unwrap();
        t.save_checkpoint(&ckpt).unwrap();
    });
    assert!(ckpt.join("ema.safetensors").exists(), "rank 0 writes its average");
    let resumed = LocalComm::run(2, |comm| {
        let t = Trainer::resume(&ckpt, data(comm.rank()), None).unwrap();
        let mut t = DataParallelTrainer::new(t, comm, dp(true)).unwrap();
        (1..STEPS).for_each(|_| drop(t.train_step().unwrap()));
        average_bits(&t.trainer)
    });
    assert!(resumed[0].as_ref() == Some(&want), "rank 0's average is one rank's");
    assert!(resumed[1].is_none(), "rank 1 keeps none");
}

#[test]
fn a_zero1_checkpoint_resumes_bit_identically() {
    let dir = std::env::temp_dir().join(format!("whale-dp-{}", std::process::id()));
    let ckpt = dir.join("checkpoint");
    let data = |rank| Box::new(ShardedData { inner: walk(), rank, world: 2 });
    let straight = LocalComm::run(2, |comm| {
        let mut t = DataParallelTrainer::new(trainer(2, 1, data(comm.rank())), comm, dp(true)).unwrap();
        for _ in 0..2 {
            t.train_step().unwrap();
        }
        t.save_checkpoint(&ckpt).unwrap();
        let metrics = vec![t.train_step().unwrap()];
        t.sync_optimizer().unwrap();
        outcome(&t.trainer, metrics)
    });
    let resumed = LocalComm::run(2, |comm| {
        let t = Trainer::resume(&ckpt, data(comm.rank()), None).unwrap();
        assert_eq!(t.step, 2);
        let mut t = DataParallelTrainer::new(t, comm, dp(true)).unwrap();
        let metrics = vec![t.train_step().unwrap()];
        t.sync_optimizer().unwrap();
        outcome(&t.trainer, metrics)
    });
    let _ = std::fs::remove_dir_all(&dir);
    for (a, b) in straight.iter().zip(&resumed) {
        assert!(bits(&a.weights) == bits(&b.weights), "weights after resuming");
        assert!(bits(&a.optimizer) == bits(&b.optimizer), "AdamW state after resuming");
        assert_eq!(a.metrics[0].loss, b.metrics[0].loss);
    }
}

/// A stream that panics on its `at`-th batch (from 1).
struct PanicsAt {
    inner: Box<dyn DataSource>,
    calls: usize,
    at: usize,
}

impl DataSource for PanicsAt {
    fn next_batch(
        &mut self,
        batch: usize,
        seq: usize,
    ) -> Result<(whale_model::tensor::Tensor, whale_model::tensor::Tensor)> {
        self.calls += 1;
        assert!(self.calls != self.at, "the data source fails");
        self.inner.next_batch(batch, seq)
    }
    fn state(&self) -> serde_json::Value {
        self.inner.state()
    }
    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        self.inner.restore(state)
    }
}

#[test]
fn a_last_micro_batch_that_panics_unwinds_the_step_instead_of_hanging_the_reducer() {
    // The last micro-batch runs beside the thread that reduces its gradients as they become
    // final; when it panics, the reducer must stop (it would otherwise wait for gradients that
    // never come, and the step for the reducer).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let unwound = LocalComm::run(2, |comm| {
            let data = Box::new(PanicsAt { inner: walk(), calls: 0, at: 2 });
            let mut t = DataParallelTrainer::new(trainer(1, 2, data), comm, dp(false)).unwrap();
            assert!(t.config().overlap);
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| t.train_step())).is_err()
        });
        let _ = tx.send(unwound);
    });
    let unwound = rx.recv_timeout(Duration::from_secs(60)).expect("the step hung");
    assert_eq!(unwound, [true, true], "the panic reaches each rank's caller");
}

/// The gradient buckets follow rank 0's order: a rank whose model is a copy (its tensors made
/// in name order, not construction order) trains the same bits; a rank with other parameters is
/// an error, not gradients added into the wrong tensors.
#[test]
fn ranks_bucket_in_one_order_and_must_hold_the_same_parameters() {
    let (world, micro) = (2, GLOBAL_BATCH / 2);
    let run = |copy_on_rank_1: bool| {
        LocalComm::run(world, |comm| {
            let data = Box::new(ShardedData { inner: walk(), rank: comm.rank(), world });
            let mut model = DeepSeekV3::new(DeepSeekV3Config::tiny(), 11).unwrap();
            if copy_on_rank_1 && comm.rank() == 1 {
                model = model.duplicate().unwrap();
            }
            let t = Trainer::new(model, config(micro, 1), data).unwrap();
            let mut t = DataParallelTrainer::new(t, comm, dp(false)).unwrap();
            let metrics = (0..STEPS).map(|_| t.train_step().unwrap()).collect();
            outcome(&t.trainer, metrics)
        })
    };
    let (plain, copied) = (run(false), run(true));
    for (a, b) in plain.iter().zip(&copied) {
        assert!(bits(&a.weights) == bits(&b.weights), "a copied model trains the same bits");
    }
    let errors = LocalComm::run(world, |comm| {
        let mut cfg = DeepSeekV3Config::tiny();
        if comm.rank() == 1 {
            cfg.moe_intermediate_size += 8;
        }
        let data = Box::new(ShardedData { inner: walk(), rank: comm.rank(), world });
        let t = Trainer::new(DeepSeekV3::new(cfg, 11).unwrap(), config(micro, 1), data).unwrap();
        DataParallelTrainer::new(t, comm, dp(false)).err().map(|e| e.to_string())
    });
    for e in &errors {
        assert!(e.as_deref().is_some_and(|e| e.contains("differ from another rank's")), "{errors:?}");
    }
}
