//! `flashpack run PACK --prompt TEXT`: generated text alone on stdout, stats on stderr.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::chat::{SamplingArgs, TopKArg};
use anyhow::{bail, Context};
use flashpack::memory::peak_rss;
use flashpack::run::budget::Budget;
use flashpack::run::engine::{Engine, EngineOptions, Request};
use flashpack::run::experts::PolicyKind;
use flashpack::run::harmony::{Harmony, Split};
use flashpack::run::open;
use flashpack::run::read::IoMode;
use flashpack::run::template::{ChatTemplate, Message};
use flashpack::run::text::TextStream;

#[derive(clap::Args)]
pub struct RunArgs {
    /// The .flashpack file.
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
}

/// Draws the prompt's progress on stderr (`prompt: 4096/16384 tokens`) once the prompt has
/// taken longer than `after`, then at most once per `after`; a short prompt draws nothing.
/// On a terminal the line is redrawn in place.
struct PromptProgress {
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
    fn new(after: std::time::Duration, enabled: bool) -> PromptProgress {
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
fn prompt_progress_after() -> std::time::Duration {
    let ms = std::env::var("FLASHPACK_PROGRESS_AFTER_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
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
fn prompt_text(args: &RunArgs) -> anyhow::Result<String> {
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
    let prompt = prompt_text(&args)?;
    let (pack, cfg, weights) = open::open(&args.pack, !args.no_verify)
        .with_context(|| format!("cannot run {}", args.pack.display()))?;
    let progress = PromptProgress::new(prompt_progress_after(), !args.json);
    // The text the model reads: the prompt, through the chat template unless --raw.
    let text = if args.raw {
        prompt.clone()
    } else {
        match ChatTemplate::of_pack(&pack) {
            Some(template) => template.render(&[Message::new("user", &prompt)])?,
            None => prompt.clone(),
        }
    };
    let opts = EngineOptions {
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
        positions: text.len().saturating_add(args.max_tokens),
    };
    let mut engine = Engine::new(&pack, &cfg, &weights, &opts, &progress)?;

    let ids = engine.encode(&text)?;
    let req = Request {
        max_tokens: args.max_tokens,
        sampler: args.sampling.sampler(),
        logprobs: None,
        stop: Vec::new(),
    };
    let tokenizer = engine.tokenizer().clone();
    let mut stdout = std::io::stdout().lock();
    let mut text = TextStream::new(&tokenizer);
    // A harmony model (gpt-oss): the final channel on stdout, its reasoning on stderr
    // (docs/decisions/0011-harmony-output.md).
    let mut harmony = engine.answers_in_channels(&ids).then(Harmony::new);
    let mut out_piece = |piece: &str, stdout: &mut std::io::StdoutLock| match harmony.as_mut() {
        Some(h) => show(h.push(piece), stdout),
        None => {
            let _ = stdout.write_all(piece.as_bytes());
        }
    };
    // Process CPU seconds at the start, at the first token and at the end: under load from
    // other processes they measure the work of each phase more steadily than wall time.
    let cpu_start = process_cpu_s();
    let mut cpu_first = None;
    let out = engine.generate(&ids, &req, &progress, |t| {
        if cpu_first.is_none() {
            cpu_first = Some(process_cpu_s());
        }
        if let Some(piece) = text.push(t.id) {
            out_piece(&piece, &mut stdout);
            let _ = stdout.flush();
        }
        true
    })?;
    if let Some(rest) = text.finish() {
        out_piece(&rest, &mut stdout);
    }
    if let Some(h) = harmony.as_mut() {
        show(h.finish(), &mut stdout);
    }
    let generated = text.ids().to_vec();
    let _ = writeln!(stdout);
    let _ = stdout.flush();
    let cpu_end = process_cpu_s();
    let stats = out.generation.stats;
    if stats.stop_reason == "context" {
        eprintln!(
            "note: generation stopped at the model's context length ({} tokens)",
            cfg.max_position_embeddings.unwrap_or(0)
        );
    }
    let at_first_token = out.at_first_token;
    let sizes = engine.sizes();
    let cache_stats = engine.cache_stats();
    let stream = engine.stream_stats().clone();
    let hits: u64 = cache_stats.hits_per_layer.values().sum();
    let misses: u64 = cache_stats.misses_per_layer.values().sum();
    let hit_rate_per_layer: std::collections::BTreeMap<u32, f64> = cache_stats
        .hits_per_layer
        .keys()
        .chain(cache_stats.misses_per_layer.keys())
        .map(|l| {
            let h = cache_stats.hits_per_layer.get(l).copied().unwrap_or(0);
            let m = cache_stats.misses_per_layer.get(l).copied().unwrap_or(0);
            (*l, h as f64 / (h + m).max(1) as f64)
        })
        .collect();
    let tokens = (stats.prompt_tokens + stats.generated_tokens).max(1) as f64;
    let derived = serde_json::json!({
        "hit_rate": hits as f64 / (hits + misses).max(1) as f64,
        "hit_rate_per_layer": hit_rate_per_layer,
        // Of the loads the router needed, the share prefetch had already done.
        "misses_hidden_by_prefetch": cache_stats.prefetch_used as f64 / (cache_stats.prefetch_used + misses).max(1) as f64,
        "prefetch_accuracy": stream.predicted_correct as f64 / stream.predicted.max(1) as f64,
        "stall_ms_per_token": stream.stall_ms / tokens,
        "bytes_read_per_token": cache_stats.bytes_read as f64 / tokens,
        // A rate over no timed reads is unknown (null), not bytes over a clamped 0 ms.
        "read_decode_gb_per_s": (cache_stats.bytes_read > 0 && cache_stats.read_decode_ms > 0.0)
            .then(|| cache_stats.bytes_read as f64 / 1e6 / cache_stats.read_decode_ms),
    });
    let report = serde_json::json!({
        "generation": stats,
        // The generated token ids, in order (the text on stdout is their decoding).
        "token_ids": generated,
        "peak_rss_bytes": peak_rss(),
        // MLX's allocator: live array bytes at the end and at most (device memory on a GPU).
        "mlx_active_bytes": flashpack::mlx::active_memory(),
        "mlx_peak_bytes": flashpack::mlx::peak_memory(),
        "dense_bytes": sizes.dense_bytes,
        "expert_cache": cache_stats,
        "stream": stream,
        "derived": derived,
        "budget_bytes": sizes.budget_bytes,
        "expert_budget_bytes": sizes.expert_budget_bytes,
        "all_experts_bytes": sizes.all_experts_bytes,
        "margin_bytes": sizes.margin_bytes,
        // Counters as they stood when the first token came out (end of prefill): subtract
        // them for the decode phase alone.
        "at_first_token": at_first_token,
        "cpu_s": {
            "prefill": cpu_first.map(|c| c - cpu_start),
            "decode": cpu_first.map(|c| cpu_end - c),
        },
        "io": args.io,
        "policy": args.policy,
    });
    if args.json {
        eprintln!("{}", serde_json::to_string(&report)?);
    } else {
        eprintln!(
            "prompt {} tokens at {:.1} tok/s, first token after {:.2} s; generated {} tokens at {:.1} tok/s; peak RSS {:.0} MB",
            stats.prompt_tokens,
            stats.prefill_tokens_per_s,
            stats.time_to_first_token_s,
            stats.generated_tokens,
            stats.decode_tokens_per_s,
            peak_rss() as f64 / 1e6
        );
        if engine.streaming() {
            eprintln!(
                "experts: {} slots, hit rate {:.1}%, {:.1} MB read, prefetch accuracy {:.1}% (hid {:.1}% of misses), stall {:.1} ms/token",
                cache_stats.slots,
                100.0 * derived["hit_rate"].as_f64().unwrap_or(0.0),
                cache_stats.bytes_read as f64 / 1e6,
                100.0 * derived["prefetch_accuracy"].as_f64().unwrap_or(0.0),
                100.0 * derived["misses_hidden_by_prefetch"].as_f64().unwrap_or(0.0),
                derived["stall_ms_per_token"].as_f64().unwrap_or(0.0)
            );
            if args.skip_uncached.is_some() {
                eprintln!(
                    "skipped {} of {} routed experts (--skip-uncached)",
                    stream.skipped, stream.routed
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// CPU time of this process (all threads), in seconds; 0 where unknown.
fn process_cpu_s() -> f64 {
    #[cfg(unix)]
    {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec into the pointer we give it.
        if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) } == 0 {
            return t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9;
        }
    }
    0.0
}

/// A harmony piece: the answer on stdout, the reasoning on stderr.
fn show(split: Split, stdout: &mut std::io::StdoutLock) {
    if !split.reasoning.is_empty() {
        let mut stderr = std::io::stderr().lock();
        let _ = stderr.write_all(split.reasoning.as_bytes());
        let _ = stderr.flush();
    }
    let _ = stdout.write_all(split.answer.as_bytes());
}
