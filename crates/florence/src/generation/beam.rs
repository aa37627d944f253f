//! Beam search, step for step as transformers 5's vectorized `_beam_search`: the top
//! `2 * num_beams` continuations of all beams are taken; those ending in EOS (or at the length
//! limit) among the first `num_beams` become finished hypotheses, scored
//! `sum_logprobs / generated_len ** length_penalty`; the best unfinished ones run on. The f32
//! arithmetic (including the `-1e9` masks) is reproduced so that ties break the same way.

use rand::rngs::StdRng;
use rand::SeedableRng;

use super::processors::{softmax, LogitsProcessor};
use super::sampling::sample_without_replacement;
use super::{log_softmax, top_k_indices, EarlyStopping, GenerationConfig, Sequence};

const MASK: f32 = -1.0e9;

/// Beam-search state of one image.
#[derive(Debug, Clone)]
pub(super) struct BeamSearch {
    running: Vec<Sequence>,
    running_scores: Vec<f32>,
    finished: Vec<Sequence>,
    finished_scores: Vec<f32>,
    is_finished: Vec<bool>,
    improvement_possible: bool,
    rng: Option<StdRng>,
}

impl BeamSearch {
    /// `cfg.num_beams` beams at the decoder start token (sampled when `cfg.sampling` is set, as
    /// transformers' beam sampling).
    pub(super) fn new(cfg: &GenerationConfig) -> Self {
        let k = cfg.num_beams;
        let start = vec![cfg.decoder_start_token_id];
        Self {
            running: vec![start.clone(); k],
            running_scores: (0..k).map(|i| if i == 0 { 0.0 } else { MASK }).collect(),
            finished: vec![start; k],
            finished_scores: vec![MASK; k],
            is_finished: vec![false; k],
            improvement_possible: true,
            rng: cfg.sampling.as_ref().map(|s| StdRng::seed_from_u64(s.seed)),
        }
    }

    /// The last token of each beam: what the decoder is fed next.
    pub(super) fn tokens(&self) -> Vec<u32> {
        self.running.iter().map(|s| *s.last().unwrap()).collect()
    }

    /// The best finished hypothesis.
    pub(super) fn into_sequence(mut self) -> Sequence {
        self.finished.swap_remove(0)
    }

    /// One step over the beams' next-token logits `rows` at length `cur_len`: returns, per beam
    /// of the next step, the beam it continues, and whether the search is over.
    ///
    /// Longer than our usual limit on purpose: it follows transformers' `_beam_search` step by
    /// step (score, top 2k, split finished from running, early-stopping test), so that the two
    /// can be read side by side when checking token parity.
    pub(super) fn advance(&mut self, cfg: &GenerationConfig, cur_len: usize, rows: &[Vec<f32>]) -> (Vec<u32>, bool) {
        let k = cfg.num_beams;
        let keep = 2 * k;
        let max_length = cfg.max_length();
        let processor = LogitsProcessor::new(cfg);
        let b = self;
        let vocab = rows[0].len();
        let mut acc = Vec::with_capacity(k * vocab);
        for (beam, row) in rows.iter().enumerate() {
            let mut lp = row.clone();
            log_softmax(&mut lp);
            processor.process(&b.running[beam], &mut lp);
            let base = b.running_scores[beam];
            acc.extend(lp.iter().map(|&x| x + base));
        }
        let top = match &mut b.rng {
            None => top_k_indices(&acc, keep),
            Some(rng) => {
                let mut picked = sample_without_replacement(&softmax(&acc), keep, rng);
                picked.sort_by(|&a, &c| acc[c].total_cmp(&acc[a]).then(a.cmp(&c)));
                picked
            }
        };
        let cand_scores: Vec<f32> = top.iter().map(|&i| acc[i]).collect();
        let cand_beam: Vec<usize> = top.iter().map(|&i| i / vocab).collect();
        let cand_seq: Vec<Sequence> = top
            .iter()
            .zip(&cand_beam)
            .map(|(&i, &beam)| {
                let mut s = b.running[beam].clone();
                s.push((i % vocab) as u32);
                s
            })
            .collect();
        let hits: Vec<bool> = cand_seq
            .iter()
            .map(|s| *s.last().unwrap() == cfg.eos_token_id || cur_len + 1 >= max_length)
            .collect();

        // Running beams for the next step: the best candidates that did not stop.
        let masked: Vec<f32> = cand_scores
            .iter()
            .zip(&hits)
            .map(|(&s, &h)| s + if h { MASK } else { 0.0 })
            .collect();
        let next = top_k_indices(&masked, k);
        let order: Vec<u32> = next.iter().map(|&j| cand_beam[j] as u32).collect();

        // Finished hypotheses: merge the old ones with the candidates that just stopped.
        let denom = ((cur_len + 1 - 1) as f64).powf(cfg.length_penalty) as f32;
        let full = b.is_finished.iter().all(|&f| f) && cfg.early_stopping == EarlyStopping::Finished;
        let mut merged_scores = b.finished_scores.clone();
        let mut just_finished = Vec::with_capacity(keep);
        for (j, (&s, &h)) in cand_scores.iter().zip(&hits).enumerate() {
            let fin = h && j < k;
            let mut v = s / denom;
            v += if full { MASK } else { -0.0 };
            v += if b.improvement_possible { -0.0 } else { MASK };
            v += if fin { -0.0 } else { MASK };
            merged_scores.push(v);
            just_finished.push(fin);
        }
        let best = top_k_indices(&merged_scores, k);
        let (mut fs, mut fsc, mut ff) = (Vec::with_capacity(k), Vec::with_capacity(k), Vec::with_capacity(k));
        for &m in &best {
            if m < k {
                fs.push(b.finished[m].clone());
                ff.push(b.is_finished[m]);
            } else {
                fs.push(cand_seq[m - k].clone());
                ff.push(just_finished[m - k]);
            }
            fsc.push(merged_scores[m]);
        }
        b.finished = fs;
        b.finished_scores = fsc;
        b.is_finished = ff;
        b.running = next.iter().map(|&j| cand_seq[j].clone()).collect();
        b.running_scores = next.iter().map(|&j| masked[j]).collect();

        // Can a running beam still beat the worst finished hypothesis?
        let new_len = cur_len + 1;
        let best_len = if cfg.early_stopping == EarlyStopping::Never && cfg.length_penalty > 0.0 {
            max_length - 1
        } else {
            new_len - 1
        };
        let best_possible = b.running_scores[0] / (best_len as f64).powf(cfg.length_penalty) as f32;
        let worst = b.finished_scores.iter().copied().fold(f32::INFINITY, f32::min);
        let beatable = b
            .is_finished
            .iter()
            .any(|&f| best_possible > if f { worst } else { MASK });
        b.improvement_possible &= beatable;
        let all_finished = b.is_finished.iter().all(|&f| f);
        let done = !b.improvement_possible
            || (all_finished && cfg.early_stopping == EarlyStopping::Finished)
            || hits.iter().all(|&h| h);
        (order, done)
    }
}
