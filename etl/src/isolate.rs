//! Crash isolation: inputs are decoded and encoded in worker processes, so a native crash (a
//! segfault or abort inside libjpeg or FFmpeg) or a hang costs one row, not the build.
//!
//! - The builder keeps one worker process per worker thread (`codeclm decode-worker`, the same
//!   binary), started lazily and restarted after it dies. It sends the settings once, then one
//!   job at a time over the child's stdin, and reads the outcomes from its stdout.
//! - A child that dies mid-job gives that input a `crashed` row naming the signal; the next job
//!   gets a fresh child.
//! - A watchdog kills a child that is still on one job past the hard deadline (the item timeout
//!   plus a grace period: the decoders stop themselves at the item timeout, see
//!   `codeclm_codec::Limits`; the kill is the backstop for code that does not check the clock)
//!   and the input gets a `timeout` row.
//!
//! The wire format is private to one binary (parent and child are the same executable): frames
//! of `u32 json length, JSON, u64 bytes length, bytes`, little-endian.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use codeclm_formats::samples::Crop;
use codeclm_formats::Status;
use serde::{Deserialize, Serialize};

use crate::config::ImageConfig;
use crate::crop::RandomCrops;
use crate::process::Outcome;
use codeclm_codec::h264::VideoConfig;

/// How the builder runs the decoders.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Isolation {
    /// On the worker threads of this process: fastest to start, but a native crash in a decoder
    /// ends the build (library use and tests).
    Threads,
    /// In worker processes started as `exe args...` (the CLI: its own binary with the hidden
    /// `decode-worker` command, which calls [`serve`]).
    Processes { exe: PathBuf, args: Vec<OsString> },
}

/// What a worker process needs once: the settings every job shares.
#[derive(Serialize, Deserialize)]
struct Setup {
    image: ImageConfig,
    crops: Option<RandomCrops>,
    video: VideoConfig,
    /// The per-item deadline the decoders enforce themselves, in milliseconds.
    item_timeout_ms: Option<u64>,
}

/// One input: its bytes travel after the header, or the child opens `path` (a file source:
/// images are read there, videos demuxed from their file, never read whole).
#[derive(Serialize, Deserialize)]
pub(crate) struct JobHeader {
    pub identity: String,
    pub ext: Option<String>,
    pub video: bool,
    pub path: Option<PathBuf>,
    pub src_bytes: u64,
    /// `--max-input-bytes`: a file read from `path` stops there.
    pub max_bytes: u64,
}

/// [`Outcome`] on the wire (its codec bytes travel after the JSON, concatenated).
#[derive(Serialize, Deserialize)]
struct WireOutcome {
    status: Option<String>,
    error: Option<String>,
    src_format: Option<String>,
    src_width: Option<u32>,
    src_height: Option<u32>,
    src_bytes: u64,
    exif_orientation: Option<u32>,
    decode_scale: Option<u32>,
    width: Option<u32>,
    height: Option<u32>,
    crop: Option<[u32; 5]>,
    src_codec: Option<String>,
    src_duration: Option<f64>,
    src_fps: Option<f64>,
    frames: Option<u32>,
    nal_units: Option<u32>,
    codec_len: Option<u64>,
}

impl WireOutcome {
    fn of(o: &Outcome) -> WireOutcome {
        WireOutcome {
            status: o.status.map(|s| s.as_str().to_string()),
            error: o.error.clone(),
            src_format: o.src_format.map(str::to_string),
            src_width: o.src_width,
            src_height: o.src_height,
            src_bytes: o.src_bytes,
            exif_orientation: o.exif_orientation,
            decode_scale: o.decode_scale,
            width: o.width,
            height: o.height,
            crop: o.crop.map(|c| [c.index, c.x, c.y, c.w, c.h]),
            src_codec: o.src_codec.clone(),
            src_duration: o.src_duration,
            src_fps: o.src_fps,
            frames: o.frames,
            nal_units: o.nal_units,
            codec_len: o.codec.as_ref().map(|c| c.len() as u64),
        }
    }

    fn into_outcome(self, codec: Option<Vec<u8>>) -> Result<Outcome, String> {
        let status = match self.status {
            Some(s) => Some(Status::parse(&s).ok_or(format!("unknown status {s:?}"))?),
            None => None,
        };
        Ok(Outcome {
            status,
            error: self.error,
            src_format: self.src_format.map(|f| intern(&f)),
            src_width: self.src_width,
            src_height: self.src_height,
            src_bytes: self.src_bytes,
            exif_orientation: self.exif_orientation,
            decode_scale: self.decode_scale,
            width: self.width,
            height: self.height,
            crop: self
                .crop
                .map(|[index, x, y, w, h]| Crop { index, x, y, w, h }),
            src_codec: self.src_codec,
            src_duration: self.src_duration,
            src_fps: self.src_fps,
            frames: self.frames,
            nal_units: self.nal_units,
            codec,
        })
    }
}

