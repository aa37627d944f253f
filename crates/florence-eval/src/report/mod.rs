//! The report files: `metrics.json`, `report.md` (the model card's table), `report.html`
//! (self-contained), and the loss plots.

mod html;
mod markdown;
pub mod plot;

use std::path::{Path, PathBuf};

use florence::pipeline::write_atomic;
use florence::Error;
use serde_json::{json, Map, Value};

use crate::evaluation::{Evaluation, ModelResult};
pub use plot::Curves;

/// The metrics table's headings after "model", in [`metric_cells`]' order.
const HEADINGS: [&str; 8] = [
    "sacreBLEU",
    "chrF",
    "ROUGE-L",
    "BLEU-4 (COCO)",
    "CIDEr-D",
    "words",
    "tokens",
    "cut at limit",
];

/// `metrics.json`: `{"models": {NAME: {metric: value, ..., "lengths": {...}}}, "images": N,
/// "left_out": [{path, reason}], "per_image": [...]}`.
pub fn metrics_json(eval: &Evaluation) -> Value {
    let mut models = Map::new();
    for m in &eval.models {
        let mut v = serde_json::to_value(m).expect("serializable");
        v.as_object_mut().expect("object").remove("name");
        models.insert(m.name.clone(), v);
    }
    let per_image: Vec<Value> = eval
        .images
        .iter()
        .map(|row| {
            let by_model: Map<String, Value> = eval
                .models
                .iter()
                .zip(row.captions.iter().zip(&row.scores))
                .map(|(m, (c, s))| (m.name.clone(), json!({"caption": c, "scores": s})))
                .collect();
            json!({"image": row.image, "references": row.references, "models": by_model})
        })
        .collect();
    let left_out: Vec<Value> = eval
        .left_out
        .iter()
        .map(|e| json!({"path": e.path, "reason": e.reason}))
        .collect();
    json!({"models": models, "images": eval.images.len(), "left_out": left_out, "per_image": per_image})
}

/// Writes every report file into `out`; returns the paths written.
pub fn write(out: &Path, eval: &Evaluation, runs: &[Curves]) -> Result<Vec<PathBuf>, Error> {
    let mut written = Vec::new();
    let mut put = |name: &str, bytes: &[u8]| -> Result<(), Error> {
        let path = out.join(name);
        write_atomic(&path, bytes).map_err(|e| Error::io(&path, e))?;
        written.push(path);
        Ok(())
    };
    let metrics = serde_json::to_string_pretty(&metrics_json(eval)).expect("serializable");
    put("metrics.json", metrics.as_bytes())?;
    let plot = if runs.is_empty() {
        None
    } else {
        Some(plot::loss_plot(runs)?)
    };
    if let Some((png, svg)) = &plot {
        put("loss.png", png)?;
        put("loss.svg", svg.as_bytes())?;
    }
    let thumbnails: Vec<Option<Vec<u8>>> = eval.images.iter().map(|r| thumbnail(&r.image)).collect();
    let mut names = Vec::with_capacity(thumbnails.len());
    for (k, jpeg) in thumbnails.iter().enumerate() {
        let name = jpeg.as_ref().map(|_| format!("thumbnails/{k:04}.jpg"));
        if let (Some(name), Some(jpeg)) = (&name, jpeg) {
            put(name, jpeg)?;
        }
        names.push(name);
    }
    put("report.md", markdown::render(eval, &names, plot.is_some()).as_bytes())?;
    let png = plot.as_ref().map(|(png, _)| png.as_slice());
    put("report.html", html::render(eval, &thumbnails, png).as_bytes())?;
    Ok(written)
}

/// Longest side of a thumbnail, in pixels.
const THUMBNAIL: u32 = 256;

/// A JPEG thumbnail of the image, or `None` when it cannot be decoded.
fn thumbnail(path: &Path) -> Option<Vec<u8>> {
    let image = image::open(path).ok()?.thumbnail(THUMBNAIL, THUMBNAIL).into_rgb8();
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 85)
        .encode_image(&image)
        .ok()?;
    Some(jpeg)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .unwrap_or(path.as_os_str())
        .to_string_lossy()
        .into_owned()
}

/// A model's row of the metrics table: the scores, mean words, mean tokens, share cut at the limit.
fn metric_cells(m: &ModelResult) -> [String; HEADINGS.len()] {
    let (s, l) = (&m.scores, &m.lengths);
    let or_dash = |x: Option<String>| x.unwrap_or_else(|| "-".into());
    [
        format!("{:.2}", s.sacrebleu),
        format!("{:.2}", s.chrf),
        format!("{:.4}", s.rouge_l),
        format!("{:.4}", s.bleu4_coco),
        format!("{:.4}", s.cider_d),
        format!("{:.1}", l.words_mean),
        or_dash(l.tokens_mean.map(|t| format!("{t:.1}"))),
        or_dash(l.cut_share.map(|c| format!("{:.1}%", 100.0 * c))),
    ]
}
