//! DaViT, the dual-attention vision transformer of Florence-2 (spec §3).
//!
//! The feature map is kept channel-last, `[B, H, W, C]`, from the first convolution on: it is
//! the token layout the attention layers want, and the layout the convolutions gather patches
//! from fastest.

use candle_core::Tensor;
use candle_nn::VarBuilder;
use rayon::prelude::*;

use crate::config::VisionConfig;
use crate::error::Result;
use crate::nn::{
    gemm_f32, softmax_rows, with_f32, DepthwiseConv3x3Residual, LayerNorm, Linear, MatrixSource, PatchConv,
    WeightFormat,
};

/// The patch-embedding convolution that opens each stage (`convs.{i}`).
#[derive(Debug, Clone)]
struct ConvEmbed {
    proj: PatchConv,
    norm: LayerNorm,
    pre_norm: bool,
}

impl ConvEmbed {
    fn new(cfg: &VisionConfig, i: usize, vb: VarBuilder, format: WeightFormat) -> Result<Self> {
        let in_ch = if i == 0 { 3 } else { cfg.dim_embed[i - 1] };
        let out_ch = cfg.dim_embed[i];
        let (k, stride, padding) = (cfg.patch_size[i], cfg.patch_stride[i], cfg.patch_padding[i]);
        let proj = PatchConv::new(in_ch, out_ch, k, stride, padding, vb.pp("proj"), format)?;
        let pre_norm = cfg.patch_prenorm[i];
        let norm = LayerNorm::new(if pre_norm { in_ch } else { out_ch }, vb.pp("norm"))?;
        Ok(Self { proj, norm, pre_norm })
    }

    /// `[B, H, W, C]` to `[B, H', W', C']`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.pre_norm {
            self.proj.forward(&self.norm.forward(x)?)
        } else {
            self.norm.forward(&self.proj.forward(x)?)
        }
    }
}

/// `fc1 -> GELU -> fc2`.
#[derive(Debug, Clone)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    fn new(dim: usize, hidden: usize, vb: VarBuilder, weights: MatrixSource) -> Result<Self> {
        Ok(Self {
            fc1: Linear::new(dim, hidden, vb.pp("fc1"), weights)?,
            fc2: Linear::new(hidden, dim, vb.pp("fc2"), weights)?,
        })
    }
    /// `residual + fc2(gelu(fc1(x)))`.
    fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.fc2.forward_residual(&self.fc1.forward_gelu(x)?, residual)
    }
}

/// The token mixer of a DaViT block, read from `{NAME}.fn` (its norm is `{NAME}.norm`).
trait Attention: Sized {
    /// The mixer's name in the checkpoint: `window_attn` or `channel_attn`.
    const NAME: &'static str;
    /// Wraps the loaded `qkv` and `proj` projections with stage `stage`'s head or group count.
    fn new(qkv: Linear, proj: Linear, cfg: &VisionConfig, stage: usize) -> Self;
    /// `residual + attention(x)`.
    fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor>;
}

/// Multi-head self-attention inside non-overlapping windows, without position bias.
#[derive(Debug, Clone)]
struct WindowAttention {
    qkv: Linear,
    proj: Linear,
    heads: usize,
    window: usize,
}

impl Attention for WindowAttention {
    const NAME: &'static str = "window_attn";
    fn new(qkv: Linear, proj: Linear, cfg: &VisionConfig, stage: usize) -> Self {
        Self {
            qkv,
            proj,
            heads: cfg.num_heads[stage],
            window: cfg.window_size,
        }
    }
    /// Equals the reference's pad / partition / attend / merge / crop, without materializing
    /// windows: the projections run on the real tokens only, and each window's scores live in a
    /// small per-task buffer instead of one `[windows, heads, N, N]` tensor (85 MB at stage 0).
    fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let qkv = self.qkv.forward(x)?;
        // The reference pads the input with zeros before `qkv`, so padded tokens carry its bias.
        let zeros = vec![0f32; 3 * c];
        let pad_token = self.qkv.bias().unwrap_or(&zeros);
        let y = window_attention(&qkv, pad_token, (b, h, w, c), self.heads, self.window)?;
        self.proj.forward_residual(&y, residual)
    }
}

/// Multi-head attention inside each `ws x ws` window of `qkv` (`[B, H, W, 3C]`, channel-last,
/// `[q | k | v]` per token); windows reaching past the map use `pad_token` for the missing
/// tokens. Returns the attended values `[B, H, W, C]` of the real tokens.
fn window_attention(
    qkv: &Tensor,
    pad_token: &[f32],
    (b, h, w, c): (usize, usize, usize, usize),
    heads: usize,
    ws: usize,
) -> Result<Tensor> {
    let out = with_f32(qkv, |src| {
        window_attention_slices(src, pad_token, (b, h, w, c), heads, ws)
    })?;
    Ok(Tensor::from_vec(out, (b, h, w, c), qkv.device())?)
}

