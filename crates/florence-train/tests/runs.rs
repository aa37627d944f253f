//! Whole short runs of `florence_train::train` against the PyTorch reference trainer
//! (`tests/fixtures/train/runs`): per-step rate, loss, gradient norm and eval loss, and the final
//! weights; resume equal bit for bit to an uninterrupted run; checkpoints that load and caption.

mod common;

use std::path::Path;
use std::sync::atomic::AtomicBool;

use candle_core::Device;
use florence_train::{Quiet, Summary, TrainOptions};

use common::*;

fn train(config: &Path, output: &Path, resume: Option<&Path>, max_steps: Option<usize>) -> Summary {
    let options = TrainOptions {
        config: config.to_path_buf(),
        output: Some(output.to_path_buf()),
        resume: resume.map(Path::to_path_buf),
        max_steps,
        offline: true,
    };
    florence_train::train(&options, &Device::Cpu, &AtomicBool::new(false), &mut Quiet).unwrap()
}

fn field(line: &serde_json::Value, key: &str) -> f64 {
    line[key].as_f64().unwrap_or_else(|| panic!("{line} has no {key}"))
}

fn compare_metrics(run: &str, ours: &[serde_json::Value], reference: &[serde_json::Value]) {
    assert_eq!(
        ours.len(),
        reference.len(),
        "{run}: {} metric lines, PyTorch {}",
        ours.len(),
        reference.len()
    );
    let mut worst = std::collections::BTreeMap::new();
    for (o, r) in ours.iter().zip(reference) {
        assert_eq!(o["step"], r["step"], "{run}");
        let keys: Vec<&String> = r.as_object().unwrap().keys().collect();
        assert_eq!(
            o.as_object().unwrap().keys().collect::<Vec<_>>(),
            keys,
            "{run}: {o} vs {r}"
        );
        for (key, rel) in [
            ("epoch", 1e-12),
            ("lr", 1e-9),
            ("loss", 1e-5),
            ("eval_loss", 1e-5),
            ("grad_norm", 1e-4),
        ] {
            if r.get(key).is_some() {
                let (a, b) = (field(o, key), field(r, key));
                let ok = if b == 0.0 { a.abs() <= 1e-15 } else { close(a, b, rel) };
                let w: &mut f64 = worst.entry(key).or_default();
                *w = w.max(if b == 0.0 { a.abs() } else { (a - b).abs() / b.abs() });
                assert!(ok, "{run} step {}: {key} {a}, PyTorch {b}", r["step"]);
            }
        }
    }
    eprintln!("{run}: largest relative metric differences {worst:?}");
}

