//! A few held-out images captioned by the model being trained, beside their ground truth: what
//! Florence-2ner prints as its first-batch predictions, and the model card's comparison table.
//!
//! The weights are written as a model folder and captioned by the inference path of
//! `florence caption` itself, so the samples are exactly what the checkpoint will caption.

use std::io::Write;
use std::path::Path;

use florence::tensor::Parameters;
use florence::{Error, Florence, LoadOptions, Result, Task};
use serde_json::{json, Value};

use crate::data;
use crate::output::{self, CheckpointWriter};
use crate::plan::Plan;

/// The samples file in the run's folder: one JSON object per image and evaluation.
pub const SAMPLES: &str = "samples.jsonl";
/// Held-out images captioned at each evaluation.
const COUNT: usize = 4;
/// New tokens allowed beyond the longest ground truth shown.
const LENGTH_MARGIN: usize = 16;

/// Captions the first held-out images with `params` at `step`, appends the records to the run's
/// [`SAMPLES`] and returns them (`step`, `image`, `prompt`, `ground_truth`, `generated`).
pub fn caption(plan: &Plan, writer: &CheckpointWriter, params: &Parameters, step: usize) -> Result<Vec<Value>> {
    let shown: Vec<&data::Sample> = plan
        .split
        .eval
        .iter()
        .take(COUNT)
        .map(|&i| &plan.data.samples[i])
        .collect();
    if shown.is_empty() {
        return Ok(Vec::new());
    }
    let dir = plan.output.join(".samples-model");
    writer.write_model(&dir, params)?;
    let records = caption_with(&dir, &shown, step);
    output::remove_dir(&dir)?;
    let records = records?;
    append(&plan.output.join(SAMPLES), &records)?;
    Ok(records)
}

fn caption_with(dir: &Path, shown: &[&data::Sample], step: usize) -> Result<Vec<Value>> {
    let model = Florence::load(dir, &LoadOptions::default())?;
    let mut generation = model.generation_config().clone();
    let longest = shown.iter().map(|s| s.label_ids.len()).max().unwrap_or(0);
    generation.max_new_tokens = generation.max_new_tokens.min(longest + LENGTH_MARGIN);
    let mut records = Vec::with_capacity(shown.len());
    for sample in shown {
        // Prompts that need a text input (grounding, regions) have no sample caption.
        let Ok(task) = Task::new(&sample.prompt, None) else {
            continue;
        };
        let image = florence::preprocess::load_image_with(&sample.image, &data::DECODE)?;
        let out = model.run(&[image], &task, &generation)?;
        let generated = out
            .first()
            .map_or(String::new(), |o| o.result.text().unwrap_or(&o.raw).to_string());
        records.push(json!({
            "step": step,
            "image": sample.image,
            "prompt": sample.prompt,
            "ground_truth": sample.caption,
            "generated": generated,
        }));
    }
    Ok(records)
}

fn append(path: &Path, records: &[Value]) -> Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    for r in records {
        writeln!(file, "{r}").map_err(|e| Error::io(path, e))?;
    }
    file.flush().map_err(|e| Error::io(path, e))
}