fn window_attention_slices(
    src: &[f32],
    pad_token: &[f32],
    (b, h, w, c): (usize, usize, usize, usize),
    heads: usize,
    ws: usize,
) -> Vec<f32> {
    let (nh, nw) = (h.div_ceil(ws), w.div_ceil(ws));
    let (n, hd) = (ws * ws, c / heads);
    let scale = (hd as f64).powf(-0.5) as f32;
    let mut out = vec![0f32; b * h * w * c];
    let out_ptr = SendPtr(out.as_mut_ptr());
    (0..b * nh * nw * heads).into_par_iter().for_each(|task| {
        let (window, head) = (task / heads, task % heads);
        let (img, wy, wx) = (window / (nh * nw), window / nw % nh, window % nw);
        // Token t of the window is pixel (wy*ws + t/ws, wx*ws + t%ws); None past the edge.
        let pixel = |t: usize| {
            let (y, x) = (wy * ws + t / ws, wx * ws + t % ws);
            (y < h && x < w).then(|| (img * h + y) * w + x)
        };
        let mut q = vec![0f32; n * hd];
        let mut k = vec![0f32; n * hd];
        let mut v = vec![0f32; n * hd];
        for t in 0..n {
            let token = match pixel(t) {
                Some(p) => &src[p * 3 * c..(p + 1) * 3 * c],
                None => pad_token,
            };
            for (dst, part) in [(&mut q, 0), (&mut k, 1), (&mut v, 2)] {
                dst[t * hd..(t + 1) * hd].copy_from_slice(&token[part * c + head * hd..][..hd]);
            }
        }
        // q is scaled before the product, as the reference does.
        q.iter_mut().for_each(|x| *x *= scale);
        let mut scores = vec![0f32; n * n];
        let mut o = vec![0f32; n * hd];
        // SAFETY: every slice spans its buffer with the given strides (row-major, K read as Kᵀ).
        unsafe {
            gemm_f32(n, n, hd, scores.as_mut_ptr(), (n, 1), &q, (hd, 1), &k, (1, hd), 1);
        }
        softmax_rows(&mut scores, n);
        // SAFETY: scores is [n, n], v is [n, hd] and o has room for [n, hd], all row-major.
        unsafe {
            gemm_f32(n, hd, n, o.as_mut_ptr(), (hd, 1), &scores, (n, 1), &v, (hd, 1), 1);
        }
        for t in 0..n {
            if let Some(p) = pixel(t) {
                // SAFETY: (pixel, head) pairs are disjoint across tasks and inside `out`.
                unsafe {
                    let dst = out_ptr.get().add(p * c + head * hd);
                    std::ptr::copy_nonoverlapping(o[t * hd..].as_ptr(), dst, hd);
                }
            }
        }
    });
    out
}

/// A pointer that tasks writing disjoint parts of one buffer may share.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: used only for disjoint writes, each task its own elements.
unsafe impl Send for SendPtr {}
// SAFETY: as for Send: no two tasks write the same element, and none reads through it.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// Through a method, so that closures capture the whole (Sync) wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Attention across channel groups: each group's channels attend to each other over all tokens.
#[derive(Debug, Clone)]
struct ChannelAttention {
    qkv: Linear,
    proj: Linear,
    groups: usize,
}

impl Attention for ChannelAttention {
    const NAME: &'static str = "channel_attn";
    fn new(qkv: Linear, proj: Linear, cfg: &VisionConfig, stage: usize) -> Self {
        Self {
            qkv,
            proj,
            groups: cfg.num_groups[stage],
        }
    }
    fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let qkv = self.qkv.forward(x)?;
        let y = with_f32(&qkv, |qkv| channel_attention(qkv, (b, h * w, c), self.groups))?;
        self.proj
            .forward_residual(&Tensor::from_vec(y, (b, h, w, c), x.device())?, residual)
    }
}

/// Attention across the channels of each group of `qkv` (`[B, N, 3C]`, `[q | k | v]` per
/// token), over all `N` tokens. Returns `[B, N, C]`.
///
/// The GEMMs read q, k and v in place through strides, and write each group's columns of the
/// output directly, where the reference splits heads and transposes with copies.
fn channel_attention(qkv: &[f32], (b, n, c): (usize, usize, usize), groups: usize) -> Vec<f32> {
    let cg = c / groups;
    // The scale is the token count, not the head width (spec §3.4).
    let scale = (n as f64).powf(-0.5) as f32;
    let mut out: Vec<f32> = Vec::with_capacity(b * n * c);
    let out_ptr = SendPtr(out.as_mut_ptr());
    (0..b * groups).into_par_iter().for_each(|task| {
        let (img, g) = (task / groups, task % groups);
        let tokens = &qkv[img * n * 3 * c..(img + 1) * n * 3 * c];
        let (q, k, v) = (&tokens[g * cg..], &tokens[c + g * cg..], &tokens[2 * c + g * cg..]);
        let mut attn = vec![0f32; cg * cg];
        // SAFETY: token t's channel i of this group is at t * 3C + i in q, k and v; attn is
        // [Cg, Cg]; the output block is this task's own columns of image img.
        unsafe {
            // attn = qᵀ · k, with q read transposed.
            gemm_f32(cg, cg, n, attn.as_mut_ptr(), (cg, 1), q, (1, 3 * c), k, (3 * c, 1), 1);
            attn.iter_mut().for_each(|a| *a *= scale);
            softmax_rows(&mut attn, cg);
            // y = v · attnᵀ, token-major like the input.
            let dst = out_ptr.get().add(img * n * c + g * cg);
            gemm_f32(n, cg, cg, dst, (c, 1), v, (3 * c, 1), &attn, (1, cg), 1);
        }
    });
    // SAFETY: the tasks together wrote every (image, token, channel) element.
    unsafe { out.set_len(b * n * c) };
    out
}

