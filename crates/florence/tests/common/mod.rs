//! Helpers shared by the integration tests: the committed fixtures (written by
//! `tools/reference/make_fixtures.py` from transformers' outputs) and the shared test data.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use serde_json::Value;

/// The repository the tests were built in, or `FLORENCE_TEST_REPO` for a test binary carried
/// to another machine (tools/cuda/check.sh).
fn repository() -> PathBuf {
    match std::env::var_os("FLORENCE_TEST_REPO") {
        Some(dir) => PathBuf::from(dir),
        // Relative to either crate of the workspace, so the CLI tests can share these helpers.
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."),
    }
}

/// `crates/florence/tests/fixtures`.
pub fn fixtures() -> PathBuf {
    repository().join("crates/florence/tests/fixtures")
}

/// `../shared/testdata` beside the repository, or `FLORENCE_TEST_SHARED`. Panics with a clear
/// message when it is absent: the tests that need it must not pass without it.
pub fn shared_testdata() -> PathBuf {
    let dir = match std::env::var_os("FLORENCE_TEST_SHARED") {
        Some(dir) => PathBuf::from(dir),
        None => repository().join("../shared/testdata"),
    };
    assert!(
        dir.is_dir(),
        "{} is missing: parity tests need the shared test data (tokenizer, test vectors) beside the repository",
        dir.display()
    );
    dir.canonicalize().unwrap()
}

/// The fixture names, from `tests/fixtures/models/*.cases.json`.
pub fn model_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixtures().join("models"))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".cases.json").map(str::to_string)
        })
        .collect();
    names.sort();
    assert!(
        !names.is_empty(),
        "no fixture models: run tools/reference/make_fixtures.py"
    );
    names
}

pub fn cases(name: &str) -> Value {
    let p = fixtures().join("models").join(format!("{name}.cases.json"));
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

/// A complete model directory for fixture `name`: its committed config and weights plus the
/// tokenizer files the fixture names, taken from the shared test data.
pub fn model_dir(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::Builder::new().prefix("florence-fixture-").tempdir().unwrap();
    let src = fixtures().join("models").join(name);
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    let shared = shared_testdata();
    let files: &[(&str, &str)] = match cases(name)["tokenizer"].as_str().unwrap() {
        // Microsoft's tokenizer.json lacks the Florence tokens: the loader must add them.
        "microsoft-florence-2-large" => &[("microsoft-florence-2-large", "tokenizer.json")],
        "tokenizer-florence" => &[("tokenizer-florence", "tokenizer.json")],
        "vocab-merges" => &[
            ("tokenizer-florence", "vocab.json"),
            ("tokenizer-florence", "merges.txt"),
        ],
        other => panic!("unknown tokenizer kind {other}"),
    };
    for (dir, file) in files {
        std::fs::copy(shared.join(dir).join(file), tmp.path().join(file)).unwrap();
    }
    tmp
}

pub fn image(name: &str) -> PathBuf {
    fixtures().join("images").join(name)
}

/// The task and the decoded images of one generation case of `*.cases.json`.
pub fn case_inputs(case: &Value) -> (florence::Task, Vec<florence::RgbImage>) {
    let task = florence::Task::new(case["task"].as_str().unwrap(), case["text_input"].as_str()).unwrap();
    let images = case["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| florence::preprocess::load_image(&image(i.as_str().unwrap())).unwrap())
        .collect();
    (task, images)
}

/// A JSON array of token ids, as the reference scripts write them.
pub fn token_ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

/// The settings of a case's `generation` object over the model's own.
pub fn generation_config(base: &florence::GenerationConfig, g: &Value) -> florence::GenerationConfig {
    let mut cfg = base.clone();
    let u = |k: &str| g.get(k).and_then(Value::as_u64).map(|v| v as usize);
    cfg.num_beams = u("num_beams").unwrap();
    cfg.max_new_tokens = u("max_new_tokens").unwrap();
    cfg.min_new_tokens = u("min_new_tokens").unwrap_or(0);
    cfg.no_repeat_ngram_size = u("no_repeat_ngram_size").unwrap_or(0);
    cfg.forced_bos_token_id = g.get("forced_bos_token_id").and_then(Value::as_u64).map(|v| v as u32);
    cfg.forced_eos_token_id = g.get("forced_eos_token_id").and_then(Value::as_u64).map(|v| v as u32);
    cfg.length_penalty = g.get("length_penalty").and_then(Value::as_f64).unwrap_or(1.0);
    cfg.early_stopping = match g.get("early_stopping").and_then(Value::as_bool) {
        Some(true) => florence::EarlyStopping::Finished,
        _ => florence::EarlyStopping::Heuristic,
    };
    assert_eq!(g["do_sample"], Value::Bool(false));
    cfg.sampling = None;
    cfg
}

/// Runs every generation case of fixture `name` on `model` and returns how many images were
/// checked and a line for each whose ids or string differ from transformers'.
pub fn generation_failures(name: &str, model: &florence::Florence) -> (usize, Vec<String>) {
    let (mut checked, mut failures) = (0, Vec::new());
    for case in cases(name)["cases"].as_array().unwrap() {
        let (task, images) = case_inputs(case);
        let gen = generation_config(model.generation_config(), &case["generation"]);
        for (i, out) in model.run(&images, &task, &gen).unwrap().iter().enumerate() {
            checked += 1;
            let want = token_ids(&case["ids"][i]);
            if out.ids != want || out.raw != case["raw"][i].as_str().unwrap() {
                failures.push(format!(
                    "{name} {} {} image {i}:\n  ours {:?} {:?}\n  want {want:?} {}",
                    case["task"], case["generation"], out.ids, out.raw, case["raw"][i]
                ));
            }
        }
    }
    (checked, failures)
}
