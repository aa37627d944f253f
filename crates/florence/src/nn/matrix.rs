//! Weight matrices in f32, bf16 or int8: their formats, quantization and widening back to f32,
//! where they come from (a checkpoint's file mapping or a `VarBuilder`), and their products
//! with a GEMM for many rows and with the decoding-step kernels for a few.

use std::sync::Arc;

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::kernels::bf16::{self, Packed};
use super::kernels::{self, aligned_copy, Weights};
use super::{gemm_f32, with_f32};
use crate::checkpoint::Checkpoint;
use crate::error::Result;

/// How a weight matrix is held in memory, and how its products are computed. Only f32 is
/// token-exact with transformers.
///
/// - f32 weights multiply f32 activations.
/// - bf16 weights multiply activations rounded to bf16 (bf16 compute), summed in f32: on AMX
///   tiles or with AVX512-BF16 where the CPU has them, else with the f32 kernels on the same
///   rounded values, so that results differ between CPUs only in the order of the f32 sums.
/// - int8 weights are widened to f32 as they are read and multiply f32 activations: a quarter
///   of the memory a decoding step streams, the products of the widened matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// As in the checkpoint, exact.
    #[default]
    F32,
    /// bfloat16, rounded to nearest even (the precision Florence-2 checkpoints are often shipped
    /// in), with bf16 compute.
    Bf16,
    /// Weight-only int8: symmetric, one f32 scale per block of [`Q8_BLOCK`] inputs of a row.
    Q8,
}

/// Inputs per int8 block; every Florence-2 width is a multiple of it.
pub const Q8_BLOCK: usize = 32;

/// A `[rows, cols]` weight matrix (`[out, in]` for layers, `[vocab, d]` for embeddings).
#[derive(Debug, Clone)]
pub struct Matrix {
    rows: usize,
    cols: usize,
    data: MatrixData,
}

#[derive(Debug, Clone)]
enum MatrixData {
    F32(F32Values),
    /// Row-major bits, for CPUs without bf16 dot products.
    Bf16(Arc<Vec<u16>>),
    /// Panels for the bf16 tiers' kernels.
    Packed(Arc<Packed>),
    Q8 {
        values: Arc<Vec<i8>>,
        scales: Arc<Vec<f32>>,
    },
}

/// Row-major f32 weights: in memory of their own, or in place in a memory-mapped checkpoint
/// ([`MappedF32`](crate::checkpoint::MappedF32)).
#[derive(Clone)]
pub struct F32Values(Arc<dyn AsRef<[f32]> + Send + Sync>);

impl F32Values {
    /// Values held by anything that lends them as a slice (a `Vec`, a file mapping).
    pub fn new(values: impl AsRef<[f32]> + Send + Sync + 'static) -> Self {
        Self(Arc::new(values))
    }
}

impl std::ops::Deref for F32Values {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        (*self.0).as_ref()
    }
}

impl std::fmt::Debug for F32Values {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "F32Values({} values)", self.len())
    }
}

impl Matrix {
    /// Stores the matrix `w` in `format`. Q8 needs a width that is a multiple of
    /// [`Q8_BLOCK`]; other widths keep bf16.
    pub fn new(w: Tensor, format: WeightFormat) -> Result<Self> {
        let w = w.to_dtype(DType::F32)?;
        let (rows, cols) = w.dims2()?;
        with_f32(&w, |v| Self::stored(v, rows, cols, format))
    }

    /// The `[rows, cols]` matrix of `values` in `format`: held as it is in f32, converted else.
    pub fn from_values(values: F32Values, rows: usize, cols: usize, format: WeightFormat) -> Result<Self> {
        if values.len() != rows * cols {
            return Err(crate::Error::internal(format!(
                "{} values for a {rows}x{cols} matrix",
                values.len()
            )));
        }
        Ok(match format {
            WeightFormat::F32 => Self {
                rows,
                cols,
                data: MatrixData::F32(values),
            },
            _ => Self::stored(&values, rows, cols, format),
        })
    }

