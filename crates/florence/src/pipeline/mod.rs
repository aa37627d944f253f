//! One captioning pipeline for every front door: images are decoded and resized ahead on a
//! worker thread, the model is loaded when the first image is ready (a run with nothing left to
//! do never loads it), images go through it in batches, and each result goes to the sinks the
//! caller chose.
//!
//! A front door (the `caption` command, an evaluation, a server) turns its flags or request into
//! a [`Plan`] and a [`Work`] list and hands them over with its [`Sink`]s:
//!
//! ```no_run
//! use std::sync::atomic::AtomicBool;
//! use florence::pipeline::{self, ManifestFormat, ManifestSink, ModelSource, Plan};
//! use florence::{Florence, LoadOptions, Task};
//!
//! # fn main() -> florence::Result<()> {
//! let (images, unreadable) = pipeline::collect_images(&["photos".into()], true);
//! let mut work = pipeline::plan_work(images, None, None);
//! work.failures.extend(unreadable);
//! let plan = Plan::new(Task::new("<CAPTION>", None)?);
//! let load = || Florence::load("Florence-2-base".as_ref(), &LoadOptions::default());
//! let stdout = Box::new(std::io::stdout());
//! let mut manifest = ManifestSink::new(ManifestFormat::Jsonl, stdout, "stdout", "Florence-2-base", "f32");
//! let summary = pipeline::run(&plan, work, ModelSource::Lazy(Box::new(load)), &mut [&mut manifest], &AtomicBool::new(false))?;
//! println!("{} captioned, {} failed", summary.captioned, summary.failed);
//! # Ok(())
//! # }
//! ```

mod dataset;
mod loader;
mod parquet;
mod shard;
mod sink;
mod source;
mod webdataset;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

pub use dataset::{
    collect_images, merge_caption, plan_work, read_list, sidecar_path, temp_path, write_atomic, Existing, InputError,
    InputImage, Job, Sidecars,
};
pub use parquet::{is_parquet, Columns, KeptColumns, KeptSchema, ParquetSink, RowGroups};
pub use shard::{shard_hash, Shard, ShardSpec, SCHEDULER_VARIABLES};
pub use sink::{
    generation_json, jsonl_record, Captioned, ErrorLog, ManifestFormat, ManifestSink, RunInfo, SidecarSink, Sink,
    SinkFailure,
};
pub use source::{collect_inputs, plan_inputs, Container, Input, Member, Source, Work};
pub use webdataset::{is_tar, CaptionShardSink, TarShard};

use crate::error::Result;
use crate::generation::{GenerationConfig, GenerationRequest};
use crate::preprocess::{DecodeOptions, ImageProcessor, PreparedImage};
use crate::tasks::Task;
use crate::Florence;
use loader::Loaded;

/// What to run on every image, and how.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The task (and its prompt) for every image.
    pub task: Task,
    /// Generation settings over the model's own.
    pub generation: GenerationRequest,
    /// How images are decoded.
    pub decode: DecodeOptions,
    /// Images per forward pass (at least 1).
    pub batch_size: usize,
    /// Text put before every caption (a trigger word).
    pub prefix: String,
    /// Text put after every caption.
    pub suffix: String,
}

impl Plan {
    /// `task` on every image, one at a time, with the model's generation settings.
    pub fn new(task: Task) -> Self {
        Self {
            task,
            generation: GenerationRequest::default(),
            decode: DecodeOptions::default(),
            batch_size: 1,
            prefix: String::new(),
            suffix: String::new(),
        }
    }
}

/// The model a run uses: one already loaded, or a loader called when the first image is ready.
pub enum ModelSource<'a> {
    /// A model that is already loaded (a server's).
    Loaded(&'a Florence),
    /// Loads the model; not called when no image needs it.
    Lazy(Box<dyn FnOnce() -> Result<Florence> + 'a>),
}

/// How a run went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Images whose result every sink took.
    pub captioned: usize,
    /// Images whose caption was kept ([`Existing::Skip`]).
    pub skipped: usize,
    /// Images that could not be read or whose result could not be written.
    pub failed: usize,
    /// The run stopped early because `stop` was set.
    pub stopped: bool,
}

/// Runs `plan` over `work`: reports the work's failures, then decodes the jobs ahead, loads the
/// model when the first image is ready, and passes each batch's results to `sinks` in order.
/// Setting `stop` finishes the batch in flight and returns.
///
/// Errors that stop the run (the model cannot be loaded, a sink cannot write, the settings do not
/// fit the model) are returned; an image that fails is counted and reported to the sinks.
pub fn run(
    plan: &Plan,
    work: Work,
    model: ModelSource,
    sinks: &mut [&mut dyn Sink],
    stop: &AtomicBool,
) -> Result<Summary> {
    let mut run = Run {
        plan,
        sinks,
        summary: Summary {
            skipped: work.skipped,
            ..Summary::default()
        },
    };
    for failure in &work.failures {
        run.fail(&failure.path, &failure.reason)?;
    }
    if !work.jobs.is_empty() {
        run.caption(work.jobs, model, stop)?;
    }
    for sink in run.sinks.iter_mut() {
        sink.finish()?;
    }
    run.summary.stopped = stop.load(Ordering::Relaxed);
    Ok(run.summary)
}

