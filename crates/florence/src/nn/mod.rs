//! Layers shared by the vision encoder and the language model: weight matrices in f32, bf16 or
//! int8 with the decoding-step kernel that reads them, LayerNorm, GELU, softmax, attention, and
//! the depthwise convolution kernel that replaces candle's grouped convolution (about 75x slower
//! for 3x3 depthwise).
//!
//! These are inference paths: the custom ops have no backward pass.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, D};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use crate::error::Result;

#[cfg(target_arch = "x86_64")]
mod avx512;

/// Defines `$name`, which runs `$portable` compiled for AVX2 + FMA when the CPU has them and
/// as plain code otherwise (runtime dispatch keeps the binary portable).
macro_rules! with_avx2 {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $portable:ident) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn fast($($arg: $ty),*) -> $ret {
                    $portable($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the features were just detected.
                    return unsafe { fast($($arg),*) };
                }
            }
            $portable($($arg),*)
        }
    };
}

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
    F32(Tensor),
    Bf16(Arc<Vec<u16>>),
    Q8 {
        values: Arc<Vec<i8>>,
        scales: Arc<Vec<f32>>,
    },
}

impl Matrix {
    /// Stores the f32 matrix `w` in `format`. Q8 needs a width that is a multiple of
    /// [`Q8_BLOCK`]; other widths keep bf16.
    pub fn new(w: Tensor, format: WeightFormat) -> Result<Self> {
        let (rows, cols) = w.dims2()?;
        let format = if format == WeightFormat::Q8 && cols % Q8_BLOCK != 0 {
            WeightFormat::Bf16
        } else {
            format
        };
        let data = match format {
            WeightFormat::F32 => MatrixData::F32(w.to_dtype(DType::F32)?),
            WeightFormat::Bf16 => MatrixData::Bf16(with_f32(&w, |v| {
                v.par_iter()
                    .map(|&x| half::bf16::from_f32(x).to_bits())
                    .collect::<Vec<u16>>()
                    .into()
            })?),
            WeightFormat::Q8 => {
                let (values, scales) = with_f32(&w, |v| {
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
                    (values, scales)
                })?;
                MatrixData::Q8 {
                    values: values.into(),
                    scales: scales.into(),
                }
            }
        };
        Ok(Self { rows, cols, data })
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The matrix in f32: the stored tensor itself, or a widened copy.
    pub fn to_f32(&self, device: &candle_core::Device) -> Result<Tensor> {
        match &self.data {
            MatrixData::F32(t) => Ok(t.clone()),
            _ => self.rows_f32(&(0..self.rows as u32).collect::<Vec<_>>(), device),
        }
    }

    /// Rows `ids` in f32, `[ids.len(), cols]` (an embedding lookup).
    pub fn rows_f32(&self, ids: &[u32], device: &candle_core::Device) -> Result<Tensor> {
        let k = self.cols;
        if let MatrixData::F32(t) = &self.data {
            return Ok(t.index_select(&Tensor::new(ids, t.device())?, 0)?);
        }
        let mut out = vec![0f32; ids.len() * k];
        out.par_chunks_mut(k).zip(ids.par_iter()).for_each(|(o, &id)| {
            let j = id as usize;
            match &self.data {
                MatrixData::F32(_) => unreachable!("handled above"),
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
            }
        });
        Ok(Tensor::from_vec(out, (ids.len(), k), device)?)
    }

    /// `x · Wᵀ` for the few rows of `x` (`[m, cols]`, row-major), streaming `W` once: each
    /// weight row is read and dotted with every input row. Returns `[m, rows]`.
    fn mul_few_rows(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let w_tensor = match &self.data {
            MatrixData::F32(t) => Some(t.contiguous()?),
            _ => None,
        };
        match &w_tensor {
            Some(t) => with_f32(t, |w| self.mul_few_rows_with(w, x, m)),
            None => Ok(self.mul_few_rows_with(&[], x, m)),
        }
    }

    /// [`mul_few_rows`](Self::mul_few_rows) with the f32 weights, if that is the format, as a slice.
    fn mul_few_rows_with(&self, w_f32: &[f32], x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.rows, self.cols);
        const CHUNK: usize = 64;
        let mut out_t = vec![0f32; n * m];
        let x = &aligned_copy(x);
        #[cfg(target_arch = "x86_64")]
        let avx512 = avx512::available();
        out_t.par_chunks_mut(CHUNK * m).enumerate().for_each(|(c, out)| {
            #[cfg(target_arch = "x86_64")]
            if let (MatrixData::Q8 { values, scales }, true) = (&self.data, avx512) {
                // SAFETY: AVX-512F was detected.
                return unsafe { avx512::q8_weight_rows(values, scales, k, x, m, c * CHUNK, out) };
            }
            let weights = match &self.data {
                MatrixData::F32(_) => RowsRef::F32(w_f32),
                MatrixData::Bf16(w) => RowsRef::Bf16(w),
                MatrixData::Q8 { values, scales } => RowsRef::Q8(values, scales),
            };
            rows_times_weight_rows(weights, k, x, m, c * CHUNK, out);
        });
        let mut out = vec![0f32; m * n];
        for j in 0..n {
            for i in 0..m {
                out[i * n + j] = out_t[j * m + i];
            }
        }
        out
    }

