//! Resolving `--model`: a local folder, or a Hugging Face model id looked up in the standard
//! cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`, laid out as
//! `models--ORG--NAME/snapshots/REVISION/`) and downloaded there when missing and online.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The model captioning uses when none is given: the detailed-caption fine-tune of
/// Florence-2-base this project grew out of.
pub const DEFAULT_MODEL: &str = "PJMixers-Images/Florence-2-base-gemini-2.0-flash-thinking-exp-1219-v0.2";

/// Files a model folder may need besides its weights; missing optional ones are skipped.
const REQUIRED: &[&str] = &["config.json"];
const OPTIONAL: &[&str] = &[
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
];

/// The Hugging Face hub cache folder.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("HF_HUB_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("HF_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(d).join("hub");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    home.join(".cache").join("huggingface").join("hub")
}

/// Whether `HF_HUB_OFFLINE` asks for offline mode.
pub fn offline_from_env() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "yes" | "ON" | "on"))
}

fn looks_like_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) && !p.starts_with('.')
        })
}

/// The cached snapshot of `repo_id` at `refs/main`, if it holds a config and weights.
pub fn cached_snapshot(cache: &Path, repo_id: &str) -> Option<PathBuf> {
    let repo = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    let rev = std::fs::read_to_string(repo.join("refs").join("main")).ok()?;
    let snap = repo.join("snapshots").join(rev.trim());
    let complete = snap.join("config.json").is_file() && crate::checkpoint::WeightFiles::discover(&snap).is_ok();
    complete.then_some(snap)
}

/// Resolves `model` to a local folder: an existing folder as is, a hub id from the cache, or
/// (unless `offline`) by downloading it into the cache, with a progress bar when `progress`.
pub fn resolve(model: &str, offline: bool, progress: bool) -> Result<PathBuf> {
    let path = Path::new(model);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if !looks_like_repo_id(model) {
        return Err(Error::checkpoint(
            path,
            "is not a directory nor a Hugging Face model id (ORG/NAME)",
        ));
    }
    let cache = cache_dir();
    if let Some(snap) = cached_snapshot(&cache, model) {
        return Ok(snap);
    }
    if offline {
        return Err(Error::Usage(format!(
            "model {model} is not in the Hugging Face cache ({}) and offline mode is on (--offline or \
             HF_HUB_OFFLINE=1); download it on a machine with internet access with \
             `huggingface-cli download {model}` and copy the cache, or pass --model DIR",
            cache.display()
        )));
    }
    download(model, &cache, progress)
}

fn download(model: &str, cache: &Path, progress: bool) -> Result<PathBuf> {
    let hub_err = |e: hf_hub::api::sync::ApiError| {
        Error::Usage(format!(
            "cannot download {model} from the Hugging Face hub: {e}; check the id and your connection, \
             or pass --model DIR"
        ))
    };
    let api = hf_hub::api::sync::ApiBuilder::new()
        .with_cache_dir(cache.to_path_buf())
        .with_progress(progress)
        .build()
        .map_err(hub_err)?;
    let repo = api.model(model.to_string());
    let mut snapshot = None;
    for f in REQUIRED {
        let p = repo.get(f).map_err(hub_err)?;
        snapshot = p.parent().map(Path::to_path_buf);
    }
    for f in OPTIONAL {
        let _ = repo.get(f); // absent in some repositories
    }
    if let Ok(index) = repo.get("model.safetensors.index.json") {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::checkpoint(&index, format!("not valid JSON: {e}")))?;
        let mut shards: Vec<&str> = json["weight_map"]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(_, v)| v.as_str())
            .collect();
        shards.sort();
        shards.dedup();
        for s in shards {
            repo.get(s).map_err(hub_err)?;
        }
    } else if repo.get("model.safetensors").is_err() {
        repo.get("pytorch_model.bin").map_err(hub_err)?;
    }
    snapshot.ok_or_else(|| Error::Usage(format!("{model}: the download left no files")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_and_paths_are_told_apart() {
        assert!(looks_like_repo_id("microsoft/Florence-2-base"));
        assert!(looks_like_repo_id(DEFAULT_MODEL));
        assert!(!looks_like_repo_id("./models/x"));
        assert!(!looks_like_repo_id("/abs/path"));
        assert!(!looks_like_repo_id("models"));
        assert!(!looks_like_repo_id("a/b/c"));
    }
}
