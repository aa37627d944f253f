//! The whole model on the tensor path: vision tower, projector and language model as one chain
//! of segments ending in the loss.

use candle_core::Tensor;

use super::language::{BartLanguageModel, TextInputs};
use super::projector::ImageProjector;
use super::segment::{self, Pass, Segment};
use super::vision::DaViT;
use super::Parameters;
use crate::config::Florence2Config;
use crate::error::Result;

/// Florence-2 for training: the paper's three parts over one set of [`Parameters`].
///
/// The parts hold the parameters' own tensors, so an optimizer's in-place updates of the
/// variables are what the next pass reads.
#[derive(Debug)]
pub struct Florence2 {
    vision_tower: DaViT,
    projector: ImageProjector,
    language_model: BartLanguageModel,
}

impl Florence2 {
    /// Builds the model for `config` over `params` (remote-layout names).
    pub fn new(config: &Florence2Config, params: &Parameters) -> Result<Self> {
        let vb = params.var_builder();
        Ok(Self {
            vision_tower: DaViT::new(&config.vision, vb.pp("vision_tower"))?,
            projector: ImageProjector::new(&config.vision, vb.clone())?,
            language_model: BartLanguageModel::new(&config.text, vb)?,
        })
    }

    /// The chain from pixel values (`[B, 3, H, W]`, the chain's one input) to the summed
    /// cross-entropy of `text`'s labels (its one output, a scalar).
    pub fn segments<'a>(&'a self, text: &'a TextInputs) -> Vec<Box<dyn Segment + 'a>> {
        let mut chain = self.vision_tower.segments();
        chain.push(Box::new(&self.projector));
        chain.extend(self.language_model.segments(text));
        chain
    }

    /// The summed cross-entropy of `text`'s labels on `pixel_values`, without gradients.
    pub fn loss_sum(&self, pixel_values: &Tensor, text: &TextInputs, pass: &Pass) -> Result<Tensor> {
        let mut out = segment::forward(&self.segments(text), vec![pixel_values.clone()], pass)?;
        Ok(out.remove(0))
    }

    /// The encoder's output `[B, N + P, d]` for `pixel_values` `[B, 3, H, W]` and one `prompt`
    /// shared by every image, in evaluation mode: what generation attends to.
    pub fn memory(&self, pixel_values: &Tensor, prompt: &[u32]) -> Result<Tensor> {
        let features = self.vision_tower.forward(pixel_values, &mut super::ops::Mode::eval())?;
        let image_embeds = self.projector.forward(&features)?;
        self.language_model.encode_prompt(&image_embeds, prompt)
    }

    /// The language model, whose decoder generates from [`memory`](Self::memory).
    pub fn language_model(&self) -> &BartLanguageModel {
        &self.language_model
    }

    /// The logits `[B, L, V]` of `text`'s decoder inputs on `pixel_values`, in evaluation mode.
    pub fn logits(&self, pixel_values: &Tensor, text: &TextInputs) -> Result<Tensor> {
        let mut mode = super::ops::Mode::eval();
        let features = self.vision_tower.forward(pixel_values, &mut mode)?;
        let image_embeds = self.projector.forward(&features)?;
        self.language_model.logits(&image_embeds, text, &mut mode)
    }
}
