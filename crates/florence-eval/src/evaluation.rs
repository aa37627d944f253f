//! Scoring every model on the images all of them captioned.

use std::path::PathBuf;

use florence::pipeline::InputError;
use serde::Serialize;

use crate::metrics::{self, CorpusScores, ImageScores, Scored};
use crate::predictions::{Prediction, Predictions};
use crate::references::References;

/// What a model's captions look like.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Lengths {
    /// Mean words per caption (whitespace-separated).
    pub words_mean: f64,
    pub words_max: usize,
    /// Mean generated tokens per caption, `</s>` included, when the predictions record them.
    pub tokens_mean: Option<f64>,
    /// The share of captions that stopped at `max_new_tokens`, when that can be told.
    pub cut_share: Option<f64>,
}

/// A model's result.
#[derive(Debug, Clone, Serialize)]
pub struct ModelResult {
    pub name: String,
    #[serde(flatten)]
    pub scores: CorpusScores,
    /// METEOR 1.5 needs Java and its 60 MB paraphrase table; not computed (see the README).
    pub meteor: Option<f64>,
    pub lengths: Lengths,
}

/// One scored image: its references, and each model's caption and scores (in model order).
#[derive(Debug, Clone)]
pub struct ImageRow {
    pub image: PathBuf,
    pub references: Vec<String>,
    pub captions: Vec<String>,
    pub scores: Vec<ImageScores>,
}

/// Every model scored on the same images.
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub models: Vec<ModelResult>,
    pub images: Vec<ImageRow>,
    /// Images with references that are not scored: unreadable, or missing from some model's captions.
    pub left_out: Vec<InputError>,
}

/// Scores `models` (name and captions) against `refs`, on the images every model captioned.
pub fn evaluate(refs: &References, models: &[(String, Predictions)]) -> Evaluation {
    let mut left_out = refs.left_out.clone();
    let mut kept = Vec::new();
    for r in &refs.items {
        let missing: Vec<&str> = models
            .iter()
            .filter(|(_, p)| p.get(&r.image).is_none())
            .map(|(n, _)| n.as_str())
            .collect();
        if missing.is_empty() {
            kept.push(r);
        } else {
            left_out.push(InputError {
                path: r.image.clone(),
                reason: format!("no caption from {}", missing.join(", ")),
            });
        }
    }
    let mut images: Vec<ImageRow> = kept
        .iter()
        .map(|r| ImageRow {
            image: r.image.clone(),
            references: r.captions.clone(),
            captions: vec![],
            scores: vec![],
        })
        .collect();
    let mut results = Vec::new();
    for (name, predictions) in models {
        let preds: Vec<&Prediction> = kept.iter().map(|r| predictions.get(&r.image).expect("kept")).collect();
        let scored: Vec<Scored> = preds
            .iter()
            .zip(&kept)
            .map(|(p, r)| Scored {
                prediction: &p.caption,
                references: &r.captions,
            })
            .collect();
        let (scores, per_image) = metrics::score(&scored);
        for ((row, p), s) in images.iter_mut().zip(&preds).zip(per_image) {
            row.captions.push(p.caption.clone());
            row.scores.push(s);
        }
        results.push(ModelResult {
            name: name.clone(),
            scores,
            meteor: None,
            lengths: lengths(&preds),
        });
    }
    Evaluation {
        models: results,
        images,
        left_out,
    }
}

fn lengths(preds: &[&Prediction]) -> Lengths {
    let words: Vec<usize> = preds.iter().map(|p| metrics::word_count(&p.caption)).collect();
    let n = preds.len().max(1) as f64;
    let tokens: Option<Vec<usize>> = preds.iter().map(|p| p.new_tokens).collect();
    let cut: Option<Vec<bool>> = preds.iter().map(|p| p.cut).collect();
    Lengths {
        words_mean: words.iter().sum::<usize>() as f64 / n,
        words_max: words.iter().copied().max().unwrap_or(0),
        tokens_mean: tokens.map(|t| t.iter().sum::<usize>() as f64 / n),
        cut_share: cut.map(|c| c.iter().filter(|&&c| c).count() as f64 / n),
    }
}
