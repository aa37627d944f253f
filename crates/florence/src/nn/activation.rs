//! GELU and softmax, vectorized through an exponential written without libm calls.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::kernels::with_avx2;
use super::lane_sum;
use crate::error::Result;

/// Exact (erf) GELU, as `nn.GELU()` and BART's "gelu": `x/2 * (1 + erf(x/sqrt(2)))`, within
/// 3e-7 of libm's `erf`, in f32 and without calls, so that loops over it vectorize (candle's
/// version calls libm's scalar `erf` per element).
// candle's GELU took a seventh of the vision encoder's time.
#[inline(always)]
pub(super) fn gelu_f32(x: f32) -> f32 {
    // erf by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7).
    let a = (x * std::f32::consts::FRAC_1_SQRT_2).abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let erf = 1.0 - poly * exp_f32(-a * a);
    0.5 * x * (1.0 + erf.copysign(x))
}

/// Softmax over the last dimension (inference only: it has no backward pass).
///
/// candle's version calls libm's scalar `expf` per score; this one vectorizes the exponential.
// candle's softmax took about a third of the text encoder's time.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    if x.dtype() != DType::F32 || !x.device().is_cpu() {
        return Ok(candle_nn::ops::softmax_last_dim(x)?);
    }
    Ok(x.contiguous()?.apply_op1_no_bwd(&SoftmaxLastDim)?)
}

struct SoftmaxLastDim;

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "softmax-last-dim-f32"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let src = match (storage, layout.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((start, end))) => &v[start..end],
            _ => candle_core::bail!("softmax: contiguous f32 only"),
        };
        let n = layout.dims().last().copied().unwrap_or(1).max(1);
        let mut out = src.to_vec();
        let rows_per_task = (1 << 14) / n + 1;
        out.par_chunks_mut(rows_per_task * n)
            .for_each(|rows| softmax_rows(rows, n));
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

with_avx2!(
    /// Softmax of each `n`-long row of `rows`, in place.
    pub(crate) fn softmax_rows(rows: &mut [f32], n: usize) -> () = softmax_rows_portable
);

#[inline(always)]
pub(super) fn softmax_rows_portable(rows: &mut [f32], n: usize) {
    const L: usize = 16;
    for row in rows.chunks_exact_mut(n) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let mut acc = [0f32; L];
        let mut chunks = row.chunks_exact_mut(L);
        for c in &mut chunks {
            for l in 0..L {
                c[l] = exp_f32(c[l] - max);
                acc[l] += c[l];
            }
        }
        let mut sum: f32 = 0.0;
        for x in chunks.into_remainder() {
            *x = exp_f32(*x - max);
            sum += *x;
        }
        let sum = acc.iter().sum::<f32>() + sum;
        for x in row.iter_mut() {
            *x /= sum;
        }
    }
}

with_avx2!(
    /// `Σ e^(x - max)` over `row` (with `max` its maximum), vectorized: the normalizer of a
    /// softmax or log-softmax over a vocabulary.
    pub(crate) fn sum_exp_below(row: &[f32], max: f32) -> f32 = sum_exp_below_portable
);

#[inline(always)]
fn sum_exp_below_portable(row: &[f32], max: f32) -> f32 {
    lane_sum(row, |x| exp_f32(x - max))
}

/// `e^x` for `x <= 0` (softmax scores less their maximum) within 2 ulp (Cephes' `expf`: `2^k * e^r`, `|r| <= ln2/2`, degree-7 polynomial),
/// written without calls or branches so that loops over it vectorize. `x` below the smallest
/// normal result gives 0.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    let xc = x.clamp(-87.33, 88.0);
    let k = (xc * std::f32::consts::LOG2_E + 0.5).floor();
    let r = xc - k * 0.693_359_4 + k * 2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^k from the bits of k + 127 + 2^23, whose low mantissa bits hold k + 127 (in 0..=255 after
    // the clamp): unlike `k as i32`, which saturates, this vectorizes.
    let scaled = y * f32::from_bits((k + (127.0 + 8_388_608.0)).to_bits() << 23);
    if x < -87.33 {
        0.0
    } else {
        scaled
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn exp_and_softmax_match_libm() -> Result<()> {
        for i in -40000..=0 {
            let x = i as f32 * 0.0025;
            let (ours, libm) = (exp_f32(x), x.exp());
            assert!(
                (ours - libm).abs() <= 2.0 * f32::EPSILON * libm + 2.0 * f32::MIN_POSITIVE,
                "exp({x}) = {ours}, libm gives {libm}"
            );
        }
        assert_eq!((exp_f32(-100.0), exp_f32(f32::NEG_INFINITY)), (0.0, 0.0));
        let dev = Device::Cpu;
        for shape in [(3, 7), (2, 577), (5, 16)] {
            let x = Tensor::randn(0f32, 4.0, shape, &dev)?;
            let diff = (softmax(&x)? - candle_nn::ops::softmax_last_dim(&x)?)?
                .abs()?
                .flatten_all()?
                .max(0)?;
            assert!(diff.to_scalar::<f32>()? < 1e-6, "{shape:?}");
        }
        Ok(())
    }

    #[test]
    fn gelu_matches_libm_erf() {
        let xs: Vec<f32> = (-4000..=4000)
            .map(|i| i as f32 * 0.0025)
            .chain([-30.0, -9.0, 9.0, 30.0])
            .collect();
        let t = Tensor::new(xs.as_slice(), &Device::Cpu).unwrap();
        let reference: Vec<f32> = t.gelu_erf().unwrap().to_vec1().unwrap();
        for (&x, b) in xs.iter().zip(&reference) {
            let a = gelu_f32(x);
            assert!(
                (a - b).abs() <= 3e-7 * (1.0 + x.abs()),
                "gelu({x}) = {a}, libm gives {b}"
            );
        }
    }
}
