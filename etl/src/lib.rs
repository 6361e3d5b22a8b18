//! Media in, datasets out: sources -> decode -> resize -> codec bytes -> shards and manifests,
//! then vocabularies and token shards over them. Each stage is one module; [`builder`] runs
//! them in parallel over a source. Codec bytes come from `codeclm-codec`; every file written
//! is a format of `codeclm-formats`.

pub mod builder;
pub mod config;
pub mod crop;
pub mod decode;
pub mod isolate;
pub mod pillow_resample;
pub mod process;
pub mod resize;
pub mod source;
pub mod tokenize;

pub use builder::{build, BuildOptions, BuildSettings, BuildSummary, SlowInput};
pub use config::{ImageConfig, Preprocess};
pub use crop::RandomCrops;
pub use isolate::Isolation;
pub use source::{SourceKind, SourceSpec};

/// Real media for unit tests (this crate's and those of crates above it): the bundled photos
/// encoded as a dataset encodes them.
#[doc(hidden)]
pub mod test_media {
    use crate::config::ImageConfig;
    use crate::process::process_image;

    /// Abbreviated streams of the first `n` bundled photos (default settings: 256x256, q25,
    /// 4:2:0, restart interval 1), and the tables-only stream that completes them.
    pub fn photo_streams(n: usize) -> (Vec<Vec<u8>>, Vec<u8>) {
        static ALL: std::sync::OnceLock<(Vec<Vec<u8>>, Vec<u8>)> = std::sync::OnceLock::new();
        let (streams, tables) = ALL.get_or_init(|| photo_streams_with(&ImageConfig::default()));
        (streams[..n].to_vec(), tables.clone())
    }

    /// Every bundled photo encoded with `cfg` (sorted by file name), and the tables-only stream.
    pub fn photo_streams_with(cfg: &ImageConfig) -> (Vec<Vec<u8>>, Vec<u8>) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/images");
        let mut paths: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "png" || x == "jpg"))
            .collect();
        paths.sort();
        let streams = paths
            .iter()
            .map(|p| {
                let bytes = std::fs::read(p).unwrap();
                let ext = p.extension().and_then(|e| e.to_str());
                process_image(&bytes, ext, cfg).codec.unwrap()
            })
            .collect();
        (
            streams,
            codeclm_codec::jpeg::tables_only(&cfg.jpeg).unwrap(),
        )
    }
}
