//! `flashpack serve PACK`: an OpenAI-compatible server (`/v1/chat/completions`,
//! `/v1/completions`, `/v1/responses`, `/v1/models`, `/health`) with Anthropic's
//! `/v1/messages`, on 127.0.0.1:8080 by default.

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
    /// Require `Authorization: Bearer KEY` on every request (printable ASCII, no spaces
    /// around it). Without one, only local pages and clients may call the server.
    #[arg(long, value_name = "KEY", value_parser = api_key)]
    pub api_key: Option<String>,
    /// The model id clients use (default: the pack's file name without .flashpack, or the Hub id).
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
    /// KV caches kept for conversations other than the current one, so that agents and
    /// clients that alternate each reuse their own prefix (least recently used dropped first;
    /// 0: one conversation). Default 2GiB; under --mem-budget none unless given, and then it
    /// comes out of the budget.
    #[arg(long, value_name = "SIZE", value_parser = prompt_cache_size)]
    pub prompt_cache_bytes: Option<u64>,
    /// Requests decoded at once (continuous batching: a request joins the running ones
    /// between decode steps, and each expert read serves every sequence routed to it).
    /// Default 4; under --mem-budget 1 unless given, and then each one past the first sets
    /// aside its own KV cache in the budget. 1: one request at a time.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=256))]
    pub decode_concurrency: Option<u32>,
    #[command(flatten)]
    pub memory: MemoryArgs,
    /// One model across several processes: every rank runs this same command with its own
    /// --rank; rank 0 serves HTTP (docs/decisions/0034-pipeline-ranks.md).
    #[command(flatten)]
    pub ranks: crate::run::RankArgs,
}

/// `--decode-concurrency` without `--mem-budget` (docs/decisions/0009-serve-queue-no-batching.md:
/// on the GPU 4 sequences decode at 3.7x the throughput of one).
const DEFAULT_DECODE_CONCURRENCY: usize = 4;

/// `--prompt-cache-bytes` without `--mem-budget`: 2 GiB of other conversations' KV caches.
const DEFAULT_PROMPT_CACHE_BYTES: u64 = 2 << 30;

/// `--prompt-cache-bytes`: a size with its unit (`2GiB`, `512MB`), or `0` for none.
fn prompt_cache_size(s: &str) -> Result<u64, String> {
    if s.trim() == "0" {
        return Ok(0);
    }
    let forms = "give a size with its unit, such as 2GiB, 512MB or 512M, or 0 for none";
    match flashpack::run::budget::parse_size(s) {
        Ok(flashpack::run::budget::Size::Bytes(b)) => Ok(b),
        _ => Err(format!("bad size {s:?}: {forms}")),
    }
}

/// `--api-key`: a key a client can send in a header and a user can type: not empty, no spaces
/// around it (which the header's parsing drops), printable ASCII (what a header carries).
fn api_key(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("an empty key would let no request in: give a key".into());
    }
    if s.trim() != s {
        return Err("the key has spaces around it, which no request can send: remove them".into());
    }
    if !s.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return Err(
            "the key must be printable ASCII (HTTP headers carry nothing else): use letters, digits and punctuation"
                .into(),
        );
    }
    Ok(s.to_string())
}

