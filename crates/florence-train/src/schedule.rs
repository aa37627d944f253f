//! Learning-rate schedules, equal to torch's scheduler objects as Florence-2ner drives them.
//!
//! torch's `LinearLR` and `CosineAnnealingLR` update the rate recursively from the previous one,
//! and `SequentialLR` restarts the second scheduler at the milestone through its closed form;
//! the rates here follow the same recursions in f64, so they equal torch's to the last bit
//! wherever libm's `cos` and `pow` agree with Python's.

use std::f64::consts::PI;

/// The schedules `florence train` offers (Florence-2ner's `lr_scheduler` key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ScheduleKind {
    /// Florence-2ner's `RexLR`: linear warmup to `lr`, then the reflected-exponential decay to
    /// `min_lr` at the last step.
    #[serde(rename = "REX", alias = "rex", alias = "Rex")]
    Rex,
    /// Florence-2ner's cosine: `SequentialLR(LinearLR(1e-20 -> 1 over W), CosineAnnealingLR(
    /// T_max = T - W + 1, eta_min = min_lr))` with milestone W, the cosine alone for W = 0.
    #[serde(rename = "Cosine", alias = "cosine")]
    Cosine,
    /// `lr` after the same `LinearLR` warmup as Cosine (Florence-2ner's `ConstantLR` with torch's
    /// defaults, lr/3 for five steps, is taken for an accident).
    #[serde(rename = "Constant", alias = "constant")]
    Constant,
    /// transformers' `get_linear_schedule_with_warmup` (0 -> lr over W, its own warmup), decaying
    /// linearly to `min_lr` at step T.
    #[serde(rename = "Linear", alias = "linear")]
    Linear,
}

/// `LinearLR`'s start factor in Florence-2ner's warmup.
const WARMUP_START: f64 = 1e-20;
/// `LinearLR`'s end factor.
const WARMUP_END: f64 = 1.0;

/// A learning-rate schedule over `total` optimizer steps with `warmup` warmup steps.
#[derive(Debug, Clone)]
pub struct Schedule {
    kind: ScheduleKind,
    lr: f64,
    min_lr: f64,
    warmup: usize,
    total: usize,
    /// The rates of steps 1 ..= total (the recursions make each depend on the one before).
    rates: Vec<f64>,
}

impl Schedule {
    /// The schedule `kind` from `lr` (> 0) down to `min_lr` over `total` steps, `warmup` of
    /// them warming up.
    pub fn new(kind: ScheduleKind, lr: f64, min_lr: f64, warmup: usize, total: usize) -> Self {
        let mut schedule = Schedule {
            kind,
            lr,
            min_lr,
            warmup,
            total,
            rates: Vec::with_capacity(total),
        };
        let mut prev = lr;
        for step in 1..=total {
            prev = schedule.next(step, prev);
            schedule.rates.push(prev);
        }
        schedule
    }

    /// The rate optimizer step `step` (1-based) uses: torch's optimizer `lr` before the
    /// scheduler's `step`-th `step()` call. Step 0 is taken as step 1.
    pub fn lr(&self, step: usize) -> f64 {
        let step = step.max(1);
        if let Some(&rate) = self.rates.get(step - 1) {
            return rate;
        }
        let mut prev = self.rates.last().copied().unwrap_or(self.lr);
        for s in self.rates.len() + 1..=step {
            prev = self.next(s, prev);
        }
        prev
    }

    /// The rate of `step` given the rate of the step before (`prev`; unused at step 1).
    fn next(&self, step: usize, prev: f64) -> f64 {
        match self.kind {
            ScheduleKind::Rex => self.rex(step),
            ScheduleKind::Linear => self.linear(step - 1),
            ScheduleKind::Constant | ScheduleKind::Cosine if step <= self.warmup => self.warmup_rate(step, prev),
            ScheduleKind::Constant => self.lr,
            ScheduleKind::Cosine => self.cosine(step - 1 - self.warmup, prev),
        }
    }

    /// Florence-2ner's `RexLR.get_lr` at `last_step = t`.
    fn rex(&self, t: usize) -> f64 {
        let (t, w, total) = (t as i64, self.warmup as i64, self.total as i64);
        if 1 <= t && t <= w {
            return self.lr * t as f64 / w as f64;
        }
        let (after, remaining) = (t - w, total - w);
        if after >= remaining || after == -1 || remaining <= 0 {
            return self.min_lr;
        }
        let z = (remaining - after.rem_euclid(remaining)) as f64 / remaining as f64;
        let rho = self.min_lr / self.lr;
        self.lr * (rho + (1.0 - rho) * (z / (0.1 + 0.9 * z)))
    }

    /// The linear schedule's `LambdaLR` at `last_epoch = t`: `lr * lambda(t)`.
    fn linear(&self, t: usize) -> f64 {
        let (t, w, total) = (t as i64, self.warmup as i64, self.total as i64);
        if t < w {
            return self.lr * (t as f64 / w.max(1) as f64);
        }
        let frac = ((total - t) as f64 / (total - w).max(1) as f64).max(0.0);
        self.lr * ((self.min_lr + (self.lr - self.min_lr) * frac) / self.lr)
    }

    /// `LinearLR(start_factor=1e-20, end_factor=1, total_iters=W)` at `last_epoch = step - 1`,
    /// recursively from the previous rate as torch computes it.
    fn warmup_rate(&self, step: usize, prev: f64) -> f64 {
        if step == 1 {
            return self.lr * WARMUP_START;
        }
        let span = WARMUP_END - WARMUP_START;
        let e = (step - 1) as f64;
        prev * (1.0 + span / (self.warmup as f64 * WARMUP_START + (e - 1.0) * span))
    }

    /// `CosineAnnealingLR(T_max = T - W + 1, eta_min = min_lr)` at `last_epoch = k`: the
    /// initial rate (or, after a warmup, `SequentialLR`'s closed-form restart) at k = 0, torch's
    /// recursion after. T_max is at least 1 (only steps past T reach it when W > T).
    fn cosine(&self, k: usize, prev: f64) -> f64 {
        let t_max = (self.total + 1).saturating_sub(self.warmup).max(1) as f64;
        let (lr, min) = (self.lr, self.min_lr);
        if k == 0 {
            return if self.warmup == 0 {
                lr
            } else {
                min + (lr - min) * (1.0 + (PI * 0.0 / t_max).cos()) / 2.0
            };
        }
        let k = k as f64;
        if (k - 1.0 - t_max).rem_euclid(2.0 * t_max) == 0.0 {
            return prev + (lr - min) * (1.0 - (PI / t_max).cos()) / 2.0;
        }
        (1.0 + (PI * k / t_max).cos()) / (1.0 + (PI * (k - 1.0) / t_max).cos()) * (prev - min) + min
    }
}
