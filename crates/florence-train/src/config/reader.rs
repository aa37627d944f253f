//! Taking a parsed config's keys, one by one, into a [`TrainConfig`].

use std::path::{Path, PathBuf};

use florence::{Error, Result};
use serde::de::DeserializeOwned;

use super::node::Node;
use super::{config_error, DataSource, EvalSplit, LossNormalization, ModelSource, TrainConfig};
use crate::schedule::ScheduleKind;

/// Florence-2ner's keys that do nothing here, with why (one line each in the notes).
const IGNORED: &[(&str, &str)] = &[
    ("attn_implementation", "attention is computed by this crate's own ops"),
    (
        "do_extra_eval",
        "BLEU/METEOR/ROUGE are not computed; eval loss and sample captions are",
    ),
    (
        "print_first_batch_predictions",
        "a few eval captions are always printed and saved",
    ),
    ("garbage_collection", "there is no garbage collector to run"),
    ("do_gc", "there is no garbage collector to run"),
    ("activation_offloading", "use gradient_checkpointing to save memory"),
    ("gpu_limit_mb", "activation offloading does not apply"),
    ("offload_cpu_limit_mb", "activation offloading does not apply"),
    ("filtering_processes", "captions are filtered on this process's threads"),
    (
        "filtering_processes_per_thread",
        "captions are filtered on this process's threads",
    ),
    (
        "filtering_batch_size",
        "captions are filtered on this process's threads",
    ),
    (
        "dataloader_workers",
        "images are decoded ahead on worker threads of their own",
    ),
    (
        "dataloader_prefetch_factor",
        "images are decoded ahead on worker threads of their own",
    ),
    (
        "persistent_workers",
        "images are decoded ahead on worker threads of their own",
    ),
];

/// Every key read into [`TrainConfig`] (for the unknown-key check and its suggestion).
const KEYS: &[&str] = &[
    "model_name",
    "run_name",
    "output_dir",
    "epochs",
    "optimizer",
    "lr_scheduler",
    "learning_rate",
    "min_learning_rate",
    "warmup_steps",
    "train_batch_size",
    "eval_batch_size",
    "gradient_accumulation_steps",
    "clip_grad_norm",
    "weight_decay",
    "seed",
    "save_steps",
    "eval_steps",
    "save_total_limit",
    "eval_split",
    "eval_split_ratio",
    "eval_before_training",
    "freeze_vision",
    "freeze_language",
    "freeze_other",
    "gradient_checkpointing",
    "shuffle",
    "loss_normalization",
    "pad_in_loss",
    "use_bf16",
    "task_prompt",
    "dataset_path",
    "dataset_config",
];

/// The keys of one config file, taken one by one into typed values.
pub(super) struct Reader<'a> {
    file: &'a Path,
    dir: PathBuf,
    entries: Vec<(String, Node)>,
    notes: Vec<String>,
}

impl<'a> Reader<'a> {
    /// Sorts the keys: known ones stay, ignored ones become notes, an unknown one is an error.
    pub(super) fn new(file: &'a Path, entries: Vec<(String, Node)>) -> Result<Self> {
        let mut notes = Vec::new();
        let mut known = Vec::new();
        for (key, value) in entries {
            if KEYS.contains(&key.as_str()) {
                known.push((key, value));
            } else if let Some(why) = ignored(&key) {
                if value != Node::Null {
                    notes.push(format!("{}: ignored {key:?}: {why}", file.display()));
                }
            } else {
                let hint = closest_key(&key).map_or(String::new(), |k| format!("; did you mean {k:?}?"));
                return Err(config_error(file, format!("unknown key {key:?}{hint}")));
            }
        }
        let dir = match file.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        Ok(Self {
            file,
            dir,
            entries: known,
            notes,
        })
    }

    fn error(&self, key: &str, message: impl std::fmt::Display) -> Error {
        config_error(self.file, format!("{key:?} {message}"))
    }

    /// The value of `key`, removed; an empty value counts as absent.
    fn take(&mut self, key: &str) -> Option<Node> {
        let i = self.entries.iter().position(|(k, _)| k == key)?;
        Some(self.entries.remove(i).1).filter(|v| *v != Node::Null)
    }

    fn required<T>(&self, key: &str, value: Option<T>) -> Result<T> {
        value.ok_or_else(|| self.error(key, "is required"))
    }

