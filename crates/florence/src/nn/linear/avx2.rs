//! The decoding-step product `x · Wᵀ` written with AVX2 intrinsics, for f32, bf16 and int8
//! weights.
//!
//! A decoding step multiplies a few rows (one per beam) by every weight matrix of the decoder,
//! so each weight is used a few times per read and the product is bound by how fast the weights
//! stream from memory, once they widen fast enough. Two things decide that (measured on the
//! 51289 x 768 lm_head for 3 beams, 2 threads, Zen 3, where a plain sum over as many bytes as
//! the f32 matrix reaches 25-32 GB/s):
//! - a software prefetch 1 KB ahead: the hardware prefetcher alone kept too few reads in flight,
//!   and the compiled portable kernel streamed f32 weights at 16-17 GB/s (9-10 ms), this one at
//!   24-32 GB/s (5-7 ms);
//! - explicit widening: without AVX-512 the portable bf16 and int8 kernels were compute-bound,
//!   at 12-20 ms, slower than f32.
//!
//! Every output sums its products in the same order whatever the number of rows, so a caption
//! does not depend on the batch it is in.

use std::arch::x86_64::*;

use super::Q8_BLOCK;

/// Whether this CPU runs these kernels.
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// Bytes of weights ahead of the current position that are prefetched (512 and 1024 measured
/// alike, 2048 worse, none 1.5-1.8x slower).
const PREFETCH: usize = 1024;

/// A weight row, read 16 values at a time as f32.
trait WeightRow: Copy {
    /// Values `c..c + 16` in f32, and a prefetch of the bytes [`PREFETCH`] past them.
    unsafe fn load16(self, c: usize) -> (__m256, __m256);
}

#[derive(Clone, Copy)]
struct F32Row(*const f32);

impl WeightRow for F32Row {
    #[inline(always)]
    unsafe fn load16(self, c: usize) -> (__m256, __m256) {
        let p = self.0.add(c);
        _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>().wrapping_add(PREFETCH));
        (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
    }
}

#[derive(Clone, Copy)]
struct Bf16Row(*const u16);

impl WeightRow for Bf16Row {
    #[inline(always)]
    unsafe fn load16(self, c: usize) -> (__m256, __m256) {
        let p = self.0.add(c);
        _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>().wrapping_add(PREFETCH));
        // bf16 is the top half of an f32.
        let widen = |h: __m128i| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)));
        (
            widen(_mm_loadu_si128(p.cast())),
            widen(_mm_loadu_si128(p.add(8).cast())),
        )
    }
}

/// Int8 values with one scale per [`Q8_BLOCK`] of them.
#[derive(Clone, Copy)]
struct Q8Row(*const i8, *const f32);

impl WeightRow for Q8Row {
    #[inline(always)]
    unsafe fn load16(self, c: usize) -> (__m256, __m256) {
        let p = self.0.add(c);
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH));
        let scale = _mm256_set1_ps(*self.1.add(c / Q8_BLOCK));
        let q = _mm_loadu_si128(p.cast());
        let widen = |q: __m128i| _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), scale);
        (widen(q), widen(_mm_srli_si128::<8>(q)))
    }
}

/// For f32 weight rows `j0..j0 + out.len() / m`: `out[jj * m + i] = x_i · w_(j0+jj)`, with `x`
/// `[m, k]`.
///
/// # Safety
/// The CPU must have AVX2 and FMA ([`available`]).
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn f32_weight_rows(w: &[f32], k: usize, x: &[f32], m: usize, j0: usize, out: &mut [f32]) {
    assert!((j0 + out.len() / m) * k <= w.len());
    weight_rows(|j| F32Row(w.as_ptr().add(j * k)), k, x, m, j0, out)
}

/// [`f32_weight_rows`] for bf16 weights (the bits of each value).
///
/// # Safety
/// The CPU must have AVX2 and FMA ([`available`]).
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn bf16_weight_rows(w: &[u16], k: usize, x: &[f32], m: usize, j0: usize, out: &mut [f32]) {
    assert!((j0 + out.len() / m) * k <= w.len());
    weight_rows(|j| Bf16Row(w.as_ptr().add(j * k)), k, x, m, j0, out)
}

