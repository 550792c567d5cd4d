//! Expert parallelism over LocalComm ranks equals the single-rank MoE layer: outputs, the
//! gradients of the tokens, of the local experts (each on the rank that owns it) and of the
//! replicated router and shared experts (summed over ranks, as data parallelism would), with
//! node-limited routing keeping every token within its allowed nodes, and the sequence-wise
//! balance loss (each rank's sequences are its own; their mean over ranks is the whole batch's),
//! and with an FP8 dispatch (the rounding on one rank, the codes on the wire).

use std::sync::Arc;

use whale_model::block::FeedForward;
use whale_model::moe::DeepSeekMoE;
use whale_model::tensor::fp8::{fp8_comm_quantize, GRADIENT_MIN_AMAX};
use whale_model::tensor::testing::randn;
use whale_model::tensor::{DType, Tensor};
use whale_model::{DeepSeekV3, DeepSeekV3Config};
use whale_parallel::comm::{Comm, LocalComm};
use whale_parallel::expert_parallel::{all_to_all_rows, DispatchStats, EpComms, ExpertParallel, Wire};

/// The tiny preset's first MoE layer with the sequence-wise balance loss weighted `alpha` (0: off).
fn moe_of(model: &DeepSeekV3, alpha: f32) -> DeepSeekMoE {
    let FeedForward::Moe(moe) = &model.layers[1].mlp else { panic!("layer 1 is an MoE layer") };
    let mut moe = moe.clone();
    moe.seq_aux_alpha = alpha;
    moe
}

/// `sum(out * r)` plus the balance loss times `weight`, and the balance loss's value (0 if off).
fn loss_of(out: &whale_model::moe::MoeOutput, r: &Tensor, weight: f32) -> (Tensor, f32) {
    let loss = out.output.mul(r).unwrap().sum_all().unwrap();
    match &out.aux_loss {
        Some(aux) => (loss.add(&aux.mul_scalar(weight).unwrap()).unwrap(), aux.to_vec_f32().unwrap()[0]),
        None => (loss, 0.0),
    }
}

/// Every trainable tensor of an MoE layer with its name (`gate`, `experts.3.up_proj`, ...).
fn named_weights(moe: &DeepSeekMoE) -> Vec<(String, Tensor)> {
    let mut out = vec![("gate".to_string(), moe.gate.weight.clone())];
    let mlps = moe
        .experts
        .iter()
        .enumerate()
        .map(|(i, e)| (format!("experts.{i}"), e))
        .chain(moe.shared_experts.iter().map(|e| ("shared".to_string(), e)));
    for (name, e) in mlps {
        for (p, l) in [("gate_proj", &e.gate_proj), ("up_proj", &e.up_proj), ("down_proj", &e.down_proj)] {
            out.push((format!("{name}.{p}"), l.weight.clone()));
        }
    }
    out
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-12);
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        // Sums run in another order (per rank, then across ranks): f32 rounding, relative to the
        // largest entry.
        assert!((a - b).abs() <= 2e-5 * scale, "{what}[{i}]: {a} vs {b} (scale {scale})");
    }
}

