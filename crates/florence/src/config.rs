//! Model configuration: `config.json` in either checkpoint layout, and `preprocessor_config.json`.
//!
//! Microsoft's remote-code configs and transformers' native configs describe the same model with
//! different field names (spec §9); both are parsed into one [`Florence2Config`].

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// Hyper-parameters of the DaViT vision encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    /// Channel width of each stage (`dim_embed` remote, `embed_dim` native).
    pub dim_embed: Vec<usize>,
    /// Attention heads of each stage's window attention.
    pub num_heads: Vec<usize>,
    /// Channel groups of each stage's channel attention.
    pub num_groups: Vec<usize>,
    /// Number of (spatial, channel) block pairs per stage.
    pub depths: Vec<usize>,
    /// Kernel size of each stage's patch-embedding convolution.
    pub patch_size: Vec<usize>,
    /// Stride of each stage's patch-embedding convolution.
    pub patch_stride: Vec<usize>,
    /// Padding of each stage's patch-embedding convolution.
    pub patch_padding: Vec<usize>,
    /// Whether a stage normalizes before (true) or after (false) its patch convolution.
    pub patch_prenorm: Vec<bool>,
    /// Side of the square attention windows.
    pub window_size: usize,
    /// Hidden width of the MLPs as a multiple of the stage width.
    pub mlp_ratio: f64,
    /// Width of the projected image features (the language model's `d_model`).
    pub projection_dim: usize,
    /// Rows of the learned 2D position tables.
    pub max_pos_embeddings: usize,
    /// Rows of the cosine temporal embedding table.
    pub max_temporal_embeddings: usize,
    /// Whether the attention `qkv` projections have a bias (native `qkv_bias`; Microsoft's
    /// DaViT always has one).
    pub qkv_bias: bool,
    /// Stochastic depth of the last block; the blocks' rates rise linearly from 0 to it
    /// (training only).
    pub drop_path_rate: f64,
}

/// Hyper-parameters of the BART language model, plus the generation fields Microsoft stores in it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TextConfig {
    /// Tokens in the vocabulary (rows of the shared embedding).
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub d_model: usize,
    /// Layers of the BART encoder.
    pub encoder_layers: usize,
    /// Layers of the BART decoder.
    pub decoder_layers: usize,
    /// Attention heads per encoder layer.
    pub encoder_attention_heads: usize,
    /// Attention heads per decoder layer.
    pub decoder_attention_heads: usize,
    /// Hidden width of the encoder MLPs.
    pub encoder_ffn_dim: usize,
    /// Hidden width of the decoder MLPs.
    pub decoder_ffn_dim: usize,
    /// Rows of the learned position tables (the longest sequence).
    pub max_position_embeddings: usize,
    /// The MLPs' activation (only `gelu` is supported).
    #[serde(default = "default_activation")]
    pub activation_function: String,
    /// Whether token embeddings are multiplied by `sqrt(d_model)`.
    #[serde(default)]
    pub scale_embedding: bool,
    /// The padding token.
    #[serde(default = "default_pad")]
    pub pad_token_id: u32,
    /// The `<s>` token.
    #[serde(default)]
    pub bos_token_id: u32,
    /// The `</s>` token.
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
    /// The token the decoder starts from.
    #[serde(default = "default_eos")]
    pub decoder_start_token_id: u32,
    /// Dropout on the embeddings and on every residual branch, in training.
    #[serde(default = "default_dropout")]
    pub dropout: f64,
    /// Dropout on the attention probabilities, in training.
    #[serde(default)]
    pub attention_dropout: f64,
    /// Dropout after the MLPs' activation, in training.
    #[serde(default)]
    pub activation_dropout: f64,
    /// Generation settings saved by transformers 4.x; `None` where the file does not set them.
    #[serde(flatten)]
    pub generation: GenerationOverrides,
}

