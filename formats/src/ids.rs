//! The sample-id index, `samples.ids` beside the manifest: the (xxh3-64 of the sample id,
//! global row) pair of every row, sorted, so a sample is found by binary search (about 25 reads
//! of 16 bytes at 25M rows) and one slice read, not a scan. It is a cache: built on the first
//! lookup, it records the identity of the manifests it indexes (their names and footers) and is
//! rebuilt when they differ; a dataset directory that cannot be written keeps it in memory.
//!
//! Layout (little-endian): `CLMIDIDX`, version u32, 0 u32, manifest identity u64, row count
//! u64, then row count x (key u64, row u64) in (key, row) order.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::ControlFlow;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::rows::Manifests;

const MAGIC: &[u8; 8] = b"CLMIDIDX";
const VERSION: u32 = 1;
const HEADER: u64 = 32;
const ENTRY: u64 = 16;

/// The key a sample id is indexed by.
pub(crate) fn key(id: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(id.as_bytes())
}

pub(crate) enum IdIndex {
    File { file: File, count: u64 },
    Memory(Vec<(u64, u64)>),
}

impl IdIndex {
    /// The index of `manifests` at `path`: the file when it indexes them, else built (one pass
    /// over the `sample_id` column; 16 bytes a row in memory while it is sorted) and written.
    pub(crate) fn open_or_build(path: &Path, manifests: &Manifests) -> Result<IdIndex> {
        if let Some(ix) = Self::open(path, manifests) {
            return Ok(ix);
        }
        let mut entries: Vec<(u64, u64)> = Vec::with_capacity(manifests.len() as usize);
        manifests.scan(Some(&["sample_id"]), |df, first, path| {
            let ids = df
                .column("sample_id")
                .and_then(|c| c.str().cloned())
                .map_err(crate::rows::corrupt(path))?;
            for (i, id) in ids.iter().enumerate() {
                entries.push((key(id.unwrap_or_default()), first + i as u64));
            }
            Ok::<_, Error>(ControlFlow::Continue(()))
        })?;
        entries.sort_unstable();
        match write(path, manifests.identity(), &entries) {
            Ok(()) => {
                if let Some(ix) = Self::open(path, manifests) {
                    return Ok(ix);
                }
            }
            Err(e) => tracing::warn!(
                "the sample-id index could not be written ({e}); it is kept in memory for this run"
            ),
        }
        Ok(IdIndex::Memory(entries))
    }

    /// The index file when it is whole and indexes `manifests` now; `None` otherwise.
    fn open(path: &Path, manifests: &Manifests) -> Option<IdIndex> {
        let file = File::open(path).ok()?;
        let len = file.metadata().ok()?.len();
        let mut header = [0u8; HEADER as usize];
        file.read_exact_at(&mut header, 0).ok()?;
        let u64_at =
            |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().unwrap_or([0; 8]));
        let version = u32::from_le_bytes(header[8..12].try_into().unwrap_or([0; 4]));
        let (identity, count) = (u64_at(16), u64_at(24));
        let whole = &header[..8] == MAGIC
            && version == VERSION
            && identity == manifests.identity()
            && count == manifests.len()
            && Some(len) == count.checked_mul(ENTRY).and_then(|n| n.checked_add(HEADER));
        whole.then_some(IdIndex::File { file, count })
    }

    fn count(&self) -> u64 {
        match self {
            IdIndex::File { count, .. } => *count,
            IdIndex::Memory(v) => v.len() as u64,
        }
    }

    fn entry(&self, i: u64) -> Result<(u64, u64)> {
        match self {
            IdIndex::Memory(v) => Ok(v[i as usize]),
            IdIndex::File { file, .. } => {
                let mut b = [0u8; ENTRY as usize];
                file.read_exact_at(&mut b, HEADER + i * ENTRY)
                    .map_err(|e| Error::Invalid(format!("reading the sample-id index: {e}")))?;
                let (k, r) = b.split_at(8);
                Ok((
                    u64::from_le_bytes(k.try_into().unwrap_or([0; 8])),
                    u64::from_le_bytes(r.try_into().unwrap_or([0; 8])),
                ))
            }
        }
    }

    /// Rows whose id has the key of `id` (usually one; the caller checks the id itself).
    pub(crate) fn candidates(&self, id: &str) -> Result<Vec<u64>> {
        let k = key(id);
        let (mut lo, mut hi) = (0u64, self.count());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.entry(mid)?.0 < k {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let mut rows = Vec::new();
        while lo < self.count() {
            let (key, row) = self.entry(lo)?;
            if key != k {
                break;
            }
            rows.push(row);
            lo += 1;
        }
        Ok(rows)
    }
}

/// Writes the index atomically (temp file, fsync, rename, directory fsync); a failed write
/// leaves no temp file.
fn write(path: &Path, identity: u64, entries: &[(u64, u64)]) -> Result<()> {
    let tmp = crate::tmp_path(path);
    let written = write_to(&tmp, path, identity, entries);
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

fn write_to(tmp: &Path, path: &Path, identity: u64, entries: &[(u64, u64)]) -> Result<()> {
    let io = |source| Error::Io {
        path: tmp.to_path_buf(),
        source,
    };
    let file = File::create(tmp).map_err(io)?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut header = Vec::with_capacity(HEADER as usize);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&VERSION.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    header.extend_from_slice(&identity.to_le_bytes());
    header.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    w.write_all(&header).map_err(io)?;
    for &(k, r) in entries {
        w.write_all(&k.to_le_bytes()).map_err(io)?;
        w.write_all(&r.to_le_bytes()).map_err(io)?;
    }
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(tmp, path).map_err(Error::io(path))?;
    crate::sync_parent(path)
}
