//! `flashpack run PACK --prompt TEXT`: generated text alone on stdout, stats on stderr.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::chat::{SamplingArgs, TopKArg};
use anyhow::{bail, Context};
use flashpack::arch::KvBits;
use flashpack::hub::{Hub, PackRef};
use flashpack::run::budget::Budget;
use flashpack::run::engine::{Engine, EngineOptions, Piece, Request};
use flashpack::run::experts::PolicyKind;
use flashpack::run::open;
use flashpack::run::pressure::PressureWatch;
use flashpack::run::read::IoMode;
use flashpack::run::template::{ChatTemplate, Message};
use flashpack::units::{self, Style};

#[derive(clap::Args)]
pub struct RunArgs {
    /// The .flashpack file, or a pack on the Hub: org/name[@revision][:FILE] (FILE: which
    /// .flashpack of the repo, when it holds several). One process downloads the whole pack
    /// into the Hub cache; a pipeline rank (--hostfile) only the byte ranges of its layers.
    pub pack: PathBuf,
    /// The prompt text.
    #[arg(
        long,
        required_unless_present = "prompt_file",
        conflicts_with = "prompt_file"
    )]
    pub prompt: Option<String>,
    /// Read the prompt from this file instead (`-` reads standard input).
    #[arg(long, value_name = "FILE")]
    pub prompt_file: Option<PathBuf>,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs<TopKArg>,
    /// Do not apply the pack's chat template; feed the prompt as is.
    #[arg(long)]
    pub raw: bool,
    /// Memory for weights: 8GiB, 8GB, 8G (= GiB), 512MiB, 512MB, or 50% (of RAM). Dense weights
    /// stay resident; experts share the rest. Default: everything resident.
    #[arg(long, value_name = "SIZE", value_parser = Budget::parse)]
    pub mem_budget: Option<Budget>,
    /// Size the expert cache directly instead (benchmarks): 2GiB, 2GB, or 50% of the bytes that
    /// all of the pack's experts take resident. Dense weights, KV cache and activations come on
    /// top.
    #[arg(long, value_name = "SIZE", value_parser = Budget::parse, conflicts_with = "mem_budget")]
    pub expert_budget: Option<Budget>,
    /// Keep the KV cache's keys and values as 8- or 4-bit codes (groups of 64) from the first
    /// token, on the layers with a plain KV cache; the budget counts the smaller cache.
    #[arg(long, value_name = "BITS", value_parser = crate::chat::kv_bits)]
    pub kv_bits: Option<KvBits>,
    /// How experts come off the disk.
    #[arg(long, default_value = "pread")]
    pub io: IoMode,
    /// Expert reads in flight at once (1 to 256).
    #[arg(long, default_value_t = 8, value_parser = parse_queue_depth)]
    pub queue_depth: usize,
    /// Cache eviction policy: lru, lfu or profile.
    #[arg(long, default_value = "profile")]
    pub policy: PolicyKind,
    /// Do not prefetch the next layer's predicted experts.
    #[arg(long)]
    pub no_prefetch: bool,
    /// Skip a non-resident expert whose routing weight is below THRESHOLD (and renormalize the
    /// token's other weights) instead of reading it. An approximation; off by default.
    #[arg(long, value_name = "THRESHOLD")]
    pub skip_uncached: Option<f32>,
    /// Benchmark baseline: no expert cache, every use reads and decodes again.
    #[arg(long)]
    pub no_cache: bool,
    /// Do not check blake3 checksums: dense tensors at open and each expert segment as it is
    /// read are checked by default, so that a damaged byte ends the run instead of changing
    /// its text.
    #[arg(long)]
    pub no_verify: bool,
    /// Accepted for scripts written when checking was opt-in; it is the default now.
    #[arg(long, hide = true, conflicts_with = "no_verify")]
    pub verify: bool,
    /// Benchmark baselines: route through the host-synchronised streaming store even when every
    /// expert is resident, and pick greedy tokens on the host one synchronous step at a time.
    #[arg(long, hide = true)]
    pub sync_baseline: bool,
    /// Print stats as JSON (on stderr).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub ranks: RankArgs,
}

/// One model across several processes (docs/decisions/0034-pipeline-ranks.md): every rank runs
/// the same command with its own `--rank`.
#[derive(clap::Args, Clone)]
pub struct RankArgs {
    /// Run as one rank of a pipeline over MLX's ring backend: a hostfile in mlx's JSON form
    /// (`[["ip:port"], ["ip:port"]]` as mlx.launch writes it, or mlx.distributed_config's host
    /// list). Each rank holds a share of the layers that follows its --mem-budget.
    #[arg(long, value_name = "FILE")]
    pub hostfile: Option<PathBuf>,
    /// This process's rank in the hostfile (default: MLX_RANK from the environment).
    #[arg(long, requires = "hostfile")]
    pub rank: Option<usize>,
    /// Seconds the ranks may take to find each other before every rank gives up.
    #[arg(long, default_value_t = 60, requires = "hostfile", value_name = "SECS")]
    pub connect_timeout: u64,
}

