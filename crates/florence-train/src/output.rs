//! What a run writes: `metrics.jsonl`, and checkpoint folders that are complete model folders
//! (`florence caption --model` and transformers load them) holding the state to resume from.
//!
//! A checkpoint is built in a hidden temporary folder beside its destination and renamed into
//! place when complete, so a folder named `checkpoint-STEP` is never partial, whenever the
//! process stops.

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use florence::checkpoint::save;
use florence::tensor::Parameters;
use florence::{Error, Layout, Result};
use serde::{Deserialize, Serialize};

/// The weights file of a checkpoint folder (the layout and names of the input model).
pub const WEIGHTS: &str = "model.safetensors";
/// The optimizer's state in a checkpoint folder.
pub const OPTIMIZER: &str = "optimizer.safetensors";
/// Where a run stands, in a checkpoint folder.
pub const STATE: &str = "trainer_state.json";
/// The metrics of every step up to the checkpoint's, in a checkpoint folder and the run's folder.
pub const METRICS: &str = "metrics.jsonl";

/// Where a run stands: what [`STATE`] holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps taken.
    pub step: usize,
    /// Steps in the whole run (all epochs).
    pub total_steps: usize,
    /// Steps per epoch.
    pub steps_per_epoch: usize,
    /// The settings that fix the run's course (batch sizes, rates, seed, data size ...): a
    /// resumed run must have the same.
    pub course: serde_json::Value,
}

impl TrainerState {
    /// Reads [`STATE`] from the checkpoint folder `dir`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(STATE);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        serde_json::from_str(&text).map_err(|e| {
            Error::usage(format!(
                "{}: not a florence training state ({e}); --resume takes a checkpoint-STEP folder that florence train wrote",
                path.display()
            ))
        })
    }
}

/// Writes checkpoint folders for one run.
#[derive(Debug)]
pub struct CheckpointWriter {
    /// The input model's folder: its files other than weights are copied into every checkpoint.
    model_dir: PathBuf,
    layout: Layout,
    /// The remote-layout names the input's weights file held: the output holds the same.
    names: Vec<String>,
}

impl CheckpointWriter {
    /// A writer copying `model_dir`'s non-weight files and writing the tensors `names`
    /// (remote-layout names) in `layout`.
    pub fn new(model_dir: &Path, layout: Layout, names: Vec<String>) -> Self {
        Self {
            model_dir: model_dir.to_path_buf(),
            layout,
            names,
        }
    }

    /// Writes the complete folder `dest`: the model folder's files, the weights of `params`
    /// (f32), the optimizer's `state`, `trainer` and the metrics file `metrics` (copied).
    /// An existing `dest` (a checkpoint of an earlier try at this run) is replaced.
    pub fn write(
        &self,
        dest: &Path,
        params: &Parameters,
        optimizer: &[(String, Tensor)],
        trainer: &TrainerState,
        metrics: &Path,
    ) -> Result<()> {
        self.write_with(dest, params, |tmp| {
            save::write_safetensors(&tmp.join(OPTIMIZER), optimizer)?;
            let state = serde_json::to_vec_pretty(trainer).map_err(|e| Error::internal(e.to_string()))?;
            florence::pipeline::write_atomic(&tmp.join(STATE), &state).map_err(|e| Error::io(&tmp.join(STATE), e))?;
            if metrics.exists() {
                std::fs::copy(metrics, tmp.join(METRICS)).map_err(|e| Error::io(metrics, e))?;
            }
            Ok(())
        })
    }

    /// Writes `dest` as a model folder only (the model folder's files and the weights of `params`).
    pub fn write_model(&self, dest: &Path, params: &Parameters) -> Result<()> {
        self.write_with(dest, params, |_| Ok(()))
    }

    /// Builds `dest` in a temporary folder beside it: the model, then what `extra` adds; then
    /// renames it into place.
    fn write_with(&self, dest: &Path, params: &Parameters, extra: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("checkpoint");
        let tmp = dest.with_file_name(format!(".{name}.florence-tmp"));
        remove_dir(&tmp)?;
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        self.copy_model_files(&tmp)?;
        let weights = self
            .names
            .iter()
            .map(|n| {
                let t = params
                    .get(n)
                    .ok_or_else(|| Error::internal(format!("{n} is in the input's weights but not in the model")))?;
                Ok((n.clone(), t.to_dtype(DType::F32)?))
            })
            .collect::<Result<Vec<_>>>()?;
        save::write_safetensors(&tmp.join(WEIGHTS), &save::in_layout(self.layout, weights)?)?;
        extra(&tmp)?;
        if dest.exists() {
            let old = dest.with_file_name(format!(".{name}.florence-old"));
            remove_dir(&old)?;
            std::fs::rename(dest, &old).map_err(|e| Error::io(dest, e))?;
            remove_dir(&old)?;
        }
        std::fs::rename(&tmp, dest).map_err(|e| Error::io(dest, e))
    }

