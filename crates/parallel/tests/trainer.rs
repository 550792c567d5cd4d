//! The trainer: resume is bit-identical, checkpoints survive an interrupted swap, non-finite
//! values are caught and located, gradient accumulation matches one big batch, bf16 trains, FP8
//! trains within 1% of fp32.

use serde_json::Value;
use whale_model::tensor::fp8::Fp8Recipe;
use whale_model::tensor::optim::{DeepSeekV3Schedule, LrSchedule};
use whale_model::tensor::testing::TempDir;
use whale_model::tensor::{Rng, Tensor};
use whale_model::{DeepSeekV3, DeepSeekV3Config};
use whale_parallel::trainer::{
    DataSource, LrShape, NonFinitePolicy, Precision, TokenWalk, TrainConfig, Trainer, MAX_SKIPS_IN_A_ROW,
};
use whale_parallel::Error;

fn data(seed: u64) -> Box<dyn DataSource> {
    Box::new(TokenWalk { rng: Rng::new(seed), vocab: 64, max_step: 1 })
}

fn config(steps: u64) -> TrainConfig {
    TrainConfig { steps, micro_batch: 4, seq_len: 16, lr: 3e-3, min_lr: 3e-4, warmup: 2, ..TrainConfig::default() }
}

fn trainer(steps: u64) -> Trainer {
    Trainer::new(DeepSeekV3::new(DeepSeekV3Config::tiny(), 11).unwrap(), config(steps), data(5)).unwrap()
}

fn bits(t: &Trainer) -> Vec<u32> {
    let mut v: Vec<u32> = t.model.params.iter().flat_map(|(_, p)| p.to_vec_f32().unwrap()).map(f32::to_bits).collect();
    v.extend(t.model.buffers.values().flat_map(|b| b.to_vec_f32().unwrap()).map(f32::to_bits));
    v
}

fn tmpdir(name: &str) -> TempDir {
    TempDir::new(&format!("trainer-{name}"))
}

#[test]
fn resumed_run_is_bit_identical_and_loss_falls() {
    let mut straight = trainer(8);
    let mut losses = Vec::new();
    while !straight.done() {
        losses.push(straight.train_step().unwrap().loss);
    }
    assert!(losses[7] < losses[0], "loss should fall: {losses:?}");

    let dir = tmpdir("resume");
    let ckpt = dir.join("checkpoint");
    let metrics = dir.join("metrics.jsonl");
    let mut first = trainer(8);
    first.log_metrics_to(&metrics).unwrap();
    for _ in 0..4 {
        first.train_step().unwrap();
    }
    first.save_checkpoint(&ckpt).unwrap();
    // The interrupted run went on and logged a step past the checkpoint; resume drops it.
    first.train_step().unwrap();
    drop(first);
    let mut resumed = Trainer::resume(&ckpt, data(999), Some(&metrics)).unwrap();
    assert_eq!(resumed.step, 4);
    while !resumed.done() {
        resumed.train_step().unwrap();
    }
    assert_eq!(bits(&straight), bits(&resumed));
    let steps: Vec<u64> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (0..8).collect::<Vec<_>>());
}

#[test]
fn an_interrupted_checkpoint_swap_leaves_a_loadable_checkpoint() {
    let dir = tmpdir("swap");
    let ckpt = dir.join("checkpoint");
    let mut t = trainer(4);
    t.train_step().unwrap();
    t.save_checkpoint(&ckpt).unwrap();
    // Crash after the old checkpoint moved aside, before the new one moved in.
    std::fs::rename(&ckpt, dir.join("checkpoint.old")).unwrap();
    std::fs::create_dir_all(dir.join("checkpoint.tmp")).unwrap();
    std::fs::write(dir.join("checkpoint.tmp/model.safetensors"), b"half a file").unwrap();
    let r = Trainer::resume(&ckpt, data(5), None).unwrap();
    assert_eq!(r.step, 1);
    // The next save cleans up and replaces both.
    r.save_checkpoint(&ckpt).unwrap();
    assert!(
        ckpt.join("trainer.json").exists()
            && !dir.join("checkpoint.old").exists()
            && !dir.join("checkpoint.tmp").exists()
    );
    assert!(Trainer::resume(&dir.join("nothing"), data(5), None).is_err());
}

