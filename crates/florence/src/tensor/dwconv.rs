//! DaViT's depthwise 3x3 convolution (`ConvPosEnc`: `Conv2d(C, C, 3, padding 1, groups C)` with a
//! bias), channel-last and differentiable.
//!
//! candle's grouped `conv2d` splits the input into one convolution per channel: correct, with a
//! backward, but hundreds of small kernels per block. On the CPU this op runs its own kernels,
//! forward and backward, over channel-last `[B, H, W, C]` maps, where the inner loops run over
//! contiguous channels and the blocks' token layout needs no transpose. On other devices (and
//! dtypes) it is nine shifted multiply-adds of plain tensor ops ([`by_taps`]), which candle
//! differentiates and runs on any backend in nine kernels instead of one per channel.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// `depthwise_conv3x3(x)[b, y, x, c] = bias[c] + Σ weight[c, 0, ky, kx] · x[b, y+ky-1, x+kx-1, c]`
/// over the taps inside the map (zero padding 1), for `x` `[B, H, W, C]` channel-last,
/// `weight` `[C, 1, 3, 3]` (the checkpoint's layout) and `bias` `[C]`.
pub fn depthwise_conv3x3(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (_, _, _, c) = x.dims4()?;
    if weight.dims() != [c, 1, 3, 3] || bias.dims() != [c] {
        return Err(Error::internal(format!(
            "a depthwise 3x3 convolution of {c} channels got weight {:?} and bias {:?}",
            weight.dims(),
            bias.dims()
        )));
    }
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        Ok(x.contiguous()?
            .apply_op3(&weight.contiguous()?, &bias.contiguous()?, DepthwiseConv)?)
    } else {
        by_taps(x, weight, bias)
    }
}

/// The same convolution as a sum over the nine taps of shifted views of the zero-padded map.
pub(crate) fn by_taps(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (_, h, w, c) = x.dims4()?;
    let padded = x.pad_with_zeros(1, 1, 1)?.pad_with_zeros(2, 1, 1)?;
    let taps = weight.reshape((c, 9))?;
    let mut y = bias.reshape((1, 1, 1, c))?.broadcast_as(x.shape())?.contiguous()?;
    for k in 0..9 {
        let shifted = padded.narrow(1, k / 3, h)?.narrow(2, k % 3, w)?;
        let tap = taps.narrow(1, k, 1)?.reshape((1, 1, 1, c))?;
        y = (y + shifted.broadcast_mul(&tap)?)?;
    }
    Ok(y)
}

/// The forward op, over `(x, weight, bias)`.
struct DepthwiseConv;

/// The gradient of the input: the same sweep with the taps mirrored, over `(grad_out, weight)`.
struct InputGrad;

/// The gradients of the weight and bias, over `(x, grad_out)`: `[10, C]`, the nine taps
/// row-major (`3 * ky + kx`), then the bias.
struct ParamGrad;

impl CustomOp3 for DepthwiseConv {
    fn name(&self) -> &'static str {
        "depthwise-conv3x3"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l1.shape().dims4()?;
        let out = match s1.dtype() {
            DType::F32 => f32::to_cpu_storage_owned(sweep(
                slice(s1, l1)?,
                dims,
                &taps(slice(s2, l2)?, false),
                Some(slice(s3, l3)?),
            )),
            DType::F64 => f64::to_cpu_storage_owned(sweep(
                slice(s1, l1)?,
                dims,
                &taps(slice(s2, l2)?, false),
                Some(slice(s3, l3)?),
            )),
            d => candle_core::bail!("depthwise conv: unsupported dtype {d:?}"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let grad_x = grad.apply_op2_no_bwd(weight, &InputGrad)?;
        let c = weight.dim(0)?;
        let params = x.apply_op2_no_bwd(&grad, &ParamGrad)?;
        let grad_w = params.narrow(0, 0, 9)?.t()?.reshape((c, 1, 3, 3))?;
        let grad_b = params.get(9)?;
        Ok((Some(grad_x), Some(grad_w), Some(grad_b)))
    }
}

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "depthwise-conv3x3-input-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l1.shape().dims4()?;
        let out = match s1.dtype() {
            DType::F32 => f32::to_cpu_storage_owned(sweep(slice(s1, l1)?, dims, &taps(slice(s2, l2)?, true), None)),
            DType::F64 => f64::to_cpu_storage_owned(sweep(slice(s1, l1)?, dims, &taps(slice(s2, l2)?, true), None)),
            d => candle_core::bail!("depthwise conv: unsupported dtype {d:?}"),
        };
        Ok((out, l1.shape().clone()))
    }
}

