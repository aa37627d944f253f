//! Greedy search and multinomial sampling (transformers' `_sample`), one row per image.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::processors::{softmax, LogitsProcessor};
use super::{GenerationConfig, Sequence};

/// Greedy search, or sampling when `cfg.sampling` is set, of one image (one row). Each image
/// has its own random generator seeded with the configured seed, so an image's caption does not
/// depend on the other images in its batch.
#[derive(Debug, Clone)]
pub(super) struct SingleSearch {
    sequence: Sequence,
    rng: Option<StdRng>,
}

impl SingleSearch {
    pub(super) fn new(cfg: &GenerationConfig) -> Self {
        Self {
            sequence: vec![cfg.decoder_start_token_id],
            rng: cfg.sampling.as_ref().map(|s| StdRng::seed_from_u64(s.seed)),
        }
    }

    /// The tokens so far, decoder start token first.
    pub(super) fn sequence(&self) -> &[u32] {
        &self.sequence
    }

    pub(super) fn into_sequence(self) -> Sequence {
        self.sequence
    }

    /// Picks the next token from the row's logits; returns whether the sequence is over
    /// (EOS, or the maximum length).
    pub(super) fn advance(&mut self, cfg: &GenerationConfig, mut row: Vec<f32>) -> bool {
        LogitsProcessor::new(cfg).process(&self.sequence, &mut row);
        let next = match &mut self.rng {
            None => argmax(&row),
            Some(rng) => sample_without_replacement(&softmax(&row), 1, rng)[0],
        } as u32;
        self.sequence.push(next);
        next == cfg.eos_token_id || self.sequence.len() >= cfg.max_length()
    }
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