#[test]
fn non_finite_values_are_located_and_skipped_or_stopped() {
    let mut t = trainer(20);
    assert_eq!(t.config.on_non_finite, NonFinitePolicy::Stop, "stopping is the default");
    t.config.on_non_finite = NonFinitePolicy::Skip;
    let w = t.model.params.get("model.layers.2.self_attn.o_proj.weight").unwrap().clone();
    w.with_f32_mut(|v| v[3] = f32::NAN).unwrap();
    let before = bits(&t);
    let m = t.train_step().unwrap();
    assert!(m.skipped);
    // Nothing was updated (the NaN weight itself compares by bits).
    assert_eq!(before, bits(&t));
    t.config.on_non_finite = NonFinitePolicy::Stop;
    match t.train_step() {
        Err(Error::NonFinite { step, what, location }) => {
            assert_eq!((step, what.as_str(), location.as_str()), (1, "loss", "model.layers.2"));
        }
        other => panic!("expected a non-finite error, got {other:?}"),
    }
    // Skipping has a limit: a model that stays non-finite stops the run.
    t.config.on_non_finite = NonFinitePolicy::Skip;
    let mut skipped = 0;
    let err = loop {
        match t.train_step() {
            Ok(m) => {
                assert!(m.skipped);
                skipped += 1;
            }
            Err(e) => break e,
        }
    };
    // Two non-finite steps in a row already (the skipped one and the stopped one); seven more
    // are skipped and the tenth stops.
    assert_eq!(skipped, MAX_SKIPS_IN_A_ROW - 3);
    assert!(err.to_string().contains("in a row"), "{err}");
}

#[test]
fn gradient_accumulation_equals_one_large_batch() {
    // Same 8 sequences as one micro-batch of 8, or two of 4 with accumulation: the accumulated
    // gradients agree to f32 reassociation. (Parameters after an AdamW step are the wrong thing
    // to compare: Adam divides by |g|, so a gradient near zero turns rounding into a full step.)
    let mk = |micro: usize, accum: usize| {
        let cfg = TrainConfig { micro_batch: micro, grad_accum: accum, ..config(1) };
        let mut c = DeepSeekV3Config::tiny();
        c.num_nextn_predict_layers = 0; // MTP losses are normalised per micro-batch token count
        c.seq_aux_alpha = 0.0;
        let mut t = Trainer::new(DeepSeekV3::new(c, 3).unwrap(), cfg, data(9)).unwrap();
        let acc = t.accumulate_gradients().unwrap();
        let grads: Vec<f32> =
            t.model.params.iter().flat_map(|(_, p)| p.grad().unwrap().to_vec_f32().unwrap()).collect();
        (acc, grads)
    };
    let (a, ga) = mk(8, 1);
    let (b, gb) = mk(4, 2);
    assert!((a.loss - b.loss).abs() < 1e-6 * a.loss, "{} vs {}", a.loss, b.loss);
    assert_eq!(a.loads, b.loads);
    let scale = ga.iter().fold(0.0f32, |m, g| m.max(g.abs()));
    for (i, (x, y)) in ga.iter().zip(&gb).enumerate() {
        assert!((x - y).abs() <= 1e-5 * scale + 1e-4 * y.abs(), "gradient element {i}: {x} vs {y}");
    }
}

#[test]
fn bf16_compute_gives_fp32s_first_loss_and_gradients_to_its_rounding() {
    // Before any update the weights are the same: only bf16's rounding separates the two.
    let first = |precision| {
        let cfg = TrainConfig { precision, ..config(1) };
        let mut t = Trainer::new(DeepSeekV3::new(DeepSeekV3Config::tiny(), 11).unwrap(), cfg, data(5)).unwrap();
        let acc = t.accumulate_gradients().unwrap();
        let grads: Vec<(String, Vec<f32>)> =
            t.model.params.iter().filter_map(|(n, p)| Some((n.to_string(), p.grad()?.to_vec_f32().unwrap()))).collect();
        (acc.loss, grads)
    };
    let ((lf, gf), (lb, gb)) = (first(Precision::Fp32), first(Precision::Bf16));
    // bf16 keeps 8 mantissa bits (~4e-3 per op), averaged over the tokens in the loss: measured
    // 3.4e-5 relative for the loss and at most 2.2e-2 (relative Frobenius) for a gradient. A
    // gradient dropped, doubled or mis-cast in the bf16 path is off by order 1.
    assert!((lf - lb).abs() < 1e-3 * lf, "first loss: fp32 {lf} vs bf16 {lb}");
    assert_eq!(gf.iter().map(|g| &g.0).collect::<Vec<_>>(), gb.iter().map(|g| &g.0).collect::<Vec<_>>());
    for ((name, x), (_, y)) in gf.iter().zip(&gb) {
        let diff = x.iter().zip(y).map(|(a, b)| (a - b).powi(2)).sum::<f32>().sqrt();
        let norm = x.iter().map(|a| a * a).sum::<f32>().sqrt();
        assert!(diff <= 5e-2 * norm + 1e-6, "{name}: bf16 gradient {} from fp32's (relative)", diff / norm);
    }
}

