//! The tensor path's vision tower and projector against the fast path (itself within 1e-4 of
//! transformers, see `parity.rs`) on the committed tiny fixtures, in both checkpoint layouts.

mod common;

use candle_core::{DType, Device, Tensor};
use florence::checkpoint::{Checkpoint, WeightFiles};
use florence::tensor::ops::Mode;
use florence::tensor::projector::ImageProjector;
use florence::tensor::vision::DaViT;
use florence::tensor::{segment, Parameters, Pass};
use florence::{Florence2, Florence2Config, LoadOptions};

/// `max |a - b|` over the largest `|b|` (at least 1).
fn relative_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let max = |t: Tensor| {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    max((a - b).unwrap()) / max(b.clone()).max(1.0)
}

/// Deterministic pixel values `[2, 3, 96, 80]` of about unit scale: maps whose windows need
/// padding after the second stage, and a non-square final map.
fn pixels() -> Tensor {
    let n = 2 * 3 * 96 * 80;
    let t = Tensor::arange(0u32, n as u32, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    ((t * 0.013).unwrap().sin().unwrap() * 1.7)
        .unwrap()
        .reshape((2, 3, 96, 80))
        .unwrap()
}

#[test]
fn vision_tower_and_projector_equal_the_fast_path() {
    for name in ["native_f32", "remote_f32"] {
        let dir = common::fixtures().join("models").join(name);
        let config = Florence2Config::from_file(&dir.join("config.json")).unwrap();
        let files = WeightFiles::discover(&dir).unwrap();
        let fast = Florence2::load(config.clone(), &files, &LoadOptions::default()).unwrap();
        let mut checkpoint = Checkpoint::open(&files).unwrap();
        checkpoint.check(&config, false).unwrap();
        let params = Parameters::from_checkpoint(&config, &checkpoint, &Device::Cpu, |_| true).unwrap();
        let vb = params.var_builder();
        let davit = DaViT::new(&config.vision, vb.pp("vision_tower")).unwrap();
        let projector = ImageProjector::new(&config.vision, vb).unwrap();

        let pixels = pixels();
        let expected_features = fast.vision_features(&pixels).unwrap();
        let expected_embeds = fast.project(&expected_features).unwrap();
        let features = davit.forward(&pixels, &mut Mode::eval()).unwrap();
        let diff = relative_diff(&features, &expected_features);
        assert!(diff < 1e-4, "{name}: vision features differ by {diff}");

        // The chain, as training runs it.
        let mut chain = davit.segments();
        chain.push(Box::new(&projector));
        let pass = Pass {
            train: false,
            seed: 0,
            checkpointing: false,
        };
        let embeds = segment::forward(&chain, vec![pixels.clone()], &pass).unwrap().remove(0);
        assert_eq!(embeds.dims(), [2, 1 + 3 * 3, config.text.d_model]);
        let diff = relative_diff(&embeds, &expected_embeds);
        assert!(diff < 1e-4, "{name}: image embeddings differ by {diff}");
    }
}
