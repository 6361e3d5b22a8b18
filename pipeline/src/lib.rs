//! The media pipeline: sources -> decode -> resize -> JPEG encode -> codec shards + manifests.
//! Each stage is one module; [`builder`] runs them in parallel over a source and writes a
//! dataset through the formats defined in `codeclm-manifests`.

pub mod builder;
pub mod config;
pub mod contact_sheet;
pub mod decode;
pub mod h264;
pub mod h264_nal;
pub mod jpeg;
pub mod jpeg_scan;
pub mod pillow_resample;
pub mod process;
pub mod prompt;
pub mod resize;
pub mod sample;
pub mod sample_run;
pub mod source;
pub mod tokenize;
pub mod video;
pub mod video_sample;

pub use builder::{build, BuildOptions, BuildSettings, BuildSummary};
pub use config::{ImageConfig, Preprocess};
pub use h264::{annexb_to_mp4, decode_h264, DecodedVideo};
pub use source::{SourceKind, SourceSpec};
pub use video::{encode_bytes as encode_video_bytes, encode_file as encode_video_file};
pub use video::{EncodedVideo, VideoConfig, VideoError};

/// Real media for unit tests: the bundled photos encoded as the dataset encodes them.
#[cfg(test)]
pub(crate) mod test_media {
    use crate::config::ImageConfig;
    use crate::process::process_image;

    /// Abbreviated streams of the first `n` bundled photos (default settings: 256x256, q25,
    /// 4:2:0, restart interval 1), and the tables-only stream that completes them.
    pub fn photo_streams(n: usize) -> (Vec<Vec<u8>>, Vec<u8>) {
        static ALL: std::sync::OnceLock<(Vec<Vec<u8>>, Vec<u8>)> = std::sync::OnceLock::new();
        let (streams, tables) = ALL.get_or_init(all_streams);
        (streams[..n].to_vec(), tables.clone())
    }

    fn all_streams() -> (Vec<Vec<u8>>, Vec<u8>) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/images");
        let mut paths: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "png" || x == "jpg"))
            .collect();
        paths.sort();
        let cfg = ImageConfig::default();
        let streams = paths
            .iter()
            .map(|p| {
                let bytes = std::fs::read(p).unwrap();
                let ext = p.extension().and_then(|e| e.to_str());
                process_image(&bytes, ext, &cfg).codec.unwrap()
            })
            .collect();
        (streams, crate::jpeg::tables_only(&cfg.jpeg).unwrap())
    }
}