fn compare_weights(run: &str, layout: &Layout, ours: &Path) {
    let ours = load(ours);
    let initial = load(&layout.model().join("model.safetensors"));
    let reference = load(&fixtures().join("runs").join(run).join("final.safetensors"));
    let info = json(&fixtures().join("runs").join(run).join("run.json"));
    let noise: Vec<&str> = info["noise_driven"]
        .as_array()
        .map_or(vec![], |a| a.iter().map(|v| v.as_str().unwrap()).collect());
    let steps = info["steps_run"].as_u64().unwrap() as f64;
    let config = std::fs::read_to_string(fixtures().join("runs").join(run).join("config.yaml")).unwrap();
    let lr: f64 = config
        .lines()
        .find_map(|l| l.strip_prefix("learning_rate:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Tensors whose gradient on the fixture batch is below 1e-4 of the model's largest gradient
    // element (this tiny model's vision tower: 1e-4 to 1e-8 of the language model's) are
    // compared by bound, like the key biases. Their gradients equal PyTorch's to 2e-6 (tests/
    // grads.rs) and the first step's update to 1.2e-5, but the per-element normalization of CAME
    // and AdamW amplifies that f32 difference of summation order over the steps (the reference
    // run on 2 threads instead of 1 already moves them by 1e-4 of their update).
    let grads = load(&fixtures().join("grads/grads.safetensors"));
    let top = grads.values().map(max_abs).fold(0.0, f64::max);
    let at_noise_floor = |name: &str| grads.get(name).is_some_and(|g| max_abs(g) < 1e-4 * top);
    let mut worst = Vec::new();
    for (name, r) in &reference {
        let o = ours
            .get(name)
            .unwrap_or_else(|| panic!("{run}: the checkpoint lacks {name}"));
        let w0 = &initial[name];
        let update = norm(&(r - w0).unwrap());
        let diff = (o - r).unwrap();
        // The key biases' true gradient is exactly 0: they move by rounding noise (CAME turns it
        // into lr-sized steps), bounded by what the steps can move an element.
        if noise.contains(&name.as_str()) || name.ends_with("k_proj.bias") || at_noise_floor(name) {
            let bound = 2.0 * steps * lr * (r.elem_count() as f64).sqrt();
            assert!(
                max_abs(&diff) <= bound,
                "{run}: {name} moved {} > {bound}",
                max_abs(&diff)
            );
        } else if update == 0.0 {
            assert_eq!(max_abs(&(o - w0).unwrap()), 0.0, "{run}: frozen {name} changed");
        } else {
            worst.push((norm(&diff) / update, name.clone()));
        }
    }
    worst.sort_by(|a, b| b.0.total_cmp(&a.0));
    eprintln!(
        "{run}: largest weight differences, relative to the update: {:?}",
        &worst[..3]
    );
    let over: Vec<_> = worst.iter().filter(|(r, _)| *r > 0.02).collect();
    assert!(
        over.is_empty(),
        "{run}: tensors differ by more than 2% of their update: {over:?}"
    );
}

#[test]
fn short_runs_equal_pytorch_step_for_step() {
    let layout = Layout::new();
    for run in runs() {
        eprintln!("{run}");
        let out = layout.output(&run);
        let summary = train(&layout.config(&run), &out, None, None);
        assert!(!summary.interrupted);
        let ours = lines(&out.join("metrics.jsonl"));
        let reference = lines(&fixtures().join("runs").join(&run).join("metrics.jsonl"));
        compare_metrics(&run, &ours, &reference);
        compare_weights(&run, &layout, &out.join("final/model.safetensors"));
    }
}

#[test]
fn resume_equals_the_uninterrupted_run_bit_for_bit() {
    let layout = Layout::new();
    let config = layout.config("came_rex");
    let straight = layout.output("straight");
    train(&config, &straight, None, None);
    let first = layout.output("first");
    let half = train(&config, &first, None, Some(3));
    assert_eq!(half.steps, 3);
    let checkpoint = half.last_checkpoint.unwrap();
    assert_eq!(checkpoint, first.join("checkpoint-3"));
    let second = layout.output("second");
    let rest = train(&config, &second, Some(&checkpoint), None);
    assert_eq!(rest.steps, 6);
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let a = std::fs::read(straight.join("final").join(file)).unwrap();
        let b = std::fs::read(second.join("final").join(file)).unwrap();
        assert!(a == b, "final/{file} differs after resuming");
    }
    assert_eq!(
        std::fs::read_to_string(straight.join("metrics.jsonl")).unwrap(),
        std::fs::read_to_string(second.join("metrics.jsonl")).unwrap()
    );
}

#[test]
fn checkpoints_are_complete_model_folders_that_caption() {
    let layout = Layout::new();
    let out = layout.output("freeze");
    train(&layout.config("freeze"), &out, None, Some(2));
    let dir = out.join("final");
    for file in [
        "config.json",
        "generation_config.json",
        "preprocessor_config.json",
        "tokenizer.json",
        "model.safetensors",
    ] {
        assert!(dir.join(file).is_file(), "final/ lacks {file}");
    }
    // Frozen tensors are written bit-identical to the input's.
    let ours = load(&dir.join("model.safetensors"));
    let initial = load(&layout.model().join("model.safetensors"));
    assert_eq!(ours.len(), initial.len());
    for (name, t) in &initial {
        if name.starts_with("model.vision_tower.") {
            assert_eq!(max_abs(&(&ours[name] - t).unwrap()), 0.0, "{name}");
        }
    }
    write_logits_for_transformers(&dir);
    let model = florence::Florence::load(&dir, &florence::LoadOptions::default()).unwrap();
    let image = florence::preprocess::load_image(&layout.dir.path().join("data/a01.png")).unwrap();
    let task = florence::Task::new("<CAPTION>", None).unwrap();
    let out = model.run(&[image], &task, model.generation_config()).unwrap();
    assert_eq!(out.len(), 1);
}

#[test]
fn a_fresh_run_refuses_a_folder_that_holds_one() {
    let layout = Layout::new();
    let config = layout.config("freeze");
    let out = layout.output("twice");
    train(&config, &out, None, Some(1));
    let options = TrainOptions {
        config,
        output: Some(out.clone()),
        max_steps: Some(1),
        offline: true,
        ..Default::default()
    };
    let err = florence_train::train(&options, &Device::Cpu, &AtomicBool::new(false), &mut Quiet).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{} already holds a training run; continue it with --resume {}/checkpoint-STEP, or choose another --output",
            out.display(),
            out.display()
        )
    );
}