    fn bool(&mut self, key: &str, default: bool) -> Result<bool> {
        match self.take(key) {
            None => Ok(default),
            Some(Node::Bool(b)) => Ok(b),
            Some(v) => Err(self.error(key, format!("must be true or false, not {}", v.describe()))),
        }
    }

    /// A whole number >= `min`.
    fn count(&mut self, key: &str, min: u64) -> Result<Option<usize>> {
        let Some(v) = self.take(key) else { return Ok(None) };
        match v {
            Node::Int(i) if i >= 0 && i as u64 >= min => Ok(Some(i as usize)),
            Node::UInt(u) if u >= min => usize::try_from(u)
                .map(Some)
                .map_err(|_| self.error(key, "is too large")),
            v => Err(self.error(key, format!("must be a whole number >= {min}, not {}", v.describe()))),
        }
    }

    /// A finite number >= `min` (and > `min` if `strict`).
    fn number(&mut self, key: &str, min: f64, strict: bool) -> Result<Option<f64>> {
        let Some(v) = self.take(key) else { return Ok(None) };
        match v.as_f64() {
            Some(x) if x.is_finite() && (x > min || (!strict && x == min)) => Ok(Some(x)),
            _ => {
                let bound = if strict { ">" } else { ">=" };
                Err(self.error(key, format!("must be a number {bound} {min}, not {}", v.describe())))
            }
        }
    }

    fn text(&mut self, key: &str) -> Result<Option<String>> {
        match self.take(key) {
            None => Ok(None),
            Some(Node::Str(s)) if !s.is_empty() => Ok(Some(s)),
            Some(v) => Err(self.error(key, format!("must be non-empty text, not {}", v.describe()))),
        }
    }

    /// One of an enum's names (`names` lists the canonical ones for the message).
    fn choice<T: DeserializeOwned>(&mut self, key: &str, names: &str) -> Result<Option<T>> {
        let Some(v) = self.take(key) else { return Ok(None) };
        let parsed = match &v {
            Node::Str(s) => serde_json::from_value(serde_json::Value::String(s.clone())).ok(),
            _ => None,
        };
        match parsed {
            Some(t) => Ok(Some(t)),
            None => Err(self.error(key, format!("must be one of {names}, not {}", v.describe()))),
        }
    }

    pub(super) fn read(mut self) -> Result<(TrainConfig, Vec<String>)> {
        // The data keys first, in file order, while their positions are known.
        let data = self.data()?;
        let model = self.model()?;
        let run_name = match self.text("run_name")? {
            Some(name) => name,
            None => self
                .file
                .file_stem()
                .map_or("run".into(), |s| s.to_string_lossy().into_owned()),
        };
        let output_dir = match self.text("output_dir")? {
            Some(dir) => self.dir.join(dir),
            None => self.dir.join("checkpoints").join(&run_name),
        };
        let epochs = self.count("epochs", 1)?;
        let epochs = self.required("epochs", epochs)?;
        let optimizer = self.choice("optimizer", "CAME, AdamW (or OptimiAdamW)")?;
        let optimizer = self.required("optimizer", optimizer)?;
        let lr_scheduler = self
            .choice("lr_scheduler", "REX, Cosine, Constant, Linear")?
            .unwrap_or(ScheduleKind::Cosine);
        let learning_rate = self.number("learning_rate", 0.0, true)?;
        let learning_rate = self.required("learning_rate", learning_rate)?;
        let min_learning_rate = self.number("min_learning_rate", 0.0, false)?.unwrap_or(0.0);
        if min_learning_rate > learning_rate {
            return Err(self.error(
                "min_learning_rate",
                format!("({min_learning_rate}) must not exceed learning_rate ({learning_rate})"),
            ));
        }
        let train_batch_size = self.count("train_batch_size", 1)?;
        let train_batch_size = self.required("train_batch_size", train_batch_size)?;
        let eval_split = self.eval_split()?;
        let config = TrainConfig {
            model,
            run_name,
            output_dir,
            data,
            epochs,
            optimizer,
            lr_scheduler,
            learning_rate,
            min_learning_rate,
            warmup_steps: self.count("warmup_steps", 0)?.unwrap_or(0),
            train_batch_size,
            eval_batch_size: self.count("eval_batch_size", 1)?.unwrap_or(train_batch_size),
            gradient_accumulation_steps: self.count("gradient_accumulation_steps", 1)?.unwrap_or(1),
            clip_grad_norm: self.number("clip_grad_norm", 0.0, false)?.unwrap_or(0.0),
            weight_decay: self.number("weight_decay", 0.0, false)?.unwrap_or(0.0),
            seed: self.count("seed", 0)?.map_or(42, |s| s as u64),
            save_steps: self.count("save_steps", 1)?,
            eval_steps: self.count("eval_steps", 1)?,
            save_total_limit: self.count("save_total_limit", 1)?,
            eval_split,
            eval_before_training: self.bool("eval_before_training", false)?,
            freeze_vision: self.bool("freeze_vision", false)?,
            freeze_language: self.bool("freeze_language", false)?,
            freeze_other: self.bool("freeze_other", false)?,
            gradient_checkpointing: self.bool("gradient_checkpointing", false)?,
            shuffle: self.bool("shuffle", true)?,
            loss_normalization: self
                .choice("loss_normalization", "mean, token_count")?
                .unwrap_or(LossNormalization::Mean),
            pad_in_loss: self.bool("pad_in_loss", false)?,
            use_bf16: self.bool("use_bf16", false)?,
            file: self.file.to_path_buf(),
        };
        // Every key in KEYS is taken above; one left over is a bug in this list.
        if let Some((key, _)) = self.entries.iter().find(|(_, v)| *v != Node::Null) {
            return Err(Error::Internal(format!("config key {key:?} is listed but not read")));
        }
        Ok((config, self.notes))
    }