/// Generation fields a config file may carry; unset fields fall back to the remote-code defaults.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct GenerationOverrides {
    /// Beams of beam search.
    pub num_beams: Option<usize>,
    /// Size of the n-grams that may not repeat.
    pub no_repeat_ngram_size: Option<usize>,
    /// Whether beam search stops when enough hypotheses are finished.
    pub early_stopping: Option<bool>,
    /// Exponent of the length in beam scores.
    pub length_penalty: Option<f64>,
    /// Token forced first.
    pub forced_bos_token_id: Option<u32>,
    /// Token forced at the maximum length.
    pub forced_eos_token_id: Option<u32>,
    /// Most new tokens.
    pub max_new_tokens: Option<usize>,
    /// Fewest new tokens before EOS.
    pub min_new_tokens: Option<usize>,
    /// Whether to sample.
    pub do_sample: Option<bool>,
    /// Sampling temperature.
    pub temperature: Option<f64>,
    /// Top-k filter when sampling.
    pub top_k: Option<usize>,
    /// Nucleus filter when sampling.
    pub top_p: Option<f64>,
    /// Relative probability floor when sampling.
    pub min_p: Option<f64>,
}

fn default_activation() -> String {
    "gelu".into()
}
fn default_pad() -> u32 {
    1
}
fn default_eos() -> u32 {
    2
}
/// BART's default `dropout` (its attention and activation dropouts default to 0).
fn default_dropout() -> f64 {
    0.1
}

/// Which of the two published checkpoint layouts a model directory uses (spec §9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Microsoft's `trust_remote_code` layout (`microsoft/Florence-2-*` and their fine-tunes).
    Remote,
    /// transformers' built-in `Florence2ForConditionalGeneration` (`florence-community/*`).
    Native,
}

/// The whole model configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Florence2Config {
    /// The DaViT vision tower and projector.
    pub vision: VisionConfig,
    /// The BART language model.
    pub text: TextConfig,
    /// The layout the config file was written for; the weights decide the layout used for loading.
    pub config_layout: Layout,
}

