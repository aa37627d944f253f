//! Token generation with transformers' exact semantics: beam search (the vectorized
//! `_beam_search` of transformers 5), greedy search and sampling, and the logits processors
//! they use (no-repeat n-grams, minimum length, forced BOS/EOS, temperature, top-k, top-p, min-p).
//!
//! Each image has its own [`ImageSearch`], advanced one decoding step at a time: [`generate`]
//! drives a fixed set of them through any [`StepDecoder`], and a server can let searches join and
//! leave a running batch at any step. An image's tokens never depend on the images beside it.

mod beam;
mod processors;
mod sampling;

pub use processors::LogitsProcessor;

use rayon::prelude::*;

use crate::config::GenerationOverrides;
use crate::error::{Error, Result};

/// When beam search stops (transformers' `early_stopping`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EarlyStopping {
    /// Stop as soon as `num_beams` hypotheses are finished (`True`; Florence-2's default).
    #[default]
    Finished,
    /// Stop when no running beam can beat the worst finished one at its current length (`False`).
    Heuristic,
    /// Stop only when no running beam can improve, even at the maximum length (`"never"`).
    Never,
}

/// Settings for random sampling.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// Temperature the logits are divided by.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1.0 = off).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one (0.0 = off).
    pub min_p: f32,
    /// Seed of the random generator; the same seed gives the same output.
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            min_p: 0.0,
            seed: 0,
        }
    }
}

/// Everything that decides which tokens are generated.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// Most new tokens, counting the forced BOS and the final EOS.
    pub max_new_tokens: usize,
    /// EOS is banned until this many new tokens exist.
    pub min_new_tokens: usize,
    /// Beams of beam search; 1 is greedy search (or sampling).
    pub num_beams: usize,
    /// Exponent of the length that beam scores are divided by.
    pub length_penalty: f64,
    /// When beam search stops.
    pub early_stopping: EarlyStopping,
    /// Ban any n-gram of this size from repeating (0 = off).
    pub no_repeat_ngram_size: usize,
    /// Token forced as the first new token.
    pub forced_bos_token_id: Option<u32>,
    /// Token forced when the maximum length is reached.
    pub forced_eos_token_id: Option<u32>,
    /// The token the decoder starts from.
    pub decoder_start_token_id: u32,
    /// The token that ends a sequence.
    pub eos_token_id: u32,
    /// The token finished sequences are padded with.
    pub pad_token_id: u32,
    /// `Some` to sample instead of searching deterministically.
    pub sampling: Option<SamplingConfig>,
}

impl Default for GenerationConfig {
    /// The settings Microsoft's remote code effectively uses (spec §7).
    fn default() -> Self {
        Self {
            max_new_tokens: 1024,
            min_new_tokens: 0,
            num_beams: 3,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::Finished,
            no_repeat_ngram_size: 3,
            forced_bos_token_id: Some(0),
            forced_eos_token_id: Some(2),
            decoder_start_token_id: 2,
            eos_token_id: 2,
            pad_token_id: 1,
            sampling: None,
        }
    }
}

impl GenerationConfig {
    /// Applies the fields a checkpoint's files set.
    pub fn apply(&mut self, o: &GenerationOverrides) {
        if let Some(v) = o.num_beams {
            self.num_beams = v;
        }
        if let Some(v) = o.no_repeat_ngram_size {
            self.no_repeat_ngram_size = v;
        }
        if let Some(v) = o.early_stopping {
            self.early_stopping = if v {
                EarlyStopping::Finished
            } else {
                EarlyStopping::Heuristic
            };
        }
        if let Some(v) = o.length_penalty {
            self.length_penalty = v;
        }
        if let Some(v) = o.forced_bos_token_id {
            self.forced_bos_token_id = Some(v);
        }
        if let Some(v) = o.forced_eos_token_id {
            self.forced_eos_token_id = Some(v);
        }
        if let Some(v) = o.max_new_tokens {
            self.max_new_tokens = v;
        }
        if let Some(v) = o.min_new_tokens {
            self.min_new_tokens = v;
        }
        let sampling_fields = o.temperature.is_some() || o.top_k.is_some() || o.top_p.is_some() || o.min_p.is_some();
        if o.do_sample == Some(true) || (self.sampling.is_some() && sampling_fields) {
            let mut s = self.sampling.clone().unwrap_or_default();
            if let Some(v) = o.temperature {
                s.temperature = v as f32;
            }
            if let Some(v) = o.top_k {
                s.top_k = v;
            }
            if let Some(v) = o.top_p {
                s.top_p = v as f32;
            }
            if let Some(v) = o.min_p {
                s.min_p = v as f32;
            }
            self.sampling = Some(s);
        } else if o.do_sample == Some(false) {
            self.sampling = None;
        }
    }