#[test]
fn bf16_compute_trains_close_to_fp32() {
    let run = |precision| {
        let mut t = Trainer::new(
            DeepSeekV3::new(DeepSeekV3Config::tiny(), 11).unwrap(),
            TrainConfig { precision, ..config(6) },
            data(5),
        )
        .unwrap();
        (0..6).map(|_| t.train_step().unwrap().loss).collect::<Vec<f64>>()
    };
    let (f, b) = (run(Precision::Fp32), run(Precision::Bf16));
    assert!(b[5] < b[0], "bf16 loss falls: {b:?}");
    // bf16 keeps 8 mantissa bits: per-op relative rounding ~4e-3; the losses stay within a few %.
    for (x, y) in f.iter().zip(&b) {
        assert!((x - y).abs() < 0.05 * x, "{f:?} vs {b:?}");
    }
    assert!(f.iter().zip(&b).any(|(x, y)| x != y), "bf16 must actually round");
}

/// Spec 4.2's validation at our scale: the `tiny` preset trained for 300 steps in FP8 (bf16
/// activations, E4M3 GEMMs with 1x128 / 128x128 scales) and in fp32 from the same seed and data
/// ends within 1% relative loss (V3 reports under 0.25% at 16B-230B scale; `cargo xtask bench fp8`
/// writes the curves and measured +0.88% training / +0.39% held-out on its walk).
///
/// The data is a walk of steps of 1 or 2, whose entropy (ln 2 = 0.693 nats per token) the loss
/// approaches (0.77 here): compared mid-descent, runs of any two precisions drift apart by a few
/// percent (bf16 alone does) because a small change early shifts the whole curve, and a
/// comparison there would measure that, not the precision.
#[test]
fn fp8_training_ends_within_one_percent_of_fp32() {
    let steps = 300;
    let run = |precision| {
        let t0 = std::time::Instant::now();
        let cfg = TrainConfig { precision, ..config(steps) };
        let walk = |seed| TokenWalk { rng: Rng::new(seed), vocab: 64, max_step: 2 };
        let mut t =
            Trainer::new(DeepSeekV3::new(DeepSeekV3Config::tiny(), 11).unwrap(), cfg, Box::new(walk(5))).unwrap();
        // The precision reaches the model: FP8 GEMMs on (bf16 compute alone would also move
        // the losses), with the recipe's 1x128 / 128x128 online scaling.
        let want = (precision == Precision::Fp8).then(Fp8Recipe::default);
        assert_eq!(t.model.fp8(), want, "{precision:?}: the model's FP8 GEMMs");
        let losses: Vec<f64> = (0..steps).map(|_| t.train_step().unwrap().main_loss).collect();
        let held_out = t.held_out_loss(&mut walk(1234), 32).unwrap();
        eprintln!("{precision:?}: {:.1} s", t0.elapsed().as_secs_f64());
        (losses, held_out)
    };
    // Side by side: the two runs are independent, and FP8's is most of this binary's time.
    let ((f, hf), (q, hq)) = std::thread::scope(|s| {
        let fp8 = s.spawn(|| run(Precision::Fp8));
        (run(Precision::Fp32), fp8.join().expect("the FP8 run"))
    });
    // The mean of the last 20 steps: one step's loss carries its batch's noise.
    let tail = |v: &[f64]| v[v.len() - 20..].iter().sum::<f64>() / 20.0;
    let (lf, lq) = (tail(&f), tail(&q));
    eprintln!("training: fp32 {lf:.4}, fp8 {lq:.4}; held-out: fp32 {hf:.4}, fp8 {hq:.4}");
    assert!(lf < 0.85, "fp32 nears the walk's entropy: {} -> {lf}", f[0]);
    assert!((lq - lf).abs() < 0.01 * lf, "training loss: fp8 {lq} vs fp32 {lf}");
    assert!((hq - hf).abs() < 0.01 * hf, "held-out loss: fp8 {hq} vs fp32 {hf}");
    assert!(f.iter().zip(&q).any(|(a, b)| a != b), "fp8 must actually quantize");
}

#[test]
fn balancing_biases_stop_moving_at_freeze_bias_at() {
    let cfg = TrainConfig { freeze_bias_at: Some(2), ..config(4) };
    let mut t = Trainer::new(DeepSeekV3::new(DeepSeekV3Config::tiny(), 11).unwrap(), cfg, data(5)).unwrap();
    let biases = |t: &Trainer| -> Vec<u32> {
        let b: Vec<&Tensor> =
            t.model.buffers.iter().filter(|(n, _)| n.ends_with("e_score_correction_bias")).map(|(_, b)| b).collect();
        assert!(!b.is_empty());
        b.iter().flat_map(|b| b.to_vec_f32().unwrap()).map(f32::to_bits).collect()
    };
    let mut seen = vec![biases(&t)];
    while !t.done() {
        t.train_step().unwrap();
        seen.push(biases(&t));
    }
    // Steps 0 and 1 move them (the loads are never perfectly even), steps 2 and 3 do not.
    assert_ne!(seen[0], seen[1]);
    assert_ne!(seen[1], seen[2]);
    assert_eq!(seen[2], seen[3]);
    assert_eq!(seen[3], seen[4]);
}