#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vision_config: Option<RawVisionConfig>,
    text_config: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct RawVisionConfig {
    dim_embed: Option<Vec<usize>>,
    embed_dim: Option<Vec<usize>>,
    #[serde(default = "d_heads")]
    num_heads: Vec<usize>,
    #[serde(default = "d_heads")]
    num_groups: Vec<usize>,
    #[serde(default = "d_depths")]
    depths: Vec<usize>,
    #[serde(default = "d_patch_size")]
    patch_size: Vec<usize>,
    #[serde(default = "d_patch_stride")]
    patch_stride: Vec<usize>,
    #[serde(default = "d_patch_padding")]
    patch_padding: Vec<usize>,
    #[serde(default = "d_prenorm")]
    patch_prenorm: Vec<bool>,
    #[serde(default = "d_window")]
    window_size: usize,
    #[serde(default = "d_mlp_ratio")]
    mlp_ratio: f64,
    #[serde(default = "d_qkv_bias")]
    qkv_bias: bool,
    #[serde(default = "d_drop_path_rate")]
    drop_path_rate: f64,
    projection_dim: Option<usize>,
    image_pos_embed: Option<RawPosEmbed>,
    visual_temporal_embedding: Option<RawTemporalEmbed>,
    max_position_embeddings: Option<usize>,
    max_temporal_embeddings: Option<usize>,
    image_feature_source: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct RawPosEmbed {
    max_pos_embeddings: Option<usize>,
}
#[derive(Deserialize)]
struct RawTemporalEmbed {
    max_temporal_embeddings: Option<usize>,
}

fn d_heads() -> Vec<usize> {
    vec![4, 8, 16, 32]
}
fn d_depths() -> Vec<usize> {
    vec![1, 1, 9, 1]
}
fn d_patch_size() -> Vec<usize> {
    vec![7, 3, 3, 3]
}
fn d_patch_stride() -> Vec<usize> {
    vec![4, 2, 2, 2]
}
fn d_patch_padding() -> Vec<usize> {
    vec![3, 1, 1, 1]
}
fn d_prenorm() -> Vec<bool> {
    vec![false, true, true, true]
}
fn d_window() -> usize {
    12
}
fn d_mlp_ratio() -> f64 {
    4.0
}
fn d_qkv_bias() -> bool {
    true
}
fn d_drop_path_rate() -> f64 {
    0.1
}

impl Florence2Config {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text).map_err(|e| e.in_file(path))
    }

    /// Parses a `config.json` text in either layout.
    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| Error::config(format!("not valid JSON: {e}")))?;
        if let Some(mt) = &raw.model_type {
            if mt != "florence2" {
                return Err(Error::config(format!(
                    "model_type is \"{mt}\", not \"florence2\": this is not a Florence-2 model"
                )));
            }
        }
        let (Some(v), Some(t)) = (raw.vision_config, raw.text_config) else {
            return Err(Error::config(
                "missing vision_config or text_config: this is not a Florence-2 model config",
            ));
        };
        let config_layout = if v.embed_dim.is_some() {
            Layout::Native
        } else {
            Layout::Remote
        };
        let dim_embed = v.dim_embed.or(v.embed_dim).unwrap_or_else(|| vec![128, 256, 512, 1024]);
        let text: TextConfig = serde_json::from_value(t).map_err(|e| Error::config(format!("text_config: {e}")))?;
        let projection_dim = v.projection_dim.unwrap_or(text.d_model);
        let vision = VisionConfig {
            dim_embed,
            num_heads: v.num_heads,
            num_groups: v.num_groups,
            depths: v.depths,
            patch_size: v.patch_size,
            patch_stride: v.patch_stride,
            patch_padding: v.patch_padding,
            patch_prenorm: v.patch_prenorm,
            window_size: v.window_size,
            mlp_ratio: v.mlp_ratio,
            projection_dim,
            max_pos_embeddings: v
                .image_pos_embed
                .and_then(|p| p.max_pos_embeddings)
                .or(v.max_position_embeddings)
                .unwrap_or(50),
            max_temporal_embeddings: v
                .visual_temporal_embedding
                .and_then(|p| p.max_temporal_embeddings)
                .or(v.max_temporal_embeddings)
                .unwrap_or(100),
            qkv_bias: v.qkv_bias,
            drop_path_rate: v.drop_path_rate,
        };
        if let Some(src) = &v.image_feature_source {
            if src != &["spatial_avg_pool", "temporal_avg_pool"] {
                return Err(Error::config(format!(
                    "image_feature_source {src:?} is not supported (only [\"spatial_avg_pool\", \"temporal_avg_pool\"])"
                )));
            }
        }
        let cfg = Self {
            vision,
            text,
            config_layout,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        let v = &self.vision;
        let n = v.dim_embed.len();
        let lists = [
            ("num_heads", v.num_heads.len()),
            ("num_groups", v.num_groups.len()),
            ("depths", v.depths.len()),
            ("patch_size", v.patch_size.len()),
            ("patch_stride", v.patch_stride.len()),
            ("patch_padding", v.patch_padding.len()),
            ("patch_prenorm", v.patch_prenorm.len()),
        ];
        if n == 0 {
            return Err(Error::config("vision_config has no stages"));
        }
        for (name, len) in lists {
            if len != n {
                return Err(Error::config(format!(
                    "vision_config.{name} has {len} entries but there are {n} stages"
                )));
            }
        }
        for i in 0..n {
            let c = v.dim_embed[i];
            if v.num_heads[i] == 0 || !c.is_multiple_of(v.num_heads[i]) {
                return Err(Error::config(format!(
                    "vision stage {i}: {c} channels do not split into {} heads",
                    v.num_heads[i]
                )));
            }
            if v.num_groups[i] == 0 || !c.is_multiple_of(v.num_groups[i]) {
                return Err(Error::config(format!(
                    "vision stage {i}: {c} channels do not split into {} groups",
                    v.num_groups[i]
                )));
            }
            if v.patch_size[i] == 0 || v.patch_stride[i] == 0 {
                return Err(Error::config(format!("vision stage {i}: zero patch size or stride")));
            }
        }
        if v.window_size == 0 {
            return Err(Error::config("vision_config.window_size must be positive"));
        }
        if !(0.0..1.0).contains(&v.drop_path_rate) {
            return Err(Error::config(format!(
                "vision_config.drop_path_rate {} is not in [0, 1)",
                v.drop_path_rate
            )));
        }
        if !v.dim_embed[n - 1].is_multiple_of(2) {
            return Err(Error::config("the last vision stage needs an even channel count"));
        }
        let t = &self.text;
        for (name, heads) in [
            ("encoder_attention_heads", t.encoder_attention_heads),
            ("decoder_attention_heads", t.decoder_attention_heads),
        ] {
            if heads == 0 || !t.d_model.is_multiple_of(heads) {
                return Err(Error::config(format!(
                    "text_config.{name} = {heads} does not divide d_model = {}",
                    t.d_model
                )));
            }
        }
        if v.projection_dim != t.d_model {
            return Err(Error::config(format!(
                "vision projection_dim {} differs from text d_model {}",
                v.projection_dim, t.d_model
            )));
        }
        for (name, p) in [
            ("dropout", t.dropout),
            ("attention_dropout", t.attention_dropout),
            ("activation_dropout", t.activation_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(Error::config(format!(
                    "text_config.{name} = {p} is not a probability below 1"
                )));
            }
        }
        if t.activation_function != "gelu" {
            return Err(Error::config(format!(
                "text_config.activation_function \"{}\" is not supported (only \"gelu\")",
                t.activation_function
            )));
        }
        Ok(())
    }
}

