//! The image-feature projector for the tensor path (spec §4): the fast path's position
//! embeddings, pooling and projection, which are plain candle operations already, then the
//! differentiable layer norm.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::ops::{LayerNorm, Mode};
use super::segment::{single, Segment};
use crate::config::VisionConfig;
use crate::error::Result;
use crate::projector::ImageTokens;

/// Projects DaViT's last feature map into `[B, 1 + h*w, d_model]` language-model embeddings.
#[derive(Debug, Clone)]
pub struct ImageProjector {
    tokens: ImageTokens,
    image_proj_norm: LayerNorm,
}

impl ImageProjector {
    /// Reads `image_pos_embed`, `visual_temporal_embed` (a buffer, derived when absent),
    /// `image_projection` and `image_proj_norm` from the root of the checkpoint (`vb`).
    pub fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            tokens: ImageTokens::new(cfg, &vb)?,
            image_proj_norm: LayerNorm::new(cfg.projection_dim, 1e-5, vb.pp("image_proj_norm"))?,
        })
    }

    /// `features` `[B, h, w, C]` (channel-last) to `[B, 1 + h*w, d_model]`, the mean-pooled
    /// token first.
    pub fn forward(&self, features: &Tensor) -> Result<Tensor> {
        self.image_proj_norm.forward(&self.tokens.forward(features)?)
    }
}

/// `[features]` to `[image_embeds]`.
impl Segment for ImageProjector {
    fn forward(&self, inputs: &[Tensor], _: &mut Mode) -> Result<Vec<Tensor>> {
        Ok(vec![ImageProjector::forward(self, single(inputs)?)?])
    }
}
