//! Compares `whale_kernels::cpu::expf` with the platform's `f32::exp` on all 2^32 f32 inputs and
//! prints how many differ (NaN counting as equal to NaN). On x86-64 glibc >= 2.27 with AVX2 and
//! FMA the answer is 0; elsewhere it says how far the platform's libm is from glibc's. About 30 s
//! on one core: `cargo run --release -p whale-kernels --example expf_exhaustive`.

use whale_kernels::cpu::expf::exp_slice;

fn main() {
    const CHUNK: u32 = 1 << 20;
    let mut x = vec![0.0f32; CHUNK as usize];
    let (mut ours, mut theirs) = (vec![0.0f32; x.len()], vec![0.0f32; x.len()]);
    let mut differ = 0u64;
    for c in 0..=(u32::MAX / CHUNK) {
        for (i, x) in x.iter_mut().enumerate() {
            *x = f32::from_bits(c * CHUNK + i as u32);
        }
        exp_slice(&x, &mut ours);
        theirs.iter_mut().zip(&x).for_each(|(y, x)| *y = x.exp());
        for ((a, b), x) in ours.iter().zip(&theirs).zip(&x) {
            if a.to_bits() != b.to_bits() && !(a.is_nan() && b.is_nan()) {
                if differ < 10 {
                    println!("exp({x:e} = {:#010x}): whale {a:e}, libm {b:e}", x.to_bits());
                }
                differ += 1;
            }
        }
    }
    println!("{differ} of 2^32 inputs differ from this platform's expf");
}
