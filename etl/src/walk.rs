//! A directory tree walked in sorted order in bounded memory: the order of walkdir's
//! `sort_by_file_name` (each directory's entries by name, byte order; a subdirectory entered at
//! its place, depth first), without holding a directory's entries. Each directory is read in
//! chunks of [`CHUNK`] names; a directory larger than one chunk has each chunk sorted and
//! spilled to an anonymous temp file, and the runs are merged. A flat directory of 23M files
//! costs one chunk of names in memory, not 23M.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::ffi::OsString;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, Write};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Names of one directory held in memory at a time (about 16 MB of typical names).
pub const CHUNK: usize = 1 << 18;

/// What a walk yields: a file to read, or a path that could not be walked (an unreadable
/// directory, a symlink loop), which a build records as an input that failed to read.
#[derive(Debug, PartialEq, Eq)]
pub enum Walked {
    File(PathBuf),
    Unwalkable(PathBuf, String),
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    File = 0,
    Dir = 1,
}

/// One directory's entries in name order.
enum Names {
    Memory(std::vec::IntoIter<(Vec<u8>, Kind)>),
    Runs {
        runs: Vec<BufReader<File>>,
        heap: BinaryHeap<Reverse<(Vec<u8>, usize, Kind)>>,
    },
}

fn read_record(r: &mut BufReader<File>) -> std::io::Result<Option<(Vec<u8>, Kind)>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut name = vec![0u8; len];
    r.read_exact(&mut name)?;
    Ok(Some((
        name,
        if head[0] == 1 { Kind::Dir } else { Kind::File },
    )))
}

impl Names {
    fn next(&mut self) -> std::io::Result<Option<(Vec<u8>, Kind)>> {
        match self {
            Names::Memory(it) => Ok(it.next()),
            Names::Runs { runs, heap } => {
                let Some(Reverse((name, run, kind))) = heap.pop() else {
                    return Ok(None);
                };
                if let Some((n, k)) = read_record(&mut runs[run])? {
                    heap.push(Reverse((n, run, k)));
                }
                Ok(Some((name, kind)))
            }
        }
    }
}

/// A directory being walked: its path, identity (loop detection) and remaining names.
struct Open {
    dir: PathBuf,
    id: (u64, u64),
    names: Names,
}

pub struct SortedWalk {
    stack: Vec<Open>,
    chunk: usize,
    /// The root, yielded first when it cannot be read.
    pending: Option<Walked>,
}

impl SortedWalk {
    /// Walks `root` (symlinks followed, as the directory source always has).
    pub fn new(root: &Path) -> SortedWalk {
        SortedWalk::with_chunk(root, CHUNK)
    }

    /// With `chunk` names per in-memory run (tests use small ones to exercise the merge).
    pub fn with_chunk(root: &Path, chunk: usize) -> SortedWalk {
        let mut walk = SortedWalk {
            stack: Vec::new(),
            chunk: chunk.max(1),
            pending: None,
        };
        if let Err(e) = walk.enter(root) {
            walk.pending = Some(Walked::Unwalkable(root.to_path_buf(), e));
        }
        walk
    }

