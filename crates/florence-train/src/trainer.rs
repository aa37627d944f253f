//! The training loop: windows of micro-batches, gradient accumulation, clipping, the optimizer
//! step, evaluation and checkpoints, as `SEMANTICS.md` defines them.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{Device, Tensor, Var};
use florence::tensor::segment::{self, Pass};
use florence::tensor::{language::TextInputs, Florence2, ParamGroup, Parameters};
use florence::{Error, Result};
use serde_json::json;

use crate::config::LossNormalization;
use crate::data::{self, Prefetcher};
use crate::optim::{self, Optimizer, Param};
use crate::output::{self, CheckpointWriter, MetricsLog, TrainerState};
use crate::plan::Plan;
use crate::schedule::Schedule;

/// What one optimizer step logs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepMetrics {
    /// The step, 1-based.
    pub step: usize,
    /// Fractional epochs done: `step / steps_per_epoch`.
    pub epoch: f64,
    /// The learning rate the step used.
    pub lr: f64,
    /// The window's loss, as the loss normalization defines it.
    pub loss: f64,
    /// The total gradient norm before clipping.
    pub grad_norm: f64,
    /// Samples in the window.
    pub samples: usize,
}

/// Receives a run's progress (the CLI draws a progress bar from it).
pub trait Progress {
    /// The run starts at `done` of `total` steps.
    fn begin(&mut self, done: usize, total: usize);
    /// A step is done.
    fn step(&mut self, metrics: &StepMetrics);
    /// A one-line message (evaluations, checkpoints, notes).
    fn message(&mut self, line: &str);
}

/// A [`Progress`] that shows nothing.
#[derive(Debug, Default)]
pub struct Quiet;

impl Progress for Quiet {
    fn begin(&mut self, _: usize, _: usize) {}
    fn step(&mut self, _: &StepMetrics) {}
    fn message(&mut self, _: &str) {}
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Optimizer steps taken in all (the resumed ones included).
    pub steps: usize,
    /// The last checkpoint written.
    pub last_checkpoint: Option<PathBuf>,
    /// `final/`, when the run reached its end (or its `--max-steps`).
    pub final_dir: Option<PathBuf>,
    /// Whether it stopped on an interruption.
    pub interrupted: bool,
}

/// A run in progress.
pub struct Trainer<'p> {
    plan: &'p Plan,
    params: Parameters,
    model: Florence2,
    trainable: Vec<Param>,
    optimizer: Box<dyn Optimizer>,
    schedule: Schedule,
    writer: CheckpointWriter,
    metrics: MetricsLog,
    device: Device,
    /// Every sample's image, for the prefetcher.
    images: Arc<[PathBuf]>,
}

impl<'p> Trainer<'p> {
    /// Loads the weights (and, when resuming, the optimizer's state) for `plan` onto `device`.
    pub fn new(plan: &'p Plan, device: &Device) -> Result<Self> {
        let c = &plan.config;
        let frozen = |group: ParamGroup| match group {
            ParamGroup::Vision => c.freeze_vision,
            ParamGroup::Language => c.freeze_language,
            ParamGroup::Other => c.freeze_other,
        };
        let params = Parameters::from_checkpoint(&plan.model_config, &plan.checkpoint, device, |name| {
            !frozen(ParamGroup::of(name))
        })?;
        let model = Florence2::new(&plan.model_config, &params)?;
        let trainable: Vec<Param> = params
            .trainable()
            .into_iter()
            .map(|(name, var)| Param {
                name: name.to_string(),
                var: var.clone(),
            })
            .collect();
        if trainable.is_empty() {
            return Err(Error::usage(format!(
                "{}: freeze_vision, freeze_language and freeze_other leave nothing to train",
                c.file.display()
            )));
        }
        let mut optimizer = c.optimizer.build(c.weight_decay);
        if plan.resume.is_some() {
            let path = plan.model_dir.join(output::OPTIMIZER);
            let state = candle_core::safetensors::load(&path, device)
                .map_err(|e| Error::checkpoint(&path, format!("cannot read the optimizer state: {e}")))?;
            optimizer.load_state(&trainable, &state)?;
        }
        let schedule = Schedule::new(
            c.lr_scheduler,
            c.learning_rate,
            c.min_learning_rate,
            c.warmup_steps,
            plan.total_steps,
        );
        let writer = CheckpointWriter::new(&plan.model_dir, plan.checkpoint.layout, plan.checkpoint.names());
        std::fs::create_dir_all(&plan.output).map_err(|e| Error::io(&plan.output, e))?;
        let earlier = plan.resume.as_ref().map(|_| plan.model_dir.join(output::METRICS));
        let metrics = MetricsLog::create(&plan.output.join(output::METRICS), earlier.as_deref())?;
        data::write_eval_list(&plan.output.join(EVAL_LIST), &plan.data.samples, &plan.split.eval)?;
        Ok(Self {
            plan,
            params,
            model,
            trainable,
            optimizer,
            schedule,
            writer,
            metrics,
            device: device.clone(),
            images: plan.data.samples.iter().map(|s| s.image.clone()).collect(),
        })
    }

