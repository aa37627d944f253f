//! Running the model as a chain of segments, and backward through it segment by segment, with
//! or without recomputation (gradient checkpointing).
//!
//! candle's autograd works on one graph; a `CustomOp`'s backward sees only its tensor arguments,
//! not the `Var`s used inside it, so checkpointing cannot hide in one op. Instead the model is a
//! chain of segments (DaViT blocks, the projector, encoder layers, decoder layers, the head and
//! loss). Forward, each segment runs on detached copies of its inputs, so that its graph ends
//! there. Backward walks the chain from the end: a segment's graph is rebuilt (or kept from the
//! forward pass, without checkpointing), `sum(out * grad_out)` is differentiated, its parameters'
//! gradients are added up, and its inputs' gradients go to the segment before it.

use candle_core::{Tensor, Var};

use super::ops::Mode;
use crate::error::{Error, Result};

/// One link of the chain: a function of its input tensors and of the model's parameters.
///
/// A segment that passes an input through unchanged (the encoder output, through the decoder
/// layers) returns that very tensor among its outputs.
pub trait Segment {
    /// Runs the segment. `mode` draws its dropout masks; it is seeded the same way when the
    /// segment is recomputed, so the masks repeat.
    fn forward(&self, inputs: &[Tensor], mode: &mut Mode) -> Result<Vec<Tensor>>;
}

/// A segment borrowed from the model that owns it: chains are built of references.
impl<S: Segment + ?Sized> Segment for &S {
    fn forward(&self, inputs: &[Tensor], mode: &mut Mode) -> Result<Vec<Tensor>> {
        (**self).forward(inputs, mode)
    }
}

/// The one input of a segment that takes one.
pub(crate) fn single(inputs: &[Tensor]) -> Result<&Tensor> {
    match inputs {
        [x] => Ok(x),
        _ => Err(Error::internal(format!("a segment of one input got {}", inputs.len()))),
    }
}

/// How a pass through the chain runs.
#[derive(Debug, Clone, Copy)]
pub struct Pass {
    /// Training (dropout on, seeded by `seed`) or evaluation.
    pub train: bool,
    /// The seed of this pass's dropout masks; segment `i` draws from `seed` mixed with `i`.
    pub seed: u64,
    /// Recompute each segment in backward instead of keeping its graph from the forward pass.
    pub checkpointing: bool,
}

impl Pass {
    fn mode(&self, segment: usize) -> Mode {
        if self.train {
            Mode::train(mix(self.seed, segment as u64))
        } else {
            Mode::eval()
        }
    }
}