    fn eval_split(&mut self) -> Result<EvalSplit> {
        let (a, b) = ("eval_split", "eval_split_ratio");
        let given = [a, b].map(|k| self.entries.iter().any(|(key, v)| key == k && *v != Node::Null));
        if given == [true, true] {
            return Err(self.error(a, format!("and {b:?} are the same setting; give one")));
        }
        let key = if given[1] { b } else { a };
        let Some(x) = self.number(key, 0.0, false)? else {
            return Ok(EvalSplit::Count(0));
        };
        if x < 1.0 {
            Ok(EvalSplit::Fraction(x))
        } else if x.fract() == 0.0 && x <= usize::MAX as f64 {
            Ok(EvalSplit::Count(x as usize))
        } else {
            Err(self.error(key, format!("must be a fraction below 1 or a whole count, not {x}")))
        }
    }

    /// `model_name`: a folder beside the config, or else a hub id.
    fn model(&mut self) -> Result<ModelSource> {
        let name = self.text("model_name")?;
        let name = self.required("model_name", name)?;
        let folder = self.dir.join(&name);
        if folder.is_dir() {
            return Ok(ModelSource::Folder(folder));
        }
        let hub_like = name.split('/').count() <= 2
            && !name.starts_with('.')
            && name
                .split('/')
                .all(|part| !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)));
        if hub_like {
            Ok(ModelSource::Hub(name))
        } else {
            Err(self.error(
                "model_name",
                format!(
                    "is neither a folder ({}) nor a hub id like microsoft/Florence-2-base",
                    folder.display()
                ),
            ))
        }
    }

    /// The data sources of `task_prompt` + `dataset_path` and `dataset_config`, in file order.
    fn data(&mut self) -> Result<Vec<DataSource>> {
        let position = |r: &Self, key: &str| r.entries.iter().position(|(k, v)| k == key && *v != Node::Null);
        let path_first = match (position(self, "dataset_path"), position(self, "dataset_config")) {
            (None, None) => {
                return Err(config_error(
                    self.file,
                    "no data: give \"dataset_config\", or \"task_prompt\" with \"dataset_path\"",
                ))
            }
            (Some(p), Some(c)) => p < c,
            (p, _) => p.is_some(),
        };
        let prompt = self.text("task_prompt")?;
        let mut sources = Vec::new();
        for first in [path_first, !path_first] {
            if first {
                sources.extend(self.dataset_path(prompt.as_deref())?);
            } else {
                sources.extend(self.dataset_config()?);
            }
        }
        Ok(sources)
    }

    /// `dataset_path` (one path or a list): folders for `task_prompt`, or ShareGPT files.
    fn dataset_path(&mut self, prompt: Option<&str>) -> Result<Vec<DataSource>> {
        let key = "dataset_path";
        let Some(node) = self.take(key) else {
            if prompt.is_some() {
                return Err(self.error("task_prompt", "is given without \"dataset_path\""));
            }
            return Ok(Vec::new());
        };
        let mut sources = Vec::new();
        for path in self.paths(key, node)? {
            if is_sharegpt(&path) {
                sources.push(self.sharegpt(key, path)?);
                continue;
            }
            let Some(prompt) = prompt else {
                return Err(self.error(key, "names a folder: give its \"task_prompt\" too (e.g. \"<CAPTION>\")"));
            };
            sources.push(DataSource::Captioned {
                prompt: prompt.to_string(),
                dir: self.folder(key, path)?,
            });
        }
        if prompt.is_some() && sources.iter().all(|s| matches!(s, DataSource::ShareGpt { .. })) {
            let note = "ignored \"task_prompt\": ShareGPT records carry their prompt in the human turn";
            self.notes.push(format!("{}: {note}", self.file.display()));
        }
        Ok(sources)
    }

    /// `dataset_config`: task prompt -> folders, or a list of prompt-subfolder folders and
    /// ShareGPT files.
    fn dataset_config(&mut self) -> Result<Vec<DataSource>> {
        let key = "dataset_config";
        let mut sources = Vec::new();
        match self.take(key) {
            None => {}
            Some(Node::Map(entries)) => {
                for (prompt, folders) in entries {
                    for path in self.paths(key, folders)? {
                        let dir = self.folder(key, path)?;
                        sources.push(DataSource::Captioned {
                            prompt: prompt.clone(),
                            dir,
                        });
                    }
                }
            }
            Some(node @ Node::Seq(_)) => {
                for path in self.paths(key, node)? {
                    sources.push(match is_sharegpt(&path) {
                        true => self.sharegpt(key, path)?,
                        false => DataSource::PromptFolders {
                            dir: self.folder(key, path)?,
                        },
                    });
                }
            }
            Some(v) => {
                return Err(self.error(
                    key,
                    format!(
                        "must map task prompts to folders, or list folders, not {}",
                        v.describe()
                    ),
                ))
            }
        }
        Ok(sources)
    }

    /// One path or a non-empty list of paths, as written.
    fn paths(&self, key: &str, node: Node) -> Result<Vec<String>> {
        let items = match node {
            Node::Seq(items) if !items.is_empty() => items,
            Node::Str(s) if !s.is_empty() => return Ok(vec![s]),
            v => return Err(self.error(key, format!("must be a path or a list of paths, not {}", v.describe()))),
        };
        items
            .into_iter()
            .map(|item| match item {
                Node::Str(s) if !s.is_empty() => Ok(s),
                v => Err(self.error(key, format!("lists {}, not a path", v.describe()))),
            })
            .collect()
    }

    fn folder(&self, key: &str, path: String) -> Result<PathBuf> {
        let dir = self.dir.join(&path);
        if dir.is_dir() {
            Ok(dir)
        } else {
            Err(self.error(
                key,
                format!("names {path:?}, which is not a folder ({})", dir.display()),
            ))
        }
    }

    fn sharegpt(&self, key: &str, path: String) -> Result<DataSource> {
        let file = self.dir.join(&path);
        if file.is_file() {
            Ok(DataSource::ShareGpt { file })
        } else {
            Err(self.error(key, format!("names {path:?}, which is not a file ({})", file.display())))
        }
    }
}

/// A ShareGPT file is named `.json` or `.jsonl`; anything else is a folder.
fn is_sharegpt(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    lower.ends_with(".json") || lower.ends_with(".jsonl")
}

fn ignored(key: &str) -> Option<&'static str> {
    if key.starts_with("wandb_") {
        return Some("there is no Weights & Biases logging; metrics go to metrics.jsonl");
    }
    IGNORED.iter().find(|(k, _)| *k == key).map(|(_, why)| *why)
}

/// The known key nearest to `key` by edit distance, if it is near enough to be a typo.
fn closest_key(key: &str) -> Option<&'static str> {
    let candidates = KEYS.iter().chain(IGNORED.iter().map(|(k, _)| k));
    let (best, distance) = candidates
        .map(|k| (*k, edit_distance(key, k)))
        .min_by_key(|(_, d)| *d)?;
    (distance <= 2.max(key.len() / 4)).then_some(best)
}

/// Levenshtein distance over chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != *cb)).min(above + 1).min(row[j] + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_single_edits() {
        assert_eq!(edit_distance("learning_rat", "learning_rate"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(closest_key("epoch"), Some("epochs"));
        assert_eq!(closest_key("completely_different"), None);
    }
}
