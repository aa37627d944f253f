//! AdamW as `torch.optim.AdamW(betas=(0.9, 0.999), eps=1e-8, foreach=False)`: torch's
//! `_single_tensor_adam` with decoupled weight decay.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use florence::{Error, Result};

use super::{div_scalar, state_tensor, Optimizer, Param, Slots};

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

/// AdamW: `p *= 1 - lr*wd`, running averages of the gradient and its square, bias-corrected
/// update `p += -(lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)`. The bias corrections are f64
/// scalars, as torch computes them from the step count.
pub struct AdamW {
    weight_decay: f64,
    /// Steps taken (torch keeps one per parameter; they all step together here).
    step: u64,
    slots: Slots,
}

impl AdamW {
    /// A fresh AdamW with weight decay `weight_decay`.
    pub fn new(weight_decay: f64) -> Self {
        AdamW {
            weight_decay,
            step: 0,
            slots: Slots::default(),
        }
    }

    /// One parameter's update: the new parameter and slots (`exp_avg`, `exp_avg_sq`).
    fn update(&self, p: &Tensor, g: &Tensor, slots: &[Tensor], lr: f64) -> Result<(Tensor, Vec<Tensor>)> {
        let p = if self.weight_decay != 0.0 {
            (p * (1.0 - lr * self.weight_decay))?
        } else {
            p.clone()
        };
        // exp_avg.lerp_(grad, 1 - beta1): weight < 0.5, so `m + w * (g - m)`.
        let m = (&slots[0] + ((g - &slots[0])? * (1.0 - BETA1))?)?;
        // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2): `value * g` first.
        let v = ((&slots[1] * BETA2)? + ((g * (1.0 - BETA2))? * g)?)?;
        let step = self.step as f64;
        let step_size = lr / (1.0 - BETA1.powf(step));
        let bias_correction2_sqrt = (1.0 - BETA2.powf(step)).powf(0.5);
        let denom = (div_scalar(&v.sqrt()?, bias_correction2_sqrt)? + EPS)?;
        // param.addcdiv_(exp_avg, denom, value=-step_size): `value * m` first.
        let p = (p + (&m * -step_size)?.div(&denom)?)?;
        Ok((p, vec![m, v]))
    }
}

/// The layout of AdamW's state: the running averages of the gradient and of its square.
fn layout(dims: &[usize]) -> Vec<(&'static str, Vec<usize>)> {
    vec![("exp_avg", dims.to_vec()), ("exp_avg_sq", dims.to_vec())]
}

impl Optimizer for AdamW {
    fn step(&mut self, params: &[Param], grads: &[Tensor], lr: f64) -> Result<()> {
        self.slots.prepare(params, grads, layout)?;
        self.step += 1;
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            let (new, slots) = self.update(&p.var.as_detached_tensor(), &g.detach(), &self.slots.tensors[i], lr)?;
            p.var.set(&new)?;
            self.slots.tensors[i] = slots;
        }
        Ok(())
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = self.slots.export(layout);
        if self.step > 0 {
            out.push(("step".into(), Tensor::new(self.step as f64, &Device::Cpu)?));
        }
        Ok(out)
    }

    fn load_state(&mut self, params: &[Param], state: &HashMap<String, Tensor>) -> Result<()> {
        let step = state_tensor(state, "step")?;
        let step = match step.dims() {
            [] => step.to_dtype(DType::F64)?.to_scalar::<f64>()?,
            _ => f64::NAN,
        };
        if !(step >= 1.0 && step.fract() == 0.0 && step < 2f64.powi(53)) {
            return Err(Error::usage(format!(
                "optimizer state `step` is not a step count ({step}): resume from a checkpoint saved by AdamW"
            )));
        }
        self.slots = Slots::import(params, state, layout)?;
        self.step = step as u64;
        Ok(())
    }
}
