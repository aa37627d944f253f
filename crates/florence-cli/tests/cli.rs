//! The `florence caption` command-line contract, end to end on the reference fixtures: JSONL
//! output equal to transformers' ids and strings, batching, and one-line errors.

#[path = "../../florence/tests/common/mod.rs"]
mod common;

use std::process::{Command, Output};

use serde_json::Value;

fn florence(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_florence"))
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn jsonl(o: &Output) -> Vec<Value> {
    assert!(o.status.success(), "florence failed: {}", stderr(o));
    String::from_utf8(o.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Every single-image case the CLI flags can express gives transformers' exact output.
#[test]
fn jsonl_output_equals_the_reference() {
    let mut checked = 0;
    for name in common::model_names() {
        let dir = common::model_dir(&name);
        let model = dir.path().to_str().unwrap();
        for case in common::cases(&name)["cases"].as_array().unwrap() {
            let g = &case["generation"];
            if case["images"].as_array().unwrap().len() != 1
                || g.get("length_penalty").is_some()
                || g["early_stopping"] == false
            {
                continue;
            }
            let image = common::image(case["images"][0].as_str().unwrap());
            let num = |k: &str| g[k].as_u64().map(|v| v.to_string());
            let mut args = vec![
                "caption".to_string(),
                "--model".into(),
                model.into(),
                "--task".into(),
                case["task"].as_str().unwrap().into(),
                "--num-beams".into(),
                num("num_beams").unwrap(),
                "--max-new-tokens".into(),
                num("max_new_tokens").unwrap(),
                "--threads".into(),
                "2".into(),
                "--format".into(),
                "jsonl".into(),
            ];
            if let Some(m) = num("min_new_tokens") {
                args.extend(["--min-new-tokens".into(), m]);
            }
            if let Some(t) = case["text_input"].as_str() {
                args.extend(["--text-input".into(), t.into()]);
            }
            args.push(image.to_str().unwrap().into());
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let lines = jsonl(&florence(&args));
            assert_eq!(lines.len(), 1);
            let line = &lines[0];
            assert_eq!(line["raw"], case["raw"][0], "{name} {}: raw", case["task"]);
            assert_eq!(line["ids"], case["ids"][0], "{name} {}: ids", case["task"]);
            assert_eq!(line["task"], case["task"]);
            assert_eq!(line["path"], image.to_str().unwrap());
            assert!(line.get("text").is_some() || line.get("result").is_some());
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} cases checked");
}

/// Batched runs give each image the same output as running it alone, in input order.
#[test]
fn batches_equal_single_runs() {
    let dir = common::model_dir("remote_f32");
    let model = dir.path().to_str().unwrap();
    let images: Vec<String> = [
        "noise_rgb.png",
        "gradient_rgba.png",
        "gray16.png",
        "palette.png",
        "gray8.png",
    ]
    .iter()
    .map(|i| common::image(i).to_str().unwrap().to_string())
    .collect();
    let base = [
        "caption",
        "--model",
        model,
        "--max-new-tokens",
        "12",
        "--format",
        "jsonl",
    ];
    let run = |batch: &str, imgs: &[String]| {
        let mut args: Vec<&str> = base.to_vec();
        args.extend(["--batch-size", batch]);
        args.extend(imgs.iter().map(String::as_str));
        jsonl(&florence(&args))
    };
    let singles: Vec<Value> = images.iter().flat_map(|i| run("1", std::slice::from_ref(i))).collect();
    for batch in ["2", "4"] {
        assert_eq!(run(batch, &images), singles, "--batch-size {batch}");
    }
}

#[test]
fn bad_images_are_reported_and_skipped() {
    let dir = common::model_dir("native_f32");
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("not-an-image.jpg");
    std::fs::write(&bad, "hello").unwrap();
    let empty = tmp.path().join("empty.png");
    std::fs::write(&empty, "").unwrap();
    let good = common::image("gray8.png");
    let o = florence(&[
        "caption",
        "--model",
        dir.path().to_str().unwrap(),
        "--max-new-tokens",
        "4",
        "--format",
        "jsonl",
        bad.to_str().unwrap(),
        empty.to_str().unwrap(),
        good.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "a failed image makes the exit code 1");
    let err = stderr(&o);
    assert!(
        err.contains("not-an-image.jpg: cannot decode image: not a recognized image format"),
        "{err}"
    );
    assert!(
        err.contains("empty.png: cannot decode image: the file is empty"),
        "{err}"
    );
    let out = String::from_utf8(o.stdout).unwrap();
    assert_eq!(out.lines().count(), 1, "the good image is still captioned");
    assert!(out.contains("gray8.png"));
}

#[test]
fn bad_models_give_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let img = common::image("gray8.png");
    let run = |model: &std::path::Path| {
        let o = florence(&["caption", "--model", model.to_str().unwrap(), img.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(2));
        let err = stderr(&o);
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(!err.contains("panicked"), "{err}");
        err
    };
    assert!(run(&tmp.path().join("missing")).contains("is not a directory"));
    assert!(run(tmp.path()).contains("has no config.json"));
    std::fs::write(tmp.path().join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
    let e = run(tmp.path());
    assert!(e.contains("config.json") && e.contains("not a Florence-2 model"), "{e}");

    // A real config without weights.
    let dir = common::model_dir("remote_f32");
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    assert!(run(dir.path()).contains("no model weights found"));
    // Truncated weights.
    let dir = common::model_dir("remote_f32");
    let w = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    assert!(run(dir.path()).contains("model.safetensors: cannot read safetensors"));
    // Weights of another shape than the config says.
    let dir = common::model_dir("remote_f32");
    std::fs::copy(
        common::fixtures().join("models/native_f32/model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    assert!(run(dir.path()).contains("does not match config.json"));
}

#[test]
fn task_input_is_required_where_needed() {
    let dir = common::model_dir("native_f32");
    let img = common::image("gray8.png");
    let o = florence(&[
        "caption",
        "--model",
        dir.path().to_str().unwrap(),
        "--task",
        "<REGION_TO_CATEGORY>",
        img.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("needs a text input"));
}

/// Hub ids resolve through the standard cache layout; offline, a missing model is a clear error.
#[test]
fn hub_ids_resolve_from_the_cache() {
    let model = common::model_dir("native_f32");
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--tiny-org--florence-test");
    let snap = repo.join("snapshots").join("0123abcd");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    for e in std::fs::read_dir(model.path()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), snap.join(e.file_name())).unwrap();
    }
    let img = common::image("gray8.png");
    let run = |model: &str, env: &[(&str, &str)]| {
        Command::new(env!("CARGO_BIN_EXE_florence"))
            .args([
                "caption",
                "--model",
                model,
                "--max-new-tokens",
                "5",
                "--format",
                "jsonl",
                img.to_str().unwrap(),
            ])
            .env("HF_HUB_CACHE", cache.path())
            .env_remove("HF_HUB_OFFLINE")
            .envs(env.iter().copied())
            .output()
            .unwrap()
    };
    let by_dir = jsonl(&run(model.path().to_str().unwrap(), &[]));
    let by_id = jsonl(&run("tiny-org/florence-test", &[("HF_HUB_OFFLINE", "1")]));
    assert_eq!(by_id[0]["ids"], by_dir[0]["ids"]);
    assert_eq!(by_id[0]["model"], "tiny-org/florence-test");

    let o = run("tiny-org/not-downloaded", &[("HF_HUB_OFFLINE", "1")]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(
        err.contains("tiny-org/not-downloaded is not in the Hugging Face cache"),
        "{err}"
    );
    assert!(
        err.contains("huggingface-cli download tiny-org/not-downloaded"),
        "{err}"
    );
}

/// `florence bench` with nothing to time is a one-line error, not a panic (the median of no
/// runs used to index an empty list).
#[test]
fn bench_refuses_zero_runs() {
    let dir = common::model_dir("native_f32");
    let image = common::image("gray8.png");
    for flag in ["--runs", "--batch-size", "--new-tokens"] {
        let o = florence(&[
            "bench",
            "--model",
            dir.path().to_str().unwrap(),
            flag,
            "0",
            image.to_str().unwrap(),
        ]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{flag}: {err}");
        assert_eq!(err.trim(), format!("error: {flag} must be at least 1"));
    }
}

/// `--device`: a GPU asked of a build without CUDA, a GPU asked of `serve` (its batching needs
/// the CPU kernels), and int8 weights on a GPU are one-line errors before any work; `auto` on a
/// build without CUDA runs on the CPU and gives the CPU's ids.
#[test]
fn devices_are_checked_before_any_work() {
    let dir = common::model_dir("native_f32");
    let model = dir.path().to_str().unwrap();
    let image = common::image("gray8.png");
    let image = image.to_str().unwrap();
    let caption = |extra: &[&str]| {
        let mut args = vec![
            "caption",
            "--model",
            model,
            "--max-new-tokens",
            "6",
            "--format",
            "jsonl",
        ];
        args.extend_from_slice(extra);
        args.push(image);
        florence(&args)
    };
    if !cfg!(feature = "cuda") {
        for (command, expected) in [
            (
                caption(&["--device", "cuda"]),
                "--device cuda:0: this florence was built without CUDA",
            ),
            (
                caption(&["--device", "cuda:1", "--quantize", "q8"]),
                "--device cuda:1: this florence was built without CUDA",
            ),
        ] {
            let err = stderr(&command);
            assert_eq!(command.status.code(), Some(2), "{err}");
            assert!(err.starts_with(&format!("error: {expected}")), "{err}");
            assert_eq!(err.trim().lines().count(), 1, "{err}");
        }
        let auto = jsonl(&caption(&["--device", "auto"]));
        let cpu = jsonl(&caption(&["--device", "cpu"]));
        assert_eq!(auto[0]["ids"], cpu[0]["ids"]);
    }
    let o = florence(&["serve", "--model", model, "--device", "cuda:0", "--port", "0"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--device cuda:0: florence serve runs on the CPU for now"),
        "{err}"
    );
    let o = caption(&["--device", "gpu"]);
    assert!(
        stderr(&o).contains("expected cpu, cuda, cuda:N or auto"),
        "{}",
        stderr(&o)
    );
}
