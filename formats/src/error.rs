//! Typed errors for the on-disk formats: each names the file, what is wrong, and how to fix it.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file exists but breaks its format's contract (bad magic, wrong length, bad checksum).
    #[error("{path} is not a valid {what}: {problem}. Fix: {fix}")]
    Corrupt {
        path: PathBuf,
        what: &'static str,
        problem: String,
        fix: String,
    },
    /// A file in an older version of its format than this build reads.
    #[error("{path} is a version-{found} {what}; this build reads version {want}. Fix: {fix}")]
    OldVersion {
        path: PathBuf,
        what: &'static str,
        found: u32,
        want: u32,
        fix: String,
    },
    #[cfg(feature = "manifests")]
    #[error("Parquet error on {path}: {source}")]
    Parquet {
        path: PathBuf,
        #[source]
        source: polars::error::PolarsError,
    },
    /// A writer that writes files itself (a muxer) failed on the temp file of `path`.
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The caller asked for something the data cannot give (unknown id, mismatched config, ...).
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }

    #[cfg(feature = "manifests")]
    pub(crate) fn parquet(
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(polars::error::PolarsError) -> Error {
        let path = path.into();
        move |source| Error::Parquet { path, source }
    }
}
