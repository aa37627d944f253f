//! Differentiable building blocks: every operation here is made of candle operations that have
//! a backward pass.
//!
//! candle's fused `layer_norm`, `softmax_last_dim`, `rms_norm` and `sdpa` are built without one:
//! gradients behind them come out as zeros, with no error. The versions here cost a few more
//! passes over memory and keep autograd whole.

use candle_core::{DType, Device, Shape, Tensor, D};
use candle_nn::VarBuilder;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::Result;

/// Layer normalization over the last dimension, with an affine weight and bias.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Reads `weight` and `bias` of size `dim` under `vb`.
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }

    /// Normalizes `x` over its last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// `(x - mean) / sqrt(var + eps) * weight + bias` over the last dimension (biased variance, as
/// torch's `layer_norm`). Half-precision inputs are normalized in f32 (as torch's autocast
/// does): their sums would lose the mean's digits.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if let Some(half) = half_precision(x) {
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        return Ok(layer_norm(&f32(x)?, &f32(weight)?, &f32(bias)?, eps)?.to_dtype(half)?);
    }
    let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let variance = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(variance + eps)?.sqrt()?)?;
    Ok(normed.broadcast_mul(weight)?.broadcast_add(bias)?)
}

/// Softmax over the last dimension. The maximum subtracted for stability is detached: the
/// softmax does not depend on it, so its gradient is exactly zero.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if let Some(half) = half_precision(x) {
        return Ok(softmax_last_dim(&x.to_dtype(DType::F32)?)?.to_dtype(half)?);
    }
    let shifted = x.broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?;
    let exp = shifted.exp()?;
    Ok(exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)?)
}

/// `x`'s dtype when it is bf16 or f16, which the normalizations compute in f32.
fn half_precision(x: &Tensor) -> Option<DType> {
    matches!(x.dtype(), DType::BF16 | DType::F16).then_some(x.dtype())
}

/// Log-softmax over the last dimension (see [`softmax_last_dim`] on the detached maximum).
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let shifted = x.broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?;
    let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&log_sum)?)
}

/// Whether a pass trains (dropout and drop-path active, masks drawn from a seeded generator) or
/// evaluates (both are the identity).
///
/// Masks come from our own generator rather than the device's, so that a segment recomputed
/// for gradient checkpointing, or a run resumed from a checkpoint, draws the same masks again.
#[derive(Debug)]
pub struct Mode {
    rng: Option<StdRng>,
}

impl Mode {
    /// Evaluation: no dropout.
    pub fn eval() -> Self {
        Self { rng: None }
    }

    /// Training, with masks drawn from a generator seeded by `seed`.
    pub fn train(seed: u64) -> Self {
        Self {
            rng: Some(StdRng::seed_from_u64(seed)),
        }
    }

    /// Whether this is a training pass.
    pub fn is_train(&self) -> bool {
        self.rng.is_some()
    }

    /// A mask of `shape` on `device` whose entries are `1 / (1 - p)` with probability `1 - p`
    /// and 0 otherwise; `None` when nothing is dropped (evaluation, or `p == 0`).
    fn keep_mask(&mut self, shape: impl Into<Shape>, p: f64, device: &Device) -> Result<Option<Tensor>> {
        let Some(rng) = self.rng.as_mut().filter(|_| p > 0.0) else {
            return Ok(None);
        };
        let shape = shape.into();
        let scale = (1.0 / (1.0 - p)) as f32;
        let values: Vec<f32> = (0..shape.elem_count())
            .map(|_| if rng.gen::<f64>() < p { 0.0 } else { scale })
            .collect();
        Ok(Some(Tensor::from_vec(values, shape, device)?))
    }
}

/// Dropout with probability `p` (inverted: kept values are scaled by `1 / (1 - p)`).
pub fn dropout(x: &Tensor, p: f64, mode: &mut Mode) -> Result<Tensor> {
    match mode.keep_mask(x.shape(), p, x.device())? {
        Some(mask) => Ok((x * mask.to_dtype(x.dtype())?)?),
        None => Ok(x.clone()),
    }
}

