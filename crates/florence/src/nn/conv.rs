//! DaViT's depthwise 3x3 convolution, channel-last.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use crate::error::Result;

/// A 3x3 depthwise convolution with padding 1 and a bias, fused with its residual:
/// `x + conv(x)`, on channel-last `[B, H, W, C]` maps (DaViT's `ConvPosEnc`).
///
/// Working channel-last lets the inner loop run over contiguous channels and spares the
/// transposes between the token layout and NCHW that a standard convolution needs.
#[derive(Debug, Clone)]
pub struct DepthwiseConv3x3Residual {
    /// Tap-major weights: `weights[t * C + c]` for tap `t = 3 * ky + kx`.
    weights: Vec<f32>,
    bias: Vec<f32>,
}

impl DepthwiseConv3x3Residual {
    /// Loads `weight` `[C, 1, 3, 3]` and `bias` `[C]`.
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        let w = vb.get((channels, 1, 3, 3), "weight")?.to_dtype(DType::F32)?;
        let weights = w.reshape((channels, 9))?.t()?.contiguous()?.flatten_all()?.to_vec1()?;
        let bias = vb.get(channels, "bias")?.to_dtype(DType::F32)?.to_vec1()?;
        Ok(Self { weights, bias })
    }

    /// `x + depthwise_conv3x3(x)` for `x` of shape `[B, H, W, C]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.apply_op1_no_bwd(self)?)
    }
}

impl CustomOp1 for DepthwiseConv3x3Residual {
    fn name(&self) -> &'static str {
        "depthwise-conv3x3-residual"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, h, w, c) = layout.shape().dims4()?;
        if c != self.bias.len() {
            candle_core::bail!("depthwise conv: {c} channels, weights for {}", self.bias.len());
        }
        let src = match (storage, layout.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((start, end))) => &v[start..end],
            _ => candle_core::bail!("depthwise conv needs a contiguous f32 tensor"),
        };
        let mut out = vec![0f32; src.len()];
        let row = w * c;
        out.par_chunks_mut(row).enumerate().for_each(|(by, orow)| {
            let (bi, y) = (by / h, by % h);
            let image = &src[bi * h * row..(bi + 1) * h * row];
            depthwise_row(image, (h, w, c), y, &self.weights, &self.bias, orow);
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

with_avx2!(
    /// Output row `y` of [`DepthwiseConv3x3Residual`] over one `[h, w, c]` image.
    fn depthwise_row(image: &[f32], hwc: (usize, usize, usize), y: usize, weights: &[f32], bias: &[f32], orow: &mut [f32]) -> () = depthwise_row_portable
);

#[inline(always)]
fn depthwise_row_portable(
    image: &[f32],
    (h, w, c): (usize, usize, usize),
    y: usize,
    weights: &[f32],
    bias: &[f32],
    orow: &mut [f32],
) {
    let row = w * c;
    for x in 0..w {
        let o = &mut orow[x * c..(x + 1) * c];
        let centre = &image[y * row + x * c..y * row + (x + 1) * c];
        for ch in 0..c {
            o[ch] = centre[ch] + bias[ch];
        }
        for ky in 0..3 {
            let yy = y as isize + ky as isize - 1;
            if yy < 0 || yy >= h as isize {
                continue;
            }
            for kx in 0..3 {
                let xx = x as isize + kx as isize - 1;
                if xx < 0 || xx >= w as isize {
                    continue;
                }
                let inp = &image[yy as usize * row + xx as usize * c..][..c];
                let k = &weights[(ky * 3 + kx) * c..][..c];
                for ch in 0..c {
                    o[ch] += inp[ch] * k[ch];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::collections::HashMap;

    /// The fused kernel equals `x + conv2d(x, groups = C)` computed by candle's reference conv.
    #[test]
    fn depthwise_matches_grouped_conv() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, w, c) = (2, 7, 5, 6);
        let x = Tensor::randn(0f32, 1.0, (b, h, w, c), &dev)?;
        let weight = Tensor::randn(0f32, 1.0, (c, 1, 3, 3), &dev)?;
        let bias = Tensor::randn(0f32, 1.0, c, &dev)?;
        let vb = VarBuilder::from_tensors(
            HashMap::from([
                ("weight".to_string(), weight.clone()),
                ("bias".to_string(), bias.clone()),
            ]),
            DType::F32,
            &dev,
        );
        let ours = DepthwiseConv3x3Residual::new(c, vb)?.forward(&x)?;
        let nchw = x.permute((0, 3, 1, 2))?.contiguous()?;
        let conv = nchw
            .conv2d(&weight, 1, 1, 1, c)?
            .broadcast_add(&bias.reshape((1, c, 1, 1))?)?;
        let expected = (nchw + conv)?.permute((0, 2, 3, 1))?;
        let diff = (ours - expected)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "max diff {diff}");
        Ok(())
    }
}
