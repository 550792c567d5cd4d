//! TcpComm: ranks joined over TCP (here threads of one process on localhost, as separate
//! processes would be): every collective against its definition, variable all-to-all, tagged
//! point-to-point, split groups, mismatches, departed ranks and silent ones as errors (told
//! apart), and a pipeline step over TCP equal to one device.

use std::net::TcpListener;
use std::time::Duration;

use whale_model::tensor::{Device, Rng, Tensor};
use whale_model::{DeepSeekV3, DeepSeekV3Config};
use whale_parallel::comm::{Comm, CommError, ReduceOp, TcpComm};
use whale_parallel::launch::LaunchEnv;
use whale_parallel::pipeline::{run_step, Execution, MicroBatch, StagePlan};
use whale_parallel::schedule::{Method, Schedule};
use whale_parallel::Error;

/// Runs `f` on `world` ranks joined over localhost TCP, each on its own thread.
fn on_tcp<R: Send>(world: usize, f: impl Fn(TcpComm) -> R + Sync) -> Vec<R> {
    on_tcp_with_patience(world, Duration::from_secs(20), f)
}

/// [`on_tcp`] whose receives give up after `patience` of silence.
fn on_tcp_with_patience<R: Send>(world: usize, patience: Duration, f: impl Fn(TcpComm) -> R + Sync) -> Vec<R> {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                s.spawn(move || {
                    let env = LaunchEnv::localhost(rank, world, port);
                    f(TcpComm::connect(&env, Duration::from_secs(20), patience).unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn collectives_match_their_definitions_over_tcp() {
    let out = on_tcp(3, |c| {
        let r = c.rank() as f32;
        let mut sum = vec![r, 10.0 * r];
        c.all_reduce(&mut sum, ReduceOp::Sum).unwrap();
        let mut max = vec![r];
        c.all_reduce(&mut max, ReduceOp::Max).unwrap();
        let mut b = vec![r; 2];
        c.broadcast(&mut b, 2).unwrap();
        let g = c.all_gather(&[r]).unwrap();
        let rs = c.reduce_scatter(&[r, 2.0 * r, 3.0 * r], ReduceOp::Sum).unwrap();
        // Rank j sends j + 1 copies of 100 j + k to rank k.
        let a2a = c.all_to_all((0..3).map(|k| vec![100.0 * r + k as f32; c.rank() + 1]).collect()).unwrap();
        c.barrier().unwrap();
        (sum, max, b, g, rs, a2a)
    });
    for (k, (sum, max, b, g, rs, a2a)) in out.into_iter().enumerate() {
        assert_eq!(sum, vec![3.0, 30.0]);
        assert_eq!(max, vec![2.0]);
        assert_eq!(b, vec![2.0, 2.0]);
        assert_eq!(g, vec![0.0, 1.0, 2.0]);
        assert_eq!(rs, vec![3.0 * (k + 1) as f32]);
        let want: Vec<Vec<f32>> = (0..3).map(|j| vec![100.0 * j as f32 + k as f32; j + 1]).collect();
        assert_eq!(a2a, want);
    }
}

#[test]
fn tagged_messages_splits_mismatches_and_departures() {
    let out = on_tcp(4, |c| {
        let r = c.rank();
        // Point to point: two tags, received in the other order; each tag keeps its order.
        if r == 0 {
            c.send(1, 7, &[1.0]).unwrap();
            c.send(1, 9, &[2.0]).unwrap();
            c.send(1, 7, &[3.0]).unwrap();
        }
        let p2p =
            if r == 1 { vec![c.recv(0, 9).unwrap(), c.recv(0, 7).unwrap(), c.recv(0, 7).unwrap()] } else { Vec::new() };
        // Even and odd ranks in two groups, ranked by descending key.
        let sub = c.split(r % 2, 10 - r).unwrap();
        let mut v = vec![r as f32];
        sub.all_reduce(&mut v, ReduceOp::Sum).unwrap();
        let sub_rank = sub.rank();
        // A mismatch fails on every rank with the same detail.
        let mismatch = c.all_gather(&vec![0.0; 1 + usize::from(r == 3)]).unwrap_err().to_string();
        (p2p, v[0], sub_rank, mismatch)
    });
    assert_eq!(out[1].0, vec![vec![2.0], vec![1.0], vec![3.0]]);
    let sums: Vec<f32> = out.iter().map(|o| o.1).collect();
    assert_eq!(sums, vec![2.0, 4.0, 2.0, 4.0]);
    let sub_ranks: Vec<usize> = out.iter().map(|o| o.2).collect();
    assert_eq!(sub_ranks, vec![1, 1, 0, 0]);
    assert!(out.iter().all(|o| o.3.contains("buffer lengths differ")), "{}", out[0].3);

    // A rank that leaves: the others' receives fail because the connection ended, not at the
    // 20 s patience (that would be a timeout, another error).
    let errs = on_tcp(2, |c| {
        if c.rank() == 1 {
            drop(c);
            return None;
        }
        Some(c.recv(1, 0).unwrap_err())
    });
    let err = errs[0].as_ref().unwrap();
    assert!(matches!(err, Error::Comm(CommError::RankLeft { peer: 1, .. })), "{err}");
    assert!(err.to_string().contains("ended"), "{err}");
}

#[test]
fn a_peer_silent_past_the_patience_is_a_timeout_not_a_departure() {
    let errs = on_tcp_with_patience(2, Duration::from_millis(300), |c| {
        if c.rank() == 1 {
            // Connected and silent until rank 0 has given up.
            std::thread::sleep(Duration::from_millis(1500));
            return None;
        }
        Some(c.recv(1, 0).unwrap_err())
    });
    let err = errs[0].as_ref().unwrap();
    let after = Duration::from_millis(300);
    assert!(matches!(err, Error::Comm(CommError::Timeout { peer: 1, after: a, .. }) if *a == after), "{err}");
    assert!(err.to_string().contains("still open"), "{err}");
}

#[test]
fn a_pipeline_step_over_tcp_equals_one_device() {
    let model = DeepSeekV3::new(DeepSeekV3Config::tiny(), 5).unwrap();
    let mut rng = Rng::new(1);
    let micro: Vec<MicroBatch> = (0..4)
        .map(|_| {
            let ids: Vec<i64> = (0..16).map(|_| rng.below(64) as i64).collect();
            let targets: Vec<i64> = ids.iter().skip(1).copied().chain([-100]).collect();
            MicroBatch {
                input_ids: Tensor::from_vec(ids, &[2, 8], &Device::Cpu).unwrap(),
                targets: Tensor::from_vec(targets, &[2, 8], &Device::Cpu).unwrap(),
            }
        })
        .collect();
    let reference = model.duplicate().unwrap();
    let mut want = 0.0;
    for mb in &micro {
        let l = reference.forward(&mb.input_ids, Some(&mb.targets)).unwrap().loss.unwrap().mul_scalar(0.25).unwrap();
        want += l.to_scalar().unwrap() as f64;
        l.backward().unwrap();
    }
    let schedule = Schedule::new(Method::OneFOneB, 2, 4).unwrap();
    let plan = StagePlan::even(4, 2).unwrap();
    let out = on_tcp(2, |c| {
        let mine = model.duplicate().unwrap();
        let report = run_step(&c, &schedule, &plan, &mine, &micro, Execution::default()).unwrap();
        let g = mine.params.get("model.layers.3.self_attn.o_proj.weight").unwrap().grad().unwrap();
        (report.loss, g.to_vec_f32().unwrap())
    });
    let g_ref = reference.params.get("model.layers.3.self_attn.o_proj.weight").unwrap().grad().unwrap();
    let g_ref = g_ref.to_vec_f32().unwrap();
    let scale = g_ref.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    for (loss, g) in out {
        assert!((loss - want).abs() < 1e-5 * want, "{loss} vs {want}");
        assert!(g.iter().zip(&g_ref).all(|(a, b)| (a - b).abs() <= 1e-5 * scale));
    }
}

#[test]
fn a_rank_that_leaves_after_the_rendezvous_is_an_error_not_a_hang() {
    // Rank 1 meets rank 0 at the rendezvous but never joins the mesh: rank 0 waits for its
    // connection until the timeout, then says which rank is missing.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let err = std::thread::scope(|s| {
        s.spawn(move || {
            let env = LaunchEnv::localhost(1, 2, port);
            whale_parallel::launch::rendezvous(&env, None, b"127.0.0.1:9", Duration::from_secs(20)).unwrap();
        });
        let env = LaunchEnv::localhost(0, 2, port);
        TcpComm::connect(&env, Duration::from_millis(1500), Duration::from_secs(20)).unwrap_err().to_string()
    });
    assert!(err.contains("[1]") && err.contains("did not connect"), "{err}");
}

#[test]
fn split_colours_and_keys_are_full_64_bit() {
    // Colours that agree in their low 32 bits are still different groups.
    let out = on_tcp(3, |c| {
        let colour = if c.rank() == 2 { 1usize << 33 } else { (1usize << 34) | (1 << 33) };
        let sub = c.split(colour, (2 - c.rank()) << 32).unwrap();
        (sub.world_size(), sub.rank())
    });
    assert_eq!(out, vec![(2, 1), (2, 0), (1, 0)]);
}

#[test]
fn a_large_message_still_arriving_is_not_a_silence() {
    // Rank 1, by hand: a 3 MiB message trickled in 1 MiB pieces 250 ms apart takes longer than
    // rank 0's patience (400 ms), but no gap between its bytes does.
    use std::io::Write;
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let floats = 3 * (1 << 18);
    let got = std::thread::scope(|s| {
        s.spawn(move || {
            let env = LaunchEnv::localhost(1, 2, port);
            let met = whale_parallel::launch::rendezvous(&env, None, b"127.0.0.1:9", Duration::from_secs(20)).unwrap();
            let rank0 = String::from_utf8(met.contributions[0].clone()).unwrap();
            let mut stream = std::net::TcpStream::connect(rank0).unwrap();
            stream.write_all(&1u32.to_le_bytes()).unwrap();
            let mut head = Vec::new();
            head.extend(1u32.to_le_bytes());
            head.extend(0u64.to_le_bytes()); // the world's point-to-point channel
            head.extend(7u64.to_le_bytes()); // tag
            head.extend((floats as u64).to_le_bytes());
            stream.write_all(&head).unwrap();
            let body: Vec<u8> = (0..floats).flat_map(|i| (i as f32).to_le_bytes()).collect();
            for piece in body.chunks(1 << 20) {
                std::thread::sleep(Duration::from_millis(250));
                stream.write_all(piece).unwrap();
            }
            std::thread::sleep(Duration::from_millis(500));
        });
        let env = LaunchEnv::localhost(0, 2, port);
        let c = TcpComm::connect(&env, Duration::from_secs(20), Duration::from_millis(400)).unwrap();
        let started = std::time::Instant::now();
        let got = c.recv(1, 7);
        assert!(started.elapsed() > Duration::from_millis(600), "the message took longer than the patience");
        got
    });
    let got = got.unwrap();
    assert_eq!(got.len(), floats);
    assert!(got.iter().enumerate().all(|(i, &x)| x == i as f32));
}
