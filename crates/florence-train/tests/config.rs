//! `TrainConfig::from_file`: Florence-2ner's three data forms, its example configs as they are,
//! the defaults of SEMANTICS.md, notes for ignored keys and one-line errors naming key and file.

use std::path::{Path, PathBuf};

use florence_train::optim::OptimizerKind;
use florence_train::schedule::ScheduleKind;
use florence_train::{DataSource, EvalSplit, LossNormalization, ModelSource, TrainConfig};

/// A temporary folder with `a/`, `b/`, `c/<CAPTION>/` and a ShareGPT file, and a config in it.
fn setup(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    for d in ["a", "b", "c/<CAPTION>"] {
        std::fs::create_dir_all(tmp.path().join(d)).unwrap();
    }
    std::fs::write(tmp.path().join("s.jsonl"), "").unwrap();
    let file = tmp.path().join(name);
    std::fs::write(&file, text).unwrap();
    (tmp, file)
}

fn error(name: &str, text: &str) -> String {
    let (_tmp, file) = setup(name, text);
    let err = TrainConfig::from_file(&file).unwrap_err().to_string();
    let prefix = format!("{}: ", file.display());
    err.strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("{err:?} does not name {prefix:?}"))
        .to_string()
}

const REQUIRED: &str =
    "model_name: microsoft/Florence-2-base\nepochs: 1\noptimizer: CAME\nlearning_rate: 1.0e-5\ntrain_batch_size: 2\n";

/// The seed's form, as Florence-2ner's v0.1 example (JSON, `eval_split_ratio`).
#[test]
fn seed_form_json() {
    let text = r#"{"model_name": "microsoft/Florence-2-base", "task_prompt": "<CAPTION>", "dataset_path": "./a",
        "wandb_project_name": "F", "run_name": "r11", "epochs": 2, "optimizer": "CAME", "learning_rate": 3e-6,
        "lr_scheduler": "REX", "gradient_checkpointing": true, "freeze_vision": false, "freeze_language": false,
        "freeze_other": false, "train_batch_size": 8, "eval_batch_size": 8, "gradient_accumulation_steps": 4,
        "clip_grad_norm": 1, "weight_decay": 1e-2, "save_total_limit": 3, "save_steps": 10, "eval_steps": 10,
        "warmup_steps": 10, "eval_split_ratio": 0.05, "seed": 42, "filtering_processes": 128,
        "attn_implementation": "sdpa"}"#;
    let (tmp, file) = setup("run.json", text);
    let (c, notes) = TrainConfig::from_file(&file).unwrap();
    assert_eq!(c.model, ModelSource::Hub("microsoft/Florence-2-base".into()));
    assert_eq!(
        c.data,
        vec![DataSource::Captioned {
            prompt: "<CAPTION>".into(),
            dir: tmp.path().join("./a")
        }]
    );
    assert_eq!(
        (c.epochs, c.optimizer, c.lr_scheduler),
        (2, OptimizerKind::Came, ScheduleKind::Rex)
    );
    assert_eq!((c.learning_rate, c.weight_decay, c.clip_grad_norm), (3e-6, 1e-2, 1.0));
    assert_eq!(
        (c.train_batch_size, c.eval_batch_size, c.gradient_accumulation_steps),
        (8, 8, 4)
    );
    assert_eq!(
        (c.save_steps, c.eval_steps, c.save_total_limit, c.warmup_steps),
        (Some(10), Some(10), Some(3), 10)
    );
    assert_eq!(c.eval_split, EvalSplit::Fraction(0.05));
    assert!(c.gradient_checkpointing && !c.freeze_vision);
    assert_eq!(c.output_dir, tmp.path().join("checkpoints/r11"));
    let f = file.display();
    assert_eq!(
        notes,
        vec![
            format!("{f}: ignored \"wandb_project_name\": there is no Weights & Biases logging; metrics go to metrics.jsonl"),
            format!("{f}: ignored \"filtering_processes\": captions are filtered on this process's threads"),
            format!("{f}: ignored \"attn_implementation\": attention is computed by this crate's own ops"),
        ]
    );
}

