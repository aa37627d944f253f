//! DaViT, the dual-attention vision transformer of Florence-2 (spec §3), for the tensor path.
//!
//! The same structs and checkpoint keys as the fast path (`crate::vision`), in differentiable
//! candle operations. The feature map stays channel-last, `[B, H, W, C]`, between blocks, as
//! there: the attention layers' token layout, and the depthwise convolution's fast one. The
//! tower runs as a chain of segments: each stage's patch embedding, then each spatial and each
//! channel block, so gradient checkpointing recomputes one block at a time.

use candle_core::{DType, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Linear, Module, VarBuilder};

use super::dwconv::depthwise_conv3x3;
use super::ops::{drop_path, softmax_last_dim, LayerNorm, Mode};
use super::segment::{single, Segment};
use crate::config::VisionConfig;
use crate::error::{Error, Result};

/// DaViT's LayerNorms (torch's default).
const EPS: f64 = 1e-5;

/// The patch-embedding convolution that opens each stage (`convs.{i}`).
#[derive(Debug, Clone)]
struct ConvEmbed {
    proj: Conv2d,
    norm: LayerNorm,
    pre_norm: bool,
    /// Stage 0 reads the pixel values, `[B, 3, H, W]`.
    pixels: bool,
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl ConvEmbed {
    fn new(cfg: &VisionConfig, i: usize, vb: VarBuilder) -> Result<Self> {
        let in_ch = if i == 0 { 3 } else { cfg.dim_embed[i - 1] };
        let out_ch = cfg.dim_embed[i];
        let (kernel, stride, padding) = (cfg.patch_size[i], cfg.patch_stride[i], cfg.patch_padding[i]);
        // The padding is applied by `forward` (see there).
        let conv = Conv2dConfig {
            stride,
            ..Default::default()
        };
        let pre_norm = cfg.patch_prenorm[i];
        Ok(Self {
            proj: candle_nn::conv2d(in_ch, out_ch, kernel, conv, vb.pp("proj"))?,
            norm: LayerNorm::new(if pre_norm { in_ch } else { out_ch }, EPS, vb.pp("norm"))?,
            pre_norm,
            pixels: i == 0,
            kernel,
            stride,
            padding,
        })
    }

    /// `[B, H, W, C]` (stage 0: pixel values `[B, 3, H, W]`) to `[B, H', W', C']`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = if self.pixels {
            // As transformers, pixels take the weights' dtype.
            x.to_dtype(self.proj.weight().dtype())?.permute((0, 2, 3, 1))?
        } else {
            x.clone()
        };
        let (_, h, w, _) = x.dims4()?;
        if h.min(w) + 2 * self.padding < self.kernel {
            return Err(Error::usage(format!(
                "a {h}x{w} map is smaller than the {k}x{k} convolution kernel; use a larger image size",
                k = self.kernel
            )));
        }
        let x = if self.pre_norm { self.norm.forward(&x)? } else { x };
        // candle's convolution (it has a backward) works on NCHW maps.
        let nchw = x.permute((0, 3, 1, 2))?;
        let nchw = self.fit(&self.fit(&nchw, 2)?, 3)?.contiguous()?;
        let x = self.convolve(&nchw)?.permute((0, 2, 3, 1))?;
        if self.pre_norm {
            Ok(x.contiguous()?)
        } else {
            self.norm.forward(&x)
        }
    }
}

impl ConvEmbed {
    /// The convolution of an NCHW map. candle's CPU convolution has no bf16 kernel (its matrix
    /// product widens bf16 to f32 and rounds the result back): in bf16 on the CPU it runs the
    /// same way, so that the GPU's bf16 path can be checked on the CPU.
    fn convolve(&self, nchw: &Tensor) -> Result<Tensor> {
        if !(nchw.device().is_cpu() && nchw.dtype() == DType::BF16) {
            return Ok(self.proj.forward(nchw)?);
        }
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let weight = f32(self.proj.weight())?;
        let bias = self.proj.bias().map(f32).transpose()?;
        let widened = Conv2d::new(weight, bias, *self.proj.config());
        Ok(widened.forward(&f32(nchw)?)?.to_dtype(DType::BF16)?)
    }