impl CustomOp2 for ParamGrad {
    fn name(&self) -> &'static str {
        "depthwise-conv3x3-param-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l1.shape().dims4()?;
        let out = match s1.dtype() {
            DType::F32 => f32::to_cpu_storage_owned(param_grad(slice(s1, l1)?, slice(s2, l2)?, dims)),
            DType::F64 => f64::to_cpu_storage_owned(param_grad(slice(s1, l1)?, slice(s2, l2)?, dims)),
            d => candle_core::bail!("depthwise conv: unsupported dtype {d:?}"),
        };
        Ok((out, Shape::from((10, dims.3))))
    }
}

/// The elements of a contiguous tensor.
fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&s.as_slice::<T>()?[start..end]),
        None => candle_core::bail!("depthwise conv needs contiguous tensors"),
    }
}

/// `[C, 1, 3, 3]` weights as `[9, C]` (tap-major, so the inner loops run over channels);
/// `mirror` reverses the taps, which turns the correlation into its adjoint.
fn taps<T: WithDType>(weight: &[T], mirror: bool) -> Vec<T> {
    let c = weight.len() / 9;
    let mut out = vec![T::from_f64(0.0); 9 * c];
    for ch in 0..c {
        for t in 0..9 {
            let from = if mirror { 8 - t } else { t };
            out[t * c + ch] = weight[ch * 9 + from];
        }
    }
    out
}

/// The map rows `y - 1 ..= y + 1` and columns `x - 1 ..= x + 1` that lie inside an `h x w` map,
/// as `(tap, row, column)`.
fn neighbours(y: usize, x: usize, h: usize, w: usize) -> impl Iterator<Item = (usize, usize, usize)> {
    (0..9).filter_map(move |t| {
        let yy = (y + t / 3).checked_sub(1).filter(|&v| v < h)?;
        let xx = (x + t % 3).checked_sub(1).filter(|&v| v < w)?;
        Some((t, yy, xx))
    })
}

/// The 3x3 correlation of `[B, H, W, C]` `src` with tap-major `taps`, plus `bias`; one task per
/// output row.
fn sweep<T: WithDType>(
    src: &[T],
    (_, h, w, c): (usize, usize, usize, usize),
    taps: &[T],
    bias: Option<&[T]>,
) -> Vec<T> {
    let mut out = vec![T::from_f64(0.0); src.len()];
    if out.is_empty() {
        return out;
    }
    let row = w * c;
    out.par_chunks_mut(row).enumerate().for_each(|(by, orow)| {
        let (img, y) = (by / h, by % h);
        let image = &src[img * h * row..(img + 1) * h * row];
        for (x, o) in orow.chunks_exact_mut(c).enumerate() {
            if let Some(bias) = bias {
                o.copy_from_slice(bias);
            }
            for (t, yy, xx) in neighbours(y, x, h, w) {
                let inp = &image[yy * row + xx * c..][..c];
                let k = &taps[t * c..][..c];
                for ((o, &i), &k) in o.iter_mut().zip(inp).zip(k) {
                    *o += i * k;
                }
            }
        }
    });
    out
}

