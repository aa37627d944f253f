//! What the command-line tests share: running the binary, and a short fine-tuning run.

#![allow(dead_code)] // each test binary uses its own part

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn florence(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_florence"))
        .args(args)
        .output()
        .unwrap()
}

pub fn train_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../florence-train/tests/fixtures/train")
}

/// Copies the training fixtures' model (with the shared tokenizer) to `root/model` and fine-tunes
/// it for 2 steps into `root/run`, holding out 2 images; returns `florence train`'s output.
pub fn fixture_run(root: &Path) -> Output {
    fixture_run_with(root, &[])
}

/// [`fixture_run`] with more flags for `florence train`.
pub fn fixture_run_with(root: &Path, flags: &[&str]) -> Output {
    std::fs::create_dir_all(root.join("model")).unwrap();
    for e in std::fs::read_dir(train_fixtures().join("model")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), root.join("model").join(e.file_name())).unwrap();
    }
    let tokenizer =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/testdata/tokenizer-florence/tokenizer.json");
    std::fs::copy(tokenizer, root.join("model/tokenizer.json")).unwrap();
    let config = root.join("config.json");
    let data = train_fixtures().join("data");
    std::fs::write(
        &config,
        serde_json::json!({
            "model_name": "model", "task_prompt": "<CAPTION>", "dataset_path": data,
            "epochs": 1, "optimizer": "CAME", "learning_rate": 1e-4, "lr_scheduler": "REX",
            "train_batch_size": 2, "gradient_accumulation_steps": 2, "save_steps": 1,
            "save_total_limit": 1, "eval_split": 2, "wandb_project": "x"
        })
        .to_string(),
    )
    .unwrap();
    let out_dir = root.join("run");
    let mut args = vec![
        "train",
        config.to_str().unwrap(),
        "--output",
        out_dir.to_str().unwrap(),
        "--max-steps",
        "2",
        "-q",
    ];
    args.extend_from_slice(flags);
    florence(&args)
}
