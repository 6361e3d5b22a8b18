//! The rendezvous of a torchrun-style launch (ranks started with `RANK`, `WORLD_SIZE`,
//! `MASTER_ADDR`, `MASTER_PORT` and no MPI): rank 0 listens on a TCP port of `MASTER_ADDR`'s
//! machine and hands the NCCL id to every other rank, as llm.c's TCP initialization does. The
//! port is `CODECLM_NCCL_PORT`, else `MASTER_PORT + 1` (torchrun's own agent holds
//! `MASTER_PORT`). Only the 128-byte id travels here; NCCL does everything else.
//!
//! The wire: a rank sends `CODECLM-NCCL-1`, its world size, its rank and a job tag (a hash of
//! `TORCHELASTIC_RUN_ID` or `SLURM_JOB_ID`, so two jobs on one port do not mix); rank 0 answers
//! `0` and the id, or `1` and why it refused. Connections that do not speak this are dropped.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::{Error, Result};

const MAGIC: &[u8; 14] = b"CODECLM-NCCL-1";
/// Bytes of what travels (an NCCL unique id).
pub const ID_BYTES: usize = 128;

/// Where rank 0 listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl Endpoint {
    /// From `MASTER_ADDR` and `CODECLM_NCCL_PORT` or `MASTER_PORT + 1`.
    pub fn from_env() -> Result<Endpoint> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let host = var("MASTER_ADDR").ok_or_else(|| {
            Error::Config("a torchrun-style launch (RANK, WORLD_SIZE) needs MASTER_ADDR: the host of rank 0, where it hands out the NCCL id. Fix: export MASTER_ADDR=<rank 0's host> MASTER_PORT=<port> (torchrun sets both)".into())
        })?;
        let port = match (var("CODECLM_NCCL_PORT"), var("MASTER_PORT")) {
            (Some(p), _) => p.trim().parse::<u16>().map_err(|_| {
                Error::Config(format!("CODECLM_NCCL_PORT={p:?} is not a TCP port"))
            })?,
            (None, Some(p)) => p
                .trim()
                .parse::<u16>()
                .ok()
                .and_then(|p| p.checked_add(1))
                .ok_or_else(|| {
                    Error::Config(format!(
                        "MASTER_PORT={p:?}: not a TCP port below 65535 (the NCCL id is handed out on MASTER_PORT + 1; or set CODECLM_NCCL_PORT)"
                    ))
                })?,
            (None, None) => {
                return Err(Error::Config(
                    "a torchrun-style launch needs MASTER_PORT (or CODECLM_NCCL_PORT): the NCCL id is handed out on MASTER_PORT + 1 of MASTER_ADDR".into(),
                ))
            }
        };
        Ok(Endpoint {
            host: host.trim().to_string(),
            port,
        })
    }
}