    /// Checks the settings against the model's decoder length.
    pub fn validate(&self, max_positions: usize) -> Result<()> {
        if self.num_beams == 0 {
            return Err(Error::usage("num_beams must be at least 1"));
        }
        if self.max_new_tokens == 0 {
            return Err(Error::usage("max_new_tokens must be at least 1"));
        }
        if self.max_new_tokens > max_positions {
            return Err(Error::usage(format!(
                "max_new_tokens = {} exceeds the model's {max_positions} decoder positions",
                self.max_new_tokens
            )));
        }
        if self.min_new_tokens > self.max_new_tokens {
            return Err(Error::usage(format!(
                "min_new_tokens = {} is larger than max_new_tokens = {}",
                self.min_new_tokens, self.max_new_tokens
            )));
        }
        if let Some(s) = &self.sampling {
            if !(s.temperature > 0.0 && s.temperature.is_finite()) {
                return Err(Error::usage(format!(
                    "temperature must be positive, got {}",
                    s.temperature
                )));
            }
            if !(s.top_p > 0.0 && s.top_p <= 1.0) {
                return Err(Error::usage(format!("top_p must be in (0, 1], got {}", s.top_p)));
            }
            if !(0.0..=1.0).contains(&s.min_p) {
                return Err(Error::usage(format!("min_p must be in [0, 1], got {}", s.min_p)));
            }
        }
        Ok(())
    }

    /// transformers' `max_length`: the decoder start token plus the new tokens.
    pub(crate) fn max_length(&self) -> usize {
        self.max_new_tokens + 1
    }
}

/// What a caller asks of generation on top of a model's own settings (flags, a request body):
/// `None` keeps the model's value.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationRequest {
    /// Beams of beam search; 1 is greedy search.
    pub num_beams: Option<usize>,
    /// Most new tokens, counting the forced BOS and the final EOS.
    pub max_new_tokens: Option<usize>,
    /// EOS is banned until this many new tokens exist.
    pub min_new_tokens: Option<usize>,
    /// `Some` to sample, `None` to search deterministically (whatever the checkpoint says).
    pub sampling: Option<SamplingRequest>,
}

/// Sampling settings a caller asks for; `None` keeps the model's value (or the default).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingRequest {
    /// Temperature of the softmax.
    pub temperature: Option<f32>,
    /// Keep only the `k` most likely tokens (0 = off).
    pub top_k: Option<usize>,
    /// Nucleus sampling threshold.
    pub top_p: Option<f32>,
    /// Relative probability floor.
    pub min_p: Option<f32>,
    /// Seed of the random generator.
    pub seed: u64,
}

impl GenerationRequest {
    /// The settings to generate with: `defaults` (a model's [`generation_config`]) with this
    /// request's values over them. Check the result with [`GenerationConfig::validate`].
    ///
    /// [`generation_config`]: crate::Florence::generation_config
    pub fn resolve(&self, defaults: &GenerationConfig) -> GenerationConfig {
        let mut g = defaults.clone();
        g.num_beams = self.num_beams.unwrap_or(g.num_beams);
        g.max_new_tokens = self.max_new_tokens.unwrap_or(g.max_new_tokens);
        g.min_new_tokens = self.min_new_tokens.unwrap_or(g.min_new_tokens);
        g.sampling = self.sampling.as_ref().map(|r| {
            let s = defaults.sampling.clone().unwrap_or_default();
            SamplingConfig {
                temperature: r.temperature.unwrap_or(s.temperature),
                top_k: r.top_k.unwrap_or(s.top_k),
                top_p: r.top_p.unwrap_or(s.top_p),
                min_p: r.min_p.unwrap_or(s.min_p),
                seed: r.seed,
            }
        });
        g
    }
}