    /// Side `dim` of an NCHW map cut to the rows or columns the kernel reaches and zero-padded,
    /// so that the unpadded convolution covers it exactly.
    ///
    /// candle 0.11's `conv2d` backward sizes the input gradient with the height's leftover rows
    /// (those no window reaches) on both sides: with a padded convolution, a map whose height
    /// and width leave different leftovers gets a gradient of the wrong shape. Without padding
    /// or leftovers, it is right.
    fn fit(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        let (n, k, s, p) = (x.dim(dim)?, self.kernel, self.stride, self.padding);
        if p >= k {
            return Err(Error::unsupported(format!(
                "a patch embedding padded by {p} with a {k}x{k} kernel; the padding must be smaller than the kernel"
            )));
        }
        let span = (n + 2 * p - k) / s * s + k;
        let keep = n.min(span - p);
        Ok(x.narrow(dim, 0, keep)?.pad_with_zeros(dim, p, span - p - keep)?)
    }
}

impl Segment for ConvEmbed {
    fn forward(&self, inputs: &[Tensor], _: &mut Mode) -> Result<Vec<Tensor>> {
        Ok(vec![ConvEmbed::forward(self, single(inputs)?)?])
    }
}

/// `Linear` over the last dimension of a tensor of any rank, as one matrix product.
fn linear(layer: &Linear, x: &Tensor) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let c = dims.pop().unwrap_or(1);
    let y = layer.forward(&x.reshape(((), c))?)?;
    dims.push(y.dim(1)?);
    Ok(y.reshape(dims)?)
}

/// `fc1 -> GELU (erf) -> fc2`.
#[derive(Debug, Clone)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    fn new(dim: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: candle_nn::linear(dim, hidden, vb.pp("fc1"))?,
            fc2: candle_nn::linear(hidden, dim, vb.pp("fc2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        linear(&self.fc2, &linear(&self.fc1, x)?.gelu_erf()?)
    }
}

/// A depthwise 3x3 convolution with a bias (`conv{1,2}.fn.dw`, DaViT's `ConvPosEnc`).
#[derive(Debug, Clone)]
struct DepthwiseConv {
    weight: Tensor,
    bias: Tensor,
}

impl DepthwiseConv {
    fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get((channels, 1, 3, 3), "weight")?,
            bias: vb.get(channels, "bias")?,
        })
    }

    /// `[B, H, W, C]` to the same.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        depthwise_conv3x3(x, &self.weight, &self.bias)
    }
}

/// The token mixer of a DaViT block, read from `{NAME}.fn` (its norm is `{NAME}.norm`).
trait Attention: Sized {
    /// The mixer's name in the checkpoint: `window_attn` or `channel_attn`.
    const NAME: &'static str;
    /// Wraps the loaded `qkv` and `proj` projections with stage `stage`'s head or group count.
    fn new(qkv: Linear, proj: Linear, cfg: &VisionConfig, stage: usize) -> Self;
    /// `[B, H, W, C]` to the same.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
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

