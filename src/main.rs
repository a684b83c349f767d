//! `tollgate`: a thin binary over the library.
use clap::Parser;

/// jemalloc, configured in `.cargo/config.toml` to give memory back after load.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    tollgate::cli::main(tollgate::cli::Cli::parse())
}
