//! `flashpack chat PACK`: a multi-turn conversation in the terminal, streamed, through the
//! pack's chat template; the KV cache carries over between turns, so a turn computes only its
//! new tokens. `/reset` starts over, `/exit` (or end of input) quits, Ctrl-C stops the answer
//! being written and keeps the program.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use anyhow::Context;
use flashpack::arch::KvBits;
use flashpack::run::budget::Budget;
use flashpack::run::engine::{Engine, EngineError, EngineOptions, Finish, Request};
use flashpack::run::open;
use flashpack::run::sample::SamplerOptions;
use flashpack::run::template::Message;

/// The memory options `chat` and `serve` share with `run`.
#[derive(clap::Args, Clone, Debug)]
pub struct MemoryArgs {
    /// Memory for weights and the KV cache: 8GiB, 8GB, 8G (= GiB), 512MiB, or 50% (of RAM).
    /// Default: every expert resident.
    #[arg(long, value_name = "SIZE", value_parser = Budget::parse)]
    pub mem_budget: Option<Budget>,
    /// Size the expert cache directly instead: 2GiB, or 50% of all experts resident.
    #[arg(long, value_name = "SIZE", value_parser = Budget::parse, conflicts_with = "mem_budget")]
    pub expert_budget: Option<Budget>,
    /// The longest conversation, in tokens, the KV cache is sized for under --mem-budget
    /// (default: the model's context length).
    #[arg(long, value_name = "TOKENS", value_parser = at_least_one_token)]
    pub max_context: Option<usize>,
    /// Keep the KV cache's keys and values as 8- or 4-bit codes (groups of 64) from the first
    /// token, on the layers with a plain KV cache; the budget counts the smaller cache.
    #[arg(long, value_name = "BITS", value_parser = kv_bits)]
    pub kv_bits: Option<KvBits>,
    /// Do not check blake3 checksums of dense tensors and expert segments.
    #[arg(long)]
    pub no_verify: bool,
}

impl MemoryArgs {
    pub fn engine_options(&self) -> EngineOptions {
        EngineOptions {
            mem_budget: self.mem_budget.clone(),
            expert_budget: self.expert_budget.clone(),
            verify: !self.no_verify,
            positions: self.max_context.unwrap_or(usize::MAX),
            kv_bits: self.kv_bits,
            ..EngineOptions::default()
        }
    }
}

/// The sampling options of `run` and `chat`, and their one conversion to [`SamplerOptions`].
/// `K` is `--top-k` where a command has it ([`TopKArg`], `run`) and nothing where it has not
/// ([`NoTopK`], `chat`), so each command's flags stay as they were, in the same order.
#[derive(clap::Args, Clone, Debug)]
pub struct SamplingArgs<K: clap::Args + TopK> {
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[command(flatten)]
    pub top_k: K,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl<K: clap::Args + TopK> SamplingArgs<K> {
    pub fn sampler(&self) -> SamplerOptions {
        SamplerOptions {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k.top_k(),
            seed: self.seed,
        }
    }
}

/// The `--top-k` a command gives [`SamplingArgs`] (0 when it has none: every token kept).
pub trait TopK {
    fn top_k(&self) -> usize;
}

/// `--top-k`.
#[derive(clap::Args, Clone, Debug)]
pub struct TopKArg {
    /// 0 keeps all tokens.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
}

impl TopK for TopKArg {
    fn top_k(&self) -> usize {
        self.top_k
    }
}

/// No `--top-k` flag: every token is kept.
#[derive(clap::Args, Clone, Debug)]
pub struct NoTopK {}

impl TopK for NoTopK {
    fn top_k(&self) -> usize {
        0
    }
}

#[derive(clap::Args)]
pub struct ChatArgs {
    /// The .flashpack file.
    pub pack: PathBuf,
    /// A system prompt that opens the conversation (and survives /reset).
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs<NoTopK>,
    #[command(flatten)]
    pub memory: MemoryArgs,
    /// After each answer, print its counts as one JSON line on stderr (prompt, cached and
    /// generated tokens, time to first token).
    #[arg(long)]
    pub stats: bool,
}

/// `--kv-bits` (`run`, `chat`, `serve`, `eval`): 8 or 4.
pub fn kv_bits(s: &str) -> Result<KvBits, String> {
    s.parse::<u8>().ok().and_then(KvBits::new).ok_or_else(|| {
        format!(
            "{s:?}: the KV cache is quantized to 8 or 4 bits (MLX's affine codes in groups of \
                 64); give 8 or 4, or leave the flag out for bf16"
        )
    })
}

/// `--max-context`: a count of tokens, at least 1 (0 would leave no room for any prompt).
fn at_least_one_token(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("0 leaves no room for a prompt: give at least 1 token".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{e}: give a number of tokens")),
    }
}

/// Set while an answer is being written: Ctrl-C then stops it instead of the program.
static ANSWERING: AtomicBool = AtomicBool::new(false);
/// Set by Ctrl-C during an answer; the engine sees it during the prompt's prefill (between
/// layers) and the token callback after it, and stops.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    if ANSWERING.load(Ordering::SeqCst) {
        INTERRUPTED.store(true, Ordering::SeqCst);
    } else {
        // At the prompt Ctrl-C quits, as in a shell. Only async-signal-safe calls here.
        // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is static.
        unsafe {
            libc::write(2, b"\n".as_ptr().cast(), 1);
            libc::_exit(130);
        }
    }
}

const HELP: &str =
    "/reset starts a new conversation, /exit (or Ctrl-D) quits; Ctrl-C stops an answer";