#[test]
fn the_learning_rate_and_the_mtp_weight_follow_their_schedules() {
    let cfg = TrainConfig { lr_schedule: LrShape::DeepseekV3, mtp_weight_from: Some((3, 0.1)), ..config(15) };
    let model = DeepSeekV3::new(DeepSeekV3Config::tiny(), 11).unwrap();
    let configured = model.config.mtp_loss_weight;
    assert_eq!(configured, 0.3);
    let mut t = Trainer::new(model, cfg, data(5)).unwrap();
    let want = DeepSeekV3Schedule::shaped(3e-3, 3e-4, 15, 2);
    let mut rates = Vec::new();
    while !t.done() {
        let m = t.train_step().unwrap();
        assert_eq!(m.lr, want.lr(m.step));
        rates.push(m.lr);
        let w = if m.step < 3 { 0.3 } else { 0.1 };
        assert_eq!(m.mtp_weight, Some(w), "step {}", m.step);
        // One MTP module: the loss is main + w x MTP + balance.
        let parts = m.main_loss + w * m.mtp_loss.unwrap() + m.aux_loss.unwrap_or(0.0);
        assert!((m.loss - parts).abs() < 1e-5 * m.loss, "step {}: {} vs {parts}", m.step, m.loss);
    }
    // 15 steps: warmup to the peak, held to step 10 (10/14.8 of the run), cosine down to
    // 3e-4 by step 14 (14.3/14.8); the tails are too short to show at this length.
    assert!(rates[1..=10].iter().all(|&r| r == 3e-3), "{rates:?}");
    assert!(rates[11] < 3e-3 && rates[13] > 3e-4 && rates[12] < rates[11], "{rates:?}");
    assert_eq!(rates[14], 3e-4);
    // The schedule's weight is the trainer's: config.json keeps the preset's.
    let dir = tmpdir("mtp-weight");
    t.save_checkpoint(&dir.join("checkpoint")).unwrap();
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("checkpoint/config.json")).unwrap()).unwrap();
    assert_eq!(json["mtp_loss_weight"], 0.3);
    let resumed = Trainer::resume(&dir.join("checkpoint"), data(5), None).unwrap();
    assert_eq!(resumed.config.mtp_weight_from, Some((3, 0.1)));
    assert_eq!(resumed.config.lr_schedule, LrShape::DeepseekV3);
    let bad = TrainConfig { mtp_weight_from: Some((3, f64::NAN)), ..config(4) };
    let err = Trainer::new(DeepSeekV3::new(DeepSeekV3Config::tiny(), 1).unwrap(), bad, data(1)).unwrap_err();
    assert!(err.to_string().contains("mtp_weight_from"), "{err}");
    // A micro-batch past what a batch may hold is refused at the check, not in its allocation.
    for micro_batch in [usize::MAX / 2, (1 << 31) / 16] {
        let err = TrainConfig { micro_batch, ..config(4) }.validate().unwrap_err().to_string();
        assert!(err.contains("`micro_batch`") && err.contains("rows of 16 tokens"), "{err}");
    }
    assert!(TrainConfig { micro_batch: (1 << 31) / 16 - 1, ..config(4) }.validate().is_ok());
}

/// Rows of `real` tokens of a walk, then padding (id 0, targets ignored), as the pretraining
/// corpus lays out one document per row.
struct Padded {
    walk: TokenWalk,
    real: usize,
}

impl DataSource for Padded {
    fn next_batch(&mut self, batch: usize, seq: usize) -> whale_parallel::Result<(Tensor, Tensor)> {
        let (ids, targets) = self.walk.next_batch(batch, seq)?;
        let (mut ids, mut targets) = (ids.to_vec_i64().unwrap(), targets.to_vec_i64().unwrap());
        for p in 0..batch * seq {
            if p % seq >= self.real {
                ids[p] = 0;
            }
            if p % seq + 1 >= self.real {
                targets[p] = whale_model::IGNORE_INDEX;
            }
        }
        let device = whale_model::tensor::Device::Cpu;
        Ok((Tensor::from_vec(ids, &[batch, seq], &device)?, Tensor::from_vec(targets, &[batch, seq], &device)?))
    }
    fn state(&self) -> Value {
        Value::Null
    }
    fn restore(&mut self, _: &Value) -> whale_parallel::Result<()> {
        Ok(())
    }
}