/// Stochastic depth on a residual branch `x` `[B, ...]`: each sample's branch is dropped with
/// probability `p` and kept ones are scaled by `1 / (1 - p)`, as timm's `drop_path`.
pub fn drop_path(x: &Tensor, p: f64, mode: &mut Mode) -> Result<Tensor> {
    let mut shape = vec![1; x.rank()];
    shape[0] = x.dim(0)?;
    match mode.keep_mask(shape, p, x.device())? {
        Some(mask) => Ok(x.broadcast_mul(&mask.to_dtype(x.dtype())?)?),
        None => Ok(x.clone()),
    }
}

#[cfg(test)]
pub(crate) mod gradcheck {
    //! Finite-difference checks of backward passes, in f64.

    use candle_core::{Device, Tensor, Var};

    use crate::error::Result;

    /// Checks the gradient of `sum(f(inputs) * probe)` with respect to every input against
    /// central differences with step `h`, to relative tolerance `tol` (on the largest entry).
    /// `probe` is a fixed random tensor, so every output entry contributes with its own weight.
    pub fn check(f: impl Fn(&[Tensor]) -> Result<Tensor>, inputs: &[Tensor], h: f64, tol: f64) -> Result<()> {
        let vars: Vec<Var> = inputs
            .iter()
            .map(Var::from_tensor)
            .collect::<candle_core::Result<_>>()?;
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = f(&tensors)?;
        let probe = Tensor::randn(0f64, 1.0, out.shape(), &Device::Cpu)?.to_dtype(out.dtype())?;
        let objective = |xs: &[Tensor]| -> Result<f64> {
            Ok(f(xs)?
                .mul(&probe)?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar()?)
        };
        let grads = out.mul(&probe)?.sum_all()?.backward()?;
        for (i, var) in vars.iter().enumerate() {
            let analytic: Vec<f64> = grads
                .get(var.as_tensor())
                .ok_or_else(|| crate::error::Error::internal(format!("input {i} got no gradient")))?
                .flatten_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_vec1()?;
            let base: Vec<f64> = inputs[i].flatten_all()?.to_dtype(candle_core::DType::F64)?.to_vec1()?;
            let mut numeric = Vec::with_capacity(base.len());
            for k in 0..base.len() {
                let at = |delta: f64| -> Result<f64> {
                    let mut moved = base.clone();
                    moved[k] += delta;
                    let t = Tensor::from_vec(moved, inputs[i].shape(), &Device::Cpu)?.to_dtype(inputs[i].dtype())?;
                    let mut xs = inputs.to_vec();
                    xs[i] = t;
                    objective(&xs)
                };
                numeric.push((at(h)? - at(-h)?) / (2.0 * h));
            }
            let scale = numeric.iter().chain(&analytic).fold(1e-12f64, |m, v| m.max(v.abs()));
            let worst = analytic
                .iter()
                .zip(&numeric)
                .map(|(a, n)| (a - n).abs())
                .fold(0f64, f64::max);
            assert!(
                worst <= tol * scale,
                "input {i}: analytic and numeric gradients differ by {worst:e} (scale {scale:e})\n analytic {analytic:?}\n numeric {numeric:?}"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn randn(shape: &[usize], seed: u64) -> Result<Tensor> {
        let mut rng = StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.gen::<f64>() * 2.0 - 1.0).collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }

    #[test]
    fn layer_norm_matches_candles_fused_forward_and_has_a_gradient() -> Result<()> {
        let (x, w, b) = (randn(&[2, 3, 5], 1)?, randn(&[5], 2)?, randn(&[5], 3)?);
        let ours = layer_norm(&x, &w, &b, 1e-5)?;
        let fused = candle_nn::ops::layer_norm(
            &x.to_dtype(DType::F32)?,
            &w.to_dtype(DType::F32)?,
            &b.to_dtype(DType::F32)?,
            1e-5,
        )?;
        let diff = (ours.to_dtype(DType::F32)? - fused)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        gradcheck::check(|t| layer_norm(&t[0], &t[1], &t[2], 1e-5), &[x, w, b], 1e-6, 1e-6)
    }

    #[test]
    fn softmaxes_have_gradients() -> Result<()> {
        let x = (randn(&[3, 4], 4)? * 5.0)?;
        let sum = softmax_last_dim(&x)?.sum(D::Minus1)?.to_vec1::<f64>()?;
        assert!(sum.iter().all(|s| (s - 1.0).abs() < 1e-12));
        gradcheck::check(|t| softmax_last_dim(&t[0]), std::slice::from_ref(&x), 1e-6, 1e-6)?;
        gradcheck::check(|t| log_softmax_last_dim(&t[0]), &[x], 1e-6, 1e-6)
    }

    /// In bf16 (mixed precision) the normalizations compute in f32 through differentiable
    /// casts: values and gradients are the f64 ones at the bf16-rounded inputs, to bf16's
    /// rounding of the outputs (2^-8 relative), and the gradients reach the bf16 inputs.
    #[test]
    fn half_precision_normalizations_keep_their_gradients() -> Result<()> {
        let round = |t: &Tensor| t.to_dtype(DType::BF16)?.to_dtype(DType::F64);
        let (x, w, b) = (
            round(&randn(&[3, 7], 5)?)?,
            round(&randn(&[7], 6)?)?,
            round(&randn(&[7], 7)?)?,
        );
        let probe = randn(&[3, 7], 8)?;
        type Op = fn(&[Tensor]) -> Result<Tensor>;
        let ops: [(&str, Op); 3] = [
            ("layer_norm", |t| layer_norm(&t[0], &t[1], &t[2], 1e-5)),
            ("softmax", |t| softmax_last_dim(&t[0])),
            ("log_softmax", |t| log_softmax_last_dim(&t[0])),
        ];
        for (name, op) in ops {
            let run = |dtype: DType| -> Result<(Tensor, Tensor)> {
                let x = candle_core::Var::from_tensor(&x.to_dtype(dtype)?)?;
                let inputs = [x.as_tensor().clone(), w.to_dtype(dtype)?, b.to_dtype(dtype)?];
                let y = op(&inputs)?;
                let objective = (y.to_dtype(DType::F64)? * &probe)?.sum_all()?;
                let grad = objective.backward()?.get(&x).expect("the input's gradient").clone();
                Ok((y.to_dtype(DType::F64)?, grad.to_dtype(DType::F64)?))
            };
            let ((y, g), (y16, g16)) = (run(DType::F64)?, run(DType::BF16)?);
            let rel = |a: &Tensor, b: &Tensor| -> Result<f64> {
                let scale = b.abs()?.max_all()?.to_scalar::<f64>()?;
                Ok((a - b)?.abs()?.max_all()?.to_scalar::<f64>()? / scale)
            };
            let (dy, dg) = (rel(&y16, &y)?, rel(&g16, &g)?);
            assert!(
                dy < 1e-2 && dg < 2e-2,
                "{name}: values off by {dy:.1e}, gradients by {dg:.1e}"
            );
        }
        Ok(())
    }

    #[test]
    fn dropout_masks_repeat_with_the_seed_and_scale_kept_values() -> Result<()> {
        let x = Tensor::ones((4, 64), DType::F32, &Device::Cpu)?;
        let a = dropout(&x, 0.25, &mut Mode::train(7))?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let b = dropout(&x, 0.25, &mut Mode::train(7))?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(a, b);
        assert!(a.iter().all(|&v| v == 0.0 || v == 1.0 / 0.75));
        let dropped = a.iter().filter(|&&v| v == 0.0).count();
        assert!((32..=96).contains(&dropped), "{dropped} of 256 dropped at p = 0.25");
        let eval = dropout(&x, 0.25, &mut Mode::eval())?.flatten_all()?.to_vec1::<f32>()?;
        assert!(eval.iter().all(|&v| v == 1.0));
        let paths = drop_path(&x, 0.5, &mut Mode::train(3))?.to_vec2::<f32>()?;
        assert!(
            paths.iter().all(|row| row.iter().all(|&v| v == row[0])),
            "one draw per sample"
        );
        Ok(())
    }
}
