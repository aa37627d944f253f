//! The image-feature projector: position embeddings, pooling and projection into the language
//! model's embedding space (spec §4).

use candle_core::{Device, Tensor, D};
use candle_nn::{Embedding, VarBuilder};

use crate::config::VisionConfig;
use crate::error::{Error, Result};
use crate::nn::LayerNorm;

/// Learned absolute 2D position embeddings (`image_pos_embed`): column half, then row half.
#[derive(Debug, Clone)]
struct PositionEmbedding2D {
    row_embeddings: Embedding,
    column_embeddings: Embedding,
}

impl PositionEmbedding2D {
    fn new(max_pos: usize, dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            row_embeddings: candle_nn::embedding(max_pos, dim / 2, vb.pp("row_embeddings"))?,
            column_embeddings: candle_nn::embedding(max_pos, dim - dim / 2, vb.pp("column_embeddings"))?,
        })
    }

    /// `[h, w, dim]` table: column embedding of `w`, then row embedding of `h`.
    fn table(&self, h: usize, w: usize, dev: &Device) -> Result<Tensor> {
        let cols = self.column_embeddings.embeddings().narrow(0, 0, w)?;
        let rows = self.row_embeddings.embeddings().narrow(0, 0, h)?;
        let cols = cols.unsqueeze(0)?.broadcast_as((h, w, cols.dim(1)?))?;
        let rows = rows.unsqueeze(1)?.broadcast_as((h, w, rows.dim(1)?))?;
        Ok(Tensor::cat(&[cols, rows], D::Minus1)?.to_device(dev)?)
    }
}

/// The cosine temporal embedding of frame 0 (`visual_temporal_embed.pos_idx_to_embed[0]`):
/// sin(0) = 0 on even channels, cos(0) = 1 on odd ones. Checkpoints carry the table as a
/// buffer; it is computed when a file omits it.
fn temporal_embedding_frame0(max_t: usize, dim: usize, vb: &VarBuilder) -> Result<Tensor> {
    if vb.contains_tensor("visual_temporal_embed.pos_idx_to_embed") {
        let table = vb.get((max_t, dim), "visual_temporal_embed.pos_idx_to_embed")?;
        return Ok(table.get(0)?);
    }
    let v: Vec<f32> = (0..dim).map(|i| if i % 2 == 0 { 0.0 } else { 1.0 }).collect();
    Ok(Tensor::from_vec(v, dim, vb.device())?.to_dtype(vb.dtype())?)
}

/// Everything the projector does before its final norm: position embeddings, pooling and the
/// projection, `[B, h, w, C]` to `[B, 1 + h*w, d_model]`. Made of differentiable candle
/// operations only, so the tensor path shares it.
#[derive(Debug, Clone)]
pub(crate) struct ImageTokens {
    pos: PositionEmbedding2D,
    temporal0: Tensor,
    max_pos: usize,
    /// `[vision_dim, d_model]`, applied as `x @ image_projection`.
    image_projection: Tensor,
}

impl ImageTokens {
    /// Loads `image_pos_embed`, `visual_temporal_embed` and `image_projection` from the root of
    /// the checkpoint.
    pub(crate) fn new(cfg: &VisionConfig, vb: &VarBuilder) -> Result<Self> {
        let dim = *cfg.dim_embed.last().expect("validated: at least one stage");
        Ok(Self {
            pos: PositionEmbedding2D::new(cfg.max_pos_embeddings, dim, vb.pp("image_pos_embed"))?,
            temporal0: temporal_embedding_frame0(cfg.max_temporal_embeddings, dim, vb)?,
            max_pos: cfg.max_pos_embeddings,
            image_projection: vb.get((dim, cfg.projection_dim), "image_projection")?,
        })
    }

    /// `features` `[B, h, w, C]` (channel-last) to `[B, 1 + h*w, d_model]`, the mean-pooled
    /// token first, not yet normalized.
    pub(crate) fn forward(&self, features: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = features.dims4()?;
        // Non-square maps follow the native implementation (the remote code only allows squares).
        if h.max(w) > self.max_pos {
            return Err(Error::usage(format!(
                "the {h}x{w} feature map exceeds the {} learned image positions; use a smaller image size",
                self.max_pos
            )));
        }
        let pos = self.pos.table(h, w, features.device())?;
        let x = features.broadcast_add(&pos)?.broadcast_add(&self.temporal0)?;
        let tokens = x.reshape((b, h * w, c))?;
        let pooled = tokens.mean_keepdim(1)?;
        let feats = Tensor::cat(&[pooled, tokens], 1)?;
        Ok(feats.broadcast_matmul(&self.image_projection)?)
    }
}

/// Projects DaViT's last feature map into `[B, 1 + h*w, d_model]` language-model embeddings.
#[derive(Debug, Clone)]
pub struct ImageProjector {
    tokens: ImageTokens,
    image_proj_norm: LayerNorm,
}

impl ImageProjector {
    /// Loads `image_pos_embed`, `visual_temporal_embed`, `image_projection` and `image_proj_norm`
    /// from the root of the checkpoint.
    pub fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            tokens: ImageTokens::new(cfg, &vb)?,
            image_proj_norm: LayerNorm::new(cfg.projection_dim, vb.pp("image_proj_norm"))?,
        })
    }

    /// `features` `[B, h, w, C]` (channel-last) to `[B, 1 + h*w, d_model]`, the mean-pooled token first.
    pub fn forward(&self, features: &Tensor) -> Result<Tensor> {
        self.image_proj_norm.forward(&self.tokens.forward(features)?)
    }
}