/// Format names are a handful of constants in the child; the parent keeps one copy of each.
pub(crate) fn intern(name: &str) -> &'static str {
    static NAMES: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(n) = names.iter().find(|n| **n == name) {
        return n;
    }
    let leaked: &'static str = Box::leak(name.to_string().into_boxed_str());
    names.push(leaked);
    leaked
}

/// Frames larger than this are refused on read (a confused peer must not make us allocate
/// without bound): far above any input `--max-input-bytes` lets through.
const MAX_FRAME_BYTES: u64 = 1 << 40;

fn write_frame(w: &mut impl Write, json: &impl Serialize, bytes: &[&[u8]]) -> std::io::Result<()> {
    let json = serde_json::to_vec(json).map_err(std::io::Error::other)?;
    w.write_all(&(json.len() as u32).to_le_bytes())?;
    w.write_all(&json)?;
    let total: u64 = bytes.iter().map(|b| b.len() as u64).sum();
    w.write_all(&total.to_le_bytes())?;
    for b in bytes {
        w.write_all(b)?;
    }
    w.flush()
}

/// `Ok(None)` at a clean end of stream (before a frame starts).
fn read_frame<T: for<'de> Deserialize<'de>>(
    r: &mut impl Read,
) -> std::io::Result<Option<(T, Vec<u8>)>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut json = vec![0u8; u32::from_le_bytes(len) as usize];
    r.read_exact(&mut json)?;
    let value = serde_json::from_slice(&json).map_err(std::io::Error::other)?;
    let mut n = [0u8; 8];
    r.read_exact(&mut n)?;
    let n = u64::from_le_bytes(n);
    if n > MAX_FRAME_BYTES {
        return Err(std::io::Error::other(format!("a {n}-byte frame")));
    }
    let mut bytes = Vec::new();
    r.take(n).read_to_end(&mut bytes)?;
    if bytes.len() as u64 != n {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(Some((value, bytes)))
}

/// The child's side: reads the setup, then answers jobs until stdin closes. Returns the
/// process exit code.
pub fn serve() -> i32 {
    // Die with the builder: a decoder stuck in a loop must not outlive a killed build.
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes plain integers and affects this process only.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    if std::os::unix::process::parent_id() == 1 {
        return 0; // the builder died before we were set up
    }
    let mut input = BufReader::new(std::io::stdin().lock());
    let mut output = BufWriter::new(std::io::stdout().lock());
    let setup: Setup = match read_frame(&mut input) {
        Ok(Some((setup, _))) => setup,
        Ok(None) => return 0,
        Err(e) => {
            tracing::error!("decode worker: unreadable setup from the builder: {e}");
            return 2;
        }
    };
    loop {
        let (header, bytes): (JobHeader, Vec<u8>) = match read_frame(&mut input) {
            Ok(Some(job)) => job,
            Ok(None) => return 0,
            Err(e) => {
                tracing::error!("decode worker: unreadable job from the builder: {e}");
                return 2;
            }
        };
        let deadline = setup
            .item_timeout_ms
            .map(|ms| Instant::now() + Duration::from_millis(ms));
        let outcomes = crate::builder::process_item(
            &header,
            bytes,
            deadline,
            &setup.image,
            setup.crops.as_ref(),
            &setup.video,
        );
        let wire: Vec<WireOutcome> = outcomes.iter().map(WireOutcome::of).collect();
        let codecs: Vec<&[u8]> = outcomes.iter().filter_map(|o| o.codec.as_deref()).collect();
        if let Err(e) = write_frame(&mut output, &wire, &codecs) {
            tracing::error!("decode worker: cannot answer the builder: {e}");
            return 2;
        }
    }
}

/// Failpoints (the `fail` crate) armed from the `FAILPOINTS` environment variable, for tests
/// only: unset, every failpoint is a no-op. For example
/// `FAILPOINTS='etl::abort-on=return(bad.jpg)'` aborts the process on the input whose identity
/// ends with `bad.jpg` (see `builder::process_item`). The binary calls this once at start and
/// keeps the scenario for its whole life (worker processes inherit the variable).
pub fn arm_failpoints() -> Option<fail::FailScenario<'static>> {
    std::env::var_os("FAILPOINTS").map(|_| fail::FailScenario::setup())
}

