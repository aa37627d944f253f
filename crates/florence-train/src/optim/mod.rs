//! Optimizers (CAME, AdamW) and gradient clipping with PyTorch's arithmetic.
//!
//! Every update is candle tensor arithmetic in f32 on the parameters' device, written in the
//! order of operations of the reference (came-pytorch 0.1.3, `torch.optim.AdamW` with
//! `foreach=False`, `clip_grad_norm_`), so results agree with torch's to f32 rounding: torch fuses
//! some multiply-adds (`add_` with `alpha`, `lerp_`), candle rounds the product and the sum apart.
//! Only scalars cross to the host (the learning rate in, the gradient norm out).

mod adamw;
mod came;

pub use adamw::AdamW;
pub use came::Came;

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var, D};
use florence::{Error, Result};

/// One trainable tensor: its checkpoint name (which names its optimizer state) and its variable.
pub struct Param {
    /// The tensor's name in the checkpoint.
    pub name: String,
    /// The tensor; optimizers update it in place.
    pub var: Var,
}

/// A first-order optimizer over a fixed list of parameters.
pub trait Optimizer {
    /// Updates every parameter from its gradient (`grads[i]` belongs to `params[i]`) at learning
    /// rate `lr`. The parameters must be the same, in the same order, at every step; all f32.
    fn step(&mut self, params: &[Param], grads: &[Tensor], lr: f64) -> Result<()>;
    /// The state as named tensors: `{param}.{slot}` (torch's slot names), and `step` where the
    /// update depends on the step count. Empty before the first step.
    fn state(&self) -> Result<Vec<(String, Tensor)>>;
    /// Takes the state [`state`](Self::state) returned, for `params`; the next step then equals
    /// the one the saving optimizer would have taken, bit for bit.
    fn load_state(&mut self, params: &[Param], state: &HashMap<String, Tensor>) -> Result<()>;
}

/// The optimizers `florence train` offers (Florence-2ner's `optimizer` key; its `OptimiAdamW`
/// is read as AdamW).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum OptimizerKind {
    /// CAME (came-pytorch 0.1.3) with Florence-2ner's settings.
    #[serde(rename = "CAME", alias = "came", alias = "Came")]
    Came,
    /// `torch.optim.AdamW`, betas (0.9, 0.999), eps 1e-8.
    #[serde(rename = "AdamW", alias = "adamw", alias = "OptimiAdamW")]
    AdamW,
}

impl OptimizerKind {
    /// A fresh optimizer with decoupled weight decay `weight_decay` (0 for none).
    pub fn build(self, weight_decay: f64) -> Box<dyn Optimizer> {
        match self {
            OptimizerKind::Came => Box::new(Came::new(weight_decay)),
            OptimizerKind::AdamW => Box::new(AdamW::new(weight_decay)),
        }
    }
}

/// Scales `grads` in place so that their joint L2 norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_(foreach=False)`: per-tensor norms, the norm of their stack,
/// then every gradient times `min(1, max_norm / (norm + 1e-6))`. `max_norm <= 0` leaves the
/// gradients alone. Returns the norm before clipping (0 for no gradients).
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let Some(first) = grads.first() else {
        return Ok(0.0);
    };
    let device = first.device().clone();
    let norms = grads
        .iter()
        .map(|g| norm2(g)?.to_device(&device))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let total = norm2(&Tensor::stack(&norms, 0)?)?;
    if max_norm > 0.0 {
        let coef = scalar(max_norm, &device)?
            .broadcast_div(&(&total + 1e-6)?)?
            .minimum(1.0)?;
        for g in grads.iter_mut() {
            *g = g.broadcast_mul(&coef.to_device(g.device())?)?;
        }
    }
    Ok(f64::from(total.to_scalar::<f32>()?))
}

/// The L2 norm of all of `t`, a 0-dim tensor.
fn norm2(t: &Tensor) -> candle_core::Result<Tensor> {
    t.sqr()?.sum_all()?.sqrt()
}

/// `v` as a 0-dim f32 tensor on `device`: torch casts Python scalars to the tensor's dtype.
fn scalar(v: f64, device: &candle_core::Device) -> candle_core::Result<Tensor> {
    Tensor::new(v as f32, device)
}

/// `t / v` with a true division, as torch divides (candle's `t / v` multiplies by `1 / v`).
fn div_scalar(t: &Tensor, v: f64) -> candle_core::Result<Tensor> {
    t.broadcast_div(&scalar(v, t.device())?)
}

/// torch's `mean(dim, keepdim=True)`: the sum, divided by the count (candle's multiplies by
/// `1 / count`).
fn mean_keepdim(t: &Tensor, dim: D) -> candle_core::Result<Tensor> {
    let n = t.dim(dim)?;
    div_scalar(&t.sum_keepdim(dim)?, n as f64)
}