/// Florence-2ner's examples/example.yaml (dataset_config as a mapping), paths made local.
#[test]
fn mapping_form_example_yaml() {
    let text = "wandb_project_name: Florence-2-base\nrun_name: ex\nwandb_x_stats_sampling_interval: 10\n\
        model_name: microsoft/Florence-2-base\nattn_implementation: sdpa\nuse_bf16: true\nsave_steps: 10\n\
        eval_steps: 10\nsave_total_limit: 3\ndo_extra_eval: true\neval_before_training: true\n\
        print_first_batch_predictions: true\nepochs: 2\noptimizer: CAME\nlr_scheduler: REX\n\
        learning_rate: 0.0000025\nmin_learning_rate: 0.00000025\ntrain_batch_size: 4\neval_batch_size: 4\n\
        gradient_accumulation_steps: 16\ngradient_checkpointing: # may not work\nwarmup_steps: 20\n\
        clip_grad_norm: 0.5\nweight_decay: 0.01\nseed: 42\ngarbage_collection:\nactivation_offloading:\n\
        gpu_limit_mb:\noffload_cpu_limit_mb:\nfreeze_vision:\nfreeze_language:\nfreeze_other:\neval_split: 256\n\
        dataset_config:\n  <CAPTION>:\n    - \"a\"\n  <DETAILED_CAPTION>:\n    - \"b\"\n    - \"a\"\n\
        filtering_processes_per_thread: 1\nfiltering_batch_size: 16\ndataloader_workers: 12\n\
        persistent_workers: true\ndataloader_prefetch_factor: 2\n";
    let (tmp, file) = setup("example.yaml", text);
    let (c, notes) = TrainConfig::from_file(&file).unwrap();
    let cap = |p: &str, d: &str| DataSource::Captioned {
        prompt: p.into(),
        dir: tmp.path().join(d),
    };
    assert_eq!(
        c.data,
        vec![
            cap("<CAPTION>", "a"),
            cap("<DETAILED_CAPTION>", "b"),
            cap("<DETAILED_CAPTION>", "a")
        ]
    );
    assert_eq!(c.eval_split, EvalSplit::Count(256));
    assert_eq!(
        (
            c.min_learning_rate,
            c.gradient_checkpointing,
            c.eval_before_training,
            c.use_bf16
        ),
        (0.00000025, false, true, true)
    );
    let ignored: Vec<&str> = notes.iter().map(|n| n.split('"').nth(1).unwrap()).collect();
    assert_eq!(
        ignored,
        [
            "wandb_project_name",
            "wandb_x_stats_sampling_interval",
            "attn_implementation",
            "do_extra_eval",
            "print_first_batch_predictions",
            "filtering_processes_per_thread",
            "filtering_batch_size",
            "dataloader_workers",
            "persistent_workers",
            "dataloader_prefetch_factor"
        ]
    );
}

/// Florence-2ner's current form (folders of prompt subfolders) and ShareGPT files; defaults.
#[test]
fn folder_list_form_and_defaults() {
    let text = format!("{REQUIRED}optimizer_unused: 1\n");
    assert_eq!(error("x.yaml", &text), "unknown key \"optimizer_unused\"");
    let text = format!("{REQUIRED}dataset_config: [c, s.jsonl]\n");
    let (tmp, file) = setup("my run.yml", &text);
    let (c, notes) = TrainConfig::from_file(&file).unwrap();
    assert!(notes.is_empty());
    assert_eq!(
        c.data,
        vec![
            DataSource::PromptFolders {
                dir: tmp.path().join("c")
            },
            DataSource::ShareGpt {
                file: tmp.path().join("s.jsonl")
            }
        ]
    );
    assert_eq!(c.run_name, "my run");
    assert_eq!(c.output_dir, tmp.path().join("checkpoints/my run"));
    assert_eq!(
        (c.lr_scheduler, c.min_learning_rate, c.warmup_steps),
        (ScheduleKind::Cosine, 0.0, 0)
    );
    assert_eq!(
        (
            c.eval_batch_size,
            c.gradient_accumulation_steps,
            c.clip_grad_norm,
            c.weight_decay
        ),
        (2, 1, 0.0, 0.0)
    );
    assert_eq!(
        (c.seed, c.save_steps, c.eval_steps, c.save_total_limit),
        (42, None, None, None)
    );
    assert_eq!(c.eval_split, EvalSplit::Count(0));
    assert!(c.shuffle && !c.pad_in_loss && !c.eval_before_training && !c.freeze_language && !c.freeze_other);
    assert_eq!(c.loss_normalization, LossNormalization::Mean);
    let text = format!("{REQUIRED}dataset_config: [c]\noptimizer: OptimiAdamW\n").replace("optimizer: CAME\n", "");
    let (_tmp, file) = setup("r.yaml", &text);
    assert_eq!(TrainConfig::from_file(&file).unwrap().0.optimizer, OptimizerKind::AdamW);
}

