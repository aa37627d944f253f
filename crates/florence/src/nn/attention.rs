//! Scaled dot-product attention: over whole sequences (the text encoder), and for the single
//! query rows of a decoding step, reading keys and values where the caches keep them.

use candle_core::{Tensor, D};
use rayon::prelude::*;

use super::activation::{softmax, softmax_rows_portable};
use super::kernels::with_avx2;
use crate::error::Result;

/// Where a decoding step's attention finds one head's keys.
#[derive(Clone, Copy)]
pub(crate) enum Keys<'a> {
    /// As rows like the values: key `s` of query row `j` at `k[starts[j][s]..][..hd]` (the
    /// self-attention cache, whose rows follow each beam's lineage).
    Rows(&'a [f32]),
    /// Transposed, `[hd, n]` (the encoder memory's keys, fixed for a generation): the scores
    /// are then sums of contiguous rows, with no per-key reduction.
    Transposed(&'a [f32]),
}

/// The keys and values that one head of one group of query rows attends to.
#[derive(Clone, Copy)]
pub(crate) struct HeadKv<'a> {
    pub keys: Keys<'a>,
    /// Value `s` of query row `j` is `values[starts[j][s]..][..hd]`.
    pub values: &'a [f32],
    /// Per query row of the group, the offsets of its values, and of its keys when they are
    /// rows; or a single list that all the rows share.
    pub starts: &'a [Vec<usize>],
}

/// Attention of single query rows, for decoding steps. `q` is `[rows, heads * hd]` (already
/// scaled); rows come in consecutive groups of the sizes `groups` that attend to the same head's
/// keys and values (the beams of one image), each through its own offsets, and `kv(g, h)` gives
/// what head `h` of group `g` attends to. The kernels walk the keys in order for the whole group,
/// so a group whose rows interleave (a beam cache's slots, one after the other for each step)
/// reads its cache as one forward stream. Returns `[rows, heads * hd]`.
pub(crate) fn attend_rows<'a>(
    q: &[f32],
    heads: usize,
    hd: usize,
    groups: &[usize],
    kv: impl Fn(usize, usize) -> HeadKv<'a> + Sync,
) -> Vec<f32> {
    let d = heads * hd;
    debug_assert_eq!(groups.iter().sum::<usize>() * d, q.len());
    let first_rows: Vec<usize> = groups
        .iter()
        .scan(0, |row, &n| {
            *row += n;
            Some(*row - n)
        })
        .collect();
    // Each (group, head) task reads its keys and values once for all the group's rows.
    let parts: Vec<Vec<f32>> = (0..groups.len() * heads)
        .into_par_iter()
        .map(|task| {
            let (g, h) = (task / heads, task % heads);
            let (first, group) = (first_rows[g], groups[g]);
            let kv = kv(g, h);
            let qs: Vec<f32> = (0..group)
                .flat_map(|j| &q[(first + j) * d + h * hd..][..hd])
                .copied()
                .collect();
            let mut scores = vec![0f32; group * kv.starts[0].len()];
            match kv.keys {
                Keys::Rows(k) => scores_from_rows(&qs, hd, k, kv.starts, &mut scores),
                Keys::Transposed(kt) => scores_from_transposed(&qs, hd, kt, &mut scores),
            }
            let mut o = vec![0f32; group * hd];
            softmax_times_values(&mut scores, kv.values, kv.starts, &mut o);
            o
        })
        .collect();
    let mut out = vec![0f32; q.len()];
    for (task, o) in parts.iter().enumerate() {
        let (g, h) = (task / heads, task % heads);
        for (j, o) in o.chunks_exact(hd).enumerate() {
            out[(first_rows[g] + j) * d + h * hd..][..hd].copy_from_slice(o);
        }
    }
    out
}

/// The offsets query row `j` attends through: its own, or the list all rows share.
#[inline(always)]
fn row_starts(starts: &[Vec<usize>], j: usize) -> &[usize] {
    &starts[if starts.len() == 1 { 0 } else { j }]
}

