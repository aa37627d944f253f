//! Parity with transformers 5.24 (native Florence-2) on the committed random-weight fixtures:
//! pixel values exactly, image features / encoder output / first-step logits within 1e-4, and
//! generated ids and decoded strings identical, for beam search, greedy search and batches.

mod common;

use candle_core::{Device, Tensor};
use florence::{Florence, LoadOptions, Task};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn pixel_values_equal_the_reference_at_768() {
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(common::fixtures().join("pixels_768.json")).unwrap()).unwrap();
    let cfg = florence::PreprocessorConfig::from_file(
        &common::shared_testdata().join("microsoft-florence-2-large/preprocessor_config.json"),
    )
    .unwrap();
    let proc = florence::ImageProcessor::new(cfg);
    let hashes = expected["sha256"].as_object().unwrap();
    assert!(hashes.len() >= 5);
    for (name, hash) in hashes {
        let img = florence::preprocess::load_image(&common::image(name)).unwrap();
        let bytes: Vec<u8> = proc.pixel_values(&img).iter().flat_map(|v| v.to_le_bytes()).collect();
        let got = format!("{:x}", Sha256::digest(&bytes));
        assert_eq!(
            &got,
            hash.as_str().unwrap(),
            "{name}: 768x768 pixel values differ from transformers' PIL path"
        );
    }
}

#[test]
fn tensors_match_the_reference() {
    for name in common::model_names() {
        let dir = common::model_dir(&name);
        let model = Florence::load(dir.path(), &LoadOptions::default()).unwrap();
        let expected = candle_core::safetensors::load(
            common::fixtures()
                .join("models")
                .join(format!("{name}.expected.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let prompt = model
            .tokenizer()
            .encode(&Task::new("<CAPTION>", None).unwrap().prompt)
            .unwrap();
        let images: Vec<String> = common::cases(&name)["cases"][0]["images"]
            .as_array()
            .unwrap()
            .iter()
            .chain(
                common::cases(&name)["cases"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .flat_map(|c| c["images"].as_array().unwrap()),
            )
            .map(|v| v.as_str().unwrap().to_string())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        for img_name in images {
            let img = florence::preprocess::load_image(&common::image(&img_name)).unwrap();
            let pv = model.pixel_values(&[img]).unwrap();
            let get = |k: &str| {
                expected
                    .get(&format!("{img_name}/{k}"))
                    .unwrap_or_else(|| panic!("{name}: no {k}"))
                    .clone()
            };
            assert_eq!(
                max_abs_diff(&pv.squeeze(0).unwrap(), &get("pixel_values")),
                0.0,
                "{name}/{img_name}: pixel values"
            );
            let feats = model.network().unwrap().encode_image(&pv).unwrap();
            let d = max_abs_diff(&feats.squeeze(0).unwrap(), &get("image_features"));
            assert!(d < 1e-4, "{name}/{img_name}: image features differ by {d}");
            let memory = model.network().unwrap().encode(&feats, &prompt).unwrap();
            let d = max_abs_diff(&memory.squeeze(0).unwrap(), &get("encoder_output"));
            assert!(d < 1e-4, "{name}/{img_name}: encoder output differs by {d}");
            let mut dec = model.network().unwrap().decoder(&memory, 1).unwrap();
            let logits = dec.step_logits(&[2]).unwrap();
            let d = max_abs_diff(&logits.squeeze(0).unwrap(), &get("first_logits"));
            assert!(d < 1e-4, "{name}/{img_name}: first-step logits differ by {d}");
        }
    }
}

#[test]
fn generated_tokens_equal_the_reference() {
    let mut failures = Vec::new();
    let mut checked = 0;
    for name in common::model_names() {
        let dir = common::model_dir(&name);
        let model = Florence::load(dir.path(), &LoadOptions::default()).unwrap();
        let (n, f) = common::generation_failures(&name, &model);
        checked += n;
        failures.extend(f);
    }
    assert!(checked >= 30, "only {checked} generations checked");
    assert!(
        failures.is_empty(),
        "{} of {checked} generations differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The fast path has no backward pass: a tensor that tracks gradients is refused with an error
/// instead of having its graph cut.
#[test]
fn the_fast_path_refuses_tensors_that_track_gradients() {
    let name = &common::model_names()[0];
    let dir = common::model_dir(name);
    let model = Florence::load(dir.path(), &LoadOptions::default()).unwrap();
    let network = model.network().unwrap();
    let pixels = Tensor::zeros((1, 3, 32, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
    let tracked = candle_core::Var::from_tensor(&pixels).unwrap();
    let err = network.vision_features(tracked.as_tensor()).unwrap_err().to_string();
    assert!(err.contains("tracks gradients"), "{err}");
    let features = network.vision_features(&pixels).unwrap();
    let tracked = candle_core::Var::from_tensor(&features).unwrap();
    assert!(network.project(tracked.as_tensor()).is_err());
    let embeds = network.project(&features).unwrap();
    let tracked = candle_core::Var::from_tensor(&embeds).unwrap();
    assert!(network.encode(tracked.as_tensor(), &[0, 2]).is_err());
}
