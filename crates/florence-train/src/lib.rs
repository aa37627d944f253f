//! Fine-tuning Florence-2: `florence train`'s library.
//!
//! The configuration (Florence-2ner's keys), the data readers, the optimizers (CAME, AdamW) and
//! learning-rate schedules, and the trainer that drives the differentiable model path of the
//! `florence` crate. The arithmetic follows PyTorch's; `tools/reference` holds the oracle.
#![warn(missing_docs)]

pub mod config;

pub use config::{DataSource, EvalSplit, LossNormalization, ModelSource, OptimizerName, SchedulerName, TrainConfig};
pub mod data;
