//! Part leases: which worker builds a part right now, so that two live workers never build the
//! same part (a requeued Slurm task while the old one still runs, two machines given the same
//! shard index).
//!
//! A lease is `parts/part-NNNNNN.lease`, JSON: the owner (host, pid and a per-process nonce),
//! when it was taken, its last heartbeat and when it expires. It is taken with an exclusive
//! create, renewed by a heartbeat (every quarter of its time to live), checked again right before
//! the part's manifest is written, and removed after. A lease is stale once it has expired, or at
//! once when its owner ran on this host and that process is gone; a stale lease is taken over by
//! moving it aside first, so of two workers taking over the same lease one wins.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::dataset::DatasetLayout;
use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// `host-pid-nonce`: unique per process run.
    pub owner: String,
    pub host: String,
    pub pid: u32,
    pub acquired_unix: u64,
    pub heartbeat_unix: u64,
    pub expires_unix: u64,
}

impl Lease {
    /// Expired, or its owner ran on this host and is gone (or is another process now holding
    /// the same pid).
    pub fn is_stale(&self, now: u64) -> bool {
        if now >= self.expires_unix {
            return true;
        }
        if self.host == host() {
            let alive = std::path::Path::new(&format!("/proc/{}", self.pid)).exists();
            let reused = self.pid == std::process::id() && self.owner != *OWNER;
            return !alive || reused;
        }
        false
    }

    pub fn describe(&self) -> String {
        format!(
            "{} pid {} (heartbeat {} s ago, expires in {} s)",
            self.host,
            self.pid,
            unix_now().saturating_sub(self.heartbeat_unix),
            self.expires_unix.saturating_sub(unix_now())
        )
    }
}

/// What taking a part's lease gave.
#[derive(Debug)]
pub enum Acquired {
    Ours,
    /// A live worker holds it.
    HeldBy(Lease),
}

fn host() -> String {
    let tag = crate::writer_tag();
    tag[..tag.rfind('-').unwrap_or(tag.len())].to_string()
}

static OWNER: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let nonce = crate::shard::checksum(
        format!("{:?}{:?}", SystemTime::now(), std::thread::current().id()).as_bytes(),
    );
    format!("{}-{:08x}", crate::writer_tag(), nonce as u32)
});

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// The leases this process holds in one dataset.
pub struct Leases {
    layout: DatasetLayout,
    ttl: Duration,
    held: Mutex<BTreeSet<u32>>,
}

impl Leases {
    pub fn new(layout: DatasetLayout, ttl: Duration) -> Leases {
        Leases {
            layout,
            ttl: ttl.max(Duration::from_secs(4)),
            held: Mutex::new(BTreeSet::new()),
        }
    }

    /// How often [`Leases::renew_all`] should run.
    pub fn heartbeat_interval(&self) -> Duration {
        self.ttl / 4
    }

    fn path(&self, part: u32) -> PathBuf {
        self.layout
            .parts_dir()
            .join(format!("part-{part:06}.lease"))
    }

    fn fresh(&self, acquired_unix: u64) -> Lease {
        let now = unix_now();
        Lease {
            owner: OWNER.clone(),
            host: host(),
            pid: std::process::id(),
            acquired_unix,
            heartbeat_unix: now,
            expires_unix: now + self.ttl.as_secs(),
        }
    }

