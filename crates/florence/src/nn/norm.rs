//! LayerNorm.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::kernels::with_avx2;
use super::{lane_sum, with_f32};
use crate::error::Result;

/// LayerNorm over the last dimension (eps 1e-5 everywhere in Florence-2).
///
/// Computed in two passes (mean, then the variance of the centred values) with vectorized sums;
/// candle's fused version sums `x` and `x²` serially in one pass.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl LayerNorm {
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get(dim, "weight")?.to_dtype(DType::F32)?.to_vec1()?;
        let bias = vb.get(dim, "bias")?.to_dtype(DType::F32)?.to_vec1()?;
        Ok(Self { weight, bias })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let n = self.weight.len();
        if x.dims().last() != Some(&n) {
            return Err(crate::Error::internal(format!(
                "layer norm over {n} features got shape {:?}",
                x.dims()
            )));
        }
        let y = with_f32(x, |x| self.forward_rows(x))?;
        Ok(Tensor::from_vec(y, x.shape(), x.device())?)
    }

    /// The normalized rows of `x` (row-major, `weight.len()` wide).
    pub fn forward_rows(&self, x: &[f32]) -> Vec<f32> {
        let n = self.weight.len();
        let mut y = vec![0f32; x.len()];
        let rows_per_task = (1 << 14) / n + 1;
        y.par_chunks_mut(rows_per_task * n)
            .zip(x.par_chunks(rows_per_task * n))
            .for_each(|(y, x)| layer_norm_rows(x, y, &self.weight, &self.bias));
        y
    }
}

with_avx2!(
    /// LayerNorm (eps 1e-5) of each `gamma.len()`-wide row of `x` into `y`.
    fn layer_norm_rows(x: &[f32], y: &mut [f32], gamma: &[f32], beta: &[f32]) -> () = layer_norm_rows_portable
);

#[inline(always)]
fn layer_norm_rows_portable(x: &[f32], y: &mut [f32], gamma: &[f32], beta: &[f32]) {
    let n = gamma.len();
    for (x, y) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
        let mean = lane_sum(x, |v| v) / n as f32;
        let var = lane_sum(x, |v| (v - mean) * (v - mean)) / n as f32;
        let rstd = 1.0 / (var + 1e-5).sqrt();
        for (((y, &x), g), b) in y.iter_mut().zip(x).zip(gamma).zip(beta) {
            *y = (x - mean) * rstd * g + b;
        }
    }
}
