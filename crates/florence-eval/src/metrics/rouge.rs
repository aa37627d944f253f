//! Google's `rouge-score` (0.1.2) ROUGE-L F-measure, without a stemmer.

/// rouge-score's default tokenizer: lowercase, every run of characters other than `[a-z0-9]`
/// becomes a separator (so accented letters and other scripts vanish), no empty tokens.
pub fn tokenize(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Length of the longest common subsequence.
fn lcs(a: &[String], b: &[String]) -> usize {
    let mut row = vec![0usize; b.len() + 1];
    for x in a {
        let mut diagonal = 0;
        for (j, y) in b.iter().enumerate() {
            let up = row[j + 1];
            row[j + 1] = if x == y { diagonal + 1 } else { up.max(row[j]) };
            diagonal = up;
        }
    }
    row[b.len()]
}

/// ROUGE-L F-measure of a prediction against one target (`RougeScorer(["rougeL"]).score`).
pub fn rouge_l(target: &str, prediction: &str) -> f64 {
    let (t, p) = (tokenize(target), tokenize(prediction));
    if t.is_empty() || p.is_empty() {
        return 0.0;
    }
    let l = lcs(&t, &p) as f64;
    let (precision, recall) = (l / p.len() as f64, l / t.len() as f64);
    if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    }
}

/// The best ROUGE-L F-measure over several targets (`score_multi`).
pub fn rouge_l_multi(targets: &[impl AsRef<str>], prediction: &str) -> f64 {
    targets
        .iter()
        .map(|t| rouge_l(t.as_ref(), prediction))
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_lcs() {
        assert_eq!(
            tokenize("A café's 3-D sign, ÉTÉ!"),
            ["a", "caf", "s", "3", "d", "sign", "t"]
        );
        let t = tokenize("a b c d e");
        assert_eq!(lcs(&t, &tokenize("x b d e y")), 3);
        assert_eq!(
            rouge_l("the cat sat", "the cat"),
            2.0 * 1.0 * (2.0 / 3.0) / (1.0 + 2.0 / 3.0)
        );
    }
}
