//! A dataset in object storage (`--out s3://bucket/ds`), built through a local stage.
//!
//! Object stores have no rename, so the local commit protocol (temp file, rename, the part
//! manifest last) becomes: a part is built in the stage exactly as a local build builds it,
//! then its shards are uploaded, then its manifest: the manifest object is the commit, and a
//! part without one is built again (its shards overwritten with the same bytes). Every PUT makes
//! an object appear whole or not at all. The bucket is the truth: opening a mirror brings the
//! stage's `dataset.json`, tables and plan up to date with it, and forgets any part the stage
//! finished but the bucket has no manifest of. The stage keeps manifests (small) and frees each
//! part's shards once they are uploaded, so it holds about one part per writer.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use codeclm_formats::DatasetLayout;

use crate::builder::BuildError;
use crate::objects::{self, ObjectError, Remote};

/// The top-level files a build reads before it starts (the rest is per part).
const TOP: &[&str] = &[
    "dataset.json",
    "jpeg_tables.jpg",
    "plan.json",
    "plan.parquet",
];

/// A dataset at a URL and its local stage.
#[derive(Debug)]
pub struct Mirror {
    remote: Remote,
    layout: DatasetLayout,
    /// The stage's lock (`.lock`, flock'ed while this mirror lives): one process per stage, so
    /// one never forgets a part another has finished and not yet uploaded.
    _lock: std::fs::File,
}