/// Whether `--host` keeps the server to this machine: a loopback address or `localhost`.
fn loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    // A client gone altogether is found by a write to its socket failing (half-closed ones are
    // answered, docs/decisions/0017-serve-host-and-origin.md): that write must fail with EPIPE,
    // not end the server, as main's default disposition for piped output would.
    #[cfg(unix)]
    // SAFETY: sets the disposition of one signal before any thread of the server starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    if args.api_key.is_none() && !loopback(&args.host) {
        eprintln!(
            "warning: --host {} without --api-key: anyone who can reach this address can use the model; set --api-key",
            args.host
        );
    }
    // A Hub pack (org/name[@revision][:FILE]): one process downloads it whole into the Hub
    // cache; a pipeline rank reads only its layers' ranges (serve_ranks).
    let hub_id = args
        .pack
        .to_str()
        .filter(|s| flashpack::hub::PackRef::parse(s).is_some())
        .map(str::to_string);
    let path = if hub_id.is_some() && args.ranks.hostfile.is_none() {
        crate::run::local_pack(&args.pack)?
    } else {
        args.pack.clone()
    };
    let mut opts = ServeOptions::new(path);
    if let Some(id) = hub_id {
        opts.model = id;
    }
    if let Some(name) = args.model_name {
        opts.model = name;
    }
    opts.host = args.host;
    opts.port = args.port;
    opts.api_key = args.api_key;
    opts.engine = args.memory.engine_options();
    // A budget the user sized stays as it was unless they make room for other conversations.
    opts.engine.prompt_cache_bytes =
        args.prompt_cache_bytes
            .unwrap_or(if args.memory.mem_budget.is_some() {
                0
            } else {
                DEFAULT_PROMPT_CACHE_BYTES
            });
    // As the prompt cache: a user-sized budget sets aside no more KV caches unless asked.
    opts.decode_concurrency = args.decode_concurrency.map_or(
        if args.memory.mem_budget.is_some() {
            1
        } else {
            DEFAULT_DECODE_CONCURRENCY
        },
        |n| n as usize,
    );
    opts.engine.sequences = opts.decode_concurrency;
    opts.max_queue = args.max_queue as usize;
    opts.max_body_bytes = args.max_body_bytes;
    opts.max_prompt_tokens = args.max_prompt_tokens.unwrap_or(usize::MAX);
    opts.default_max_tokens = args.default_max_tokens;
    opts.idle_timeout = Duration::from_secs(args.idle_timeout);
    let model = opts.model.clone();
    let listening = |addr| {
        eprintln!("serving {model} on http://{addr}/v1 (OpenAI API); Ctrl-C stops");
        let _ = std::io::stderr().flush();
    };
    if let Some(hostfile) = args.ranks.hostfile.clone() {
        return serve_ranks(opts, &args.ranks, &hostfile, listening);
    }
    serve(opts, listening)?;
    Ok(ExitCode::SUCCESS)
}

/// `serve --hostfile H --rank N`: rank 0 serves HTTP with the first layers and sends the rest
/// down the pipeline; the other ranks run their layers until rank 0 stops. A pipeline serves one
/// request at a time, each from an empty KV cache (the other ranks' caches follow rank 0's
/// positions, not its prompt cache).
fn serve_ranks(
    mut opts: flashpack::serve::ServeOptions,
    ranks: &crate::run::RankArgs,
    hostfile: &std::path::Path,
    listening: impl FnOnce(std::net::SocketAddr),
) -> anyhow::Result<ExitCode> {
    use anyhow::Context;
    use flashpack::run::pipeline::{JoinOptions, Pipeline};
    let rank = crate::rank::rank_of(ranks)?;
    let hub = flashpack::hub::Hub::from_env();
    let (path, mut remote) = crate::rank::resolve_pack(&hub, &opts.pack, rank)?;
    let mut pack = flashpack::format::Pack::open(&path)
        .with_context(|| format!("cannot serve {}", opts.pack.display()))?;
    let cfg = flashpack::run::open::model_config(&pack)?;
    let ram = flashpack::memory::total_ram();
    let budget = opts
        .engine
        .mem_budget
        .as_ref()
        .map_or(ram, |b| b.size.resolve(ram));
    let context = cfg.max_position_embeddings.unwrap_or(usize::MAX);
    let p = Pipeline::join(
        &JoinOptions {
            hostfile,
            rank,
            budget,
            positions: opts.engine.positions.min(context),
            connect_timeout: Duration::from_secs(ranks.connect_timeout),
        },
        &pack,
        &cfg,
    )
    .with_context(|| format!("cannot start rank {rank} of {}", hostfile.display()))?;
    opts.engine.positions = p.positions.max(1);
    if let Some(remote) = remote.as_mut() {
        // This rank's layers, then the copy opened again with them.
        let fetched = crate::rank::fetch_stage(remote, &pack, &p, &cfg).and_then(|()| {
            flashpack::format::Pack::open(&path)
                .with_context(|| format!("cannot serve {}", remote.name()))
        });
        match fetched {
            Ok(opened) => pack = opened,
            Err(e) => {
                p.disarm();
                return Err(e);
            }
        }
    }
    opts.pack = path;
    if rank != 0 {
        let done = crate::rank::follow(&p, &pack, &cfg, &opts.engine);
        if done.is_err() {
            p.disarm();
        }
        return done;
    }
    drop(pack);
    opts.engine.prompt_cache_bytes = 0;
    opts.engine.sequences = 1;
    opts.decode_concurrency = 1;
    opts.stage = Some(flashpack::run::engine::Stage {
        layers: p.layers.clone(),
        downstream: Some(std::sync::Arc::new(p.link())),
    });
    eprintln!("{}", crate::rank::split_line(&p));
    if let Err(e) = serve(opts, listening) {
        p.disarm();
        return Err(e.into());
    }
    p.finish()?;
    Ok(ExitCode::SUCCESS)
}
