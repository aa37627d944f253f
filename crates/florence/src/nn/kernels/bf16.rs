//! bf16 compute: products `x · Wᵀ` of bf16 weights and activations rounded to bf16, summed in
//! f32 (what `--dtype bf16` runs).
//!
//! Every tier computes the same products of the same rounded values: each `bf16 · bf16` product
//! is exact in f32, so tiers differ only in the order of the f32 sums (and in the flushing of
//! subnormal bf16 values to zero by the bf16 instructions):
//! - [`Tier::Amx`]: AMX tiles for many rows, `vdpbf16ps` for few;
//! - [`Tier::Avx512Bf16`]: `vdpbf16ps` for both;
//! - the f32 tiers: the activations rounded the same way and the f32 kernels (the GEMM for many
//!   rows, the decoding-step kernels for few) on the weights widened to f32.
//!
//! The bf16 tiers read weights packed once at load in [`Packed`] panels, the layout of an AMX
//! tile and of one `vdpbf16ps` operand alike.

use rayon::prelude::*;

use super::Tier;
use crate::nn::gemm_f32;

/// Columns (weight rows) per panel: the 16 f32 lanes of one AMX tile row or one zmm register.
pub(crate) const PANEL: usize = 16;

/// Inputs per AMX tile step (a tile row holds 32 bf16 values); packed widths are padded to it.
pub(crate) const K_STEP: usize = 32;

/// One pair of inputs `(2t, 2t + 1)` for the 16 weight rows of a panel: `[row][pair element]`,
/// the VNNI layout `tdpbf16ps` reads a B tile row in and `vdpbf16ps` reads an operand in.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct PairLine(pub(crate) [u16; 2 * PANEL]);

/// A `[n, k]` bf16 weight matrix packed for the bf16 tiers: panels of [`PANEL`] weight rows
/// (`n` padded to a whole number of panel pairs with zero rows), each a run of [`PairLine`]s
/// over `k` padded to [`K_STEP`] with zeros. An AMX B tile is then 16 consecutive lines (1 KiB).
pub(crate) struct Packed {
    n: usize,
    k: usize,
    lines: Vec<PairLine>,
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Packed({}x{} bf16)", self.n, self.k)
    }
}

impl Packed {
    /// Packs the row-major `[n, k]` f32 matrix `w`, rounding each value to bf16 (nearest, ties
    /// to even), on all threads.
    pub(crate) fn from_f32(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k);
        let pairs = padded_k(k) / 2;
        let panels = n.div_ceil(2 * PANEL) * 2;
        let mut lines = vec![PairLine([0; 2 * PANEL]); panels * pairs];
        lines.par_chunks_mut(pairs).enumerate().for_each(|(p, panel)| {
            for jj in 0..PANEL.min(n.saturating_sub(p * PANEL)) {
                let row = &w[(p * PANEL + jj) * k..][..k];
                for (c, &v) in row.iter().enumerate() {
                    panel[c / 2].0[2 * jj + c % 2] = round_bf16(v);
                }
            }
        });
        Self { n, k, lines }
    }

    /// `(n, k)`, unpadded.
    pub(crate) fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Pairs of inputs per panel (the padded width over two).
    pub(crate) fn pairs(&self) -> usize {
        padded_k(self.k) / 2
    }

    /// Panels, an even number.
    pub(crate) fn panels(&self) -> usize {
        self.lines.len() / self.pairs()
    }

    /// Panel `p`'s lines.
    pub(crate) fn panel(&self, p: usize) -> &[PairLine] {
        &self.lines[p * self.pairs()..][..self.pairs()]
    }

    /// The bits of weight `(j, c)`.
    #[inline]
    pub(crate) fn get(&self, j: usize, c: usize) -> u16 {
        self.lines[(j / PANEL) * self.pairs() + c / 2].0[2 * (j % PANEL) + c % 2]
    }

    /// Weight row `j` widened to f32.
    pub(crate) fn row_into(&self, j: usize, out: &mut [f32]) {
        for (c, o) in out.iter_mut().enumerate().take(self.k) {
            *o = f32::from_bits((self.get(j, c) as u32) << 16);
        }
    }
}

/// `k` rounded up to whole [`K_STEP`]s.
pub(crate) fn padded_k(k: usize) -> usize {
    k.div_ceil(K_STEP) * K_STEP
}

/// `x` rounded to the nearest bf16, ties to even, as bits; NaN stays NaN (quieted). The same
/// rounding as `half::bf16::from_f32`, written so that a loop over it vectorizes.
#[inline(always)]
pub(crate) fn round_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    // Adding 0x7fff, plus one when the kept part is odd, carries into it exactly when the
    // dropped half is above a half, or a half with an odd kept part.
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// `x` rounded to bf16 and widened back to f32: the value a bf16 product reads.
#[inline(always)]
pub(crate) fn rounded(x: f32) -> f32 {
    f32::from_bits((round_bf16(x) as u32) << 16)
}

