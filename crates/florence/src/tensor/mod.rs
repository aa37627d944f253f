//! The tensor path: Florence-2 in plain candle `Tensor` operations over `Var`s.
//!
//! The same paper concepts as the fast CPU path, with the same struct names and checkpoint keys,
//! written for autograd and for any candle device: it trains (`florence train`) and is the
//! oracle the fast path is tested against. Nothing here uses an operation without a backward
//! pass: see [`ops`] for the differentiable layer norm and softmax, and the custom depthwise
//! convolution, which carries its own backward.
//!
//! The model runs as a chain of [`Segment`]s so that backward can go segment by segment, with
//! recomputation (gradient checkpointing) or without: see [`segment`].

pub mod decoding;
pub mod dwconv;
mod florence2;
pub mod language;
pub mod loss;
pub mod ops;
mod params;
pub mod projector;
pub mod segment;
pub mod vision;

pub use decoding::{Generator, TensorDecoder};
pub use florence2::Florence2;
pub use params::{ParamGroup, Parameters, SHARED};
pub use segment::{Pass, Segment};
