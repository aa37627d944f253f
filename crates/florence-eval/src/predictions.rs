//! A model's captions, in `florence caption --format jsonl`'s shape, read back for scoring.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use florence::Error;
use serde::Deserialize;

/// One image's caption.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub caption: String,
    /// Tokens generated after the decoder start token (`</s>` included), when recorded.
    pub new_tokens: Option<usize>,
    /// Whether generation stopped at `max_new_tokens`, when that can be told.
    pub cut: Option<bool>,
}

/// A model's captions by image.
#[derive(Debug, Default)]
pub struct Predictions {
    by_path: HashMap<PathBuf, Prediction>,
}

#[derive(Deserialize)]
struct Line {
    path: PathBuf,
    text: Option<String>,
    #[serde(default)]
    ids: Option<Vec<u32>>,
    #[serde(default)]
    generation: Option<Generation>,
}

#[derive(Deserialize)]
struct Generation {
    max_new_tokens: Option<usize>,
}

impl Predictions {
    /// Reads a JSONL file of `{"path", "text", "ids"?, "generation"?: {"max_new_tokens"}}` lines.
    pub fn read(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut out = Self::default();
        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let bad = |m: &str| Error::usage(format!("{}:{}: {m}", path.display(), n + 1));
            let line: Line = serde_json::from_str(line).map_err(|e| {
                bad(&format!(
                    "{e}; expected a `florence caption --format jsonl` record with path and text"
                ))
            })?;
            let caption = line.text.ok_or_else(|| bad("no \"text\": score caption tasks only"))?;
            let new_tokens = line.ids.as_ref().map(|ids| ids.len().saturating_sub(1));
            let limit = line.generation.and_then(|g| g.max_new_tokens);
            let cut = new_tokens.zip(limit).map(|(n, max)| n >= max);
            out.by_path.insert(
                canonical(&line.path),
                Prediction {
                    caption,
                    new_tokens,
                    cut,
                },
            );
        }
        Ok(out)
    }

    /// Records a caption for `image`.
    pub fn insert(&mut self, image: &Path, prediction: Prediction) {
        self.by_path.insert(canonical(image), prediction);
    }

    /// The caption of `image`, matched by its absolute path.
    pub fn get(&self, image: &Path) -> Option<&Prediction> {
        self.by_path.get(&canonical(image))
    }

    pub fn len(&self) -> usize {
        self.by_path.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_path.is_empty()
    }
}

/// The same file named two ways (`./a.jpg`, `/data/a.jpg`) matches.
fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}
