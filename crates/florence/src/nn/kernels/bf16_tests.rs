//! The bf16-compute kernels of every tier this CPU has against the f32 reference, on random
//! shapes and on Florence-2's; the packing and rounding they read.
//!
//! Tolerances, per output `y = Σ x_c w_c` over `k` inputs:
//! - against the reference on the same bf16-rounded values: each product is exact in f32, so
//!   two summation orders differ by at most `2 (k - 1) u Σ|x_c w_c|` with `u = 2⁻²⁴` (the f32
//!   sum error bound, for each side): we allow `k · 2⁻²³ · Σ|x_c w_c|`;
//! - against the f32 product of the unrounded values: rounding both operands to bf16 (relative
//!   error at most `2⁻⁹` each) moves each product by at most `(2 · 2⁻⁹ + 2⁻¹⁸) |x_c w_c|`: we
//!   allow `2⁻⁸ · 1.01 · Σ|x_c w_c|` plus the summation bound above.

use candle_core::{Device, Tensor};

use super::bf16::{self, padded_k, round_bf16, Packed, PANEL};
use super::{force_tier, tiers, Tier};
use crate::error::Result;
use crate::nn::gemm_f32;

/// `[m, n]` products of row-major `x` `[m, k]` and `w` `[n, k]` with the f32 GEMM.
fn f32_product(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    // SAFETY: x is [m, k], w is [n, k] read transposed, y is [m, n].
    unsafe { gemm_f32(m, n, k, y.as_mut_ptr(), (n, 1), x, (k, 1), w, (1, k), 2) };
    y
}

fn random(len: usize) -> Result<Vec<f32>> {
    Ok(Tensor::randn(0f32, 1.0, len, &Device::Cpu)?.to_vec1()?)
}

/// Florence-2's shapes (lm_head, decoder and encoder layers, DaViT's stem and MLPs, the
/// projector's width) and odd ones: `(m, n, k)`.
const SHAPES: [(usize, usize, usize); 10] = [
    (3, 51289, 768),
    (1, 3072, 768),
    (3, 768, 3072),
    (577, 2304, 768),
    (4096, 384, 128),
    (590, 768, 3072),
    (37, 41, 70),
    (33, 130, 147),
    (1, 5, 9),
    (65, 33, 96),
];

/// For each bf16 product of every tier: within the summation bound of the f32 reference on the
/// same rounded values, and within the rounding bound of the unrounded f32 product. A tier the
/// CPU lacks is printed as not run.
#[test]
fn every_tier_matches_the_f32_reference() -> Result<()> {
    println!("bf16 kernel tiers run: {:?}", tiers());
    for (m, n, k) in SHAPES {
        let (x, w) = (random(m * k)?, random(n * k)?);
        let packed = Packed::from_f32(&w, n, k);
        let round = |v: &[f32]| v.iter().map(|&v| bf16::rounded(v)).collect::<Vec<_>>();
        let reference = f32_product(&round(&x), &round(&w), m, n, k);
        let unrounded = f32_product(&x, &w, m, n, k);
        let abs = |v: &[f32]| v.iter().map(|v| v.abs()).collect::<Vec<_>>();
        let magnitude = f32_product(&abs(&x), &abs(&w), m, n, k);
        let sum_bound = k as f32 * 2f32.powi(-23);
        for tier in tiers() {
            let _forced = force_tier(tier);
            let many = bf16::many_rows(tier, &packed, &x, m);
            let few = bf16::few_rows(tier, &packed, &x, m);
            for (name, y) in [("many rows", &many), ("few rows", &few)] {
                for (i, (&y, (&r, (&u, &s)))) in y
                    .iter()
                    .zip(reference.iter().zip(unrounded.iter().zip(&magnitude)))
                    .enumerate()
                {
                    let at = format!("{tier:?} {name} {m}x{n}x{k} at ({}, {})", i / n, i % n);
                    assert!((y - r).abs() <= sum_bound * s * 1.01, "{at}: {y} vs reference {r}");
                    let rounding = (2f32.powi(-8) * 1.01 + sum_bound) * s;
                    assert!((y - u).abs() <= rounding, "{at}: {y} vs unrounded {u}");
                }
            }
        }
    }
    Ok(())
}

/// The AMX tier's decoding step (FMAs on the widened panels, in input order) is the portable
/// loop's bits.
#[test]
fn amx_tier_decodes_in_the_portable_order() -> Result<()> {
    let Some(_forced) = force_tier(Tier::Amx) else {
        println!("kernel tier NOT run (this CPU lacks it): Amx");
        return Ok(());
    };
    for (m, n, k) in [(3, 3072, 768), (1, 37, 70), (8, 64, 3072)] {
        let (x, w) = (random(m * k)?, random(n * k)?);
        let packed = Packed::from_f32(&w, n, k);
        let portable = bf16::few_rows(Tier::Portable, &packed, &x, m);
        assert_eq!(bf16::few_rows(Tier::Amx, &packed, &x, m), portable, "{m}x{n}x{k}");
    }
    Ok(())
}