/// [`f32_weight_rows`] for int8 weights with one scale per [`Q8_BLOCK`] values.
///
/// # Safety
/// The CPU must have AVX2 and FMA ([`available`]).
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn q8_weight_rows(
    values: &[i8],
    scales: &[f32],
    k: usize,
    x: &[f32],
    m: usize,
    j0: usize,
    out: &mut [f32],
) {
    let rows = j0 + out.len() / m;
    assert!(k.is_multiple_of(Q8_BLOCK) && rows * k <= values.len() && rows * k / Q8_BLOCK <= scales.len());
    let blocks = k / Q8_BLOCK;
    weight_rows(
        |j| Q8Row(values.as_ptr().add(j * k), scales.as_ptr().add(j * blocks)),
        k,
        x,
        m,
        j0,
        out,
    )
}

#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn weight_rows<W: WeightRow>(
    row: impl Fn(usize) -> W,
    k: usize,
    x: &[f32],
    m: usize,
    j0: usize,
    out: &mut [f32],
) {
    assert!(k.is_multiple_of(16) && x.len() == m * k && out.len().is_multiple_of(m));
    let rows = out.len() / m;
    if m <= 4 {
        // A decoding step of one image: bound by the weights' stream, read one row after the
        // other so that each row's prefetch warms the next.
        return one_weight_row_at_a_time(&row, k, x, m, j0, out);
    }
    // Batched steps are bound by the input loads instead: two weight rows at a time, three
    // input rows per pass over them (twelve accumulators), so that each input load feeds two
    // products. The sums are the same, bit for bit.
    let mut pairs = out.chunks_exact_mut(2 * m);
    for (p, o) in (&mut pairs).enumerate() {
        let w = [row(j0 + 2 * p), row(j0 + 2 * p + 1)];
        let (o0, o1) = o.split_at_mut(m);
        for (g, (o0, o1)) in o0.chunks_mut(3).zip(o1.chunks_mut(3)).enumerate() {
            dot_group(w, k, x.as_ptr().add(g * 3 * k), [o0, o1]);
        }
    }
    one_weight_row_at_a_time(&row, k, x, m, j0 + rows / 2 * 2, pairs.into_remainder());
}

/// [`weight_rows`] one weight row after the other, by up to four input rows.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn one_weight_row_at_a_time<W: WeightRow>(
    row: &impl Fn(usize) -> W,
    k: usize,
    x: &[f32],
    m: usize,
    j0: usize,
    out: &mut [f32],
) {
    for (jj, o) in out.chunks_exact_mut(m).enumerate() {
        let w = [row(j0 + jj)];
        for (g, o) in o.chunks_mut(4).enumerate() {
            dot_group(w, k, x.as_ptr().add(g * 4 * k), [o]);
        }
    }
}

/// [`dot`] for as many input rows (one to four) as `out` has outputs per weight row.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dot_group<const J: usize, W: WeightRow>(w: [W; J], k: usize, xs: *const f32, out: [&mut [f32]; J]) {
    match out[0].len() {
        4 => dot::<4, J, W>(w, k, xs, out),
        3 => dot::<3, J, W>(w, k, xs, out),
        2 => dot::<2, J, W>(w, k, xs, out),
        _ => dot::<1, J, W>(w, k, xs, out),
    }
}

/// `out[j][r] = x_r · w[j]` for the `R` rows of `xs` (each `k` long, `k` a multiple of 16) and
/// the `J` weight rows `w`, each lane summed as the portable kernel sums it.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dot<const R: usize, const J: usize, W: WeightRow>(w: [W; J], k: usize, xs: *const f32, out: [&mut [f32]; J]) {
    let mut acc = [[[_mm256_setzero_ps(); 2]; R]; J];
    for c in (0..k).step_by(16) {
        let ws = w.map(|w| w.load16(c));
        for r in 0..R {
            let x = xs.add(r * k + c);
            let (x0, x1) = (_mm256_loadu_ps(x), _mm256_loadu_ps(x.add(8)));
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

/// `((v0 + v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7))`: the portable kernel's order.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn reduce(v: __m256) -> f32 {
    let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps::<1>(h, h)))
}
