//! The decoding-step product `x · Wᵀ` for the few rows of a step (one per beam), which streams
//! each weight once: one driver that picks the CPU's tier of kernels and groups the rows, and
//! each tier's inner products in `portable` (plain Rust), `avx2` and `avx512` (intrinsics).
//!
//! Every tier computes each output in the same order, so that captions depend neither on the
//! CPU nor on the batch:
//! - weights are widened to f32 before they are multiplied (an int8 value times its block's
//!   scale, rounded to f32: [`q8_to_f32`]), so an int8 product is the f32 product of the
//!   widened matrix, bit for bit;
//! - lane `l` of [`LANES`] adds `w[c + l] · x[c + l]` for `c = 0, 16, 32, …` with fused
//!   multiply-adds;
//! - the lanes are added as a tree, `l + 8`, then `l + 4`, then `(0 + 2) + (1 + 3)`, and the
//!   products past the last whole 16 (portable kernel only) one by one after it.
//!
//! The same tier decides whether the plain-code helpers of `nn` run compiled for AVX2
//! ([`with_avx2`]), so that tests that force a tier reach those too.
//!
//! Products of bf16 matrices (bf16 compute) are [`bf16`]'s, for many rows and few: AMX tiles
//! (`amx`) and `vdpbf16ps` (`avx512bf16`) at the bf16 tiers, the f32 kernels on activations
//! rounded the same way below them.

use rayon::prelude::*;

use super::matrix::q8_to_f32;
use super::Q8_BLOCK;

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod avx512bf16;
pub(super) mod bf16;
#[cfg(test)]
mod bf16_tests;
mod portable;

/// Lanes per accumulator.
const LANES: usize = 16;

/// A set of kernels for a level of CPU features; each tier needs those of the tiers before it.
///
/// The f32 tiers give the same bits; the bf16 tiers (`Avx512Bf16`, `Amx`) only compute the
/// products of bf16 matrices ([`bf16`]), which they sum in their own order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Tier {
    /// Plain Rust, for any CPU.
    Portable,
    /// AVX2 and FMA intrinsics.
    Avx2,
    /// AVX-512F intrinsics for int8 weights (f32 and bf16 keep the AVX2 kernels).
    Avx512,
    /// `vdpbf16ps` (AVX512-BF16) for the products of bf16 matrices, many rows and few.
    Avx512Bf16,
    /// AMX tiles (`tdpbf16ps`) for bf16 products of many rows; AVX512-BF16 for few.
    Amx,
}

impl Tier {
    /// Whether this CPU has the tier's features.
    fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        let avx2 = || is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        #[cfg(target_arch = "x86_64")]
        let avx512 = || avx2() && is_x86_feature_detected!("avx512f");
        #[cfg(target_arch = "x86_64")]
        let avx512bf16 = || avx512() && is_x86_feature_detected!("avx512bf16");
        match self {
            Tier::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Tier::Avx2 => avx2(),
            #[cfg(target_arch = "x86_64")]
            Tier::Avx512 => avx512(),
            #[cfg(target_arch = "x86_64")]
            Tier::Avx512Bf16 => avx512bf16(),
            #[cfg(target_arch = "x86_64")]
            Tier::Amx => avx512bf16() && amx::enabled(),
            #[cfg(not(target_arch = "x86_64"))]
            Tier::Avx2 | Tier::Avx512 | Tier::Avx512Bf16 | Tier::Amx => false,
        }
    }

    /// Whether the tier has bf16 dot products, and so holds bf16 matrices in [`bf16::Packed`]
    /// panels.
    pub(crate) fn has_bf16(self) -> bool {
        self >= Tier::Avx512Bf16
    }
}

/// The tier the kernels run at: the CPU's best, unless a test forced another.
pub(crate) fn tier() -> Tier {
    #[cfg(test)]
    if let Some(forced) = forcing::forced() {
        return forced;
    }
    best()
}

/// The CPU's best tier.
fn best() -> Tier {
    static BEST: std::sync::OnceLock<Tier> = std::sync::OnceLock::new();
    *BEST.get_or_init(|| {
        [Tier::Amx, Tier::Avx512Bf16, Tier::Avx512, Tier::Avx2]
            .into_iter()
            .find(|t| t.available())
            .unwrap_or(Tier::Portable)
    })
}

