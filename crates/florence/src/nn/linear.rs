//! Weight matrices in f32, bf16 or int8, and linear layers: a multithreaded GEMM for many rows
//! (images, prompts) and a kernel that streams the weights once for the few rows of a decoding
//! step, each with the bias, GELU or residual fused into one pass over the output.

use std::sync::Arc;

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::activation::gelu_f32;
use super::{gemm_f32, with_f32};
use crate::checkpoint::Checkpoint;
use crate::error::Result;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

/// How a weight matrix is held in memory. Products are computed in f32 whatever the format:
/// reduced formats are widened as they are read, which halves (bf16) or quarters (q8) the memory
/// a decoding step streams. Only f32 is token-exact with transformers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// As in the checkpoint, exact.
    #[default]
    F32,
    /// bfloat16, rounded to nearest even (the precision Florence-2 checkpoints are often shipped in).
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
    Bf16(Arc<Vec<u16>>),
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
            return Err(crate::Error::usage(format!(
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

    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The matrix in f32 (a copy, widened from reduced formats).
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
            MatrixData::Bf16(w) => widen_bf16(&w[j * k..(j + 1) * k], o),
            MatrixData::Q8 { values, scales } => {
                let blocks = k / Q8_BLOCK;
                for ((o, q), s) in o
                    .chunks_exact_mut(Q8_BLOCK)
                    .zip(values[j * k..(j + 1) * k].chunks_exact(Q8_BLOCK))
                    .zip(&scales[j * blocks..(j + 1) * blocks])
                {
                    for (o, &q) in o.iter_mut().zip(q) {
                        *o = q as f32 * s;
                    }
                }
            }
        });
    }

    /// `x · Wᵀ` for the few rows of `x` (`[m, cols]`, row-major), streaming `W` once: each
    /// weight row is read and dotted with every input row. Returns `[m, rows]`.
    fn mul_few_rows(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.rows, self.cols);
        const CHUNK: usize = 64;
        let mut out_t = vec![0f32; n * m];
        let x = &aligned_copy(x);
        let weights = self.rows_ref();
        out_t
            .par_chunks_mut(CHUNK * m)
            .enumerate()
            .for_each(|(c, out)| weight_rows_times_rows(weights, k, x, m, c * CHUNK, out));
        let mut out = vec![0f32; m * n];
        for j in 0..n {
            for i in 0..m {
                out[i * n + j] = out_t[j * m + i];
            }
        }
        out
    }

    fn rows_ref(&self) -> RowsRef<'_> {
        match &self.data {
            MatrixData::F32(w) => RowsRef::F32(w),
            MatrixData::Bf16(w) => RowsRef::Bf16(w),
            MatrixData::Q8 { values, scales } => RowsRef::Q8(values, scales),
        }
    }

    /// `x · Wᵀ` for many rows of `x` (`[m, k]`, row-major) with a multithreaded GEMM, on
    /// `weight_t` (`[k, rows]`) when given. Returns `[m, rows]`.
    fn mul_many_rows(&self, x: &[f32], m: usize, k: usize, weight_t: Option<&Tensor>) -> Result<Vec<f32>> {
        let n = self.rows;
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
            (None, _) => product(&self.widened(), (1, k)),
        }
        // SAFETY: the GEMM wrote all m * n elements.
        unsafe { y.set_len(m * n) };
        Ok(y)
    }
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

/// 16 floats on a 64-byte boundary.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct CacheLine([f32; 16]);

/// A copy of `x` that starts on a cache line. The decoding-step kernels load each input row
/// once per weight row; when rows are 64-byte multiples, as all of Florence-2's are, no load
/// then straddles two lines (measured: the int8 lm_head product took 4.3 ms instead of 2.5
/// when the input happened to be misaligned).
fn aligned_copy(x: &[f32]) -> AlignedF32 {
    let mut lines = vec![CacheLine([0.0; 16]); x.len().div_ceil(16)];
    for (line, v) in lines.iter_mut().zip(x.chunks(16)) {
        line.0[..v.len()].copy_from_slice(v);
    }
    AlignedF32 { lines, len: x.len() }
}

struct AlignedF32 {
    lines: Vec<CacheLine>,
    len: usize,
}

impl AsRef<[f32]> for AlignedF32 {
    fn as_ref(&self) -> &[f32] {
        self
    }
}

