//! The devices of the training engine (llm.c's approach): what a device provides
//! ([`backend::Backend`]: f32 and token-id buffers, views into them, and the kernels of the
//! paper's Llama, each forward beside its backward) and the CPU backend ([`cpu`]: `gemm`
//! matmuls, tiled flash attention, SIMD row kernels), plus the forward kernels of convolutional
//! inference over NHWC tensors (im2col, pooling, concat: the FID network). The models written
//! against the trait live with their users (`codeclm-model`'s Llama, `fid`'s Inception-v3). No
//! heap allocation per call after the first.

pub mod backend;
mod conv;
pub mod cpu;
pub mod cuda;
pub mod profile;
pub mod simd;

pub use backend::{Backend, Matmul, Span, View, Window, IGNORE};
pub use cpu::Cpu;
pub use cuda::Cuda;

/// Which device a command runs on (`--device cpu|cuda|cuda:N`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    #[default]
    Cpu,
    /// A CUDA device by ordinal.
    Cuda(usize),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A buffer that cannot be allocated (names the size and the fix).
    #[error("{0}")]
    OutOfMemory(String),
    /// A CUDA device or library problem (names the library or device and the fix).
    #[error("{0}")]
    Device(String),
}
