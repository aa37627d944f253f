//! The training objective.

use candle_core::{DType, Tensor, D};

use super::ops::log_softmax_last_dim;
use crate::error::Result;

/// The summed cross-entropy `Σ mask · -log_softmax(logits)[label]` over every position, as a
/// scalar: `logits` `[B, L, V]` (the full vocabulary), `labels` `[B, L]` `u32` (masked positions
/// hold any valid id), `mask` `[B, L]`, 1 where a position counts and 0 where it is ignored.
pub fn cross_entropy_sum(logits: &Tensor, labels: &Tensor, mask: &Tensor) -> Result<Tensor> {
    // Half-precision logits (mixed precision) are summed in f32, as torch's autocast does.
    let logits = &match logits.dtype() {
        DType::BF16 | DType::F16 => logits.to_dtype(DType::F32)?,
        _ => logits.clone(),
    };
    let log_probs = log_softmax_last_dim(logits)?;
    let picked = log_probs
        .gather(&labels.unsqueeze(D::Minus1)?.contiguous()?, D::Minus1)?
        .squeeze(D::Minus1)?;
    Ok((picked * mask.to_dtype(logits.dtype())?)?.sum_all()?.neg()?)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::tensor::ops::gradcheck;

    fn logits() -> Result<Tensor> {
        let t = Tensor::arange(0u32, 2 * 3 * 5, &Device::Cpu)?.to_dtype(DType::F64)?;
        Ok(((t * 1.7)?.sin()? * 3.0)?.reshape((2, 3, 5))?)
    }

    #[test]
    fn cross_entropy_sum_counts_only_masked_positions() -> Result<()> {
        let logits = logits()?;
        let labels = Tensor::new(&[[4u32, 0, 2], [1, 3, 3]], &Device::Cpu)?;
        let mask = Tensor::new(&[[1f32, 1., 0.], [1., 0., 1.]], &Device::Cpu)?;
        let got = cross_entropy_sum(&logits, &labels, &mask)?.to_scalar::<f64>()?;
        // Written out: -log(exp(x[label]) / Σ exp(x)) per counted position.
        let rows = logits.to_vec3::<f64>()?;
        let mut expected = 0.0;
        for (b, l, label) in [(0, 0, 4), (0, 1, 0), (1, 0, 1), (1, 2, 3)] {
            let row = &rows[b][l];
            expected -= row[label] - row.iter().map(|x| x.exp()).sum::<f64>().ln();
        }
        assert!((got - expected).abs() < 1e-12, "{got} vs {expected}");
        gradcheck::check(|t| cross_entropy_sum(&t[0], &labels, &mask), &[logits], 1e-6, 1e-7)
    }
}
