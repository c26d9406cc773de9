//! `lowrank`: a thin CLI over the lowrank crates. Each subcommand parses flags, loads what it
//! needs and calls a library; errors get context here and exit non-zero.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod alloc;
mod cli;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[global_allocator]
static ALLOC: alloc::HugeBlocks = alloc::HugeBlocks;

use std::process::ExitCode;

fn main() -> ExitCode {
    match cli::run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