#[cfg(test)]
pub(crate) use forcing::{force_tier, tiers};

/// A switch for tests: every tier must give the same bits, so each runs the kernels at each
/// tier the CPU has.
#[cfg(test)]
mod forcing {
    use std::sync::atomic::{AtomicU8, Ordering};
    use std::sync::{Mutex, MutexGuard};

    use super::Tier;

    /// The forced tier's index in [`ALL`], or none.
    static FORCED: AtomicU8 = AtomicU8::new(NONE);
    const NONE: u8 = u8::MAX;
    pub(super) const ALL: [Tier; 5] = [Tier::Portable, Tier::Avx2, Tier::Avx512, Tier::Avx512Bf16, Tier::Amx];

    pub(super) fn forced() -> Option<Tier> {
        ALL.get(FORCED.load(Ordering::Relaxed) as usize).copied()
    }

    /// The tiers this CPU has, [`Tier::Portable`] first. Prints the tiers it lacks, so that a
    /// test run says which kernels it did not check.
    pub(crate) fn tiers() -> Vec<Tier> {
        let (have, lack): (Vec<Tier>, Vec<Tier>) = ALL.into_iter().partition(|t| t.available());
        if !lack.is_empty() {
            println!("kernel tiers NOT run (this CPU lacks them): {lack:?}");
        }
        have
    }

    /// Runs the kernels and the `with_avx2` helpers at `tier` until the guard drops, when the
    /// CPU has it (`None` otherwise). Tests that force tiers take turns; tests that run
    /// meanwhile get the same bits at any tier.
    pub(crate) fn force_tier(tier: Tier) -> Option<ForcedTier> {
        static TURN: Mutex<()> = Mutex::new(());
        if !tier.available() {
            return None;
        }
        let turn = TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let index = ALL.iter().position(|&t| t == tier).expect("every tier is in ALL");
        FORCED.store(index as u8, Ordering::Relaxed);
        Some(ForcedTier { _turn: turn })
    }

    /// Keeps a tier forced while it lives.
    pub(crate) struct ForcedTier {
        _turn: MutexGuard<'static, ()>,
    }

    impl Drop for ForcedTier {
        fn drop(&mut self) {
            FORCED.store(NONE, Ordering::Relaxed);
        }
    }
}

/// Defines `$name`, which runs `$portable` compiled for AVX2 + FMA when the kernels' [`tier`]
/// has them and as plain code otherwise (runtime dispatch keeps the binary portable). Plain
/// code gives the same bits either way: the compiler neither reorders nor fuses float
/// operations.
macro_rules! with_avx2 {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $portable:ident) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                fn fast($($arg: $ty),*) -> $ret {
                    $portable($($arg),*)
                }
                if $crate::nn::kernels::tier() >= $crate::nn::kernels::Tier::Avx2 {
                    // SAFETY: the tier is one this CPU has, so it has AVX2 and FMA.
                    return unsafe { fast($($arg),*) };
                }
            }
            $portable($($arg),*)
        }
    };
}
pub(super) use with_avx2;

