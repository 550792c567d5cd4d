//! Rotary position embedding with YaRN frequency correction (spec sections 1.3 and 1.4).

use whale_tensor::{rope_tables, RopeLayout, Tensor};

use crate::config::{yarn_mscale, RopeScaling};
use crate::Result;

/// `theta_i = base^(-2i/dim)` for each rotary pair of a `dim`-wide head, in f64.
fn plain_inv_freq(dim: usize, base: f64) -> Vec<f64> {
    (0..dim / 2).map(|i| 1.0 / base.powf((2 * i) as f64 / dim as f64)).collect()
}

/// Frequencies of one rotary head dimension, and the factor YaRN multiplies cos/sin by.
#[derive(Debug, Clone, PartialEq)]
pub struct RotaryEmbedding {
    pub inv_freq: Vec<f32>,
    /// HF's `attention_scaling`: `m(s, mscale) / m(s, mscale_all_dim)` (1 for V3).
    pub attention_factor: f32,
    pub layout: RopeLayout,
}

impl RotaryEmbedding {
    /// `theta_i = base^(-2i/dim)`, YaRN-corrected when `scaling` is given.
    pub fn new(dim: usize, base: f64, scaling: Option<&RopeScaling>, layout: RopeLayout) -> Self {
        let plain = plain_inv_freq(dim, base);
        let Some(s) = scaling else {
            return RotaryEmbedding {
                inv_freq: plain.iter().map(|&f| f as f32).collect(),
                attention_factor: 1.0,
                layout,
            };
        };
        // Dimension whose wavelength makes `n_rot` turns over the original context.
        let corr_dim = |n_rot: f64| {
            dim as f64 * (s.original_max_position_embeddings as f64 / (n_rot * 2.0 * std::f64::consts::PI)).ln()
                / (2.0 * base.ln())
        };
        // Rounded to whole dimensions unless the config says `truncate: false` (HF's
        // find_correction_range).
        let (low, high) = (corr_dim(s.beta_fast), corr_dim(s.beta_slow));
        let (low, high) = if s.truncate.unwrap_or(true) { (low.floor(), high.ceil()) } else { (low, high) };
        let (low, mut high) = (low.max(0.0), high.min(dim as f64 - 1.0));
        if low == high {
            high += 0.001;
        }
        let inv_freq = plain
            .iter()
            .enumerate()
            .map(|(i, &f)| {
                // ramp = 0 keeps the frequency (extrapolate), 1 divides it by the factor (interpolate).
                let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                (f / s.factor * ramp + f * (1.0 - ramp)) as f32
            })
            .collect();
        let attention_factor = match (s.attention_factor, s.mscale.filter(|&m| m != 0.0)) {
            (Some(a), _) => a,
            (None, Some(m)) if s.mscale_all_dim != 0.0 => {
                yarn_mscale(s.factor, m) / yarn_mscale(s.factor, s.mscale_all_dim)
            }
            _ => yarn_mscale(s.factor, 1.0),
        };
        RotaryEmbedding { inv_freq, attention_factor: attention_factor as f32, layout }
    }

    /// A dense (Llama / Qwen2) checkpoint's: rotate-half pairs, `theta_i = base^(-2i/dim)` with
    /// its config's scaling, attention factor 1.
    pub fn dense(dim: usize, base: f64, scaling: Option<&crate::dense::DenseRopeScaling>) -> Self {
        let plain = plain_inv_freq(dim, base);
        let inv_freq = scaling.map_or(plain.clone(), |s| s.inv_freq(&plain));
        RotaryEmbedding {
            inv_freq: inv_freq.iter().map(|&f| f as f32).collect(),
            attention_factor: 1.0,
            layout: RopeLayout::HalfRotated,
        }
    }

    /// cos/sin tables `[positions, dim/2]`, scaled by the attention factor.
    pub fn tables(&self, positions: &[usize]) -> Result<(Tensor, Tensor)> {
        let (cos, sin) = rope_tables(positions, &self.inv_freq)?;
        if self.attention_factor == 1.0 {
            return Ok((cos, sin));
        }
        Ok((cos.mul_scalar(self.attention_factor)?, sin.mul_scalar(self.attention_factor)?))
    }

