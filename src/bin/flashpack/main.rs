//! The `flashpack` command line: one file per subcommand, and `bars.rs`, the progress bars of
//! `convert` and `publish`. Exit codes: 0 ok, 1 error, 2 usage.

#![deny(clippy::undocumented_unsafe_blocks)]

mod bars;
mod bench;
mod bench_codecs;
mod bench_serve;
mod chat;
mod convert;
mod eval;
mod inspect;
mod plan;
mod publish;
mod rank;
mod run;
mod serve;
mod verify;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "flashpack",
    version,
    about = "Run Mixture-of-Experts models larger than memory"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Benchmarks that print tables (codecs, ...).
    Bench(bench::BenchArgs),
    /// Talk with a pack in the terminal: multi-turn, streamed, the KV cache kept between turns.
    Chat(chat::ChatArgs),
    /// Convert a Hugging Face (or mlx-lm) MoE checkpoint into a .flashpack.
    Convert(convert::ConvertArgs),
    /// Perplexity of a pack on a text; KL divergence and top-1 agreement against a reference.
    Eval(eval::EvalArgs),
    /// Show what a pack holds: model, sizes, bits per weight, codecs, layout, provenance.
    Inspect(inspect::InspectArgs),
    /// What fits this machine and how fast it will run, from a checkpoint's or pack's headers.
    Plan(plan::PlanArgs),
    /// Generate text from a pack; experts stream from disk within --mem-budget.
    Run(run::RunArgs),
    /// Upload a pack and a generated model card to the Hugging Face Hub.
    Publish(publish::PublishArgs),
    /// Serve a pack over an OpenAI-compatible HTTP API (127.0.0.1:8080 by default).
    Serve(serve::ServeArgs),
    /// Hash every byte of a pack; name every damaged section, tensor or segment.
    Verify(verify::VerifyArgs),
}

fn main() -> ExitCode {
    // Output piped into a reader that stops early (`flashpack inspect P | head`) ends the
    // process quietly, as it does for other Unix tools, instead of a panic in `println!`
    // (Rust starts programs with SIGPIPE ignored, so writes fail with EPIPE).
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(args) => bench::run(args).map(|()| ExitCode::SUCCESS),
        Command::Chat(args) => chat::run(args),
        Command::Convert(args) => convert::run(args).map(|()| ExitCode::SUCCESS),
        Command::Eval(args) => eval::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Plan(args) => plan::run(args),
        Command::Run(args) => run::run(args),
        Command::Publish(args) => publish::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Verify(args) => verify::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::from(exit_code(&e))
        }
    }
}

/// 2 for a usage error (an option out of range, or options that do not go together), else 1.
fn exit_code(e: &anyhow::Error) -> u8 {
    let usage = e.chain().any(|c| {
        matches!(
            c.downcast_ref::<flashpack::convert::ConvertError>(),
            Some(flashpack::convert::ConvertError::BadOption { .. })
        )
    });
    if usage {
        2
    } else {
        1
    }
}

/// The error and its causes, joined with ": ", leaving out a cause whose text the message
/// already holds (many errors put their source in their own text as well as in the chain).
fn error_chain(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg
}
