//! The tensor path's loss, logits and every parameter's gradient on one batch against PyTorch's
//! (transformers' native Florence-2, `tests/fixtures/train/grads`), with gradient checkpointing
//! on and off, with every parameter trainable and with the vision tower and projector frozen.

mod common;

use candle_core::{Device, Tensor, Var};
use florence::checkpoint::{save, Checkpoint, WeightFiles};
use florence::tensor::language::TextInputs;
use florence::tensor::segment::{self, Pass};
use florence::tensor::{Florence2, ParamGroup, Parameters};
use florence::{Florence2Config, Layout as WeightLayout};

use common::*;

struct Batch {
    pixel_values: Tensor,
    text: TextInputs,
    count: usize,
    ce_sum: f64,
}

fn batch(pad_in_loss: bool) -> Batch {
    let dir = fixtures().join("grads");
    let meta = json(&dir.join("meta.json"));
    let text = TextInputs::new(
        &batch_ids("prompt_ids"),
        &batch_ids("label_ids"),
        pad_in_loss,
        &Device::Cpu,
    )
    .unwrap();
    let tensors = load(&dir.join("batch.safetensors"));
    // The collation equals the reference's: decoder inputs, and labels where they count.
    let dec: Vec<Vec<i64>> = tensors["decoder_input_ids"].to_vec2().unwrap();
    let ours: Vec<Vec<u32>> = text.decoder_input_ids.to_vec2().unwrap();
    assert_eq!(
        ours,
        dec.iter()
            .map(|r| r.iter().map(|&v| v as u32).collect::<Vec<_>>())
            .collect::<Vec<_>>()
    );
    let labels_file = if pad_in_loss {
        "labels_pad_in_loss.safetensors"
    } else {
        "batch.safetensors"
    };
    let labels: Vec<Vec<i64>> = load(&dir.join(labels_file))["labels"].to_vec2().unwrap();
    let our_labels: Vec<Vec<u32>> = text.labels.to_vec2().unwrap();
    let mask: Vec<Vec<f32>> = text.label_mask.to_vec2().unwrap();
    for ((r, o), m) in labels.iter().zip(&our_labels).zip(&mask) {
        for ((&r, &o), &m) in r.iter().zip(o).zip(m) {
            assert_eq!(r >= 0, m == 1.0);
            if r >= 0 {
                assert_eq!(r as u32, o);
            }
        }
    }
    let variant = &meta[if pad_in_loss { "pad_in_loss" } else { "default" }];
    assert_eq!(variant["count"].as_u64().unwrap() as usize, text.label_count);
    Batch {
        pixel_values: tensors["pixel_values"].clone(),
        count: text.label_count,
        ce_sum: variant["ce_sum"].as_f64().expect("meta.json has the CE sum"),
        text,
    }
}

fn model(trainable: impl Fn(ParamGroup) -> bool) -> (Florence2Config, Parameters) {
    let layout = Layout::new();
    let config = Florence2Config::from_file(&layout.model().join("config.json")).unwrap();
    let mut checkpoint = Checkpoint::open(&WeightFiles::discover(&layout.model()).unwrap()).unwrap();
    checkpoint.check(&config, true).unwrap();
    let params =
        Parameters::from_checkpoint(&config, &checkpoint, &Device::Cpu, |n| trainable(ParamGroup::of(n))).unwrap();
    (config, params)
}

#[test]
fn logits_and_loss_equal_pytorch() {
    let (config, params) = model(|_| true);
    let model = Florence2::new(&config, &params).unwrap();
    let b = batch(false);
    let logits = model.logits(&b.pixel_values, &b.text).unwrap();
    let expected = &load(&fixtures().join("grads/batch.safetensors"))["logits"];
    let diff = max_abs(&(&logits - expected).unwrap());
    assert!(diff <= 1e-4 * max_abs(expected), "logits differ by {diff}");
    for pad_in_loss in [false, true] {
        let b = batch(pad_in_loss);
        let pass = Pass {
            train: true,
            seed: 0,
            checkpointing: false,
        };
        let sum = model
            .loss_sum(&b.pixel_values, &b.text, &pass)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        assert!(
            close(sum, b.ce_sum, 1e-5),
            "pad_in_loss {pad_in_loss}: CE sum {sum}, PyTorch {}",
            b.ce_sum
        );
    }
}

/// Checks the gradient of `sum / count` of every trainable parameter against PyTorch's.
fn check_gradients(trainable: impl Fn(ParamGroup) -> bool + Copy, checkpointing: bool) {
    let (config, params) = model(trainable);
    let model = Florence2::new(&config, &params).unwrap();
    let b = batch(false);
    let named: Vec<(String, Var)> = params
        .trainable()
        .into_iter()
        .map(|(n, v)| (n.to_string(), v.clone()))
        .collect();
    let vars: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
    let pass = Pass {
        train: true,
        seed: 0,
        checkpointing,
    };
    let (_, grads) = segment::backward(
        &model.segments(&b.text),
        vec![b.pixel_values.clone()],
        &vars,
        1.0 / b.count as f64,
        &pass,
    )
    .unwrap();
    let ours: Vec<(String, Tensor)> = named
        .iter()
        .zip(grads)
        .map(|((n, _), g)| (n.clone(), g.unwrap_or_else(|| panic!("{n} got no gradient"))))
        .collect();
    let ours = save::in_layout(WeightLayout::Native, ours).unwrap();
    if let Ok(path) = std::env::var("FLORENCE_DUMP_GRADS") {
        save::write_safetensors(std::path::Path::new(&path), &ours).unwrap();
    }
    let expected = load(&fixtures().join("grads/grads.safetensors"));
    let mut compared = 0;
    let mut worst = Vec::new();
    for (name, g) in &ours {
        let r = expected
            .get(name)
            .unwrap_or_else(|| panic!("PyTorch has no gradient for {name}"));
        let diff = max_abs(&(g - r).unwrap());
        if name.ends_with("k_proj.bias") {
            // Zero in exact arithmetic: both sides hold rounding noise.
            assert!(diff <= 1e-9, "{name}: {diff}");
        } else {
            let scale = max_abs(r);
            assert!(
                diff <= 1e-4 * scale,
                "{name}: gradient differs by {diff} (largest element {scale})"
            );
            worst.push((diff / scale, name.clone()));
        }
        compared += 1;
    }
    worst.sort_by(|a, b| b.0.total_cmp(&a.0));
    eprintln!(
        "checkpointing {checkpointing}: largest relative gradient differences {:?}",
        &worst[..4]
    );
    let frozen = expected.keys().filter(|n| !ours.iter().any(|(o, _)| o == *n)).count();
    assert_eq!(compared + frozen, expected.len());
    assert!(compared > 0);
}

#[test]
fn every_gradient_equals_pytorch() {
    check_gradients(|_| true, false);
}

#[test]
fn every_gradient_equals_pytorch_with_checkpointing() {
    check_gradients(|_| true, true);
}

#[test]
fn frozen_vision_and_projector_leave_the_language_gradients_unchanged() {
    check_gradients(|g| g == ParamGroup::Language, true);
    let (_, params) = model(|g| g == ParamGroup::Language);
    assert!(params
        .trainable()
        .iter()
        .all(|(n, _)| ParamGroup::of(n) == ParamGroup::Language));
}