/// With FLORENCE_CHECK_CHECKPOINT=DIR, copies the trained `model_dir` to DIR with the tensor
/// path's logits on the fixture batch in DIR/inputs.safetensors, for
/// `python tools/reference/check_checkpoint.py DIR DIR/inputs.safetensors` (transformers must
/// give the same logits from the saved weights).
fn write_logits_for_transformers(model_dir: &Path) {
    let Ok(to) = std::env::var("FLORENCE_CHECK_CHECKPOINT") else {
        return;
    };
    let to = Path::new(&to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(model_dir).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    let config = florence::Florence2Config::from_file(&to.join("config.json")).unwrap();
    let mut checkpoint =
        florence::checkpoint::Checkpoint::open(&florence::checkpoint::WeightFiles::discover(to).unwrap()).unwrap();
    checkpoint.check(&config, true).unwrap();
    let params = florence::tensor::Parameters::from_checkpoint(&config, &checkpoint, &Device::Cpu, |_| false).unwrap();
    let model = florence::tensor::Florence2::new(&config, &params).unwrap();
    let batch = load(&fixtures().join("grads/batch.safetensors"));
    let text = florence::tensor::language::TextInputs::new(
        &batch_ids("prompt_ids"),
        &batch_ids("label_ids"),
        false,
        &Device::Cpu,
    )
    .unwrap();
    let logits = model.logits(&batch["pixel_values"], &text).unwrap();
    let mut out: Vec<(String, candle_core::Tensor)> =
        ["pixel_values", "input_ids", "attention_mask", "decoder_input_ids"]
            .iter()
            .map(|k| (k.to_string(), batch[*k].clone()))
            .collect();
    out.push(("logits".into(), logits));
    florence::checkpoint::save::write_safetensors(&to.join("inputs.safetensors"), &out).unwrap();
}

/// Sets the interruption flag after step `at`, as Ctrl-C would.
struct InterruptAfter<'a> {
    at: usize,
    flag: &'a AtomicBool,
}

impl florence_train::Progress for InterruptAfter<'_> {
    fn begin(&mut self, _: usize, _: usize) {}
    fn step(&mut self, m: &florence_train::StepMetrics) {
        if m.step == self.at {
            self.flag.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
    fn message(&mut self, _: &str) {}
}

#[test]
fn an_interrupted_run_saves_a_checkpoint_that_resumes_exactly() {
    let layout = Layout::new();
    let config = layout.config("token_count");
    let straight = layout.output("straight");
    train(&config, &straight, None, None);
    let first = layout.output("first");
    let flag = AtomicBool::new(false);
    let options = TrainOptions {
        config: config.clone(),
        output: Some(first.clone()),
        offline: true,
        ..Default::default()
    };
    let stopped = florence_train::train(
        &options,
        &Device::Cpu,
        &flag,
        &mut InterruptAfter { at: 2, flag: &flag },
    )
    .unwrap();
    assert!(stopped.interrupted);
    assert_eq!(stopped.steps, 2);
    assert!(stopped.final_dir.is_none());
    let checkpoint = stopped.last_checkpoint.unwrap();
    train(&config, &first, Some(&checkpoint), None);
    for file in ["model.safetensors", "optimizer.safetensors"] {
        assert!(
            std::fs::read(straight.join("final").join(file)).unwrap()
                == std::fs::read(first.join("final").join(file)).unwrap(),
            "final/{file} differs after an interruption"
        );
    }
    assert_eq!(
        std::fs::read_to_string(straight.join("metrics.jsonl")).unwrap(),
        std::fs::read_to_string(first.join("metrics.jsonl")).unwrap()
    );
}

/// `use_bf16` (mixed precision: bf16 compute over f32 master weights) against PyTorch's f32
/// run of the same config: every step's loss, eval loss and gradient norm stay within bf16's
/// reach of f32, and the loss falls as it does. A path that lost the gradients (casts that cut
/// autograd) or computed the loss in bf16 would be far off by the last step.
#[test]
fn bf16_mixed_precision_follows_the_f32_run() {
    let layout = Layout::new();
    let config = layout.config("came_rex");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("use_bf16: true\n");
    std::fs::write(&config, text).unwrap();
    let out = layout.output("came_rex_bf16");
    train(&config, &out, None, None);
    let ours = lines(&out.join("metrics.jsonl"));
    let reference = lines(&fixtures().join("runs/came_rex/metrics.jsonl"));
    assert_eq!(ours.len(), reference.len());
    let mut worst = std::collections::BTreeMap::new();
    for (o, r) in ours.iter().zip(&reference) {
        for (key, rel) in [("loss", 2e-3), ("eval_loss", 2e-3), ("grad_norm", 2e-2)] {
            if r.get(key).is_some() {
                let (a, b) = (field(o, key), field(r, key));
                let w: &mut f64 = worst.entry(key).or_default();
                *w = w.max((a - b).abs() / b.abs());
                assert!(close(a, b, rel), "step {}: bf16 {key} {a}, PyTorch f32 {b}", r["step"]);
            }
        }
    }
    eprintln!("bf16 mixed precision against PyTorch f32: largest relative differences {worst:?}");
    let losses: Vec<f64> = ours.iter().filter_map(|l| l["eval_loss"].as_f64()).collect();
    assert!(losses.last() < losses.first(), "eval losses {losses:?}");
}
