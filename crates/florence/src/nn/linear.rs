//! Linear layers: a multithreaded GEMM for many rows (images, prompts) and the decoding-step
//! kernels for the few rows of a step, each with the bias, GELU or residual fused into one pass
//! over the output.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::activation::gelu_f32;
use super::kernels::with_avx2;
use super::matrix::{Matrix, MatrixSource};
use super::with_f32;
use crate::error::Result;

/// What a linear layer's output goes through before it is returned, fused into the one pass
/// that adds the bias (each is otherwise a pass over the output and a new allocation).
#[derive(Debug, Clone, Copy)]
pub enum Epilogue<'a> {
    /// `x·Wᵀ + b`.
    None,
    /// `gelu(x·Wᵀ + b)`: the first layer of an MLP.
    Gelu,
    /// `r + x·Wᵀ + b`: the last layer of a residual branch (`r` has the output's shape).
    Residual(&'a [f32]),
}

/// `nn.Linear`, applied to the last dimension of any-rank input. The bias is used when the
/// checkpoint has one (DaViT's `qkv_bias = false` configs have none).
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`, as stored in checkpoints.
    weight: Matrix,
    /// `[in, out]` f32 copy for narrow inputs, where the GEMM is faster on it than on a view.
    weight_t: Option<Tensor>,
    bias: Option<Vec<f32>>,
}

impl Linear {
    pub fn new(in_dim: usize, out_dim: usize, vb: VarBuilder, weights: MatrixSource) -> Result<Self> {
        let weight = weights.matrix(&vb, "weight", Some((out_dim, in_dim)))?;
        let bias = if vb.contains_tensor("bias") {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Self::from_weights(weight, bias)
    }

    /// A linear map from an `[out, in]` weight and an optional `[out]` bias.
    pub fn from_weights(weight: Matrix, bias: Option<Tensor>) -> Result<Self> {
        // Measured: with 128 inputs (DaViT's first stage) the GEMM runs 20% faster on a
        // contiguous [in, out] matrix; wider layers run as fast on the view and skip the copy.
        let (rows, cols) = weight.dims();
        let weight_t = match weight.f32_values() {
            Some(w) if cols <= 128 => Some(
                Tensor::from_slice(w, (rows, cols), &candle_core::Device::Cpu)?
                    .t()?
                    .contiguous()?,
            ),
            _ => None,
        };
        let bias = bias.map(|b| b.to_dtype(DType::F32)?.to_vec1()).transpose()?;
        Ok(Self { weight, weight_t, bias })
    }

    pub fn out_dim(&self) -> usize {
        self.weight.dims().0
    }

    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    /// `x · Wᵀ + b` with a GEMM, for many rows (images, prompts).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply_tensor(x, |xs, rows| self.apply(xs, rows, false, Epilogue::None))
    }

    /// `gelu(x · Wᵀ + b)`: the first layer of an MLP.
    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        self.apply_tensor(x, |xs, rows| self.apply(xs, rows, false, Epilogue::Gelu))
    }

    /// `residual + x · Wᵀ + b`: the last layer of a residual branch.
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        with_f32(residual, |r| {
            self.apply_tensor(x, |xs, rows| self.apply(xs, rows, false, Epilogue::Residual(r)))
        })?
    }

    /// `x · Wᵀ + b`, then `then`, for the few rows of a decoding step (`x` is `[rows, in]`, one
    /// row per beam), streaming the weight once. Returns `[rows, out]`.
    ///
    /// Each output element is computed the same way whatever the number of rows, and so is the
    /// GEMM's: choosing the kernel by call site rather than by row count is what keeps an image's
    /// caption independent of the batch it is in.
    pub fn forward_decode(&self, x: &[f32], rows: usize, then: Epilogue) -> Result<Vec<f32>> {
        self.apply(x, rows, true, then)
    }

    /// Runs `f` on the rows of `x` (any rank, features last) and shapes its output like `x`
    /// with `out_dim` features.
    fn apply_tensor(&self, x: &Tensor, f: impl FnOnce(&[f32], usize) -> Result<Vec<f32>>) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        dims.pop();
        let rows = dims.iter().product();
        let y = with_f32(x, |xs| f(xs, rows))??;
        dims.push(self.out_dim());
        Ok(Tensor::from_vec(y, dims, x.device())?)
    }

    fn apply(&self, x: &[f32], rows: usize, decode: bool, then: Epilogue) -> Result<Vec<f32>> {
        let (n, k) = self.weight.dims();
        if x.len() != rows * k {
            return Err(crate::Error::internal(format!(
                "a linear layer of {k} inputs got {} values for {rows} rows",
                x.len()
            )));
        }
        let mut y = if decode {
            self.weight.mul_few_rows(x, rows)
        } else {
            self.weight.mul_many_rows(x, rows, self.weight_t.as_ref())?
        };
        let bias = self.bias.as_deref().unwrap_or(&[]);
        match then {
            Epilogue::None => finish(&mut y, n, bias, false, &[]),
            Epilogue::Gelu => finish(&mut y, n, bias, true, &[]),
            Epilogue::Residual(r) if r.len() == y.len() => finish(&mut y, n, bias, false, r),
            Epilogue::Residual(r) => {
                return Err(crate::Error::internal(format!(
                    "residual of {} values for an output of {}",
                    r.len(),
                    y.len()
                )))
            }
        }
        Ok(y)
    }
}

/// Adds `bias` to every `n`-wide row of `y`, then applies GELU (`gelu`) or adds `residual`
/// (when not empty; same shape as `y`), in one parallel pass.
fn finish(y: &mut [f32], n: usize, bias: &[f32], gelu: bool, residual: &[f32]) {
    if bias.is_empty() && !gelu && residual.is_empty() {
        return;
    }
    let rows_per_task = (1 << 14) / n + 1;
    y.par_chunks_mut(rows_per_task * n).enumerate().for_each(|(t, rows)| {
        let r = if residual.is_empty() {
            &[][..]
        } else {
            &residual[t * rows_per_task * n..][..rows.len()]
        };
        finish_rows(rows, n, bias, gelu, r)
    });
}

with_avx2!(
    /// [`finish`] on one task's rows.
    fn finish_rows(y: &mut [f32], n: usize, bias: &[f32], gelu: bool, residual: &[f32]) -> () = finish_rows_portable
);

#[inline(always)]
fn finish_rows_portable(y: &mut [f32], n: usize, bias: &[f32], gelu: bool, residual: &[f32]) {
    for (i, row) in y.chunks_exact_mut(n).enumerate() {
        if !bias.is_empty() {
            row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
        }
        if gelu {
            row.iter_mut().for_each(|v| *v = gelu_f32(*v));
        }
        if !residual.is_empty() {
            row.iter_mut()
                .zip(&residual[i * n..(i + 1) * n])
                .for_each(|(v, r)| *v += r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::kernels::{force_tier, tiers};
    use crate::nn::{WeightFormat, Q8_BLOCK};
    use candle_core::Device;

    /// Both kernels, with each epilogue, equal the product, bias, GELU and residual computed
    /// separately by candle.
    #[test]
    fn few_row_path_matches_gemm() -> Result<()> {
        let dev = Device::Cpu;
        for format in [WeightFormat::F32, WeightFormat::Bf16, WeightFormat::Q8] {
            for (rows, k, n) in [(1, 37, 5), (3, 768, 130), (16, 64, 64)] {
                let x = Tensor::randn(0f32, 1.0, (rows, k), &dev)?;
                let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
                let b = Tensor::randn(0f32, 1.0, n, &dev)?;
                let lin = Linear::from_weights(Matrix::new(w.clone(), format)?, Some(b.clone()))?;
                // The matrix the reduced format stands for, widened independently of the kernels.
                let stored = match (format, k % Q8_BLOCK) {
                    (WeightFormat::F32, _) => w.clone(),
                    (WeightFormat::Bf16, _) | (WeightFormat::Q8, 1..) => {
                        w.to_dtype(DType::BF16)?.to_dtype(DType::F32)?
                    }
                    (WeightFormat::Q8, 0) => lin.weight.to_f32(&dev)?,
                };
                let r = Tensor::randn(0f32, 1.0, (rows, n), &dev)?;
                let (xs, rs): (Vec<f32>, Vec<f32>) = (x.flatten_all()?.to_vec1()?, r.flatten_all()?.to_vec1()?);
                let decode = |then| -> Result<Tensor> {
                    Ok(Tensor::from_vec(lin.forward_decode(&xs, rows, then)?, (rows, n), &dev)?)
                };
                // bf16 weights compute in bf16: the activations are rounded where the product
                // reads them.
                let x_read = match (format, k % Q8_BLOCK) {
                    (WeightFormat::Bf16, _) | (WeightFormat::Q8, 1..) => {
                        x.to_dtype(DType::BF16)?.to_dtype(DType::F32)?
                    }
                    _ => x.clone(),
                };
                let product = x_read.matmul(&stored.t()?)?.broadcast_add(&b)?;
                for (name, y, expected) in [
                    ("gemm", lin.forward(&x)?, product.clone()),
                    ("gemm + gelu", lin.forward_gelu(&x)?, product.gelu_erf()?),
                    ("gemm + residual", lin.forward_residual(&x, &r)?, (&r + &product)?),
                    ("decode", decode(Epilogue::None)?, product.clone()),
                    ("decode + gelu", decode(Epilogue::Gelu)?, product.gelu_erf()?),
                    ("decode + residual", decode(Epilogue::Residual(&rs))?, (&r + &product)?),
                ] {
                    let diff = (y - &expected)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                    assert!(diff < 1e-4, "{format:?} {rows}x{k}x{n} {name}: {diff}");
                }
            }
        }
        Ok(())
    }

    /// A row's decoding-step product is the same bits whether it is computed alone or with
    /// other rows (4-row groups, weight rows in pairs by 3-row groups, remainder groups), at
    /// every kernel tier, which keeps captions independent of batches.
    #[test]
    fn decode_rows_do_not_depend_on_each_other() -> Result<()> {
        let dev = Device::Cpu;
        for tier in tiers() {
            let _forced = force_tier(tier);
            for format in [WeightFormat::F32, WeightFormat::Bf16, WeightFormat::Q8] {
                let (rows, k, n) = (7, 96, 71);
                let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
                let lin = Linear::from_weights(Matrix::new(w, format)?, None)?;
                let xs: Vec<f32> = Tensor::randn(0f32, 1.0, (rows, k), &dev)?.flatten_all()?.to_vec1()?;
                let together = lin.forward_decode(&xs, rows, Epilogue::None)?;
                for (r, expected) in together.chunks(n).enumerate() {
                    let alone = lin.forward_decode(&xs[r * k..(r + 1) * k], 1, Epilogue::None)?;
                    assert_eq!(alone, expected, "{tier:?} {format:?} row {r}");
                }
            }
        }
        Ok(())
    }
}
