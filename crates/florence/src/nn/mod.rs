//! Layers shared by the vision encoder and the language model, written for inference: the
//! custom ops have no backward pass.
//!
//! - `matrix`: weight matrices in f32, bf16 or int8, and where they come from;
//! - `linear`: linear layers, with a GEMM for many rows and fused epilogues;
//! - `kernels`: the decoding-step product for a few rows, in tiers of CPU features, and the
//!   switch that runs the other layers' plain code compiled for AVX2;
//! - `norm`: LayerNorm;
//! - `activation`: GELU, softmax and the exponential they share;
//! - `attention`: attention over whole sequences and for single decoding-step rows;
//! - `conv`: channel-last convolutions: the depthwise one that replaces candle's grouped
//!   convolution, and the strided patch embeddings.
//
// candle's grouped convolution was about 75x slower for the 3x3 depthwise one.

use candle_core::{CpuStorage, Tensor};

use crate::error::Result;

mod activation;
mod attention;
mod conv;
mod kernels;
mod linear;
mod matrix;
mod norm;

pub(crate) use activation::{softmax_rows, sum_exp_below};
pub use attention::attention;
pub(crate) use attention::{attend_rows, HeadKv, Keys};
pub use conv::{DepthwiseConv3x3Residual, PatchConv};
pub use linear::{Epilogue, Linear};
pub use matrix::{Matrix, MatrixSource, WeightFormat, Q8_BLOCK};
pub use norm::LayerNorm;

/// Calls `f` with the elements of `t`, an f32 CPU tensor, made contiguous first if needed.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Ok(f(&v[a..b])),
        _ => Err(crate::Error::unsupported(
            "the fast CPU path runs on f32 CPU tensors only",
        )),
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
    // SAFETY: the caller's promise: every index the shapes and strides reach is in bounds.
    unsafe {
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
}