pub fn run(args: ChatArgs) -> anyhow::Result<ExitCode> {
    let (pack, cfg, weights) = open::open(&args.pack, !args.memory.no_verify)
        .with_context(|| format!("cannot chat with {}", args.pack.display()))?;
    let mut engine = Engine::new(
        &pack,
        &cfg,
        &weights,
        &args.memory.engine_options(),
        &flashpack::progress::Warnings,
    )?;
    drop(weights);
    // Memory pressure shrinks the expert cache while the system is short (checked during
    // answers, once per token), and grows it back.
    engine.watch_pressure(flashpack::run::pressure::PressureWatch::from_env()?);
    // Checked before the first turn, so a bad value is not found after the user has typed.
    flashpack::run::sample::Sampler::new(args.sampling.sampler())?;
    #[cfg(unix)]
    // SAFETY: installs a handler that only touches atomics and calls write/_exit.
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
    }
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        let note = if engine.template().is_plain() {
            " (the pack has no chat template: a plain User:/Assistant: transcript)"
        } else {
            ""
        };
        eprintln!("chatting with {}{note}; {HELP}", args.pack.display());
    }
    let opening: Vec<Message> = args
        .system
        .iter()
        .map(|s| Message::new("system", s))
        .collect();
    let mut messages = opening.clone();
    let mut stdin = std::io::stdin().lock();
    let mut raw = Vec::new();
    let mut number = 0u64;
    loop {
        if interactive {
            print!(">>> ");
            let _ = std::io::stdout().flush();
        }
        raw.clear();
        if stdin
            .read_until(b'\n', &mut raw)
            .context("reading standard input")?
            == 0
        {
            break;
        }
        number += 1;
        // One bad line (piped bytes in another encoding) is that line's problem, not the
        // session's: it is skipped with a note and the next line is read.
        let line = match std::str::from_utf8(&raw) {
            Ok(l) => l,
            Err(e) => {
                eprintln!(
                    "line {number} is not valid UTF-8 (byte {} is not part of a character): skipped; send text in UTF-8",
                    e.valid_up_to() + 1
                );
                continue;
            }
        };
        let input = line.trim_end_matches(['\n', '\r']);
        match input.trim() {
            "" => continue,
            "/exit" | "/quit" | "/bye" => break,
            "/reset" => {
                messages = opening.clone();
                engine.reset();
                eprintln!("(new conversation)");
                continue;
            }
            "/help" | "/?" => {
                eprintln!("{HELP}");
                continue;
            }
            cmd if cmd.starts_with('/') => {
                eprintln!("unknown command {cmd}: {HELP}");
                continue;
            }
            _ => {}
        }
        messages.push(Message::new("user", input));
        // A conversation past the limit is refused while it is counted (issue 33, item 8).
        let (ids, tokens, fits) = match engine.encode_chat(&messages) {
            Ok(ids) => {
                let n = ids.len().to_string();
                (ids, n, true)
            }
            Err(EngineError::PromptTooLong { at_least, .. }) => {
                (Vec::new(), format!("at least {at_least}"), false)
            }
            Err(e) => return Err(e.into()),
        };
        let room = engine.max_sequence().saturating_sub(ids.len());
        if !fits || room < 2 {
            messages.pop();
            eprintln!(
                "the conversation has {tokens} tokens, and this chat holds at most {} (the model's context, or --max-context): /reset to start a new one",
                engine.max_sequence()
            );
            continue;
        }
        let req = Request {
            max_tokens: args.max_tokens.min(room - 1),
            sampler: args.sampling.sampler(),
            logprobs: None,
            stop: engine.template().stops(),
        };
        INTERRUPTED.store(false, Ordering::SeqCst);
        ANSWERING.store(true, Ordering::SeqCst);
        let mut stdout = std::io::stdout().lock();
        let prefill = PrefillStats {
            show: args.stats,
            ..PrefillStats::default()
        };
        let answer = engine.complete_until(
            &ids,
            &req,
            &prefill,
            &|| INTERRUPTED.load(Ordering::SeqCst),
            |p| {
                crate::run::show(p, &mut stdout);
                !INTERRUPTED.load(Ordering::SeqCst)
            },
        );
        ANSWERING.store(false, Ordering::SeqCst);
        let _ = writeln!(stdout);
        let _ = stdout.flush();
        drop(stdout);
        let answer = answer?;
        if answer.finish == Finish::Cancelled {
            eprintln!("(stopped)");
        }
        if args.stats {
            eprintln!(
                "{}",
                serde_json::json!({
                    "prompt_tokens": answer.prompt_tokens,
                    "cached_tokens": answer.cached_tokens,
                    "completion_tokens": answer.completion_tokens,
                    "time_to_first_token_s": answer.stats.time_to_first_token_s,
                    "decode_tokens_per_s": answer.stats.decode_tokens_per_s,
                    "finish": answer.finish,
                })
            );
        }
        messages.push(Message::new("assistant", &answer.text));
    }
    Ok(ExitCode::SUCCESS)
}

/// With `--stats`, the prompt's progress as JSON lines on stderr, one per prefill chunk:
/// `{"prefill_tokens": DONE, "of": TOTAL}` (the tokens the KV cache did not hold).
#[derive(Default)]
struct PrefillStats {
    show: bool,
    done: AtomicU64,
    of: AtomicU64,
}

impl flashpack::progress::Progress for PrefillStats {
    fn stage(&self, _name: &str, total: Option<u64>, _unit: &str) {
        self.done.store(0, Ordering::Relaxed);
        self.of.store(total.unwrap_or(0), Ordering::Relaxed);
    }
    fn advance(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        if self.show {
            eprintln!(
                "{}",
                serde_json::json!({"prefill_tokens": done, "of": self.of.load(Ordering::Relaxed)})
            );
        }
    }
    fn finish_stage(&self) {}
    fn warn(&self, msg: &str) {
        eprintln!("warning: {msg}");
    }
}
