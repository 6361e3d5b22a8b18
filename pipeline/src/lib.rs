//! The media pipeline: sources -> decode -> resize -> JPEG encode -> codec shards + manifests.
//! Each stage is one module; [`builder`] runs them in parallel over a source and writes a
//! dataset through the formats defined in `codeclm-manifests`.

pub mod builder;
pub mod config;
pub mod decode;
pub mod h264;
pub mod jpeg;
pub mod pillow_resample;
pub mod process;
pub mod resize;
pub mod source;
pub mod tokenize;
pub mod video;

pub use builder::{build, BuildOptions, BuildSettings, BuildSummary};
pub use config::{ImageConfig, Preprocess};
pub use h264::{annexb_to_mp4, decode_h264, DecodedVideo};
pub use source::{SourceKind, SourceSpec};
pub use video::{encode_bytes as encode_video_bytes, encode_file as encode_video_file};
pub use video::{EncodedVideo, VideoConfig, VideoError};