    /// `x · Wᵀ` for many rows of `x` (`[m, k]`, row-major) with a multithreaded GEMM, on
    /// `weight_t` (`[k, rows]`) when given. Returns `[m, rows]`.
    fn mul_many_rows(&self, x: &[f32], m: usize, k: usize, weight_t: Option<&Tensor>) -> Result<Vec<f32>> {
        let n = self.rows;
        let (w, strides) = match weight_t {
            Some(wt) => (wt.clone(), (n, 1)),
            None => (self.to_f32(&candle_core::Device::Cpu)?, (1, k)),
        };
        // Not zeroed: the GEMM writes every element without reading it.
        let mut y: Vec<f32> = Vec::with_capacity(m * n);
        let threads = rayon::current_num_threads();
        with_f32(&w, |w| {
            // SAFETY: x is [m, k], y has room for [m, n], and w is [n, k] read transposed or [k, n].
            unsafe { gemm_f32(m, n, k, y.as_mut_ptr(), (n, 1), x, (k, 1), w, strides, threads) }
        })?;
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
    pub fn new(in_dim: usize, out_dim: usize, vb: VarBuilder, format: WeightFormat) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if vb.contains_tensor("bias") {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Self::from_weights(Matrix::new(weight, format)?, bias)
    }

    /// A linear map from an `[out, in]` weight and an optional `[out]` bias.
    pub fn from_weights(weight: Matrix, bias: Option<Tensor>) -> Result<Self> {
        // Measured: with 128 inputs (DaViT's first stage) the GEMM runs 20% faster on a
        // contiguous [in, out] matrix; wider layers run as fast on the view and skip the copy.
        let weight_t = match &weight.data {
            MatrixData::F32(w) if weight.cols <= 128 => Some(w.t()?.contiguous()?),
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
            self.weight.mul_few_rows(x, rows)?
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

/// Calls `f` with the elements of `t`, an f32 CPU tensor, made contiguous first if needed.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Ok(f(&v[a..b])),
        _ => Err(crate::Error::usage("the model runs on f32 CPU tensors")),
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

with_avx2!(
    /// For weight rows `j0..j0 + out.len() / m`: `out[jj * m + i] = x_i · w_(j0+jj)`.
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
        *o = acc.iter().sum::<f32>() + t;
    }
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
            return Err(crate::Error::usage(format!(
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

/// `Σ f(x_i)` over 16 lanes, so that the sum vectorizes.
#[inline(always)]
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let mut chunks = x.chunks_exact(L);
    for c in &mut chunks {
        for l in 0..L {
            acc[l] += f(c[l]);
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().map(|&v| f(v)).sum::<f32>()
}

/// Exact (erf) GELU, as `nn.GELU()` and BART's "gelu": `x/2 * (1 + erf(x/sqrt(2)))`, within
/// 3e-7 of libm's `erf`, in f32 and without calls, so that loops over it vectorize (candle's
/// version calls libm's scalar `erf` per element: a seventh of the vision encoder's time).
#[inline(always)]
fn gelu_f32(x: f32) -> f32 {
    // erf by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7).
    let a = (x * std::f32::consts::FRAC_1_SQRT_2).abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let erf = 1.0 - poly * exp_f32(-a * a);
    0.5 * x * (1.0 + erf.copysign(x))
}

/// Softmax over the last dimension (inference only: it has no backward pass).
///
/// candle's version calls libm's scalar `expf` per score, which cost about a third of the text
/// encoder's time; this one vectorizes the exponential.
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
fn softmax_rows_portable(rows: &mut [f32], n: usize) {
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

/// A 3x3 depthwise convolution with padding 1 and a bias, fused with its residual:
/// `x + conv(x)`, on channel-last `[B, H, W, C]` maps (DaViT's `ConvPosEnc`).
///
/// Working channel-last lets the inner loop run over contiguous channels and spares the
/// transposes between the token layout and NCHW that a standard convolution needs.
#[derive(Debug, Clone)]
pub struct DepthwiseConv3x3Residual {
    /// Tap-major weights: `weights[t * C + c]` for tap `t = 3 * ky + kx`.
    weights: Vec<f32>,
    bias: Vec<f32>,
}

impl DepthwiseConv3x3Residual {
    /// Loads `weight` `[C, 1, 3, 3]` and `bias` `[C]`.
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        let w = vb.get((channels, 1, 3, 3), "weight")?.to_dtype(DType::F32)?;
        let weights = w.reshape((channels, 9))?.t()?.contiguous()?.flatten_all()?.to_vec1()?;
        let bias = vb.get(channels, "bias")?.to_dtype(DType::F32)?.to_vec1()?;
        Ok(Self { weights, bias })
    }

    /// `x + depthwise_conv3x3(x)` for `x` of shape `[B, H, W, C]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.apply_op1_no_bwd(self)?)
    }
}

impl CustomOp1 for DepthwiseConv3x3Residual {
    fn name(&self) -> &'static str {
        "depthwise-conv3x3-residual"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, h, w, c) = layout.shape().dims4()?;
        if c != self.bias.len() {
            candle_core::bail!("depthwise conv: {c} channels, weights for {}", self.bias.len());
        }
        let src = match (storage, layout.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((start, end))) => &v[start..end],
            _ => candle_core::bail!("depthwise conv needs a contiguous f32 tensor"),
        };
        let mut out = vec![0f32; src.len()];
        let row = w * c;
        out.par_chunks_mut(row).enumerate().for_each(|(by, orow)| {
            let (bi, y) = (by / h, by % h);
            let image = &src[bi * h * row..(bi + 1) * h * row];
            depthwise_row(image, (h, w, c), y, &self.weights, &self.bias, orow);
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

with_avx2!(
    /// Output row `y` of [`DepthwiseConv3x3Residual`] over one `[h, w, c]` image.
    fn depthwise_row(image: &[f32], hwc: (usize, usize, usize), y: usize, weights: &[f32], bias: &[f32], orow: &mut [f32]) -> () = depthwise_row_portable
);

#[inline(always)]
fn depthwise_row_portable(
    image: &[f32],
    (h, w, c): (usize, usize, usize),
    y: usize,
    weights: &[f32],
    bias: &[f32],
    orow: &mut [f32],
) {
    let row = w * c;
    for x in 0..w {
        let o = &mut orow[x * c..(x + 1) * c];
        let centre = &image[y * row + x * c..y * row + (x + 1) * c];
        for ch in 0..c {
            o[ch] = centre[ch] + bias[ch];
        }
        for ky in 0..3 {
            let yy = y as isize + ky as isize - 1;
            if yy < 0 || yy >= h as isize {
                continue;
            }
            for kx in 0..3 {
                let xx = x as isize + kx as isize - 1;
                if xx < 0 || xx >= w as isize {
                    continue;
                }
                let inp = &image[yy as usize * row + xx as usize * c..][..c];
                let k = &weights[(ky * 3 + kx) * c..][..c];
                for ch in 0..c {
                    o[ch] += inp[ch] * k[ch];
                }
            }
        }
    }
}

/// `dst = lhs · rhs` for `[m, k] x [k, n]` f32 matrices given as slices with `(row, column)`
/// strides, on up to `threads` threads of the current pool (1: the calling thread only, for
/// callers that parallelize over many small products).
///
/// # Safety
/// Every index `r * row_stride + c * col_stride` within each matrix's shape must lie in its slice,
/// and for `dst` within its allocation (it is written, never read).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_strides: (usize, usize),
    lhs: &[f32],
    lhs_strides: (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
    threads: usize,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_strides.1 as isize,
        dst_strides.0 as isize,
        false,
        lhs.as_ptr(),
        lhs_strides.1 as isize,
        lhs_strides.0 as isize,
        rhs.as_ptr(),
        rhs_strides.1 as isize,
        rhs_strides.0 as isize,
        0.0,
        1.0,
        false,
        false,
        false,
        if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        },
    )
}

/// Where a decoding step's attention finds one head's keys.
#[derive(Clone, Copy)]
pub(crate) enum Keys<'a> {
    /// As rows like the values: key `s` at `k[starts[s]..][..hd]` (the self-attention cache,
    /// whose rows follow each beam's lineage).
    Rows(&'a [f32]),
    /// Transposed, `[hd, n]` (the encoder memory's keys, fixed for a generation): the scores
    /// are then sums of contiguous rows, with no per-key reduction.
    Transposed(&'a [f32]),
}

/// The keys and values that one head of one group of query rows attends to.
#[derive(Clone, Copy)]
pub(crate) struct HeadKv<'a> {
    pub keys: Keys<'a>,
    /// Value `s` is `values[starts[s]..][..hd]`.
    pub values: &'a [f32],
    /// Offsets of the values, and of the keys when they are rows.
    pub starts: &'a [usize],
}

/// Attention of single query rows, for decoding steps. `q` is `[rows, heads * hd]` (already
/// scaled); rows come in groups of `group` that attend to the same keys (the beams of one
/// image), and `kv(g, h)` gives what head `h` of group `g` attends to. Keys and values should be
/// contiguous per head: strided rows defeat the prefetcher once they come from memory.
/// Returns `[rows, heads * hd]`.
pub(crate) fn attend_rows<'a>(
    q: &[f32],
    heads: usize,
    hd: usize,
    group: usize,
    kv: impl Fn(usize, usize) -> HeadKv<'a> + Sync,
) -> Vec<f32> {
    let d = heads * hd;
    let groups = q.len() / (d * group);
    // Each (group, head) task reads its keys and values once for all the group's rows.
    let parts: Vec<Vec<f32>> = (0..groups * heads)
        .into_par_iter()
        .map(|task| {
            let (g, h) = (task / heads, task % heads);
            let kv = kv(g, h);
            let qs: Vec<f32> = (0..group)
                .flat_map(|j| &q[(g * group + j) * d + h * hd..][..hd])
                .copied()
                .collect();
            let mut scores = vec![0f32; group * kv.starts.len()];
            match kv.keys {
                Keys::Rows(k) => scores_from_rows(&qs, hd, k, kv.starts, &mut scores),
                Keys::Transposed(kt) => scores_from_transposed(&qs, hd, kt, &mut scores),
            }
            let mut o = vec![0f32; group * hd];
            softmax_times_values(&mut scores, kv.values, kv.starts, &mut o);
            o
        })
        .collect();
    let mut out = vec![0f32; q.len()];
    for (task, o) in parts.iter().enumerate() {
        let (g, h) = (task / heads, task % heads);
        for (j, o) in o.chunks_exact(hd).enumerate() {
            out[(g * group + j) * d + h * hd..][..hd].copy_from_slice(o);
        }
    }
    out
}

with_avx2!(
    /// `scores[j * n + s] = q_j · k[starts[s]..][..hd]` for the rows `q_j` of `qs`.
    fn scores_from_rows(qs: &[f32], hd: usize, k: &[f32], starts: &[usize], scores: &mut [f32]) -> () = scores_from_rows_portable
);

#[inline(always)]
fn scores_from_rows_portable(qs: &[f32], hd: usize, k: &[f32], starts: &[usize], scores: &mut [f32]) {
    let n = starts.len();
    for (s, &start) in starts.iter().enumerate() {
        let key = &k[start..][..hd];
        for (j, q) in qs.chunks_exact(hd).enumerate() {
            scores[j * n + s] = dot(q, key);
        }
    }
}

with_avx2!(
    /// `scores[j * n + s] = Σ_i q_j[i] · kt[i * n + s]`: the same scores from `[hd, n]` keys.
    fn scores_from_transposed(qs: &[f32], hd: usize, kt: &[f32], scores: &mut [f32]) -> () = scores_from_transposed_portable
);

#[inline(always)]
fn scores_from_transposed_portable(qs: &[f32], hd: usize, kt: &[f32], scores: &mut [f32]) {
    let n = kt.len() / hd;
    for (q, row) in qs.chunks_exact(hd).zip(scores.chunks_exact_mut(n)) {
        for (i, &qi) in q.iter().enumerate() {
            for (sc, &k) in row.iter_mut().zip(&kt[i * n..(i + 1) * n]) {
                *sc = qi.mul_add(k, *sc);
            }
        }
    }
}

with_avx2!(
    /// Softmax of each row of `scores` (`[group, n]`), then `o_j = Σ_s p_js · v[starts[s]..][..hd]`.
    fn softmax_times_values(scores: &mut [f32], v: &[f32], starts: &[usize], o: &mut [f32]) -> () = softmax_times_values_portable
);

#[inline(always)]
fn softmax_times_values_portable(scores: &mut [f32], v: &[f32], starts: &[usize], o: &mut [f32]) {
    let n = starts.len();
    let hd = o.len() / (scores.len() / n);
    softmax_rows_portable(scores, n);
    for (s, &start) in starts.iter().enumerate() {
        let value = &v[start..][..hd];
        for (j, o) in o.chunks_exact_mut(hd).enumerate() {
            let p = scores[j * n + s];
            for (o, &v) in o.iter_mut().zip(value) {
                *o = p.mul_add(v, *o);
            }
        }
    }
}

/// `a · b` over 16 lanes, so that it vectorizes.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let (ca, cb) = (a.chunks_exact(L), b.chunks_exact(L));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..L {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Scaled dot-product attention over `[.., Lq, D]` x `[.., Lk, D]`, with `q` already scaled.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    // A transposed view: the GEMM reads K in place.
    let scores = q.matmul(&k.transpose(D::Minus2, D::Minus1)?)?;
    Ok(softmax(&scores)?.matmul(v)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::collections::HashMap;

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

    /// The fused kernel equals `x + conv2d(x, groups = C)` computed by candle's reference conv.
    #[test]
    fn depthwise_matches_grouped_conv() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, w, c) = (2, 7, 5, 6);
        let x = Tensor::randn(0f32, 1.0, (b, h, w, c), &dev)?;
        let weight = Tensor::randn(0f32, 1.0, (c, 1, 3, 3), &dev)?;
        let bias = Tensor::randn(0f32, 1.0, c, &dev)?;
        let vb = VarBuilder::from_tensors(
            HashMap::from([
                ("weight".to_string(), weight.clone()),
                ("bias".to_string(), bias.clone()),
            ]),
            DType::F32,
            &dev,
        );
        let ours = DepthwiseConv3x3Residual::new(c, vb)?.forward(&x)?;
        let nchw = x.permute((0, 3, 1, 2))?.contiguous()?;
        let conv = nchw
            .conv2d(&weight, 1, 1, 1, c)?
            .broadcast_add(&bias.reshape((1, c, 1, 1))?)?;
        let expected = (nchw + conv)?.permute((0, 2, 3, 1))?;
        let diff = (ours - expected)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "max diff {diff}");
        Ok(())
    }
}