struct Proc {
    child: Child,
    stdin: BufWriter<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

/// Kills children that overrun their hard deadline; remembers whom it killed.
struct Watchdog {
    /// pid -> (deadline, killed by us).
    watched: Mutex<HashMap<u32, (Instant, Arc<AtomicBool>)>>,
    wake: Condvar,
    stop: AtomicBool,
}

impl Watchdog {
    fn run(&self) {
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        while !self.stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            for (&pid, (deadline, killed)) in watched.iter() {
                if *deadline <= now && !killed.swap(true, Ordering::SeqCst) {
                    // SAFETY: kill(2) on a pid we started and have not reaped yet (the waiter
                    // unregisters it before calling wait).
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                }
            }
            let next = watched
                .values()
                .filter(|(_, k)| !k.load(Ordering::Relaxed))
                .map(|(d, _)| *d)
                .min();
            let wait = next
                .map(|d| d.saturating_duration_since(now))
                .unwrap_or(Duration::from_secs(1))
                .max(Duration::from_millis(5));
            watched = self
                .wake
                .wait_timeout(watched, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// The parent's side: a pool of worker processes, one job at a time each.
pub struct Pool {
    exe: PathBuf,
    args: Vec<OsString>,
    setup: Vec<u8>,
    idle: Mutex<Vec<Proc>>,
    item_timeout: Option<Duration>,
    watchdog: Arc<Watchdog>,
    watchdog_thread: Option<std::thread::JoinHandle<()>>,
}

/// How long past the item timeout a child may run before it is killed: the decoders' own
/// deadline checks answer first with a clean `timeout` row and their own message.
fn hard_deadline(timeout: Duration) -> Duration {
    timeout + (timeout / 10).max(Duration::from_secs(2))
}

impl Pool {
    pub fn new(
        exe: PathBuf,
        args: Vec<OsString>,
        image: &ImageConfig,
        crops: Option<&RandomCrops>,
        video: &VideoConfig,
        item_timeout: Option<Duration>,
    ) -> Result<Pool, String> {
        let mut setup = Vec::new();
        let s = Setup {
            image: *image,
            crops: crops.copied(),
            video: *video,
            item_timeout_ms: item_timeout.map(|t| t.as_millis() as u64),
        };
        write_frame(&mut setup, &s, &[]).map_err(|e| e.to_string())?;
        let watchdog = Arc::new(Watchdog {
            watched: Mutex::new(HashMap::new()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let thread = {
            let w = watchdog.clone();
            std::thread::Builder::new()
                .name("codeclm-watchdog".into())
                .spawn(move || w.run())
                .map_err(|e| format!("cannot start the watchdog thread: {e}"))?
        };
        let pool = Pool {
            exe,
            args,
            setup,
            idle: Mutex::new(Vec::new()),
            item_timeout,
            watchdog,
            watchdog_thread: Some(thread),
        };
        // One child now, so a binary that cannot start fails the build up front with its reason.
        let first = pool.spawn()?;
        pool.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(first);
        Ok(pool)
    }

    fn spawn(&self) -> Result<Proc, String> {
        let mut child = Command::new(&self.exe)
            .args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start the decode worker {}: {e} (or build with --isolation threads)",
                    self.exe.display()
                )
            })?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err("the decode worker has no pipes".into());
        };
        // 1 MiB pipes (Linux's default limit for unprivileged processes) instead of 64 KiB: an
        // input's bytes cross in a few writes, not dozens of context switches.
        use std::os::fd::AsRawFd;
        for fd in [stdin.as_raw_fd(), stdout.as_raw_fd()] {
            // SAFETY: fcntl on a pipe fd we own; failure leaves the default size.
            unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, 1 << 20) };
        }
        let mut proc = Proc {
            child,
            stdin: BufWriter::new(stdin),
            stdout: BufReader::new(stdout),
        };
        if let Err(e) = proc
            .stdin
            .write_all(&self.setup)
            .and_then(|_| proc.stdin.flush())
        {
            let _ = proc.child.kill();
            let _ = proc.child.wait();
            return Err(format!("the decode worker did not take its settings: {e}"));
        }
        Ok(proc)
    }

