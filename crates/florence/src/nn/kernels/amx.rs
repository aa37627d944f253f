//! bf16 GEMM on AMX tiles (`tdpbf16ps`: Intel Sapphire Rapids and later), for the many rows of
//! images and prompts.
//!
//! Eight tile registers of 16 rows x 64 bytes: four f32 accumulators for a 32 x 32 block of
//! the output, two A tiles (16 input rows x 32 bf16 inputs each, from the rounded rows laid out
//! tile by tile) and two B tiles (32 inputs x 16 weight rows, one [`Packed`] panel's 16 lines).
//! Each step over 32 inputs is four tile loads and four tile products.
//!
//! The instructions are written with `asm!`: stable Rust has no AMX intrinsics. The compiler
//! never uses tile registers, so separate `asm!` blocks can keep values in them.

use std::arch::asm;

use rayon::prelude::*;

use super::bf16::{padded_k, round_bf16, Packed, K_STEP, PANEL};

/// Output rows per tile block: two A tiles.
const BLOCK: usize = 32;

/// Whether AMX-BF16 can run in this process: the CPU has it (CPUID) and Linux granted the
/// permission to use tile data, which it asks for once, process-wide, before any tile
/// instruction runs.
pub(super) fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| cpu_has_amx_bf16() && request_tile_data())
}

/// CPUID leaf 7 subleaf 0: EDX bit 22 (AMX-BF16) and bit 24 (AMX-TILE).
fn cpu_has_amx_bf16() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    #[allow(unused_unsafe)]
    // SAFETY: CPUID exists on every x86-64 CPU; leaf 7 is read only when the CPU has it.
    unsafe {
        if __cpuid(0).eax < 7 {
            return false;
        }
        let edx = __cpuid_count(7, 0).edx;
        edx & (1 << 22) != 0 && edx & (1 << 24) != 0
    }
}

/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: without it the first tile instruction
/// kills the process (SIGILL). Fails on kernels before 5.16 and where the OS disabled AMX.
#[cfg(target_os = "linux")]
fn request_tile_data() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: the call only changes this process's permitted extended states.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_data() -> bool {
    false
}

/// The `ldtilecfg` operand: palette 1, every tile 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    bytes_per_row: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// Tile steps (of 32 inputs) per pass over the panels: a block's A tiles of one pass (16 KiB)
/// stay in L1 while the panels go by, the accumulators going through memory between passes.
// Measured on a Sapphire Rapids VM: tile loads from L2 halve the tile products' rate
// (186 against 357 GFLOP/s a thread at 768 inputs against 256).
const PASS: usize = 8;

/// `x · Wᵀ` for the rows of `x` (`[m, k]`) rounded to bf16, on all threads. Returns `[m, n]`.
pub(super) fn many_rows(w: &Packed, x: &[f32], m: usize) -> Vec<f32> {
    let (n, k) = w.dims();
    let a = tiled_rows(x, m, k);
    let m_pad = m.div_ceil(BLOCK) * BLOCK;
    let n_pad = w.panels() * PANEL;
    // Not zeroed (a pass over 75 MB for DaViT's first stage): the first pass of each task
    // stores every block of its rows, and the later ones load them back.
    let mut c: Vec<f32> = Vec::with_capacity(m_pad * n_pad);
    // Tasks of whole blocks of rows, at least four per thread, at most 256 rows.
    let per_task = m.div_ceil(4 * rayon::current_num_threads()).div_ceil(BLOCK) * BLOCK;
    let per_task = per_task.clamp(BLOCK, 8 * BLOCK);
    let spare = &mut c.spare_capacity_mut()[..m_pad * n_pad];
    spare.par_chunks_mut(per_task * n_pad).enumerate().for_each(|(t, c)| {
        // SAFETY: `enabled()` held for the tier; `a` holds the tiles of rows t * per_task
        // onwards, whole blocks; `c` is those rows of the padded output, whole blocks.
        unsafe {
            task(
                w,
                &a,
                t * per_task / 16,
                c.as_mut_ptr().cast(),
                c.len() / (BLOCK * n_pad),
            )
        };
    });
    // SAFETY: the tasks wrote every block of every row (above).
    unsafe { c.set_len(m_pad * n_pad) };
    if n_pad == n {
        c.truncate(m * n);
        return c;
    }
    let mut out = vec![0f32; m * n];
    out.par_chunks_mut(n)
        .zip(c.par_chunks(n_pad))
        .for_each(|(o, c)| o.copy_from_slice(&c[..n]));
    out
}

/// The rows of `x` (`[m, k]`) rounded to bf16 in A tiles: per 16 rows (zero rows past `m`), per
/// tile step, 16 rows of 32 values (zeros past `k`), so that each tile load reads 1 KiB in one
/// run.
fn tiled_rows(x: &[f32], m: usize, k: usize) -> Vec<u16> {
    let steps = padded_k(k) / K_STEP;
    let mut a = vec![0u16; m.div_ceil(BLOCK) * BLOCK * steps * K_STEP];
    a.par_chunks_mut(16 * steps * K_STEP)
        .enumerate()
        .for_each(|(g, tiles)| {
            for r in 0..16.min(m.saturating_sub(g * 16)) {
                let row = &x[(g * 16 + r) * k..][..k];
                for (c, &v) in row.iter().enumerate() {
                    tiles[(c / K_STEP * 16 + r) * K_STEP + c % K_STEP] = round_bf16(v);
                }
            }
        });
    a
}

