//! Discovery, split, epoch orders and windows against tools/reference/data_ref.py's fixtures
//! (train_data.py on the committed tiny dataset), with the real Florence-2 tokenizer; the
//! prefetcher against the processor run directly.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use florence::preprocess::load_image_with;
use florence::{FlorenceTokenizer, ImageProcessor, PreprocessorConfig};
use florence_train::data::{self, DECODE};
use florence_train::TrainConfig;
use serde_json::{json, Value};

fn set() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data/set")
}

fn tokenizer() -> FlorenceTokenizer {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/testdata/tokenizer-florence");
    assert!(
        dir.is_dir(),
        "{} is missing: the data tests need the shared tokenizer",
        dir.display()
    );
    FlorenceTokenizer::from_dir(&dir).unwrap()
}

/// A path relative to the dataset folder, as the fixture writes it.
fn rel(p: impl AsRef<Path>) -> String {
    p.as_ref().strip_prefix(set()).unwrap().to_string_lossy().into_owned()
}

fn check(config: &str) {
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(set().join("..").join(config.replace(".yaml", ".expected.json"))).unwrap(),
    )
    .unwrap();
    let (cfg, _) = TrainConfig::from_file(&set().join(config)).unwrap();
    let max = expected["max_label_len"].as_u64().unwrap() as usize;
    let found = data::discover(&cfg, &tokenizer(), max).unwrap();
    let samples: Vec<Value> = found
        .samples
        .iter()
        .map(|s| {
            let (file, record) = s
                .caption_file
                .split_once('#')
                .map_or((&*s.caption_file, None), |(f, r)| (f, Some(r)));
            let caption_file = rel(file) + &record.map_or(String::new(), |r| format!("#{r}"));
            json!({"prompt": s.prompt, "image": rel(&s.image), "caption_file": caption_file, "caption": s.caption,
                   "prompt_ids": s.prompt_ids, "label_ids": s.label_ids})
        })
        .collect();
    assert_eq!(Value::from(samples), expected["samples"], "{config}: samples");
    let dropped: Vec<Value> = found.dropped_long.iter().map(|(f, n)| json!([rel(f), n])).collect();
    assert_eq!(Value::from(dropped), expected["dropped_long"], "{config}: dropped");
    let no_image: Vec<String> = found.no_image.iter().map(rel).collect();
    assert_eq!(json!(no_image), expected["no_image"], "{config}: no image");
    let unreadable: Vec<String> = found.unreadable.iter().map(|(p, _)| rel(p)).collect();
    assert_eq!(json!(unreadable), expected["unreadable"], "{config}: unreadable");
    for (path, why) in &found.unreadable {
        assert!(
            why.contains(&path.display().to_string()),
            "{why:?} should name {}",
            path.display()
        );
    }

    let split = data::split(found.samples.len(), &cfg);
    assert_eq!(
        json!({"eval": split.eval, "train": split.train}),
        expected["split"],
        "{config}: split"
    );
    let orders: Vec<Vec<usize>> = (0..cfg.epochs)
        .map(|e| data::epoch_order(&split.train, &cfg, e))
        .collect();
    assert_eq!(json!(orders), expected["epoch_orders"], "{config}: epoch orders");
    let (b, a) = (cfg.train_batch_size, cfg.gradient_accumulation_steps);
    let windows: Vec<_> = orders.iter().map(|o| data::windows(o, b, a)).collect();
    assert_eq!(json!(windows), expected["windows"], "{config}: windows");
    assert_eq!(data::steps_per_epoch(split.train.len(), b, a), windows[0].len());
}

/// Forms (a) and (b): task_prompt + dataset_path, then a mapping with free and input prompts.
#[test]
fn discovery_and_order_match_the_reference_forms_a_b() {
    check("form_ab.yaml");
}

/// Form (c) with ShareGPT .json and .jsonl records, a truncated and a missing image.
#[test]
fn discovery_and_order_match_the_reference_form_c_sharegpt() {
    check("form_c.yaml");
}