with_avx2!(
    /// `scores[j * n + s] = q_j · k[starts[j][s]..][..hd]` for the rows `q_j` of `qs`.
    fn scores_from_rows(qs: &[f32], hd: usize, k: &[f32], starts: &[Vec<usize>], scores: &mut [f32]) -> () = scores_from_rows_portable
);

#[inline(always)]
fn scores_from_rows_portable(qs: &[f32], hd: usize, k: &[f32], starts: &[Vec<usize>], scores: &mut [f32]) {
    let n = starts[0].len();
    for s in 0..n {
        prefetch_ahead(k, starts, s, hd);
        for (j, q) in qs.chunks_exact(hd).enumerate() {
            scores[j * n + s] = dot(q, &k[row_starts(starts, j)[s]..][..hd]);
        }
    }
}

with_avx2!(
    /// `scores[j * n + s] = Σ_i q_j[i] · kt[i * n + s]`: the same scores from `[hd, n]` keys.
    fn scores_from_transposed(qs: &[f32], hd: usize, kt: &[f32], scores: &mut [f32]) -> () = scores_from_transposed_portable
);

#[inline(always)]
fn scores_from_transposed_portable(qs: &[f32], hd: usize, kt: &[f32], scores: &mut [f32]) {
    let n = kt.len() / hd;
    for (q, row) in qs.chunks_exact(hd).zip(scores.chunks_exact_mut(n)) {
        for (i, &qi) in q.iter().enumerate() {
            for (sc, &k) in row.iter_mut().zip(&kt[i * n..(i + 1) * n]) {
                *sc = qi.mul_add(k, *sc);
            }
        }
    }
}

with_avx2!(
    /// Softmax of each row of `scores` (`[group, n]`), then `o_j = Σ_s p_js · v[starts[j][s]..][..hd]`.
    fn softmax_times_values(scores: &mut [f32], v: &[f32], starts: &[Vec<usize>], o: &mut [f32]) -> () = softmax_times_values_portable
);

#[inline(always)]
fn softmax_times_values_portable(scores: &mut [f32], v: &[f32], starts: &[Vec<usize>], o: &mut [f32]) {
    let n = starts[0].len();
    let hd = o.len() / (scores.len() / n);
    softmax_rows_portable(scores, n);
    for s in 0..n {
        prefetch_ahead(v, starts, s, hd);
        for (j, o) in o.chunks_exact_mut(hd).enumerate() {
            let p = scores[j * n + s];
            let value = &v[row_starts(starts, j)[s]..][..hd];
            for (o, &v) in o.iter_mut().zip(value) {
                *o = p.mul_add(v, *o);
            }
        }
    }
}

/// Floats in a 64-byte cache line.
const LINE: usize = 16;

/// Keys and values are prefetched this many positions ahead, about a kilobyte of 64-wide rows
/// (as far ahead as the decoding step's weights): the hardware prefetcher alone leaves these
/// streams waiting on memory.
const AHEAD: usize = 4;

/// Prefetches the `hd`-wide rows of `x` that each offset list reaches [`AHEAD`] positions
/// past `s`.
#[inline(always)]
fn prefetch_ahead(x: &[f32], starts: &[Vec<usize>], s: usize, hd: usize) {
    for &start in starts.iter().filter_map(|list| list.get(s + AHEAD)) {
        for off in (0..hd).step_by(LINE) {
            prefetch(x.as_ptr().wrapping_add(start + off));
        }
    }
}

