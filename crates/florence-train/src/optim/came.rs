//! CAME (Luo et al. 2023), exactly as came-pytorch 0.1.3's `CAME.step` with Florence-2ner's
//! settings: betas (0.9, 0.999, 0.9999), eps (1e-30, 1e-16), clip threshold 1.

use std::collections::HashMap;

use candle_core::{Tensor, D};
use florence::Result;

use super::{ema, mean, mean_keepdim, Optimizer, Param, Slots};

/// Decay of the update's running average.
const BETA_AVG: f64 = 0.9;
/// Decay of the squared gradient's running average.
const BETA_SQ: f64 = 0.999;
/// Decay of the instability's running average.
const BETA_RES: f64 = 0.9999;
/// Added to the squared gradient.
const EPS_SQ: f64 = 1e-30;
/// Added to the instability.
const EPS_RES: f64 = 1e-16;

/// The CAME optimizer: second moments factored over the last two dims of tensors with two or
/// more, full for 1-D tensors; confidence-guided update; decoupled weight decay (`p += -wd*lr*p`
/// before the update); no bias correction. The RMS clip threshold is 1, so `rms / 1` is `rms`.
pub struct Came {
    weight_decay: f64,
    slots: Slots,
}

impl Came {
    /// A fresh CAME with weight decay `weight_decay`.
    pub fn new(weight_decay: f64) -> Self {
        Came {
            weight_decay,
            slots: Slots::default(),
        }
    }

    /// One parameter's update: the new parameter and slots.
    fn update(&self, p: &Tensor, g: &Tensor, slots: &[Tensor], lr: f64) -> Result<(Tensor, Vec<Tensor>)> {
        let factored = g.rank() >= 2;
        let sq = (g.sqr()? + EPS_SQ)?;
        let mut next = vec![];
        let scaled = if factored {
            let row = ema(&slots[1], &mean(&sq, D::Minus1)?, BETA_SQ)?;
            let col = ema(&slots[2], &mean(&sq, D::Minus2)?, BETA_SQ)?;
            let scaled = approx_rsqrt(&row, &col)?.mul(g)?;
            next.extend([row, col]);
            scaled
        } else {
            let v = ema(&slots[1], &sq, BETA_SQ)?;
            let scaled = v.sqrt()?.recip()?.mul(g)?;
            next.push(v);
            scaled
        };
        // `update / max(rms(update) / clip_threshold, 1)` with the threshold 1.
        let update = scaled.broadcast_div(&rms(&scaled)?.maximum(1.0)?)?;
        let exp_avg = ema(&slots[0], &update, BETA_AVG)?;
        let step = if factored {
            let res = ((&update - &exp_avg)?.sqr()? + EPS_RES)?;
            let row = ema(&slots[3], &mean(&res, D::Minus1)?, BETA_RES)?;
            let col = ema(&slots[4], &mean(&res, D::Minus2)?, BETA_RES)?;
            let step = approx_rsqrt(&row, &col)?.mul(&exp_avg)?;
            next.extend([row, col]);
            step
        } else {
            exp_avg.clone()
        };
        next.insert(0, exp_avg);
        let p = if self.weight_decay != 0.0 {
            (p + (p * (-self.weight_decay * lr))?)?
        } else {
            p.clone()
        };
        Ok(((p - (step * lr)?)?, next))
    }
}

/// came-pytorch's `_approx_sq_grad`: the rank-1 estimate of `1 / sqrt(v)` from the row and
/// column averages, `rsqrt(row / mean(row))[.., :, None] * rsqrt(col)[.., None, :]`.
fn approx_rsqrt(row: &Tensor, col: &Tensor) -> candle_core::Result<Tensor> {
    let r = row
        .broadcast_div(&mean_keepdim(row, D::Minus1)?)?
        .sqrt()?
        .recip()?
        .unsqueeze(row.rank())?;
    let c = col.unsqueeze(col.rank() - 1)?.sqrt()?.recip()?;
    r.broadcast_mul(&c)
}

/// came-pytorch's `_rms`: `norm(t) / sqrt(numel)`, a 0-dim tensor.
fn rms(t: &Tensor) -> candle_core::Result<Tensor> {
    super::div_scalar(&super::norm2(t)?, (t.elem_count() as f64).sqrt())
}

/// The layout of CAME's state: `exp_avg`, then the factored row and column averages of the
/// squared gradient and of the instability, or the full `exp_avg_sq` for 1-D tensors.
fn layout(dims: &[usize]) -> Vec<(&'static str, Vec<usize>)> {
    let full = dims.to_vec();
    match dims {
        [lead @ .., rows, cols] => {
            let row = [lead, &[*rows]].concat();
            let col = [lead, &[*cols]].concat();
            vec![
                ("exp_avg", full),
                ("exp_avg_sq_row", row.clone()),
                ("exp_avg_sq_col", col.clone()),
                ("exp_avg_res_row", row),
                ("exp_avg_res_col", col),
            ]
        }
        _ => vec![("exp_avg", full.clone()), ("exp_avg_sq", full)],
    }
}

impl Optimizer for Came {
    fn step(&mut self, params: &[Param], grads: &[Tensor], lr: f64) -> Result<()> {
        self.slots.prepare(params, grads, layout)?;
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            let (new, slots) = self.update(&p.var.as_detached_tensor(), &g.detach(), &self.slots.tensors[i], lr)?;
            p.var.set(&new)?;
            self.slots.tensors[i] = slots;
        }
        Ok(())
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self.slots.export(layout))
    }

    fn load_state(&mut self, params: &[Param], state: &HashMap<String, Tensor>) -> Result<()> {
        self.slots = Slots::import(params, state, layout)?;
        Ok(())
    }
}
