//! Communicators: every collective against its definition on 1 to 4 ranks, variable-size
//! all_to_all, tagged send/recv, errors instead of hangs (mismatches, departed ranks, deadlocks),
//! the link model's lower bound and traffic counts.

use std::time::{Duration, Instant};

use whale_parallel::comm::{Comm, CommError, LinkModel, LocalComm, ReduceOp};
use whale_parallel::Error;

/// Rank `r`'s buffer: values whose sums round, so the reduction order shows in the bits.
fn input(rank: usize, n: usize) -> Vec<f32> {
    (0..n).map(|i| (rank as f32 + 1.0) * 0.1 + i as f32 * 0.37 - (rank * i % 5) as f32 * 1.3e-3).collect()
}

/// The definition: element-wise, folded in rank order.
fn reduce(world: usize, n: usize, op: ReduceOp) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let mut acc = input(0, n)[i];
            for r in 1..world {
                let x = input(r, n)[i];
                acc = match op {
                    ReduceOp::Sum => acc + x,
                    ReduceOp::Max => acc.max(x),
                    ReduceOp::Min => acc.min(x),
                };
            }
            acc
        })
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn collectives_match_their_definitions_on_1_to_4_ranks() {
    for world in 1..=4 {
        let n = 3 * world + 1;
        LocalComm::run(world, |comm| {
            let r = comm.rank();
            assert_eq!(comm.world_size(), world);
            for op in [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Min] {
                let mut buf = input(r, n);
                comm.all_reduce(&mut buf, op).unwrap();
                assert_eq!(bits(&buf), bits(&reduce(world, n, op)), "all_reduce {op:?} on {world} ranks");
            }
            for root in 0..world {
                let mut buf = input(r, n);
                comm.broadcast(&mut buf, root).unwrap();
                assert_eq!(bits(&buf), bits(&input(root, n)), "broadcast from {root}");
            }
            let gathered = comm.all_gather(&input(r, n)).unwrap();
            let expected: Vec<f32> = (0..world).flat_map(|j| input(j, n)).collect();
            assert_eq!(bits(&gathered), bits(&expected), "all_gather on {world} ranks");

            let shard = 3;
            let scattered = comm.reduce_scatter(&input(r, shard * world), ReduceOp::Sum).unwrap();
            let full = reduce(world, shard * world, ReduceOp::Sum);
            assert_eq!(bits(&scattered), bits(&full[r * shard..(r + 1) * shard]), "reduce_scatter on {world} ranks");
            comm.barrier().unwrap();
        });
    }
}

#[test]
fn all_to_all_moves_buffers_of_any_size() {
    let value = |from: usize, to: usize, k: usize| (1000 * from + 10 * to + k) as f32;
    let len = |from: usize, to: usize| (from + 2 * to) % 4;
    for world in 1..=4 {
        LocalComm::run(world, |comm| {
            let me = comm.rank();
            let send = (0..world).map(|to| (0..len(me, to)).map(|k| value(me, to, k)).collect()).collect();
            let got = comm.all_to_all(send).unwrap();
            assert_eq!(got.len(), world);
            for (from, buf) in got.iter().enumerate() {
                let expected: Vec<f32> = (0..len(from, me)).map(|k| value(from, me, k)).collect();
                assert_eq!(buf, &expected, "rank {me} from {from} on {world} ranks");
            }
        });
    }
}

#[test]
fn messages_match_by_sender_and_tag_in_send_order() {
    LocalComm::run(3, |comm| {
        let (me, w) = (comm.rank(), comm.world_size());
        let (next, prev) = ((me + 1) % w, (me + w - 1) % w);
        comm.send(next, 7, &[me as f32, 1.0]).unwrap();
        comm.send(next, 7, &[me as f32, 2.0]).unwrap();
        comm.send(next, 3, &[me as f32, 3.0]).unwrap();
        comm.send(me, 9, &[42.0]).unwrap();
        // Tag 3 was sent last but is received first; tag 7 keeps its order.
        assert_eq!(comm.recv(prev, 3).unwrap(), vec![prev as f32, 3.0]);
        assert_eq!(comm.recv(prev, 7).unwrap(), vec![prev as f32, 1.0]);
        assert_eq!(comm.recv(prev, 7).unwrap(), vec![prev as f32, 2.0]);
        assert_eq!(comm.recv(me, 9).unwrap(), vec![42.0]);
    });
}

