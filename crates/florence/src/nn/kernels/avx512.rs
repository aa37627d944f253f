//! The int8 decoding-step kernel written with AVX-512 intrinsics, for CPUs that have them.
//!
//! With int8 weights a decoding step is bound by widening the weights to f32 rather than by
//! memory; here 16 weights widen in three instructions (sign-extend, convert, scale), and each
//! block of 32 shares one broadcast of its scale. f32 and bf16 weights stream as fast through
//! the AVX2 kernels.

use std::arch::x86_64::*;

use super::avx2::reduce;
use super::{grouped, Dot, Q8Row, LANES, Q8_BLOCK};

/// The int8 kernels of [`Tier::Avx512`](super::Tier::Avx512).
pub(super) struct Avx512;

/// For int8 weight rows `j0..j0 + out.len() / m` (one scale per [`Q8_BLOCK`] values):
/// `out[jj * m + i] = x_i · w_(j0 + jj)`, with `x` `[m, k]`.
#[target_feature(enable = "avx512f,avx2,fma")]
pub(super) fn q8_weight_rows(values: &[i8], scales: &[f32], k: usize, x: &[f32], m: usize, j0: usize, out: &mut [f32]) {
    assert!(k.is_multiple_of(Q8_BLOCK));
    // SAFETY: this function's features are the tier's, the width is whole blocks, and each row
    // is `k` long.
    unsafe { grouped::<Avx512, _>(|j| Q8Row::of(values, scales, k, j), k, x, m, j0, out) }
}

impl Dot<Q8Row<'_>> for Avx512 {
    // One accumulator of 16 lanes per output makes one chain of dependent multiply-adds per
    // input row; two weight rows at a time keep two chains in flight per input row, as many as
    // the two accumulators per output of the 32-lane kernel this replaced.
    const PAIRS_FROM: usize = 1;

    #[target_feature(enable = "avx512f,avx2,fma")]
    #[inline]
    unsafe fn dot<const R: usize, const J: usize>(w: [Q8Row<'_>; J], k: usize, xs: &[f32], out: [&mut [f32]; J]) {
        const { assert!(Q8_BLOCK == 2 * LANES) };
        let mut acc = [[_mm512_setzero_ps(); R]; J];
        for (blk, c) in (0..k).step_by(Q8_BLOCK).enumerate() {
            // SAFETY: c + 32 <= k, each row's length, and block `blk` is the row's (the caller's
            // promise).
            let ws = w.map(|w| unsafe { widen_block(w, blk, c) });
            for r in 0..R {
                // SAFETY: row r < R of xs holds values c..c + 32 (the caller's promise).
                let (x0, x1) = unsafe {
                    let x = xs.as_ptr().add(r * k + c);
                    (_mm512_loadu_ps(x), _mm512_loadu_ps(x.add(LANES)))
                };
                // Lane l adds column c + l, then c + 16 + l: the order of the module docs.
                for (acc, (a, b)) in acc.iter_mut().zip(ws) {
                    acc[r] = _mm512_fmadd_ps(a, x0, acc[r]);
                    acc[r] = _mm512_fmadd_ps(b, x1, acc[r]);
                }
            }
        }
        for (out, acc) in out.into_iter().zip(acc) {
            for (o, v) in out.iter_mut().zip(acc) {
                // Lanes l + 8 onto lanes l, then the AVX2 kernels' tree.
                let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
                *o = reduce(_mm256_add_ps(_mm512_castps512_ps256(v), hi));
            }
        }
    }
}

/// Values `c..c + 32` of `w` (block `blk`), each widened and then scaled as `q8_to_f32`.
///
/// # Safety
/// The CPU has AVX-512F, and `c + 32` is at most the row's length.
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
unsafe fn widen_block(w: Q8Row<'_>, blk: usize, c: usize) -> (__m512, __m512) {
    // SAFETY: values c..c + 32 and the block's scale are in the row (the caller's promise).
    let (lo, hi, scale) = unsafe {
        let p = w.values.as_ptr().add(c);
        (
            _mm_loadu_si128(p.cast()),
            _mm_loadu_si128(p.add(LANES).cast()),
            *w.scales.get_unchecked(blk),
        )
    };
    let scale = _mm512_set1_ps(scale);
    let widen = |q: __m128i| _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), scale);
    (widen(lo), widen(hi))
}