/// A run in progress: its sinks and counts.
struct Run<'p, 's, 'k> {
    plan: &'p Plan,
    sinks: &'s mut [&'k mut dyn Sink],
    summary: Summary,
}

/// The model with the settings it generates with.
struct Engine<'a> {
    model: EngineModel<'a>,
    generation: GenerationConfig,
}

enum EngineModel<'a> {
    Borrowed(&'a Florence),
    Owned(Box<Florence>),
}

impl EngineModel<'_> {
    fn get(&self) -> &Florence {
        match self {
            EngineModel::Borrowed(m) => m,
            EngineModel::Owned(m) => m,
        }
    }
}

impl Engine<'_> {
    fn model(&self) -> &Florence {
        self.model.get()
    }
}

impl Run<'_, '_, '_> {
    fn fail(&mut self, path: &Path, reason: &str) -> Result<()> {
        self.summary.failed += 1;
        for sink in self.sinks.iter_mut() {
            sink.failed(path, reason)?;
        }
        Ok(())
    }

    /// Loads the model and tells the sinks what the run is.
    fn start<'a>(&mut self, source: ModelSource<'a>) -> Result<Engine<'a>> {
        let model = match source {
            ModelSource::Loaded(m) => EngineModel::Borrowed(m),
            ModelSource::Lazy(load) => EngineModel::Owned(Box::new(load()?)),
        };
        let generation = self.plan.generation.resolve(model.get().generation_config());
        generation.validate(model.get().max_decoder_positions())?;
        let engine = Engine { model, generation };
        let info = RunInfo {
            task: &self.plan.task,
            generation: &engine.generation,
        };
        for sink in self.sinks.iter_mut() {
            sink.begin(&info)?;
        }
        Ok(engine)
    }

    fn caption(&mut self, sources: Vec<Source>, model: ModelSource, stop: &AtomicBool) -> Result<()> {
        let batch_size = self.plan.batch_size.max(1);
        // Set once the model (and so its image size) is known; from then on the loader resizes too.
        let processor = OnceLock::<ImageProcessor>::new();
        std::thread::scope(|scope| {
            let decoded = loader::decode_ahead(scope, sources, self.plan.decode, 2 * batch_size, &processor, stop);
            let mut model = Some(model);
            let mut engine: Option<Engine> = None;
            let mut batch: Vec<(Job, PreparedImage)> = Vec::with_capacity(batch_size);
            // Containers whose last images are still in `batch`: done once it has run.
            let mut done: Vec<Arc<Container>> = Vec::new();
            for loaded in decoded {
                match loaded {
                    Loaded::Image(job, Ok(image)) => {
                        let engine = match &mut engine {
                            Some(e) => e,
                            None => {
                                let e = self.start(model.take().expect("the model is started once"))?;
                                let _ = processor.set(e.model().processor().clone());
                                engine.insert(e)
                            }
                        };
                        batch.push((job, image.prepare(engine.model().processor())));
                    }
                    Loaded::Image(job, Err(reason)) => self.fail(&job.image.path, &reason)?,
                    Loaded::Broken(path, reason) => self.fail(&path, &reason)?,
                    Loaded::Done(container) => done.push(container),
                }
                if batch.len() == batch_size {
                    self.run_batch(&mut batch, engine.as_ref())?;
                }
                if batch.is_empty() {
                    self.containers_done(&mut done)?;
                }
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
            }
            self.run_batch(&mut batch, engine.as_ref())?;
            self.containers_done(&mut done)
        })
    }

    /// Tells the sinks that the containers in `done` (emptied) are complete.
    fn containers_done(&mut self, done: &mut Vec<Arc<Container>>) -> Result<()> {
        for container in done.drain(..) {
            for sink in self.sinks.iter_mut() {
                sink.container_done(&container)?;
            }
        }
        Ok(())
    }

    /// Runs the model on `batch` (emptied) and hands each result to the sinks.
    fn run_batch(&mut self, batch: &mut Vec<(Job, PreparedImage)>, engine: Option<&Engine>) -> Result<()> {
        let Some(engine) = engine.filter(|_| !batch.is_empty()) else {
            return Ok(());
        };
        let (jobs, images): (Vec<Job>, Vec<PreparedImage>) = batch.drain(..).unzip();
        let outputs = engine
            .model()
            .run_prepared(&images, &self.plan.task, &engine.generation)?;
        for (job, output) in jobs.iter().zip(&outputs) {
            let caption = format!("{}{}{}", self.plan.prefix, output.result, self.plan.suffix);
            let item = Captioned {
                job,
                output,
                caption: &caption,
            };
            let mut failure = None;
            for sink in self.sinks.iter_mut() {
                match sink.captioned(&item) {
                    Ok(()) => {}
                    Err(SinkFailure::Image(reason)) => {
                        failure = Some(reason);
                        break;
                    }
                    Err(SinkFailure::Fatal(e)) => return Err(e),
                }
            }
            match failure {
                Some(reason) => self.fail(&job.image.path, &reason)?,
                None => self.summary.captioned += 1,
            }
        }
        Ok(())
    }
}