/// A piece of the answer: the text on stdout; a harmony model's reasoning (gpt-oss) on stderr
/// (docs/decisions/0011-harmony-output.md). Shared with `chat`.
pub fn show(piece: &Piece, stdout: &mut impl Write) {
    if !piece.reasoning.is_empty() {
        let mut stderr = std::io::stderr().lock();
        let _ = stderr.write_all(piece.reasoning.as_bytes());
        let _ = stderr.flush();
    }
    let _ = stdout.write_all(piece.text.as_bytes());
    let _ = stdout.flush();
}

/// Draws the prompt's progress on stderr (`prompt: 4096/16384 tokens`) once the prompt has
/// taken longer than `after`, then at most once per `after`; a short prompt draws nothing.
/// On a terminal the line is redrawn in place.
pub struct PromptProgress {
    after: std::time::Duration,
    enabled: bool,
    state: std::sync::Mutex<PromptState>,
}

struct PromptState {
    started: std::time::Instant,
    last: Option<std::time::Instant>,
    done: u64,
    total: u64,
    drawn: u64,
}

impl PromptProgress {
    pub fn new(after: std::time::Duration, enabled: bool) -> PromptProgress {
        PromptProgress {
            after,
            enabled,
            state: std::sync::Mutex::new(PromptState {
                started: std::time::Instant::now(),
                last: None,
                done: 0,
                total: 0,
                drawn: 0,
            }),
        }
    }

    fn draw(&self, s: &mut PromptState, last: bool) {
        use std::io::IsTerminal;
        let tty = std::io::stderr().is_terminal();
        let end = if tty && !last { "\r" } else { "\n" };
        eprint!("prompt: {}/{} tokens{end}", s.done, s.total);
        s.drawn = s.done;
        s.last = Some(std::time::Instant::now());
    }
}

impl flashpack::progress::Progress for PromptProgress {
    fn stage(&self, _name: &str, total: Option<u64>, _unit: &str) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *s = PromptState {
            started: std::time::Instant::now(),
            last: None,
            done: 0,
            total: total.unwrap_or(0),
            drawn: 0,
        };
    }

    fn advance(&self, n: u64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.done += n;
        let now = std::time::Instant::now();
        let due = now - s.started >= self.after && s.last.is_none_or(|t| now - t >= self.after);
        if self.enabled && due && s.done < s.total {
            self.draw(&mut s, false);
        }
    }

    fn finish_stage(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // The last line, once any was drawn or the whole prompt took longer than `after`.
        let slow = s.started.elapsed() >= self.after;
        if self.enabled && (s.last.is_some() || slow) && s.drawn < s.done {
            self.draw(&mut s, true);
        }
    }

    /// Shown with `--json` too.
    fn warn(&self, msg: &str) {
        eprintln!("warning: {msg}");
    }
}

/// After how long the prompt's progress shows: a second, or `FLASHPACK_PROGRESS_AFTER_MS`
/// (tests set 0 to see every chunk without depending on the machine's speed).
pub fn prompt_progress_after() -> std::time::Duration {
    let ms = flashpack::env::number("FLASHPACK_PROGRESS_AFTER_MS").unwrap_or(1000);
    std::time::Duration::from_millis(ms)
}

/// `--queue-depth`: each read in flight is a thread, so a bound keeps a typo from spawning
/// millions of them.
fn parse_queue_depth(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if (1..=MAX_QUEUE_DEPTH).contains(&n) => Ok(n),
        _ => Err(format!("use a number of reads from 1 to {MAX_QUEUE_DEPTH}")),
    }
}

const MAX_QUEUE_DEPTH: usize = 256;

/// The prompt from `--prompt`, or from `--prompt-file` (`-`: standard input).
pub fn prompt_text(args: &RunArgs) -> anyhow::Result<String> {
    use std::io::Read;
    match (&args.prompt, &args.prompt_file) {
        (Some(p), _) => Ok(p.clone()),
        (None, Some(path)) if path.as_os_str() == "-" => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading the prompt from standard input")?;
            Ok(text)
        }
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("reading the prompt from {}", path.display())),
        (None, None) => bail!("give a prompt with --prompt TEXT or --prompt-file FILE"),
    }
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let _ = args.verify; // checking is the default; the flag stays for old scripts
    if let Some(hostfile) = args.ranks.hostfile.clone() {
        return crate::rank::run(args, &hostfile);
    }
    let prompt = prompt_text(&args)?;
    let path = local_pack(&args.pack)?;
    let (pack, cfg, weights) = open::open(&path, !args.no_verify)
        .with_context(|| format!("cannot run {}", args.pack.display()))?;
    let progress = PromptProgress::new(prompt_progress_after(), !args.json);
    let text = model_text(&args, &pack, &prompt)?;
    let opts = engine_options(&args, text.len().saturating_add(args.max_tokens));
    let mut engine = Engine::new(&pack, &cfg, &weights, &opts, &progress)?;
    // Memory pressure shrinks the expert cache while the system is short (and grows it back).
    engine.watch_pressure(PressureWatch::from_env()?);
    answer(&args, &mut engine, &cfg, &text, &progress)
}