/// Image preprocessing settings (`preprocessor_config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessorConfig {
    /// Width the images are resized to.
    pub width: usize,
    /// Height the images are resized to.
    pub height: usize,
    /// Per-channel mean subtracted after rescaling.
    pub image_mean: [f32; 3],
    /// Per-channel standard deviation divided by.
    pub image_std: [f32; 3],
    /// Factor from 0..255 to 0..1.
    pub rescale_factor: f64,
    /// PIL resample filter id; only 3 (bicubic) is supported.
    pub resample: u32,
}

impl Default for PreprocessorConfig {
    fn default() -> Self {
        Self {
            width: 768,
            height: 768,
            // f64 constants narrowed like numpy's `np.array(mean, dtype=float32)`.
            image_mean: [0.485f64 as f32, 0.456f64 as f32, 0.406f64 as f32],
            image_std: [0.229f64 as f32, 0.224f64 as f32, 0.225f64 as f32],
            rescale_factor: 1.0 / 255.0,
            resample: 3,
        }
    }
}

#[derive(Deserialize)]
struct RawPreprocessor {
    size: Option<RawSize>,
    image_mean: Option<[f64; 3]>,
    image_std: Option<[f64; 3]>,
    rescale_factor: Option<f64>,
    resample: Option<u32>,
    /// transformers 5 `processor_config.json` nests the image processor.
    image_processor: Option<Box<RawPreprocessor>>,
}

#[derive(Deserialize)]
struct RawSize {
    height: Option<usize>,
    width: Option<usize>,
    shortest_edge: Option<usize>,
}

impl PreprocessorConfig {
    /// Parses `preprocessor_config.json` (or the `image_processor` part of `processor_config.json`).
    pub fn from_json(text: &str) -> Result<Self> {
        let mut raw: RawPreprocessor =
            serde_json::from_str(text).map_err(|e| Error::config(format!("not valid JSON: {e}")))?;
        if let Some(inner) = raw.image_processor.take() {
            raw = *inner;
        }
        let mut cfg = Self::default();
        if let Some(size) = raw.size {
            match (size.height, size.width, size.shortest_edge) {
                (Some(h), Some(w), _) => (cfg.height, cfg.width) = (h, w),
                (_, _, Some(s)) => (cfg.height, cfg.width) = (s, s),
                _ => return Err(Error::config("size needs height and width")),
            }
        }
        if let Some(m) = raw.image_mean {
            cfg.image_mean = m.map(|v| v as f32);
        }
        if let Some(s) = raw.image_std {
            cfg.image_std = s.map(|v| v as f32);
        }
        if let Some(r) = raw.rescale_factor {
            cfg.rescale_factor = r;
        }
        if let Some(r) = raw.resample {
            cfg.resample = r;
        }
        if cfg.resample != 3 {
            return Err(Error::config(format!(
                "resample = {} is not supported (only 3, bicubic, as every Florence-2 checkpoint uses)",
                cfg.resample
            )));
        }
        if cfg.width == 0 || cfg.height == 0 {
            return Err(Error::config("image size must be positive"));
        }
        Ok(cfg)
    }

    /// Reads the preprocessor settings from a file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text).map_err(|e| e.in_file(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_path_rate_is_read_defaulted_and_checked() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/native_f32/config.json");
        let text = std::fs::read_to_string(path).unwrap();
        let field = "\"drop_path_rate\": 0.1,";
        assert!(text.contains(field));
        let with = |value: &str| Florence2Config::from_json(&text.replace(field, value));
        assert_eq!(with("\"drop_path_rate\": 0.25,").unwrap().vision.drop_path_rate, 0.25);
        assert_eq!(with("").unwrap().vision.drop_path_rate, 0.1, "transformers' default");
        let err = with("\"drop_path_rate\": 1.0,").unwrap_err();
        assert!(err.to_string().contains("drop_path_rate"), "{err}");
    }
}
