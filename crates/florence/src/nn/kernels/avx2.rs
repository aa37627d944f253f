//! The decoding-step kernels written with AVX2 intrinsics, for f32, bf16 and int8 weights.
//!
//! A decoding step multiplies a few rows (one per beam) by every weight matrix of the decoder,
//! so each weight is used a few times per read and the product is bound by how fast the weights
//! stream from memory, once they widen fast enough. Two things decide that: a software prefetch
//! ahead of the weights, which keeps more reads in flight than the hardware prefetcher alone,
//! and explicit widening of bf16 and int8 weights, which the compiler does poorly from the
//! portable kernel.
//
// Measured on the 51289 x 768 lm_head for 3 beams, 2 threads, Zen 3, where a plain sum over as
// many bytes as the f32 matrix reaches 25-32 GB/s: with the prefetch f32 weights streamed at
// 24-32 GB/s (5-7 ms), against 16-17 GB/s (9-10 ms) for the compiled portable kernel; without
// explicit widening the bf16 and int8 kernels were compute-bound, at 12-20 ms, slower than f32.

use std::arch::x86_64::*;

use super::{by_format, Bf16Row, Dot, F32Row, Q8Row, Weights, LANES, Q8_BLOCK};

/// The kernels of [`Tier::Avx2`](super::Tier::Avx2).
pub(super) struct Avx2;

/// Bytes of weights ahead of the current position that are prefetched.
// 512 and 1024 measured alike, 2048 worse, none 1.5-1.8x slower.
const PREFETCH: usize = 1024;

/// For weight rows `j0..j0 + out.len() / m`: `out[jj * m + i] = x_i · w_(j0 + jj)`, with `x`
/// `[m, k]` and `k` a multiple of 16.
#[target_feature(enable = "avx2,fma")]
pub(super) fn weight_rows(w: Weights, k: usize, x: &[f32], m: usize, j0: usize, out: &mut [f32]) {
    assert!(k.is_multiple_of(LANES));
    // SAFETY: this function's features are the tier's, and the width is whole steps.
    unsafe { by_format::<Avx2>(w, k, x, m, j0, out) }
}

/// A weight row read 16 values at a time as f32.
trait Load16: Copy {
    /// Values `c..c + 16` in f32 (lanes 0-7, then 8-15), and a prefetch of the bytes
    /// [`PREFETCH`] past them.
    ///
    /// # Safety
    /// The CPU has AVX2, and `c + 16` is at most the row's length.
    unsafe fn load16(self, c: usize) -> (__m256, __m256);
}

impl Load16 for F32Row<'_> {
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn load16(self, c: usize) -> (__m256, __m256) {
        // SAFETY: values c..c + 16 are in the row (the caller's promise); a prefetch never faults.
        unsafe {
            let p = self.0.as_ptr().add(c);
            _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>().wrapping_add(PREFETCH));
            (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
        }
    }
}

impl Load16 for Bf16Row<'_> {
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn load16(self, c: usize) -> (__m256, __m256) {
        // SAFETY: values c..c + 16 are in the row (the caller's promise); a prefetch never faults.
        let (lo, hi) = unsafe {
            let p = self.0.as_ptr().add(c);
            _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>().wrapping_add(PREFETCH));
            (_mm_loadu_si128(p.cast()), _mm_loadu_si128(p.add(8).cast()))
        };
        // bf16 is the top half of an f32.
        let widen = |h: __m128i| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)));
        (widen(lo), widen(hi))
    }
}

impl Load16 for Q8Row<'_> {
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn load16(self, c: usize) -> (__m256, __m256) {
        // SAFETY: values c..c + 16 are in the row (the caller's promise), so is their block's
        // scale; a prefetch never faults.
        let (q, scale) = unsafe {
            let p = self.values.as_ptr().add(c);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH));
            (_mm_loadu_si128(p.cast()), *self.scales.get_unchecked(c / Q8_BLOCK))
        };
        // Each weight widened, then scaled, as `q8_to_f32`.
        let scale = _mm256_set1_ps(scale);
        let widen = |q: __m128i| _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), scale);
        (widen(q), widen(_mm_srli_si128::<8>(q)))
    }
}

impl<W: Load16> Dot<W> for Avx2 {
    // A decoding step of one image is bound by the weights' stream, read one row after the other
    // so that each row's prefetch warms the next. Batched steps are bound by the input loads
    // instead: two weight rows by three input rows per pass (twelve accumulators) feed two
    // products from each input load.
    const PAIRS_FROM: usize = 5;

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn dot<const R: usize, const J: usize>(w: [W; J], k: usize, xs: &[f32], out: [&mut [f32]; J]) {
        let mut acc = [[[_mm256_setzero_ps(); 2]; R]; J];
        for c in (0..k).step_by(16) {
            // SAFETY: c + 16 <= k, each row's length (the caller's promise).
            let ws = w.map(|w| unsafe { w.load16(c) });
            for r in 0..R {
                // SAFETY: row r < R of xs holds values c..c + 16 (the caller's promise).
                let (x0, x1) = unsafe {
                    let x = xs.as_ptr().add(r * k + c);
                    (_mm256_loadu_ps(x), _mm256_loadu_ps(x.add(8)))
                };
                for (acc, (a, b)) in acc.iter_mut().zip(ws) {
                    acc[r][0] = _mm256_fmadd_ps(a, x0, acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(b, x1, acc[r][1]);
                }
            }
        }
        for (out, acc) in out.into_iter().zip(acc) {
            for (o, [a, b]) in out.iter_mut().zip(acc) {
                *o = reduce(_mm256_add_ps(a, b));
            }
        }
    }
}

/// `((v0 + v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7))`: given lanes `l + 8` already added to
/// lanes `l`, the tree of the module docs.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(super) fn reduce(v: __m256) -> f32 {
    let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps::<1>(h, h)))
}