/// Starts loading the cache line holding `p` (nothing is dereferenced: any address will do).
#[inline(always)]
fn prefetch(p: *const f32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint; it reads nothing and cannot fault.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// `a · b` over 16 lanes, so that it vectorizes.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let (ca, cb) = (a.chunks_exact(L), b.chunks_exact(L));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..L {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Scaled dot-product attention over `[.., Lq, D]` x `[.., Lk, D]`, with `q` already scaled.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    // A transposed view: the GEMM reads K in place.
    let scores = q.matmul(&k.transpose(D::Minus2, D::Minus1)?)?;
    Ok(softmax(&scores)?.matmul(v)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919 + seed * 104729) % 2000) as f32 / 1000.0 - 1.0)
            .collect()
    }

    /// Softmax attention of one query row over the given key and value rows, in f64.
    fn naive(q: &[f32], keys: &[&[f32]], vals: &[&[f32]]) -> Vec<f64> {
        let scores: Vec<f64> = keys
            .iter()
            .map(|k| q.iter().zip(*k).map(|(&a, &b)| a as f64 * b as f64).sum())
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        let mut o = vec![0f64; q.len()];
        for (p, v) in e.iter().zip(vals) {
            for (o, &v) in o.iter_mut().zip(*v) {
                *o += p / sum * v as f64;
            }
        }
        o
    }

    /// A beam cache: `[steps, rows, hd]` per head, each row following its own lineage, as the
    /// decoder keeps it; and the encoder memory's keys transposed, shared by the rows.
    #[test]
    fn decoding_attention_matches_plain_attention_and_ignores_grouping() {
        let (heads, hd, rows, steps) = (2, 64, 3, 9);
        let d = heads * hd;
        let q = values(rows * d, 1);
        let k: Vec<Vec<f32>> = (0..heads).map(|h| values(steps * rows * hd, 10 + h)).collect();
        let v: Vec<Vec<f32>> = (0..heads).map(|h| values(steps * rows * hd, 20 + h)).collect();
        // Row r held the ancestor of beam r in slot lineage[r][s] at step s.
        let lineage = [
            [0, 0, 0, 1, 1, 2, 0, 2, 0],
            [0, 0, 1, 1, 0, 0, 2, 1, 1],
            [0, 0, 2, 0, 1, 2, 1, 0, 2],
        ];
        let starts: Vec<Vec<usize>> = lineage
            .iter()
            .map(|l| l.iter().enumerate().map(|(s, &slot)| (s * rows + slot) * hd).collect())
            .collect();
        let grouped = attend_rows(&q, heads, hd, &[rows], |_, h| HeadKv {
            keys: Keys::Rows(&k[h]),
            values: &v[h],
            starts: &starts,
        });
        let alone = attend_rows(&q, heads, hd, &[1; 3], |r, h| HeadKv {
            keys: Keys::Rows(&k[h]),
            values: &v[h],
            starts: &starts[r..r + 1],
        });
        assert_eq!(
            grouped, alone,
            "a row's attention must not depend on the rows beside it"
        );
        for r in 0..rows {
            for h in 0..heads {
                let keys: Vec<&[f32]> = starts[r].iter().map(|&at| &k[h][at..][..hd]).collect();
                let vals: Vec<&[f32]> = starts[r].iter().map(|&at| &v[h][at..][..hd]).collect();
                let want = naive(&q[r * d + h * hd..][..hd], &keys, &vals);
                for (got, want) in grouped[r * d + h * hd..][..hd].iter().zip(want) {
                    assert!((*got as f64 - want).abs() < 1e-5, "row {r} head {h}: {got} vs {want}");
                }
            }
        }

        // Memory keys `[hd, n]` per head, values `[n, hd]`, one offset list for all rows.
        let n = 37;
        let kt: Vec<Vec<f32>> = (0..heads).map(|h| values(hd * n, 30 + h)).collect();
        let mv: Vec<Vec<f32>> = (0..heads).map(|h| values(n * hd, 40 + h)).collect();
        let memory_starts = vec![(0..n).map(|s| s * hd).collect::<Vec<_>>()];
        let out = attend_rows(&q, heads, hd, &[rows], |_, h| HeadKv {
            keys: Keys::Transposed(&kt[h]),
            values: &mv[h],
            starts: &memory_starts,
        });
        for r in 0..rows {
            for h in 0..heads {
                let keys: Vec<Vec<f32>> = (0..n).map(|s| (0..hd).map(|i| kt[h][i * n + s]).collect()).collect();
                let keys: Vec<&[f32]> = keys.iter().map(|k| k.as_slice()).collect();
                let vals: Vec<&[f32]> = (0..n).map(|s| &mv[h][s * hd..][..hd]).collect();
                let want = naive(&q[r * d + h * hd..][..hd], &keys, &vals);
                for (got, want) in out[r * d + h * hd..][..hd].iter().zip(want) {
                    assert!(
                        (*got as f64 - want).abs() < 1e-5,
                        "memory, row {r} head {h}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