    /// As the reference: pad right and bottom with zeros (before `qkv`, so padded tokens carry
    /// its bias and take part in the attention), partition, attend, merge, crop.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let ws = self.window;
        let (hp, wp) = (h.next_multiple_of(ws), w.next_multiple_of(ws));
        let (nh, nw) = (hp / ws, wp / ws);
        let (windows, n, hd) = (b * nh * nw, ws * ws, c / self.heads);
        let x = x.pad_with_zeros(1, 0, hp - h)?.pad_with_zeros(2, 0, wp - w)?;
        let tokens = x
            .reshape((b, nh, ws, nw, ws, c))?
            .permute((0, 1, 3, 2, 4, 5))?
            .reshape((windows, n, c))?;
        let qkv = linear(&self.qkv, &tokens)?
            .reshape((windows, n, 3, self.heads, hd))?
            .permute((2, 0, 3, 1, 4))?
            .contiguous()?;
        let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
        let scores = (q.matmul(&k.t()?)? * (hd as f64).powf(-0.5))?;
        let y = softmax_last_dim(&scores)?
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((windows, n, c))?;
        let y = linear(&self.proj, &y)?
            .reshape((b, nh, nw, ws, ws, c))?
            .permute((0, 1, 3, 2, 4, 5))?
            .reshape((b, hp, wp, c))?;
        Ok(y.narrow(1, 0, h)?.narrow(2, 0, w)?)
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

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let (n, g) = (h * w, self.groups);
        // [3, B, G, C/G, N]: the channels of a group are the rows.
        let qkv = linear(&self.qkv, &x.reshape((b, n, c))?)?
            .reshape((b, n, 3, g, c / g))?
            .permute((2, 0, 3, 4, 1))?
            .contiguous()?;
        let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
        // The scale is the token count, not the group width (spec §3.4).
        let scores = (q.matmul(&k.t()?)? * (n as f64).powf(-0.5))?;
        let y = softmax_last_dim(&scores)?.matmul(&v)?.permute((0, 3, 1, 2))?;
        linear(&self.proj, &y.reshape((b, h, w, c))?)
    }
}

/// A DaViT block: `conv1`, attention, `conv2`, MLP, each with a residual; the attention and
/// MLP branches with stochastic depth. The spatial and channel blocks differ only in their
/// attention.
#[derive(Debug, Clone)]
struct Block<A> {
    conv1: DepthwiseConv,
    norm1: LayerNorm,
    attn: A,
    conv2: DepthwiseConv,
    norm2: LayerNorm,
    ffn: Mlp,
    drop_path: f64,
}

/// Window attention's block (`spatial_block`).
type SpatialBlock = Block<WindowAttention>;
/// Channel attention's block (`channel_block`).
type ChannelBlock = Block<ChannelAttention>;

impl<A: Attention> Block<A> {
    fn new(cfg: &VisionConfig, stage: usize, drop_path: f64, vb: VarBuilder) -> Result<Self> {
        let dim = cfg.dim_embed[stage];
        let mlp_hidden = (dim as f64 * cfg.mlp_ratio) as usize;
        let attn = vb.pp(A::NAME);
        let qkv = if cfg.qkv_bias {
            candle_nn::linear(dim, 3 * dim, attn.pp("fn").pp("qkv"))?
        } else {
            candle_nn::linear_no_bias(dim, 3 * dim, attn.pp("fn").pp("qkv"))?
        };
        let proj = candle_nn::linear(dim, dim, attn.pp("fn").pp("proj"))?;
        Ok(Self {
            conv1: DepthwiseConv::new(dim, vb.pp("conv1").pp("fn").pp("dw"))?,
            norm1: LayerNorm::new(dim, EPS, attn.pp("norm"))?,
            attn: A::new(qkv, proj, cfg, stage),
            conv2: DepthwiseConv::new(dim, vb.pp("conv2").pp("fn").pp("dw"))?,
            norm2: LayerNorm::new(dim, EPS, vb.pp("ffn").pp("norm"))?,
            ffn: Mlp::new(dim, mlp_hidden, vb.pp("ffn").pp("fn").pp("net"))?,
            drop_path,
        })
    }

    /// `[B, H, W, C]` to the same.
    fn forward(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let x = (x + self.conv1.forward(x)?)?;
        let y = self.attn.forward(&self.norm1.forward(&x)?)?;
        let x = (&x + drop_path(&y, self.drop_path, mode)?)?;
        let x = (&x + self.conv2.forward(&x)?)?;
        let y = self.ffn.forward(&self.norm2.forward(&x)?)?;
        Ok((&x + drop_path(&y, self.drop_path, mode)?)?)
    }
}

