//! `florence caption` over damaged copies of the fixture models: a checkpoint that differs from
//! what its config describes is refused with a one-line error naming the tensor and the file.
//! (The warning for unused tensors is the library's `Florence::warnings`, tested there.)

#[path = "../../florence/tests/common/mod.rs"]
mod common;
#[path = "../../florence/tests/damage/mod.rs"]
mod damage;

use std::path::Path;
use std::process::Output;

fn caption(model: &Path, extra: &[&str]) -> Output {
    let img = common::image("gray8.png");
    std::process::Command::new(env!("CARGO_BIN_EXE_florence"))
        .args(["caption", "--model", model.to_str().unwrap(), "--max-new-tokens", "3"])
        .args(extra)
        .arg(img)
        .output()
        .unwrap()
}

/// Exit status 2 and one line on stderr, containing every one of `parts`.
fn assert_refused(o: &Output, parts: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "refused: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    for p in parts {
        assert!(err.contains(p), "{p:?} in {err}");
    }
}

#[test]
fn a_deleted_weight_is_refused_by_name() {
    for (fixture, name) in [
        ("native_f32", "model.language_model.encoder.layers.0.fc1.weight"),
        (
            "remote_f32",
            "vision_tower.blocks.2.1.channel_block.ffn.fn.net.fc2.weight",
        ),
    ] {
        let dir = common::model_dir(fixture);
        damage::remove_tensor(dir.path(), name);
        assert_refused(
            &caption(dir.path(), &[]),
            &["model.safetensors: ", &format!("tensor {name} is missing"), "download"],
        );
    }
}

#[test]
fn a_deleted_bias_is_refused_by_name() {
    for (fixture, name) in [
        (
            "native_f32",
            "model.language_model.decoder.layers.0.encoder_attn.out_proj.bias",
        ),
        (
            "remote_f32",
            "vision_tower.blocks.0.0.spatial_block.window_attn.fn.qkv.bias",
        ),
    ] {
        let dir = common::model_dir(fixture);
        damage::remove_tensor(dir.path(), name);
        assert_refused(
            &caption(dir.path(), &[]),
            &[
                "model.safetensors: ",
                &format!("tensor {name} is missing"),
                "dropped biases",
            ],
        );
    }
}

#[test]
fn a_config_with_more_layers_than_the_weights_is_refused() {
    let dir = common::model_dir("native_f32");
    damage::set_text_config(dir.path(), "decoder_layers", 3.into());
    assert_refused(
        &caption(dir.path(), &[]),
        &[
            "model.safetensors: tensor model.language_model.decoder.layers.2.",
            "does not match config.json",
        ],
    );
}

#[test]
fn an_empty_shard_index_is_refused() {
    let dir = common::model_dir("native_bf16_sharded");
    damage::edit_json(&dir.path().join("model.safetensors.index.json"), |j| {
        j["weight_map"] = serde_json::json!({})
    });
    assert_refused(
        &caption(dir.path(), &[]),
        &["model.safetensors.index.json: ", "weight_map lists no tensors"],
    );
}

#[test]
fn strict_refuses_unused_tensors() {
    // Fewer layers in config.json than in the weights, in both layouts.
    for fixture in ["native_f32", "remote_f32"] {
        let dir = common::model_dir(fixture);
        damage::set_text_config(dir.path(), "encoder_layers", 0.into());
        damage::set_text_config(dir.path(), "decoder_layers", 0.into());
        assert!(caption(dir.path(), &[]).status.success(), "{fixture}: only a warning");
        assert_refused(
            &caption(dir.path(), &["--strict"]),
            &[
                "model.safetensors: ",
                "tensors are not used by the model config.json describes",
            ],
        );
    }
    // A non-tensor entry in a pytorch_model.bin.
    let dir = common::model_dir("remote_f16_bin");
    damage::add_bin_entry(dir.path(), "step");
    assert!(caption(dir.path(), &[]).status.success());
    assert_refused(
        &caption(dir.path(), &["--strict"]),
        &["pytorch_model.bin: 1 tensor is not used", "step (not a tensor)"],
    );
}

/// Unused tensors (config.json with fewer layers than the weights) are one warning line on
/// stderr; the image is still captioned and the exit status stays 0.
#[test]
fn unused_tensors_are_one_warning_line() {
    let dir = common::model_dir("native_f32");
    damage::set_text_config(dir.path(), "encoder_layers", 0.into());
    damage::set_text_config(dir.path(), "decoder_layers", 0.into());
    let o = caption(dir.path(), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let warnings: Vec<&str> = err.lines().filter(|l| l.starts_with("warning: ")).collect();
    assert_eq!(warnings.len(), 1, "{err}");
    assert!(
        warnings[0].contains("68 tensors are not used by the model config.json describes"),
        "{err}"
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).lines().count(),
        1,
        "the caption is printed"
    );
}
