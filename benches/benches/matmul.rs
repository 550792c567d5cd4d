//! Whale's `Tensor::matmul` against calling the `gemm` crate directly, same sizes, same threads.
//! The ratio is the framework's overhead (tensor handles, layout checks, allocation).

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use whale_benches::{config, randn};

fn gemm_direct(a: &[f32], b: &[f32], n: usize) -> Vec<f32> {
    let mut c = vec![0.0f32; n * n];
    let par = gemm::Parallelism::Rayon(rayon::current_num_threads());
    // SAFETY: a, b, c are n*n row-major buffers; strides describe exactly that.
    unsafe {
        gemm::gemm(
            n,
            n,
            n,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            n as isize,
            b.as_ptr(),
            1,
            n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
    c
}

fn bench(c: &mut Criterion) {
    for n in [512usize, 1024] {
        let (a, b) = (randn(&[n, n], 1), randn(&[n, n], 2));
        let (va, vb) = (a.to_vec_f32().unwrap(), b.to_vec_f32().unwrap());
        let mut g = c.benchmark_group(format!("matmul_f32_{n}"));
        // The ratio is the point here and these VMs are noisy: more and longer samples.
        g.sample_size(30).measurement_time(std::time::Duration::from_secs(5));
        g.bench_function("whale", |bench| bench.iter(|| black_box(a.matmul(&b).unwrap())));
        g.bench_function("baseline", |bench| bench.iter(|| black_box(gemm_direct(&va, &vb, n))));
        g.finish();
    }
}

criterion_group! { name = benches; config = config(); targets = bench }
criterion_main!(benches);
