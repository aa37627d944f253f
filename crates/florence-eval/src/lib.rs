//! Evaluating captioners: the caption metrics people cite, computed the way their reference
//! implementations compute them, and the report a model card needs.
//!
//! [`references::load`] reads the ground truth, [`predictions::Predictions`] a model's captions,
//! [`evaluation::evaluate`] scores every model on the images all of them captioned, and
//! [`report::write`] writes `metrics.json`, `report.md`, `report.html` and the loss plots.

pub mod evaluation;
pub mod metrics;
pub mod predictions;
pub mod references;
pub mod report;
