//! Auxiliary-loss-free load balancing (spec section 2.3) and the load statistic trainers report.

use whale_tensor::Tensor;

use crate::{Error, Result};

/// `b_i += gamma * sign(mean_load - load_i)` in place: overloaded experts become less likely to
/// be chosen, underloaded ones more. `load` must be the step's whole-batch count, one per expert.
pub fn update_balancing_bias(bias: &Tensor, load: &[usize], gamma: f32) -> Result<()> {
    if load.len() != bias.elem_count() {
        return Err(Error::Model(format!(
            "balancing bias update: a load of {} experts for a bias of {}",
            load.len(),
            bias.elem_count()
        )));
    }
    if gamma == 0.0 || load.is_empty() {
        return Ok(());
    }
    let mean = load.iter().sum::<usize>() as f64 / load.len() as f64;
    bias.with_f32_mut(|b| {
        for (b, &l) in b.iter_mut().zip(load) {
            let err = mean - l as f64;
            if err > 0.0 {
                *b += gamma;
            } else if err < 0.0 {
                *b -= gamma;
            }
        }
    })?;
    Ok(())
}

/// Which positions of a `[batch, seq]` batch are real tokens, the rest padding: the MoE layers
/// leave padding out of their load counts (which move the balancing biases and give MaxVio)
/// and balance losses. DeepSeek-V3 packs its data and has none; a row of one document and
/// padding would otherwise count the padding, which all sits at one embedding and context and so
/// crowds a few experts, steering the real tokens away from them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RealTokens {
    batch: usize,
    seq: usize,
    real: Vec<bool>,
}

impl RealTokens {
    /// From next-token `targets` (`[batch, seq]`) whose padding is the end of each row: position
    /// `i` is real when it is the row's first or the previous position's target (not
    /// `ignore`). A prompt masked out of the loss would count as padding here: this is the
    /// pretraining layout (`whale_parallel`'s `DataSource`).
    pub fn from_targets(targets: &Tensor, ignore: i64) -> Result<Self> {
        let [batch, seq] = targets.dims() else {
            return Err(Error::Model(format!("real tokens: targets must be [batch, seq], got {:?}", targets.dims())));
        };
        let (batch, seq) = (*batch, *seq);
        let t = targets.to_vec_i64()?;
        let real = (0..batch * seq).map(|p| p % seq == 0 || t[p - 1] != ignore).collect();
        Ok(RealTokens { batch, seq, real })
    }

    /// Rows of `batch` x `seq` whose first `lengths[b]` positions are real: a prompt and its
    /// completion, whose prompt is masked out of the loss but is real text (SFT's layout).
    pub fn from_lengths(batch: usize, seq: usize, lengths: &[usize]) -> Result<Self> {
        if lengths.len() != batch || lengths.iter().any(|&l| l > seq) {
            return Err(Error::Model(format!(
                "real tokens: row lengths {lengths:?} for a batch of {batch} rows of {seq}"
            )));
        }
        let real = lengths.iter().flat_map(|&l| (0..seq).map(move |i| i < l)).collect();
        Ok(RealTokens { batch, seq, real })
    }

    /// The positions `k..` of each row: MTP depth `k`'s, whose position `i` reads token `i + k`.
    pub fn shifted(&self, k: usize) -> RealTokens {
        let s = self.seq.saturating_sub(k);
        let real =
            (0..self.batch).flat_map(|b| self.real[b * self.seq + self.seq - s..(b + 1) * self.seq].to_vec()).collect();
        RealTokens { batch: self.batch, seq: s, real }
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.batch, self.seq)
    }

    /// Whether token `t` (row-major over `[batch, seq]`) is real.
    pub fn is_real(&self, t: usize) -> bool {
        self.real[t]
    }

    /// Real tokens in row `b`.
    pub fn in_row(&self, b: usize) -> usize {
        self.real[b * self.seq..(b + 1) * self.seq].iter().filter(|&&r| r).count()
    }

    /// As a `[batch * seq, 1]` 0/1 column on `device`.
    pub fn column(&self, device: &whale_tensor::Device) -> Result<Tensor> {
        let v: Vec<f32> = self.real.iter().map(|&r| r as u8 as f32).collect();
        Ok(Tensor::from_vec(v, &[self.real.len(), 1], device)?)
    }
}

/// MaxVio = max_load / mean_load - 1 (0 when perfectly balanced or nothing was routed).
pub fn max_violation(load: &[usize]) -> f64 {
    let total: usize = load.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let mean = total as f64 / load.len() as f64;
    *load.iter().max().unwrap_or(&0) as f64 / mean - 1.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use whale_tensor::{DType, Device};

    #[test]
    fn bias_moves_against_the_load() {
        let b = Tensor::zeros(&[4], DType::F32, &Device::Cpu).unwrap();
        update_balancing_bias(&b, &[10, 2, 4, 4], 0.5).unwrap();
        assert_eq!(b.to_vec_f32().unwrap(), vec![-0.5, 0.5, as_f32(-0.5 * 0.0 + 0.5), 0.5]);
        update_balancing_bias(&b, &[5, 5, 5, 5], 0.5).unwrap();
        assert_eq!(b.to_vec_f32().unwrap(), vec![-0.5, 0.5, 0.5, 0.5], "balanced load: no change");
        assert!((max_violation(&[10, 2, 4, 4]) - 1.0).abs() < 1e-12);
        assert_eq!(max_violation(&[3, 3, 3]), 0.0);
    }

    #[test]
    fn a_load_of_another_expert_count_is_refused_and_moves_nothing() {
        let b = Tensor::zeros(&[8], DType::F32, &Device::Cpu).unwrap();
        let err = update_balancing_bias(&b, &[10, 0], 0.5).unwrap_err().to_string();
        assert!(err.contains("2 experts") && err.contains("bias of 8"), "{err}");
        assert_eq!(b.to_vec_f32().unwrap(), vec![0.0; 8]);
    }

    fn as_f32(x: f64) -> f32 {
        x as f32
    }
}