/// A row's product is the same bits alone and among other rows (row blocks, tile blocks and
/// their remainders), at every tier, for many rows and few: captions do not depend on batches.
#[test]
fn rows_do_not_depend_on_each_other() -> Result<()> {
    let (m, n, k) = (45, 70, 96);
    let (x, w) = (random(m * k)?, random(n * k)?);
    let packed = Packed::from_f32(&w, n, k);
    for tier in tiers() {
        let _forced = force_tier(tier);
        let many = bf16::many_rows(tier, &packed, &x, m);
        let few = bf16::few_rows(tier, &packed, &x, m);
        for i in [0, 7, 8, 16, 31, 32, 44] {
            let row = &x[i * k..(i + 1) * k];
            // Below the bf16 tiers many rows go through the f32 GEMM, whose row independence
            // is the gemm crate's (one row takes its matrix-vector path): the batching tests
            // check it where it matters, between batches of images.
            if tier.has_bf16() {
                let alone = bf16::many_rows(tier, &packed, row, 1);
                assert_eq!(alone, many[i * n..(i + 1) * n], "{tier:?} many row {i}");
            }
            assert_eq!(
                bf16::few_rows(tier, &packed, row, 1),
                few[i * n..(i + 1) * n],
                "{tier:?} few row {i}"
            );
        }
    }
    Ok(())
}

/// Rounding to bf16 is `half`'s: nearest, ties to even, NaN kept, overflow to infinity.
#[test]
fn rounding_is_halfs() -> Result<()> {
    let mut xs = random(10_000)?;
    xs.extend([
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        f32::MIN,
        f32::MIN_POSITIVE,
        1e-40,
        f32::from_bits(0x3f80_8000), // a tie, kept part even
        f32::from_bits(0x3f81_8000), // a tie, kept part odd
        f32::from_bits(0x3f80_8001),
        f32::from_bits(0xbf81_7fff),
    ]);
    for x in xs {
        assert_eq!(
            round_bf16(x),
            half::bf16::from_f32(x).to_bits(),
            "{x:e} ({:#x})",
            x.to_bits()
        );
    }
    assert!(f32::from_bits((round_bf16(f32::NAN) as u32) << 16).is_nan());
    Ok(())
}

/// Packing keeps every weight at its place (rounded as `half` does) and pads with zeros: rows
/// to whole panel pairs, inputs to whole tile steps.
#[test]
fn packing_round_trips() -> Result<()> {
    for (n, k) in [(37, 70), (32, 32), (1, 1), (51289 % 97, 768)] {
        let w = random(n * k)?;
        let p = Packed::from_f32(&w, n, k);
        assert_eq!(p.dims(), (n, k));
        assert_eq!(p.pairs(), padded_k(k) / 2);
        assert!(p.panels().is_multiple_of(2) && p.panels() * PANEL >= n);
        let mut row = vec![0f32; k];
        for j in 0..n {
            p.row_into(j, &mut row);
            for c in 0..k {
                let expected = half::bf16::from_f32(w[j * k + c]);
                assert_eq!(row[c], expected.to_f32(), "({j}, {c})");
                assert_eq!(p.get(j, c), expected.to_bits());
            }
        }
        for j in 0..p.panels() * PANEL {
            for c in 0..padded_k(k) {
                if j >= n || c >= k {
                    assert_eq!(p.get(j, c), 0, "padding ({j}, {c})");
                }
            }
        }
    }
    Ok(())
}

/// The bf16 tiers are the CPU's when it has them: a bf16 matrix is then held packed.
#[test]
fn detection_is_consistent() {
    let have = tiers();
    for pair in have.windows(2) {
        assert!(pair[0] < pair[1]);
    }
    if have.contains(&Tier::Amx) {
        assert!(
            have.contains(&Tier::Avx512Bf16),
            "AMX runs the decoding step with AVX512-BF16"
        );
    }
    println!("best tier: {:?}", super::tier());
}

/// Not a check: prints each tier's time for Florence-2's shapes
/// (`cargo test --release -p florence --lib kernel_speed -- --ignored --nocapture`).
#[test]
#[ignore = "a measurement, not a test"]
fn kernel_speed() -> Result<()> {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    for (m, n, k) in [
        (3, 51289, 768),
        (3, 3072, 768),
        (590, 3072, 768),
        (36864, 512, 128),
        (2304, 2048, 512),
    ] {
        let (x, w) = (random(m * k)?, random(n * k)?);
        let packed = Packed::from_f32(&w, n, k);
        for tier in tiers() {
            let _forced = force_tier(tier);
            for (name, few) in [("many", false), ("few", true)] {
                if few && m > 8 || !few && m <= 8 {
                    continue;
                }
                let run = || {
                    if few {
                        bf16::few_rows(tier, &packed, &x, m)
                    } else {
                        bf16::many_rows(tier, &packed, &x, m)
                    }
                };
                pool.install(run);
                let t = std::time::Instant::now();
                let reps = 5;
                for _ in 0..reps {
                    pool.install(run);
                }
                let s = t.elapsed().as_secs_f64() / reps as f64;
                println!(
                    "{m}x{n}x{k} {tier:?} {name}: {:.3} ms, {:.0} GFLOP/s, {:.1} GB/s of weights",
                    s * 1e3,
                    2.0 * (m * n * k) as f64 / s / 1e9,
                    (n * k * 2) as f64 / s / 1e9
                );
            }
        }
    }
    Ok(())
}
