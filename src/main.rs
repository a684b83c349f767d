//! `tollgate`: a thin binary over the library.
use clap::Parser;

fn main() -> std::process::ExitCode {
    tollgate::cli::main(tollgate::cli::Cli::parse())
}