#[test]
fn prompts_expand_as_florence2_processor() {
    assert_eq!(
        data::construct_prompt("<OD>").unwrap(),
        "Locate the objects with category name in the image."
    );
    assert_eq!(
        data::construct_prompt("<REGION_TO_OCR> <loc_1> ").unwrap(),
        "What text is in the region <loc_1>?"
    );
    assert_eq!(data::construct_prompt("free <b>").unwrap(), "free <b>");
    assert_eq!(
        data::construct_prompt("<CAPTION> please").unwrap_err().to_string(),
        "task token <CAPTION> should be the only content in the prompt \"<CAPTION> please\""
    );
    assert_eq!(data::clean_caption("\u{1c} a   b \u{3000}"), "a  b");
}

/// The prefetcher yields the micro-batches in order, with the processor's pixels, and stops
/// with an error naming a file that became unreadable.
#[test]
fn prefetcher_yields_processor_pixels_in_order_and_names_bad_files() {
    let config = PreprocessorConfig {
        width: 16,
        height: 12,
        ..PreprocessorConfig::default()
    };
    let processor = ImageProcessor::new(config);
    let images: Arc<[PathBuf]> = ["a/img1.png", "a/b.jpg", "c/c2.png", "a/bad.png"]
        .map(|p| set().join(p))
        .into();
    let batches = vec![vec![2, 0], vec![1], vec![3, 0]];
    let got: Vec<_> = data::Prefetcher::new(images.clone(), batches, processor.clone(), 1, 2).collect();
    assert_eq!(got.len(), 3);
    for (result, want) in got[..2].iter().zip([vec![2, 0], vec![1]]) {
        let (indices, pixels) = result.as_ref().unwrap();
        assert_eq!(*indices, want);
        assert_eq!(pixels.dims(), [want.len(), 3, 12, 16]);
        let expected: Vec<f32> = want
            .iter()
            .flat_map(|&i| processor.pixel_values(&load_image_with(&images[i], &DECODE).unwrap()))
            .collect();
        assert_eq!(pixels.flatten_all().unwrap().to_vec1::<f32>().unwrap(), expected);
    }
    let err = got[2].as_ref().unwrap_err().to_string();
    assert!(err.starts_with(&format!("{}: ", images[3].display())), "{err}");
}

#[test]
fn eval_list_names_the_eval_images() {
    let (cfg, _) = TrainConfig::from_file(&set().join("form_c.yaml")).unwrap();
    let found = data::discover(&cfg, &tokenizer(), 1024).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("eval_image_paths.txt");
    data::write_eval_list(&path, &found.samples, &[4, 0]).unwrap();
    let want = format!(
        "{}\n{}\n",
        found.samples[4].image.display(),
        found.samples[0].image.display()
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), want);
    let manifest = std::fs::read_to_string(path.with_extension("jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = manifest.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    for (line, i) in lines.iter().zip([4, 0]) {
        let s = &found.samples[i];
        assert_eq!(line["image"], s.image.to_str().unwrap());
        assert_eq!(line["prompt"], s.prompt.as_str());
        assert_eq!(line["references"], serde_json::json!([s.caption]));
    }
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        2,
        "no temporary files left"
    );
}

/// A malformed ShareGPT record or a task token with extra text stops discovery, naming the file.
#[test]
fn malformed_records_stop_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |records: &str| {
        std::fs::write(tmp.path().join("s.jsonl"), records).unwrap();
        let config = "model_name: m/n\nepochs: 1\noptimizer: CAME\nlearning_rate: 1\ntrain_batch_size: 1\ndataset_config: [s.jsonl]\n";
        std::fs::write(tmp.path().join("r.yaml"), config).unwrap();
        let (cfg, _) = TrainConfig::from_file(&tmp.path().join("r.yaml")).unwrap();
        data::discover(&cfg, &tokenizer(), 1024).unwrap_err().to_string()
    };
    let file = tmp.path().join("s.jsonl").display().to_string();
    let no_gpt = r#"{"image": "x.png", "conversations": [{"from": "human", "value": "<CAPTION>"}]}"#;
    assert_eq!(
        run(no_gpt),
        format!("{file}: record 0: no \"gpt\" turn in \"conversations\"")
    );
    assert!(run("{\n").starts_with(&format!("{file}: line 1: ")));
    let extra = r#"{"image": "x.png", "conversations": [{"from": "human", "value": "<OD> cats"}, {"from": "gpt", "value": "c"}]}"#;
    assert_eq!(
        run(extra),
        format!("{file}#0: task token <OD> should be the only content in the prompt \"<OD> cats\"")
    );
}