/// A tag of the job (the same on every rank of one job): two jobs on one port do not mix.
pub fn job_tag() -> u64 {
    let s = ["TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "CODECLM_JOB"]
        .iter()
        .find_map(|k| std::env::var(k).ok())
        .unwrap_or_default();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

/// How long ranks wait for each other (`CODECLM_RENDEZVOUS_TIMEOUT` seconds, default 600).
pub fn timeout() -> Duration {
    let s = std::env::var("CODECLM_RENDEZVOUS_TIMEOUT")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(600.0);
    Duration::from_secs_f64(s)
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::Config(format!("{what}: {e}"))
}

/// Rank 0: serves `id` to the `world - 1` other ranks at `port`, returning when each has it.
pub fn serve(port: u16, world: usize, tag: u64, id: &[u8; ID_BYTES], wait: Duration) -> Result<()> {
    if world <= 1 {
        return Ok(());
    }
    let listener = TcpListener::bind(("0.0.0.0", port)).map_err(io(format!(
        "rank 0 cannot listen on port {port} to hand out the NCCL id (set CODECLM_NCCL_PORT to a free port, the same on every rank)"
    )))?;
    listener
        .set_nonblocking(true)
        .map_err(io("rendezvous socket".into()))?;
    let deadline = Instant::now() + wait;
    let mut served = vec![false; world];
    served[0] = true;
    while served.iter().any(|s| !s) {
        match listener.accept() {
            Ok((stream, peer)) => {
                // A peer that does not speak the protocol, or a refused one, is dropped; the
                // ranks that do are counted.
                match answer(stream, world, tag, id, &served) {
                    Ok(r) => served[r] = true,
                    Err(e) => tracing::warn!("rendezvous: connection from {peer}: {e}"),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    let missing: Vec<String> = (0..world)
                        .filter(|&r| !served[r])
                        .map(|r| r.to_string())
                        .collect();
                    return Err(Error::Config(format!(
                        "rank 0 waited {:.0} s on port {port} and rank(s) {} never asked for the NCCL id: are they started, with MASTER_ADDR pointing here and the same port? (CODECLM_RENDEZVOUS_TIMEOUT sets the wait)",
                        wait.as_secs_f64(),
                        missing.join(", ")
                    )));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(io(format!("rendezvous on port {port}"))(e)),
        }
    }
    Ok(())
}

/// Reads one rank's hello and answers it; the rank it served.
fn answer(
    mut s: TcpStream,
    world: usize,
    tag: u64,
    id: &[u8; ID_BYTES],
    served: &[bool],
) -> std::result::Result<usize, String> {
    s.set_nonblocking(false).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut hello = [0u8; 14 + 8 + 8 + 8];
    s.read_exact(&mut hello).map_err(|e| e.to_string())?;
    if &hello[..14] != MAGIC {
        return Err("not a codeclm rank".into());
    }
    let num = |i: usize| u64::from_le_bytes(hello[i..i + 8].try_into().expect("8 bytes"));
    let (their_world, rank, their_tag) = (num(14) as usize, num(22) as usize, num(30));
    let refuse = if their_world != world {
        Some(format!(
            "rank 0 runs with WORLD_SIZE={world}, this rank with {their_world}"
        ))
    } else if their_tag != tag {
        Some("rank 0 belongs to another job (TORCHELASTIC_RUN_ID / SLURM_JOB_ID differ)".into())
    } else if rank == 0 || rank >= world {
        Some(format!("RANK={rank} is not in 1..{world}"))
    } else if served[rank] {
        Some(format!("two processes say RANK={rank}"))
    } else {
        None
    };
    let mut reply = Vec::with_capacity(1 + ID_BYTES);
    match &refuse {
        None => {
            reply.push(0);
            reply.extend_from_slice(id);
        }
        Some(why) => {
            reply.push(1);
            reply.extend_from_slice(&(why.len() as u16).to_le_bytes());
            reply.extend_from_slice(why.as_bytes());
        }
    }
    s.write_all(&reply).map_err(|e| e.to_string())?;
    match refuse {
        None => Ok(rank),
        Some(why) => Err(why),
    }
}

/// Rank `rank` > 0: asks rank 0 at `at` for the id, retrying until rank 0 listens.
pub fn fetch(
    at: &Endpoint,
    rank: usize,
    world: usize,
    tag: u64,
    wait: Duration,
) -> Result<[u8; ID_BYTES]> {
    let deadline = Instant::now() + wait;
    let mut last = String::from("no attempt");
    while Instant::now() < deadline {
        match try_fetch(at, rank, world, tag) {
            Ok(Ok(id)) => return Ok(id),
            // Refused by rank 0: retrying cannot help.
            Ok(Err(why)) => {
                return Err(Error::Config(format!(
                    "rank 0 at {at} refused rank {rank}: {why}"
                )))
            }
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(Error::Config(format!(
        "rank {rank} could not get the NCCL id from rank 0 at {at} within {:.0} s (last: {last}). Is rank 0 running, is MASTER_ADDR its host, and is the port open between the machines? (CODECLM_NCCL_PORT sets the port, CODECLM_RENDEZVOUS_TIMEOUT the wait)",
        wait.as_secs_f64()
    )))
}

/// One attempt: Err is worth retrying (not listening yet), Ok(Err) is a refusal.
#[allow(clippy::type_complexity)]
fn try_fetch(
    at: &Endpoint,
    rank: usize,
    world: usize,
    tag: u64,
) -> std::result::Result<std::result::Result<[u8; ID_BYTES], String>, String> {
    let addr = (at.host.as_str(), at.port)
        .to_socket_addrs()
        .map_err(|e| format!("resolving {at}: {e}"))?
        .next()
        .ok_or_else(|| format!("{at} resolves to no address"))?;
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let mut hello = Vec::with_capacity(38);
    hello.extend_from_slice(MAGIC);
    for v in [world as u64, rank as u64, tag] {
        hello.extend_from_slice(&v.to_le_bytes());
    }
    s.write_all(&hello).map_err(|e| e.to_string())?;
    let mut status = [0u8; 1];
    s.read_exact(&mut status).map_err(|e| e.to_string())?;
    if status[0] == 0 {
        let mut id = [0u8; ID_BYTES];
        s.read_exact(&mut id).map_err(|e| e.to_string())?;
        return Ok(Ok(id));
    }
    let mut len = [0u8; 2];
    s.read_exact(&mut len).map_err(|e| e.to_string())?;
    let mut why = vec![0u8; u16::from_le_bytes(len) as usize];
    s.read_exact(&mut why).map_err(|e| e.to_string())?;
    Ok(Err(String::from_utf8_lossy(&why).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind(("127.0.0.1", 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn every_rank_gets_rank_zeros_id() {
        let port = free_port();
        let id: [u8; ID_BYTES] = std::array::from_fn(|i| (i * 7 + 3) as u8);
        let at = Endpoint {
            host: "127.0.0.1".into(),
            port,
        };
        let world = 4;
        // The other ranks start first: they retry until rank 0 listens.
        let clients: Vec<_> = (1..world)
            .map(|r| {
                let at = at.clone();
                std::thread::spawn(move || fetch(&at, r, world, 9, Duration::from_secs(20)))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        serve(port, world, 9, &id, Duration::from_secs(20)).unwrap();
        for c in clients {
            assert_eq!(c.join().unwrap().unwrap(), id);
        }
    }

    #[test]
    fn strangers_and_mismatches_are_refused_with_reasons() {
        let port = free_port();
        let id = [5u8; ID_BYTES];
        let at = Endpoint {
            host: "127.0.0.1".into(),
            port,
        };
        let server = std::thread::spawn(move || serve(port, 2, 1, &id, Duration::from_secs(3)));
        std::thread::sleep(Duration::from_millis(200));
        // Garbage is dropped without counting.
        let mut junk = TcpStream::connect(("127.0.0.1", port)).unwrap();
        junk.write_all(&[0u8; 38]).unwrap();
        drop(junk);
        let wrong_world = fetch(&at, 1, 3, 1, Duration::from_secs(5)).unwrap_err();
        assert!(
            wrong_world.to_string().contains("WORLD_SIZE=2"),
            "{wrong_world}"
        );
        let other_job = fetch(&at, 1, 2, 2, Duration::from_secs(5)).unwrap_err();
        assert!(other_job.to_string().contains("another job"), "{other_job}");
        let bad_rank = fetch(&at, 0, 2, 1, Duration::from_secs(5)).unwrap_err();
        assert!(bad_rank.to_string().contains("RANK=0"), "{bad_rank}");
        // Rank 1 never came: rank 0 gives up naming it.
        let e = server.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("rank(s) 1 never asked"), "{e}");
    }

    #[test]
    fn a_rank_without_rank_zero_times_out_naming_the_address() {
        let port = free_port();
        let at = Endpoint {
            host: "127.0.0.1".into(),
            port,
        };
        let e = fetch(&at, 1, 2, 0, Duration::from_millis(600))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("127.0.0.1:{port}")) && e.contains("MASTER_ADDR"),
            "{e}"
        );
    }
}