/// The pack's local path: `pack` itself, or for a Hub id (`org/name[@revision][:FILE]`, told
/// apart as `convert` and `plan` tell one) the whole pack downloaded into the Hub cache.
pub fn local_pack(pack: &Path) -> anyhow::Result<PathBuf> {
    let Some(r) = pack.to_str().and_then(PackRef::parse) else {
        return Ok(pack.to_path_buf());
    };
    Hub::from_env()
        .download_pack(&r, &crate::bars::Bars::new(false))
        .with_context(|| format!("cannot run {r}"))
}

/// The text the model reads: the prompt, through the chat template unless --raw.
pub fn model_text(
    args: &RunArgs,
    pack: &flashpack::format::Pack,
    prompt: &str,
) -> anyhow::Result<String> {
    Ok(if args.raw {
        prompt.to_string()
    } else {
        match ChatTemplate::of_pack(pack) {
            Some(template) => template.render(&[Message::new("user", prompt)])?,
            None => prompt.to_string(),
        }
    })
}

/// The engine's options from the command line, sized for `positions` tokens.
pub fn engine_options(args: &RunArgs, positions: usize) -> EngineOptions {
    EngineOptions {
        mem_budget: args.mem_budget.clone(),
        expert_budget: args.expert_budget.clone(),
        io: args.io,
        queue_depth: args.queue_depth,
        policy: args.policy,
        verify: !args.no_verify,
        no_cache: args.no_cache,
        prefetch: !args.no_prefetch,
        skip_uncached: args.skip_uncached,
        sync_baseline: args.sync_baseline,
        // The text's length in bytes bounds its tokens (the template's text included).
        positions,
        // One prompt: no other conversation to keep.
        prompt_cache_bytes: 0,
        kv_bits: args.kv_bits,
        sequences: 1,
    }
}

/// Generates the answer to `text`: the text on stdout, the stats on stderr.
pub fn answer(
    args: &RunArgs,
    engine: &mut Engine,
    cfg: &flashpack::arch::ModelConfig,
    text: &str,
    progress: &PromptProgress,
) -> anyhow::Result<ExitCode> {
    let ids = engine.encode(text)?;
    let req = Request {
        max_tokens: args.max_tokens,
        sampler: args.sampling.sampler(),
        logprobs: None,
        stop: Vec::new(),
    };
    let mut stdout = std::io::stdout().lock();
    let done = engine.complete_until(&ids, &req, progress, &|| false, |p| {
        show(p, &mut stdout);
        true
    })?;
    let _ = writeln!(stdout);
    let _ = stdout.flush();
    let report = engine.report(&done);
    let stats = &report.generation;
    if stats.stop_reason == "context" {
        eprintln!(
            "note: generation stopped at the model's context length ({} tokens)",
            cfg.max_position_embeddings.unwrap_or(0)
        );
    }
    if args.json {
        // Through a `Value`, whose objects keep their keys sorted, as this line always had them.
        eprintln!("{}", serde_json::to_value(&report)?);
    } else {
        eprintln!(
            "prompt {} tokens at {:.1} tok/s, first token after {:.2} s; generated {} tokens at {:.1} tok/s; peak RSS {:.0} MB",
            stats.prompt_tokens,
            stats.prefill_tokens_per_s,
            stats.time_to_first_token_s,
            stats.generated_tokens,
            stats.decode_tokens_per_s,
            report.peak_rss_bytes as f64 / 1e6
        );
        if let Some(bits) = report.sizes.kv_bits {
            eprintln!(
                "KV cache: {bits}-bit on {} of {} layers, {}/token (bf16: {})",
                report.sizes.kv_quantized_layers,
                cfg.num_hidden_layers,
                units::bytes(report.sizes.kv_bytes_per_token, Style::PACK),
                units::bytes(cfg.kv_bytes_per_token(None), Style::PACK)
            );
        }
        if engine.streaming() {
            let (cache, stream, derived) = (&report.expert_cache, &report.stream, &report.derived);
            eprintln!(
                "experts: {} slots, hit rate {:.1}%, {:.1} MB read, prefetch accuracy {:.1}% (hid {:.1}% of misses), stall {:.1} ms/token",
                cache.slots,
                100.0 * derived.hit_rate,
                cache.bytes_read as f64 / 1e6,
                100.0 * derived.prefetch_accuracy,
                100.0 * derived.misses_hidden_by_prefetch,
                derived.stall_ms_per_token
            );
            if args.skip_uncached.is_some() {
                eprintln!(
                    "skipped {} of {} routed experts (--skip-uncached)",
                    stream.skipped, stream.routed
                );
            }
        }
    }
    if !args.json {
        if let Some(p) = report.pressure.as_ref().filter(|p| p.shrinks + p.grows > 0) {
            eprintln!(
                "memory pressure: expert cache shrunk {} and grown {} times, now {} of {} (floor {})",
                p.shrinks,
                p.grows,
                units::bytes(p.expert_budget_bytes, Style::RUN),
                units::bytes(p.max_expert_budget_bytes, Style::RUN),
                units::bytes(p.floor_bytes, Style::RUN)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