#[test]
fn the_expert_loads_count_real_tokens_not_padding() {
    let cfg = config(1);
    let (k, real) = (DeepSeekV3Config::tiny().num_experts_per_tok, 5);
    let walk = TokenWalk { rng: Rng::new(5), vocab: 64, max_step: 1 };
    let model = DeepSeekV3::new(DeepSeekV3Config::tiny(), 11).unwrap();
    let mut t = Trainer::new(model, cfg.clone(), Box::new(Padded { walk, real })).unwrap();
    let m = t.train_step().unwrap();
    assert_eq!(m.tokens, cfg.micro_batch * real, "tokens (and tokens/s) count real tokens");
    let trunk_moe = t.model.layers.iter().filter(|l| l.moe().is_some()).count();
    let (trunk, mtp) = m.expert_load.split_at(trunk_moe);
    for load in trunk {
        assert_eq!(load.iter().sum::<usize>(), cfg.micro_batch * real * k, "{load:?}");
    }
    // MTP depth 1 reads token i + 1 at position i: one real token fewer per row.
    for load in mtp {
        assert_eq!(load.iter().sum::<usize>(), cfg.micro_batch * (real - 1) * k, "{load:?}");
    }
    assert!(!mtp.is_empty());
}

#[test]
fn truncating_metrics_drops_a_torn_last_line_and_names_a_bad_one() {
    use whale_parallel::trainer::truncate_metrics;
    let dir = tmpdir("truncate");
    let path = dir.join("metrics.jsonl");
    truncate_metrics(&path, 3).unwrap();
    assert!(!path.exists(), "a missing file is no lines");
    std::fs::write(&path, "{\"step\": 0}\n\n{\"step\": 1}\n{\"step\": 2}\n{\"step\": 3, \"lo").unwrap();
    truncate_metrics(&path, 2).unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"step\": 0}\n{\"step\": 1}\n");
    std::fs::write(&path, "{\"step\": 0}\nnot json\n{\"step\": 1}\n").unwrap();
    let err = truncate_metrics(&path, 2).unwrap_err().to_string();
    assert!(err.contains("metrics.jsonl") && err.contains("line 2"), "{err}");
    assert!(std::fs::read_to_string(&path).unwrap().contains("not json"), "left as it was");
    // Torn is a last line without its newline, even cut inside a character; a bad last line that
    // ends with one was written whole, and is an error.
    let mut torn = b"{\"step\": 0}\n{\"step\": 1, \"name\": \"\xc3".to_vec();
    std::fs::write(&path, &torn).unwrap();
    truncate_metrics(&path, 5).unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"step\": 0}\n");
    torn.truncate(torn.len() - 1);
    torn.extend_from_slice(b"\n");
    std::fs::write(&path, &torn).unwrap();
    let err = truncate_metrics(&path, 5).unwrap_err().to_string();
    assert!(err.contains("line 2"), "{err}");
    // Bytes that are no UTF-8 inside the file are no torn write: an error, the file unchanged.
    std::fs::write(&path, b"{\"step\": 0, \"name\": \"\xff\"}\r\n{\"step\": 1}\r\n").unwrap();
    let err = truncate_metrics(&path, 5).unwrap_err().to_string();
    assert!(err.contains("line 1") && err.contains("utf-8"), "{err}");
    std::fs::write(&path, "{\"step\": 0}\r\n\r\n{\"step\": 1}\r\n").unwrap();
    truncate_metrics(&path, 1).unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"step\": 0}\n", "CRLF lines read");
    std::fs::write(&path, "{\"step\": 0}\n{\"loss\": 1.5}\n").unwrap();
    let err = truncate_metrics(&path, 5).unwrap_err().to_string();
    assert!(err.contains("line 2 is not a metrics line with a `step`"), "{err}");
}