/// A matrix's weight rows, borrowed for a decoding-step product.
#[derive(Clone, Copy)]
pub(super) enum Weights<'a> {
    F32(&'a [f32]),
    /// The bits of bf16 values.
    Bf16(&'a [u16]),
    /// Int8 values with one scale per [`Q8_BLOCK`] of them (the width is a multiple of it).
    Q8 {
        values: &'a [i8],
        scales: &'a [f32],
    },
}

/// `x · Wᵀ` for the few rows of `x` (`[m, k]`, row-major) and the `[n, k]` weights `w`, on all
/// threads, streaming `w` once: each weight row is read and dotted with every input row.
/// Returns `[m, n]`.
pub(super) fn few_rows_product(w: Weights, n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
    const CHUNK: usize = 64;
    if m == 0 {
        return Vec::new();
    }
    let tier = tier();
    let mut out_t = vec![0f32; n * m];
    let x = &aligned_copy(x);
    out_t
        .par_chunks_mut(CHUNK * m)
        .enumerate()
        .for_each(|(c, out)| weight_rows_times_rows(tier, w, k, x, m, c * CHUNK, out));
    let mut out = vec![0f32; m * n];
    for j in 0..n {
        for i in 0..m {
            out[i * n + j] = out_t[j * m + i];
        }
    }
    out
}

/// For weight rows `j0..j0 + out.len() / m`: `out[jj * m + i] = x_i · w_(j0 + jj)`, with
/// `tier`'s kernel for the format where the width suits it, and the portable kernel else.
fn weight_rows_times_rows(tier: Tier, w: Weights, k: usize, x: &[f32], m: usize, j0: usize, out: &mut [f32]) {
    match (tier, w) {
        #[cfg(target_arch = "x86_64")]
        (Tier::Avx512 | Tier::Avx512Bf16 | Tier::Amx, Weights::Q8 { values, scales }) => {
            // SAFETY: the tier is one this CPU has.
            unsafe { avx512::q8_weight_rows(values, scales, k, x, m, j0, out) }
        }
        #[cfg(target_arch = "x86_64")]
        (Tier::Avx2 | Tier::Avx512 | Tier::Avx512Bf16 | Tier::Amx, _) if k.is_multiple_of(LANES) => {
            // SAFETY: the tier is one this CPU has, and AVX-512 implies AVX2 in `available`.
            unsafe { avx2::weight_rows(w, k, x, m, j0, out) }
        }
        _ => portable::weight_rows(w, k, x, m, j0, out),
    }
}

/// One tier's inner products with weight rows of type `W` (one row of one format).
trait Dot<W> {
    /// Input rows from which weight rows go two at a time.
    const PAIRS_FROM: usize;

    /// `out[j][r] = xs_r · w[j]` for the `R` rows `xs_r` of `xs` and the `J` weight rows `w`,
    /// each summed in the order of the module docs.
    ///
    /// # Safety
    /// The CPU has the tier's features; each weight row and each row of `xs` is `k` long
    /// (`xs.len() == R * k`), `k` a multiple of the tier's step; each `out[j]` holds `R` values.
    unsafe fn dot<const R: usize, const J: usize>(w: [W; J], k: usize, xs: &[f32], out: [&mut [f32]; J]);
}

/// Weight row of f32 values.
#[derive(Clone, Copy)]
struct F32Row<'a>(&'a [f32]);

/// Weight row of bf16 bits.
#[derive(Clone, Copy)]
struct Bf16Row<'a>(&'a [u16]);

/// Weight row of int8 values with one scale per [`Q8_BLOCK`] of them.
#[derive(Clone, Copy)]
struct Q8Row<'a> {
    values: &'a [i8],
    scales: &'a [f32],
}

impl<'a> Q8Row<'a> {
    /// Row `j` of `[_, k]` int8 weights.
    fn of(values: &'a [i8], scales: &'a [f32], k: usize, j: usize) -> Self {
        let blocks = k / Q8_BLOCK;
        Self {
            values: &values[j * k..(j + 1) * k],
            scales: &scales[j * blocks..(j + 1) * blocks],
        }
    }
}

/// [`grouped`] with the rows of whichever format `w` holds.
///
/// # Safety
/// The CPU has `D`'s features, and `k` is a multiple of its step.
#[inline(always)]
unsafe fn by_format<D>(w: Weights, k: usize, x: &[f32], m: usize, j0: usize, out: &mut [f32])
where
    D: for<'a> Dot<F32Row<'a>> + for<'a> Dot<Bf16Row<'a>> + for<'a> Dot<Q8Row<'a>>,
{
    // SAFETY: the caller's promises, and each row below is `k` long.
    unsafe {
        match w {
            Weights::F32(w) => grouped::<D, _>(|j| F32Row(&w[j * k..(j + 1) * k]), k, x, m, j0, out),
            Weights::Bf16(w) => grouped::<D, _>(|j| Bf16Row(&w[j * k..(j + 1) * k]), k, x, m, j0, out),
            Weights::Q8 { values, scales } => grouped::<D, _>(|j| Q8Row::of(values, scales, k, j), k, x, m, j0, out),
        }
    }
}

