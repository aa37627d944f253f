//! Finding the weight files of a model directory: one file, or the shards an index lists.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The weight files of a model directory: at least one.
#[derive(Debug, Clone)]
pub struct WeightFiles {
    /// The weight files, shards in name order.
    pub(super) files: Vec<PathBuf>,
    /// The file that lists the tensors: the index of a sharded checkpoint, else the one file.
    pub(super) source: PathBuf,
}

impl WeightFiles {
    /// Finds the weights: `model.safetensors`, a sharded safetensors index, or `pytorch_model.bin`
    /// (also sharded), preferring safetensors.
    pub fn discover(dir: &Path) -> Result<Self> {
        for index in ["model.safetensors.index.json", "pytorch_model.bin.index.json"] {
            let path = dir.join(index);
            if path.is_file() {
                return Self::from_index(dir, &path);
            }
        }
        for single in ["model.safetensors", "pytorch_model.bin"] {
            let path = dir.join(single);
            if path.is_file() {
                return Ok(Self::single(path));
            }
        }
        Err(Error::checkpoint(
            dir,
            "no model weights found (expected model.safetensors, model.safetensors.index.json or \
             pytorch_model.bin); download the complete model folder",
        ))
    }

    /// The one weight file `path`.
    pub fn single(path: PathBuf) -> Self {
        Self {
            files: vec![path.clone()],
            source: path,
        }
    }

    /// The weight files, shards in name order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// The file that lists the tensors (the index of a sharded checkpoint), for messages.
    pub fn source(&self) -> &Path {
        &self.source
    }

    fn from_index(dir: &Path, index: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::checkpoint(index, format!("not valid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::checkpoint(index, "has no \"weight_map\" object"))?;
        let mut files: Vec<PathBuf> = Vec::new();
        for shard in map.values() {
            let name = shard
                .as_str()
                .ok_or_else(|| Error::checkpoint(index, "weight_map values must be file names"))?;
            let path = dir.join(name);
            if !files.contains(&path) {
                if !path.is_file() {
                    return Err(Error::checkpoint(
                        &path,
                        format!("shard listed in {} is missing; download it", index.display()),
                    ));
                }
                files.push(path);
            }
        }
        if files.is_empty() {
            return Err(Error::checkpoint(
                index,
                "its weight_map lists no tensors; download the model folder again",
            ));
        }
        files.sort();
        Ok(Self {
            files,
            source: index.to_path_buf(),
        })
    }
}
