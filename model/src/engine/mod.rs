//! The training engine, in llm.c's manner: one flat f32 buffer of parameters (views named as
//! Hugging Face names them), one of gradients, AdamW's moments beside them, an activation arena
//! sized once from config x batch x context, and an explicit forward and backward per layer
//! ([`model`]) over a small set of kernels that a backend provides ([`backend::Backend`]; the
//! CPU one is [`cpu`]). No heap allocation per step after the first (tested).

pub mod backend;
pub mod cpu;
pub mod model;
pub mod profile;
pub mod simd;

pub use backend::{Backend, Span, View, IGNORE};
pub use cpu::Cpu;
pub use model::{Capacity, Model, ParamLayout};

#[cfg(test)]
mod tests;