impl<A: Attention> Segment for Block<A> {
    fn forward(&self, inputs: &[Tensor], mode: &mut Mode) -> Result<Vec<Tensor>> {
        Ok(vec![Block::forward(self, single(inputs)?, mode)?])
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
    /// Loads stage `s` from `vision_tower` (`vb`); `drop_path` holds the stage's blocks' rates,
    /// two per pair.
    fn new(cfg: &VisionConfig, s: usize, drop_path: &[f64], vb: &VarBuilder) -> Result<Self> {
        let conv = ConvEmbed::new(cfg, s, vb.pp("convs").pp(s))?;
        let blocks = (0..cfg.depths[s])
            .map(|b| {
                let vb = vb.pp("blocks").pp(s).pp(b);
                Ok((
                    SpatialBlock::new(cfg, s, drop_path[2 * b], vb.pp("spatial_block"))?,
                    ChannelBlock::new(cfg, s, drop_path[2 * b + 1], vb.pp("channel_block"))?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Self { conv, blocks })
    }
}

/// The stochastic-depth rate of every block, in order (two per pair): `linspace(0, rate, n)`,
/// as transformers' `Florence2VisionBackbone`.
fn drop_path_rates(rate: f64, n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| if n > 1 { rate * i as f64 / (n - 1) as f64 } else { 0.0 })
        .collect()
}

/// The DaViT backbone (`vision_tower`), without its classification head.
#[derive(Debug, Clone)]
pub struct DaViT {
    stages: Vec<Stage>,
}

impl DaViT {
    /// Reads `vision_tower.*` (the caller passes `vb.pp("vision_tower")`).
    pub fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let rates = drop_path_rates(cfg.drop_path_rate, 2 * cfg.depths.iter().sum::<usize>());
        let mut offset = 0;
        let stages = (0..cfg.dim_embed.len())
            .map(|s| {
                let stage = Stage::new(cfg, s, &rates[offset..], &vb)?;
                offset += 2 * cfg.depths[s];
                Ok(stage)
            })
            .collect::<Result<_>>()?;
        Ok(Self { stages })
    }

    /// The tower as a chain: `[pixel_values (B, 3, H, W)]` in, `[features (B, h, w, C)]`
    /// (channel-last, as [`ImageProjector`](super::projector::ImageProjector) reads them) out;
    /// one segment per patch embedding and per spatial or channel block.
    pub fn segments(&self) -> Vec<Box<dyn Segment + '_>> {
        let mut chain: Vec<Box<dyn Segment + '_>> = Vec::new();
        for stage in &self.stages {
            chain.push(Box::new(&stage.conv));
            for (spatial, channel) in &stage.blocks {
                chain.push(Box::new(spatial));
                chain.push(Box::new(channel));
            }
        }
        chain
    }

    /// Runs the chain as one graph: `pixel_values` `[B, 3, H, W]` to the last stage's feature
    /// map, channel-last `[B, h, w, C]`.
    pub fn forward(&self, pixel_values: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let mut x = pixel_values.clone();
        for segment in self.segments() {
            x = single(&segment.forward(&[x], mode)?)?.clone();
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::tensor::ops::gradcheck;
    use crate::tensor::projector::ImageProjector;
    use crate::tensor::segment::{self, Pass};

    /// Two stages of 4 and 8 channels; windows of 3, so the maps below are padded.
    fn tiny_config() -> VisionConfig {
        VisionConfig {
            dim_embed: vec![4, 8],
            num_heads: vec![2, 2],
            num_groups: vec![2, 4],
            depths: vec![1, 1],
            patch_size: vec![3, 3],
            patch_stride: vec![2, 2],
            patch_padding: vec![1, 1],
            patch_prenorm: vec![false, true],
            window_size: 3,
            mlp_ratio: 2.0,
            projection_dim: 6,
            max_pos_embeddings: 10,
            max_temporal_embeddings: 4,
            qkv_bias: true,
            drop_path_rate: 0.3,
        }
    }

    /// Uniform values in `[-scale, scale)`, f64.
    fn random(shape: &[usize], scale: f64, rng: &mut StdRng) -> Result<Tensor> {
        let n = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| (rng.gen::<f64>() * 2.0 - 1.0) * scale).collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }

    /// The names and shapes of the tensors `build` reads, and random f64 values for them.
    fn random_weights(build: impl Fn(VarBuilder) -> Result<()>, seed: u64) -> Result<(Vec<String>, Vec<Tensor>)> {
        let varmap = VarMap::new();
        build(VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu))?;
        let mut named: Vec<(String, Var)> = varmap.data().lock().unwrap().clone().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let mut rng = StdRng::seed_from_u64(seed);
        let mut names = Vec::new();
        let mut values = Vec::new();
        for (name, var) in named {
            values.push(random(var.dims(), 0.5, &mut rng)?);
            names.push(name);
        }
        Ok((names, values))
    }

    fn builder(names: &[String], values: &[Tensor]) -> VarBuilder<'static> {
        let map: HashMap<String, Tensor> = names.iter().cloned().zip(values.iter().cloned()).collect();
        VarBuilder::from_tensors(map, DType::F64, &Device::Cpu)
    }