impl std::ops::Deref for AlignedF32 {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        // SAFETY: CacheLine is 16 f32s with no padding, and `len` is within the lines.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.len) }
    }
}

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
        let weight_t = match &weight.data {
            MatrixData::F32(w) if weight.cols <= 128 => Some(
                Tensor::from_slice(w, (weight.rows, weight.cols), &candle_core::Device::Cpu)?
                    .t()?
                    .contiguous()?,
            ),
            _ => None,
        };
        let bias = bias.map(|b| b.to_dtype(DType::F32)?.to_vec1()).transpose()?;
        Ok(Self { weight, weight_t, bias })
    }

    pub fn out_dim(&self) -> usize {
        self.weight.rows
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
        let (n, k) = (self.weight.rows, self.weight.cols);
        if x.len() != rows * k {
            return Err(crate::Error::usage(format!(
                "a linear layer of {k} inputs got {} values for {rows} rows",
                x.len()
            )));
        }
        let mut y = if decode {
            self.weight.mul_few_rows(x, rows)
        } else {
            self.weight.mul_many_rows(x, rows, k, self.weight_t.as_ref())?
        };
        let bias = self.bias.as_deref().unwrap_or(&[]);
        match then {
            Epilogue::None => finish(&mut y, n, bias, false, &[]),
            Epilogue::Gelu => finish(&mut y, n, bias, true, &[]),
            Epilogue::Residual(r) if r.len() == y.len() => finish(&mut y, n, bias, false, r),
            Epilogue::Residual(r) => {
                return Err(crate::Error::usage(format!(
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

/// The weight rows of a [`Matrix`], borrowed for a decoding-step product.
#[derive(Clone, Copy)]
enum RowsRef<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
    Q8(&'a [i8], &'a [f32]),
}

/// For weight rows `j0..j0 + out.len() / m`: `out[jj * m + i] = x_i · w_(j0+jj)`, with the
/// intrinsics kernels where the CPU has them.
fn weight_rows_times_rows(w: RowsRef, k: usize, x: &[f32], m: usize, j0: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = avx2::available() && k.is_multiple_of(16);
        // SAFETY (all four): the features were detected, and rows are whole 16-value chunks.
        match w {
            RowsRef::Q8(values, scales) if avx512::available() => {
                return unsafe { avx512::q8_weight_rows(values, scales, k, x, m, j0, out) }
            }
            RowsRef::Q8(values, scales) if avx2 => {
                return unsafe { avx2::q8_weight_rows(values, scales, k, x, m, j0, out) }
            }
            RowsRef::F32(w) if avx2 => return unsafe { avx2::f32_weight_rows(w, k, x, m, j0, out) },
            RowsRef::Bf16(w) if avx2 => return unsafe { avx2::bf16_weight_rows(w, k, x, m, j0, out) },
            _ => {}
        }
    }
    rows_times_weight_rows(w, k, x, m, j0, out)
}

with_avx2!(
    /// The portable kernel of [`weight_rows_times_rows`].
    fn rows_times_weight_rows(w: RowsRef, k: usize, x: &[f32], m: usize, j0: usize, out: &mut [f32]) -> () = rows_times_weight_rows_portable
);

#[inline(always)]
fn rows_times_weight_rows_portable(w: RowsRef, k: usize, x: &[f32], m: usize, j0: usize, out: &mut [f32]) {
    for (jj, o) in out.chunks_exact_mut(m).enumerate() {
        let j = j0 + jj;
        // Up to four input rows share each load (and widening) of the weight row.
        for (g, o) in o.chunks_mut(4).enumerate() {
            let xs = &x[g * 4 * k..(g * 4 + o.len()) * k];
            match o.len() {
                4 => dot_rows::<4>(w, j, k, xs, o),
                3 => dot_rows::<3>(w, j, k, xs, o),
                2 => dot_rows::<2>(w, j, k, xs, o),
                _ => dot_rows::<1>(w, j, k, xs, o),
            }
        }
    }
}

/// Lanes per accumulator. Each output sums in the same order whatever the number of rows, so
/// batches and single images agree bit for bit.
const LANES: usize = 16;

/// `out[r] = xs_r · w_j` for the `R` rows of `xs` (each `k` long), reading weight row `j` once
/// and widening it in registers.
#[inline(always)]
fn dot_rows<const R: usize>(w: RowsRef, j: usize, k: usize, xs: &[f32], out: &mut [f32]) {
    let mut acc = [[0f32; LANES]; R];
    let whole = k / LANES * LANES;
    let mut tail = [0f32; R];
    match w {
        RowsRef::F32(w) => {
            let w = &w[j * k..(j + 1) * k];
            for c in (0..whole).step_by(LANES) {
                let wc: &[f32; LANES] = w[c..c + LANES].try_into().expect("whole chunk");
                fma_rows(&mut acc, wc, xs, k, c);
            }
            for (r, t) in tail.iter_mut().enumerate() {
                *t = (whole..k).map(|i| xs[r * k + i] * w[i]).sum();
            }
        }
        RowsRef::Bf16(w) => {
            let w = &w[j * k..(j + 1) * k];
            for c in (0..whole).step_by(LANES) {
                let wc: &[u16; LANES] = w[c..c + LANES].try_into().expect("whole chunk");
                fma_rows(&mut acc, &wc.map(bf16_bits_to_f32), xs, k, c);
            }
            for (r, t) in tail.iter_mut().enumerate() {
                *t = (whole..k).map(|i| xs[r * k + i] * bf16_bits_to_f32(w[i])).sum();
            }
        }
        RowsRef::Q8(q, s) => {
            // Whole blocks only: sum each block unscaled, then add it times its scale.
            let blocks = k / Q8_BLOCK;
            let (q, s) = (&q[j * k..(j + 1) * k], &s[j * blocks..(j + 1) * blocks]);
            for (blk, (qb, &sb)) in q.chunks_exact(Q8_BLOCK).zip(s).enumerate() {
                let mut part = [[0f32; LANES]; R];
                for h in 0..Q8_BLOCK / LANES {
                    let c = blk * Q8_BLOCK + h * LANES;
                    let qc: &[i8; LANES] = qb[h * LANES..(h + 1) * LANES].try_into().expect("whole chunk");
                    fma_rows(&mut part, &qc.map(|q| q as f32), xs, k, c);
                }
                for (acc, part) in acc.iter_mut().zip(&part) {
                    for l in 0..LANES {
                        acc[l] = part[l].mul_add(sb, acc[l]);
                    }
                }
            }
        }
    }
    for ((o, acc), t) in out.iter_mut().zip(&acc).zip(tail) {
        *o = reduce_lanes(acc) + t;
    }
}

/// The sum of an accumulator's lanes as a tree, in the order the SIMD kernels add them.
#[inline(always)]
fn reduce_lanes(acc: &[f32; LANES]) -> f32 {
    let v: [f32; 8] = std::array::from_fn(|l| acc[l] + acc[l + 8]);
    let h: [f32; 4] = std::array::from_fn(|l| v[l] + v[l + 4]);
    (h[0] + h[2]) + (h[1] + h[3])
}

/// `acc[r] += xs_r[c..c + LANES] * w` for each row `r`, with fused multiply-adds.
#[inline(always)]
fn fma_rows<const R: usize>(acc: &mut [[f32; LANES]; R], w: &[f32; LANES], xs: &[f32], k: usize, c: usize) {
    for (r, acc) in acc.iter_mut().enumerate() {
        let x: &[f32; LANES] = xs[r * k + c..r * k + c + LANES].try_into().expect("whole chunk");
        for l in 0..LANES {
            acc[l] = x[l].mul_add(w[l], acc[l]);
        }
    }
}

/// bf16 is the top half of an f32; NaN payloads survive the shift, so no special case is needed.
#[inline(always)]
fn bf16_bits_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

fn widen_bf16(src: &[u16], dst: &mut [f32]) {
    for (o, &b) in dst.iter_mut().zip(src) {
        *o = bf16_bits_to_f32(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
                let product = x.matmul(&stored.t()?)?.broadcast_add(&b)?;
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

    /// A row's decoding-step product is the same bits whether it is computed alone or with
    /// other rows (4-row groups, a remainder group), which keeps captions independent of batches.
    #[test]
    fn decode_rows_do_not_depend_on_each_other() -> Result<()> {
        let dev = Device::Cpu;
        for format in [WeightFormat::F32, WeightFormat::Bf16, WeightFormat::Q8] {
            let (rows, k, n) = (7, 96, 70);
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
            let lin = Linear::from_weights(Matrix::new(w, format)?, None)?;
            let xs: Vec<f32> = Tensor::randn(0f32, 1.0, (rows, k), &dev)?.flatten_all()?.to_vec1()?;
            let together = lin.forward_decode(&xs, rows, Epilogue::None)?;
            for (r, expected) in together.chunks(n).enumerate() {
                let alone = lin.forward_decode(&xs[r * k..(r + 1) * k], 1, Epilogue::None)?;
                assert_eq!(alone, expected, "{format:?} row {r}");
            }
        }
        Ok(())
    }

    /// The intrinsics kernels add each output's products in the portable kernel's order: f32
    /// and bf16 weights give the same bits either way (int8 scales in another order, within
    /// rounding).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_kernels_equal_the_portable_kernel() -> Result<()> {
        assert!(avx2::available(), "this test needs a CPU with AVX2 and FMA");
        let dev = Device::Cpu;
        // Input rows in whole and partial groups, weight rows in pairs and with one left over.
        for (m, n) in [(5, 40), (7, 41), (1, 3), (3, 1)] {
            let k = 96;
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
            let x: Vec<f32> = Tensor::randn(0f32, 1.0, (m, k), &dev)?.flatten_all()?.to_vec1()?;
            for format in [WeightFormat::F32, WeightFormat::Bf16, WeightFormat::Q8] {
                let mat = Matrix::new(w.clone(), format)?;
                let (mut portable, mut fast) = (vec![0f32; n * m], vec![0f32; n * m]);
                rows_times_weight_rows_portable(mat.rows_ref(), k, &x, m, 0, &mut portable);
                weight_rows_times_rows(mat.rows_ref(), k, &x, m, 0, &mut fast);
                if format == WeightFormat::Q8 {
                    for (a, b) in portable.iter().zip(&fast) {
                        assert!(
                            (a - b).abs() <= 1e-5 * (1.0 + a.abs()),
                            "{format:?} {m}x{n}: {a} vs {b}"
                        );
                    }
                } else {
                    assert_eq!(portable, fast, "{format:?} {m}x{n}");
                }
            }
        }
        Ok(())
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