/// `blocks` blocks of rows from tile group `g0` on into `c` (padded rows by padded columns,
/// written before they are read), in passes of [`PASS`] tile steps.
///
/// # Safety
/// AMX is enabled; `a` holds the A tiles of these rows; `c` has room for them, and nobody
/// else accesses it meanwhile.
unsafe fn task(w: &Packed, a: &[u16], g0: usize, c: *mut f32, blocks: usize) {
    let steps = w.pairs() * 2 / K_STEP;
    let n_pad = w.panels() * PANEL;
    let group = 16 * steps * K_STEP;
    // SAFETY: the config is a valid palette-1 configuration; AMX is enabled (the caller's
    // promise). The tile state is per thread, loaded here and released below.
    unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly)) };
    for first in (0..steps).step_by(PASS) {
        let pass = first..(first + PASS).min(steps);
        for b in 0..blocks {
            let a0 = a[(g0 + 2 * b) * group..][..2 * group].as_ptr();
            for pair in 0..w.panels() / 2 {
                let (b0, b1) = (w.panel(2 * pair), w.panel(2 * pair + 1));
                // SAFETY: block b of `c`, from column 32 * pair (inside the padded width).
                let c = unsafe { c.add(b * BLOCK * n_pad + 2 * pair * PANEL) };
                // SAFETY: the block's 32 rows of n_pad values at `c` (from column 32 * pair),
                // its two tile groups at `a0`, and the panels' tiles of steps `pass` exist.
                unsafe {
                    if first == 0 {
                        asm!(
                            "tilezero tmm0",
                            "tilezero tmm1",
                            "tilezero tmm2",
                            "tilezero tmm3",
                            options(nostack, nomem)
                        );
                    } else {
                        tiles_at(c, n_pad, false);
                    }
                    block(a0, group, b0.as_ptr().cast(), b1.as_ptr().cast(), pass.clone());
                    tiles_at(c, n_pad, true);
                }
            }
        }
    }
    // SAFETY: releases this thread's tile state, configured above.
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
}

/// Adds to tiles 0-3 (a 32 x 32 block: tile 0 rows 0-15 by panel 0, tile 1 rows 0-15 by panel
/// 1, tiles 2 and 3 rows 16-31) the products of tile steps `steps` of the two tile groups at `a`
/// (`group` values apart) with the two panels at `b0` and `b1`.
///
/// # Safety
/// The tiles are configured as [`CONFIG`]; `a` holds two tile groups and `b0`, `b1` the tiles
/// (1 KiB each) of every step in `steps`.
#[inline]
unsafe fn block(a: *const u16, group: usize, b0: *const u8, b1: *const u8, steps: std::ops::Range<usize>) {
    for step in steps {
        // SAFETY: each load reads 16 rows of 64 bytes inside the operands (the caller's promise).
        unsafe {
            let a_lo = a.add(step * 16 * K_STEP);
            asm!(
                "tileloadd tmm4, [{a_lo} + {line}]",
                "tileloadd tmm5, [{a_hi} + {line}]",
                "tileloadd tmm6, [{b0} + {line}]",
                "tileloadd tmm7, [{b1} + {line}]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a_lo = in(reg) a_lo,
                a_hi = in(reg) a_lo.add(group),
                b0 = in(reg) b0.add(step * 1024),
                b1 = in(reg) b1.add(step * 1024),
                line = in(reg) 64usize,
                options(nostack, readonly),
            );
        }
    }
}

/// Stores tiles 0-3 as the 32 x 32 block at `c`, rows `ld` f32 apart (`store`), or loads them
/// from it.
///
/// # Safety
/// The tiles are configured as [`CONFIG`]; `c` holds 32 rows of 32 f32, `ld` apart.
#[inline]
unsafe fn tiles_at(c: *mut f32, ld: usize, store: bool) {
    let stride = ld * 4;
    // SAFETY: each access covers 16 rows of 64 bytes inside the block (the caller's promise).
    unsafe {
        let (c00, c01, c10, c11) = (c, c.add(PANEL), c.add(16 * ld), c.add(16 * ld + PANEL));
        if store {
            asm!(
                "tilestored [{c00} + {stride}], tmm0",
                "tilestored [{c01} + {stride}], tmm1",
                "tilestored [{c10} + {stride}], tmm2",
                "tilestored [{c11} + {stride}], tmm3",
                c00 = in(reg) c00, c01 = in(reg) c01, c10 = in(reg) c10, c11 = in(reg) c11,
                stride = in(reg) stride,
                options(nostack),
            );
        } else {
            asm!(
                "tileloadd tmm0, [{c00} + {stride}]",
                "tileloadd tmm1, [{c01} + {stride}]",
                "tileloadd tmm2, [{c10} + {stride}]",
                "tileloadd tmm3, [{c11} + {stride}]",
                c00 = in(reg) c00, c01 = in(reg) c01, c10 = in(reg) c10, c11 = in(reg) c11,
                stride = in(reg) stride,
                options(nostack, readonly),
            );
        }
    }
}