/// A decoder over a fixed set of images that advances the rows of some of them by one token.
///
/// Each image has as many consecutive rows as its search has beams.
pub trait StepDecoder {
    /// Feeds one token per row of each image of `images` (increasing indices; rows image by
    /// image) and returns each row's next-token logits.
    fn step(&mut self, images: &[usize], tokens: &[u32]) -> Result<Vec<Vec<f32>>>;
    /// Makes row `i` of image `image` continue from the state of its old row `order[i]`.
    fn reorder(&mut self, image: usize, order: &[u32]) -> Result<()>;
}

/// The generated token ids of one image, starting with the decoder start token.
pub type Sequence = Vec<u32>;

/// What a decoding step did to one image's search.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Advance {
    /// The search goes on; when `reorder` is set, the decoder's row `i` of this image must
    /// continue from its old row `reorder[i]` first.
    Continue {
        /// The beam each row continues.
        reorder: Option<Vec<u32>>,
    },
    /// The search is over: take its result with [`ImageSearch::into_sequence`].
    Done,
}

/// The search of one image (beam search, greedy search or sampling, as its settings say),
/// advanced one decoding step at a time.
#[derive(Debug, Clone)]
pub struct ImageSearch {
    cfg: GenerationConfig,
    /// Tokens per row so far, the decoder start token included.
    cur_len: usize,
    kind: SearchKind,
}

#[derive(Debug, Clone)]
enum SearchKind {
    Beams(beam::BeamSearch),
    Single(sampling::SingleSearch),
}

impl ImageSearch {
    /// A search with the settings `cfg` (check them with [`GenerationConfig::validate`] first).
    pub fn new(cfg: &GenerationConfig) -> Self {
        let kind = if cfg.num_beams > 1 {
            SearchKind::Beams(beam::BeamSearch::new(cfg))
        } else {
            SearchKind::Single(sampling::SingleSearch::new(cfg))
        };
        Self {
            cfg: cfg.clone(),
            cur_len: 1,
            kind,
        }
    }

    /// The decoder rows this image takes: its beams.
    pub fn rows(&self) -> usize {
        self.cfg.num_beams
    }

    /// The settings it runs with.
    pub fn config(&self) -> &GenerationConfig {
        &self.cfg
    }

    /// The token each row is fed next.
    pub fn tokens(&self) -> Vec<u32> {
        match &self.kind {
            SearchKind::Beams(b) => b.tokens(),
            SearchKind::Single(s) => vec![*s.sequence().last().unwrap()],
        }
    }

    /// The tokens chosen so far when one row is searched (greedy search or sampling): they
    /// will begin the result. `None` for beam search, whose result is known only at the end.
    pub fn partial(&self) -> Option<&[u32]> {
        match &self.kind {
            SearchKind::Beams(_) => None,
            SearchKind::Single(s) => Some(s.sequence()),
        }
    }

    /// Takes one step's logits, one row per beam.
    pub fn advance(&mut self, logits: Vec<Vec<f32>>) -> Result<Advance> {
        if logits.len() != self.rows() {
            return Err(Error::usage(format!(
                "{} rows of logits for a search of {} rows",
                logits.len(),
                self.rows()
            )));
        }
        let (reorder, done) = match &mut self.kind {
            SearchKind::Beams(b) => {
                let (order, done) = b.advance(&self.cfg, self.cur_len, &logits);
                (Some(order), done)
            }
            SearchKind::Single(s) => (None, s.advance(&self.cfg, logits.into_iter().next().unwrap())),
        };
        self.cur_len += 1;
        Ok(if done || self.cur_len >= self.cfg.max_length() {
            Advance::Done
        } else {
            Advance::Continue { reorder }
        })
    }

    /// The result: the best sequence, decoder start token first.
    pub fn into_sequence(self) -> Sequence {
        match self.kind {
            SearchKind::Beams(b) => b.into_sequence(),
            SearchKind::Single(s) => s.into_sequence(),
        }
    }
}

