//! Learning-rate schedules as pure functions of a position in steps.

/// The learning rate at a position on the schedule's clock, in steps (0-based: the first
/// optimizer step is step 0). The clock is the step itself, or falls between steps where a run
/// measures its progress in something finer (sequences, under a batch ramp).
pub trait LrSchedule: Send + Sync {
    /// The rate at `position` steps; at a whole `position`, [`LrSchedule::lr`]'s rate.
    fn lr_at(&self, position: f64) -> f32;

    /// The rate of step `step`.
    fn lr(&self, step: u64) -> f32 {
        self.lr_at(step as f64)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Constant(pub f32);

impl LrSchedule for Constant {
    fn lr_at(&self, _: f64) -> f32 {
        self.0
    }
}

/// Linear warmup to `peak` over `warmup` steps, then cosine decay to `min` at `total`, then
/// `min`. Warmup step i (0-based) takes `peak * (i + 1) / warmup`, so no step has a zero rate and
/// the last warmup step reaches `peak`. Megatron's scheduler and HF's
/// `get_cosine_schedule_with_warmup` take `peak * i / warmup` (a first step at rate 0, `peak` one
/// step later); nanoGPT's takes `peak * (i + 1) / (warmup + 1)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WarmupCosine {
    pub peak: f32,
    pub min: f32,
    pub warmup: u64,
    pub total: u64,
}

fn warmup(peak: f32, warmup: u64, position: f64) -> Option<f32> {
    (position < warmup as f64).then(|| peak * (position + 1.0) as f32 / warmup as f32)
}

fn cosine(from: f32, to: f32, progress: f64) -> f32 {
    let p = progress.clamp(0.0, 1.0);
    (to as f64 + 0.5 * (from - to) as f64 * (1.0 + (std::f64::consts::PI * p).cos())) as f32
}

impl LrSchedule for WarmupCosine {
    fn lr_at(&self, position: f64) -> f32 {
        if let Some(lr) = warmup(self.peak, self.warmup, position) {
            return lr;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        cosine(self.peak, self.min, (position - self.warmup as f64) / span as f64)
    }
}

/// DeepSeek-V3's pretraining schedule (spec section 6.2), in steps: linear warmup to `peak`,
/// constant until `decay_start`, cosine down to `decay_min` at `decay_end`, then a staircase of
/// `(until_step, lr)` pieces (V3: 2.2e-5 for 333B tokens, then 7.3e-6), the last held forever.
#[derive(Debug, Clone, PartialEq)]
pub struct DeepSeekV3Schedule {
    pub peak: f32,
    pub warmup: u64,
    pub decay_start: u64,
    pub decay_end: u64,
    pub decay_min: f32,
    pub tail: Vec<(u64, f32)>,
}

impl DeepSeekV3Schedule {
    /// The paper's shape on a run of `total` steps: 2.2e-4 peak, warmup, constant for the share of
    /// tokens V3 spent at peak (10T of 14.8T), cosine to 2.2e-5 (the next 4.3T), then 2.2e-5 and
    /// 7.3e-6 for the last 333B and 167B.
    pub fn scaled(total: u64, warmup: u64) -> Self {
        let mut s = Self::shaped(2.2e-4, 2.2e-5, total, warmup);
        s.tail[1].1 = 7.3e-6; // the paper's value, not 2.2e-5 x 7.3/22 rounded
        s
    }

    /// The paper's shape with another `peak` and decay target `min`: `min` until 14.633/14.8
    /// of the run, then `min` x 7.3/22 (V3's 7.3e-6 after 2.2e-5).
    pub fn shaped(peak: f32, min: f32, total: u64, warmup: u64) -> Self {
        let at = |tokens_t: f64| (total as f64 * tokens_t / 14.8).round() as u64;
        DeepSeekV3Schedule {
            peak,
            warmup,
            decay_start: at(10.0).max(warmup),
            decay_end: at(14.3).max(warmup),
            decay_min: min,
            tail: vec![(at(14.633), min), (total, (min as f64 * 7.3 / 22.0) as f32)],
        }
    }
}

impl LrSchedule for DeepSeekV3Schedule {
    fn lr_at(&self, position: f64) -> f32 {
        if let Some(lr) = warmup(self.peak, self.warmup, position) {
            return lr;
        }
        if position < self.decay_start as f64 {
            return self.peak;
        }
        if position < self.decay_end as f64 {
            let span = (self.decay_end - self.decay_start).max(1);
            return cosine(self.peak, self.decay_min, (position - self.decay_start as f64) / span as f64);
        }
        for &(until, lr) in &self.tail {
            if position < until as f64 {
                return lr;
            }
        }
        self.tail.last().map_or(self.decay_min, |&(_, lr)| lr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_cosine_endpoints() {
        let s = WarmupCosine { peak: 1.0, min: 0.1, warmup: 10, total: 110 };
        assert!((s.lr(0) - 0.1).abs() < 1e-7);
        assert_eq!(s.lr(9), 1.0);
        assert_eq!(s.lr(10), 1.0);
        assert!((s.lr(60) - 0.55).abs() < 1e-6);
        assert!((s.lr(110) - 0.1).abs() < 1e-7);
        assert!((s.lr(1000) - 0.1).abs() < 1e-7);
    }

    #[test]
    fn deepseek_v3_schedule_pieces() {
        let s = DeepSeekV3Schedule::scaled(14_800, 2_000);
        assert!((s.lr(999) - 1.1e-4).abs() < 1e-9);
        assert_eq!(s.lr(5_000), 2.2e-4);
        assert_eq!(s.lr(9_999), 2.2e-4);
        let mid = s.lr(10_000 + 2_150);
        assert!((mid - (2.2e-5 + 0.5 * (2.2e-4 - 2.2e-5))).abs() < 1e-9, "{mid}");
        assert_eq!(s.lr(14_400), 2.2e-5);
        assert_eq!(s.lr(14_700), 7.3e-6);
        assert_eq!(s.lr(20_000), 7.3e-6);
    }

    #[test]
    fn deepseek_v3_shape_with_another_peak_and_minimum() {
        let s = DeepSeekV3Schedule::shaped(3e-3, 3e-4, 1480, 10);
        assert_eq!((s.decay_start, s.decay_end), (1000, 1430));
        assert_eq!(s.lr(999), 3e-3);
        assert!((s.lr(1215) - 1.65e-3).abs() < 1e-9);
        assert_eq!(s.lr(1430), 3e-4);
        assert_eq!(s.lr(1462), 3e-4);
        assert_eq!(s.lr(1463), (3e-4f32 as f64 * 7.3 / 22.0) as f32);
        // A run shorter than its warmup keeps the pieces in order.
        let short = DeepSeekV3Schedule::shaped(1.0, 0.1, 5, 8);
        assert!(short.decay_start <= short.decay_end && short.lr(7) == 1.0 && short.lr(8) < 1.0);
    }
}
