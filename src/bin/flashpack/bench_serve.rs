//! `flashpack bench serve PACK`: what the engine and the server cost, as ratios.
//!
//! - Prefix reuse: the time to first token of an agent's second turn (a long history, the
//!   model's answer, a new question) with the first turn in the KV cache, against a cold cache;
//!   and the same for one of two conversations that alternate (the other's turn in between).
//! - Server overhead: the time per streamed token a client sees (gaps between SSE chunks of a
//!   greedy `/v1/completions` stream on loopback) against the engine's own decode time per token
//!   in the same request (its `timings`).
//! - Batching: one pipelined decode step of 2, 4, ... sequences against one, through the engine's
//!   store (what a batched server could gain; docs/decisions/0009-serve-queue-no-batching.md).
//!   `--batch-only` times just that (`scripts/bench_gpu.sh batch`, on the GPU).
//!
//! Medians of `--reps` runs; a Markdown table (or JSON) on stdout.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use flashpack::progress::Silent;
use flashpack::run::engine::{Engine, EngineOptions, Request};
use flashpack::run::sample::SamplerOptions;
use flashpack::run::template::Message;
use flashpack::serve::{serve, ServeOptions};

#[derive(Args, Debug)]
pub struct ServeBenchArgs {
    /// The .flashpack file.
    pub pack: PathBuf,
    /// Tokens of conversation history before the second turn.
    #[arg(long, default_value_t = 1000)]
    pub history: usize,
    /// Tokens streamed per request for the overhead measurement.
    #[arg(long, default_value_t = 64)]
    pub tokens: usize,
    /// Runs per measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Print JSON instead of a Markdown table.
    #[arg(long)]
    pub json: bool,
    /// Batch sizes whose pipelined decode step is timed (comma-separated; 1 is always timed, as
    /// the reference of the throughput ratios).
    #[arg(long, value_delimiter = ',', default_value = "1,2",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_sizes: Vec<u64>,
    /// Only the batching rows (no prefix reuse, no server): what `scripts/bench_gpu.sh batch`
    /// runs on the GPU.
    #[arg(long)]
    pub batch_only: bool,
}

/// Decode step times per batch size (ms, medians of `reps`), batch 1 first.
fn batch_steps(engine: &mut Engine, args: &ServeBenchArgs) -> Result<Vec<(usize, f64)>> {
    let mut sizes: Vec<usize> = std::iter::once(1)
        .chain(args.batch_sizes.iter().map(|&b| b as usize))
        .collect();
    sizes.sort_unstable();
    sizes.dedup();
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); sizes.len()];
    // Interleaved: each repetition times every size once.
    for _ in 0..args.reps.max(1) {
        for (i, &b) in sizes.iter().enumerate() {
            times[i].push(engine.batch_step_ms(b, 32)?);
        }
    }
    Ok(sizes
        .into_iter()
        .zip(times.into_iter().map(median))
        .collect())
}

fn batch_json(steps: &[(usize, f64)]) -> serde_json::Value {
    let one = steps[0].1;
    serde_json::Value::Array(
        steps
            .iter()
            .map(|&(b, ms)| {
                serde_json::json!({
                    "sequences": b,
                    "step_ms": ms,
                    "tokens_per_s": b as f64 * 1e3 / ms,
                    "throughput_vs_1": b as f64 * one / ms,
                })
            })
            .collect(),
    )
}

fn print_batch_rows(steps: &[(usize, f64)]) {
    let one = steps[0].1;
    for &(b, ms) in steps {
        println!("| decode step, {b} sequence(s) at once | {ms:.2} ms |");
    }
    for &(b, ms) in steps.iter().skip(1) {
        println!(
            "| throughput of {b} batched sequences vs 1 | {:.2}x |",
            b as f64 * one / ms
        );
    }
}

