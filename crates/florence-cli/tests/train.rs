//! The `florence train` command line: a run on the training fixtures writes the contract's files,
//! and a bad config stops with one line naming the key and the file.

mod common;

use common::florence;

#[test]
fn an_unknown_key_stops_before_any_work_naming_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, "model_name: ./model\ntask_prompt: <CAPTION>\ndataset_path: ./data\nepochs: 1\noptimizer: CAME\nlearning_rate: 1e-5\ntrain_batch_size: 1\nlearning_rat: 3\n").unwrap();
    let out = florence(&[
        "train",
        config.to_str().unwrap(),
        "--output",
        dir.path().join("out").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with(&format!("error: {}", config.display())), "{err}");
    assert!(err.contains("learning_rat"), "{err}");
    assert!(!dir.path().join("out").exists());
}

#[test]
fn a_run_writes_metrics_checkpoints_and_the_final_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = common::fixture_run(dir.path());
    let out_dir = dir.path().join("run");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "{err}");
    assert!(err.contains("ignored \"wandb_project\""), "{err}");
    let metrics = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
    let steps: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let train: Vec<_> = steps.iter().filter(|l| l.get("grad_norm").is_some()).collect();
    assert_eq!(train.len(), 2);
    for key in ["step", "epoch", "lr", "loss", "grad_norm"] {
        assert!(train[1].get(key).is_some(), "{key}");
    }
    assert!(steps.iter().any(|l| l.get("eval_loss").is_some()));
    // save_total_limit 1 keeps the newest checkpoint only.
    assert!(!out_dir.join("checkpoint-1").exists());
    assert!(out_dir.join("checkpoint-2/model.safetensors").is_file());
    assert!(out_dir.join("final/tokenizer.json").is_file());
    assert_eq!(
        std::fs::read_to_string(out_dir.join("eval_image_paths.txt"))
            .unwrap()
            .lines()
            .count(),
        2
    );
}

/// Without the `cuda` feature, asking for a GPU stops with one line that says how to get one.
#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_without_the_feature_says_how_to_build_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = common::fixture_run_with(dir.path(), &["--device", "cuda"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("built without CUDA") && err.contains("tools/cuda/build.sh"),
        "{err}"
    );
    assert!(!dir.path().join("run").exists());
}