fn comm_error(r: whale_parallel::Result<impl std::fmt::Debug>) -> CommError {
    match r {
        Err(Error::Comm(e)) => e,
        other => panic!("expected a communication error, got {other:?}"),
    }
}

#[test]
fn mismatched_collectives_fail_on_every_rank_and_the_world_goes_on() {
    let errors = LocalComm::run(3, |comm| {
        let me = comm.rank();
        let mut errors = Vec::new();
        let mut buf = vec![1.0; if me == 2 { 5 } else { 4 }];
        errors.push(comm_error(comm.all_reduce(&mut buf, ReduceOp::Sum)).to_string());
        // Sequence numbers stay aligned after a failure: the next matching call works.
        let mut ok = vec![1.0; 2];
        comm.all_reduce(&mut ok, ReduceOp::Sum).unwrap();
        assert_eq!(ok, vec![3.0, 3.0]);
        let r = if me == 1 { comm.all_gather(&[1.0]).map(|_| ()) } else { comm.barrier() };
        errors.push(comm_error(r).to_string());
        let send = vec![vec![1.0]; if me == 0 { 2 } else { 3 }];
        errors.push(comm_error(comm.all_to_all(send)).to_string());
        errors.push(comm_error(comm.reduce_scatter(&[1.0; 4], ReduceOp::Sum)).to_string());
        errors.push(comm_error(comm.broadcast(&mut [0.0], me.min(1))).to_string());
        errors.push(comm_error(comm.all_gather(&vec![0.0; me])).to_string());
        assert!(matches!(comm_error(comm.send(3, 0, &[])), CommError::Invalid { .. }));
        errors
    });
    for (rank, e) in errors.iter().enumerate() {
        assert!(e[0].contains("buffer lengths differ: rank 0: 4, rank 1: 4, rank 2: 5"), "{}", e[0]);
        assert!(e[0].starts_with(&format!("rank {rank}: collective #0")), "{}", e[0]);
        assert!(
            e[1].contains("different collectives: rank 0: barrier, rank 1: all_gather, rank 2: barrier"),
            "{}",
            e[1]
        );
        assert!(e[2].contains("rank 0 passed 2 buffers for a world of 3"), "{}", e[2]);
        assert!(e[3].contains("not a multiple of the world size"), "{}", e[3]);
        assert!(e[4].contains("broadcast(root 0)") && e[4].contains("broadcast(root 1)"), "{}", e[4]);
        assert!(e[5].contains("buffer lengths differ"), "{}", e[5]);
    }
}

#[test]
fn a_rank_that_leaves_is_an_error_for_those_waiting_on_it() {
    let errors = LocalComm::run(3, |comm| match comm.rank() {
        0 => vec![comm_error(comm.barrier()), comm_error(comm.recv(2, 0))],
        1 => vec![comm_error(comm.barrier())],
        _ => Vec::new(), // leaves at once
    });
    for e in errors.concat() {
        assert!(matches!(e, CommError::RankLeft { peer: 2, .. }), "{e}");
    }
}