fn greedy(max_tokens: usize, stop: Vec<String>) -> Request {
    Request {
        max_tokens,
        sampler: SamplerOptions::default(),
        logprobs: None,
        stop,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Sentences for a deterministic history of user questions and assistant answers.
const TOPICS: [&str; 8] = [
    "the history of Rome and its emperors",
    "how rivers shape the land around them",
    "the first printing presses in Europe",
    "why the seasons change through the year",
    "the trade routes across the desert",
    "how ships found their way at sea",
    "the music of the old royal courts",
    "the building of the great cathedrals",
];

/// A conversation of at least `tokens` tokens: a system prompt, then question/answer turns.
fn history(engine: &Engine<'_>, tokens: usize) -> Result<Vec<Message>> {
    history_from(engine, tokens, 0)
}

/// [`history`] whose questions start at topic `first` (another conversation with the same
/// system prompt).
fn history_from(engine: &Engine<'_>, tokens: usize, first: usize) -> Result<Vec<Message>> {
    let mut messages = vec![Message::new(
        "system",
        "You are a patient teacher who answers questions about history and nature.",
    )];
    let mut i = first;
    while engine.encode_chat(&messages)?.len() < tokens {
        let topic = TOPICS[i % TOPICS.len()];
        messages.push(Message::new("user", &format!("Tell me about {topic}.")));
        messages.push(Message::new(
            "assistant",
            &format!(
                "Here is what is known about {topic}. The records are old, and each tells part of the story; \
                 taken together they show how people lived, worked and thought in those times."
            ),
        ));
        i += 1;
    }
    messages.push(Message::new("user", "Summarise what we said so far."));
    Ok(messages)
}

struct Prefix {
    cold_s: f64,
    warm_s: f64,
    history_tokens: usize,
    cached: usize,
    prompt: usize,
}

fn prefix_reuse(engine: &mut Engine<'_>, args: &ServeBenchArgs) -> Result<Prefix> {
    let first = history(engine, args.history)?;
    second_turn(engine, args, &first, None)
}

/// Two conversations that alternate (issue 27, item 4): conversation A's first turn, then B's,
/// then A's second turn, whose time to first token is measured with the other conversations'
/// store (`--prompt-cache-bytes`, serve's default) and after a reset (cold).
fn alternating(engine: &mut Engine<'_>, args: &ServeBenchArgs) -> Result<Prefix> {
    let a = history_from(engine, args.history, 0)?;
    let b = history_from(engine, args.history, TOPICS.len() / 2)?;
    second_turn(engine, args, &a, Some(&b))
}

/// The time to first token of `first`'s second turn (the history, the answer and a new
/// question) after its first turn (and `between`'s, when given), against a reset engine.
fn second_turn(
    engine: &mut Engine<'_>,
    args: &ServeBenchArgs,
    first: &[Message],
    between: Option<&[Message]>,
) -> Result<Prefix> {
    let stops = engine.template().stops();
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    let (mut cached, mut prompt, mut history_tokens) = (0, 0, 0);
    for _ in 0..args.reps {
        // Turn one fills the cache; turn two is the history, the answer and a new question.
        engine.reset();
        let ids = engine.encode_chat(first)?;
        history_tokens = ids.len();
        let answer = engine.complete(&ids, &greedy(16, stops.clone()), |_| true)?;
        if let Some(other) = between {
            let ids = engine.encode_chat(other)?;
            engine.complete(&ids, &greedy(16, stops.clone()), |_| true)?;
        }
        let mut second = first.to_vec();
        second.push(Message::new("assistant", &answer.text));
        second.push(Message::new("user", "And what happened next?"));
        let ids2 = engine.encode_chat(&second)?;
        let w = engine.generate(&ids2, &greedy(1, Vec::new()), &Silent, |_| true)?;
        warm.push(w.generation.stats.time_to_first_token_s);
        cached = w.generation.cached_tokens;
        prompt = ids2.len();
        engine.reset();
        let c = engine.generate(&ids2, &greedy(1, Vec::new()), &Silent, |_| true)?;
        cold.push(c.generation.stats.time_to_first_token_s);
    }
    Ok(Prefix {
        cold_s: median(cold),
        warm_s: median(warm),
        history_tokens,
        cached,
        prompt,
    })
}

/// One streamed greedy completion: (client ms per token between the first and last chunk,
/// the engine's ms per token, tokens).
fn stream_once(addr: SocketAddr, prompt: &str, tokens: usize) -> Result<(f64, f64, usize)> {
    let body = serde_json::json!({
        "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": true,
    })
    .to_string();
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut reader = BufReader::new(s);
    let mut arrivals = Vec::new();
    let mut engine_ms = None;
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        let text = String::from_utf8_lossy(&line);
        let Some(data) = text.trim_end().strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: serde_json::Value = serde_json::from_str(data)?;
        if let Some(e) = v.get("error") {
            bail!("the server answered an error: {e}");
        }
        if v["choices"][0]["text"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
        {
            arrivals.push(Instant::now());
        }
        if let Some(ms) = v["timings"]["predicted_per_token_ms"].as_f64() {
            engine_ms = Some(ms);
        }
    }
    let (Some(first), Some(last)) = (arrivals.first(), arrivals.last()) else {
        bail!("the stream carried no text");
    };
    let n = arrivals.len();
    if n < 2 {
        bail!("the stream carried {n} text chunk(s); use a prompt that generates more");
    }
    let client_ms = (*last - *first).as_secs_f64() * 1e3 / (n - 1) as f64;
    Ok((
        client_ms,
        engine_ms.context("the stream had no timings")?,
        n,
    ))
}

pub fn run(args: ServeBenchArgs) -> Result<()> {
    let (pack, cfg, weights) = flashpack::run::open::open(&args.pack, true)
        .with_context(|| format!("cannot open {}", args.pack.display()))?;
    let opts = EngineOptions {
        // serve's default store of other conversations (`--prompt-cache-bytes`).
        prompt_cache_bytes: 2 << 30,
        ..EngineOptions::default()
    };
    let mut engine = Engine::new(&pack, &cfg, &weights, &opts, &flashpack::progress::Warnings)?;
    // ms per decode step of 1, 2, ... sequences at once, through the engine's store.
    let steps = batch_steps(&mut engine, &args)?;
    if args.batch_only {
        if args.json {
            println!(
                "{}",
                serde_json::json!({"batch": batch_json(&steps), "reps": args.reps})
            );
        } else {
            println!("| measure | value |");
            println!("|---|---|");
            print_batch_rows(&steps);
        }
        return Ok(());
    }
    let prefix = prefix_reuse(&mut engine, &args)?;
    let alt = alternating(&mut engine, &args)?;
    drop(engine);

    // The server, on loopback, in this process (its engine on its own thread).
    let (tx, rx) = std::sync::mpsc::channel();
    let mut serve_opts = ServeOptions::new(args.pack.clone());
    serve_opts.port = 0;
    std::thread::spawn(move || {
        let failed = serve(serve_opts, |addr| {
            let _ = tx.send(Ok(addr));
        });
        if let Err(e) = failed {
            let _ = tx.send(Err(e.to_string()));
        }
    });
    let addr = match rx.recv() {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => bail!("the server did not start: {e}"),
        Err(_) => bail!("the server did not start"),
    };
    let (mut client, mut inside, mut streamed) = (Vec::new(), Vec::new(), 0);
    for _ in 0..args.reps {
        let (c, e, n) = stream_once(addr, "The history of", args.tokens)?;
        client.push(c);
        inside.push(e);
        streamed = n;
    }
    let (client_ms, engine_ms) = (median(client), median(inside));
    let overhead = client_ms / engine_ms - 1.0;
    let speedup = prefix.cold_s / prefix.warm_s;
    let report = serde_json::json!({
        "prefix_reuse": {
            "history_tokens": prefix.history_tokens,
            "second_turn_prompt_tokens": prefix.prompt,
            "cached_tokens": prefix.cached,
            "ttft_cold_s": prefix.cold_s,
            "ttft_warm_s": prefix.warm_s,
            "speedup": speedup,
        },
        "alternating": {
            "history_tokens": alt.history_tokens,
            "second_turn_prompt_tokens": alt.prompt,
            "cached_tokens": alt.cached,
            "ttft_cold_s": alt.cold_s,
            "ttft_warm_s": alt.warm_s,
            "speedup": alt.cold_s / alt.warm_s,
        },
        "server": {
            "streamed_tokens": streamed,
            "client_ms_per_token": client_ms,
            "engine_ms_per_token": engine_ms,
            "overhead": overhead,
        },
        "batch": batch_json(&steps),
        "reps": args.reps,
    });
    if args.json {
        println!("{report}");
        return Ok(());
    }
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| second turn, time to first token, cold cache ({} prompt tokens) | {:.3} s |",
        prefix.prompt, prefix.cold_s
    );
    println!(
        "| second turn, time to first token, prefix reuse ({} of {} cached) | {:.3} s |",
        prefix.cached, prefix.prompt, prefix.warm_s
    );
    println!("| prefix reuse speedup | {speedup:.1}x |");
    println!(
        "| two alternating conversations, A's second turn after B's first: cold ({} prompt tokens) | {:.3} s |",
        alt.prompt, alt.cold_s
    );
    println!(
        "| the same, from the kept prompts ({} of {} cached) | {:.3} s |",
        alt.cached, alt.prompt, alt.warm_s
    );
    println!(
        "| alternating conversations speedup | {:.1}x |",
        alt.cold_s / alt.warm_s
    );
    println!("| decode per token, engine | {engine_ms:.2} ms |");
    println!("| decode per token, seen by an SSE client | {client_ms:.2} ms |");
    println!(
        "| server overhead per streamed token | {:.2}% |",
        overhead * 100.0
    );
    print_batch_rows(&steps);
    Ok(())
}