/// Runs the layer on `world` ranks (`ranks_per_node` each node), one sequence each, and checks it
/// against one rank on all of them, the sequence-wise balance loss weighted `alpha`: each rank
/// adds its loss divided by `world` (a data-parallel mean), so the replicated weights' gradients
/// summed over ranks are the whole batch's.
/// With `fp8`, the layer's dispatch is FP8 on both sides. Returns each rank's dispatch stats and
/// the bytes its forward and backward all-to-alls sent.
fn check(
    world: usize,
    ranks_per_node: usize,
    cfg: DeepSeekV3Config,
    tokens_per_rank: usize,
    alpha: f32,
    fp8: bool,
) -> Vec<(DispatchStats, u64, u64)> {
    let model = DeepSeekV3::new(cfg.clone(), 3).unwrap();
    let d = cfg.hidden_size;
    let x = randn(&[world, tokens_per_rank, d], 7);
    let r = randn(&[world, tokens_per_rank, d], 8);

    // One rank, all tokens.
    let mut reference = moe_of(&model.duplicate().unwrap(), alpha);
    reference.fp8_dispatch = fp8;
    let xv = x.detach().variable();
    let out = reference.forward(&xv, None).unwrap();
    assert_eq!(out.aux_loss.is_some(), alpha > 0.0, "a balance loss exactly when it is on");
    let (loss, ref_aux) = loss_of(&out, &r, 1.0);
    loss.backward().unwrap();
    let ref_out = out.output.to_vec_f32().unwrap();
    let ref_grads: Vec<(String, Vec<f32>)> =
        named_weights(&reference).into_iter().map(|(n, t)| (n, t.grad().unwrap().to_vec_f32().unwrap())).collect();
    let ref_dx = xv.grad().unwrap().to_vec_f32().unwrap();

    let comms = LocalComm::world(world, None);
    let per_rank: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| {
                let (model, x, r) = (&model, &x, &r);
                s.spawn(move || {
                    let comms = EpComms::new(Arc::new(comm)).unwrap();
                    let mut moe = moe_of(&model.duplicate().unwrap(), alpha);
                    moe.fp8_dispatch = fp8;
                    let ep = ExpertParallel::install(&comms, ranks_per_node, &mut moe).unwrap();
                    let xr = x.narrow(0, rank, 1).unwrap().contiguous().unwrap().variable();
                    let out = moe.forward(&xr, None).unwrap();
                    let (loss, aux) = loss_of(&out, &r.narrow(0, rank, 1).unwrap(), 1.0 / world as f32);
                    loss.backward().unwrap();
                    let grads: Vec<(String, Option<Vec<f32>>)> = named_weights(&moe)
                        .into_iter()
                        .map(|(n, t)| (n, t.grad().map(|g| g.to_vec_f32().unwrap())))
                        .collect();
                    let local = ep.local_experts(moe.experts.len());
                    (
                        out.output.to_vec_f32().unwrap(),
                        xr.grad().unwrap().to_vec_f32().unwrap(),
                        grads,
                        local,
                        (ep.last_dispatch(), comms.forward.stats().bytes, comms.backward.stats().bytes),
                        aux,
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let n = tokens_per_rank * d;
    let mut stats = Vec::new();
    let mean_aux = per_rank.iter().map(|p| p.5).sum::<f32>() / world as f32;
    assert!(
        (mean_aux - ref_aux).abs() <= 1e-6 * ref_aux.abs(),
        "balance loss: mean over ranks {mean_aux} vs {ref_aux}"
    );
    for (rank, (out, dx, _, _, rank_stats, _)) in per_rank.iter().enumerate() {
        assert_close(&format!("rank {rank} output"), out, &ref_out[rank * n..(rank + 1) * n]);
        assert_close(&format!("rank {rank} input gradient"), dx, &ref_dx[rank * n..(rank + 1) * n]);
        stats.push(rank_stats.clone());
    }
    for (i, (name, want)) in ref_grads.iter().enumerate() {
        let expert: Option<usize> = name.strip_prefix("experts.").and_then(|s| s.split('.').next()?.parse().ok());
        match expert {
            // A routed expert's gradient is computed by its owner only.
            Some(e) => {
                for (rank, (_, _, grads, local, _, _)) in per_rank.iter().enumerate() {
                    if local.contains(&e) {
                        assert_close(&format!("{name} on rank {rank}"), grads[i].1.as_ref().unwrap(), want);
                    } else {
                        assert!(grads[i].1.is_none(), "{name} has a gradient on rank {rank}, which does not own it");
                    }
                }
            }
            // Replicated weights: each rank's gradient covers its tokens; the sum is the whole.
            None => {
                let mut sum = vec![0.0f32; want.len()];
                for (_, _, grads, _, _, _) in &per_rank {
                    sum.iter_mut().zip(grads[i].1.as_ref().unwrap()).for_each(|(s, g)| *s += g);
                }
                assert_close(&format!("{name} summed over ranks"), &sum, want);
            }
        }
    }
    stats
}

/// The most nodes a token reached, per rank.
fn max_nodes(stats: &[(DispatchStats, u64, u64)]) -> Vec<usize> {
    stats.iter().map(|(s, _, _)| s.max_nodes_per_token).collect()
}

#[test]
fn expert_parallel_over_2_and_4_ranks_equals_one_rank() {
    // 8 experts, top-2, groups of 4 (n_group 2): 4 or 2 experts per rank.
    let cfg = DeepSeekV3Config::tiny();
    for world in [2, 4] {
        check(world, world, cfg.clone(), 12, 0.0, false);
    }
}

#[test]
fn the_sequence_wise_balance_loss_under_expert_parallelism_is_the_whole_batchs() {
    // A heavy weight, so its gradient through the router is as large as the output's.
    check(4, 4, DeepSeekV3Config::tiny(), 12, 0.5, false);
}

#[test]
fn node_limited_routing_sends_each_token_to_at_most_m_nodes() {
    // 4 ranks on 2 nodes; the router's 2 groups are the nodes and topk_group = 1 = M.
    let cfg = DeepSeekV3Config { n_group: 2, topk_group: 1, ..DeepSeekV3Config::tiny() };
    let limited = max_nodes(&check(4, 2, cfg.clone(), 16, 0.0, false));
    assert!(limited.iter().all(|&m| m == 1), "M = 1: {limited:?}");
    // With both groups allowed, tokens do spread over the two nodes.
    let spread = max_nodes(&check(4, 2, DeepSeekV3Config { topk_group: 2, ..cfg }, 16, 0.0, false));
    assert!(spread.contains(&2), "topk_group 2: {spread:?}");
}

#[test]
fn an_fp8_dispatch_equals_one_rank_doing_the_same_in_a_quarter_of_the_token_bytes() {
    let cfg = DeepSeekV3Config::tiny();
    let d = cfg.hidden_size;
    // The flag is not a no-op: one rank's output moves with the tokens' rounding.
    let model = DeepSeekV3::new(cfg.clone(), 3).unwrap();
    let x = randn(&[1, 12, d], 7);
    let mut moe = moe_of(&model, 0.0);
    let plain = moe.forward(&x, None).unwrap().output.to_vec_f32().unwrap();
    moe.fp8_dispatch = true;
    assert_ne!(moe.forward(&x, None).unwrap().output.to_vec_f32().unwrap(), plain);

    // A row of d values takes d/4 words of codes and a scale per 128 columns instead of d.
    let saved_per_row = 4 * (d - (d / 4 + d.div_ceil(128))) as u64;
    for world in [2, 4] {
        let f32_wire = check(world, world, cfg.clone(), 12, 0.0, false);
        let fp8_wire = check(world, world, cfg.clone(), 12, 0.0, true);
        check(world, world, cfg.clone(), 12, 0.5, true); // with the balance loss's router gradient
        for (rank, ((a, a_fwd, a_back), (b, b_fwd, b_back))) in f32_wire.iter().zip(&fp8_wire).enumerate() {
            assert_eq!(a.rows_sent, b.rows_sent, "rank {rank}: the same routing");
            // The tokens sent to other ranks shrink in the forward, and so do the gradients their
            // combine sends back in the backward; the other all-to-alls are the same.
            let rows: u64 = a.rows_sent.iter().enumerate().filter(|&(r, _)| r != rank).map(|(_, &n)| n as u64).sum();
            assert!(rows > 0, "rank {rank} sends tokens away");
            assert_eq!(a_fwd - b_fwd, rows * saved_per_row, "rank {rank}: forward bytes");
            assert_eq!(a_back - b_back, rows * saved_per_row, "rank {rank}: backward bytes");
        }
    }
}

#[test]
fn the_fp8_wire_carries_rounded_rows_exactly_and_refuses_others() {
    let comm: Arc<dyn Comm> = Arc::new(LocalComm::single());
    let comms = EpComms { forward: comm.clone(), backward: comm };
    let x = randn(&[3, 130], 1);
    let err = all_to_all_rows(&comms, &x, &[3], Wire::Fp8, Wire::Plain).unwrap_err().to_string();
    assert!(err.contains("not on the E4M3 grid") && err.contains("rows for rank 0") && err.contains("row 0"), "{err}");

    // Rows of every kind, rounded with either floor (the activations' 1e-4, the gradients'
    // least), arrive bit for bit, values and gradients: ordinary, under the 1e-4 floor, far
    // under it, zeros with a negative zero, large, and one with a NaN; partial words and tiles.
    let same =
        |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits() || p.is_nan() && q.is_nan());
    for cols in [3, 130, 200] {
        let mut v = randn(&[6, cols], cols as u64).to_vec_f32().unwrap();
        for (row, scale) in [1.0, 2e-6, 1e-30, 0.0, 40.0, 1.0].into_iter().enumerate() {
            v[row * cols..(row + 1) * cols].iter_mut().for_each(|x| *x *= scale);
        }
        v[3 * cols] = -0.0;
        v[5 * cols + 1] = f32::NAN;
        let x = Tensor::from_vec(v.clone(), &[6, cols], &whale_model::tensor::Device::Cpu).unwrap();
        let by_gradient_floor = fp8_comm_quantize(&v, cols, GRADIENT_MIN_AMAX).dequantize();
        let by_gradient_floor =
            Tensor::from_vec(by_gradient_floor, &[6, cols], &whale_model::tensor::Device::Cpu).unwrap();
        for rounded in [x.fp8_comm_round().unwrap(), by_gradient_floor] {
            let rounded = rounded.variable();
            let (y, _) = all_to_all_rows(&comms, &rounded, &[6], Wire::Fp8, Wire::Fp8).unwrap();
            assert!(same(&y.to_vec_f32().unwrap(), &rounded.to_vec_f32().unwrap()), "{cols} columns");
            // The gradient back on the FP8 wire: one rounded as fp8_comm_round_grad rounds.
            let r = y.fp8_comm_round_grad().unwrap();
            let g = randn(&[6, cols], 3).mul_scalar(1e-3).unwrap();
            r.mul(&g).unwrap().sum_all().unwrap().backward().unwrap();
            let want = fp8_comm_quantize(&g.to_vec_f32().unwrap(), cols, GRADIENT_MIN_AMAX).dequantize();
            assert!(same(&rounded.grad().unwrap().to_vec_f32().unwrap(), &want), "{cols} columns: gradient");
        }
    }
}

#[test]
fn bf16_rows_cross_two_to_a_word_and_exactly() {
    // Two ranks swap halves of 3 rows of 129 bf16 values (an odd count: a padded last word).
    let sent = LocalComm::run(2, |comm| {
        let comm: Arc<dyn Comm> = Arc::from(comm.split(0, comm.rank()).unwrap());
        let comms = EpComms { forward: comm.clone(), backward: comm.clone() };
        let x = randn(&[3, 129], 10 + comm.rank() as u64).to_dtype(DType::BF16).unwrap().variable();
        let (y, counts) = all_to_all_rows(&comms, &x, &[1, 2], Wire::Plain, Wire::Plain).unwrap();
        let forward = comm.stats().bytes;
        // The gradient, f32 through the cast, crosses as bf16.
        let r = randn(y.dims(), 20 + comm.rank() as u64);
        y.to_dtype(DType::F32).unwrap().mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        let backward = comm.stats().bytes - forward;
        (x.to_vec_f32().unwrap(), y, counts, r, x.grad().unwrap(), (forward, backward))
    });
    let rows = |v: &[f32], range: std::ops::Range<usize>| v[range.start * 129..range.end * 129].to_vec();
    for (rank, (_, y, counts, _, grad, bytes)) in sent.iter().enumerate() {
        assert_eq!(y.dtype(), DType::BF16);
        let (want_rows, want_counts) = if rank == 0 {
            ([rows(&sent[0].0, 0..1), rows(&sent[1].0, 0..1)].concat(), vec![1, 1])
        } else {
            ([rows(&sent[0].0, 1..3), rows(&sent[1].0, 1..3)].concat(), vec![2, 2])
        };
        assert_eq!((y.to_vec_f32().unwrap(), counts.clone()), (want_rows, want_counts), "rank {rank}");
        // 65 words a row, f32 would take 129: rank 0 sends 2 rows to rank 1, rank 1 one to rank 0,
        // and each returns the gradients of the rows it received.
        assert_eq!(*bytes, [(2 * 65 * 4, 65 * 4), (65 * 4, 2 * 65 * 4)][rank], "rank {rank}");
        let back: Vec<f32> = if rank == 0 {
            [rows(&sent[0].3.to_vec_f32().unwrap(), 0..1), rows(&sent[1].3.to_vec_f32().unwrap(), 0..2)].concat()
        } else {
            [rows(&sent[0].3.to_vec_f32().unwrap(), 1..2), rows(&sent[1].3.to_vec_f32().unwrap(), 2..4)].concat()
        };
        let rounded = Tensor::from_vec(back, &[3, 129], &whale_model::tensor::Device::Cpu).unwrap();
        let rounded = rounded.to_dtype(DType::BF16).unwrap().to_vec_f32().unwrap();
        assert_eq!(grad.to_vec_f32().unwrap(), rounded, "rank {rank}'s gradient");
    }
}

#[test]
fn a_layout_that_cannot_shard_is_an_error() {
    let model = DeepSeekV3::new(DeepSeekV3Config::tiny(), 3).unwrap();
    let moe = moe_of(&model, 0.0);
    for (world, per_node, words) in [(3, 3, "do not split evenly"), (4, 1, "one router group per node")] {
        let comm: Arc<dyn Comm> = Arc::new(LocalComm::world(world, None).remove(0));
        let comms = EpComms { forward: comm.clone(), backward: comm };
        let err = ExpertParallel::new(&comms, per_node, &moe).unwrap_err().to_string();
        assert!(err.contains(words), "{err}");
    }
}