    /// The lease in the file, `None` if there is none. An unreadable lease (a writer died
    /// mid-write: leases are written in place only by exclusive create) counts as stale.
    pub fn read(&self, part: u32) -> Result<Option<Lease>> {
        let path = self.path(part);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).unwrap_or(Lease {
                owner: String::new(),
                host: String::new(),
                pid: 0,
                acquired_unix: 0,
                heartbeat_unix: 0,
                expires_unix: 0,
            }))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::Io { path, source: e }),
        }
    }

    fn create(&self, part: u32) -> Result<bool> {
        let path = self.path(part);
        let lease = self.fresh(unix_now());
        let mut f = match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(Error::Io { path, source: e }),
        };
        let json = serde_json::to_vec(&lease).expect("a lease serializes");
        f.write_all(&json)
            .and_then(|_| f.sync_all())
            .map_err(Error::io(&path))?;
        crate::sync_dir(&self.layout.parts_dir())?;
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(part);
        Ok(true)
    }

    /// Takes the part's lease unless a live worker holds it.
    pub fn try_acquire(&self, part: u32) -> Result<Acquired> {
        for _ in 0..3 {
            if self.create(part)? {
                return Ok(Acquired::Ours);
            }
            let Some(current) = self.read(part)? else {
                continue; // released meanwhile
            };
            if current.owner == *OWNER {
                self.held
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(part);
                return Ok(Acquired::Ours);
            }
            if !current.is_stale(unix_now()) {
                return Ok(Acquired::HeldBy(current));
            }
            // Move the stale lease aside; of several workers doing so, one moves it and the
            // others find the file gone (or a fresh lease, which they then respect).
            let aside = self
                .layout
                .parts_dir()
                .join(format!("part-{part:06}.lease.{}.stale", *OWNER));
            match std::fs::rename(self.path(part), &aside) {
                Ok(()) => {
                    let moved = std::fs::read(&aside).ok();
                    let _ = std::fs::remove_file(&aside);
                    let moved: Option<Lease> = moved.and_then(|b| serde_json::from_slice(&b).ok());
                    if let Some(m) = moved.filter(|m| !m.is_stale(unix_now())) {
                        // We moved a lease taken over an instant ago by someone else: put it back.
                        let json = serde_json::to_vec(&m).expect("a lease serializes");
                        crate::write_atomic(&self.path(part), &json)?;
                        return Ok(Acquired::HeldBy(m));
                    }
                    tracing::info!(
                        "part {part}: taking over the stale lease of {}",
                        current.describe()
                    );
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Error::Io {
                        path: self.path(part),
                        source: e,
                    })
                }
            }
        }
        match self.read(part)? {
            Some(l) => Ok(Acquired::HeldBy(l)),
            None => Err(Error::Invalid(format!(
                "part {part}: could not take its lease in {} (workers racing); rerun",
                self.layout.parts_dir().display()
            ))),
        }
    }

    /// Renews the part's lease: an error if it is no longer ours (it expired and another worker
    /// took the part over).
    pub fn confirm(&self, part: u32) -> Result<()> {
        let current = self.read(part)?;
        match current {
            Some(l) if l.owner == *OWNER => {
                let renewed = self.fresh(l.acquired_unix);
                let json = serde_json::to_vec(&renewed).expect("a lease serializes");
                crate::write_atomic(&self.path(part), &json)
            }
            other => {
                self.held
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&part);
                Err(Error::Invalid(format!(
                    "part {part}: its lease was taken over by {} while this worker built it (this worker stalled past --lease-seconds?); the other worker finishes the part",
                    other.map(|l| l.describe()).unwrap_or_else(|| "nobody (the lease file is gone)".into())
                )))
            }
        }
    }

    fn held(&self) -> Vec<u32> {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.iter().copied().collect()
    }

    /// The heartbeat: renews every lease held; a lease lost is logged and dropped.
    pub fn renew_all(&self) {
        for part in self.held() {
            if let Err(e) = self.confirm(part) {
                tracing::warn!("{e}");
            }
        }
    }

    /// Removes the part's lease if it is ours.
    pub fn release(&self, part: u32) -> Result<()> {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&part);
        if let Some(l) = self.read(part)? {
            if l.owner == *OWNER {
                let path = self.path(part);
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::Io { path, source: e }),
                }
            }
        }
        Ok(())
    }

    /// Releases every lease held (a build that stops early).
    pub fn release_all(&self) {
        for part in self.held() {
            let _ = self.release(part);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_lease_is_respected_and_a_stale_one_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let layout = DatasetLayout::new(dir.path());
        layout.create_dirs().unwrap();
        let ours = Leases::new(layout.clone(), Duration::from_secs(60));
        assert!(matches!(ours.try_acquire(3).unwrap(), Acquired::Ours));
        // Re-entrant for the same process.
        assert!(matches!(ours.try_acquire(3).unwrap(), Acquired::Ours));
        ours.confirm(3).unwrap();

        // Another machine's live lease on part 4: skipped; once expired, taken over.
        let mut theirs = ours.fresh(unix_now());
        theirs.owner = "elsewhere-1-0".into();
        theirs.host = "elsewhere".into();
        theirs.pid = 1;
        let path = ours.path(4);
        std::fs::write(&path, serde_json::to_vec(&theirs).unwrap()).unwrap();
        match ours.try_acquire(4).unwrap() {
            Acquired::HeldBy(l) => assert_eq!(l.host, "elsewhere"),
            Acquired::Ours => panic!("took a live lease"),
        }
        theirs.expires_unix = unix_now() - 1;
        std::fs::write(&path, serde_json::to_vec(&theirs).unwrap()).unwrap();
        assert!(matches!(ours.try_acquire(4).unwrap(), Acquired::Ours));
        assert_eq!(ours.read(4).unwrap().unwrap().owner, *OWNER);

        // A lease of a dead process on this host is stale at once, expiry or not.
        let mut dead = ours.fresh(unix_now());
        dead.owner = "dead".into();
        dead.pid = u32::MAX - 7;
        std::fs::write(ours.path(5), serde_json::to_vec(&dead).unwrap()).unwrap();
        assert!(matches!(ours.try_acquire(5).unwrap(), Acquired::Ours));

        // Losing a lease is an error at confirm time, and release leaves others' leases alone.
        std::fs::write(&path, serde_json::to_vec(&theirs).unwrap()).unwrap();
        theirs.expires_unix = unix_now() + 60;
        std::fs::write(&path, serde_json::to_vec(&theirs).unwrap()).unwrap();
        let err = ours.confirm(4).unwrap_err().to_string();
        assert!(err.contains("taken over by elsewhere"), "{err}");
        ours.release(4).unwrap();
        assert!(path.exists());
        ours.release(3).unwrap();
        assert!(!ours.path(3).exists());
    }
}