#[test]
fn a_finite_loss_with_a_gradient_that_overflows_is_located_and_skipped_or_stopped() {
    // The head's weights at +-f32::MAX and the final norm's at 2e-39 keep the logits finite
    // (the tiny norm weight cancels the huge head), but on the first batch the final norm's
    // gradient, a sum of products of both orders of magnitude, overflows: the loss is finite, a
    // gradient is not. (Data-dependent: each trainer below takes that same first batch.)
    let poisoned = |policy: NonFinitePolicy| {
        let mut c = DeepSeekV3Config::tiny();
        c.num_nextn_predict_layers = 0; // the MTP head's own norm would send its logits to inf
        let cfg = TrainConfig { on_non_finite: policy, ..config(20) };
        let t = Trainer::new(DeepSeekV3::new(c, 11).unwrap(), cfg, data(5)).unwrap();
        let sign = |i: usize| if (i * 7919) % 3 == 0 { 1.0 } else { -1.0 };
        let head = t.model.params.get("lm_head.weight").unwrap();
        head.with_f32_mut(|v| v.iter_mut().enumerate().for_each(|(i, x)| *x = sign(i) * f32::MAX)).unwrap();
        t.model.params.get("model.norm.weight").unwrap().with_f32_mut(|v| v.fill(2e-39)).unwrap();
        t
    };
    let mut t = poisoned(NonFinitePolicy::Skip);
    let acc = t.accumulate_gradients().unwrap();
    assert!(acc.loss.is_finite() && acc.problem.is_none(), "a finite loss: {}", acc.loss);
    let norm_grad = t.model.params.get("model.norm.weight").unwrap().grad().unwrap().to_vec_f32().unwrap();
    assert!(norm_grad.iter().any(|g| !g.is_finite()), "the final norm's gradient overflows");

    let mut t = poisoned(NonFinitePolicy::Skip);
    let before = bits(&t);
    assert!(t.train_step().unwrap().skipped);
    assert_eq!(before, bits(&t), "a skipped step changes no weight");
    let mut t = poisoned(NonFinitePolicy::Stop);
    match t.train_step() {
        Err(Error::NonFinite { step, what, location }) => {
            assert_eq!((step, what.as_str(), location.as_str()), (0, "gradient", "model.norm"))
        }
        other => panic!("expected a non-finite gradient, got {other:?}"),
    }
    assert_eq!(before, bits(&t), "a stopped step changes no weight");
}

/// The parameters' values by name.
fn weights(params: &whale_model::tensor::ParamStore) -> Vec<(String, Vec<f32>)> {
    params.iter().map(|(n, p)| (n.to_string(), p.to_vec_f32().unwrap())).collect()
}

#[test]
fn the_parameters_moving_average_follows_the_steps_and_resumes_bit_for_bit() {
    let ema_config = |steps| TrainConfig { ema_decay: Some(0.75), ..config(steps) };
    let new = |steps| Trainer::new(DeepSeekV3::new(DeepSeekV3Config::tiny(), 11).unwrap(), ema_config(steps), data(5));
    // The average starts at the initial weights and blends each step's in: by hand, with the
    // weights after each step (decay 0.75, whose two factors are exact in f32).
    let mut t = new(3).unwrap();
    let mut want = weights(&t.model.params);
    while !t.done() {
        t.train_step().unwrap();
        for ((_, avg), (_, w)) in want.iter_mut().zip(weights(&t.model.params)) {
            avg.iter_mut().zip(w).for_each(|(a, p)| *a = 0.75 * *a + 0.25 * p);
        }
    }
    let average = t.ema_model().unwrap().expect("an EMA model");
    assert_eq!(weights(&average.params), want);
    assert!(weights(&average.params) != weights(&t.model.params), "the average trails the weights");
    assert!(trainer(1).ema_model().unwrap().is_none(), "no average unless asked for");

    // Checkpointed and resumed, it ends where an uninterrupted run's does.
    let mut straight = new(4).unwrap();
    while !straight.done() {
        straight.train_step().unwrap();
    }
    let dir = tmpdir("ema");
    let ckpt = dir.join("checkpoint");
    let mut first = new(4).unwrap();
    first.train_step().unwrap();
    first.train_step().unwrap();
    first.save_checkpoint(&ckpt).unwrap();
    drop(first);
    let mut resumed = Trainer::resume(&ckpt, data(5), None).unwrap();
    while !resumed.done() {
        resumed.train_step().unwrap();
    }
    let avg = |t: &Trainer| weights(&t.ema_model().unwrap().unwrap().params);
    assert_eq!(avg(&resumed), avg(&straight));

    // A checkpoint without its average is named; a decay outside (0, 1) is refused.
    std::fs::remove_file(ckpt.join(whale_parallel::trainer::EMA_FILE)).unwrap();
    let err = Trainer::resume(&ckpt, data(5), None).unwrap_err().to_string();
    assert!(err.contains("ema.safetensors"), "{err}");
    let bad = TrainConfig { ema_decay: Some(1.0), ..config(1) };
    let err = Trainer::new(DeepSeekV3::new(DeepSeekV3Config::tiny(), 11).unwrap(), bad, data(5)).unwrap_err();
    assert!(err.to_string().contains("ema_decay"), "{err}");
}