    /// Trains to the plan's stop step, or until `interrupted` is set (then a checkpoint of the
    /// last step is written, to resume from).
    pub fn run(&mut self, interrupted: &AtomicBool, progress: &mut dyn Progress) -> Result<Summary> {
        let plan = self.plan;
        let c = &plan.config;
        let mut step = plan.resume.as_ref().map_or(0, |s| s.step);
        let mut last_checkpoint = None;
        progress.begin(step, plan.stop_step);
        if step == 0 && c.eval_before_training {
            self.evaluate(0, progress)?;
        }
        let spe = plan.steps_per_epoch;
        'epochs: for epoch in step / spe..c.epochs {
            if step >= plan.stop_step {
                break;
            }
            let order = data::epoch_order(&plan.split.train, c, epoch);
            let windows = data::windows(&order, c.train_batch_size, c.gradient_accumulation_steps);
            let windows = &windows[step - epoch * spe..];
            let batches: Vec<Vec<usize>> = windows.iter().flatten().cloned().collect();
            let mut pixels = self.prefetch(batches);
            for window in windows {
                if step >= plan.stop_step {
                    break 'epochs;
                }
                if interrupted.load(Ordering::SeqCst) {
                    progress.message(&format!("interrupted after step {step}"));
                    last_checkpoint = Some(self.save(step, progress)?);
                    return Ok(Summary {
                        steps: step,
                        last_checkpoint,
                        final_dir: None,
                        interrupted: true,
                    });
                }
                step += 1;
                let metrics = self.train_step(step, window, &mut pixels)?;
                self.metrics.write(&json!({
                    "step": metrics.step, "epoch": metrics.epoch, "lr": metrics.lr,
                    "loss": metrics.loss, "grad_norm": metrics.grad_norm,
                }))?;
                progress.step(&metrics);
                if due(c.eval_steps, step) {
                    self.evaluate(step, progress)?;
                }
                if due(c.save_steps, step) {
                    last_checkpoint = Some(self.save(step, progress)?);
                }
            }
        }
        // The last step always has a checkpoint, written before the closing evaluation so that
        // its metrics are those of a run that goes on.
        if !due(c.save_steps, step) || last_checkpoint.is_none() {
            last_checkpoint = Some(self.save(step, progress)?);
        }
        if !due(c.eval_steps, step) {
            self.evaluate(step, progress)?;
        }
        let final_dir = plan.output.join("final");
        self.write_checkpoint(&final_dir, step)?;
        progress.message(&format!("final model: {}", final_dir.display()));
        Ok(Summary {
            steps: step,
            last_checkpoint,
            final_dir: Some(final_dir),
            interrupted: false,
        })
    }

    /// With `use_bf16`, the model over bf16 casts of the current weights (made again for every
    /// step, after the last update): it computes in bf16 and its gradients reach the f32
    /// variables through the casts.
    fn bf16_model(&self) -> Result<Option<Florence2>> {
        if !self.plan.config.use_bf16 {
            return Ok(None);
        }
        let view = self.params.cast_view(candle_core::DType::BF16)?;
        Ok(Some(Florence2::new(&self.plan.model_config, &view)?))
    }

    /// One optimizer step over the micro-batches of `window`.
    fn train_step(&mut self, step: usize, window: &[Vec<usize>], pixels: &mut Prefetcher) -> Result<StepMetrics> {
        let c = &self.plan.config;
        let accumulation = c.gradient_accumulation_steps;
        let vars: Vec<Var> = self.trainable.iter().map(|p| p.var.clone()).collect();
        let cast = self.bf16_model()?;
        let model = cast.as_ref().unwrap_or(&self.model);
        let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
        let (mut loss_sum, mut tokens, mut samples) = (0f64, 0usize, 0usize);
        for (micro, batch) in window.iter().enumerate() {
            let (indices, pixel_values) = next_batch(pixels)?;
            debug_assert_eq!(&indices, batch);
            let text = self.text_inputs(batch)?;
            let n = text.label_count;
            // The seed of the objective's gradient, as torch's backward of `sum / n / A` (f32).
            let scale = match c.loss_normalization {
                LossNormalization::Mean => (1.0 / accumulation as f32) / n as f32,
                LossNormalization::TokenCount => 1.0,
            };
            let pass = Pass {
                train: true,
                seed: dropout_seed(c.seed, step, micro),
                checkpointing: c.gradient_checkpointing,
            };
            let segments = model.segments(&text);
            let inputs = vec![pixel_values.to_device(&self.device)?];
            let (sum, micro_grads) = segment::backward(&segments, inputs, &vars, scale as f64, &pass)?;
            let sum = sum.to_scalar::<f32>()?;
            loss_sum += match c.loss_normalization {
                LossNormalization::Mean => (sum / n as f32) as f64,
                LossNormalization::TokenCount => sum as f64,
            };
            tokens += n;
            samples += batch.len();
            for (total, g) in grads.iter_mut().zip(micro_grads) {
                if let Some(g) = g {
                    *total = Some(match total.take() {
                        Some(t) => (t + g)?,
                        None => g,
                    });
                }
            }
        }
        let mut grads = grads
            .into_iter()
            .zip(&vars)
            .map(|(g, v)| g.map_or_else(|| v.as_tensor().zeros_like(), Ok))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let loss = match c.loss_normalization {
            LossNormalization::Mean => loss_sum / accumulation as f64,
            LossNormalization::TokenCount => {
                for g in grads.iter_mut() {
                    *g = (&*g / tokens as f64)?;
                }
                loss_sum / tokens as f64
            }
        };
        let grad_norm = optim::clip_grad_norm(&mut grads, c.clip_grad_norm)?;
        let lr = self.schedule.lr(step);
        self.optimizer.step(&self.trainable, &grads, lr)?;
        Ok(StepMetrics {
            step,
            epoch: step as f64 / self.plan.steps_per_epoch as f64,
            lr,
            loss,
            grad_norm,
            samples,
        })
    }

    /// Decodes and preprocesses the images of `batches` ahead, in order, on worker threads.
    fn prefetch(&self, batches: Vec<Vec<usize>>) -> Prefetcher {
        let processor = florence::ImageProcessor::new(self.plan.preprocessor.clone());
        Prefetcher::new(
            self.images.clone(),
            batches,
            processor,
            PREFETCH_AHEAD,
            PREFETCH_WORKERS,
        )
    }

    /// The collated text of the samples `batch`.
    fn text_inputs(&self, batch: &[usize]) -> Result<TextInputs> {
        let samples = &self.plan.data.samples;
        let prompts: Vec<Vec<u32>> = batch.iter().map(|&i| samples[i].prompt_ids.clone()).collect();
        let labels: Vec<Vec<u32>> = batch.iter().map(|&i| samples[i].label_ids.clone()).collect();
        TextInputs::new(&prompts, &labels, self.plan.config.pad_in_loss, &self.device)
    }

    /// The token-mean loss over the eval list, logged as `{"step", "eval_loss"}`.
    fn evaluate(&mut self, step: usize, progress: &mut dyn Progress) -> Result<Option<f64>> {
        let plan = self.plan;
        if plan.split.eval.is_empty() {
            return Ok(None);
        }
        let batches: Vec<Vec<usize>> = plan
            .split
            .eval
            .chunks(plan.config.eval_batch_size)
            .map(<[usize]>::to_vec)
            .collect();
        let count = batches.len();
        let mut pixels = self.prefetch(batches);
        let pass = Pass {
            train: false,
            seed: 0,
            checkpointing: false,
        };
        let (mut total, mut tokens) = (0f64, 0usize);
        let cast = self.bf16_model()?;
        let model = cast.as_ref().unwrap_or(&self.model);
        for _ in 0..count {
            let (batch, pixel_values) = next_batch(&mut pixels)?;
            let text = self.text_inputs(&batch)?;
            let sum = model.loss_sum(&pixel_values.to_device(&self.device)?, &text, &pass)?;
            total += sum.to_scalar::<f32>()? as f64;
            tokens += text.label_count;
        }
        let loss = total / tokens as f64;
        self.metrics.write(&json!({"step": step, "eval_loss": loss}))?;
        progress.message(&format!("step {step}: eval loss {loss:.5}"));
        for r in crate::samples::caption(plan, &self.writer, &self.params, step)? {
            progress.message(&format!(
                "  {}\n    truth: {}\n    model: {}",
                r["image"].as_str().unwrap_or_default(),
                r["ground_truth"].as_str().unwrap_or_default(),
                r["generated"].as_str().unwrap_or_default()
            ));
        }
        Ok(Some(loss))
    }

    /// Writes `checkpoint-STEP` and removes the oldest beyond the limit.
    fn save(&mut self, step: usize, progress: &mut dyn Progress) -> Result<PathBuf> {
        let dir = output::checkpoint_dir(&self.plan.output, step);
        self.write_checkpoint(&dir, step)?;
        if let Some(keep) = self.plan.config.save_total_limit {
            output::rotate(&self.plan.output, keep)?;
        }
        progress.message(&format!("saved {}", dir.display()));
        Ok(dir)
    }

    fn write_checkpoint(&self, dir: &std::path::Path, step: usize) -> Result<()> {
        let state = TrainerState {
            step,
            total_steps: self.plan.total_steps,
            steps_per_epoch: self.plan.steps_per_epoch,
            course: self.plan.course(),
        };
        let optimizer = self.optimizer.state()?;
        self.writer
            .write(dir, &self.params, &optimizer, &state, self.metrics.path())
    }
}

/// Micro-batches decoded ahead of the model, and the threads decoding them: decoding a batch
/// takes a small fraction of a training step, so few are needed.
const PREFETCH_AHEAD: usize = 2;
const PREFETCH_WORKERS: usize = 2;

/// Whether something done `every` so many steps (never when `None`) is due after `step`.
fn due(every: Option<usize>, step: usize) -> bool {
    every.is_some_and(|n| step.is_multiple_of(n))
}

/// The next micro-batch of `pixels`.
fn next_batch(pixels: &mut Prefetcher) -> Result<data::Batch> {
    pixels
        .next()
        .unwrap_or_else(|| Err(Error::internal("the prefetcher ended before the epoch")))
}

/// The list of held-out samples, in the run's folder.
pub const EVAL_LIST: &str = "eval_image_paths.txt";

/// The seed of the dropout masks of micro-batch `micro` of step `step`: a resumed run draws the
/// same masks as an uninterrupted one.
fn dropout_seed(seed: u64, step: usize, micro: usize) -> u64 {
    let mut z = seed ^ ((step as u64) << 20 | micro as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