/// Locks `dir/.lock` (created) for this process; `None` when another process holds it.
fn lock_stage(dir: &Path) -> Result<Option<std::fs::File>, BuildError> {
    use std::os::unix::io::AsRawFd;
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let path = dir.join(".lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io(&path))?;
    // SAFETY: flock on a descriptor this function owns; no memory is shared.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(Some(f));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(None)
    } else {
        Err(io(&path)(e))
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BuildError + '_ {
    move |source| {
        BuildError::Format(codeclm_formats::Error::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// `parts/part-NNNNNN.parquet` -> NNNNNN.
fn part_of(rel: &str) -> Option<u32> {
    rel.strip_prefix("parts/part-")?
        .strip_suffix(".parquet")?
        .parse()
        .ok()
}

impl Mirror {
    /// The dataset at `url`, staged in `stage` (default: `$TMPDIR/codeclm-stage/<hash of the
    /// URL>`, so reruns on one machine share it), with the stage's top-level files pulled.
    pub fn open(url: &str, stage: Option<PathBuf>) -> Result<Mirror, BuildError> {
        let url = url.trim_end_matches('/');
        let remote = objects::locate(url)?;
        let (stage, lock) = match stage {
            Some(dir) => match lock_stage(&dir)? {
                Some(lock) => (dir, lock),
                None => {
                    return Err(BuildError::Config(format!(
                        "the stage {} is in use by another process. Fix: give this one its own --stage DIR",
                        dir.display()
                    )))
                }
            },
            // The default stage of this URL, or the next free one when another process on this
            // machine builds the same URL.
            None => {
                let base = std::env::temp_dir().join("codeclm-stage").join(format!(
                    "{:016x}",
                    xxhash_rust::xxh3::xxh3_64(url.as_bytes())
                ));
                let mut found = None;
                for i in 0..64 {
                    let dir = if i == 0 {
                        base.clone()
                    } else {
                        base.with_extension(i.to_string())
                    };
                    if let Some(lock) = lock_stage(&dir)? {
                        found = Some((dir, lock));
                        break;
                    }
                }
                found.ok_or_else(|| {
                    BuildError::Config(format!(
                        "64 processes on this machine already stage {url} under {}. Fix: give this one its own --stage DIR",
                        base.display()
                    ))
                })?
            }
        };
        let mirror = Mirror {
            remote,
            layout: DatasetLayout::new(stage),
            _lock: lock,
        };
        mirror.layout.create_dirs()?;
        mirror.pull_top()?;
        Ok(mirror)
    }

    pub fn url(&self) -> &str {
        self.remote.url()
    }

    /// The local stage: a dataset directory the builder writes as it writes any other.
    pub fn stage(&self) -> &Path {
        &self.layout.root
    }

    /// The stage's `dataset.json`, tables and plan, as the bucket has them (absent there:
    /// removed here).
    fn pull_top(&self) -> Result<(), BuildError> {
        for name in TOP {
            let local = self.layout.root.join(name);
            match self.remote.get(name) {
                Ok(bytes) => codeclm_formats::write_atomic(&local, &bytes)?,
                Err(ObjectError::NotFound { .. }) => match std::fs::remove_file(&local) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(io(&local)(e))
                    }
                    _ => {}
                },
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Parts whose manifest is in the bucket, sorted.
    pub fn finished(&self) -> Result<Vec<u32>, BuildError> {
        let mut parts = BTreeSet::new();
        for listed in self.remote.join("parts").list() {
            let listed = listed?;
            if let Some(p) = part_of(&format!("parts/{}", listed.rel)) {
                parts.insert(p);
            }
        }
        Ok(parts.into_iter().collect())
    }

    /// The finished parts, after forgetting those the stage finished and the bucket did not
    /// receive (a run killed between the two): they are built again.
    pub fn sync_parts(&self) -> Result<Vec<u32>, BuildError> {
        let finished = self.finished()?;
        for p in self.layout.finished_parts()? {
            if finished.binary_search(&p).is_err() {
                let manifest = self.layout.part_manifest(p);
                std::fs::remove_file(&manifest).map_err(io(&manifest))?;
                tracing::info!(
                    "part {p} was finished here but never reached {}: building it again",
                    self.url()
                );
            }
        }
        Ok(finished)
    }

    /// Uploads a stage file (a path relative to the dataset root) as the same key.
    pub fn push(&self, rel: &str) -> Result<(), BuildError> {
        Ok(self.remote.put_file(rel, &self.layout.root.join(rel))?)
    }

    /// Uploads the stage's file `rel` unless the bucket has that key already.
    pub fn push_if_absent(&self, rel: &str) -> Result<(), BuildError> {
        if self.remote.head(rel)?.is_none() {
            self.push(rel)?;
        }
        Ok(())
    }

    /// A path of the stage as the object name it has under the dataset's URL.
    fn rel(&self, path: &Path) -> String {
        path.strip_prefix(&self.layout.root)
            .unwrap_or(path)
            .to_string_lossy()
            .replace('\\', "/")
    }

    /// Commits a part the stage finished: its shards, then its manifest, then the stage's
    /// copies of the shards are freed.
    pub fn push_part(&self, part: u32) -> Result<(), BuildError> {
        let shards = self.layout.shards_of_part(part)?;
        for s in &shards {
            self.push(&self.rel(s))?;
        }
        // Test failpoint: die as a killed worker would, the shards uploaded, not the manifest.
        fail::fail_point!("etl::kill-before-remote-manifest", |_| {
            std::process::abort()
        });
        self.push(&self.rel(&self.layout.part_manifest(part)))?;
        for s in &shards {
            std::fs::remove_file(s).map_err(io(s))?;
        }
        Ok(())
    }

    /// When every part of `parts_total` has its manifest in the bucket: fetches the manifests
    /// the stage lacks, writes `samples.parquet` and uploads it. Whether the dataset is complete.
    pub fn complete(&self, parts_total: u32) -> Result<bool, BuildError> {
        let finished = self.finished()?;
        if finished.len() as u32 != parts_total
            || !finished.iter().enumerate().all(|(i, &p)| p == i as u32)
        {
            return Ok(false);
        }
        for &p in &finished {
            let local = self.layout.part_manifest(p);
            if !local.exists() {
                let bytes = self.remote.get(&self.rel(&local))?;
                codeclm_formats::write_atomic(&local, &bytes)?;
            }
        }
        self.layout.consolidate()?;
        self.push(&self.rel(&self.layout.samples_path()))?;
        Ok(true)
    }
}

/// Copies every object of the dataset at `url` into `dir` (for the commands that read a local
/// dataset), each written atomically; returns (files, bytes) fetched. A shard already there with
/// the same size is kept (a shard's name fixes its bytes), so a second pull fetches the new
/// shards and every smaller file again.
pub fn pull(url: &str, dir: &Path) -> Result<(u64, u64), BuildError> {
    let remote = objects::locate(url.trim_end_matches('/'))?;
    let (mut files, mut bytes) = (0u64, 0u64);
    for listed in remote.list() {
        let listed = listed?;
        let to = dir.join(&listed.rel);
        if listed.rel.starts_with("shards/")
            && std::fs::metadata(&to).is_ok_and(|m| m.len() == listed.size)
        {
            continue;
        }
        let parent = to.parent().unwrap_or(dir);
        std::fs::create_dir_all(parent).map_err(io(parent))?;
        let mut tmp = tempfile::NamedTempFile::new_in(parent).map_err(io(parent))?;
        let mut reader = remote.reader(&listed.rel)?;
        std::io::copy(&mut reader, tmp.as_file_mut()).map_err(io(&to))?;
        tmp.as_file().sync_all().map_err(io(&to))?;
        tmp.persist(&to).map_err(|e| io(&to)(e.error))?;
        codeclm_formats::sync_dir(parent)?;
        files += 1;
        bytes += listed.size;
    }
    if !DatasetLayout::new(dir).config_path().exists() {
        return Err(BuildError::Config(format!(
            "{url} holds no dataset (no dataset.json). Fix: check the URL, and that the credentials may list it"
        )));
    }
    Ok((files, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_takes_one_process() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock_stage(dir.path()).unwrap();
        assert!(first.is_some());
        // flock is per open file description: a second open in this process contends too.
        assert!(lock_stage(dir.path()).unwrap().is_none());
        drop(first);
        assert!(lock_stage(dir.path()).unwrap().is_some());
    }

    #[test]
    fn part_manifest_keys_parse() {
        assert_eq!(part_of("parts/part-000012.parquet"), Some(12));
        assert_eq!(part_of("parts/part-000012.lease"), None);
        assert_eq!(part_of("parts/part-x.parquet"), None);
        assert_eq!(part_of("shards/part-000001-jpeg-000.shard"), None);
    }
}