#[test]
fn the_batch_ramp_follows_megatrons_rule() {
    use whale_parallel::trainer::BatchRamp;
    // From 1 to 4 micro-batches over 12 sequences: one more every 4.
    let ramp = BatchRamp { start: 1, increment: 1, sequences: 12 };
    let at: Vec<usize> = [0, 3, 4, 7, 8, 11, 12, 100].iter().map(|&c| ramp.micro_batches(c, 4)).collect();
    assert_eq!(at, [1, 1, 2, 2, 3, 3, 4, 4]);
    // Steps of 2-sequence micro-batches, each step's count from what the steps before took: one
    // replica (consumed 0, 2, 4, 8, 14), or two taking twice as much (0, 4, 12).
    let cfg = TrainConfig { micro_batch: 2, grad_accum: 4, batch_ramp: Some(ramp), ..config(8) };
    let steps = |replicas: usize, n: usize| -> Vec<usize> {
        let mut consumed = 0;
        let mut step = || {
            let count = cfg.micro_batches_after(consumed);
            consumed += (count * 2 * replicas) as u64;
            count
        };
        (0..n).map(|_| step()).collect()
    };
    assert_eq!(steps(1, 6), [1, 1, 2, 3, 4, 4]);
    assert_eq!(steps(2, 3), [1, 2, 4]);
    assert_eq!(cfg.micro_batch_counts(), [1, 2, 3, 4]);
    // Megatron's end: the whole batch only past the ramp's sequences, the float rounding of its
    // increments kept (9 sequences in 7 increments: 9 / (9 / 7) is 6.999...).
    let odd = BatchRamp { start: 1, increment: 1, sequences: 9 };
    assert_eq!((odd.micro_batches(9, 8), odd.micro_batches(10, 8)), (7, 8));
    // Two at a time from an even start stays even (DualPipe's counts).
    let even = BatchRamp { start: 2, increment: 2, sequences: 8 };
    assert_eq!([0, 3, 4, 8, 9].map(|c| even.micro_batches(c, 6)), [2, 2, 4, 6, 6]);
    let cfg6 = TrainConfig { grad_accum: 6, batch_ramp: Some(even), ..cfg.clone() };
    assert_eq!(cfg6.micro_batch_counts(), [2, 4, 6]);

    for (ramp, words) in [
        (BatchRamp { start: 0, increment: 1, sequences: 12 }, "starts at 0 micro-batches"),
        (BatchRamp { start: 4, increment: 1, sequences: 12 }, "grad_accum 4"),
        (
            BatchRamp { start: 1, increment: 2, sequences: 12 },
            "increment of 2 micro-batches does not divide the rise of 3",
        ),
        (BatchRamp { start: 1, increment: 0, sequences: 12 }, "increment of 0"),
        (BatchRamp { start: 1, increment: 1, sequences: 0 }, "at least one sequence"),
    ] {
        let err = TrainConfig { batch_ramp: Some(ramp), ..cfg.clone() }.validate().unwrap_err().to_string();
        assert!(err.contains("batch_ramp") && err.contains(words), "{err}");
    }
}

#[test]
fn a_ramped_run_takes_its_steps_micro_batches_and_resumes_bit_for_bit() {
    use whale_parallel::trainer::BatchRamp;
    let ramp = BatchRamp { start: 1, increment: 1, sequences: 12 };
    // Warmup over the whole run: the schedule counts steps on both sides (the sequences it
    // counts after a ramped run's warmup have their own test).
    let ramped = |steps| TrainConfig { grad_accum: 3, batch_ramp: Some(ramp), warmup: 4, ..config(steps) };
    let mut t = Trainer::new(DeepSeekV3::new(DeepSeekV3Config::tiny(), 11).unwrap(), ramped(4), data(5)).unwrap();
    // The same steps taken by hand: grad_accum set to the ramp's count before each.
    let mut by_hand = trainer(4);
    by_hand.config.warmup = 4;
    by_hand.config.grad_accum = 1;
    let (mut counts, mut tokens) = (Vec::new(), Vec::new());
    while !t.done() {
        let n = t.micro_batches_now();
        let m = t.train_step().unwrap();
        counts.push(n);
        tokens.push(m.tokens);
        by_hand.config.grad_accum = n;
        let h = by_hand.train_step().unwrap();
        assert_eq!((m.loss, m.grad_norm, m.lr), (h.loss, h.grad_norm, h.lr), "step {}", m.step);
    }
    // 4 sequences a micro-batch, one more micro-batch every 6 sequences: consumed 0, 4, 8, 16.
    assert_eq!(counts, [1, 1, 2, 3]);
    // The metrics count each step's whole batch (a walk's rows are all real tokens).
    assert_eq!(tokens.iter().map(|&t| t / tokens[0]).collect::<Vec<_>>(), counts);
    assert_eq!(bits(&t), bits(&by_hand));

    let dir = tmpdir("ramp");
    let ckpt = dir.join("checkpoint");
    let mut first = Trainer::new(DeepSeekV3::new(DeepSeekV3Config::tiny(), 11).unwrap(), ramped(4), data(5)).unwrap();
    first.train_step().unwrap();
    first.train_step().unwrap();
    first.save_checkpoint(&ckpt).unwrap();
    // Mid-ramp: 8 sequences taken, the next step's 2 micro-batches from the saved count.
    let mut resumed = Trainer::resume(&ckpt, data(999), None).unwrap();
    assert_eq!(resumed.config.batch_ramp, Some(ramp));
    assert_eq!((resumed.consumed_sequences(), resumed.micro_batches_now()), (8, 2));
    while !resumed.done() {
        resumed.train_step().unwrap();
    }
    assert_eq!(bits(&resumed), bits(&t), "mid-ramp resume");
}

