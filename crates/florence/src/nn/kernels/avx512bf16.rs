//! bf16 products on [`Packed`] panels with AVX-512, for any number of rows: the decoding step
//! at the bf16 tiers, and the GEMM where AMX is missing. Two ways to multiply:
//!
//! - `vdpbf16ps` (AVX512-BF16: Cooper Lake, Sapphire Rapids, AMD Zen 4 and later) adds, in each
//!   of 16 f32 lanes (one weight row of a panel), the products of one pair of inputs, the pair of
//!   an input row broadcast to all lanes;
//! - f32 FMAs on the panel widened in registers (a shift and a mask per line), the inputs
//!   rounded to bf16: two multiply-adds per pair, each exact product added in input order.
//!
//! Either way each output is summed in input order whatever the rows around it, which keeps a
//! row's result independent of its batch.
//
// Measured on a Sapphire Rapids VM, one thread: `vdpbf16ps` ran at 54 GFLOP/s, a quarter of
// AVX-512 FMA's 105 (its 64 flops take 2.5 cycles, an FMA's 32 half a cycle), so the AMX tier
// (Sapphire Rapids and later) decodes with FMAs; Zen 4 runs `vdpbf16ps` at the FMA's rate.

use std::arch::x86_64::*;

use rayon::prelude::*;

use super::bf16::{packed_rows, padded_k, rounded, Packed, PANEL};

/// Input rows per pass over the weights: eight rows by two panels is 16 accumulators.
const ROWS: usize = 8;

/// `out` shared by tasks that write disjoint elements of it.
#[derive(Clone, Copy)]
pub(super) struct SharedOut(pub(super) *mut f32);

// SAFETY: tasks write disjoint elements only, and the owner waits for all of them.
unsafe impl Send for SharedOut {}
// SAFETY: as for Send.
unsafe impl Sync for SharedOut {}

/// `x · Wᵀ` for the rows of `x` (`[m, k]`) rounded to bf16, with `vdpbf16ps` (`dp`) or FMAs,
/// on all threads. Returns `[m, n]`.
pub(super) fn rows(w: &Packed, x: &[f32], m: usize, dp: bool) -> Vec<f32> {
    let (n, k) = w.dims();
    let a = Inputs {
        bits: if dp { packed_rows(x, m, k, 1) } else { Vec::new() },
        values: if dp { Vec::new() } else { padded_rounded_rows(x, m, k) },
    };
    let mut out = vec![0f32; m * n];
    // A decoding step streams the weights once (all rows in a task), in chunks of two panel
    // pairs; many rows go 64 at a time, so that a task's inputs stay in L2.
    let (row_block, pair_block) = if m <= ROWS { (m.max(1), 2) } else { (64, 4) };
    let pairs = w.panels() / 2;
    let tasks_per_rows = pairs.div_ceil(pair_block);
    let dst = SharedOut(out.as_mut_ptr());
    (0..m.div_ceil(row_block) * tasks_per_rows)
        .into_par_iter()
        .for_each(|t| {
            let rows = (t / tasks_per_rows) * row_block..((t / tasks_per_rows + 1) * row_block).min(m);
            let first = (t % tasks_per_rows) * pair_block;
            for pair in first..(first + pair_block).min(pairs) {
                for i in rows.clone().step_by(ROWS) {
                    let r = ROWS.min(rows.end - i);
                    // SAFETY: the tier has AVX512-BF16; rows i..i + r of `a` and of `out` exist, and
                    // this task alone writes the columns of panel pair `pair` in them.
                    unsafe { panel_pair(w, &a, i, r, 2 * pair, dst, n, dp) };
                }
            }
        });
    out
}

/// The input rows, padded to whole pairs: bf16 bits for `vdpbf16ps`, or rounded f32 values for
/// the FMAs (the other empty).
struct Inputs {
    bits: Vec<u16>,
    values: Vec<f32>,
}

/// The rows of `x` rounded to bf16 in f32, each padded with zeros to [`padded_k`].
fn padded_rounded_rows(x: &[f32], m: usize, k: usize) -> Vec<f32> {
    let kp = padded_k(k);
    let mut out = vec![0f32; m * kp];
    out.par_chunks_mut(kp).zip(x.par_chunks(k)).for_each(|(o, x)| {
        o.iter_mut().zip(x).for_each(|(o, &x)| *o = rounded(x));
    });
    out
}

/// Rows `i..i + r` (`r <= ROWS`) by panels `p, p + 1`.
///
/// # Safety
/// The CPU has AVX512-BF16; `a` holds rows `i..i + r` of padded width in the form `dp` reads;
/// `dst` is `[_, n]` with rows `i..i + r`, and nobody else writes their columns of these panels
/// meanwhile.
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn panel_pair(w: &Packed, a: &Inputs, i: usize, r: usize, p: usize, dst: SharedOut, n: usize, dp: bool) {
    // SAFETY: the caller's promises, for the number of rows matched.
    unsafe {
        match r {
            8 => either::<8>(w, a, i, p, dst, n, dp),
            7 => either::<7>(w, a, i, p, dst, n, dp),
            6 => either::<6>(w, a, i, p, dst, n, dp),
            5 => either::<5>(w, a, i, p, dst, n, dp),
            4 => either::<4>(w, a, i, p, dst, n, dp),
            3 => either::<3>(w, a, i, p, dst, n, dp),
            2 => either::<2>(w, a, i, p, dst, n, dp),
            _ => either::<1>(w, a, i, p, dst, n, dp),
        }
    }
}

