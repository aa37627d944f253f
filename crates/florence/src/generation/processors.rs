//! transformers' logits processors and sampling warpers, applied row by row in its order.

use super::{GenerationConfig, SamplingConfig};

/// The processors a [`GenerationConfig`] enables.
#[derive(Debug, Clone)]
pub struct LogitsProcessor<'a> {
    cfg: &'a GenerationConfig,
}

impl<'a> LogitsProcessor<'a> {
    /// The processors `cfg` asks for.
    pub fn new(cfg: &'a GenerationConfig) -> Self {
        Self { cfg }
    }

    /// Applies the processors to the scores of one row, whose tokens so far are `tokens`
    /// (decoder start token included).
    pub fn process(&self, tokens: &[u32], scores: &mut [f32]) {
        let cfg = self.cfg;
        let cur_len = tokens.len();
        let n = cfg.no_repeat_ngram_size;
        if n > 0 && cur_len >= n {
            // Ban every token that would complete an n-gram already present in this row.
            let prefix = &tokens[cur_len + 1 - n..];
            for w in tokens.windows(n) {
                if &w[..n - 1] == prefix {
                    if let Some(s) = scores.get_mut(w[n - 1] as usize) {
                        *s = f32::NEG_INFINITY;
                    }
                }
            }
        }
        if cur_len < cfg.min_new_tokens + 1 {
            if let Some(s) = scores.get_mut(cfg.eos_token_id as usize) {
                *s = f32::NEG_INFINITY;
            }
        }
        if let Some(bos) = cfg.forced_bos_token_id {
            if cur_len == 1 {
                force(scores, bos);
            }
        }
        if let Some(eos) = cfg.forced_eos_token_id {
            if cur_len == cfg.max_length() - 1 {
                force(scores, eos);
            }
        }
        if let Some(s) = &cfg.sampling {
            warp(s, scores);
        }
    }
}

fn force(scores: &mut [f32], token: u32) {
    scores.fill(f32::NEG_INFINITY);
    if let Some(s) = scores.get_mut(token as usize) {
        *s = 0.0;
    }
}

/// Temperature, top-k, top-p and min-p, in transformers' order; filtered scores become -inf.
fn warp(s: &SamplingConfig, scores: &mut [f32]) {
    if s.temperature != 1.0 {
        for x in scores.iter_mut() {
            *x /= s.temperature;
        }
    }
    if s.top_k > 0 && s.top_k < scores.len() {
        let kth = super::top_k_indices(scores, s.top_k).last().map(|&i| scores[i]);
        if let Some(kth) = kth {
            for x in scores.iter_mut() {
                if *x < kth {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
    }
    if s.top_p < 1.0 {
        // Ascending order; drop the low tail whose cumulative probability stays <= 1 - top_p,
        // always keeping the most likely token.
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
        let probs = softmax(scores);
        let mut cum = 0f32;
        let last = order.len() - 1;
        let mut remove = Vec::new();
        for (rank, &i) in order.iter().enumerate() {
            cum += probs[i];
            if cum <= 1.0 - s.top_p && rank < last {
                remove.push(i);
            }
        }
        for i in remove {
            scores[i] = f32::NEG_INFINITY;
        }
    }
    if s.min_p > 0.0 {
        let probs = softmax(scores);
        let top = probs.iter().copied().fold(0f32, f32::max);
        let threshold = s.min_p * top;
        for (x, p) in scores.iter_mut().zip(&probs) {
            if *p < threshold {
                *x = f32::NEG_INFINITY;
            }
        }
    }
}

/// Probabilities of a row of scores.
pub(crate) fn softmax(scores: &[f32]) -> Vec<f32> {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut p: Vec<f32> = scores.iter().map(|&x| (x - max).exp()).collect();
    let sum: f32 = p.iter().sum();
    for x in p.iter_mut() {
        *x /= sum;
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> GenerationConfig {
        GenerationConfig {
            max_new_tokens: 10,
            ..Default::default()
        }
    }

    #[test]
    fn no_repeat_ngram_bans_completions() {
        let c = cfg();
        let p = LogitsProcessor::new(&c);
        // ... 5 6 7 ... 5 6 -> 7 would repeat the 3-gram (5, 6, 7).
        let tokens = [2, 0, 5, 6, 7, 8, 5, 6];
        let mut s = vec![0f32; 10];
        p.process(&tokens, &mut s);
        assert_eq!(s[7], f32::NEG_INFINITY);
        assert_eq!(s.iter().filter(|x| x.is_infinite()).count(), 1);
    }

    #[test]
    fn forced_bos_then_forced_eos() {
        let c = cfg();
        let p = LogitsProcessor::new(&c);
        let mut s = vec![0.5f32; 10];
        p.process(&[2], &mut s);
        assert_eq!(s[0], 0.0);
        assert!(s[1..].iter().all(|x| *x == f32::NEG_INFINITY));
        let mut s = vec![0.5f32; 10];
        p.process(&[2, 0, 4, 5, 6, 7, 8, 9, 3, 4], &mut s); // cur_len 10 = max_length - 1
        assert_eq!(s[2], 0.0);
        assert_eq!(s.iter().filter(|x| x.is_finite()).count(), 1);
    }

    #[test]
    fn min_new_tokens_bans_eos() {
        let c = GenerationConfig {
            min_new_tokens: 3,
            ..cfg()
        };
        let p = LogitsProcessor::new(&c);
        let mut s = vec![0.5f32; 10];
        p.process(&[2, 0, 4], &mut s); // two new tokens so far
        assert_eq!(s[2], f32::NEG_INFINITY);
        let mut s = vec![0.5f32; 10];
        p.process(&[2, 0, 4, 5], &mut s);
        assert_eq!(s[2], 0.5);
    }

    #[test]
    fn top_k_and_top_p_filter() {
        let mut s = vec![1.0f32, 4.0, 3.0, 2.0];
        warp(
            &SamplingConfig {
                top_k: 2,
                ..Default::default()
            },
            &mut s,
        );
        assert_eq!(s, vec![f32::NEG_INFINITY, 4.0, 3.0, f32::NEG_INFINITY]);
        // probs of [ln .1, ln .2, ln .3, ln .4]: top_p 0.65 keeps .4 and .3.
        let mut s: Vec<f32> = [0.1f32, 0.2, 0.3, 0.4].iter().map(|p| p.ln()).collect();
        warp(
            &SamplingConfig {
                top_k: 0,
                top_p: 0.65,
                ..Default::default()
            },
            &mut s,
        );
        assert!(s[0].is_infinite() && s[1].is_infinite() && s[2].is_finite() && s[3].is_finite());
        let mut s: Vec<f32> = [0.1f32, 0.2, 0.3, 0.4].iter().map(|p| p.ln()).collect();
        warp(
            &SamplingConfig {
                top_k: 0,
                min_p: 0.6,
                ..Default::default()
            },
            &mut s,
        );
        assert!(s[0].is_infinite() && s[1].is_infinite() && s[2].is_finite() && s[3].is_finite());
    }
}