    /// Runs one input in a worker process. Never fails: a dead or overdue child is the input's
    /// `crashed` or `timeout` row.
    pub(crate) fn run(&self, header: &JobHeader, bytes: &[u8]) -> Vec<Outcome> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut proc = match idle.map(Ok).unwrap_or_else(|| self.spawn()) {
            Ok(p) => p,
            Err(e) => return vec![Outcome::failed(Status::Crashed, e, header.src_bytes)],
        };
        let pid = proc.child.id();
        let killed = Arc::new(AtomicBool::new(false));
        if let Some(t) = self.item_timeout {
            self.watchdog
                .watched
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(pid, (Instant::now() + hard_deadline(t), killed.clone()));
            self.watchdog.wake.notify_one();
        }
        let answer = write_frame(&mut proc.stdin, header, &[bytes])
            .and_then(|_| read_frame::<Vec<WireOutcome>>(&mut proc.stdout));
        self.watchdog
            .watched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pid);
        let outcomes = match answer {
            Ok(Some((wire, codecs))) => decode_outcomes(wire, codecs),
            Ok(None) => Err("the decode worker closed its output".to_string()),
            Err(e) => Err(e.to_string()),
        };
        match outcomes {
            Ok(o) => {
                if killed.load(Ordering::SeqCst) {
                    // Killed just after it answered: the answer stands, the child does not.
                    let _ = proc.child.wait();
                } else {
                    self.idle
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(proc);
                }
                o
            }
            Err(io) => vec![self.died(proc, &killed, &io, header.src_bytes)],
        }
    }

    /// The row of the input a child died on.
    fn died(&self, mut proc: Proc, killed: &AtomicBool, io: &str, src_bytes: u64) -> Outcome {
        let _ = proc.child.kill();
        let status = proc.child.wait();
        if killed.load(Ordering::SeqCst) {
            let t = self.item_timeout.unwrap_or_default();
            return Outcome::failed(
                Status::Timeout,
                format!(
                    "still decoding {:.1} s after the {:.1} s item timeout: the decoder was killed (raise --item-timeout for inputs this slow)",
                    hard_deadline(t).as_secs_f64() - t.as_secs_f64(),
                    t.as_secs_f64()
                ),
                src_bytes,
            );
        }
        use std::os::unix::process::ExitStatusExt;
        let why = match status {
            Ok(s) => match (s.signal(), s.code()) {
                (Some(sig), _) => format!("{} (signal {sig})", signal_name(sig)),
                (None, Some(code)) => format!("exit code {code}"),
                (None, None) => "an unknown cause".into(),
            },
            Err(e) => format!("an unknown cause (wait failed: {e})"),
        };
        tracing::warn!("a decode worker died on an input: {why}; starting a new one");
        Outcome::failed(
            Status::Crashed,
            format!(
                "the decoder crashed on this input with {why} ({io}); the build went on without it"
            ),
            src_bytes,
        )
    }
}

fn decode_outcomes(wire: Vec<WireOutcome>, codecs: Vec<u8>) -> Result<Vec<Outcome>, String> {
    let mut at = 0usize;
    let mut out = Vec::with_capacity(wire.len());
    for w in wire {
        let codec = match w.codec_len {
            Some(n) => {
                let end = at
                    .checked_add(n as usize)
                    .filter(|&e| e <= codecs.len())
                    .ok_or("the decode worker sent fewer codec bytes than it announced")?;
                let bytes = codecs[at..end].to_vec();
                at = end;
                Some(bytes)
            }
            None => None,
        };
        out.push(w.into_outcome(codec)?);
    }
    Ok(out)
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGILL => "SIGILL",
        libc::SIGKILL => "SIGKILL (the kernel's OOM killer, or another process)",
        libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for mut p in self
            .idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            drop(p.stdin); // EOF: the child exits
            let _ = p.child.wait();
        }
        self.watchdog.stop.store(true, Ordering::Relaxed);
        self.watchdog.wake.notify_one();
        if let Some(t) = self.watchdog_thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_refuse_lies() {
        let mut buf = Vec::new();
        let o = Outcome {
            status: Some(Status::Truncated),
            error: Some("cut".into()),
            src_format: Some("jpeg"),
            crop: Some(Crop {
                index: 2,
                x: 1,
                y: 2,
                w: 3,
                h: 4,
            }),
            codec: Some(vec![1, 2, 3]),
            ..Outcome::default()
        };
        let wire = vec![WireOutcome::of(&o), WireOutcome::of(&Outcome::default())];
        write_frame(&mut buf, &wire, &[&[1, 2, 3]]).unwrap();
        let (w, bytes): (Vec<WireOutcome>, Vec<u8>) =
            read_frame(&mut buf.as_slice()).unwrap().unwrap();
        let back = decode_outcomes(w, bytes).unwrap();
        assert_eq!(back[0].codec.as_deref(), Some(&[1u8, 2, 3][..]));
        assert_eq!(back[0].status, Some(Status::Truncated));
        assert_eq!(back[0].crop, o.crop);
        assert_eq!(back[0].src_format, Some("jpeg"));
        assert!(back[1].codec.is_none());
        // A frame cut short is an error, not a hang or a short read taken as whole.
        let cut = &buf[..buf.len() - 1];
        assert!(read_frame::<Vec<WireOutcome>>(&mut &cut[..]).is_err());
        // Codec lengths beyond the bytes sent.
        let wire = vec![WireOutcome::of(&o)];
        assert!(decode_outcomes(wire, vec![1]).is_err());
        // End of stream before a frame: a clean end.
        assert!(read_frame::<Vec<WireOutcome>>(&mut &[][..])
            .unwrap()
            .is_none());
    }
}
