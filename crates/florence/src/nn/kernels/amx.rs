//! bf16 GEMM on AMX tiles (`tdpbf16ps`: Intel Sapphire Rapids and later), for the many rows of
//! images and prompts.
//!
//! Eight tile registers of 16 rows x 64 bytes: four f32 accumulators for a 32 x 32 block of
//! the output, two A tiles (16 input rows x 32 bf16 inputs each, read in place from the rounded
//! rows) and two B tiles (32 inputs x 16 weight rows, one [`Packed`] panel's 16 lines). Each
//! step over 32 inputs is four tile loads and four tile products.
//!
//! The instructions are written with `asm!`: stable Rust has no AMX intrinsics. The compiler
//! never uses tile registers, so separate `asm!` blocks can keep values in them.

use std::arch::asm;

use rayon::prelude::*;

use super::avx512bf16::SharedOut;
use super::bf16::{packed_rows, padded_k, Packed, K_STEP, PANEL};

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

/// `x · Wᵀ` for the rows of `x` (`[m, k]`) rounded to bf16, on all threads. Returns `[m, n]`.
pub(super) fn many_rows(w: &Packed, x: &[f32], m: usize) -> Vec<f32> {
    let (n, k) = w.dims();
    let a = packed_rows(x, m, k, BLOCK);
    let mut out = vec![0f32; m * n];
    // Tasks of whole tile blocks of rows, at least four per thread, and at most 256 rows so
    // that a task's rounded inputs stay in L2 while the panels go by.
    let per_task = m.div_ceil(4 * rayon::current_num_threads()).div_ceil(BLOCK) * BLOCK;
    let per_task = per_task.clamp(BLOCK, 8 * BLOCK);
    let dst = SharedOut(out.as_mut_ptr());
    (0..m.div_ceil(per_task)).into_par_iter().for_each(|t| {
        let rows = t * per_task..((t + 1) * per_task).min(m);
        // SAFETY: `enabled()` held for the tier; `a` has whole blocks of rows past `rows`, and
        // this task alone writes rows `rows` of `out`, which is `[m, n]`.
        unsafe { task(w, &a, rows, m, dst) };
    });
    out
}

/// The output rows `rows` (starting on a block), all columns.
///
/// # Safety
/// AMX is enabled; `a` holds the rounded rows in whole blocks; `dst` is `[m, n]` and nobody
/// else writes rows `rows` of it meanwhile.
unsafe fn task(w: &Packed, a: &[u16], rows: std::ops::Range<usize>, m: usize, dst: SharedOut) {
    let (n, k) = w.dims();
    let kp = padded_k(k);
    let mut scratch = Scratch([[0.0; 2 * PANEL]; BLOCK]);
    // SAFETY: the config is a valid palette-1 configuration; AMX is enabled (the caller's
    // promise). The tile state is per thread, loaded here and released below.
    unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly)) };
    for pair in 0..w.panels() / 2 {
        let (b0, b1) = (w.panel(2 * pair), w.panel(2 * pair + 1));
        let j0 = 2 * pair * PANEL;
        for i in rows.clone().step_by(BLOCK) {
            let a0 = a[i * kp..].as_ptr();
            // SAFETY: rows i..i + 32 of `a` exist (whole blocks), each `kp` long, and each panel
            // holds kp / 32 tiles of 16 lines.
            unsafe { block(a0, kp, b0.as_ptr().cast(), b1.as_ptr().cast()) };
            if i + BLOCK <= m && j0 + 2 * PANEL <= n {
                // SAFETY: the 32 x 32 block at (i, j0) is inside `dst`, in this task's rows.
                unsafe { store(dst.0.add(i * n + j0), n) };
            } else {
                // SAFETY: `scratch` is 32 rows of 32 f32.
                unsafe { store(scratch.0.as_mut_ptr().cast(), 2 * PANEL) };
                for (r, line) in scratch.0.iter().enumerate().take(m - i) {
                    for (c, &v) in line.iter().enumerate().take(n.saturating_sub(j0)) {
                        // SAFETY: row i + r < m and column j0 + c < n, in this task's rows.
                        unsafe { *dst.0.add((i + r) * n + j0 + c) = v };
                    }
                }
            }
        }
    }
    // SAFETY: releases this thread's tile state, configured above.
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
}

/// A 32 x 32 f32 block, aligned for tile stores.
#[repr(C, align(64))]
struct Scratch([[f32; 2 * PANEL]; BLOCK]);

/// Leaves in tiles 0-3 the 32 x 32 block of products of the 32 rows at `a` (`kp` bf16 values
/// each) with the two panels at `b0` and `b1`: tile 0 rows 0-15 by panel 0, tile 1 rows 0-15
/// by panel 1, tiles 2 and 3 rows 16-31.
///
/// # Safety
/// The tiles are configured as [`CONFIG`]; `a` points to 32 rows of `kp` values, `b0` and `b1`
/// to `kp / 32` tiles of 1 KiB each.
#[inline]
unsafe fn block(a: *const u16, kp: usize, b0: *const u8, b1: *const u8) {
    let stride = kp * 2;
    // SAFETY: tile registers only.
    unsafe { asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem)) };
    for step in 0..kp / K_STEP {
        // SAFETY: each load reads 16 rows of 64 bytes inside the operands (the caller's promise).
        unsafe {
            let a_lo = a.add(step * K_STEP);
            let a_hi = a_lo.add(16 * kp);
            asm!(
                "tileloadd tmm4, [{a_lo} + {stride}]",
                "tileloadd tmm5, [{a_hi} + {stride}]",
                "tileloadd tmm6, [{b0} + {line}]",
                "tileloadd tmm7, [{b1} + {line}]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a_lo = in(reg) a_lo,
                a_hi = in(reg) a_hi,
                b0 = in(reg) b0.add(step * 1024),
                b1 = in(reg) b1.add(step * 1024),
                stride = in(reg) stride,
                line = in(reg) 64usize,
                options(nostack, readonly),
            );
        }
    }
}

/// Stores tiles 0-3 as the 32 x 32 block at `c`, rows `ld` f32 apart.
///
/// # Safety
/// The tiles hold a block ([`block`]); `c` has room for 32 rows of 32 f32, `ld` apart.
#[inline]
unsafe fn store(c: *mut f32, ld: usize) {
    let stride = ld * 4;
    // SAFETY: each store writes 16 rows of 64 bytes inside the block (the caller's promise).
    unsafe {
        asm!(
            "tilestored [{c00} + {stride}], tmm0",
            "tilestored [{c01} + {stride}], tmm1",
            "tilestored [{c10} + {stride}], tmm2",
            "tilestored [{c11} + {stride}], tmm3",
            c00 = in(reg) c,
            c01 = in(reg) c.add(PANEL),
            c10 = in(reg) c.add(16 * ld),
            c11 = in(reg) c.add(16 * ld + PANEL),
            stride = in(reg) stride,
            options(nostack),
        );
    }
}
