//! The decoding-step kernel in plain Rust, for any CPU and any width: the order the intrinsics
//! kernels follow, written out. It runs compiled for AVX2 where the tier allows
//! ([`with_avx2`]), which changes its speed, not its bits.

use super::super::matrix::bf16_to_f32;
use super::{by_format, q8_to_f32, with_avx2, Bf16Row, Dot, F32Row, Q8Row, Weights, LANES, Q8_BLOCK};

/// The kernels of [`Tier::Portable`](super::Tier::Portable).
pub(super) struct Portable;

with_avx2!(
    /// For weight rows `j0..j0 + out.len() / m`: `out[jj * m + i] = x_i · w_(j0 + jj)`, with `x`
    /// `[m, k]`.
    pub(super) fn weight_rows(w: Weights, k: usize, x: &[f32], m: usize, j0: usize, out: &mut [f32]) -> () = weight_rows_inline
);

#[inline(always)]
fn weight_rows_inline(w: Weights, k: usize, x: &[f32], m: usize, j0: usize, out: &mut [f32]) {
    // SAFETY: these kernels need no CPU feature, and take any width.
    unsafe { by_format::<Portable>(w, k, x, m, j0, out) }
}

/// A weight row in f32, read [`LANES`] values at a time or one by one.
trait Widen: Copy {
    /// Values `c..c + LANES`.
    fn lanes(self, c: usize) -> [f32; LANES];

    /// Value `i`.
    fn at(self, i: usize) -> f32;
}

impl Widen for F32Row<'_> {
    #[inline(always)]
    fn lanes(self, c: usize) -> [f32; LANES] {
        self.0[c..c + LANES].try_into().expect("whole chunk")
    }

    #[inline(always)]
    fn at(self, i: usize) -> f32 {
        self.0[i]
    }
}

impl Widen for Bf16Row<'_> {
    #[inline(always)]
    fn lanes(self, c: usize) -> [f32; LANES] {
        let b: &[u16; LANES] = self.0[c..c + LANES].try_into().expect("whole chunk");
        b.map(bf16_to_f32)
    }

    #[inline(always)]
    fn at(self, i: usize) -> f32 {
        bf16_to_f32(self.0[i])
    }
}

impl Widen for Q8Row<'_> {
    #[inline(always)]
    fn lanes(self, c: usize) -> [f32; LANES] {
        // A whole chunk lies in one block: blocks are whole chunks.
        const { assert!(Q8_BLOCK.is_multiple_of(LANES)) };
        let s = self.scales[c / Q8_BLOCK];
        let q: &[i8; LANES] = self.values[c..c + LANES].try_into().expect("whole chunk");
        q.map(|q| q8_to_f32(q, s))
    }

    #[inline(always)]
    fn at(self, i: usize) -> f32 {
        q8_to_f32(self.values[i], self.scales[i / Q8_BLOCK])
    }
}

impl<W: Widen> Dot<W> for Portable {
    // Never: the weight rows one at a time use no more accumulators than the CPU has registers.
    const PAIRS_FROM: usize = usize::MAX;

    #[inline(always)]
    unsafe fn dot<const R: usize, const J: usize>(w: [W; J], k: usize, xs: &[f32], out: [&mut [f32]; J]) {
        let whole = k / LANES * LANES;
        let mut acc = [[[0f32; LANES]; R]; J];
        for c in (0..whole).step_by(LANES) {
            for (acc, w) in acc.iter_mut().zip(w) {
                fma_rows(acc, &w.lanes(c), xs, k, c);
            }
        }
        for ((out, acc), w) in out.into_iter().zip(&acc).zip(w) {
            for (r, (o, acc)) in out.iter_mut().zip(acc).enumerate() {
                let tail: f32 = (whole..k).map(|i| xs[r * k + i] * w.at(i)).sum();
                *o = reduce_lanes(acc) + tail;
            }
        }
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

/// The sum of an accumulator's lanes as a tree, in the order the intrinsics kernels add them.
#[inline(always)]
fn reduce_lanes(acc: &[f32; LANES]) -> f32 {
    let v: [f32; 8] = std::array::from_fn(|l| acc[l] + acc[l + 8]);
    let h: [f32; 4] = std::array::from_fn(|l| v[l] + v[l + 4]);
    (h[0] + h[2]) + (h[1] + h[3])
}
