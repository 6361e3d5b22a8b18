//! `codeclm`: the command line. Glue only: [`cli`] parses arguments, turns them into library
//! configs in one place ([`cli::flags`]), calls the libraries and prints the whole error chain
//! on failure.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    tune_allocator();
    let filter = tracing_subscriber::EnvFilter::try_from_env("CODECLM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    match cli::run(cli::Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Every image allocates a few decode and resize buffers of 0.2-3 MB. glibc serves blocks that
/// large with a fresh mmap and returns them with munmap, so each image paid for page faults on
/// all of its memory again (22% of the paper preset's time in a profile). Keeping them on the
/// heap up to 64 MB makes the buffers reused: +15-40% images/s measured, peak RSS unchanged.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
    }
}
