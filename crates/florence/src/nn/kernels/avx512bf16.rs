//! bf16 products with `vdpbf16ps` (AVX512-BF16: Cooper Lake, Sapphire Rapids and later, AMD
//! Zen 4 and later), for any number of rows: the decoding step at the bf16 tiers, and the GEMM
//! where AMX is missing.
//!
//! One instruction adds, in each of 16 f32 lanes (one weight row of a [`Packed`] panel), the
//! products of one pair of inputs; the pair of an input row is broadcast to all lanes. Each
//! output is so summed pair after pair in input order whatever the rows around it, which keeps
//! a row's result independent of its batch.

use std::arch::x86_64::*;

use rayon::prelude::*;

use super::bf16::{packed_rows, Packed, PANEL};

/// Input rows per pass over the weights: eight rows by two panels is 16 accumulators.
const ROWS: usize = 8;

/// `out` shared by tasks that write disjoint elements of it.
#[derive(Clone, Copy)]
pub(super) struct SharedOut(pub(super) *mut f32);

// SAFETY: tasks write disjoint elements only, and the owner waits for all of them.
unsafe impl Send for SharedOut {}
// SAFETY: as for Send.
unsafe impl Sync for SharedOut {}

/// `x · Wᵀ` for the rows of `x` (`[m, k]`) rounded to bf16, on all threads. Returns `[m, n]`.
pub(super) fn rows(w: &Packed, x: &[f32], m: usize) -> Vec<f32> {
    let (n, k) = w.dims();
    let a = packed_rows(x, m, k, 1);
    let mut out = vec![0f32; m * n];
    // A decoding step streams the weights once (all rows in a task), in chunks of two panel
    // pairs; many rows go 64 at a time, so that a task's inputs stay in L2.
    let (row_block, pair_block) = if m <= ROWS { (m.max(1), 2) } else { (64, 4) };
    let pairs = w.panels() / 2;
    let tasks_per_rows = pairs.div_ceil(pair_block);
    let dst = SharedOut(out.as_mut_ptr());
    (0..m.div_ceil(row_block) * tasks_per_rows).into_par_iter().for_each(|t| {
        let rows = (t / tasks_per_rows) * row_block..((t / tasks_per_rows + 1) * row_block).min(m);
        let first = (t % tasks_per_rows) * pair_block;
        for pair in first..(first + pair_block).min(pairs) {
            for i in rows.clone().step_by(ROWS) {
                let r = ROWS.min(rows.end - i);
                // SAFETY: the tier has AVX512-BF16; rows i..i + r of `a` and of `out` exist, and
                // this task alone writes the columns of panel pair `pair` in them.
                unsafe { panel_pair(w, &a, i, r, 2 * pair, dst, n) };
            }
        }
    });
    out
}

/// Rows `i..i + r` (`r <= ROWS`) by panels `p, p + 1`.
///
/// # Safety
/// The CPU has AVX512-BF16; `a` holds rows `i..i + r` of padded width; `dst` is `[_, n]` with
/// rows `i..i + r`, and nobody else writes their columns of these panels meanwhile.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn panel_pair(w: &Packed, a: &[u16], i: usize, r: usize, p: usize, dst: SharedOut, n: usize) {
    // SAFETY: the caller's promises, for the number of rows matched.
    unsafe {
        match r {
            8 => block::<8>(w, a, i, p, dst, n),
            7 => block::<7>(w, a, i, p, dst, n),
            6 => block::<6>(w, a, i, p, dst, n),
            5 => block::<5>(w, a, i, p, dst, n),
            4 => block::<4>(w, a, i, p, dst, n),
            3 => block::<3>(w, a, i, p, dst, n),
            2 => block::<2>(w, a, i, p, dst, n),
            _ => block::<1>(w, a, i, p, dst, n),
        }
    }
}

/// [`panel_pair`] for `R` rows.
///
/// # Safety
/// As for [`panel_pair`] with `r = R`.
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn block<const R: usize>(w: &Packed, a: &[u16], i: usize, p: usize, dst: SharedOut, n: usize) {
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