/// torch's `mean(dim)`.
fn mean(t: &Tensor, dim: D) -> candle_core::Result<Tensor> {
    mean_keepdim(t, dim)?.squeeze(dim)
}

/// torch's `avg.mul_(beta).add_(x, alpha=1 - beta)`.
fn ema(avg: &Tensor, x: &Tensor, beta: f64) -> candle_core::Result<Tensor> {
    (avg * beta)? + (x * (1.0 - beta))?
}

/// The slots of one parameter's state, names and shapes, given the parameter's shape; the first
/// slot has the parameter's shape.
type Layout = fn(&[usize]) -> Vec<(&'static str, Vec<usize>)>;

/// Per-parameter state tensors, made as zeros at the first step (as torch does) or loaded.
#[derive(Default)]
struct Slots {
    /// The parameters' names, in the order of `tensors`.
    names: Vec<String>,
    /// Each parameter's slot tensors, in its layout's order.
    tensors: Vec<Vec<Tensor>>,
}

impl Slots {
    /// Checks `params` and `grads` against each other and against the state, making the state
    /// at the first step.
    fn prepare(&mut self, params: &[Param], grads: &[Tensor], layout: Layout) -> Result<()> {
        if params.len() != grads.len() {
            return Err(Error::internal(format!(
                "optimizer step: {} parameters but {} gradients",
                params.len(),
                grads.len()
            )));
        }
        for (p, g) in params.iter().zip(grads) {
            if p.var.dtype() != DType::F32 || g.dtype() != DType::F32 {
                return Err(Error::unsupported(format!(
                    "optimizer: `{}` is {:?} with a {:?} gradient; training runs in f32",
                    p.name,
                    p.var.dtype(),
                    g.dtype()
                )));
            }
            if p.var.shape() != g.shape() {
                return Err(Error::internal(format!(
                    "optimizer step: `{}` has shape {:?} but its gradient {:?}",
                    p.name,
                    p.var.shape(),
                    g.shape()
                )));
            }
        }
        if self.names.is_empty() {
            *self = Slots::zeros(params, layout)?;
        }
        if !self.names.iter().eq(params.iter().map(|p| &p.name)) {
            return Err(Error::internal(
                "optimizer step: the parameter list changed since the state was made",
            ));
        }
        Ok(())
    }

    fn zeros(params: &[Param], layout: Layout) -> Result<Self> {
        let mut tensors = Vec::with_capacity(params.len());
        for p in params {
            let slots = layout(p.var.dims())
                .into_iter()
                .map(|(_, dims)| Tensor::zeros(dims, DType::F32, p.var.device()))
                .collect::<candle_core::Result<Vec<_>>>()?;
            tensors.push(slots);
        }
        let names = params.iter().map(|p| p.name.clone()).collect();
        Ok(Slots { names, tensors })
    }

    /// The slots as `{param}.{slot}` tensors.
    fn export(&self, layout: Layout) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (name, slots) in self.names.iter().zip(&self.tensors) {
            for ((slot, _), t) in layout(slots[0].dims()).iter().zip(slots) {
                out.push((format!("{name}.{slot}"), t.clone()));
            }
        }
        out
    }

    /// Reads every slot of every parameter from `state`, on the parameter's device.
    fn import(params: &[Param], state: &HashMap<String, Tensor>, layout: Layout) -> Result<Self> {
        let mut tensors = Vec::with_capacity(params.len());
        for p in params {
            let mut slots = Vec::new();
            for (slot, dims) in layout(p.var.dims()) {
                let key = format!("{}.{slot}", p.name);
                let t = state_tensor(state, &key)?;
                if t.dims() != dims.as_slice() || t.dtype() != DType::F32 {
                    return Err(Error::usage(format!(
                        "optimizer state `{key}` is {:?} {:?}, expected F32 {dims:?}: resume with the \
                         optimizer and trainable parameters that saved it",
                        t.dtype(),
                        t.dims()
                    )));
                }
                slots.push(t.to_device(p.var.device())?);
            }
            tensors.push(slots);
        }
        let names = params.iter().map(|p| p.name.clone()).collect();
        Ok(Slots { names, tensors })
    }
}

/// `state[key]`, or an error saying the checkpoint does not fit.
fn state_tensor<'a>(state: &'a HashMap<String, Tensor>, key: &str) -> Result<&'a Tensor> {
    state.get(key).ok_or_else(|| {
        Error::usage(format!(
            "optimizer state lacks `{key}`: resume with the optimizer and trainable parameters that saved it"
        ))
    })
}