    #[test]
    fn candles_gelu_erf_backward_matches_finite_differences() -> Result<()> {
        let x = random(&[3, 7], 3.0, &mut StdRng::seed_from_u64(1))?;
        gradcheck::check(|t| Ok(t[0].gelu_erf()?), &[x], 1e-6, 1e-6)
    }

    /// candle's `conv2d` backward, through the patch embeddings: the stem's post-norm with a
    /// 7x7 stride-4 kernel, a later stage's pre-norm with 3x3 stride 2, on sides the strides
    /// do not divide.
    #[test]
    fn patch_embedding_gradients_match_finite_differences() -> Result<()> {
        let mut cfg = tiny_config();
        cfg.patch_size[0] = 7;
        cfg.patch_stride[0] = 4;
        cfg.patch_padding[0] = 3;
        let mut rng = StdRng::seed_from_u64(2);
        for (stage, input) in [(0, [2, 3, 10, 9]), (1, [1, 5, 6, 4])] {
            let (names, mut values) = random_weights(|vb| ConvEmbed::new(&cfg, stage, vb).map(drop), 3)?;
            values.insert(0, random(&input, 1.0, &mut rng)?);
            let f = |t: &[Tensor]| ConvEmbed::new(&cfg, stage, builder(&names, &t[1..]))?.forward(&t[0]);
            gradcheck::check(f, &values, 1e-6, 1e-6)?;
        }
        Ok(())
    }

    /// Every parameter and the input of a spatial and a channel block, in training mode with
    /// stochastic depth (the masks repeat: each evaluation draws from the same seed), on maps
    /// the windows do not tile.
    #[test]
    fn block_gradients_match_finite_differences() -> Result<()> {
        let cfg = tiny_config();
        let mut rng = StdRng::seed_from_u64(4);
        for spatial in [true, false] {
            let build = |vb: VarBuilder| -> Result<Box<dyn Segment>> {
                Ok(if spatial {
                    Box::new(SpatialBlock::new(&cfg, 0, 0.5, vb)?)
                } else {
                    Box::new(ChannelBlock::new(&cfg, 0, 0.5, vb)?)
                })
            };
            let (names, mut values) = random_weights(|vb| build(vb).map(drop), 5)?;
            values.insert(0, random(&[3, 5, 4, 4], 1.0, &mut rng)?);
            let f = |t: &[Tensor]| {
                let block = build(builder(&names, &t[1..]))?;
                Ok(block.forward(&t[..1], &mut Mode::train(9))?.remove(0))
            };
            gradcheck::check(f, &values, 1e-5, 1e-6)?;
        }
        Ok(())
    }

