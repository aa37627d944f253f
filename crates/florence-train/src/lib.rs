//! Fine-tuning Florence-2: `florence train`'s library.
//!
//! The configuration (Florence-2ner's keys, [`config`]), the data readers ([`data`]), the
//! optimizers ([`optim`]: CAME, AdamW) and learning-rate schedules ([`schedule`]), and the
//! [`trainer`] that drives the differentiable model path of the `florence` crate
//! (`florence::tensor`). The arithmetic follows PyTorch's: `SEMANTICS.md` states it rule by rule
//! and `tools/reference/train_ref.py` is the oracle the tests compare against.
#![warn(missing_docs)]

pub mod config;
pub mod data;
pub mod optim;
pub mod output;
pub mod plan;
pub mod samples;
pub mod schedule;
pub mod trainer;

use std::sync::atomic::AtomicBool;

pub use config::{DataSource, EvalSplit, LossNormalization, ModelSource, TrainConfig};
pub use plan::{Plan, TrainOptions};
pub use trainer::{Progress, Quiet, StepMetrics, Summary, Trainer};

/// Runs `options` on `device`: checks everything, then trains until the end, the step limit, or
/// `interrupted`.
pub fn train(
    options: &TrainOptions,
    device: &candle_core::Device,
    interrupted: &AtomicBool,
    progress: &mut dyn Progress,
) -> florence::Result<Summary> {
    let plan = Plan::new(options)?;
    for note in &plan.notes {
        progress.message(&format!("note: {note}"));
    }
    report_data(&plan, progress);
    Trainer::new(&plan, device)?.run(interrupted, progress)
}

/// What the data holds and what was left out of it, one line each.
fn report_data(plan: &Plan, progress: &mut dyn Progress) {
    let data = &plan.data;
    for (path, why) in &data.unreadable {
        progress.message(&format!("skipped {}: {why}", path.display()));
    }
    if !data.dropped_long.is_empty() {
        progress.message(&format!(
            "dropped {} captions longer than the decoder's {} positions",
            data.dropped_long.len(),
            plan.model_config.text.max_position_embeddings
        ));
    }
    if !data.no_image.is_empty() {
        progress.message(&format!("{} captions have no image beside them", data.no_image.len()));
    }
    progress.message(&format!(
        "{} samples: {} to train, {} held out; {} steps of {} x {} samples",
        data.samples.len(),
        plan.split.train.len(),
        plan.split.eval.len(),
        plan.total_steps,
        plan.config.gradient_accumulation_steps,
        plan.config.train_batch_size
    ));
}
