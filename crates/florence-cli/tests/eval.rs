//! `florence eval`: after a fine-tune, the base model and the run's final model caption the
//! held-out images and the report holds the table, the metrics and the loss plot; captions made
//! earlier are scored without a model; bad invocations stop with one line.

mod common;

use std::path::Path;

use common::florence;
use florence_eval::metrics::{self, Scored};
use serde_json::Value;

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn after_a_fine_tune_the_report_compares_base_and_final_with_the_loss_plot() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let trained = common::fixture_run(root);
    assert!(trained.status.success(), "{}", String::from_utf8_lossy(&trained.stderr));
    let report = root.join("report");
    let references = root.join("run/eval_image_paths.jsonl");
    let out = florence(&[
        "eval",
        "--references",
        references.to_str().unwrap(),
        "--model",
        root.join("model").to_str().unwrap(),
        "--model",
        root.join("run/final").to_str().unwrap(),
        "--metrics-from",
        root.join("run").to_str().unwrap(),
        "--output",
        report.to_str().unwrap(),
        "--num-beams",
        "1",
        "--max-new-tokens",
        "8",
        "-q",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let metrics = read_json(&report.join("metrics.json"));
    let names: Vec<&String> = metrics["models"].as_object().unwrap().keys().collect();
    assert_eq!(names, ["model", "run/final"]);
    assert_eq!(metrics["images"], 2);
    // The scores in the report are the metrics of the captions the models wrote.
    let refs: Vec<Value> = std::fs::read_to_string(&references)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for (name, file) in [("model", "model.jsonl"), ("run/final", "run_final.jsonl")] {
        let lines: Vec<Value> = std::fs::read_to_string(report.join("predictions").join(file))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{name}");
        let captions: Vec<String> = lines.iter().map(|l| l["text"].as_str().unwrap().to_string()).collect();
        let truth: Vec<Vec<String>> = refs
            .iter()
            .map(|r| vec![r["references"][0].as_str().unwrap().to_string()])
            .collect();
        let scored: Vec<Scored> = captions
            .iter()
            .zip(&truth)
            .map(|(p, r)| Scored {
                prediction: p,
                references: r,
            })
            .collect();
        let (want, _) = metrics::score(&scored);
        let got = &metrics["models"][name];
        assert_eq!(got["sacrebleu"].as_f64().unwrap(), want.sacrebleu, "{name}");
        assert_eq!(got["cider_d"].as_f64().unwrap(), want.cider_d, "{name}");
        // Stopped at the limit: 8 new tokens after the decoder start token.
        let cut = lines.iter().filter(|l| l["ids"].as_array().unwrap().len() > 8).count();
        assert_eq!(
            got["lengths"]["cut_share"].as_f64().unwrap(),
            cut as f64 / 2.0,
            "{name}"
        );
        assert!(
            lines[0]["ids"].as_array().unwrap().len() <= 9,
            "max_new_tokens 8 plus the start token"
        );
    }

    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    assert!(md.contains("| image | ground truth | model | run/final |"), "{md}");
    assert!(md.contains("![Training and validation loss](loss.png)"), "{md}");
    let rows = md.lines().filter(|l| l.starts_with("| ![")).count();
    assert_eq!(rows, 2, "{md}");
    let html = std::fs::read_to_string(report.join("report.html")).unwrap();
    assert_eq!(html.matches("src=\"data:image/jpeg;base64,").count(), 2);
    assert_eq!(html.matches("src=\"data:image/png;base64,").count(), 1);
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no external requests"
    );
    let png = image::open(report.join("loss.png")).unwrap();
    assert_eq!((png.width(), png.height()), (900, 500));
    assert!(std::fs::read_to_string(report.join("loss.svg"))
        .unwrap()
        .starts_with("<svg"));

    // A second run into the same folder needs --overwrite.
    let again = florence(&[
        "eval",
        "--references",
        references.to_str().unwrap(),
        "--predictions",
        &format!("base={}", report.join("predictions/model.jsonl").display()),
        "--output",
        report.to_str().unwrap(),
    ]);
    assert_eq!(again.status.code(), Some(2));
    let err = String::from_utf8(again.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--overwrite"), "{err}");
}

#[test]
fn earlier_captions_are_scored_without_a_model_and_missing_ones_are_left_out() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    for name in ["a01", "a02", "a03"] {
        let src = common::train_fixtures().join("data");
        std::fs::copy(src.join(format!("{name}.png")), data.join(format!("{name}.png"))).unwrap();
        std::fs::copy(src.join(format!("{name}.txt")), data.join(format!("{name}.txt"))).unwrap();
    }
    std::fs::write(data.join("a03.txt"), "").unwrap();
    let predictions = dir.path().join("mine.jsonl");
    let lines = [
        serde_json::json!({"path": data.join("a01.png"), "text": "a red square on a white ground"}),
        serde_json::json!({"path": data.join("a02.png"), "text": "a blue circle"}),
    ];
    std::fs::write(&predictions, lines.map(|l| l.to_string()).join("\n")).unwrap();
    let report = dir.path().join("report");
    let out = florence(&[
        "eval",
        "--references",
        data.to_str().unwrap(),
        "--predictions",
        &format!("mine={}", predictions.display()),
        "--output",
        report.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let metrics = read_json(&report.join("metrics.json"));
    assert_eq!(metrics["images"], 2);
    let left_out = metrics["left_out"].as_array().unwrap();
    assert_eq!(left_out.len(), 1);
    assert!(
        left_out[0]["reason"].as_str().unwrap().contains("a03.txt is empty"),
        "{left_out:?}"
    );
    assert!(metrics["models"]["mine"]["lengths"]["tokens_mean"].is_null());
    assert!(!report.join("loss.png").exists());
}

#[test]
fn nothing_to_score_and_bad_predictions_stop_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::train_fixtures().join("data");
    let out_dir = dir.path().join("report");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--references",
            data.to_str().unwrap(),
            "--output",
            out_dir.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let out = florence(&args);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{err}");
        err
    };
    assert!(run(&[]).contains("give --model MODEL or --predictions NAME=FILE"));
    assert!(run(&["--predictions", "no-name.jsonl"]).contains("expected NAME=FILE"));
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"path\": \"a.png\"}\nnot json\n").unwrap();
    let err = run(&["--predictions", &format!("x={}", bad.display())]);
    assert!(err.contains(&format!("{}:1: no \"text\"", bad.display())), "{err}");
    assert!(!out_dir.join("metrics.json").exists());
}