    /// `v` (`[rows, cols]`) stored in `format`: copied to a cache-line boundary in f32, converted
    /// on all threads otherwise.
    fn stored(v: &[f32], rows: usize, cols: usize, format: WeightFormat) -> Self {
        let format = if format == WeightFormat::Q8 && !cols.is_multiple_of(Q8_BLOCK) {
            WeightFormat::Bf16
        } else {
            format
        };
        let data = match format {
            WeightFormat::F32 => MatrixData::F32(F32Values::new(aligned_copy(v))),
            // Held in the one layout the CPU's kernels read, never in both.
            WeightFormat::Bf16 if kernels::tier().has_bf16() => {
                MatrixData::Packed(Arc::new(Packed::from_f32(v, rows, cols)))
            }
            WeightFormat::Bf16 => MatrixData::Bf16(
                v.par_iter()
                    .map(|&x| half::bf16::from_f32(x).to_bits())
                    .collect::<Vec<u16>>()
                    .into(),
            ),
            WeightFormat::Q8 => {
                let mut values = vec![0i8; v.len()];
                let mut scales = vec![0f32; v.len() / Q8_BLOCK];
                values
                    .par_chunks_mut(Q8_BLOCK)
                    .zip(scales.par_iter_mut())
                    .zip(v.par_chunks(Q8_BLOCK))
                    .for_each(|((q, s), w)| {
                        let max = w.iter().fold(0f32, |m, x| m.max(x.abs()));
                        *s = max / 127.0;
                        let inv = if max > 0.0 { 127.0 / max } else { 0.0 };
                        for (q, x) in q.iter_mut().zip(w) {
                            *q = round_half_away(x * inv) as i8;
                        }
                    });
                MatrixData::Q8 {
                    values: values.into(),
                    scales: scales.into(),
                }
            }
        };
        Self { rows, cols, data }
    }

    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The matrix in f32 (a copy, widened from reduced formats).
    #[cfg(test)]
    pub fn to_f32(&self, device: &candle_core::Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(self.widened(), (self.rows, self.cols), device)?)
    }

    /// Rows `ids` in f32, `[ids.len(), cols]` (an embedding lookup).
    pub fn rows_f32(&self, ids: &[u32], device: &candle_core::Device) -> Result<Tensor> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.rows) {
            return Err(crate::Error::usage(format!(
                "token id {id} is outside the model's {} embeddings; the tokenizer does not match the model",
                self.rows
            )));
        }
        let mut out = vec![0f32; ids.len() * self.cols];
        self.rows_into(ids.par_iter().map(|&id| id as usize), &mut out);
        Ok(Tensor::from_vec(out, (ids.len(), self.cols), device)?)
    }

    /// The values when the matrix is held in f32.
    pub(super) fn f32_values(&self) -> Option<&[f32]> {
        match &self.data {
            MatrixData::F32(w) => Some(w),
            _ => None,
        }
    }

    /// The whole matrix in f32, row-major.
    fn widened(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.rows_into((0..self.rows).into_par_iter(), &mut out);
        out
    }

    /// Writes rows `ids` (each `< rows`) in f32 to consecutive rows of `out`.
    fn rows_into(&self, ids: impl IndexedParallelIterator<Item = usize>, out: &mut [f32]) {
        let k = self.cols;
        out.par_chunks_mut(k).zip(ids).for_each(|(o, j)| match &self.data {
            MatrixData::F32(w) => o.copy_from_slice(&w[j * k..(j + 1) * k]),
            MatrixData::Bf16(w) => {
                for (o, &b) in o.iter_mut().zip(&w[j * k..(j + 1) * k]) {
                    *o = bf16_to_f32(b);
                }
            }
            MatrixData::Packed(w) => w.row_into(j, o),
            MatrixData::Q8 { values, scales } => {
                let blocks = k / Q8_BLOCK;
                for ((o, q), &s) in o
                    .chunks_exact_mut(Q8_BLOCK)
                    .zip(values[j * k..(j + 1) * k].chunks_exact(Q8_BLOCK))
                    .zip(&scales[j * blocks..(j + 1) * blocks])
                {
                    for (o, &q) in o.iter_mut().zip(q) {
                        *o = q8_to_f32(q, s);
                    }
                }
            }
        });
    }

    /// `x · Wᵀ` for the few rows of `x` (`[m, cols]`, row-major) with the decoding-step kernels,
    /// which stream `W` once. Returns `[m, rows]`.
    pub(super) fn mul_few_rows(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.rows, self.cols);
        match &self.data {
            MatrixData::F32(w) => kernels::few_rows_product(Weights::F32(w), n, k, x, m),
            MatrixData::Bf16(w) => kernels::few_rows_product(Weights::Bf16(w), n, k, &bf16::rounded_rows(x), m),
            MatrixData::Packed(w) => bf16::few_rows(kernels::tier(), w, x, m),
            MatrixData::Q8 { values, scales } => kernels::few_rows_product(Weights::Q8 { values, scales }, n, k, x, m),
        }
    }

    /// `x · Wᵀ` for many rows of `x` (`[m, cols]`, row-major) with a multithreaded GEMM, on
    /// `weight_t` (`[cols, rows]`) when given. Returns `[m, rows]`.
    pub(super) fn mul_many_rows(&self, x: &[f32], m: usize, weight_t: Option<&Tensor>) -> Result<Vec<f32>> {
        let (n, k) = (self.rows, self.cols);
        // Not zeroed: the GEMM writes every element without reading it.
        let mut y: Vec<f32> = Vec::with_capacity(m * n);
        let threads = rayon::current_num_threads();
        let mut product = |w: &[f32], strides: (usize, usize)| {
            // SAFETY: x is [m, k], y has room for [m, n], and w is [n, k] read transposed or [k, n].
            unsafe { gemm_f32(m, n, k, y.as_mut_ptr(), (n, 1), x, (k, 1), w, strides, threads) }
        };
        match (weight_t, &self.data) {
            (Some(wt), _) => with_f32(wt, |w| product(w, (n, 1)))?,
            (None, MatrixData::F32(w)) => product(w, (1, k)),
            (None, MatrixData::Q8 { .. }) => product(&self.widened(), (1, k)),
            (None, MatrixData::Bf16(_)) => return Ok(bf16::f32_many_rows(&self.widened(), n, k, x, m)),
            (None, MatrixData::Packed(w)) => return Ok(bf16::many_rows(kernels::tier(), w, x, m)),
        }
        // SAFETY: the GEMM wrote all m * n elements.
        unsafe { y.set_len(m * n) };
        Ok(y)
    }
}

