//! Pipeline parallelism with real stages: every schedule (1F1B, ZB1P, DualPipe, DualPipeV) run on
//! LocalComm ranks gives the loss and the gradients of single-device training on the same
//! micro-batches, with and without overlapping DualPipe's forward/backward pairs.

use whale_model::tensor::{Device, Rng, Tensor};
use whale_model::{DeepSeekV3, DeepSeekV3Config};
use whale_parallel::comm::LocalComm;
use whale_parallel::pipeline::{run_step, Execution, MicroBatch, StagePlan};
use whale_parallel::schedule::{Method, Schedule};

fn micro_batches(n: usize, seed: u64) -> Vec<MicroBatch> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let ids: Vec<i64> = (0..2 * 9).map(|_| rng.below(64) as i64).collect();
            let rows: Vec<&[i64]> = ids.chunks(9).collect();
            let x: Vec<i64> = rows.iter().flat_map(|r| r[..8].to_vec()).collect();
            let y: Vec<i64> = rows.iter().flat_map(|r| r[1..].to_vec()).collect();
            MicroBatch {
                input_ids: Tensor::from_vec(x, &[2, 8], &Device::Cpu).unwrap(),
                targets: Tensor::from_vec(y, &[2, 8], &Device::Cpu).unwrap(),
            }
        })
        .collect()
}

/// The mean loss over the micro-batches and every parameter's gradient, on one device.
fn single_device(model: &DeepSeekV3, micro: &[MicroBatch]) -> (f64, Vec<(String, Vec<f32>)>) {
    let mut loss = 0.0;
    for mb in micro {
        let l = model.forward(&mb.input_ids, Some(&mb.targets)).unwrap().loss.unwrap();
        let l = l.mul_scalar(1.0 / micro.len() as f32).unwrap();
        loss += l.to_scalar().unwrap() as f64;
        l.backward().unwrap();
    }
    (loss, model.params.iter().map(|(n, p)| (n.to_string(), p.grad().unwrap().to_vec_f32().unwrap())).collect())
}

#[test]
fn every_schedule_trains_like_one_device() {
    // 4 decoder layers (dense, then MoE) and an MTP module; 4 stages of one layer each.
    let cfg = DeepSeekV3Config::tiny();
    let model = DeepSeekV3::new(cfg, 5).unwrap();
    let micro = micro_batches(8, 9);
    let (want_loss, want) = single_device(&model.duplicate().unwrap(), &micro);
    let plan = StagePlan::even(4, 4).unwrap();
    for method in Method::ALL {
        for overlap in [false, true] {
            if overlap && !matches!(method, Method::DualPipe | Method::DualPipeV) {
                continue; // only DualPipe's schedules have F&B pairs
            }
            let schedule = Schedule::new(method, 4, 8).unwrap();
            let ranks = LocalComm::run(schedule.ranks.len(), |comm| {
                let mine = model.duplicate().unwrap();
                let report = run_step(comm, &schedule, &plan, &mine, &micro, Execution { overlap }).unwrap();
                let grads: Vec<Vec<f32>> =
                    mine.params.iter().map(|(_, p)| p.grad().unwrap().to_vec_f32().unwrap()).collect();
                (report, grads)
            });
            let what = format!("{method} (overlap {overlap})");
            for (rank, (report, grads)) in ranks.iter().enumerate() {
                assert!(
                    (report.loss - want_loss).abs() < 1e-5 * want_loss,
                    "{what}: loss {} vs {want_loss}",
                    report.loss
                );
                for ((name, w), g) in want.iter().zip(grads) {
                    let scale = w.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-8);
                    let worst = w.iter().zip(g).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
                    // Gradients summed in another order (micro-batches, then ranks): f32 rounding.
                    assert!(worst <= 1e-5 * scale, "{what}, rank {rank}, {name}: off by {worst} (scale {scale})");
                }
            }
        }
    }
}

#[test]
fn a_parameter_no_stage_gives_a_gradient_keeps_none() {
    // One-token sequences leave no target one ahead, so the MTP module does not run and on one
    // device its weights have no gradient (AdamW then leaves them alone); after the pipeline's
    // sum they must still have none.
    let model = DeepSeekV3::new(DeepSeekV3Config::tiny(), 5).unwrap();
    let mut rng = Rng::new(3);
    let micro: Vec<MicroBatch> = (0..4)
        .map(|_| {
            let ids: Vec<i64> = (0..4).map(|_| rng.below(64) as i64).collect();
            MicroBatch {
                input_ids: Tensor::from_vec(ids[..2].to_vec(), &[2, 1], &Device::Cpu).unwrap(),
                targets: Tensor::from_vec(ids[2..].to_vec(), &[2, 1], &Device::Cpu).unwrap(),
            }
        })
        .collect();
    let single = model.duplicate().unwrap();
    for mb in &micro {
        single.forward(&mb.input_ids, Some(&mb.targets)).unwrap().loss.unwrap().backward().unwrap();
    }
    let want: Vec<(String, bool)> = single.params.iter().map(|(n, p)| (n.to_string(), p.grad().is_some())).collect();
    // The tiny preset's MTP module is layer 4 (after the 4 decoder layers, as V3 stores it).
    assert!(want.iter().any(|(n, has)| n.starts_with("model.layers.4.") && !has));
    assert!(want.iter().filter(|(_, has)| *has).count() > want.len() / 2);
    let schedule = Schedule::new(Method::OneFOneB, 2, 4).unwrap();
    let plan = StagePlan::even(4, 2).unwrap();
    let ranks = LocalComm::run(2, |comm| {
        let mine = model.duplicate().unwrap();
        run_step(comm, &schedule, &plan, &mine, &micro, Execution::default()).unwrap();
        mine.params.iter().map(|(n, p)| (n.to_string(), p.grad().is_some())).collect::<Vec<_>>()
    });
    for got in ranks {
        assert_eq!(got, want);
    }
}

#[test]
fn stage_plans_split_layers_evenly_and_refuse_impossible_splits() {
    assert_eq!(StagePlan::even(7, 3).unwrap().layers, vec![0..3, 3..5, 5..7]);
    assert_eq!(StagePlan::even(4, 4).unwrap().layers, vec![0..1, 1..2, 2..3, 3..4]);
    assert!(StagePlan::even(3, 4).is_err());
    assert!(StagePlan::even(3, 0).is_err());
}
