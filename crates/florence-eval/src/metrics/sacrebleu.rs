//! sacreBLEU 2.x's BLEU and chrF with their defaults, statistic for statistic.
//!
//! BLEU: the `13a` tokenizer (mteval-v13a), exponential smoothing, the closest reference length
//! (ties to the shorter), n-gram counts clipped by the most any one reference has. chrF:
//! character 1..6-grams without whitespace, beta 2, the best-scoring reference's statistics per
//! segment. A corpus score sums the segments' statistics; a sentence score is the same with one
//! segment (BLEU with `effective_order`, as sacreBLEU recommends for sentences).

use std::collections::HashMap;
use std::sync::LazyLock;

use regex::Regex;

use super::text::{py_rstrip, py_split};

const MAX_ORDER: usize = 4;
const CHAR_ORDER: usize = 6;
const BETA: f64 = 2.0;

/// A BLEU score with what it was computed from (sacreBLEU's `BLEUScore`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Bleu {
    /// 0-100.
    pub score: f64,
    /// Matched n-grams, n = 1..4.
    pub counts: [u64; MAX_ORDER],
    /// Hypothesis n-grams, n = 1..4.
    pub totals: [u64; MAX_ORDER],
    /// Smoothed precisions, 0-100.
    pub precisions: [f64; MAX_ORDER],
    /// Brevity penalty.
    pub bp: f64,
    pub sys_len: u64,
    pub ref_len: u64,
}

/// One segment's BLEU statistics.
#[derive(Default, Clone, Copy)]
struct BleuStats {
    sys_len: u64,
    ref_len: u64,
    counts: [u64; MAX_ORDER],
    totals: [u64; MAX_ORDER],
}

impl std::ops::AddAssign for BleuStats {
    fn add_assign(&mut self, o: Self) {
        self.sys_len += o.sys_len;
        self.ref_len += o.ref_len;
        for n in 0..MAX_ORDER {
            self.counts[n] += o.counts[n];
            self.totals[n] += o.totals[n];
        }
    }
}

/// mteval-v13a's tokenization, as sacreBLEU's `Tokenizer13a` applies it after `rstrip()`.
pub fn tokenize_13a(line: &str) -> String {
    static RULES: LazyLock<[(Regex, &str); 4]> = LazyLock::new(|| {
        let re = |p| Regex::new(p).expect("valid regex");
        [
            (re(r"([{-~\[-` -&(-+:-@/])"), " ${1} "),
            // Periods and commas, unless preceded by a digit...
            (re(r"([^0-9])([.,])"), "${1} ${2} "),
            // ...or followed by one.
            (re(r"([.,])([^0-9])"), " ${1} ${2}"),
            (re(r"([0-9])(-)"), "${1} ${2} "),
        ]
    });
    let mut line = py_rstrip(line)
        .replace("<skipped>", "")
        .replace("-\n", "")
        .replace('\n', " ");
    if line.contains('&') {
        line = line
            .replace("&quot;", "\"")
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">");
    }
    let mut line = format!(" {line} ");
    for (re, with) in RULES.iter() {
        line = re.replace_all(&line, *with).into_owned();
    }
    py_split(&line).collect::<Vec<_>>().join(" ")
}

/// Counts of all word n-grams, n = 1..`max`, of a whitespace-split line, and its length.
fn word_ngrams(line: &str, max: usize) -> (HashMap<Vec<&str>, u64>, usize) {
    let words: Vec<&str> = py_split(line).collect();
    let mut counts = HashMap::new();
    for n in 1..=max {
        for gram in words.windows(n) {
            *counts.entry(gram.to_vec()).or_insert(0) += 1;
        }
    }
    (counts, words.len())
}

/// A segment's statistics against its references (already tokenized).
fn bleu_stats(hyp: &str, refs: &[String]) -> BleuStats {
    let mut max_ref: HashMap<Vec<&str>, u64> = HashMap::new();
    let mut ref_lens = Vec::with_capacity(refs.len());
    for r in refs {
        let (grams, len) = word_ngrams(r, MAX_ORDER);
        ref_lens.push(len as u64);
        for (g, c) in grams {
            let m = max_ref.entry(g).or_insert(0);
            *m = (*m).max(c);
        }
    }
    let (hyp_grams, hyp_len) = word_ngrams(hyp, MAX_ORDER);
    let hyp_len = hyp_len as u64;
    // The closest reference length, the shorter one on a tie.
    let ref_len = ref_lens
        .iter()
        .copied()
        .min_by_key(|&l| (l.abs_diff(hyp_len), l))
        .unwrap_or(0);
    let mut stats = BleuStats {
        sys_len: hyp_len,
        ref_len,
        ..Default::default()
    };
    for (g, c) in &hyp_grams {
        let n = g.len() - 1;
        stats.totals[n] += c;
        stats.counts[n] += (*c).min(max_ref.get(g).copied().unwrap_or(0));
    }
    stats
}