/// A bf16 value from its bits: bf16 is the top half of an f32, and NaN payloads survive the
/// shift, so no special case is needed.
#[inline(always)]
pub(super) fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// The weight an int8 value `q` of a block with scale `s` stands for: the product rounded to
/// f32, which is what every decoding-step kernel multiplies the inputs by.
#[inline(always)]
pub(super) fn q8_to_f32(q: i8, s: f32) -> f32 {
    q as f32 * s
}

/// `x.round()` (halves away from zero) without the libm call that keeps a loop over it scalar.
#[inline(always)]
fn round_half_away(x: f32) -> f32 {
    let t = x.trunc();
    // x - t is exact, so the comparison decides the same halves as `round`.
    if (x - t).abs() >= 0.5 {
        t + 1f32.copysign(x)
    } else {
        t
    }
}

/// Where a model's weight matrices come from, and the format they are held in.
#[derive(Debug, Clone, Copy)]
pub struct MatrixSource<'a> {
    /// The format every matrix is held in.
    pub format: WeightFormat,
    checkpoint: Option<&'a Checkpoint>,
}

impl<'a> MatrixSource<'a> {
    /// Matrices from `checkpoint`'s file mapping where possible (f32 in the file and held in
    /// f32), else read through the `VarBuilder` they are asked with and converted.
    pub fn new(format: WeightFormat, checkpoint: Option<&'a Checkpoint>) -> Self {
        Self { format, checkpoint }
    }

    /// Matrix `name` under `vb`'s prefix, of shape `[rows, cols]` when `shape` says so.
    pub fn matrix(&self, vb: &VarBuilder, name: &str, shape: Option<(usize, usize)>) -> Result<Matrix> {
        let prefix = vb.prefix();
        let path = if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}.{name}")
        };
        // Only f32 is used in place: a reduced format converted from the mapping would keep the
        // mapped pages resident, as well as their conversion, until the load ends (measured: peak
        // RSS 1245 MB instead of about 660 for base with `--dtype bf16 --quantize q8`).
        let mapped = self.checkpoint.filter(|_| self.format == WeightFormat::F32);
        if let Some((values, &[rows, cols])) = mapped.and_then(|c| c.mapped_f32(&path)) {
            if shape.is_none_or(|s| s == (rows, cols)) {
                return Matrix::from_values(F32Values::new(values), rows, cols, self.format);
            }
        }
        // Other dtypes and layouts, and the errors for wrong shapes, come from the VarBuilder.
        let w = match shape {
            Some(s) => vb.get(s, name)?,
            None => vb.get_unchecked(name)?,
        };
        Matrix::new(w, self.format)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn round_half_away_matches_round() {
        let mut xs = vec![
            0.5f32,
            -0.5,
            1.5,
            -2.5,
            0.49999997,
            -0.49999997,
            126.5,
            -127.0,
            8388607.5,
            0.0,
            -0.0,
        ];
        xs.extend((-3000..3000).map(|i| i as f32 * 0.0417));
        for x in xs {
            assert_eq!(round_half_away(x).to_bits(), x.round().to_bits(), "{x}");
        }
    }

    /// Each int8 value is within half a step of the weight it stands for, and rows read back
    /// through the embedding lookup are the same values.
    #[test]
    fn q8_rounds_each_block_to_its_own_scale() -> Result<()> {
        let dev = Device::Cpu;
        let w = (Tensor::randn(0f32, 1.0, (6, 96), &dev)?
            * Tensor::new(&[[1e-3f32], [1.0], [50.0], [0.0], [1.0], [1.0]], &dev)?.broadcast_as((6, 96))?)?;
        let m = Matrix::new(w.clone(), WeightFormat::Q8)?;
        let back: Vec<Vec<f32>> = m.to_f32(&dev)?.to_vec2()?;
        let orig: Vec<Vec<f32>> = w.to_vec2()?;
        for (r, (a, b)) in orig.iter().zip(&back).enumerate() {
            for (blk_a, blk_b) in a.chunks(Q8_BLOCK).zip(b.chunks(Q8_BLOCK)) {
                let step = blk_a.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
                for (x, y) in blk_a.iter().zip(blk_b) {
                    assert!((x - y).abs() <= step * 0.5 + 1e-12, "row {r}: {x} stored as {y}");
                }
            }
        }
        let rows: Vec<Vec<f32>> = m.rows_f32(&[4, 2], &dev)?.to_vec2()?;
        assert_eq!(rows, vec![back[4].clone(), back[2].clone()]);
        Ok(())
    }
}