/// A DaViT block: `conv1`, attention, `conv2`, MLP, each with a residual. The spatial and channel
/// blocks differ only in their attention.
#[derive(Debug, Clone)]
struct Block<A> {
    conv1: DepthwiseConv3x3Residual,
    norm1: LayerNorm,
    attn: A,
    conv2: DepthwiseConv3x3Residual,
    norm2: LayerNorm,
    ffn: Mlp,
}

/// Window attention's block (`spatial_block`, Microsoft's and timm's `SpatialBlock`).
type SpatialBlock = Block<WindowAttention>;
/// Channel attention's block (`channel_block`, Microsoft's and timm's `ChannelBlock`).
type ChannelBlock = Block<ChannelAttention>;

impl<A: Attention> Block<A> {
    fn new(cfg: &VisionConfig, stage: usize, vb: VarBuilder, weights: MatrixSource) -> Result<Self> {
        let dim = cfg.dim_embed[stage];
        let mlp_hidden = (dim as f64 * cfg.mlp_ratio) as usize;
        let attn = vb.pp(A::NAME);
        let qkv = Linear::new(dim, 3 * dim, attn.pp("fn").pp("qkv"), weights)?;
        let proj = Linear::new(dim, dim, attn.pp("fn").pp("proj"), weights)?;
        Ok(Self {
            conv1: DepthwiseConv3x3Residual::new(dim, vb.pp("conv1").pp("fn").pp("dw"))?,
            norm1: LayerNorm::new(dim, attn.pp("norm"))?,
            attn: A::new(qkv, proj, cfg, stage),
            conv2: DepthwiseConv3x3Residual::new(dim, vb.pp("conv2").pp("fn").pp("dw"))?,
            norm2: LayerNorm::new(dim, vb.pp("ffn").pp("norm"))?,
            ffn: Mlp::new(dim, mlp_hidden, vb.pp("ffn").pp("fn").pp("net"), weights)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.conv1.forward(x)?;
        let x = self.attn.forward_residual(&self.norm1.forward(&x)?, &x)?;
        let x = self.conv2.forward(&x)?;
        self.ffn.forward_residual(&self.norm2.forward(&x)?, &x)
    }
}

/// One DaViT stage: its patch embedding (`convs.{s}`), then its block pairs (`blocks.{s}.{b}`).
#[derive(Debug, Clone)]
struct Stage {
    conv: ConvEmbed,
    /// `(spatial_block, channel_block)` pairs, in order.
    blocks: Vec<(SpatialBlock, ChannelBlock)>,
}

impl Stage {
    /// Loads stage `s` from `vision_tower` (`vb`).
    fn new(cfg: &VisionConfig, s: usize, vb: &VarBuilder, weights: MatrixSource) -> Result<Self> {
        let conv = ConvEmbed::new(cfg, s, vb.pp("convs").pp(s), weights.format)?;
        let blocks = (0..cfg.depths[s])
            .map(|b| {
                let vb = vb.pp("blocks").pp(s).pp(b);
                Ok((
                    SpatialBlock::new(cfg, s, vb.pp("spatial_block"), weights)?,
                    ChannelBlock::new(cfg, s, vb.pp("channel_block"), weights)?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Self { conv, blocks })
    }

    /// `[B, H, W, C]` to `[B, H', W', C']`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.conv.forward(x)?;
        for (spatial, channel) in &self.blocks {
            x = channel.forward(&spatial.forward(&x)?)?;
        }
        Ok(x)
    }
}

/// The DaViT backbone (`vision_tower`), without its classification head.
#[derive(Debug, Clone)]
pub struct DaViT {
    stages: Vec<Stage>,
}

impl DaViT {
    /// Loads `vision_tower.*`, holding the attention and MLP weights in `weights.format`.
    pub fn new(cfg: &VisionConfig, vb: VarBuilder, weights: MatrixSource) -> Result<Self> {
        let stages = (0..cfg.dim_embed.len())
            .map(|s| Stage::new(cfg, s, &vb, weights))
            .collect::<Result<_>>()?;
        Ok(Self { stages })
    }

    /// `pixel_values` `[B, 3, H, W]` to the last stage's feature map, channel-last `[B, h, w, C]`.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let mut x = pixel_values.permute((0, 2, 3, 1))?.contiguous()?;
        for stage in &self.stages {
            x = stage.forward(&x)?;
        }
        Ok(x)
    }
}