/// `[10, C]`: `Σ grad[b, y, x, c] · src[b, y+ky-1, x+kx-1, c]` for each tap, then `Σ grad`.
///
/// Each output row sums into its own partial, and the partials are added in row order: the
/// result does not depend on the thread count, so recomputed gradients repeat bit for bit.
fn param_grad<T: WithDType>(src: &[T], grad: &[T], (b, h, w, c): (usize, usize, usize, usize)) -> Vec<T> {
    let row = w * c;
    let mut partial = vec![T::from_f64(0.0); b * h * 10 * c];
    if partial.is_empty() {
        return vec![T::from_f64(0.0); 10 * c];
    }
    partial.par_chunks_mut(10 * c).enumerate().for_each(|(by, acc)| {
        let (img, y) = (by / h, by % h);
        let image = &src[img * h * row..(img + 1) * h * row];
        let grow = &grad[by * row..(by + 1) * row];
        for (x, g) in grow.chunks_exact(c).enumerate() {
            for (t, yy, xx) in neighbours(y, x, h, w) {
                let inp = &image[yy * row + xx * c..][..c];
                for ((a, &i), &g) in acc[t * c..(t + 1) * c].iter_mut().zip(inp).zip(g) {
                    *a += i * g;
                }
            }
            for (a, &g) in acc[9 * c..].iter_mut().zip(g) {
                *a += g;
            }
        }
    });
    let mut out = vec![T::from_f64(0.0); 10 * c];
    out.par_chunks_mut(c).enumerate().for_each(|(t, o)| {
        for p in partial.chunks_exact(10 * c) {
            for (o, &v) in o.iter_mut().zip(&p[t * c..(t + 1) * c]) {
                *o += v;
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::tensor::ops::gradcheck;

    /// candle's grouped convolution on the NCHW map, plus the bias: the reference.
    fn reference(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let c = bias.dim(0)?;
        let y = x
            .permute((0, 3, 1, 2))?
            .contiguous()?
            .conv2d(weight, 1, 1, 1, c)?
            .broadcast_add(&bias.reshape((1, c, 1, 1))?)?;
        Ok(y.permute((0, 2, 3, 1))?)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
        Ok((a - b)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_dtype(DType::F64)?
            .to_scalar()?)
    }

    #[test]
    fn forward_equals_candles_grouped_conv2d() -> Result<()> {
        let dev = Device::Cpu;
        // Maps of one row or column: every tap but the centre row or column is padding.
        for (b, h, w, c) in [(2, 7, 5, 6), (1, 1, 4, 3), (3, 4, 1, 2), (1, 12, 9, 16)] {
            for dtype in [DType::F32, DType::F64] {
                let x = Tensor::randn(0f32, 1.0, (b, h, w, c), &dev)?.to_dtype(dtype)?;
                let weight = Tensor::randn(0f32, 1.0, (c, 1, 3, 3), &dev)?.to_dtype(dtype)?;
                let bias = Tensor::randn(0f32, 1.0, c, &dev)?.to_dtype(dtype)?;
                let ours = depthwise_conv3x3(&x, &weight, &bias)?;
                let diff = max_diff(&ours, &reference(&x, &weight, &bias)?)?;
                assert!(diff < 1e-5, "{dtype:?} {b}x{h}x{w}x{c}: {diff}");
            }
        }
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        for (b, h, w, c) in [(2, 4, 3, 3), (1, 1, 3, 2)] {
            let x = Tensor::randn(0f64, 1.0, (b, h, w, c), &dev)?;
            let weight = Tensor::randn(0f64, 1.0, (c, 1, 3, 3), &dev)?;
            let bias = Tensor::randn(0f64, 1.0, c, &dev)?;
            gradcheck::check(
                |t| depthwise_conv3x3(&t[0], &t[1], &t[2]),
                &[x, weight, bias],
                1e-6,
                1e-7,
            )?;
        }
        Ok(())
    }

    /// The other devices' form equals the CPU kernels, forward and backward.
    #[test]
    fn the_tap_form_equals_the_kernels() -> Result<()> {
        let dev = Device::Cpu;
        for (b, h, w, c) in [(2, 7, 5, 6), (1, 1, 4, 3), (3, 4, 1, 2)] {
            let x = candle_core::Var::randn(0f64, 1.0, (b, h, w, c), &dev)?;
            let weight = candle_core::Var::randn(0f64, 1.0, (c, 1, 3, 3), &dev)?;
            let bias = candle_core::Var::randn(0f64, 1.0, c, &dev)?;
            let probe = Tensor::randn(0f64, 1.0, (b, h, w, c), &dev)?;
            let args = [x.as_tensor(), weight.as_tensor(), bias.as_tensor()];
            let kernel = depthwise_conv3x3(args[0], args[1], args[2])?;
            let taps = by_taps(args[0], args[1], args[2])?;
            assert!(max_diff(&kernel, &taps)? < 1e-12, "{b}x{h}x{w}x{c}");
            let ours = (kernel * &probe)?.sum_all()?.backward()?;
            let theirs = (taps * &probe)?.sum_all()?.backward()?;
            for (i, t) in args.iter().enumerate() {
                let diff = max_diff(ours.get(t).unwrap(), theirs.get(t).unwrap())?;
                assert!(diff < 1e-12, "{b}x{h}x{w}x{c} argument {i}: {diff}");
            }
        }
        Ok(())
    }

    /// The custom backward gives the grouped convolution's gradients, on a non-contiguous
    /// upstream gradient.
    #[test]
    fn gradients_equal_candles_grouped_conv2d() -> Result<()> {
        let dev = Device::Cpu;
        let x = candle_core::Var::randn(0f32, 1.0, (2, 6, 5, 4), &dev)?;
        let weight = candle_core::Var::randn(0f32, 1.0, (4, 1, 3, 3), &dev)?;
        let bias = candle_core::Var::randn(0f32, 1.0, 4, &dev)?;
        let probe = Tensor::randn(0f32, 1.0, (2, 5, 6, 4), &dev)?.transpose(1, 2)?;
        let args = [x.as_tensor(), weight.as_tensor(), bias.as_tensor()];
        let ours = (depthwise_conv3x3(args[0], args[1], args[2])? * &probe)?
            .sum_all()?
            .backward()?;
        let theirs = (reference(args[0], args[1], args[2])? * &probe)?
            .sum_all()?
            .backward()?;
        for (i, t) in args.iter().enumerate() {
            let diff = max_diff(ours.get(t).unwrap(), theirs.get(t).unwrap())?;
            assert!(diff < 1e-4, "argument {i}: {diff}");
        }
        Ok(())
    }
}