#[test]
fn after_its_warmup_a_ramped_runs_schedule_counts_sequences() {
    use whale_model::tensor::optim::WarmupCosine;
    use whale_parallel::trainer::BatchRamp;
    // 4 sequences a micro-batch, from 1 to 3 micro-batches over 12 sequences: the steps take
    // 4, 4, 8, 12, 12, 12 sequences (consumed 0, 4, 8, 16, 28, 40, then 52).
    let ramp = BatchRamp { start: 1, increment: 1, sequences: 12 };
    let cfg = TrainConfig {
        grad_accum: 3,
        batch_ramp: Some(ramp),
        mtp_weight_from: Some((3, 0.1)),
        freeze_bias_at: Some(4),
        ..config(6)
    };
    let taken: Vec<u64> = (0..=6).map(|k| cfg.sequences_in(k, 1)).collect();
    assert_eq!(taken, [0, 4, 8, 16, 28, 40, 52]);
    // Two replicas take twice the sequences a micro-batch, so the ramp ends sooner: 8, 16, 24.
    assert_eq!((0..=4).map(|k| cfg.sequences_in(k, 2)).collect::<Vec<_>>(), [0, 8, 24, 48, 72]);
    // Warmup by steps (0, 1); then from step 2 (8 sequences) to the end of step 6 (52), the
    // share of the 44 sequences between placed on the 4 steps between.
    let want = [0.0, 1.0, 2.0, 2.0 + 4.0 * 8.0 / 44.0, 2.0 + 4.0 * 20.0 / 44.0, 2.0 + 4.0 * 32.0 / 44.0];
    let schedule = WarmupCosine { peak: cfg.lr, min: cfg.min_lr, warmup: 2, total: 6 };
    // Without the ramp the clock is the step.
    let plain = TrainConfig { batch_ramp: None, ..cfg.clone() };
    assert_eq!(plain.schedule_position(4, 20, 1), 4.0);

    let model = DeepSeekV3::new(DeepSeekV3Config::tiny(), 11).unwrap();
    let biases = |t: &Trainer| -> Vec<u32> {
        t.model.buffers.values().flat_map(|b| b.to_vec_f32().unwrap()).map(f32::to_bits).collect()
    };
    let mut t = Trainer::new(model, cfg.clone(), data(5)).unwrap();
    let mut moved = Vec::new();
    while !t.done() {
        let position = t.schedule_position();
        assert_eq!(position, want[t.step as usize], "step {}", t.step);
        assert_eq!(t.scheduled_lr(), schedule.lr_at(position));
        let before = biases(&t);
        let m = t.train_step().unwrap();
        assert_eq!(m.lr, schedule.lr_at(position), "step {}", m.step);
        // The switches placed on the schedule's steps come by its clock too: the MTP weight
        // drops at step 4 (clock 3.8), not 3 (2.7); the biases stop after step 4 (clock 3.8).
        assert_eq!(m.mtp_weight, Some(if m.step < 4 { 0.3 } else { 0.1 }), "step {}", m.step);
        moved.push(biases(&t) != before);
    }
    assert_eq!(moved, [true, true, true, true, true, false]);
    // Resumed mid-ramp after its warmup, the clock goes on where it was: the same last steps.
    let dir = tmpdir("ramp-clock");
    let ckpt = dir.join("checkpoint");
    let mut first = Trainer::new(DeepSeekV3::new(DeepSeekV3Config::tiny(), 11).unwrap(), cfg.clone(), data(5)).unwrap();
    for _ in 0..4 {
        first.train_step().unwrap();
    }
    first.save_checkpoint(&ckpt).unwrap();
    let mut resumed = Trainer::resume(&ckpt, data(999), None).unwrap();
    assert_eq!(resumed.schedule_position(), want[4]);
    while !resumed.done() {
        resumed.train_step().unwrap();
    }
    assert_eq!(bits(&resumed), bits(&t), "resumed after the warmup, mid-ramp");
    // The ramp's small steps take little of the decay: step 3 trains at a higher rate than a
    // step counter would give it.
    let steps_rate = schedule.lr(3);
    assert!(schedule.lr_at(want[3]) > steps_rate, "{} vs {steps_rate}", schedule.lr_at(want[3]));
}