/// sacreBLEU's `compute_bleu` with exponential smoothing.
fn bleu_from_stats(s: BleuStats, effective_order: bool) -> Bleu {
    let bp = if s.sys_len < s.ref_len {
        if s.sys_len > 0 {
            (1.0 - s.ref_len as f64 / s.sys_len as f64).exp()
        } else {
            0.0
        }
    } else {
        1.0
    };
    let mut precisions = [0.0; MAX_ORDER];
    let done = |score, precisions| Bleu {
        score,
        counts: s.counts,
        totals: s.totals,
        precisions,
        bp,
        sys_len: s.sys_len,
        ref_len: s.ref_len,
    };
    if s.counts.iter().all(|&c| c == 0) {
        return done(0.0, precisions);
    }
    let mut smooth = 1.0;
    let mut eff_order = MAX_ORDER;
    for (n, (&counts, &totals)) in s.counts.iter().zip(&s.totals).enumerate() {
        if totals == 0 {
            break;
        }
        if effective_order {
            eff_order = n + 1;
        }
        precisions[n] = if counts == 0 {
            smooth *= 2.0;
            100.0 / (smooth * totals as f64)
        } else {
            100.0 * counts as f64 / totals as f64
        };
    }
    // sacreBLEU floors log(0) at -9999999999 instead of failing.
    let log = |p: f64| if p == 0.0 { -9_999_999_999.0 } else { p.ln() };
    let sum: f64 = precisions[..eff_order].iter().map(|&p| log(p)).sum();
    done(bp * (sum / eff_order as f64).exp(), precisions)
}

fn tokenized_refs(refs: &[impl AsRef<str>]) -> Vec<String> {
    refs.iter().map(|r| tokenize_13a(r.as_ref())).collect()
}

/// Corpus BLEU (`BLEU().corpus_score`): `refs[i]` are the references of `hyps[i]`, any number each.
pub fn corpus_bleu(hyps: &[impl AsRef<str>], refs: &[Vec<impl AsRef<str>>]) -> Bleu {
    let mut total = BleuStats::default();
    for (h, r) in hyps.iter().zip(refs) {
        total += bleu_stats(&tokenize_13a(h.as_ref()), &tokenized_refs(r));
    }
    bleu_from_stats(total, false)
}

/// Sentence BLEU (`BLEU(effective_order=True).sentence_score`).
pub fn sentence_bleu(hyp: &str, refs: &[impl AsRef<str>]) -> Bleu {
    bleu_from_stats(bleu_stats(&tokenize_13a(hyp), &tokenized_refs(refs)), true)
}

/// The characters of a line without its whitespace.
fn chars_without_space(line: &str) -> Vec<char> {
    py_split(line).flat_map(str::chars).collect()
}

/// Character n-gram counts, n = 1..6.
fn char_ngrams(chars: &[char]) -> Vec<HashMap<&[char], u64>> {
    (1..=CHAR_ORDER)
        .map(|n| {
            let mut counts = HashMap::new();
            for gram in chars.windows(n) {
                *counts.entry(gram).or_insert(0) += 1;
            }
            counts
        })
        .collect()
}

/// Per order: hypothesis n-grams (0 when the reference has none), reference n-grams, matches.
type ChrfStats = [[u64; 3]; CHAR_ORDER];

/// chrF from summed statistics: the F-beta of the precision and recall averaged over the orders
/// that both sides have (sacreBLEU's `_compute_f_score` without eps smoothing), 0-100.
fn chrf_from_stats(stats: &ChrfStats) -> f64 {
    let (mut prec, mut rec, mut orders) = (0.0, 0.0, 0);
    for &[hyp, r, matched] in stats {
        if hyp > 0 && r > 0 {
            prec += matched as f64 / hyp as f64;
            rec += matched as f64 / r as f64;
            orders += 1;
        }
    }
    if orders > 0 {
        prec /= orders as f64;
        rec /= orders as f64;
    }
    let factor = BETA * BETA;
    if prec + rec == 0.0 {
        return 0.0;
    }
    100.0 * ((1.0 + factor) * prec * rec / (factor * prec + rec))
}

/// A segment's chrF statistics: those of the reference that scores best (the first on a tie).
fn chrf_stats(hyp: &str, refs: &[impl AsRef<str>]) -> ChrfStats {
    let hyp_chars = chars_without_space(hyp);
    let hyp_grams = char_ngrams(&hyp_chars);
    let mut best = (-1.0, [[0; 3]; CHAR_ORDER]);
    for r in refs {
        let ref_chars = chars_without_space(r.as_ref());
        let ref_grams = char_ngrams(&ref_chars);
        let mut stats = [[0; 3]; CHAR_ORDER];
        for (s, (h, r)) in stats.iter_mut().zip(hyp_grams.iter().zip(&ref_grams)) {
            let hyp_count: u64 = h.values().sum();
            let matched: u64 = h.iter().map(|(g, c)| (*c).min(r.get(g).copied().unwrap_or(0))).sum();
            *s = [if r.is_empty() { 0 } else { hyp_count }, r.values().sum(), matched];
        }
        let f = chrf_from_stats(&stats);
        if f > best.0 {
            best = (f, stats);
        }
    }
    best.1
}

/// Corpus chrF (`CHRF().corpus_score`), 0-100.
pub fn corpus_chrf(hyps: &[impl AsRef<str>], refs: &[Vec<impl AsRef<str>>]) -> f64 {
    let mut total = [[0; 3]; CHAR_ORDER];
    for (h, r) in hyps.iter().zip(refs) {
        for (t, s) in total.iter_mut().zip(chrf_stats(h.as_ref(), r)) {
            for k in 0..3 {
                t[k] += s[k];
            }
        }
    }
    chrf_from_stats(&total)
}

/// Sentence chrF (`CHRF().sentence_score`), 0-100.
pub fn sentence_chrf(hyp: &str, refs: &[impl AsRef<str>]) -> f64 {
    chrf_from_stats(&chrf_stats(hyp, refs))
}
