//! Media in, datasets out: sources -> decode -> resize -> codec bytes -> shards and manifests,
//! then vocabularies and token shards over them. Each stage is one module; [`builder`] runs
//! them in parallel over a source. Codec bytes come from `codeclm-codec`; every file written
//! is a format of `codeclm-formats`.

pub mod builder;
pub mod config;
pub mod crop;
pub mod decode;
pub mod isolate;
pub mod mirror;
pub mod objects;
pub mod pillow_resample;
pub mod process;
pub mod resize;
pub mod source;
pub mod tokenize;
pub mod walk;

pub use builder::{build, BuildOptions, BuildSettings, BuildSummary, SlowInput};
pub use config::{ImageConfig, Preprocess};
pub use crop::RandomCrops;
pub use isolate::Isolation;
pub use source::{SourceKind, SourceSpec};

/// Runs `f` on every item on `threads` plain threads (each takes the next item when it is
/// done), results in item order; after an `Err` no new item starts. Plain threads, not rayon:
/// a part's work calls polars, whose pool a rayon worker would wait on by stealing another
/// part's job onto the same stack (thousands of parts overflow it).
pub fn on_threads<T: Sync, R: Send, E: Send>(
    threads: usize,
    items: &[T],
    f: impl Fn(&T) -> Result<R, E> + Sync,
) -> Vec<Result<R, E>> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let results: std::sync::Mutex<Vec<(usize, Result<R, E>)>> = Default::default();
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, items.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= items.len() || failed.load(Ordering::Relaxed) {
                    break;
                }
                let r = f(&items[i]);
                if r.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                results
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((i, r));
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

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

#[cfg(test)]
mod tests {
    /// Results come in item order whatever thread ran them; after an error no new item starts
    /// (items already running finish).
    #[test]
    fn on_threads_keeps_order_and_stops_after_an_error() {
        let items: Vec<u32> = (0..1000).collect();
        let out = super::on_threads(4, &items, |&i| Ok::<_, String>(i * 2));
        assert_eq!(out.len(), 1000);
        assert!(out.iter().enumerate().all(|(i, r)| r == &Ok(i as u32 * 2)));
        let started = std::sync::atomic::AtomicUsize::new(0);
        let out = super::on_threads(2, &items, |&i| {
            started.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if i == 10 {
                Err(format!("item {i}"))
            } else {
                // Slow items: the other thread cannot race far past the failing one.
                std::thread::sleep(std::time::Duration::from_millis(2));
                Ok(i)
            }
        });
        assert!(out.contains(&Err("item 10".into())));
        assert!(
            started.into_inner() < 20,
            "items kept starting after the error"
        );
        assert!(super::on_threads(3, &[] as &[u32], |&i| Ok::<_, ()>(i)).is_empty());
    }
}
