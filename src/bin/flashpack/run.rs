//! `flashpack run PACK --prompt TEXT`: generated text alone on stdout, stats on stderr.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use flashpack::memory::{peak_rss, total_ram};
use flashpack::model::{ComputeError, ExpertStore, PoolRoute, Routing};
use flashpack::run::budget::{parse_size, Size};
use flashpack::run::experts::{ExpertCache, PolicyKind, PoolSize, StoreOptions};
use flashpack::run::generate::{generate_reporting, GenerateOptions};
use flashpack::run::open;
use flashpack::run::read::IoMode;
use flashpack::run::sample::SamplerOptions;
use flashpack::run::stream::StreamingExperts;

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
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 keeps all tokens.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
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

/// A `--mem-budget` / `--expert-budget` value: as written (for messages) and parsed.
#[derive(Clone, Debug)]
pub struct Budget {
    text: String,
    size: Size,
}

impl Budget {
    /// The clap parser: a bare number or an unknown unit is a usage error (exit 2) that lists
    /// the accepted forms.
    fn parse(text: &str) -> Result<Budget, String> {
        Ok(Budget {
            text: text.trim().to_string(),
            size: parse_size(text)?,
        })
    }
}

/// Says so on stderr when a budget is more than the machine's memory: it cannot be honoured, and
/// is most likely a typo (`1TB` for `1GB`).
fn warn_over_ram(option: &str, text: &str, bytes: u64, ram: u64) {
    if ram > 0 && bytes > ram {
        eprintln!(
            "warning: {option} {text} ({}) is more than this machine's memory ({}); the budget cannot hold, and the system may swap",
            fmt_bytes(bytes),
            fmt_bytes(ram)
        );
    }
}

/// Bytes for people: MB below a GB, else GB (decimal, as the other reports print them).
fn fmt_bytes(b: u64) -> String {
    if b >= 1_000_000_000 {
        format!("{:.2} GB", b as f64 / 1e9)
    } else {
        format!("{:.1} MB", b as f64 / 1e6)
    }
}

/// Where the expert cache's size came from, for the message when it holds too few experts.
enum BudgetCause {
    /// `--mem-budget TEXT`, of which the dense weights, KV cache and activations took this much.
    Mem { text: String, dense_and_margin: u64 },
    /// `--expert-budget TEXT`.
    Expert { text: String },
    /// No budget: every stored expert has a slot.
    None,
}