/// For weight rows `j0..j0 + out.len() / m` (`row(j)` is row `j`): `out[jj * m + i] =
/// x_i · w_(j0 + jj)`, with `x` `[m, k]`. The one place rows are grouped, for every tier: up to
/// four input rows share each load of a weight row, and from `D::PAIRS_FROM` input rows on, two
/// weight rows by up to three input rows share each load of the inputs too.
///
/// # Safety
/// The CPU has `D`'s features, `k` is a multiple of its step, and each `row(j)` is `k` long.
#[inline(always)]
unsafe fn grouped<D: Dot<W>, W: Copy>(
    row: impl Fn(usize) -> W,
    k: usize,
    x: &[f32],
    m: usize,
    j0: usize,
    out: &mut [f32],
) {
    assert!(x.len() == m * k && out.len().is_multiple_of(m));
    let (j0, out) = if m >= D::PAIRS_FROM {
        let paired = out.len() / (2 * m) * 2 * m;
        let (pairs, rest) = out.split_at_mut(paired);
        for (p, o) in pairs.chunks_exact_mut(2 * m).enumerate() {
            let w = [row(j0 + 2 * p), row(j0 + 2 * p + 1)];
            let (o0, o1) = o.split_at_mut(m);
            for (g, (o0, o1)) in o0.chunks_mut(3).zip(o1.chunks_mut(3)).enumerate() {
                let xs = &x[g * 3 * k..(g * 3 + o0.len()) * k];
                // SAFETY: the caller's promises, with as many rows in `xs` as outputs per row.
                unsafe { dot_group::<D, W, 2>(w, k, xs, [o0, o1]) };
            }
        }
        (j0 + paired / m, rest)
    } else {
        (j0, out)
    };
    for (jj, o) in out.chunks_exact_mut(m).enumerate() {
        let w = [row(j0 + jj)];
        for (g, o) in o.chunks_mut(4).enumerate() {
            let xs = &x[g * 4 * k..(g * 4 + o.len()) * k];
            // SAFETY: the caller's promises, with as many rows in `xs` as outputs.
            unsafe { dot_group::<D, W, 1>(w, k, xs, [o]) };
        }
    }
}

/// [`Dot::dot`] for as many input rows (one to four) as `out` has outputs per weight row.
///
/// # Safety
/// As for [`Dot::dot`], with `R = out[0].len()`.
#[inline(always)]
unsafe fn dot_group<D: Dot<W>, W, const J: usize>(w: [W; J], k: usize, xs: &[f32], out: [&mut [f32]; J]) {
    // SAFETY: the caller's promises, for the number of rows matched.
    unsafe {
        match out[0].len() {
            4 => D::dot::<4, J>(w, k, xs, out),
            3 => D::dot::<3, J>(w, k, xs, out),
            2 => D::dot::<2, J>(w, k, xs, out),
            _ => D::dot::<1, J>(w, k, xs, out),
        }
    }
}

/// 16 floats on a 64-byte boundary.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct CacheLine([f32; 16]);

/// A copy of `x` that starts on a cache line. The decoding-step kernels load each input row
/// once per weight row; when rows are 64-byte multiples, as all of Florence-2's are, no load
/// then straddles two lines.
// Measured: the int8 lm_head product took 4.3 ms instead of 2.5 when the input happened to be
// misaligned.
pub(super) fn aligned_copy(x: &[f32]) -> AlignedF32 {
    let mut lines = vec![CacheLine([0.0; 16]); x.len().div_ceil(16)];
    for (line, v) in lines.iter_mut().zip(x.chunks(16)) {
        line.0[..v.len()].copy_from_slice(v);
    }
    AlignedF32 { lines, len: x.len() }
}

/// f32 values that start on a cache line ([`aligned_copy`]).
pub(super) struct AlignedF32 {
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::error::Result;
    use crate::nn::activation::softmax;
    use crate::nn::{sum_exp_below, DepthwiseConv3x3Residual, Epilogue, LayerNorm, Linear, Matrix, WeightFormat};

