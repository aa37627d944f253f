//! Generation on the tensor path (what runs on a GPU: candle `Tensor` operations, a device-side
//! key/value cache, beam reorders as gathers), run on the CPU: in f32 it gives transformers'
//! ids on every parity case, batches included; in bf16 it stays close to f32.
//!
//! `cargo test -p florence --test tensor_generation -- --nocapture` prints the bf16 agreement
//! figures; tools/cuda/check.sh runs this test on a GPU (`FLORENCE_TEST_DEVICE=cuda`).

mod common;

use florence::device::DeviceChoice;
use florence::{Florence, LoadOptions, Task, WeightFormat};

/// The CPU, or `FLORENCE_TEST_DEVICE` (`cuda`, `cuda:N`) for this test built with
/// `--features cuda` and carried to a GPU (tools/cuda/check.sh).
fn device() -> candle_core::Device {
    let choice = std::env::var("FLORENCE_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    choice.parse::<DeviceChoice>().unwrap().open().unwrap().0
}

fn load(dir: &std::path::Path, format: WeightFormat) -> Florence {
    Florence::load(
        dir,
        &LoadOptions {
            vision_weights: format,
            language_weights: format,
            device: device(),
            tensor_path: true,
            ..LoadOptions::default()
        },
    )
    .unwrap()
}

/// Every generation case of every fixture (beam search, greedy, several images a batch, images
/// that finish at different steps) in f32 on the tensor path: the reference's ids and strings.
#[test]
fn f32_generation_equals_the_reference() {
    let mut failures = Vec::new();
    let mut checked = 0;
    for name in common::model_names() {
        let dir = common::model_dir(&name);
        let model = load(dir.path(), WeightFormat::F32);
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

/// bf16 on the tensor path against f32 on the same path: the share of equal tokens and
/// sequences over every case. The bound catches a broken bf16 path (a lost cast, a mask or a
/// normalization in bf16), which drives the captions apart from the first tokens.
#[test]
fn bf16_generation_stays_close_to_f32() {
    let (mut agree, mut tokens, mut equal, mut sequences) = (0, 0, 0, 0);
    for name in common::model_names() {
        let dir = common::model_dir(&name);
        let (f32_model, bf16_model) = (
            load(dir.path(), WeightFormat::F32),
            load(dir.path(), WeightFormat::Bf16),
        );
        for case in common::cases(&name)["cases"].as_array().unwrap() {
            let (task, images) = common::case_inputs(case);
            let gen = common::generation_config(f32_model.generation_config(), &case["generation"]);
            let exact = f32_model.run(&images, &task, &gen).unwrap();
            let half = bf16_model.run(&images, &task, &gen).unwrap();
            for (a, b) in exact.iter().zip(&half) {
                agree += a.ids.iter().zip(&b.ids).filter(|(x, y)| x == y).count();
                tokens += a.ids.len().max(b.ids.len());
                equal += (a.ids == b.ids) as usize;
                sequences += 1;
            }
        }
    }
    let share = agree as f64 / tokens as f64;
    println!(
        "tensor path bf16 vs f32: {agree}/{tokens} tokens equal ({:.1}%), {equal}/{sequences} sequences equal",
        100.0 * share
    );
    assert!(share > 0.7, "only {:.1}% of bf16 tokens equal f32's", 100.0 * share);
}

/// What needs the CPU kernels refuses a tensor-path model with one line, and int8 weights are
/// refused on the tensor path.
#[test]
fn kernel_only_uses_refuse_a_tensor_path_model() {
    let name = &common::model_names()[0];
    let dir = common::model_dir(name);
    let model = load(dir.path(), WeightFormat::F32);
    let err = model.network().unwrap_err().to_string();
    assert!(
        err.contains("needs the model on the CPU kernels") && err.contains("--device cpu"),
        "{err}"
    );
    assert!(florence::batching::RunningBatch::<u32>::new(&model).is_err());
    let err = Florence::load(
        dir.path(),
        &LoadOptions {
            language_weights: WeightFormat::Q8,
            tensor_path: true,
            ..LoadOptions::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("int8 weights are for the CPU") && err.contains("--quantize"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    // The tensor path gives the same post-processed results as the kernels (here a caption).
    let task = Task::new("<CAPTION>", None).unwrap();
    let image = florence::preprocess::load_image(&common::image(
        common::cases(name)["cases"][0]["images"][0].as_str().unwrap(),
    ))
    .unwrap();
    let gen = florence::GenerationConfig {
        max_new_tokens: 12,
        ..model.generation_config().clone()
    };
    let kernels = Florence::load(dir.path(), &LoadOptions::default()).unwrap();
    assert_eq!(
        model.run(std::slice::from_ref(&image), &task, &gen).unwrap(),
        kernels.run(&[image], &task, &gen).unwrap()
    );
}
