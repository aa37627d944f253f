//! The training configuration: Florence-2ner's YAML (or JSON) keys as they are, plus ours.
//!
//! Every key is read into a typed field. Keys that only make sense for Florence-2ner's PyTorch
//! stack (`wandb_*`, `attn_implementation`, `dataloader_*`, ...) are accepted with a one-line
//! note each; an unknown key or an invalid value stops with a one-line error that names the key
//! and the file, before any work. Paths are relative to the config file's folder.
//!
//! Defaults, where a key is left out or left empty (`key:` in YAML). Florence-2ner has no
//! defaults of its own (it reads every key with `config.get` and fails on a missing one), except
//! `min_learning_rate` (`or 0`) and `lr_scheduler` (Cosine for anything it does not know); ours
//! are chosen so that a left-out key asks for nothing:
//!
//! | key | default |
//! |---|---|
//! | `model_name`, `epochs`, `optimizer`, `learning_rate`, `train_batch_size`, data | required |
//! | `run_name` | the config file's name without extension |
//! | `output_dir` | `checkpoints/<run_name>` beside the config file |
//! | `lr_scheduler` | `Cosine` (Florence-2ner's fallback) |
//! | `min_learning_rate` | 0 (Florence-2ner's `or 0`) |
//! | `warmup_steps` | 0 |
//! | `eval_batch_size` | `train_batch_size` |
//! | `gradient_accumulation_steps` | 1 |
//! | `clip_grad_norm` | 0: no clipping |
//! | `weight_decay` | 0 |
//! | `seed` | 42 (the seed recipe's) |
//! | `save_steps`, `eval_steps` | none: save and evaluate at the end only |
//! | `save_total_limit` | none: keep every checkpoint |
//! | `eval_split` (alias `eval_split_ratio`) | 0: no evaluation |
//! | `eval_before_training`, `freeze_*`, `gradient_checkpointing`, `pad_in_loss`, `use_bf16` | false |
//! | `shuffle` | true |
//! | `loss_normalization` | `mean` |
//!
//! The data comes from `task_prompt` + `dataset_path` (the seed recipe's form: a folder of images
//! with `<stem>.txt` captions, or a ShareGPT `.json`/`.jsonl` file) and/or `dataset_config`
//! (a mapping task prompt -> folder or folders, or a list of folders whose subfolders are named
//! after task prompts, or of ShareGPT files), in the order the keys are written.

mod node;
mod reader;

use std::path::{Path, PathBuf};

use florence::{Error, Result};
use serde::{Deserialize, Serialize};

use crate::optim::OptimizerKind;
use crate::schedule::ScheduleKind;
use node::Node;
use reader::Reader;

/// How a window's micro-batch losses make one step's gradient (`loss_normalization`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossNormalization {
    /// Each micro-batch's mean loss divided by the accumulation steps (classic Florence-2ner).
    Mean,
    /// The window's summed token losses divided by its token count (newer Florence-2ner).
    TokenCount,
}

/// How many samples are held out for evaluation (`eval_split`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum EvalSplit {
    /// A fraction below 1 of all samples, rounded down.
    Fraction(f64),
    /// A number of samples (at most all of them).
    Count(usize),
}

impl EvalSplit {
    /// The number of eval samples out of `n`: `floor(n * fraction)`, or `min(count, n)`.
    pub fn count(&self, n: usize) -> usize {
        match *self {
            EvalSplit::Fraction(f) => (n as f64 * f).floor() as usize,
            EvalSplit::Count(c) => c.min(n),
        }
    }
}

/// Where the model to fine-tune comes from (`model_name`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum ModelSource {
    /// A model folder (relative to the config file, resolved).
    Folder(PathBuf),
    /// A Hugging Face hub id, such as `microsoft/Florence-2-base`.
    Hub(String),
}

/// One source of samples, with its paths resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum DataSource {
    /// Images with `<stem>.txt` captions beside them (not in subfolders), all for one task
    /// prompt (`task_prompt` + `dataset_path`, or a `dataset_config` mapping entry).
    Captioned {
        /// The task prompt, such as `<CAPTION>`.
        prompt: String,
        /// The folder.
        dir: PathBuf,
    },
    /// A folder whose subfolders are named after task prompts and hold `<stem>.txt` captions of
    /// the images in the folder itself (`dataset_config` as a list of folders).
    PromptFolders {
        /// The folder.
        dir: PathBuf,
    },
    /// ShareGPT-style records in a `.json` (an array) or `.jsonl` (one per line) file.
    ShareGpt {
        /// The file.
        file: PathBuf,
    },
}