#[test]
fn a_deadlock_is_an_error_on_every_rank() {
    let errors = LocalComm::run(3, |comm| {
        comm.set_deadlock_grace(Some(Duration::from_millis(20)));
        match comm.rank() {
            0 => comm_error(comm.recv(1, 5)),
            1 => comm_error(comm.recv(2, 5)),
            _ => comm_error(comm.barrier()),
        }
    });
    for e in &errors {
        assert!(matches!(e, CommError::Deadlock { .. }), "{e}");
    }
    let text = errors[0].to_string();
    assert!(text.contains("rank 0 waits for a message from rank 1 with tag 5"), "{text}");
    assert!(text.contains("rank 2 waits in collective #0 for rank(s) 0, 1"), "{text}");
}

/// With a 20 ms deadlock grace, after a barrier: rank 1 sends back under tag 2 what rank 0 sends
/// it under tag 1, and returns true; rank 0 gets false and plays its part.
fn echoes_as_rank_1(comm: &LocalComm) -> bool {
    comm.set_deadlock_grace(Some(Duration::from_millis(20)));
    comm.barrier().unwrap();
    if comm.rank() != 1 {
        return false;
    }
    let got = comm.recv(0, 1).unwrap();
    comm.send(0, 2, &got).unwrap();
    true
}

#[test]
fn a_joined_thread_computing_past_the_grace_period_is_not_a_deadlock() {
    LocalComm::run(2, |comm| {
        if echoes_as_rank_1(comm) {
            return;
        }
        std::thread::scope(|s| {
            // DualPipe's forward half: a new thread that computes before its first call, while
            // this rank's main thread waits for rank 1, which waits for that thread.
            s.spawn(|| {
                comm.join_thread();
                std::thread::sleep(Duration::from_millis(100));
                comm.send(1, 1, &[5.0]).unwrap();
            });
            assert_eq!(comm.recv(1, 2).unwrap(), vec![5.0]);
        });
    });
}

#[test]
fn a_rank_waiting_in_one_thread_while_another_works_is_not_a_deadlock() {
    LocalComm::run(2, |comm| {
        if echoes_as_rank_1(comm) {
            return;
        }
        std::thread::scope(|s| {
            // Waits for rank 1, which waits for rank 0's main thread, busy past the grace period.
            let waiting = s.spawn(|| comm.recv(1, 2).unwrap());
            std::thread::sleep(Duration::from_millis(100));
            comm.send(1, 1, &[7.0]).unwrap();
            assert_eq!(waiting.join().unwrap(), vec![7.0]);
        });
        // A thread that has not called yet is covered by the grace period.
        comm.set_deadlock_grace(Some(Duration::from_millis(500)));
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(10));
                comm.send(0, 3, &[1.0]).unwrap();
            });
            assert_eq!(comm.recv(0, 3).unwrap(), vec![1.0]);
        });
    });
}

#[test]
fn the_link_model_adds_at_least_its_time_and_counts_traffic() {
    let link = LinkModel { latency: Duration::from_millis(5), bandwidth: 1e6 };
    let sent = std::sync::OnceLock::new();
    let stats = LocalComm::run_with(2, Some(link), |comm| {
        // Ring all-reduce of 1000 floats on 2 ranks: 2 messages of 500 floats (2000 bytes) each,
        // 2 x 5 ms + 4000 B / 1 MB/s = 14 ms.
        let t = Instant::now();
        comm.all_reduce(&mut vec![1.0; 1000], ReduceOp::Sum).unwrap();
        assert!(t.elapsed() >= Duration::from_millis(14), "all_reduce took {:?}", t.elapsed());
        // One message of 250 floats: received 5 ms + 1 ms after the send.
        if comm.rank() == 0 {
            sent.set(Instant::now()).unwrap();
            comm.send(1, 0, &[0.0; 250]).unwrap();
        } else {
            comm.recv(0, 0).unwrap();
            let after = sent.get().unwrap().elapsed();
            assert!(after >= Duration::from_millis(6), "received {after:?} after the send");
        }
        comm.stats()
    });
    assert_eq!((stats[0].calls, stats[0].messages, stats[0].bytes), (2, 3, 5000));
    assert_eq!((stats[1].calls, stats[1].messages, stats[1].bytes), (1, 2, 4000));
    let modelled = stats[0].modelled.as_secs_f64();
    assert!((modelled - 0.020).abs() < 1e-9, "{modelled}");
}

