//! Scaled dot-product attention: over whole sequences (the text encoder), and for the single
//! query rows of a decoding step, reading keys and values where the caches keep them.

use candle_core::{Tensor, D};
use rayon::prelude::*;

use super::activation::{softmax, softmax_rows_portable};
use crate::error::Result;

/// Where a decoding step's attention finds one head's keys.
#[derive(Clone, Copy)]
pub(crate) enum Keys<'a> {
    /// As rows like the values: key `s` at `k[starts[s]..][..hd]` (the self-attention cache,
    /// whose rows follow each beam's lineage).
    Rows(&'a [f32]),
    /// Transposed, `[hd, n]` (the encoder memory's keys, fixed for a generation): the scores
    /// are then sums of contiguous rows, with no per-key reduction.
    Transposed(&'a [f32]),
}

/// The keys and values that one head of one group of query rows attends to.
#[derive(Clone, Copy)]
pub(crate) struct HeadKv<'a> {
    pub keys: Keys<'a>,
    /// Value `s` is `values[starts[s]..][..hd]`.
    pub values: &'a [f32],
    /// Offsets of the values, and of the keys when they are rows.
    pub starts: &'a [usize],
}

/// Attention of single query rows, for decoding steps. `q` is `[rows, heads * hd]` (already
/// scaled); rows come in groups of `group` that attend to the same keys (the beams of one
/// image), and `kv(g, h)` gives what head `h` of group `g` attends to. Keys and values should be
/// contiguous per head: strided rows defeat the prefetcher once they come from memory.
/// Returns `[rows, heads * hd]`.
pub(crate) fn attend_rows<'a>(
    q: &[f32],
    heads: usize,
    hd: usize,
    group: usize,
    kv: impl Fn(usize, usize) -> HeadKv<'a> + Sync,
) -> Vec<f32> {
    let d = heads * hd;
    let groups = q.len() / (d * group);
    // Each (group, head) task reads its keys and values once for all the group's rows.
    let parts: Vec<Vec<f32>> = (0..groups * heads)
        .into_par_iter()
        .map(|task| {
            let (g, h) = (task / heads, task % heads);
            let kv = kv(g, h);
            let qs: Vec<f32> = (0..group)
                .flat_map(|j| &q[(g * group + j) * d + h * hd..][..hd])
                .copied()
                .collect();
            let mut scores = vec![0f32; group * kv.starts.len()];
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
            out[(g * group + j) * d + h * hd..][..hd].copy_from_slice(o);
        }
    }
    out
}

with_avx2!(
    /// `scores[j * n + s] = q_j · k[starts[s]..][..hd]` for the rows `q_j` of `qs`.
    fn scores_from_rows(qs: &[f32], hd: usize, k: &[f32], starts: &[usize], scores: &mut [f32]) -> () = scores_from_rows_portable
);

#[inline(always)]
fn scores_from_rows_portable(qs: &[f32], hd: usize, k: &[f32], starts: &[usize], scores: &mut [f32]) {
    let n = starts.len();
    for (s, &start) in starts.iter().enumerate() {
        let key = &k[start..][..hd];
        for (j, q) in qs.chunks_exact(hd).enumerate() {
            scores[j * n + s] = dot(q, key);
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
    /// Softmax of each row of `scores` (`[group, n]`), then `o_j = Σ_s p_js · v[starts[s]..][..hd]`.
    fn softmax_times_values(scores: &mut [f32], v: &[f32], starts: &[usize], o: &mut [f32]) -> () = softmax_times_values_portable
);

#[inline(always)]
fn softmax_times_values_portable(scores: &mut [f32], v: &[f32], starts: &[usize], o: &mut [f32]) {
    let n = starts.len();
    let hd = o.len() / (scores.len() / n);
    softmax_rows_portable(scores, n);
    for (s, &start) in starts.iter().enumerate() {
        let value = &v[start..][..hd];
        for (j, o) in o.chunks_exact_mut(hd).enumerate() {
            let p = scores[j * n + s];
            for (o, &v) in o.iter_mut().zip(value) {
                *o = p.mul_add(v, *o);
            }
        }
    }
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