    /// Rotates `x`: `[batch, seq, heads, dim]` whose sequence index `i` sits at `positions[i]`.
    pub fn apply(&self, x: &Tensor, positions: &[usize]) -> Result<Tensor> {
        let (cos, sin) = self.tables(positions)?;
        Ok(x.rope(&cos, &sin, self.layout)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DeepSeekV3Config;

    #[test]
    fn yarn_matches_the_spec_numbers_for_v3() {
        let cfg = DeepSeekV3Config::v3_671b();
        let r = RotaryEmbedding::new(64, 10_000.0, cfg.rope_scaling.as_ref(), RopeLayout::Interleaved);
        // Spec 1.4: dims 0-10 unchanged, 23-31 divided by 40, theta'_16 = 5.5e-3, theta'_31 = 3.3338e-6.
        let plain = |i: usize| 10_000f64.powf(-(2.0 * i as f64) / 64.0);
        for i in 0..=10 {
            assert_eq!(r.inv_freq[i], plain(i) as f32);
        }
        for i in 23..32 {
            assert_eq!(r.inv_freq[i], (plain(i) / 40.0) as f32);
        }
        assert!((r.inv_freq[16] as f64 - 5.5e-3).abs() < 5e-5, "{}", r.inv_freq[16]);
        assert!((r.inv_freq[31] as f64 - 3.3338e-6).abs() < 1e-9, "{}", r.inv_freq[31]);
        assert_eq!(r.attention_factor, 1.0);
        // Softmax scale 192^-0.5 * 1.87386 = 0.135234.
        assert!((cfg.softmax_scale() - 0.135234).abs() < 1e-6, "{}", cfg.softmax_scale());
        assert!((DeepSeekV3Config::v2_lite().softmax_scale() - 0.114721).abs() < 1e-6);
        // An explicit attention_factor replaces the computed one (cos/sin only, not the
        // softmax scale), as in HF's `_compute_yarn_parameters`.
        let mut given = cfg.clone();
        given.rope_scaling.as_mut().unwrap().attention_factor = Some(1.25);
        let r = RotaryEmbedding::new(64, 10_000.0, given.rope_scaling.as_ref(), RopeLayout::Interleaved);
        assert_eq!(r.attention_factor, 1.25);
        assert_eq!(given.softmax_scale(), cfg.softmax_scale());
        // Without `mscale` (HF reads None, which is falsy) cos/sin take m(factor, 1) = 1.3689,
        // not the ratio m(factor, 1) / m(factor, mscale_all_dim) = 1 a default of 1 would give.
        let mut absent = cfg.clone();
        absent.rope_scaling.as_mut().unwrap().mscale = None;
        let r = RotaryEmbedding::new(64, 10_000.0, absent.rope_scaling.as_ref(), RopeLayout::Interleaved);
        assert!((r.attention_factor - 1.368_888_8).abs() < 1e-6, "{}", r.attention_factor);
    }

    #[test]
    fn yarn_without_truncation_ramps_between_the_unrounded_correction_dims() {
        // HF's find_correction_range with truncate false: low = 10.47, high = 22.51 for V3's
        // settings, where the rounded range is 10..23.
        let mut cfg = DeepSeekV3Config::v3_671b();
        cfg.rope_scaling.as_mut().unwrap().truncate = Some(false);
        let r = RotaryEmbedding::new(64, 10_000.0, cfg.rope_scaling.as_ref(), RopeLayout::Interleaved);
        let corr = |rot: f64| 64.0 * (4096.0 / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * 10_000f64.ln());
        let (low, high) = (corr(32.0), corr(1.0));
        assert!((low - 10.47).abs() < 0.01 && (high - 22.51).abs() < 0.01, "{low} {high}");
        for i in 0..32 {
            let plain = 10_000f64.powf(-(2.0 * i as f64) / 64.0);
            let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            let want = (plain / 40.0 * ramp + plain * (1.0 - ramp)) as f32;
            assert!((r.inv_freq[i] - want).abs() <= want * 1e-6, "dim {i}: {} vs {want}", r.inv_freq[i]);
        }
        let rounded = RotaryEmbedding::new(
            64,
            10_000.0,
            DeepSeekV3Config::v3_671b().rope_scaling.as_ref(),
            RopeLayout::Interleaved,
        );
        assert_ne!(r.inv_freq[16], rounded.inv_freq[16]);
    }
}
