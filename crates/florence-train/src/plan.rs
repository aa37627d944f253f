//! Everything a run needs, read and checked before any work: the config, the model folder, the
//! data, the output folder, and where a resumed run stands.

use std::path::{Path, PathBuf};

use florence::checkpoint::{Checkpoint, WeightFiles};
use florence::{Error, Florence2Config, FlorenceTokenizer, PreprocessorConfig, Result};

use crate::config::{ModelSource, TrainConfig};
use crate::data::{self, Discovery, Split};
use crate::output::{self, TrainerState};

/// What `florence train` was asked to do.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// The config file (YAML or JSON).
    pub config: PathBuf,
    /// The run's folder, instead of the config's `output_dir`.
    pub output: Option<PathBuf>,
    /// A `checkpoint-STEP` folder to continue from.
    pub resume: Option<PathBuf>,
    /// Stop after this many optimizer steps in all (the schedule still spans the whole run).
    pub max_steps: Option<usize>,
    /// Never download the model.
    pub offline: bool,
}

/// A checked run.
#[derive(Debug)]
pub struct Plan {
    /// The config.
    pub config: TrainConfig,
    /// One-line notes on the config (keys accepted but ignored).
    pub notes: Vec<String>,
    /// The folder the model is read from: the input model's, or the checkpoint resumed (a
    /// complete model folder too). Its files other than weights go into every checkpoint.
    pub model_dir: PathBuf,
    /// The weights to start from, checked against `model_config`.
    pub checkpoint: Checkpoint,
    /// The model's configuration.
    pub model_config: Florence2Config,
    /// The model's image preprocessing.
    pub preprocessor: PreprocessorConfig,
    /// The model's tokenizer.
    pub tokenizer: FlorenceTokenizer,
    /// The samples, their split, and what was left out.
    pub data: Discovery,
    /// Indices into `data.samples`: the eval list and the training list.
    pub split: Split,
    /// The run's folder.
    pub output: PathBuf,
    /// Optimizer steps per epoch.
    pub steps_per_epoch: usize,
    /// Optimizer steps of the whole run.
    pub total_steps: usize,
    /// The step this run stops after.
    pub stop_step: usize,
    /// Where the resumed run stood.
    pub resume: Option<TrainerState>,
}

impl Plan {
    /// Reads and checks everything `options` names.
    pub fn new(options: &TrainOptions) -> Result<Self> {
        let (config, notes) = TrainConfig::from_file(&options.config)?;
        let output = options.output.clone().unwrap_or_else(|| config.output_dir.clone());
        let (model_dir, resume) = match &options.resume {
            Some(dir) => (dir.clone(), Some(TrainerState::read(dir)?)),
            None => {
                refuse_earlier_run(&output)?;
                let dir = match &config.model {
                    ModelSource::Folder(dir) => dir.clone(),
                    ModelSource::Hub(id) => {
                        florence::hub::resolve(id, options.offline || florence::hub::offline_from_env(), true)?
                    }
                };
                (dir, None)
            }
        };
        let model_config = Florence2Config::from_file(&model_dir.join("config.json"))?;
        let preprocessor = PreprocessorConfig::from_file(&model_dir.join("preprocessor_config.json"))?;
        let tokenizer = FlorenceTokenizer::from_dir(&model_dir)?;
        // The weights must open and fit the config before the data is read.
        let mut checkpoint = Checkpoint::open(&WeightFiles::discover(&model_dir)?)?;
        checkpoint.check(&model_config, false)?;

        let data = data::discover(&config, &tokenizer, model_config.text.max_position_embeddings)?;
        if data.samples.is_empty() {
            return Err(Error::usage(format!(
                "{}: the data holds no usable image + caption pair; check dataset_path / dataset_config",
                config.file.display()
            )));
        }
        let split = data::split(data.samples.len(), &config);
        if split.train.is_empty() {
            return Err(Error::usage(format!(
                "{}: eval_split leaves no samples to train on ({} in all)",
                config.file.display(),
                data.samples.len()
            )));
        }
        let steps_per_epoch = data::steps_per_epoch(
            split.train.len(),
            config.train_batch_size,
            config.gradient_accumulation_steps,
        );
        let total_steps = steps_per_epoch * config.epochs;
        let stop_step = options.max_steps.map_or(total_steps, |m| m.min(total_steps));
        let plan = Self {
            config,
            notes,
            model_dir,
            checkpoint,
            model_config,
            preprocessor,
            tokenizer,
            data,
            split,
            output,
            steps_per_epoch,
            total_steps,
            stop_step,
            resume,
        };
        if let Some(state) = &plan.resume {
            plan.check_resume(state, options.resume.as_deref().unwrap_or(Path::new("")))?;
        }
        Ok(plan)
    }

    /// The settings that fix the run's course: a resumed run must have the same.
    pub fn course(&self) -> serde_json::Value {
        let c = &self.config;
        serde_json::json!({
            "samples": self.data.samples.len(),
            "train_samples": self.split.train.len(),
            "epochs": c.epochs,
            "optimizer": c.optimizer,
            "lr_scheduler": c.lr_scheduler,
            "learning_rate": c.learning_rate,
            "min_learning_rate": c.min_learning_rate,
            "warmup_steps": c.warmup_steps,
            "train_batch_size": c.train_batch_size,
            "gradient_accumulation_steps": c.gradient_accumulation_steps,
            "clip_grad_norm": c.clip_grad_norm,
            "weight_decay": c.weight_decay,
            "seed": c.seed,
            "shuffle": c.shuffle,
            "eval_split": c.eval_split,
            "freeze_vision": c.freeze_vision,
            "freeze_language": c.freeze_language,
            "freeze_other": c.freeze_other,
            "loss_normalization": c.loss_normalization,
            "pad_in_loss": c.pad_in_loss,
        })
    }

    fn check_resume(&self, state: &TrainerState, dir: &Path) -> Result<()> {
        let now = self.course();
        let (Some(was), Some(is)) = (state.course.as_object(), now.as_object()) else {
            return Err(Error::internal("the course is a JSON object"));
        };
        for (key, value) in is {
            if was.get(key) != Some(value) {
                return Err(Error::usage(format!(
                    "cannot resume from {}: {key} was {} there and is {value} now; resume with the run's config and data",
                    dir.display(),
                    was.get(key).map_or("absent".to_string(), |v| v.to_string()),
                )));
            }
        }
        if state.step > self.total_steps {
            return Err(Error::usage(format!(
                "cannot resume from {}: it is at step {} of a run of {} steps",
                dir.display(),
                state.step,
                self.total_steps
            )));
        }
        Ok(())
    }
}

/// Refuses to start a fresh run in a folder that holds one: its metrics and checkpoints would
/// be overwritten.
fn refuse_earlier_run(output: &Path) -> Result<()> {
    let has_metrics = output.join(output::METRICS).exists();
    let has_checkpoints = !output::checkpoints(output)?.is_empty();
    if has_metrics || has_checkpoints {
        return Err(Error::usage(format!(
            "{} already holds a training run; continue it with --resume {}/checkpoint-STEP, or choose another --output",
            output.display(),
            output.display()
        )));
    }
    Ok(())
}
