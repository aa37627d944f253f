//! The training fixtures (written by `tools/reference/train_ref.py fixtures` with PyTorch) laid
//! out for a run: the tiny model with the shared tokenizer added, the data folders, the configs.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

/// `crates/florence-train/tests/fixtures/train`.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/train")
}

/// `../shared/testdata` beside the repository; the tests need it (the tokenizer).
pub fn shared_testdata() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/testdata");
    assert!(
        dir.is_dir(),
        "{} is missing: the training tests need the shared tokenizer beside the repository",
        dir.display()
    );
    dir
}

/// A folder laid out as the fixtures' configs expect (`model/`, `data/`, `data_c/`,
/// `runs/<name>/config.yaml`), the model with `tokenizer.json` added.
pub struct Layout {
    pub dir: tempfile::TempDir,
}

impl Layout {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("florence-train-").tempdir().unwrap();
        let root = dir.path();
        copy_dir(&fixtures().join("model"), &root.join("model"));
        std::fs::copy(
            shared_testdata().join("tokenizer-florence/tokenizer.json"),
            root.join("model/tokenizer.json"),
        )
        .unwrap();
        for data in ["data", "data_c"] {
            copy_dir(&fixtures().join(data), &root.join(data));
        }
        Self { dir }
    }

    pub fn model(&self) -> PathBuf {
        self.dir.path().join("model")
    }

    /// `runs/<name>/config.yaml` copied into the layout; returns its path.
    pub fn config(&self, run: &str) -> PathBuf {
        let to = self.dir.path().join("runs").join(run);
        std::fs::create_dir_all(&to).unwrap();
        std::fs::copy(
            fixtures().join("runs").join(run).join("config.yaml"),
            to.join("config.yaml"),
        )
        .unwrap();
        to.join("config.yaml")
    }

    pub fn output(&self, name: &str) -> PathBuf {
        self.dir.path().join("out").join(name)
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// The names of the fixture runs.
pub fn runs() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixtures().join("runs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert!(
        !names.is_empty(),
        "no fixture runs: run tools/reference/train_ref.py fixtures"
    );
    names
}

pub fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

pub fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

pub fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Largest absolute element.
pub fn max_abs(t: &Tensor) -> f64 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64
}

/// L2 norm.
pub fn norm(t: &Tensor) -> f64 {
    t.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt() as f64
}

/// Whether `a` is within `rel` of `b`, relative to `b`.
pub fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs().max(1e-30)
}

/// The fixture batch's prompt or label ids (`key`), per sample, from grads/meta.json.
pub fn batch_ids(key: &str) -> Vec<Vec<u32>> {
    json(&fixtures().join("grads/meta.json"))["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            s[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}
