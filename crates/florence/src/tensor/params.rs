//! The model's tensors for the tensor path: trainable ones as `Var`s, frozen ones and buffers
//! as plain tensors, under the one internal (remote-layout) naming.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;

use crate::checkpoint::names::{expected, Need};
use crate::checkpoint::Checkpoint;
use crate::config::Florence2Config;
use crate::error::Result;

/// The three parts of the model that training can freeze (Florence-2ner's `freeze_vision`,
/// `freeze_language` and `freeze_other`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamGroup {
    /// The DaViT vision tower.
    Vision,
    /// The BART language model, the shared embedding (and so `lm_head`) with it.
    Language,
    /// The projector: image position embeddings, the projection and its norm.
    Other,
}

impl ParamGroup {
    /// The group of the tensor named `name` (remote layout).
    pub fn of(name: &str) -> Self {
        if name.starts_with("vision_tower.") {
            Self::Vision
        } else if name.starts_with("language_model.") {
            Self::Language
        } else {
            Self::Other
        }
    }
}

/// The shared embedding: encoder and decoder `embed_tokens` and `lm_head` are this one tensor.
pub const SHARED: &str = "language_model.model.shared.weight";

#[derive(Debug, Clone)]
enum Slot {
    Trainable(Var),
    Fixed(Tensor),
}

/// Every tensor the model reads, by remote-layout name.
///
/// Tied names are not stored: the model reads [`SHARED`] for them. Derived tensors
/// (`final_logits_bias`, the temporal sinusoid table) are buffers, never trained, and present
/// only when the checkpoint had them (the model derives them otherwise, as the reference does).
#[derive(Debug, Clone)]
pub struct Parameters {
    slots: BTreeMap<String, Slot>,
    device: Device,
}

impl Parameters {
    /// Reads the tensors `config` needs from a checked `checkpoint` onto `device`, in f32; those
    /// for which `trainable` says yes become variables.
    pub fn from_checkpoint(
        config: &Florence2Config,
        checkpoint: &Checkpoint,
        device: &Device,
        trainable: impl Fn(&str) -> bool,
    ) -> Result<Self> {
        let mut slots = BTreeMap::new();
        for (name, need) in expected(config) {
            let tensor = match need {
                Need::Tied => continue,
                Need::Derived if !checkpoint.contains(&name) => continue,
                _ => checkpoint.read(&name, DType::F32)?.to_device(device)?,
            };
            let slot = if need == Need::Required && trainable(&name) {
                Slot::Trainable(Var::from_tensor(&tensor)?)
            } else {
                Slot::Fixed(tensor)
            };
            slots.insert(name, slot);
        }
        Ok(Self {
            slots,
            device: device.clone(),
        })
    }

    /// Every tensor cast to `dtype` by a tracked operation, for mixed precision: a model built
    /// over the view computes in `dtype`, and gradients reach the variables in their own dtype
    /// through the casts.
    pub fn cast_view(&self, dtype: DType) -> Result<Self> {
        let slots = self
            .tensors()
            .map(|(name, t)| Ok((name.to_string(), Slot::Fixed(t.to_dtype(dtype)?))))
            .collect::<Result<_>>()?;
        Ok(Self {
            slots,
            device: self.device.clone(),
        })
    }

    /// The trainable tensors, by name, in name order.
    pub fn trainable(&self) -> Vec<(&str, &Var)> {
        self.slots
            .iter()
            .filter_map(|(name, slot)| match slot {
                Slot::Trainable(var) => Some((name.as_str(), var)),
                Slot::Fixed(_) => None,
            })
            .collect()
    }

    /// Every tensor, by name, in name order (the current values of the trainable ones).
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.slots.iter().map(|(name, slot)| match slot {
            Slot::Trainable(var) => (name.as_str(), var.as_tensor()),
            Slot::Fixed(t) => (name.as_str(), t),
        })
    }

    /// The tensor named `name`, following ties to [`SHARED`].
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        let slot = self.slots.get(tied_to(name).unwrap_or(name))?;
        Some(match slot {
            Slot::Trainable(var) => var.as_tensor(),
            Slot::Fixed(t) => t,
        })
    }

    /// The device the tensors live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A builder reading these tensors, for the model's constructors: they get the variables
    /// themselves, so gradients reach them.
    pub fn var_builder(&self) -> VarBuilder<'_> {
        VarBuilder::from_backend(Box::new(self), DType::F32, self.device.clone())
    }
}

/// The name `name` is tied to, when it is a copy of the shared embedding.
fn tied_to(name: &str) -> Option<&'static str> {
    match name {
        "language_model.model.encoder.embed_tokens.weight"
        | "language_model.model.decoder.embed_tokens.weight"
        | "language_model.lm_head.weight" => Some(SHARED),
        _ => None,
    }
}

impl candle_nn::var_builder::SimpleBackend for &Parameters {
    fn get(
        &self,
        shape: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        _: DType,
        _: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = Parameters::get(self, name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() })?;
        if t.shape() != &shape {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("tensor {name} has the wrong shape"),
                expected: shape,
                got: t.shape().clone(),
            });
        }
        Ok(t.clone())
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        Parameters::get(self, name)
            .cloned()
            .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() })
    }

    fn contains_tensor(&self, name: &str) -> bool {
        Parameters::get(self, name).is_some()
    }
}