    /// Reads `dir`'s names (sorted, spilled past one chunk) onto the stack.
    fn enter(&mut self, dir: &Path) -> Result<(), String> {
        let meta = std::fs::metadata(dir).map_err(|e| e.to_string())?;
        let id = (meta.dev(), meta.ino());
        if self.stack.iter().any(|o| o.id == id) {
            return Err("a symlink loop (a directory that contains itself)".into());
        }
        let entries = std::fs::read_dir(dir).map_err(|e| e.to_string())?;
        let mut chunk: Vec<(Vec<u8>, Kind)> = Vec::new();
        let mut runs: Vec<File> = Vec::new();
        let spill = |chunk: &mut Vec<(Vec<u8>, Kind)>,
                     runs: &mut Vec<File>|
         -> Result<(), String> {
            chunk.sort_unstable();
            let file = tempfile::tempfile().map_err(|e| format!("a temp file for sorting: {e}"))?;
            let mut w = BufWriter::new(file);
            for (name, kind) in chunk.drain(..) {
                w.write_all(&[kind as u8])
                    .and_then(|_| w.write_all(&(name.len() as u32).to_le_bytes()))
                    .and_then(|_| w.write_all(&name))
                    .map_err(|e| format!("spilling names: {e}"))?;
            }
            let mut file = w.into_inner().map_err(|e| format!("spilling names: {e}"))?;
            file.rewind().map_err(|e| format!("spilling names: {e}"))?;
            runs.push(file);
            Ok(())
        };
        for entry in entries {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!("{}: {e}", dir.display());
                    continue;
                }
            };
            let name = entry.file_name();
            let kind = match entry.file_type() {
                Ok(t) if t.is_dir() => Kind::Dir,
                // A symlink is followed: to a directory it is walked, to a file (or nothing) it
                // is an input.
                Ok(t) if t.is_symlink() => match std::fs::metadata(entry.path()) {
                    Ok(m) if m.is_dir() => Kind::Dir,
                    _ => Kind::File,
                },
                _ => Kind::File,
            };
            chunk.push((name.into_vec(), kind));
            if chunk.len() >= self.chunk {
                spill(&mut chunk, &mut runs)?;
            }
        }
        let names = if runs.is_empty() {
            chunk.sort_unstable();
            Names::Memory(chunk.into_iter())
        } else {
            if !chunk.is_empty() {
                spill(&mut chunk, &mut runs)?;
            }
            let mut runs: Vec<BufReader<File>> = runs.into_iter().map(BufReader::new).collect();
            let mut heap = BinaryHeap::new();
            for (i, r) in runs.iter_mut().enumerate() {
                if let Some((n, k)) = read_record(r).map_err(|e| format!("merging names: {e}"))? {
                    heap.push(Reverse((n, i, k)));
                }
            }
            Names::Runs { runs, heap }
        };
        self.stack.push(Open {
            dir: dir.to_path_buf(),
            id,
            names,
        });
        Ok(())
    }
}

impl Iterator for SortedWalk {
    type Item = Walked;

    fn next(&mut self) -> Option<Walked> {
        if let Some(p) = self.pending.take() {
            return Some(p);
        }
        loop {
            let top = self.stack.last_mut()?;
            let next = match top.names.next() {
                Ok(n) => n,
                Err(e) => {
                    let dir = top.dir.clone();
                    self.stack.pop();
                    return Some(Walked::Unwalkable(
                        dir,
                        format!("reading its sorted names: {e}"),
                    ));
                }
            };
            let Some((name, kind)) = next else {
                self.stack.pop();
                continue;
            };
            let path = top.dir.join(OsString::from_vec(name));
            match kind {
                Kind::File => return Some(Walked::File(path)),
                Kind::Dir => {
                    if let Err(e) = self.enter(&path) {
                        return Some(Walked::Unwalkable(path, e));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The walk's order equals walkdir's `sort_by_file_name` order on a tree with nested and
    /// empty directories, odd names and a directory symlink, whether names are held in memory
    /// or spilled and merged (chunks of 3).
    #[test]
    fn sorted_walk_equals_walkdir_in_memory_and_spilled() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for f in [
            "b.jpg",
            "a.png",
            "Z.jpg",
            "_x",
            "z/1",
            "z/0",
            "sub/deep/q",
            "sub/a",
            "é.jpg",
            "sub/deep/p",
            "m10",
            "m2",
            "m1",
        ] {
            let p = root.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, f).unwrap();
        }
        std::fs::create_dir_all(root.join("empty")).unwrap();
        std::os::unix::fs::symlink(root.join("z"), root.join("link")).unwrap();
        let want: Vec<PathBuf> = walkdir::WalkDir::new(root)
            .follow_links(true)
            .sort_by_file_name()
            .into_iter()
            .flatten()
            .filter(|e| e.file_type().is_file())
            .map(|e| e.into_path())
            .collect();
        assert!(want.len() > 10);
        for chunk in [3, CHUNK] {
            let got: Vec<PathBuf> = SortedWalk::with_chunk(root, chunk)
                .map(|w| match w {
                    Walked::File(p) => p,
                    other => panic!("{other:?}"),
                })
                .collect();
            assert_eq!(got, want, "chunk {chunk}");
        }
    }

    /// A symlink loop and an unreadable root are yielded as unwalkable paths, and the walk
    /// goes on.
    #[test]
    fn loops_and_unreadable_directories_are_yielded_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::write(root.join("d/f"), b"x").unwrap();
        std::os::unix::fs::symlink(root.join("d"), root.join("d/loop")).unwrap();
        let got: Vec<Walked> = SortedWalk::new(root).collect();
        assert_eq!(got[0], Walked::File(root.join("d/f")));
        assert!(
            matches!(&got[1], Walked::Unwalkable(p, e) if p == &root.join("d/loop") && e.contains("loop"))
        );
        let missing: Vec<Walked> = SortedWalk::new(&root.join("nope")).collect();
        assert!(matches!(&missing[..], [Walked::Unwalkable(..)]));
    }
}
