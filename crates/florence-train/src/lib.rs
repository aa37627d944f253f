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
    Trainer::new(&plan, device)?.run(interrupted, progress)
}
