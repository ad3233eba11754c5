//! The flashpack command line: one file per subcommand.

mod bench;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "flashpack",
    version,
    about = "Pack and run Mixture-of-Experts models larger than memory"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Benchmarks that print tables (codecs, ...).
    Bench(bench::BenchArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Bench(args) => bench::run(args),
    }
}
