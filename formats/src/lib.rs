//! Every byte a codeclm dataset puts on disk, and only that: codec shards, the Parquet sample
//! manifests, `dataset.json`, the directory layout, vocabularies and token shards. `etl` writes
//! these formats, `model` and `sample` read them; no other crate defines a file format. What is
//! inside a codec record (JPEG, H.264) is `codeclm-codec`'s business.

#[cfg(feature = "manifests")]
pub mod dataset;
pub mod error;
pub mod export;
#[cfg(test)]
mod fuzz;
#[cfg(feature = "manifests")]
mod ids;
pub mod kinds;
#[cfg(feature = "manifests")]
pub mod lease;
#[cfg(feature = "manifests")]
pub mod plan;
#[cfg(feature = "manifests")]
pub mod reader;
#[cfg(feature = "manifests")]
pub mod rows;
#[cfg(feature = "manifests")]
pub mod samples;
pub mod shard;
#[cfg(feature = "manifests")]
mod token_manifest;
pub mod tokens;
pub mod vocab;

#[cfg(feature = "manifests")]
pub use dataset::{DatasetConfig, DatasetLayout};
pub use error::{Error, Result};
pub use kinds::{Modality, Split};
#[cfg(feature = "manifests")]
pub use reader::Dataset;
#[cfg(feature = "manifests")]
pub use rows::RowFilter;
#[cfg(feature = "manifests")]
pub use samples::{SampleRow, Status};
pub use shard::{Codec, CodecShard, CodecShardWriter, RecordLocation};

/// Writes `bytes` to `path` atomically: a temp file beside it, fsync, then rename, so a reader
/// (or a resumed build) sees either the old file or the whole new one, never a torn write.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = tmp_path(path);
    let io = |source| Error::Io {
        path: tmp.clone(),
        source,
    };
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    sync_parent(path)
}

/// Writes `path` atomically with a writer that writes a file by name itself (an FFmpeg muxer):
/// it writes the temp name, which is then synced and renamed into place; on failure the temp
/// file is removed and the old `path`, if any, is left as it was.
pub fn write_atomic_with<E>(
    path: &std::path::Path,
    write: impl FnOnce(&std::path::Path) -> std::result::Result<(), E>,
) -> Result<()>
where
    E: std::error::Error + Send + Sync + 'static,
{
    let tmp = tmp_path(path);
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::Write {
            path: path.to_path_buf(),
            source: Box::new(e),
        });
    }
    let synced = std::fs::File::open(&tmp).and_then(|f| f.sync_all());
    synced.map_err(|source| Error::Io {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    sync_parent(path)
}

/// Makes the entries of `dir` durable (a rename into it survives a power loss only once the
/// directory itself is synced).
pub fn sync_dir(dir: &std::path::Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })
}

/// [`sync_dir`] of the directory `path` was just renamed into.
pub fn sync_parent(path: &std::path::Path) -> Result<()> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => sync_dir(p),
        _ => sync_dir(std::path::Path::new(".")),
    }
}

/// The temp name used while `path` is being written: `name.<host>-<pid>.tmp` in the same
/// directory (so the final rename never crosses file systems, and workers on several machines
/// sharing one dataset directory never write the same temp file). Stale ones are swept when a
/// build resumes, see [`DatasetLayout::sweep_temp_files`].
pub fn tmp_path(path: &std::path::Path) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}.tmp", writer_tag()));
    path.with_file_name(name)
}

/// `<host>-<pid>` of this process, as embedded in temp names.
pub fn writer_tag() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!(
        "{}-{}",
        if host.is_empty() { "host" } else { &host },
        std::process::id()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("the muxer gave up")]
    struct Refused;

    /// A writer that fails leaves the old file and no temp file; one that succeeds replaces it.
    #[test]
    fn write_atomic_with_commits_or_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.mp4");
        write_atomic(&path, b"old").unwrap();
        let err = write_atomic_with(&path, |tmp| {
            std::fs::write(tmp, b"half").unwrap();
            Err(Refused)
        })
        .unwrap_err();
        assert!(err.to_string().contains("the muxer gave up"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(left.len(), 1, "the temp file is removed");
        write_atomic_with(&path, |tmp| {
            std::fs::write(tmp, b"new").map_err(|_| Refused)
        })
        .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}

/// xxh3-64 over typed fields, each length-prefixed or tagged so that no two field lists hash
/// alike by concatenation: the content hashes of manifests (codec parts, token manifests).
#[derive(Default)]
pub struct FieldHash(xxhash_rust::xxh3::Xxh3);

impl FieldHash {
    pub fn text(&mut self, s: &str) {
        self.0.update(&(s.len() as u64).to_le_bytes());
        self.0.update(s.as_bytes());
    }

    pub fn number(&mut self, n: u64) {
        self.0.update(&n.to_le_bytes());
    }

    pub fn optional(&mut self, n: Option<u64>) {
        match n {
            Some(v) => {
                self.0.update(&[1]);
                self.number(v);
            }
            None => self.0.update(&[0]),
        }
    }

    pub fn digest(&self) -> u64 {
        self.0.digest()
    }
}
