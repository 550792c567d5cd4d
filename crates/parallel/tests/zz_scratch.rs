use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use whale_model::tensor::{Device, Tensor};
use whale_model::{DeepSeekV3, DeepSeekV3Config};

#[test]
fn readiness() {
    let m = DeepSeekV3::new(DeepSeekV3Config::tiny(), 3).unwrap();
    let ids: Vec<i64> = (0..8 * 32).map(|i| (i * 7 % 64) as i64).collect();
    let t: Vec<i64> = (0..8 * 32).map(|i| ((i * 7 + 1) % 64) as i64).collect();
    let x = Tensor::from_vec(ids, &[8, 32], &Device::Cpu).unwrap();
    let y = Tensor::from_vec(t, &[8, 32], &Device::Cpu).unwrap();
    let mut params: Vec<(String, Tensor)> = m.params.iter().map(|(n, p)| (n.to_string(), p.clone())).collect();
    params.sort_by_key(|(_, p)| std::cmp::Reverse(p.id()));
    println!("{} params, {} elems", params.len(), m.params.num_elements());
    let t0 = Instant::now();
    let out = m.forward(&x, Some(&y)).unwrap();
    println!("forward {:?}", t0.elapsed());
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            let start = Instant::now();
            let mut ready = vec![None; params.len()];
            while !done.load(Ordering::Acquire) {
                for (i, (_, p)) in params.iter().enumerate() {
                    if ready[i].is_none() && p.grad().is_some() {
                        ready[i] = Some(start.elapsed());
                    }
                }
                std::thread::sleep(Duration::from_micros(100));
            }
            for (i, (_, p)) in params.iter().enumerate() {
                if ready[i].is_none() && p.grad().is_some() {
                    ready[i] = Some(Duration::from_secs(999));
                }
            }
            ready
        });
        let t1 = Instant::now();
        out.loss.unwrap().backward().unwrap();
        println!("backward {:?}", t1.elapsed());
        done.store(true, Ordering::Release);
        let ready = h.join().unwrap();
        for ((n, p), r) in params.iter().zip(ready) {
            println!("{:>10?} {:>8} {n}", r, p.elem_count());
        }
    });
}
