//! NcclComm on the GPUs of this machine (feature `cuda`): one rank per GPU, as threads of this
//! process joined by the launch rendezvous, checked against each collective's definition. Skips,
//! saying so, where there is no CUDA driver or GPU.
#![cfg(feature = "cuda")]

use std::net::TcpListener;
use std::time::Duration;

use whale_parallel::comm::{gpu_count, Comm, NcclComm, ReduceOp};
use whale_parallel::launch::LaunchEnv;

#[test]
fn nccl_collectives_match_their_definitions() {
    let gpus = gpu_count();
    if gpus == 0 {
        eprintln!("skipped: no CUDA driver or no GPU on this machine");
        return;
    }
    let world = gpus.min(2);
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                s.spawn(move || {
                    let env = LaunchEnv::localhost(rank, world, port);
                    let c = NcclComm::connect(&env, Duration::from_secs(60), Duration::from_secs(60)).unwrap();
                    let r = rank as f32;
                    let mut sum = vec![r + 1.0; 5];
                    c.all_reduce(&mut sum, ReduceOp::Sum).unwrap();
                    let gathered = c.all_gather(&[r]).unwrap();
                    let a2a = c.all_to_all((0..world).map(|k| vec![10.0 * r + k as f32; rank + 1]).collect()).unwrap();
                    c.send((rank + 1) % world, 3, &[r]).unwrap();
                    let got = c.recv((rank + world - 1) % world, 3).unwrap();
                    (sum, gathered, a2a, got)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let total: f32 = (1..=world).map(|x| x as f32).sum();
    for (k, (sum, gathered, a2a, got)) in out.into_iter().enumerate() {
        assert_eq!(sum, vec![total; 5]);
        assert_eq!(gathered, (0..world).map(|x| x as f32).collect::<Vec<_>>());
        let want: Vec<Vec<f32>> = (0..world).map(|j| vec![10.0 * j as f32 + k as f32; j + 1]).collect();
        assert_eq!(a2a, want);
        assert_eq!(got, vec![((k + world - 1) % world) as f32]);
    }
    eprintln!("NcclComm: {world} GPU rank(s) agree with the definitions");
}
