//! H.264: the encoder that reproduces the paper's ffmpeg command byte for byte ([`encode`]),
//! bounded decoding and MP4 remuxing of Annex B streams ([`decode`]), their structure from
//! the bytes alone ([`nal`], [`check`]), and the byte grammar constrained sampling keeps generated streams
//! in ([`grammar`]).

pub mod check;
#[cfg(feature = "ffmpeg")]
pub mod decode;
#[cfg(feature = "ffmpeg")]
pub mod encode;
pub mod grammar;
pub mod nal;

#[cfg(feature = "ffmpeg")]
pub use decode::{annexb_to_mp4, decode_h264, DecodedVideo};
#[cfg(feature = "ffmpeg")]
pub use encode::{encode_bytes, encode_file, EncodedVideo, VideoConfig, VideoError};
pub use grammar::{H264Grammar, H264GrammarError, H264State};