#[test]
fn a_world_of_one_is_the_identity() {
    let comm = LocalComm::single();
    comm.set_deadlock_grace(Some(Duration::from_millis(20)));
    let mut buf = input(0, 5);
    comm.all_reduce(&mut buf, ReduceOp::Sum).unwrap();
    comm.broadcast(&mut buf, 0).unwrap();
    assert_eq!(buf, input(0, 5));
    assert_eq!(comm.all_gather(&buf).unwrap(), buf);
    assert_eq!(comm.reduce_scatter(&buf, ReduceOp::Max).unwrap(), buf);
    assert_eq!(comm.all_to_all(vec![buf.clone()]).unwrap(), vec![buf.clone()]);
    comm.send(0, 1, &buf).unwrap();
    assert_eq!(comm.recv(0, 1).unwrap(), buf);
    comm.barrier().unwrap();
    assert_eq!(comm.stats().messages, 0);
    // Nobody else can ever send it a message.
    assert!(matches!(comm_error(comm.recv(0, 2)), CommError::Deadlock { .. }));
}

#[test]
fn integer_and_f64_sums_are_exact_and_in_rank_order() {
    let ints = |r: u64| vec![u64::MAX / 4 + r, r * 1_000_000_007, 1 << 40];
    let floats = |r: u64| vec![0.1 * (r + 1) as f64, 1e17 + r as f64, r as f64 * 1e-300];
    let results = LocalComm::run(3, |comm| {
        let r = comm.rank() as u64;
        let (mut counts, mut xs) = (ints(r), floats(r));
        comm.all_reduce_u64(&mut counts).unwrap();
        comm.all_reduce_f64(&mut xs).unwrap();
        comm.all_reduce_u64(&mut []).unwrap();
        (counts, xs)
    });
    let expected_u: Vec<u64> = (0..3).map(|i| (0..3).map(|r| ints(r)[i]).fold(0, u64::wrapping_add)).collect();
    let expected_f: Vec<u64> = (0..3).map(|i| ((floats(0)[i] + floats(1)[i]) + floats(2)[i]).to_bits()).collect();
    for (counts, xs) in &results {
        assert_eq!(counts, &expected_u);
        assert_eq!(xs.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), expected_f);
    }
}

#[test]
#[should_panic(expected = "rank 1 fails")]
fn a_panicking_rank_is_raised_again_after_the_others_stop_waiting() {
    LocalComm::run(2, |comm| {
        if comm.rank() == 1 {
            panic!("rank 1 fails");
        }
        assert!(matches!(comm_error(comm.barrier()), CommError::RankLeft { peer: 1, .. }));
    });
}

#[test]
fn split_makes_independent_groups_ranked_by_key() {
    let out = LocalComm::run(4, |comm| {
        let me = comm.rank();
        // Even and odd ranks, each group ranked in reverse.
        let group = comm.split(me % 2, 3 - me).unwrap();
        let mut buf = vec![me as f32];
        if me % 2 == 0 {
            group.all_reduce(&mut buf, ReduceOp::Sum).unwrap();
        } else {
            buf = group.all_gather(&buf).unwrap();
        }
        // The parent world still works, and ranks split again.
        comm.barrier().unwrap();
        let all = comm.split(0, me).unwrap();
        (group.rank(), group.world_size(), buf, all.rank(), all.world_size())
    });
    assert_eq!(out[0], (1, 2, vec![2.0], 0, 4));
    assert_eq!(out[2], (0, 2, vec![2.0], 2, 4));
    assert_eq!(out[1], (1, 2, vec![3.0, 1.0], 1, 4));
    assert_eq!(out[3], (0, 2, vec![3.0, 1.0], 3, 4));
}
