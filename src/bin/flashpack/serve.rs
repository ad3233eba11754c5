//! `flashpack serve PACK`: an OpenAI-compatible server (`/v1/chat/completions`,
//! `/v1/completions`, `/v1/models`, `/health`) on 127.0.0.1:8080 by default.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use flashpack::serve::{serve, ServeOptions};

use crate::chat::MemoryArgs;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// The .flashpack file.
    pub pack: PathBuf,
    /// Address to listen on; 127.0.0.1 keeps the server to this machine.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0 picks a free one; the address is printed on stderr).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every request.
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// The model id clients use (default: the pack's file name without .flashpack).
    #[arg(long, value_name = "ID")]
    pub model_name: Option<String>,
    /// Requests that may wait while one runs; more get 429 with Retry-After.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_queue: u32,
    /// Largest request body in bytes (413 above it).
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Longest prompt in tokens (400 above it); the model's context caps it.
    #[arg(long, value_name = "TOKENS")]
    pub max_prompt_tokens: Option<usize>,
    /// Tokens per answer when a request does not say (chat; completions default to 16).
    #[arg(long, default_value_t = 512)]
    pub default_max_tokens: usize,
    /// Seconds a connection may wait between requests, or take to send one, before it is
    /// closed.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub idle_timeout: u64,
    #[command(flatten)]
    pub memory: MemoryArgs,
}

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let mut opts = ServeOptions::new(args.pack.clone());
    if let Some(name) = args.model_name {
        opts.model = name;
    }
    opts.host = args.host;
    opts.port = args.port;
    opts.api_key = args.api_key;
    opts.engine = args.memory.engine_options();
    opts.max_queue = args.max_queue as usize;
    opts.max_body_bytes = args.max_body_bytes;
    opts.max_prompt_tokens = args.max_prompt_tokens.unwrap_or(usize::MAX);
    opts.default_max_tokens = args.default_max_tokens;
    opts.idle_timeout = Duration::from_secs(args.idle_timeout);
    let model = opts.model.clone();
    serve(opts, |addr| {
        eprintln!("serving {model} on http://{addr}/v1 (OpenAI API); Ctrl-C stops");
        let _ = std::io::stderr().flush();
    })?;
    Ok(ExitCode::SUCCESS)
}