/// The rows of `x` (`[m, k]`) rounded to bf16 in f32, for the f32 kernels.
pub(crate) fn rounded_rows(x: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(1 << 14)
        .zip(x.par_chunks(1 << 14))
        .for_each(|(o, x)| o.iter_mut().zip(x).for_each(|(o, &x)| *o = rounded(x)));
    out
}

/// The rows of `x` (`[m, k]`) rounded to bf16 bits, each padded with zeros to [`padded_k`],
/// and zero rows added up to a multiple of `row_multiple`: the bf16 tiers' A operand.
pub(crate) fn packed_rows(x: &[f32], m: usize, k: usize, row_multiple: usize) -> Vec<u16> {
    let kp = padded_k(k);
    let mut out = vec![0u16; m.div_ceil(row_multiple) * row_multiple * kp];
    out.par_chunks_mut(kp).zip(x.par_chunks(k)).for_each(|(o, x)| {
        o.iter_mut().zip(x).for_each(|(o, &x)| *o = round_bf16(x));
    });
    out
}

/// `x · Wᵀ` for many rows of `x` (`[m, k]`), with activations rounded to bf16: on AMX tiles or
/// with `vdpbf16ps` at the bf16 tiers, else with the f32 GEMM on the widened weights.
/// Returns `[m, n]`.
pub(crate) fn many_rows(tier: Tier, w: &Packed, x: &[f32], m: usize) -> Vec<f32> {
    match tier {
        #[cfg(target_arch = "x86_64")]
        Tier::Amx => super::amx::many_rows(w, x, m),
        #[cfg(target_arch = "x86_64")]
        Tier::Avx512Bf16 => super::avx512bf16::rows(w, x, m, true),
        _ => {
            let (n, k) = w.dims();
            let mut wide = vec![0f32; n * k];
            wide.par_chunks_mut(k).enumerate().for_each(|(j, o)| w.row_into(j, o));
            f32_many_rows(&wide, n, k, x, m)
        }
    }
}

/// `x · Wᵀ` for the few rows of a decoding step, with activations rounded to bf16:
/// `vdpbf16ps` at [`Tier::Avx512Bf16`], AVX-512 FMAs on the widened panels at [`Tier::Amx`]
/// (where `vdpbf16ps` is slower), else a plain loop in the FMAs' order (the f32 tiers hold bf16
/// matrices row-major and never pack them; only tests run packed matrices at those tiers).
/// Returns `[m, n]`.
pub(crate) fn few_rows(tier: Tier, w: &Packed, x: &[f32], m: usize) -> Vec<f32> {
    match tier {
        #[cfg(target_arch = "x86_64")]
        Tier::Amx => super::avx512bf16::rows(w, x, m, false),
        #[cfg(target_arch = "x86_64")]
        Tier::Avx512Bf16 => super::avx512bf16::rows(w, x, m, true),
        _ => portable_rows(w, x, m),
    }
}

/// `x · Wᵀ` with `x` rounded to bf16 and the f32 GEMM, for the row-major `[n, k]` f32 weights
/// `w` (bf16 values widened). Returns `[m, n]`.
pub(crate) fn f32_many_rows(w: &[f32], n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
    let x = rounded_rows(x);
    let mut y: Vec<f32> = Vec::with_capacity(m * n);
    let threads = rayon::current_num_threads();
    // SAFETY: x is [m, k], w is [n, k] read transposed, and y has room for [m, n].
    unsafe { gemm_f32(m, n, k, y.as_mut_ptr(), (n, 1), &x, (k, 1), w, (1, k), threads) };
    // SAFETY: the GEMM wrote all m * n elements.
    unsafe { y.set_len(m * n) };
    y
}

/// The reference product: each output the sum of its products in input order, with fused
/// multiply-adds.
fn portable_rows(w: &Packed, x: &[f32], m: usize) -> Vec<f32> {
    let (n, k) = w.dims();
    let x = rounded_rows(x);
    let mut out = vec![0f32; m * n];
    out.par_chunks_mut(n).enumerate().for_each(|(i, o)| {
        let x = &x[i * k..][..k];
        for (j, o) in o.iter_mut().enumerate() {
            *o = x.iter().enumerate().fold(0f32, |acc, (c, &x)| {
                x.mul_add(f32::from_bits((w.get(j, c) as u32) << 16), acc)
            });
        }
    });
    out
}
