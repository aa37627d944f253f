//! Tensor names in the two checkpoint layouts (spec §9): one table, read both ways, and the
//! tensors a config needs.
//!
//! The model reads remote-layout names (Microsoft's, which the modules mirror with `vb.pp`).
//! Native-layout files are translated on load with [`native_to_remote`]; [`remote_to_native`]
//! names a tensor in a native file, so that weights can be written back in the layout they came
//! in and messages name tensors as the file does.

use crate::config::{Florence2Config, Layout};

/// The table: each row a remote-layout name pattern and the native-layout pattern of the same
/// tensors (`None`: the native layout has no such tensor). In a pattern `*` stands for one
/// dot-separated part of a name (an index, a block kind, a parameter), `**` for the rest of it;
/// a name's wildcards carry over in order. Exactly one row matches each name of either layout.
const TABLE: &[(&str, Option<&str>)] = &[
    ("vision_tower.convs.*.proj.*", Some("model.vision_tower.convs.*.conv.*")),
    ("vision_tower.convs.*.norm.*", Some("model.vision_tower.convs.*.norm.*")),
    // Blocks: `*.*.*` is stage, block and `spatial_block` or `channel_block`.
    (
        "vision_tower.blocks.*.*.*.conv1.fn.dw.*",
        Some("model.vision_tower.blocks.*.*.*.conv1.*"),
    ),
    (
        "vision_tower.blocks.*.*.*.conv2.fn.dw.*",
        Some("model.vision_tower.blocks.*.*.*.conv2.*"),
    ),
    (
        "vision_tower.blocks.*.*.spatial_block.window_attn.norm.*",
        Some("model.vision_tower.blocks.*.*.spatial_block.norm1.*"),
    ),
    (
        "vision_tower.blocks.*.*.channel_block.channel_attn.norm.*",
        Some("model.vision_tower.blocks.*.*.channel_block.norm1.*"),
    ),
    (
        "vision_tower.blocks.*.*.spatial_block.window_attn.fn.*.*",
        Some("model.vision_tower.blocks.*.*.spatial_block.window_attn.*.*"),
    ),
    (
        "vision_tower.blocks.*.*.channel_block.channel_attn.fn.*.*",
        Some("model.vision_tower.blocks.*.*.channel_block.channel_attn.*.*"),
    ),
    (
        "vision_tower.blocks.*.*.*.ffn.norm.*",
        Some("model.vision_tower.blocks.*.*.*.norm2.*"),
    ),
    (
        "vision_tower.blocks.*.*.*.ffn.fn.net.*.*",
        Some("model.vision_tower.blocks.*.*.*.ffn.*.*"),
    ),
    // A matrix `[in, out]` in the remote layout, a Linear's `[out, in]` in the native one.
    (
        "image_projection",
        Some("model.multi_modal_projector.image_projection.weight"),
    ),
    (
        "image_proj_norm.*",
        Some("model.multi_modal_projector.image_proj_norm.*"),
    ),
    (
        "image_pos_embed.*.*",
        Some("model.multi_modal_projector.image_position_embed.*.*"),
    ),
    (
        "visual_temporal_embed.pos_idx_to_embed",
        Some("model.multi_modal_projector.visual_temporal_embed.pos_idx_to_embed"),
    ),
    // The BART model, `shared` and the tied `embed_tokens` included, has the same names in both.
    ("language_model.model.**", Some("model.language_model.**")),
    ("language_model.lm_head.weight", Some("lm_head.weight")),
    ("language_model.final_logits_bias", None),
];

/// The native-layout name of the remote-layout tensor `name`; `None` for a tensor the native
/// layout does not have (`final_logits_bias`) or a name the table does not know.
pub fn remote_to_native(name: &str) -> Option<String> {
    TABLE
        .iter()
        .find_map(|(remote, native)| Some(fill(native.as_ref()?, &captures(remote, name)?)))
}

/// The remote-layout name of the native-layout tensor `name`; `None` for a name the table does
/// not know.
pub fn native_to_remote(name: &str) -> Option<String> {
    TABLE
        .iter()
        .find_map(|(remote, native)| Some(fill(remote, &captures(native.as_ref()?, name)?)))
}

/// Whether the remote-layout tensor `name` is stored transposed in the native layout.
pub fn transposed(name: &str) -> bool {
    name == "image_projection"
}

