//! Greedy search and multinomial sampling (transformers' `_sample`), one row per image.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::processors::{softmax, LogitsProcessor};
use super::{GenerationConfig, Sequence, StepDecoder};
use crate::error::Result;

/// Greedy search, or sampling when `cfg.sampling` is set. Each image has its own random
/// generator seeded with the configured seed, so an image's caption does not depend on the
/// other images in its batch.
pub fn greedy_or_sample(cfg: &GenerationConfig, images: usize, decoder: &mut dyn StepDecoder) -> Result<Vec<Sequence>> {
    let processor = LogitsProcessor::new(cfg);
    let mut seqs: Vec<Sequence> = vec![vec![cfg.decoder_start_token_id]; images];
    let mut finished = vec![false; images];
    let mut rngs: Vec<Option<StdRng>> = (0..images)
        .map(|_| cfg.sampling.as_ref().map(|s| StdRng::seed_from_u64(s.seed)))
        .collect();
    let max_length = cfg.max_length();
    for _ in 1..max_length {
        let feed: Vec<u32> = seqs
            .iter()
            .zip(&finished)
            .map(|(s, &f)| if f { cfg.pad_token_id } else { *s.last().unwrap() })
            .collect();
        let logits = decoder.step(&feed)?;
        for (i, mut row) in logits.into_iter().enumerate() {
            if finished[i] {
                // transformers pads finished rows; the padding is not part of the caption.
                continue;
            }
            processor.process(&seqs[i], &mut row);
            let next = match &mut rngs[i] {
                None => argmax(&row),
                Some(rng) => sample_without_replacement(&softmax(&row), 1, rng)[0],
            };
            seqs[i].push(next as u32);
            finished[i] = next as u32 == cfg.eos_token_id;
        }
        if finished.iter().all(|&f| f) {
            break;
        }
    }
    Ok(seqs)
}

/// First index of the largest value (torch's `argmax`).
fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// Draws `n` distinct indices with probability proportional to `probs`. When fewer than `n`
/// indices have non-zero probability, the rest are the lowest remaining indices.
pub(crate) fn sample_without_replacement(probs: &[f32], n: usize, rng: &mut StdRng) -> Vec<usize> {
    let mut weights: Vec<f64> = probs
        .iter()
        .map(|&p| if p.is_finite() && p > 0.0 { p as f64 } else { 0.0 })
        .collect();
    let mut total: f64 = weights.iter().sum();
    let mut out = Vec::with_capacity(n);
    while out.len() < n && total > 0.0 {
        let mut r = rng.gen::<f64>() * total;
        let mut pick = None;
        for (i, &w) in weights.iter().enumerate() {
            if w > 0.0 {
                pick = Some(i);
                if r < w {
                    break;
                }
                r -= w;
            }
        }
        let i = pick.expect("total > 0 implies a positive weight");
        out.push(i);
        total -= weights[i];
        weights[i] = 0.0;
        if total <= 0.0 {
            total = weights.iter().sum();
        }
    }
    let mut i = 0;
    while out.len() < n && i < probs.len() {
        if !out.contains(&i) {
            out.push(i);
        }
        i += 1;
    }
    out
}