/// SplitMix64's finalizer over `seed` and `index`: distinct, well-spread seeds per segment.
fn mix(seed: u64, index: u64) -> u64 {
    let mut z = seed ^ index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Runs `segments` forward on `inputs` without keeping any graph; returns the last outputs.
pub fn forward(segments: &[Box<dyn Segment + '_>], inputs: Vec<Tensor>, pass: &Pass) -> Result<Vec<Tensor>> {
    let mut state = inputs;
    for (i, segment) in segments.iter().enumerate() {
        state = detach_all(&segment.forward(&state, &mut pass.mode(i))?);
    }
    Ok(state)
}

/// Runs `segments` forward and backward. The last segment must output one scalar, the
/// objective; its gradient is seeded with `scale`. Returns the (detached) objective and the
/// gradient of `scale * objective` for each of `params` (`None` where it does not reach one).
///
/// The chain's inputs get no gradient (pixel values), nor does anything before the first
/// segment with trainable parameters.
pub fn backward(
    segments: &[Box<dyn Segment + '_>],
    inputs: Vec<Tensor>,
    params: &[Var],
    scale: f64,
    pass: &Pass,
) -> Result<(Tensor, Vec<Option<Tensor>>)> {
    // Forward: each segment's inputs, and without checkpointing its live outputs. Inputs become
    // variables (whose gradients are wanted) only behind a segment with trainable parameters,
    // which shows as an output that tracks operations: nothing is differentiated through a
    // frozen prefix (a frozen vision tower).
    let mut saved: Vec<(Vec<Tensor>, Option<Vec<Tensor>>)> = Vec::with_capacity(segments.len());
    let mut first_trainable = None;
    let mut state = inputs;
    for (i, segment) in segments.iter().enumerate() {
        let inputs = if first_trainable.is_some() {
            as_vars(&state)?
        } else {
            state
        };
        let outputs = segment.forward(&inputs, &mut pass.mode(i))?;
        if first_trainable.is_none() && outputs.iter().any(Tensor::track_op) {
            first_trainable = Some(i);
        }
        state = detach_all(&outputs);
        saved.push((inputs, (!pass.checkpointing).then_some(outputs)));
    }
    let objective = match state.as_slice() {
        [loss] if loss.rank() == 0 => loss.clone(),
        _ => return Err(Error::internal("the last segment must output one scalar")),
    };

    let mut grads: Vec<Option<Tensor>> = vec![None; params.len()];
    let mut grad_out: Vec<Tensor> = vec![Tensor::new(scale as f32, objective.device())?.to_dtype(objective.dtype())?];
    let Some(first_trainable) = first_trainable else {
        return Ok((objective, grads));
    };
    for (i, segment) in segments.iter().enumerate().skip(first_trainable).rev() {
        let (inputs, outputs) = saved.pop().expect("one entry per segment");
        let outputs = match outputs {
            Some(outputs) => outputs,
            None => segment.forward(&inputs, &mut pass.mode(i))?,
        };
        if outputs.len() != grad_out.len() {
            return Err(Error::internal(format!(
                "segment {} gave {} outputs, the next one took {}",
                i,
                outputs.len(),
                grad_out.len()
            )));
        }
        let mut terms = Vec::with_capacity(outputs.len());
        for (out, g) in outputs.iter().zip(&grad_out) {
            if out.track_op() || out.is_variable() {
                terms.push((out * g)?.sum_all()?);
            }
        }
        // Gradients computed through a parameter still carry its graph (candle keeps them
        // differentiable): detach every one, or the next segment's backward would reach into
        // this one's parameters again.
        let store = Tensor::stack(&terms, 0)?.sum_all()?.backward()?;
        for (param, grad) in params.iter().zip(grads.iter_mut()) {
            if let Some(g) = store.get(param.as_tensor()) {
                let g = g.detach();
                *grad = Some(match grad.take() {
                    Some(sum) => (sum + g)?,
                    None => g,
                });
            }
        }
        if i > first_trainable {
            grad_out = inputs
                .iter()
                .map(|x| match store.get(x) {
                    Some(g) => Ok(g.detach()),
                    None => Ok(x.zeros_like()?),
                })
                .collect::<Result<_>>()?;
        }
    }
    Ok((objective, grads))
}

fn detach_all(tensors: &[Tensor]) -> Vec<Tensor> {
    tensors.iter().map(Tensor::detach).collect()
}

/// Fresh variables over the same storage: the roots of a segment's graph.
fn as_vars(tensors: &[Tensor]) -> Result<Vec<Tensor>> {
    tensors
        .iter()
        .map(|t| Ok(Var::from_tensor(t)?.as_tensor().clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::tensor::ops::dropout;

    /// `tanh(x w)`, with dropout so that recomputation must repeat the masks.
    struct Layer(Tensor);
    impl Segment for Layer {
        fn forward(&self, inputs: &[Tensor], mode: &mut Mode) -> Result<Vec<Tensor>> {
            Ok(vec![dropout(&inputs[0].matmul(&self.0)?.tanh()?, 0.3, mode)?])
        }
    }
    /// `[h] -> [h w, h]`: passes its input through, as the decoder layers pass the memory.
    struct Fork(Tensor);
    impl Segment for Fork {
        fn forward(&self, inputs: &[Tensor], _: &mut Mode) -> Result<Vec<Tensor>> {
            Ok(vec![inputs[0].matmul(&self.0)?, inputs[0].clone()])
        }
    }
    /// `[a, b] -> [sum(a * b)]`.
    struct Dot;
    impl Segment for Dot {
        fn forward(&self, inputs: &[Tensor], _: &mut Mode) -> Result<Vec<Tensor>> {
            Ok(vec![(&inputs[0] * &inputs[1])?.sum_all()?])
        }
    }

    fn var(shape: (usize, usize), seed: u64) -> Result<Var> {
        let t = Tensor::arange(0u32, (shape.0 * shape.1) as u32, &Device::Cpu)?.to_dtype(DType::F64)?;
        let t = ((t * (0.37 * seed as f64))?.sin()? * 0.8)?.reshape(shape)?;
        Ok(Var::from_tensor(&t)?)
    }

    #[test]
    fn segment_wise_backward_equals_one_graph_with_and_without_recomputation() -> Result<()> {
        let (w0, w1, w2) = (var((4, 4), 1)?, var((4, 4), 2)?, var((4, 4), 3)?);
        let x = var((3, 4), 4)?.as_tensor().detach();
        let chain: Vec<Box<dyn Segment>> = vec![
            Box::new(Layer(w0.as_tensor().clone())),
            Box::new(Layer(w1.as_tensor().clone())),
            Box::new(Fork(w2.as_tensor().clone())),
            Box::new(Dot),
        ];
        let params = [w0.clone(), w1.clone(), w2.clone()];
        let pass = |checkpointing| Pass {
            train: true,
            seed: 11,
            checkpointing,
        };

        // One graph, each segment drawing its masks as the chain does.
        let mut h = x.clone();
        for (i, segment) in chain[..2].iter().enumerate() {
            h = segment.forward(&[h], &mut pass(false).mode(i))?.remove(0);
        }
        let whole = (h.matmul(w2.as_tensor())? * &h)?.sum_all()?;
        let store = (&whole * 2.0)?.backward()?;

        for checkpointing in [false, true] {
            let (objective, grads) = backward(&chain, vec![x.clone()], &params, 2.0, &pass(checkpointing))?;
            assert_eq!(objective.to_scalar::<f64>()?, whole.to_scalar::<f64>()?);
            for (k, (p, g)) in params.iter().zip(&grads).enumerate() {
                let expected = store.get(p.as_tensor()).unwrap();
                let got = g.as_ref().expect("every parameter gets a gradient");
                let diff = (got - expected)?.abs()?.max_all()?.to_scalar::<f64>()?;
                assert!(diff < 1e-12, "param {k}, checkpointing {checkpointing}: {diff}");
            }
        }
        Ok(())
    }

    #[test]
    fn a_frozen_prefix_is_not_differentiated() -> Result<()> {
        let (w0, w1) = (var((4, 4), 1)?, var((4, 4), 2)?);
        let frozen = w0.as_tensor().detach();
        let x = var((3, 4), 4)?.as_tensor().detach();
        let chain: Vec<Box<dyn Segment>> = vec![
            Box::new(Layer(frozen)),
            Box::new(Fork(w1.as_tensor().clone())),
            Box::new(Dot),
        ];
        let pass = Pass {
            train: false,
            seed: 0,
            checkpointing: true,
        };
        let (_, grads) = backward(&chain, vec![x], &[w0, w1], 1.0, &pass)?;
        assert!(grads[0].is_none(), "a frozen tensor gets no gradient");
        assert!(grads[1].is_some());
        Ok(())
    }
}
