//! Loading refuses checkpoints that differ from what their config describes: every tensor the
//! config needs is present (or one the reference derives), every tensor present is used, or
//! the load says so. One test per kind of damage, on copies of the fixture models, in both
//! layouts.

mod common;
mod damage;

use std::path::Path;

use florence::checkpoint::names;
use florence::{Florence, LoadOptions};

fn load(dir: &Path, strict: bool) -> florence::Result<Florence> {
    Florence::load(
        dir,
        &LoadOptions {
            strict,
            ..LoadOptions::default()
        },
    )
}

fn load_err(dir: &Path, strict: bool) -> String {
    let e = load(dir, strict).expect_err("the load is refused").to_string();
    assert_eq!(e.lines().count(), 1, "one line: {e}");
    e
}

/// The generated ids of the fixture's first case.
fn first_case_ids(model: &Florence, fixture: &str) -> Vec<Vec<u32>> {
    let case = &common::cases(fixture)["cases"][0];
    let (task, images) = common::case_inputs(case);
    let out = model.run(&images, &task, model.generation_config()).unwrap();
    out.into_iter().map(|o| o.ids).collect()
}

#[test]
fn every_fixture_loads_without_warnings() {
    for name in common::model_names() {
        let dir = common::model_dir(&name);
        let model = load(dir.path(), true).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(model.warnings().is_empty(), "{name}: {:?}", model.warnings());
    }
}

#[test]
fn a_deleted_weight_is_refused_by_name() {
    for (fixture, name) in [
        (
            "native_f32",
            "model.vision_tower.blocks.1.1.channel_block.channel_attn.qkv.weight",
        ),
        ("native_bf16_sharded", "model.language_model.shared.weight"),
        ("remote_f32", "image_pos_embed.row_embeddings.weight"),
    ] {
        let dir = common::model_dir(fixture);
        damage::remove_tensor(dir.path(), name);
        let e = load_err(dir.path(), false);
        assert!(e.contains(&format!("tensor {name} is missing")), "{e}");
        assert!(e.contains("download the model folder again"), "{e}");
    }
}

#[test]
fn a_deleted_bias_is_refused_by_name() {
    for (fixture, name) in [
        (
            "native_f32",
            "model.language_model.decoder.layers.0.encoder_attn.out_proj.bias",
        ),
        ("native_f32", "model.vision_tower.convs.0.conv.bias"),
        ("remote_f32", "language_model.model.encoder.layers.1.fc2.bias"),
        ("remote_f32", "image_proj_norm.bias"),
    ] {
        let dir = common::model_dir(fixture);
        damage::remove_tensor(dir.path(), name);
        let e = load_err(dir.path(), false);
        let file = dir.path().join("model.safetensors");
        assert!(
            e.starts_with(&format!("{}: tensor {name} is missing", file.display())),
            "{e}"
        );
        assert!(e.contains("a conversion that dropped biases"), "{e}");
    }
}

/// `lm_head` and the `embed_tokens` copies are tied to `shared`: a file may carry them or not.
#[test]
fn tied_copies_may_be_present_or_absent() {
    for (fixture, shared, tied) in [
        (
            "native_f32",
            "model.language_model.shared.weight",
            [
                "lm_head.weight",
                "model.language_model.encoder.embed_tokens.weight",
                "model.language_model.decoder.embed_tokens.weight",
            ],
        ),
        (
            "remote_f32",
            "language_model.model.shared.weight",
            [
                "language_model.lm_head.weight",
                "language_model.model.encoder.embed_tokens.weight",
                "language_model.model.decoder.embed_tokens.weight",
            ],
        ),
    ] {
        let dir = common::model_dir(fixture);
        assert!(damage::tensor_names(dir.path())
            .iter()
            .all(|n| !tied.contains(&n.as_str())));
        let want = first_case_ids(&load(dir.path(), true).unwrap(), fixture);
        for t in tied {
            damage::copy_tensor(dir.path(), shared, t);
        }
        let model = load(dir.path(), true).unwrap();
        assert!(model.warnings().is_empty(), "{fixture}: {:?}", model.warnings());
        assert_eq!(first_case_ids(&model, fixture), want);
    }
    // Microsoft's .bin carries them.
    let dir = common::model_dir("remote_f16_bin");
    let model = load(dir.path(), true).unwrap();
    assert!(model.warnings().is_empty(), "{:?}", model.warnings());
}