/// The message when the smallest slot pool holds fewer experts than one token routes to: it
/// names the option that sized the cache (or, without one, the pack's own numbers), the size of
/// one expert and where it comes from, top-k, and the least budget that would do.
fn too_few_slots(
    cause: &BudgetCause,
    expert_budget: Option<u64>,
    pools: &[PoolSize],
    top_k: usize,
    (hidden, inter): (u32, u32),
) -> String {
    let Some(p) = pools.iter().min_by_key(|p| p.slots) else {
        return format!(
            "the pack stores no experts, but the model config routes each token to {top_k} (num_experts_per_tok); the pack is damaged or was written by a broken tool: re-convert it"
        );
    };
    // A pool gets the budget's share of its bytes (ExpertCache::new), so `top_k` slots in every
    // pool need this many bytes in all.
    let total: u64 = pools.iter().map(|q| q.stored as u64 * q.slot_bytes).sum();
    let need = pools
        .iter()
        .map(|q| (top_k as u64 * total).div_ceil(q.stored.max(1) as u64))
        .max()
        .unwrap_or(0);
    let room = format!(
        "room for {} of its {}-bit experts ({} each: hidden {hidden} x expert width {inter}, from the pack's expert directory), fewer than the {top_k} one token uses (num_experts_per_tok in the model config)",
        p.slots,
        p.bits,
        fmt_bytes(p.slot_bytes)
    );
    let eb = fmt_bytes(expert_budget.unwrap_or(0));
    match cause {
        BudgetCause::Expert { text } => format!(
            "--expert-budget {text} gives the expert cache {eb}: {room}; raise --expert-budget to at least {}",
            fmt_bytes(need)
        ),
        BudgetCause::Mem {
            text,
            dense_and_margin,
        } => format!(
            "--mem-budget {text} leaves {eb} for experts after {} of dense weights, KV cache and activations: {room}; raise --mem-budget to at least {}",
            fmt_bytes(*dense_and_margin),
            fmt_bytes(dense_and_margin + need)
        ),
        BudgetCause::None => format!(
            "the model config routes each token to {top_k} experts (num_experts_per_tok), but the pack stores only {} {}-bit experts; its config and expert directory disagree: re-convert it",
            p.stored, p.bits
        ),
    }
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

/// Most prompt tokens per forward call (mlx-lm's `prefill_step_size`).
const PREFILL_STEP: usize = 2048;

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
    let tokenizer = open::tokenizer(&pack)?;
    let model = flashpack::model::Model::load(&cfg, &weights).context("loading the model")?;

    let ram = total_ram();
    let budget = args.mem_budget.as_ref().map(|b| b.size.resolve(ram));
    if let (Some(b), Some(text)) = (budget, &args.mem_budget) {
        warn_over_ram("--mem-budget", &text.text, b, ram);
    }
    // The dense weights stay resident; the KV cache (bf16, up to the longest context this run
    // can reach) and activations come out of the budget too.
    let positions = cfg
        .max_position_embeddings
        .unwrap_or(usize::MAX)
        .min(prompt.len() + args.max_tokens) as u64;
    // Keys and values of every KV head, or MLA's latent and rotary key (ModelConfig), plus
    // the fixed-size state of linear-attention layers (Qwen3-Next, Qwen3.5).
    let kv = cfg.kv_values_per_token() * positions * 2 + cfg.recurrent_state_bytes();
    // Prefill runs the prompt in chunks of up to 2,048 tokens (mlx-lm's prefill step); under a
    // budget a chunk's activations (f32 upper bound: the residual stream, the k routed rows in
    // and out of the experts and their hidden width) stay within a tenth of it.
    let per_token = 4
        * (cfg.hidden_size * (2 * cfg.num_experts_per_tok + 8)
            + 3 * cfg.num_experts_per_tok * cfg.moe_intermediate_size.max(1)) as u64;
    let prefill_chunk = match budget {
        None => PREFILL_STEP,
        Some(b) => ((b / 10 / per_token.max(1)) as usize).clamp(16, PREFILL_STEP),
    };
    let margin = kv
        + (cfg.hidden_size * cfg.vocab_size * 4) as u64
        + prefill_chunk as u64 * per_token
        + (2 << 20);
    let all_experts = ExpertCache::all_resident_bytes(&pack);
    let expert_budget = match (budget, &args.expert_budget) {
        (None, None) => None,
        (None, Some(eb)) => {
            let bytes = eb.size.resolve(all_experts);
            warn_over_ram("--expert-budget", &eb.text, bytes, ram);
            Some(bytes)
        }
        (Some(b), _) => {
            let Some(rest) = b.checked_sub(weights.bytes + margin) else {
                bail!(
                    "--mem-budget {} is too small: the dense weights alone need {:.1} MB (plus {:.1} MB for the KV cache and activations); raise the budget",
                    args.mem_budget.as_ref().map_or("", |t| t.text.as_str()),
                    weights.bytes as f64 / 1e6,
                    margin as f64 / 1e6
                );
            };
            Some(rest)
        }
    };
    let opts = StoreOptions {
        budget_bytes: expert_budget,
        io: args.io,
        queue_depth: args.queue_depth,
        policy: args.policy,
        verify: !args.no_verify,
        naive: args.no_cache,
    };
    let mut cache = ExpertCache::new(&pack, &opts)?;
    if expert_budget.is_none() && !args.no_cache {
        cache.warm_all(&pack)?;
    }
    let streaming = expert_budget.is_some() || args.no_cache;
    if let Some(t) = args.skip_uncached {
        if !(0.0..=1.0).contains(&t) {
            bail!("--skip-uncached {t}: give a routing weight between 0 and 1");
        }
    }
    let mut experts = StreamingExperts::new(
        &pack,
        cache,
        cfg.num_experts,
        !args.no_prefetch && !args.no_cache && streaming,
    )
    .skip_uncached(args.skip_uncached);
    if experts.min_slots() < cfg.num_experts_per_tok {
        let cause = match (&args.mem_budget, &args.expert_budget) {
            (Some(b), _) => BudgetCause::Mem {
                text: b.text.clone(),
                dense_and_margin: weights.bytes + margin,
            },
            (None, Some(b)) => BudgetCause::Expert {
                text: b.text.clone(),
            },
            (None, None) => BudgetCause::None,
        };
        bail!(
            "{}",
            too_few_slots(
                &cause,
                expert_budget,
                &experts.cache().pool_sizes(),
                cfg.num_experts_per_tok,
                (pack.hidden_size(), pack.intermediate_size()),
            )
        );
    }

    let text = if args.raw {
        prompt.clone()
    } else {
        match open::chat_template(&pack) {
            Some(template) => render_chat(&template, &prompt, &pack)?,
            None => prompt.clone(),
        }
    };
    let ids = tokenizer
        .encode(text.as_str(), false)
        .map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?
        .get_ids()
        .to_vec();
    let gen_opts = GenerateOptions {
        max_tokens: args.max_tokens,
        sampler: SamplerOptions {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            seed: args.seed,
        },
        // One chunk must not route to more distinct experts than the smallest pool holds.
        // Under a budget a chunk may route to more experts than fit: the store then loads and
        // runs them group by group, each expert read at most once per chunk.
        prefill_chunk,
        eos: cfg.eos_token_ids.clone(),
        host_sampling: args.sync_baseline,
    };
    let mut stdout = std::io::stdout().lock();
    let mut text = TextStream::new(&tokenizer);
    let first_token = std::rc::Rc::new(std::cell::Cell::new(false));
    // Process CPU seconds at the start, at the first token and at the end: under load from
    // other processes they measure the work of each phase more steadily than wall time.
    let cpu_start = process_cpu_s();
    let mut cpu_first = None;
    // Every expert resident: route on the device, with no host round trip per layer.
    let mut resident = if streaming || args.sync_baseline {
        None
    } else {
        flashpack::run::stream::resident_store(
            experts.cache(),
            &cfg.sparse_layers(),
            cfg.num_experts,
        )?
    };
    let mut phases = PhaseMarker {
        inner: &mut experts,
        first_token: first_token.clone(),
        at_first_token: None,
    };
    let store: &mut dyn ExpertStore = match resident.as_mut() {
        Some(r) => r,
        None => &mut phases,
    };
    let progress = PromptProgress::new(prompt_progress_after(), !args.json);
    let (_, stats) = generate_reporting(&model, store, &ids, &gen_opts, &progress, |id| {
        if !first_token.get() {
            cpu_first = Some(process_cpu_s());
        }
        first_token.set(true);
        if let Some(piece) = text.push(id) {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        }
        true
    })?;
    if let Some(rest) = text.finish() {
        let _ = stdout.write_all(rest.as_bytes());
    }
    let generated = text.ids;
    let _ = writeln!(stdout);
    let _ = stdout.flush();
    let cpu_end = process_cpu_s();
    if stats.stop_reason == "context" {
        eprintln!(
            "note: generation stopped at the model's context length ({} tokens)",
            cfg.max_position_embeddings.unwrap_or(0)
        );
    }
    let at_first_token = phases.at_first_token.take();
    let cache_stats = experts.cache_stats();
    let stream = experts.stats.clone();
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
        "read_decode_gb_per_s": cache_stats.bytes_read as f64 / 1e6 / cache_stats.read_decode_ms.max(1e-9),
    });
    let report = serde_json::json!({
        "generation": stats,
        // The generated token ids, in order (the text on stdout is their decoding).
        "token_ids": generated,
        "peak_rss_bytes": peak_rss(),
        // MLX's allocator: live array bytes at the end and at most (device memory on a GPU).
        "mlx_active_bytes": flashpack::mlx::active_memory(),
        "mlx_peak_bytes": flashpack::mlx::peak_memory(),
        "dense_bytes": weights.bytes,
        "expert_cache": cache_stats,
        "stream": stream,
        "derived": derived,
        "budget_bytes": budget,
        "expert_budget_bytes": expert_budget,
        "all_experts_bytes": all_experts,
        "margin_bytes": margin,
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
        if streaming {
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

/// Passes routing through, and snapshots the read counters at the first forward call after the
/// first token (the end of the prefill), so the decode phase can be reported on its own.
struct PhaseMarker<'a, 'p> {
    inner: &'a mut StreamingExperts<'p>,
    first_token: std::rc::Rc<std::cell::Cell<bool>>,
    at_first_token: Option<serde_json::Value>,
}

impl ExpertStore for PhaseMarker<'_, '_> {
    fn route(
        &mut self,
        layer: usize,
        indices: &flashpack::mlx::Array,
    ) -> Result<Vec<PoolRoute<'_>>, ComputeError> {
        self.mark();
        self.inner.route(layer, indices)
    }

    fn route_scored(
        &mut self,
        layer: usize,
        routing: &Routing,
    ) -> Result<(Vec<PoolRoute<'_>>, Option<flashpack::mlx::Array>), ComputeError> {
        self.mark();
        self.inner.route_scored(layer, routing)
    }

    fn mix(
        &mut self,
        layer: usize,
        x: &flashpack::mlx::Array,
        routing: &Routing,
    ) -> Result<Option<flashpack::mlx::Array>, ComputeError> {
        self.mark();
        self.inner.mix(layer, x, routing)
    }

    fn wants_prediction(&self) -> bool {
        self.inner.wants_prediction()
    }

    fn predict(
        &mut self,
        layer: usize,
        indices: &flashpack::mlx::Array,
    ) -> Result<(), ComputeError> {
        self.inner.predict(layer, indices)
    }
}

impl PhaseMarker<'_, '_> {
    fn mark(&mut self) {
        if self.at_first_token.is_none() && self.first_token.get() {
            let c = self.inner.cache_stats();
            self.at_first_token = Some(serde_json::json!({
                "bytes_read": c.bytes_read,
                "experts_loaded": c.experts_loaded,
                "misses": c.misses_per_layer.values().sum::<u64>(),
                "hits": c.hits_per_layer.values().sum::<u64>(),
                "read_decode_ms": c.read_decode_ms,
                "stall_ms": self.inner.stats.stall_ms,
            }));
        }
    }
}

/// Applies a Hugging Face chat template to one user message.
fn render_chat(
    template: &str,
    prompt: &str,
    pack: &flashpack::format::Pack,
) -> anyhow::Result<String> {
    let token = |key: &str| -> String { pack.meta().special_token(key).unwrap_or("").to_string() };
    let mut env = minijinja::Environment::new();
    env.add_template("chat", template)
        .context("the pack's chat template does not parse; use --raw")?;
    let ctx = minijinja::context! {
        messages => vec![minijinja::context! { role => "user", content => prompt }],
        add_generation_prompt => true,
        bos_token => token("bos_token"),
        eos_token => token("eos_token"),
    };
    env.get_template("chat")?
        .render(ctx)
        .context("the pack's chat template failed to render; use --raw")
}

/// The text of generated ids as it streams: [`TextStream::push`] gives what is new since the
/// last piece, holding back a trailing incomplete UTF-8 sequence (which decodes to U+FFFD) until
/// its next byte arrives; [`TextStream::finish`] gives what is left, a final incomplete sequence
/// as U+FFFD. All pieces together equal `tokenizer.decode(ids)`, as mlx-lm prints.
struct TextStream<'a> {
    tokenizer: &'a tokenizers::Tokenizer,
    ids: Vec<u32>,
    printed: usize,
}

impl<'a> TextStream<'a> {
    fn new(tokenizer: &'a tokenizers::Tokenizer) -> Self {
        TextStream {
            tokenizer,
            ids: Vec::new(),
            printed: 0,
        }
    }

    fn push(&mut self, id: u32) -> Option<String> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids, false).ok()?;
        if text.ends_with('\u{FFFD}') {
            return None;
        }
        self.piece(text)
    }

    fn finish(&mut self) -> Option<String> {
        let text = self.tokenizer.decode(&self.ids, false).ok()?;
        self.piece(text)
    }

    fn piece(&mut self, text: String) -> Option<String> {
        let rest = text
            .get(self.printed..)
            .filter(|r| !r.is_empty())?
            .to_string();
        self.printed = text.len();
        Some(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// "The 中" in the bundled tokenizer is The, Ġ, then the three byte tokens of 中
    /// (0xE4 0xB8 0xAD): the partial character is held back until complete, and a generation
    /// that stops inside it ends with U+FFFD, as `decode` gives it.
    #[test]
    fn streamed_text_holds_back_partial_characters_and_flushes_the_tail() {
        let tok = tokenizers::Tokenizer::from_file(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fixtures/qwen3moe-tiny/tokenizer.json"),
        )
        .unwrap();
        let ids = tok.encode("The 中", false).unwrap().get_ids().to_vec();
        assert_eq!(ids.len(), 5, "{ids:?}");
        let mut s = TextStream::new(&tok);
        let pieces: Vec<Option<String>> = ids.iter().map(|&i| s.push(i)).collect();
        assert_eq!(pieces[0].as_deref(), Some("The"));
        assert_eq!(pieces[1].as_deref(), Some(" "));
        assert_eq!((&pieces[2], &pieces[3]), (&None, &None), "held back");
        assert_eq!(pieces[4].as_deref(), Some("中"));
        assert_eq!(s.finish(), None);
        // Stopped after the first byte of the character: the tail is flushed as U+FFFD.
        let mut s = TextStream::new(&tok);
        let mut out = String::new();
        for &i in &ids[..3] {
            out.extend(s.push(i));
        }
        out.extend(s.finish());
        assert_eq!(out, tok.decode(&ids[..3], false).unwrap());
        assert!(out.ends_with('\u{FFFD}'), "{out:?}");
    }

    const POOL: PoolSize = PoolSize {
        bits: flashpack::format::ProjBits::uniform(4),
        slots: 3,
        stored: 192,
        slot_bytes: 50_000,
    };

    #[test]
    fn too_few_slots_names_the_option_that_sized_the_cache() {
        let msg = too_few_slots(
            &BudgetCause::Expert { text: "1MB".into() },
            Some(150_000),
            &[POOL],
            8,
            (256, 128),
        );
        assert!(msg.starts_with("--expert-budget 1MB gives"), "{msg}");
        assert!(!msg.contains("--mem-budget"), "{msg}");
        assert!(
            msg.contains(
                "room for 3 of its 4-bit experts (0.1 MB each: hidden 256 x expert width 128"
            ),
            "{msg}"
        );
        assert!(msg.contains("fewer than the 8 one token uses"), "{msg}");
        // 8 slots of 192 experts' share: 8 * 192 * 50 kB / 192.
        assert!(
            msg.ends_with("raise --expert-budget to at least 0.4 MB"),
            "{msg}"
        );

        let msg = too_few_slots(
            &BudgetCause::Mem {
                text: "40MB".into(),
                dense_and_margin: 39_850_000,
            },
            Some(150_000),
            &[POOL],
            8,
            (256, 128),
        );
        assert!(
            msg.starts_with("--mem-budget 40MB leaves 0.1 MB for experts after 39.9 MB"),
            "{msg}"
        );
        assert!(
            msg.ends_with("raise --mem-budget to at least 40.2 MB"),
            "{msg}"
        );

        // No budget: every stored expert has a slot, so only a config whose top-k exceeds the
        // stored experts gets here, and the message says so instead of blaming a budget.
        let all = PoolSize {
            slots: 4,
            stored: 4,
            ..POOL
        };
        let msg = too_few_slots(&BudgetCause::None, None, &[all], 8, (256, 128));
        assert!(!msg.contains("budget"), "{msg}");
        assert!(
            msg.contains("routes each token to 8 experts") && msg.contains("stores only 4"),
            "{msg}"
        );
    }
}