    /// transformers' `torch.linspace(0, rate, n)` (computed in f32 there, hence the tolerance).
    #[test]
    fn drop_path_rates_rise_linearly_over_the_blocks() {
        let torch = [0.0, 0.10000000149011612, 0.20000001788139343, 0.30000001192092896];
        for (ours, theirs) in drop_path_rates(0.3, 4).iter().zip(torch) {
            assert!((ours - theirs).abs() < 1e-7, "{ours} vs {theirs}");
        }
        assert_eq!(drop_path_rates(0.1, 1), [0.0]);
    }

    /// `sum(x * probe)`: a scalar objective for the chain.
    struct Probe(Tensor);
    impl Segment for Probe {
        fn forward(&self, inputs: &[Tensor], _: &mut Mode) -> Result<Vec<Tensor>> {
            Ok(vec![(single(inputs)? * &self.0)?.sum_all()?])
        }
    }

    /// Segment-wise backward through the tower and the projector gives the same gradients with
    /// and without recomputation (stochastic depth on), and in evaluation the same as one graph.
    #[test]
    fn segment_wise_backward_repeats_with_checkpointing_and_equals_one_graph() -> Result<()> {
        let cfg = tiny_config();
        let build = |vb: VarBuilder| -> Result<(DaViT, ImageProjector)> {
            Ok((DaViT::new(&cfg, vb.pp("vision_tower"))?, ImageProjector::new(&cfg, vb)?))
        };
        let (names, values) = random_weights(|vb| build(vb).map(drop), 6)?;
        let vars: Vec<Var> = values
            .iter()
            .map(Var::from_tensor)
            .collect::<candle_core::Result<_>>()?;
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let (davit, projector) = build(builder(&names, &tensors))?;
        let mut rng = StdRng::seed_from_u64(7);
        let pixels = random(&[2, 3, 13, 10], 1.0, &mut rng)?.to_dtype(DType::F32)?;
        // 13x10 -> 7x5 -> 4x3: 1 + 12 image tokens.
        let probe = Probe(random(&[2, 13, 6], 1.0, &mut rng)?);
        let mut chain = davit.segments();
        assert_eq!(chain.len(), 6, "a patch embedding and two blocks per stage");
        chain.push(Box::new(&projector));
        chain.push(Box::new(&probe));

        let run = |train, checkpointing| {
            let pass = Pass {
                train,
                seed: 3,
                checkpointing,
            };
            segment::backward(&chain, vec![pixels.clone()], &vars, 1.0, &pass)
        };
        let (kept_loss, kept) = run(true, false)?;
        let (recomputed_loss, recomputed) = run(true, true)?;
        let (eval_loss, _) = run(false, false)?;
        assert_eq!(kept_loss.to_scalar::<f64>()?, recomputed_loss.to_scalar::<f64>()?);
        assert_ne!(
            kept_loss.to_scalar::<f64>()?,
            eval_loss.to_scalar::<f64>()?,
            "drop path is active"
        );
        for (name, (a, b)) in names.iter().zip(kept.iter().zip(&recomputed)) {
            let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
            let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
            assert_eq!(diff, 0.0, "{name}");
        }

        let (eval_loss, by_segment) = run(false, true)?;
        let whole = projector.forward(&davit.forward(&pixels, &mut Mode::eval())?)?;
        let whole = (whole * &probe.0)?.sum_all()?;
        assert!((whole.to_scalar::<f64>()? - eval_loss.to_scalar::<f64>()?).abs() < 1e-12);
        let store = whole.backward()?;
        for ((name, var), got) in names.iter().zip(&vars).zip(&by_segment) {
            let expected = store.get(var.as_tensor()).unwrap();
            let diff = (got.as_ref().unwrap() - expected)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f64>()?;
            assert!(diff < 1e-12, "{name}: {diff}");
        }
        Ok(())
    }
}