/// The tensors the reference derives when a file omits them: the temporal embedding table
/// (computed) and `final_logits_bias` (zeros). Leaving them out changes nothing.
#[test]
fn derived_tensors_may_be_absent() {
    for (fixture, derived) in [
        (
            "native_f32",
            &["model.multi_modal_projector.visual_temporal_embed.pos_idx_to_embed"][..],
        ),
        (
            "remote_f32",
            &[
                "visual_temporal_embed.pos_idx_to_embed",
                "language_model.final_logits_bias",
            ][..],
        ),
    ] {
        let dir = common::model_dir(fixture);
        let want = first_case_ids(&load(dir.path(), true).unwrap(), fixture);
        for name in derived {
            damage::remove_tensor(dir.path(), name);
        }
        let model = load(dir.path(), true).unwrap();
        assert!(model.warnings().is_empty(), "{fixture}: {:?}", model.warnings());
        assert_eq!(first_case_ids(&model, fixture), want, "{fixture}");
    }
}

#[test]
fn fewer_layers_than_the_weights_warn_and_strict_refuses() {
    for (fixture, file, unused) in [
        ("native_f32", "model.safetensors", 16 + 26 * 2),
        ("remote_f32", "model.safetensors", 16 * 2 + 26 * 2),
        ("remote_f16_bin", "pytorch_model.bin", 16 + 26),
    ] {
        let dir = common::model_dir(fixture);
        damage::set_text_config(dir.path(), "encoder_layers", 0.into());
        damage::set_text_config(dir.path(), "decoder_layers", 0.into());
        let model = load(dir.path(), false).unwrap();
        let [w] = model.warnings() else {
            panic!("{fixture}: one warning: {:?}", model.warnings())
        };
        let path = dir.path().join(file);
        assert!(
            w.starts_with(&format!(
                "{}: {unused} tensors are not used by the model config.json describes (",
                path.display()
            )),
            "{w}"
        );
        assert!(w.contains(&format!("and {} more)", unused - 3)), "{w}");
        assert!(
            w.contains("encoder.layers.0.") || w.contains("decoder.layers.0."),
            "{w}"
        );
        let e = load_err(dir.path(), true);
        assert!(e.starts_with(w.as_str()), "{e}");
        assert!(e.ends_with("strict loading refuses them"), "{e}");
    }
}

#[test]
fn an_extra_tensor_warns_by_name() {
    for (fixture, extra) in [
        ("native_f32", "model.vision_tower.norms.weight"),
        ("native_bf16_sharded", "model.language_model.encoder.layers.7.fc1.bias"),
        ("remote_f32", "vision_tower.head.weight"),
        ("remote_f32", "language_model.model.encoder.layernorm.weight"),
    ] {
        let dir = common::model_dir(fixture);
        let want = first_case_ids(&load(dir.path(), true).unwrap(), fixture);
        damage::add_tensor(dir.path(), extra, 4);
        let model = load(dir.path(), false).unwrap();
        let [w] = model.warnings() else {
            panic!("{fixture}: one warning: {:?}", model.warnings())
        };
        assert!(
            w.contains(&format!(
                "1 tensor is not used by the model config.json describes ({extra})"
            )),
            "{w}"
        );
        assert_eq!(first_case_ids(&model, fixture), want, "{fixture}");
        assert!(load_err(dir.path(), true).contains(extra));
    }
}

