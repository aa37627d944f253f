//! The COCO caption toolkit's (`pycocoevalcap`) BLEU and CIDEr-D, on PTB-tokenized captions.
//!
//! Both follow the toolkit line by line where it departs from the papers, because those are the
//! numbers people compare with: BLEU adds 1e-15 and 1e-9 to every ratio and picks the closest
//! reference length; CIDEr-D takes document frequencies from the references of the set being
//! scored, and its Gaussian length penalty measures length in bigrams (the toolkit counts the
//! terms of `n == 1`, the second order, as the length).

use std::collections::HashMap;

const ORDER: usize = 4;
const SIGMA: f64 = 6.0;

/// One image: its tokenized prediction and references (tokens separated by spaces).
pub struct Tokenized<'a> {
    pub prediction: &'a str,
    pub references: &'a [String],
}

type Counts<'a> = HashMap<&'a [&'a str], u64>;

/// n-gram counts, n = 1..4, of a whitespace-split sentence; `words` holds the split words.
fn precook<'a>(words: &'a [&'a str]) -> Counts<'a> {
    let mut counts = HashMap::new();
    for n in 1..=ORDER {
        for gram in words.windows(n) {
            *counts.entry(gram).or_insert(0) += 1;
        }
    }
    counts
}

fn split(s: &str) -> Vec<&str> {
    super::text::py_split(s).collect()
}

/// BLEU-1..4: the corpus scores and each image's.
pub fn bleu(images: &[Tokenized]) -> ([f64; ORDER], Vec<[f64; ORDER]>) {
    const SMALL: f64 = 1e-9;
    const TINY: f64 = 1e-15;
    let brevity = |test: f64, reference: f64| {
        let ratio = (test + TINY) / (reference + SMALL);
        if ratio < 1.0 {
            (1.0 - 1.0 / ratio).exp()
        } else {
            1.0
        }
    };
    let (mut test_len, mut ref_len) = (0u64, 0u64);
    let (mut guess, mut correct) = ([0u64; ORDER], [0u64; ORDER]);
    let mut per_image = Vec::with_capacity(images.len());
    for image in images {
        let ref_words: Vec<Vec<&str>> = image.references.iter().map(|r| split(r)).collect();
        let mut max_counts: HashMap<&[&str], u64> = HashMap::new();
        for words in &ref_words {
            for (g, c) in precook(words) {
                let m = max_counts.entry(g).or_insert(0);
                *m = (*m).max(c);
            }
        }
        let words = split(image.prediction);
        let len = words.len() as u64;
        // The closest reference length, the shorter on a tie.
        let reflen = ref_words
            .iter()
            .map(|w| w.len() as u64)
            .min_by_key(|&l| (l.abs_diff(len), l))
            .unwrap_or(0);
        let mut c = [0u64; ORDER];
        for (g, n) in precook(&words) {
            c[g.len() - 1] += n.min(max_counts.get(g).copied().unwrap_or(0));
        }
        let g: [u64; ORDER] = std::array::from_fn(|k| (len + 1).saturating_sub(k as u64 + 1));
        per_image.push(cumulative(&c, &g).map(|b| b * brevity(len as f64, reflen as f64)));
        test_len += len;
        ref_len += reflen;
        for k in 0..ORDER {
            guess[k] += g[k];
            correct[k] += c[k];
        }
    }
    let corpus = cumulative(&correct, &guess).map(|b| b * brevity(test_len as f64, ref_len as f64));
    (corpus, per_image)
}

/// The toolkit's BLEU-k before the brevity penalty: the k-th root of the running product of
/// smoothed precisions.
fn cumulative(correct: &[u64; ORDER], guess: &[u64; ORDER]) -> [f64; ORDER] {
    let mut product = 1.0;
    std::array::from_fn(|k| {
        product *= (correct[k] as f64 + 1e-15) / (guess[k] as f64 + 1e-9);
        product.powf(1.0 / (k + 1) as f64)
    })
}

/// A sentence's TF-IDF vectors per order, their norms and its length in bigrams.
struct Vector<'a> {
    weights: [HashMap<&'a [&'a str], f64>; ORDER],
    norms: [f64; ORDER],
    length: f64,
}

impl<'a> Vector<'a> {
    fn new(counts: &Counts<'a>, df: &HashMap<&[&str], f64>, log_images: f64) -> Self {
        let mut weights: [HashMap<&[&str], f64>; ORDER] = Default::default();
        let mut norms = [0.0; ORDER];
        let mut length = 0.0;
        for (&gram, &tf) in counts {
            let n = gram.len() - 1;
            let w = tf as f64 * (log_images - df.get(gram).copied().unwrap_or(0.0).max(1.0).ln());
            weights[n].insert(gram, w);
            norms[n] += w * w;
            if n == 1 {
                length += tf as f64;
            }
        }
        Self {
            weights,
            norms: norms.map(f64::sqrt),
            length,
        }
    }

    /// CIDEr-D's clipped cosine similarity per order, with the Gaussian length penalty.
    fn similarity(&self, reference: &Vector) -> [f64; ORDER] {
        let delta = self.length - reference.length;
        let penalty = (-(delta * delta) / (2.0 * SIGMA * SIGMA)).exp();
        std::array::from_fn(|n| {
            let mut v: f64 = self.weights[n]
                .iter()
                .map(|(g, &h)| {
                    let r = reference.weights[n].get(g).copied().unwrap_or(0.0);
                    h.min(r) * r
                })
                .sum();
            if self.norms[n] != 0.0 && reference.norms[n] != 0.0 {
                v /= self.norms[n] * reference.norms[n];
            }
            v * penalty
        })
    }
}

/// CIDEr-D (n = 1..4, sigma 6, x10): the corpus score (the mean of the images') and each image's.
pub fn cider_d(images: &[Tokenized]) -> (f64, Vec<f64>) {
    let ref_words: Vec<Vec<Vec<&str>>> = images
        .iter()
        .map(|i| i.references.iter().map(|r| split(r)).collect())
        .collect();
    let pred_words: Vec<Vec<&str>> = images.iter().map(|i| split(i.prediction)).collect();
    let ref_counts: Vec<Vec<Counts>> = ref_words
        .iter()
        .map(|refs| refs.iter().map(|w| precook(w)).collect())
        .collect();
    // Document frequency: in how many images' references an n-gram occurs.
    let mut df: HashMap<&[&str], f64> = HashMap::new();
    for refs in &ref_counts {
        let grams: std::collections::HashSet<&[&str]> = refs.iter().flat_map(|c| c.keys().copied()).collect();
        for g in grams {
            *df.entry(g).or_insert(0.0) += 1.0;
        }
    }
    let log_images = (images.len() as f64).ln();
    let scores: Vec<f64> = pred_words
        .iter()
        .zip(ref_counts)
        .map(|(words, refs)| {
            let hyp = Vector::new(&precook(words), &df, log_images);
            let mut sum = [0.0; ORDER];
            for r in &refs {
                let r = Vector::new(r, &df, log_images);
                for (s, v) in sum.iter_mut().zip(hyp.similarity(&r)) {
                    *s += v;
                }
            }
            sum.iter().sum::<f64>() / ORDER as f64 / refs.len() as f64 * 10.0
        })
        .collect();
    let mean = if scores.is_empty() {
        0.0
    } else {
        scores.iter().sum::<f64>() / scores.len() as f64
    };
    (mean, scores)
}