/// [`panel_pair`] for `R` rows.
///
/// # Safety
/// As for [`panel_pair`] with `r = R`.
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn either<const R: usize>(w: &Packed, a: &Inputs, i: usize, p: usize, dst: SharedOut, n: usize, dp: bool) {
    // SAFETY: the caller's promises.
    unsafe {
        if dp {
            dp_block::<R>(w, &a.bits, i, p, dst, n)
        } else {
            fma_block::<R>(w, &a.values, i, p, dst, n)
        }
    }
}

/// [`panel_pair`] for `R` rows with FMAs.
///
/// # Safety
/// As for [`panel_pair`] with `r = R`, `a` the rounded values.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn fma_block<const R: usize>(w: &Packed, a: &[f32], i: usize, p: usize, dst: SharedOut, n: usize) {
    let pairs = w.pairs();
    let (w0, w1) = (w.panel(p), w.panel(p + 1));
    let a = &a[i * 2 * pairs..(i + R) * 2 * pairs];
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    let high = _mm512_set1_epi32(0xffff_0000u32 as i32);
    for t in 0..pairs {
        // SAFETY: t < pairs, the length of each panel and of each row's pairs in `a`; a
        // prefetch never faults.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(w0.as_ptr().wrapping_add(t + 8).cast());
            _mm_prefetch::<_MM_HINT_T0>(w1.as_ptr().wrapping_add(t + 8).cast());
            let l0 = _mm512_load_si512(w0.as_ptr().add(t).cast());
            let l1 = _mm512_load_si512(w1.as_ptr().add(t).cast());
            // Input 2t of each weight row is the low half of its 32-bit lane, 2t + 1 the high.
            let even = [l0, l1].map(|l| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(l)));
            let odd = [l0, l1].map(|l| _mm512_castsi512_ps(_mm512_and_si512(l, high)));
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = a.as_ptr().add(r * 2 * pairs + 2 * t);
                let (x0, x1) = (_mm512_set1_ps(*x), _mm512_set1_ps(*x.add(1)));
                for h in 0..2 {
                    acc[h] = _mm512_fmadd_ps(x0, even[h], acc[h]);
                    acc[h] = _mm512_fmadd_ps(x1, odd[h], acc[h]);
                }
            }
        }
    }
    // SAFETY: the caller's promises.
    unsafe { write(acc, i, p, dst, n) }
}

/// [`panel_pair`] for `R` rows with `vdpbf16ps`.
///
/// # Safety
/// As for [`panel_pair`] with `r = R`, `a` the bf16 bits.
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn dp_block<const R: usize>(w: &Packed, a: &[u16], i: usize, p: usize, dst: SharedOut, n: usize) {
    let pairs = w.pairs();
    let (w0, w1) = (w.panel(p), w.panel(p + 1));
    let a = &a[i * 2 * pairs..(i + R) * 2 * pairs];
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for t in 0..pairs {
        // SAFETY: t < pairs, the length of each panel and of each row's pairs in `a`; a
        // prefetch never faults.
        unsafe {
            // Keeps more of the weights' stream in flight than the hardware prefetcher alone
            // (the decoding step is bound by it).
            _mm_prefetch::<_MM_HINT_T0>(w0.as_ptr().wrapping_add(t + 8).cast());
            _mm_prefetch::<_MM_HINT_T0>(w1.as_ptr().wrapping_add(t + 8).cast());
            let b0: __m512bh = std::mem::transmute(_mm512_load_si512(w0.as_ptr().add(t).cast()));
            let b1: __m512bh = std::mem::transmute(_mm512_load_si512(w1.as_ptr().add(t).cast()));
            for (r, acc) in acc.iter_mut().enumerate() {
                let pair = a.as_ptr().add(r * 2 * pairs + 2 * t).cast::<i32>().read_unaligned();
                let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                acc[0] = _mm512_dpbf16_ps(acc[0], x, b0);
                acc[1] = _mm512_dpbf16_ps(acc[1], x, b1);
            }
        }
    }
    // SAFETY: the caller's promises.
    unsafe { write(acc, i, p, dst, n) }
}

/// Writes the accumulators of rows `i..` by panels `p, p + 1` to `dst` (`[_, n]`), the columns
/// past `n` left out.
///
/// # Safety
/// `dst` has rows `i..i + R`, whose columns of these panels nobody else writes meanwhile.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn write<const R: usize>(acc: [[__m512; 2]; R], i: usize, p: usize, dst: SharedOut, n: usize) {
    for (r, acc) in acc.iter().enumerate() {
        for (h, v) in acc.iter().enumerate() {
            let j0 = (p + h) * PANEL;
            let mut lanes = [0f32; PANEL];
            // SAFETY: `lanes` holds 16 f32.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), *v) };
            for (l, &v) in lanes.iter().enumerate().take(n.saturating_sub(j0)) {
                // SAFETY: row i + r and column j0 + l < n are in `dst`, written by this task only.
                unsafe { *dst.0.add((i + r) * n + j0 + l) = v };
            }
        }
    }
}