/// A config without qkv biases over a file with them: they are unused (and not applied).
#[test]
fn qkv_biases_the_config_does_not_have_are_unused() {
    let fixture = "native_variant_f16";
    let dir = common::model_dir(fixture);
    let want = first_case_ids(&load(dir.path(), true).unwrap(), fixture);
    let name = "model.vision_tower.blocks.0.0.spatial_block.window_attn.qkv.bias";
    damage::add_tensor(dir.path(), name, 24);
    let model = load(dir.path(), false).unwrap();
    assert_eq!(model.warnings().len(), 1);
    assert!(
        model.warnings()[0].contains(&format!("({name})")),
        "{:?}",
        model.warnings()
    );
    assert_eq!(first_case_ids(&model, fixture), want);
    // The same config saying it has them refuses the file for the ones missing.
    damage::edit_json(&dir.path().join("config.json"), |j| {
        j["vision_config"]["qkv_bias"] = true.into()
    });
    let e = load_err(dir.path(), false);
    assert!(
        e.contains("tensor model.vision_tower.blocks.0.0.channel_block.channel_attn.qkv.bias is missing"),
        "{e}"
    );
}

#[test]
fn a_non_tensor_entry_in_a_bin_is_unused() {
    let dir = common::model_dir("remote_f16_bin");
    damage::add_bin_entry(dir.path(), "optimizer_step");
    let model = load(dir.path(), false).unwrap();
    let path = dir.path().join("pytorch_model.bin");
    assert_eq!(
        model.warnings(),
        [format!(
            "{}: 1 tensor is not used by the model config.json describes (optimizer_step (not a tensor)): \
             check that config.json belongs to these weights",
            path.display()
        )]
    );
    let e = load_err(dir.path(), true);
    assert!(e.contains("optimizer_step (not a tensor)"), "{e}");
}

/// An index whose `weight_map` is empty used to panic (the first file of an empty list).
#[test]
fn an_empty_shard_index_is_an_error() {
    let dir = common::model_dir("native_bf16_sharded");
    let index = dir.path().join("model.safetensors.index.json");
    damage::edit_json(&index, |j| j["weight_map"] = serde_json::json!({}));
    let e = load_err(dir.path(), false);
    assert!(
        e.starts_with(&format!("{}: its weight_map lists no tensors", index.display())),
        "{e}"
    );
}

/// A model saved in the other layout through the name table (as fine-tuned weights would be)
/// loads back with nothing missing or unused, and computes the same.
#[test]
fn weights_renamed_to_the_other_layout_load_back() {
    use candle_core::safetensors::{load as read, save};
    for (fixture, to_native) in [("remote_f32", true), ("native_f32", false)] {
        let dir = common::model_dir(fixture);
        let want = first_case_ids(&load(dir.path(), true).unwrap(), fixture);
        let path = dir.path().join("model.safetensors");
        let tensors = read(&path, &candle_core::Device::Cpu).unwrap();
        let renamed: std::collections::HashMap<String, candle_core::Tensor> = tensors
            .into_iter()
            .filter_map(|(name, t)| {
                let remote = if to_native {
                    name.clone()
                } else {
                    names::native_to_remote(&name).unwrap()
                };
                let t = if names::transposed(&remote) {
                    t.t().unwrap().contiguous().unwrap()
                } else {
                    t
                };
                // The native layout has no final_logits_bias: saving drops it, as transformers does.
                let name = if to_native {
                    names::remote_to_native(&name)?
                } else {
                    remote
                };
                Some((name, t))
            })
            .collect();
        save(&renamed, &path).unwrap();
        let model = load(dir.path(), true).unwrap();
        assert!(model.warnings().is_empty(), "{fixture}: {:?}", model.warnings());
        let layout = if to_native {
            florence::Layout::Native
        } else {
            florence::Layout::Remote
        };
        assert_eq!(model.network().unwrap().layout, layout);
        assert_eq!(first_case_ids(&model, fixture), want, "{fixture}");
    }
}
