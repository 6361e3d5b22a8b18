//! The training engine, in llm.c's manner: one flat f32 buffer of parameters (views named as
//! Hugging Face names them), one of gradients, AdamW's moments beside them, an activation arena
//! sized once from config x batch x context, and an explicit forward and backward per layer
//! ([`model`]) over a small set of kernels that a backend provides (`codeclm-engine`:
//! [`backend::Backend`]; the CPU one is [`cpu`]). No heap allocation per step after the first (tested).

pub mod model;

pub mod check;

pub use codeclm_engine::{backend, cpu, cuda, profile, simd};
pub use codeclm_engine::{Backend, Cpu, Cuda, Device, Span, View, IGNORE};
pub use model::{Capacity, Model, ParamLayout};

#[cfg(test)]
pub(crate) mod tests;