    const FORMATS: [WeightFormat; 3] = [WeightFormat::F32, WeightFormat::Bf16, WeightFormat::Q8];

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|v| v.to_bits()).collect()
    }

    /// `f()` with the kernels at `tier`.
    fn at<T>(tier: Tier, f: impl FnOnce() -> T) -> T {
        let _forced = force_tier(tier).expect("a tier this CPU has");
        f()
    }

    /// Every tier this CPU has gives the portable kernel's bits, for each weight format.
    #[test]
    fn every_tier_gives_the_portable_bits() -> Result<()> {
        let dev = Device::Cpu;
        println!("kernel tiers run: {:?}", tiers());
        // Input rows in whole and partial groups of three and four, weight rows in pairs and
        // with one left over; widths of whole int8 blocks, of whole 16s only (int8 is then held
        // in bf16), and with a tail.
        for (m, n, k) in [
            (5, 40, 96),
            (7, 41, 96),
            (1, 3, 96),
            (3, 1, 96),
            (4, 9, 64),
            (2, 5, 48),
            (3, 4, 40),
        ] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
            let x: Vec<f32> = Tensor::randn(0f32, 1.0, (m, k), &dev)?.flatten_all()?.to_vec1()?;
            for format in FORMATS {
                // Held as each tier holds it; the bf16 tiers sum bf16 products in their own
                // order (checked in `bf16_tests`), the f32 tiers all in the same.
                let product = || Ok::<_, crate::Error>(Matrix::new(w.clone(), format)?.mul_few_rows(&x, m));
                let portable = at(Tier::Portable, product)?;
                for tier in tiers() {
                    // int8 widths of no whole block are held in bf16.
                    let bf16 = format == WeightFormat::Bf16 || (format == WeightFormat::Q8 && k % Q8_BLOCK != 0);
                    if bf16 && tier.has_bf16() {
                        continue;
                    }
                    let y = at(tier, product)?;
                    assert_eq!(bits(&y), bits(&portable), "{tier:?} {format:?} {m}x{n}x{k}");
                }
            }
        }
        Ok(())
    }

    /// At every tier, an int8 product is the f32 product of the matrix widened back to f32: each
    /// weight is widened before it is multiplied.
    #[test]
    fn int8_products_are_products_of_the_widened_weights() -> Result<()> {
        let dev = Device::Cpu;
        let (m, n, k) = (3, 37, 768);
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        let x: Vec<f32> = Tensor::randn(0f32, 1.0, (m, k), &dev)?.flatten_all()?.to_vec1()?;
        let q8 = Matrix::new(w, WeightFormat::Q8)?;
        let widened = Matrix::new(q8.to_f32(&dev)?, WeightFormat::F32)?;
        for tier in tiers() {
            let (a, b) = at(tier, || (q8.mul_few_rows(&x, m), widened.mul_few_rows(&x, m)));
            assert_eq!(bits(&a), bits(&b), "{tier:?}");
        }
        Ok(())
    }

    /// The plain-code helpers that run compiled for AVX2 give the same bits at every tier.
    #[test]
    fn helpers_give_the_same_bits_at_every_tier() -> Result<()> {
        let dev = Device::Cpu;
        let (rows, d) = (5, 77);
        let x = Tensor::randn(0f32, 3.0, (rows, d), &dev)?;
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let params = |weight: Tensor, bias: Tensor| {
            let tensors = HashMap::from([("weight".to_string(), weight), ("bias".to_string(), bias)]);
            candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &dev)
        };
        let norm = LayerNorm::new(
            d,
            params(Tensor::randn(1f32, 0.1, d, &dev)?, Tensor::randn(0f32, 0.1, d, &dev)?),
        )?;
        let c = 6;
        let image = Tensor::randn(0f32, 1.0, (1, 4, 5, c), &dev)?;
        let conv = DepthwiseConv3x3Residual::new(
            c,
            params(
                Tensor::randn(0f32, 1.0, (c, 1, 3, 3), &dev)?,
                Tensor::randn(0f32, 1.0, c, &dev)?,
            ),
        )?;
        let w = Tensor::randn(0f32, 1.0, (d, d), &dev)?;
        let lin = Linear::from_weights(
            Matrix::new(w, WeightFormat::F32)?,
            Some(Tensor::randn(0f32, 1.0, d, &dev)?),
        )?;
        let run = || -> Result<Vec<Vec<u32>>> {
            Ok(vec![
                bits(&softmax(&x)?.flatten_all()?.to_vec1()?),
                bits(&[sum_exp_below(&xs, 9.0)]),
                bits(&norm.forward_rows(&xs)),
                bits(&conv.forward(&image)?.flatten_all()?.to_vec1()?),
                bits(&lin.forward_decode(&xs, rows, Epilogue::Gelu)?),
                bits(&lin.forward_decode(&xs, rows, Epilogue::Residual(&xs))?),
            ])
        };
        let portable = at(Tier::Portable, run)?;
        for tier in tiers() {
            assert_eq!(at(tier, run)?, portable, "{tier:?}");
        }
        Ok(())
    }
}