/// Every documented refusal names the file (checked by `error`) and the key, on one line.
#[test]
fn errors_name_key_and_file() {
    let data = "dataset_config: [c]\n";
    let with = |extra: &str| format!("{REQUIRED}{data}{extra}");
    assert_eq!(
        error("x.yaml", &with("learning_rat: 1\n")),
        "unknown key \"learning_rat\"; did you mean \"learning_rate\"?"
    );
    assert_eq!(
        error("x.yaml", &with("epochs: 0\n").replace("epochs: 1\n", "")),
        "\"epochs\" must be a whole number >= 1, not 0"
    );
    assert_eq!(
        error("x.yaml", &REQUIRED.replace("epochs: 1\n", "")),
        "no data: give \"dataset_config\", or \"task_prompt\" with \"dataset_path\""
    );
    assert_eq!(
        error("x.yaml", &with("").replace("train_batch_size: 2\n", "")),
        "\"train_batch_size\" is required"
    );
    assert_eq!(
        error("x.yaml", &with("shuffle: yes please\n")),
        "\"shuffle\" must be true or false, not \"yes please\""
    );
    assert_eq!(
        error("x.yaml", &with("lr_scheduler: Step\n")),
        "\"lr_scheduler\" must be one of REX, Cosine, Constant, Linear, not \"Step\""
    );
    assert_eq!(
        error("x.yaml", &with("loss_normalization: sum\n")),
        "\"loss_normalization\" must be one of mean, token_count, not \"sum\""
    );
    assert_eq!(
        error("x.yaml", &with("optimizer: Adam\n").replace("optimizer: CAME\n", "")),
        "\"optimizer\" must be one of CAME, AdamW (or OptimiAdamW), not \"Adam\""
    );
    assert_eq!(
        error("x.yaml", &with("eval_split: 1.5\n")),
        "\"eval_split\" must be a fraction below 1 or a whole count, not 1.5"
    );
    assert_eq!(
        error("x.yaml", &with("eval_split: 0.1\neval_split_ratio: 0.1\n")),
        "\"eval_split\" and \"eval_split_ratio\" are the same setting; give one"
    );
    assert_eq!(
        error("x.yaml", &with("min_learning_rate: 1.0\n")),
        "\"min_learning_rate\" (1) must not exceed learning_rate (0.00001)"
    );
    assert_eq!(
        error(
            "x.yaml",
            &with("learning_rate: -1\n").replace("learning_rate: 1.0e-5\n", "")
        ),
        "\"learning_rate\" must be a number > 0, not -1"
    );
    assert!(error("x.yaml", &format!("{REQUIRED}dataset_config: [nope]\n"))
        .starts_with("\"dataset_config\" names \"nope\", which is not a folder ("));
    assert_eq!(
        error("x.yaml", &format!("{REQUIRED}dataset_path: a\n")),
        "\"dataset_path\" names a folder: give its \"task_prompt\" too (e.g. \"<CAPTION>\")"
    );
    assert_eq!(
        error("x.yaml", &with("epochs: 2\n")),
        "cannot parse: key \"epochs\" is given twice"
    );
    assert_eq!(
        error("x.toml", REQUIRED),
        "the config must be a .yaml, .yml or .json file"
    );
    assert_eq!(error("x.json", "[1]"), "the config must be a mapping of keys to values");
}

#[test]
fn eval_split_counts() {
    assert_eq!(EvalSplit::Fraction(0.25).count(10), 2);
    assert_eq!(EvalSplit::Count(20).count(10), 10);
    let _ = Path::new("");
}