/// A training run's settings. See the [module docs](self) for the defaults.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainConfig {
    /// The config file this was read from.
    pub file: PathBuf,
    /// `model_name`: the model to start from.
    pub model: ModelSource,
    /// `run_name`.
    pub run_name: String,
    /// `output_dir`: where checkpoints, metrics and `eval_images.txt` go.
    pub output_dir: PathBuf,
    /// The data, in config order.
    pub data: Vec<DataSource>,
    /// `epochs` (>= 1).
    pub epochs: usize,
    /// `optimizer`.
    pub optimizer: OptimizerKind,
    /// `lr_scheduler`.
    pub lr_scheduler: ScheduleKind,
    /// `learning_rate` (> 0): the peak rate.
    pub learning_rate: f64,
    /// `min_learning_rate` (0 to `learning_rate`): where the schedules end.
    pub min_learning_rate: f64,
    /// `warmup_steps` (the trainer checks it against the total steps).
    pub warmup_steps: usize,
    /// `train_batch_size` (>= 1): samples per micro-batch.
    pub train_batch_size: usize,
    /// `eval_batch_size` (>= 1).
    pub eval_batch_size: usize,
    /// `gradient_accumulation_steps` (>= 1): micro-batches per optimizer step.
    pub gradient_accumulation_steps: usize,
    /// `clip_grad_norm` (>= 0): the gradient norm clipped to; 0 does not clip.
    pub clip_grad_norm: f64,
    /// `weight_decay` (>= 0).
    pub weight_decay: f64,
    /// `seed`: the shuffle's and dropout's.
    pub seed: u64,
    /// `save_steps` (>= 1): a checkpoint every so many steps; `None` saves at the end only.
    pub save_steps: Option<usize>,
    /// `eval_steps` (>= 1): an evaluation every so many steps; `None` evaluates at the end only.
    pub eval_steps: Option<usize>,
    /// `save_total_limit` (>= 1): the newest checkpoints kept; `None` keeps all.
    pub save_total_limit: Option<usize>,
    /// `eval_split` or `eval_split_ratio`.
    pub eval_split: EvalSplit,
    /// `eval_before_training`: evaluate once before the first step.
    pub eval_before_training: bool,
    /// `freeze_vision`: the vision tower gets no updates.
    pub freeze_vision: bool,
    /// `freeze_language`: the language model (with the shared embedding and `lm_head`) gets none.
    pub freeze_language: bool,
    /// `freeze_other`: the projector and image position embeddings get none.
    pub freeze_other: bool,
    /// `gradient_checkpointing`: recompute each block's activations in the backward pass.
    pub gradient_checkpointing: bool,
    /// `shuffle`: shuffle before the split and every epoch.
    pub shuffle: bool,
    /// `loss_normalization`.
    pub loss_normalization: LossNormalization,
    /// `pad_in_loss`: train on pad tokens too, as Florence-2ner does.
    pub pad_in_loss: bool,
    /// `use_bf16`: mixed precision, as torch's bf16 autocast: the model computes in bf16
    /// (normalizations, softmax and the loss in f32) over f32 master weights, which the
    /// gradients reach in f32 and the optimizer updates in f32.
    pub use_bf16: bool,
}

impl TrainConfig {
    /// Reads a `.yaml`/`.yml` or `.json` config. Returns the config and one-line notes on the
    /// keys accepted but ignored; refuses an unknown key or an invalid value with a one-line
    /// error naming the key and the file.
    pub fn from_file(path: &Path) -> Result<(Self, Vec<String>)> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
        let parsed = match ext.as_deref() {
            Some("yaml" | "yml") => serde_norway::from_str::<Node>(&text).map_err(|e| e.to_string()),
            Some("json") => serde_json::from_str::<Node>(&text).map_err(|e| e.to_string()),
            _ => return Err(config_error(path, "the config must be a .yaml, .yml or .json file")),
        };
        let root = parsed.map_err(|e| config_error(path, format!("cannot parse: {e}")))?;
        let Node::Map(entries) = root else {
            return Err(config_error(path, "the config must be a mapping of keys to values"));
        };
        Reader::new(path, entries)?.read()
    }
}

/// A one-line configuration error in `file`.
pub(crate) fn config_error(file: &Path, message: impl Into<String>) -> Error {
    Error::Config {
        file: Some(file.to_path_buf()),
        message: message.into(),
    }
}