    /// Copies every file of the model folder but weights and training state (symbolic links,
    /// as in the hub's cache, are followed).
    fn copy_model_files(&self, to: &Path) -> Result<()> {
        let entries = std::fs::read_dir(&self.model_dir).map_err(|e| Error::io(&self.model_dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&self.model_dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if !path.is_file() || !is_model_file(&name) {
                continue;
            }
            std::fs::copy(&path, to.join(&name)).map_err(|e| Error::io(&path, e))?;
        }
        Ok(())
    }
}

/// Whether a model folder's file named `name` goes into checkpoints: not weights (they are
/// written anew), not a training state, not hidden.
fn is_model_file(name: &str) -> bool {
    const WEIGHT_EXTENSIONS: &[&str] = &[".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json", ".onnx"];
    !name.starts_with('.') && !WEIGHT_EXTENSIONS.iter().any(|e| name.ends_with(e)) && name != STATE && name != METRICS
}

/// Removes `dir` and what it holds, if it exists.
pub fn remove_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(dir, e)),
        _ => Ok(()),
    }
}

/// The folder of the checkpoint after `step` in the run folder `output`.
pub fn checkpoint_dir(output: &Path, step: usize) -> PathBuf {
    output.join(format!("checkpoint-{step}"))
}

/// The steps of the `checkpoint-STEP` folders in `output`, ascending.
pub fn checkpoints(output: &Path) -> Result<Vec<usize>> {
    let mut steps = Vec::new();
    let entries = match std::fs::read_dir(output) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(steps),
        Err(e) => return Err(Error::io(output, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(output, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = name.strip_prefix("checkpoint-").and_then(|s| s.parse().ok()) {
            if entry.path().is_dir() {
                steps.push(step);
            }
        }
    }
    steps.sort_unstable();
    Ok(steps)
}

/// Removes the oldest checkpoints of `output` beyond the newest `keep`.
pub fn rotate(output: &Path, keep: usize) -> Result<()> {
    let steps = checkpoints(output)?;
    for &step in &steps[..steps.len().saturating_sub(keep)] {
        remove_dir(&checkpoint_dir(output, step))?;
    }
    Ok(())
}

/// `metrics.jsonl`: one JSON object per line, each flushed as it is written.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// Starts `path` with the lines of `earlier` (a checkpoint's metrics, when resuming; they
    /// replace whatever `path` held), then appends.
    pub fn create(path: &Path, earlier: Option<&Path>) -> Result<Self> {
        let start = match earlier {
            Some(e) if e.exists() => std::fs::read(e).map_err(|err| Error::io(e, err))?,
            _ => Vec::new(),
        };
        florence::pipeline::write_atomic(path, &start).map_err(|e| Error::io(path, e))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Appends one line.
    pub fn write(&mut self, line: &serde_json::Value) -> Result<()> {
        writeln!(self.file, "{line}")
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_files_exclude_weights_and_state() {
        for kept in [
            "config.json",
            "tokenizer.json",
            "preprocessor_config.json",
            "modeling_florence2.py",
        ] {
            assert!(is_model_file(kept), "{kept}");
        }
        for left in [
            "model.safetensors",
            "pytorch_model.bin",
            "model.safetensors.index.json",
            "trainer_state.json",
            "metrics.jsonl",
            ".gitattributes",
        ] {
            assert!(!is_model_file(left), "{left}");
        }
    }

    #[test]
    fn rotation_keeps_the_newest() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io(Path::new("tmp"), e))?;
        for step in [10, 2, 30, 20] {
            std::fs::create_dir(checkpoint_dir(dir.path(), step)).unwrap();
        }
        std::fs::create_dir(dir.path().join("final")).unwrap();
        rotate(dir.path(), 2)?;
        assert_eq!(checkpoints(dir.path())?, vec![20, 30]);
        assert!(dir.path().join("final").is_dir());
        Ok(())
    }
}