/// The parts of `name` that the wildcards of `pattern` stand for, if it matches.
fn captures<'a>(pattern: &str, name: &'a str) -> Option<Vec<&'a str>> {
    let mut caps = Vec::new();
    let mut rest = Some(name);
    for p in pattern.split('.') {
        let r = rest?;
        if p == "**" {
            caps.push(r);
            rest = None;
            continue;
        }
        let (part, tail) = r.split_once('.').map_or((r, None), |(a, b)| (a, Some(b)));
        match p {
            "*" => caps.push(part),
            _ if p != part => return None,
            _ => {}
        }
        rest = tail;
    }
    rest.is_none().then_some(caps)
}

/// `pattern` with its wildcards replaced by `caps`, in order.
fn fill(pattern: &str, caps: &[&str]) -> String {
    let mut caps = caps.iter();
    pattern
        .split('.')
        .map(|p| match p {
            "*" | "**" => caps.next().copied().unwrap_or(p),
            _ => p,
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// The layout a set of tensor names comes from.
pub fn detect_layout(names: impl IntoIterator<Item = impl AsRef<str>>) -> Option<Layout> {
    for n in names {
        let n = n.as_ref();
        if n.starts_with("model.vision_tower.") || n.starts_with("model.language_model.") {
            return Some(Layout::Native);
        }
        if n.starts_with("vision_tower.") || n.starts_with("language_model.") {
            return Some(Layout::Remote);
        }
    }
    None
}

/// Whether a file must have a tensor of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// The model reads it: a file without it is refused.
    Required,
    /// The model reads it when the file has it and otherwise derives it, as the reference does.
    Derived,
    /// A copy of `shared`, which the model uses instead (tied weights): a file may have it or not.
    Tied,
}

/// Every tensor of the model `config` describes, under its remote-layout name, in the order
/// the model reads them. A file's tensors that are not in this list are not used.
///
/// Tensors a file may omit, and why:
/// - `language_model.lm_head.weight` and `language_model.model.{encoder,decoder}.embed_tokens.weight`
///   are [`Need::Tied`] to `language_model.model.shared.weight`; `save_pretrained` leaves them out.
/// - `language_model.final_logits_bias` is [`Need::Derived`]: zeros, the reference's initial value,
///   which training never changes; the native layout has none.
/// - `visual_temporal_embed.pos_idx_to_embed` is [`Need::Derived`]: the reference computes the
///   cosine table (spec §4); the projector uses its row 0, 0 on even channels and 1 on odd ones.
pub fn expected(config: &Florence2Config) -> Vec<(String, Need)> {
    let mut names = Vec::new();
    let mut add = |prefix: &str, params: &[&str], need: Need| {
        for p in params {
            names.push((format!("{prefix}{p}"), need));
        }
    };
    let affine = &["weight", "bias"][..];
    let v = &config.vision;
    for s in 0..v.dim_embed.len() {
        add(&format!("vision_tower.convs.{s}.proj."), affine, Need::Required);
        add(&format!("vision_tower.convs.{s}.norm."), affine, Need::Required);
        for b in 0..v.depths[s] {
            for (kind, attn) in [("spatial_block", "window_attn"), ("channel_block", "channel_attn")] {
                let block = format!("vision_tower.blocks.{s}.{b}.{kind}.");
                add(&format!("{block}conv1.fn.dw."), affine, Need::Required);
                add(&format!("{block}{attn}.norm."), affine, Need::Required);
                let qkv = if v.qkv_bias { affine } else { &["weight"][..] };
                add(&format!("{block}{attn}.fn.qkv."), qkv, Need::Required);
                add(&format!("{block}{attn}.fn.proj."), affine, Need::Required);
                add(&format!("{block}conv2.fn.dw."), affine, Need::Required);
                add(&format!("{block}ffn.norm."), affine, Need::Required);
                add(&format!("{block}ffn.fn.net.fc1."), affine, Need::Required);
                add(&format!("{block}ffn.fn.net.fc2."), affine, Need::Required);
            }
        }
    }
    add("image_pos_embed.row_embeddings.", &["weight"], Need::Required);
    add("image_pos_embed.column_embeddings.", &["weight"], Need::Required);
    add("visual_temporal_embed.", &["pos_idx_to_embed"], Need::Derived);
    add("", &["image_projection"], Need::Required);
    add("image_proj_norm.", affine, Need::Required);

    let t = &config.text;
    let lm = "language_model.model.";
    add(lm, &["shared.weight"], Need::Required);
    let attention = |add: &mut dyn FnMut(&str, &[&str], Need), prefix: &str| {
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            add(&format!("{prefix}.{proj}."), affine, Need::Required);
        }
        add(&format!("{prefix}_layer_norm."), affine, Need::Required);
    };
    for (stack, layers) in [("encoder", t.encoder_layers), ("decoder", t.decoder_layers)] {
        add(&format!("{lm}{stack}."), &["embed_tokens.weight"], Need::Tied);
        add(&format!("{lm}{stack}.embed_positions."), &["weight"], Need::Required);
        add(&format!("{lm}{stack}.layernorm_embedding."), affine, Need::Required);
        for l in 0..layers {
            let layer = format!("{lm}{stack}.layers.{l}.");
            attention(&mut add, &format!("{layer}self_attn"));
            if stack == "decoder" {
                attention(&mut add, &format!("{layer}encoder_attn"));
            }
            for p in ["fc1.", "fc2.", "final_layer_norm."] {
                add(&format!("{layer}{p}"), affine, Need::Required);
            }
        }
    }
    add("language_model.", &["final_logits_bias"], Need::Derived);
    add("language_model.lm_head.", &["weight"], Need::Tied);
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The state-dict keys of a real Florence-2-base model in one layout.
    fn keys(file: &str) -> Vec<String> {
        let path = crate::testdata_dir().join(file);
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .lines()
            .map(|l| l.split('\t').next().unwrap().to_string())
            .collect()
    }

    /// How many rows of the table match `name`, on the native side or the remote one.
    fn rows_matching(name: &str, native: bool) -> usize {
        TABLE
            .iter()
            .filter_map(|&(r, n)| if native { n } else { Some(r) })
            .filter(|p| captures(p, name).is_some())
            .count()
    }

    /// Every key of both layouts of a real Florence-2-base file matches one row of the table,
    /// and maps onto a key of the other layout and back.
    #[test]
    fn every_key_round_trips() {
        let remote = keys("keys_remote_layout.txt");
        let native = keys("keys_native_layout.txt");
        assert_eq!(detect_layout(&remote), Some(Layout::Remote));
        assert_eq!(detect_layout(&native), Some(Layout::Native));
        for n in &native {
            assert_eq!(rows_matching(n, true), 1, "{n}");
            let r = native_to_remote(n).unwrap_or_else(|| panic!("{n} has no remote name"));
            assert!(remote.contains(&r), "{n} -> {r} is not a remote key");
            assert_eq!(remote_to_native(&r).as_deref(), Some(n.as_str()), "{n} -> {r} -> ?");
        }
        let mut remote_only = Vec::new();
        for r in &remote {
            assert_eq!(rows_matching(r, false), 1, "{r}");
            match remote_to_native(r) {
                Some(n) => assert_eq!(native_to_remote(&n).as_deref(), Some(r.as_str()), "{r} -> {n} -> ?"),
                None => remote_only.push(r.as_str()),
            }
        }
        assert_eq!(remote_only, ["language_model.final_logits_bias"]);
        // The remote file has the tied copies, which the native file leaves out; the native
        // names of those are the ones the native model's state dict has.
        let mut extra: Vec<String> = remote
            .iter()
            .filter_map(|r| remote_to_native(r))
            .filter(|n| !native.contains(n))
            .collect();
        extra.sort();
        assert_eq!(
            extra,
            [
                "lm_head.weight",
                "model.language_model.decoder.embed_tokens.weight",
                "model.language_model.encoder.embed_tokens.weight",
            ]
        );
    }

    /// For Florence-2-base's config, the expected tensors are exactly a real base file's keys.
    #[test]
    fn base_expects_exactly_the_keys_of_a_base_file() {
        let large = crate::testdata_dir().join("microsoft-florence-2-large/config.json");
        let large = Florence2Config::from_file(&large).unwrap();
        // Base differs from large in widths, which names do not show, and in depths.
        let base = Florence2Config {
            vision: crate::config::VisionConfig {
                depths: vec![1, 1, 9, 1],
                ..large.vision.clone()
            },
            text: crate::config::TextConfig {
                encoder_layers: 6,
                decoder_layers: 6,
                ..large.text.clone()
            },
            ..large
        };
        let mut names: Vec<String> = expected(&base).into_iter().map(|(n, _)| n).collect();
        let mut remote = keys("keys_remote_layout.txt");
        names.sort();
        remote.sort();
        assert_eq!(names, remote);
    }

    #[test]
    fn unknown_names_have_no_counterpart() {
        for name in [
            "vision_tower.norms.weight",
            "vision_tower.head.bias",
            "something.else",
            "",
        ] {
            assert_eq!(remote_to_native(name), None, "{name}");
        }
        for name in [
            "model.vision_tower.norms.weight",
            "language_model.model.shared.weight",
            "x",
        ] {
            assert_eq!(native_to_remote(name), None, "{name}");
        }
    }
}
