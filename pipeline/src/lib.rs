//! The media pipeline: sources -> decode -> resize -> JPEG encode -> codec shards + manifests.
//! Each stage is one module; [`builder`] runs them in parallel over a source and writes a
//! dataset through the formats defined in `codeclm-manifests`.

pub mod builder;
pub mod config;
pub mod decode;
pub mod jpeg;
pub mod pillow_resample;
pub mod process;
pub mod resize;
pub mod source;
pub mod tokenize;

pub use builder::{build, BuildOptions, BuildSettings, BuildSummary};
pub use config::{ImageConfig, Preprocess};
pub use source::{SourceKind, SourceSpec};
