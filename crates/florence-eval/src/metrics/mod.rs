//! Caption metrics, each equal to the implementation people cite.
//!
//! | metric | reference implementation |
//! |---|---|
//! | `sacrebleu`, `chrf` | sacreBLEU 2.x defaults ([`sacrebleu`]) |
//! | `rouge_l` | Google's `rouge-score`, rougeL F-measure, no stemmer, mean over images ([`rouge`]) |
//! | `bleu4_coco`, `cider_d` | `pycocoevalcap` on its PTB tokenization ([`ptb`], [`coco`]) |

pub mod coco;
pub mod ptb;
pub mod rouge;
pub mod sacrebleu;
mod text;

use serde::Serialize;

/// One image's prediction and its references (at least one).
#[derive(Debug, Clone)]
pub struct Scored<'a> {
    pub prediction: &'a str,
    pub references: &'a [String],
}

/// A model's scores over a set of images.
#[derive(Debug, Clone, Serialize)]
pub struct CorpusScores {
    /// sacreBLEU corpus BLEU, 0-100.
    pub sacrebleu: f64,
    /// sacreBLEU corpus chrF, 0-100.
    pub chrf: f64,
    /// Mean ROUGE-L F-measure over the images, 0-1.
    pub rouge_l: f64,
    /// The COCO toolkit's corpus BLEU-4, 0-1.
    pub bleu4_coco: f64,
    /// The COCO toolkit's CIDEr-D (x10, so 0-10 and more in practice).
    pub cider_d: f64,
    /// The COCO toolkit's BLEU-1..4.
    pub bleu_coco: [f64; 4],
    /// The statistics behind `sacrebleu`.
    pub sacrebleu_detail: sacrebleu::Bleu,
}

/// One image's scores (sentence-level forms of the same metrics).
#[derive(Debug, Clone, Serialize)]
pub struct ImageScores {
    /// sacreBLEU sentence BLEU with effective order, 0-100.
    pub sacrebleu: f64,
    /// sacreBLEU sentence chrF, 0-100.
    pub chrf: f64,
    pub rouge_l: f64,
    /// The COCO toolkit's per-image BLEU-4.
    pub bleu4_coco: f64,
    /// The image's CIDEr-D, with document frequencies from the whole set.
    pub cider_d: f64,
}

/// Scores every metric over `images`, and each image.
pub fn score(images: &[Scored]) -> (CorpusScores, Vec<ImageScores>) {
    let predictions: Vec<&str> = images.iter().map(|i| i.prediction).collect();
    let references: Vec<Vec<&str>> = images
        .iter()
        .map(|i| i.references.iter().map(String::as_str).collect())
        .collect();
    let (ptb_predictions, ptb_references) = coco_tokens(&predictions, &references);
    let tokenized: Vec<coco::Tokenized> = ptb_predictions
        .iter()
        .zip(&ptb_references)
        .map(|(p, r)| coco::Tokenized {
            prediction: p,
            references: r,
        })
        .collect();
    let (bleu_coco, bleu_images) = coco::bleu(&tokenized);
    let (cider_d, cider_images) = coco::cider_d(&tokenized);
    let rouge: Vec<f64> = images
        .iter()
        .map(|i| rouge::rouge_l_multi(i.references, i.prediction))
        .collect();
    let per_image = images
        .iter()
        .enumerate()
        .map(|(k, i)| ImageScores {
            sacrebleu: sacrebleu::sentence_bleu(i.prediction, i.references).score,
            chrf: sacrebleu::sentence_chrf(i.prediction, i.references),
            rouge_l: rouge[k],
            bleu4_coco: bleu_images[k][3],
            cider_d: cider_images[k],
        })
        .collect();
    let detail = sacrebleu::corpus_bleu(&predictions, &references);
    let corpus = CorpusScores {
        sacrebleu: detail.score,
        chrf: sacrebleu::corpus_chrf(&predictions, &references),
        rouge_l: mean(&rouge),
        bleu4_coco: bleu_coco[3],
        cider_d,
        bleu_coco,
        sacrebleu_detail: detail,
    };
    (corpus, per_image)
}

/// The PTB tokens of the predictions and the references, joined by spaces, as `pycocoevalcap`
/// makes them: one tokenizer call for all references (in image order), one for all predictions,
/// because a caption's last tokens can depend on the first word of the next. Characters that end
/// a line in Java (`\r`, `\v`, `\f`, U+2028, U+2029) become spaces first: in the toolkit they
/// shift every later caption onto the wrong image.
fn coco_tokens(predictions: &[&str], references: &[Vec<&str>]) -> (Vec<String>, Vec<Vec<String>>) {
    let clean = |c: &str| c.replace(['\r', '\u{b}', '\u{c}', '\u{2028}', '\u{2029}'], " ");
    let joined = |tokens: Vec<String>| tokens.join(" ");
    let preds: Vec<String> = predictions.iter().map(|p| clean(p)).collect();
    let ptb_predictions = ptb::tokenize_batch(&preds).into_iter().map(joined).collect();
    let flat: Vec<String> = references.iter().flatten().map(|r| clean(r)).collect();
    let mut tokens = ptb::tokenize_batch(&flat).into_iter().map(joined);
    let ptb_references = references
        .iter()
        .map(|refs| tokens.by_ref().take(refs.len()).collect())
        .collect();
    (ptb_predictions, ptb_references)
}

fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

/// Words in a caption, split on whitespace as the metrics' tokenizers do.
pub fn word_count(caption: &str) -> usize {
    text::py_split(caption).count()
}