/// Runs the search the configuration asks for over `images` images, stepping only the images
/// whose search goes on.
pub fn generate(cfg: &GenerationConfig, images: usize, decoder: &mut dyn StepDecoder) -> Result<Vec<Sequence>> {
    let mut searches: Vec<ImageSearch> = (0..images).map(|_| ImageSearch::new(cfg)).collect();
    let mut active: Vec<usize> = (0..images).collect();
    while !active.is_empty() {
        let tokens: Vec<u32> = active.iter().flat_map(|&i| searches[i].tokens()).collect();
        let mut logits = decoder.step(&active, &tokens)?.into_iter();
        let mut rows: Vec<Option<Vec<Vec<f32>>>> = vec![None; images];
        for &i in &active {
            rows[i] = Some(logits.by_ref().take(searches[i].rows()).collect());
        }
        // The searches are independent (a softmax over the vocabulary per row, then top-k):
        // on the model's threads, idle meanwhile, they take a fraction of a large batch's step.
        let advances: Vec<Option<Result<Advance>>> = searches
            .par_iter_mut()
            .zip(rows)
            .map(|(search, rows)| rows.map(|rows| search.advance(rows)))
            .collect();
        let mut still = Vec::with_capacity(active.len());
        for (i, advance) in advances.into_iter().enumerate() {
            if let Some(Advance::Continue { reorder }) = advance.transpose()? {
                if let Some(order) = reorder {
                    decoder.reorder(i, &order)?;
                }
                still.push(i);
            }
        }
        active = still;
    }
    Ok(searches.into_iter().map(ImageSearch::into_sequence).collect())
}

/// `log_softmax` over one row, as torch computes it: `x - max - log(sum(exp(x - max)))`.
pub(crate) fn log_softmax(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = crate::nn::sum_exp_below(row, max).ln();
    for x in row.iter_mut() {
        *x = *x - max - lse;
    }
}

/// Indices of the `k` largest values, largest first; ties keep the lower index first.
///
/// One pass that keeps the best `k` so far: most values fail the first comparison, which beats
/// sorting or selecting among all of a beam step's `beams x vocab` scores.
pub(crate) fn top_k_indices(values: &[f32], k: usize) -> Vec<usize> {
    use std::cmp::Ordering;
    let mut best: Vec<usize> = Vec::with_capacity(k + 1);
    if k == 0 {
        return best;
    }
    for (i, &v) in values.iter().enumerate() {
        if best.len() == k && v.total_cmp(&values[best[k - 1]]) != Ordering::Greater {
            continue;
        }
        // After every kept value >= v: an equal value seen earlier has the lower index.
        let at = best.partition_point(|&j| values[j].total_cmp(&v) != Ordering::Less);
        best.insert(at, i);
        best.truncate(k);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// A request overrides what it sets and keeps the rest; no sampling request means search,
    /// even over a checkpoint that samples.
    #[test]
    fn requests_override_only_what_they_set() {
        let mut defaults = GenerationConfig {
            num_beams: 3,
            max_new_tokens: 100,
            sampling: Some(SamplingConfig {
                temperature: 0.5,
                top_k: 7,
                ..SamplingConfig::default()
            }),
            ..GenerationConfig::default()
        };
        let g = GenerationRequest {
            max_new_tokens: Some(20),
            ..GenerationRequest::default()
        }
        .resolve(&defaults);
        assert_eq!((g.num_beams, g.max_new_tokens, g.sampling), (3, 20, None));
        let sample = GenerationRequest {
            sampling: Some(SamplingRequest {
                top_p: Some(0.9),
                seed: 4,
                ..SamplingRequest::default()
            }),
            ..GenerationRequest::default()
        };
        let s = sample.resolve(&defaults).sampling.unwrap();
        assert_eq!((s.temperature, s.top_k, s.top_p, s.seed), (0.5, 7, 0.9, 4));
        defaults.sampling = None;
        let s = sample.resolve(&defaults).sampling.unwrap();
        assert_eq!((s.temperature, s.top_k, s.top_p), (1.0, 50, 0.9));
    }

    /// The one-pass selection equals a full sort by (value descending, index ascending),
    /// with many ties, infinities and every k from 0 past the length.
    #[test]
    fn top_k_equals_a_stable_sort() {
        let mut rng = StdRng::seed_from_u64(7);
        for len in [0, 1, 5, 200] {
            let values: Vec<f32> = (0..len)
                .map(|_| match rng.gen_range(0..10) {
                    0 => f32::NEG_INFINITY,
                    1 => f32::INFINITY,
                    r => (r % 4) as f32 * 0.5,
                })
                .collect();
            let mut sorted: Vec<usize> = (0..len).collect();
            sorted.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
            for k in 0..=len + 1 {
                let expected: Vec<usize> = sorted.iter().copied().take(k).collect();
                assert_eq!(top_k_indices(&values, k), expected, "len {len}, k {k}");
            }
        }
    }
}
