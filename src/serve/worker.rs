//! The engine's thread: it owns the pack and the [`Engine`], and runs queued jobs in arrival
//! order: one at a time, or up to `--decode-concurrency` at once (continuous batching: a job
//! is prefilled alone, then joins the running ones between decode steps, and leaves when it
//! ends).
//!
//! In: [`Job`]s from a bounded queue (the HTTP side answers 429 when it is full). Out: per job,
//! [`Event`]s on the job's own channel: `Started`, `Piece`s, then `Done` or `Error`.
//! Invariant: each job's events come in order on its own channel, and its tokens are those it
//! gets alone (each sequence attends over its own KV cache); a job whose client has gone (its
//! channel closed) stops at its next token, or during the prefill at the next layer it
//! reaches, and one that went while queued never starts. Why and when to batch:
//! docs/decisions/0009-serve-queue-no-batching.md.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::progress::Warnings;
use crate::run::engine::{
    Completion, Engine, EngineError, EngineLane, EngineOptions, Piece, Request,
};
use crate::run::pressure::{PressureStatus, PressureWatch};

use super::openai::{ApiError, Prompt};
use super::tools::ToolFormat;
use crate::run::template::RenderOptions;

/// One request for the engine.
pub struct Job {
    pub prompt: Prompt,
    pub request: Request,
    /// Chat requests add the template's own stop strings (the plain transcript's `\nUser:`).
    pub chat: bool,
    /// Tools and the reasoning switch for the template (chat requests).
    pub render: RenderOptions,
    /// Only count the prompt's tokens (`/v1/messages/count_tokens`): `Started` and no more.
    pub count_only: bool,
    pub events: mpsc::UnboundedSender<Event>,
}

/// What a job's client hears, in this order: `Started` (or `Error`), `Piece`s, `Done` (or
/// `Error`).
#[derive(Debug)]
pub enum Event {
    /// The prompt was taken: its length, and how much of it the KV cache gives.
    Started {
        prompt_tokens: usize,
        cached_tokens: usize,
    },
    Piece(Piece),
    Done(Box<Completion>),
    Error(ApiError),
}

/// What the engine told the HTTP side once it was ready.
#[derive(Clone, Debug)]
pub struct Ready {
    /// The longest sequence a request may reach (`Engine::max_sequence`).
    pub context: usize,
    /// How the model writes tool calls (from the model type and the template).
    pub tool_format: ToolFormat,
    /// Whether the template has a reasoning switch (`enable_thinking`).
    pub thinking_switch: bool,
}

/// Counters `/health` shows.
#[derive(Debug, Default)]
pub struct Counters {
    pub queued: AtomicU64,
    pub busy: AtomicBool,
    /// Requests being decoded now (at most `--decode-concurrency`).
    pub running: AtomicU64,
    pub completed: AtomicU64,
    pub cancelled: AtomicU64,
    /// Requests that failed in the server (5xx).
    pub failed: AtomicU64,
    /// Requests the engine refused as the client's mistake (4xx: a prompt too long, ...).
    pub rejected: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub cached_tokens: AtomicU64,
    /// The engine's memory-pressure status, as it updates it (set once the engine is built,
    /// when it watches).
    pub pressure: std::sync::OnceLock<Arc<std::sync::Mutex<PressureStatus>>>,
}

/// How often an idle engine looks at the system's memory (it looks once per forward pass
/// while it works).
pub const IDLE_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// How the engine is built, and the prompt limit.
pub struct WorkerOptions {
    pub pack: PathBuf,
    pub engine: EngineOptions,
    /// Longest prompt in tokens (within the model's context).
    pub max_prompt_tokens: usize,
    /// Jobs decoded at once (1: one at a time).
    pub decode_concurrency: usize,
    /// Rank 0 of a pipeline: this stage's layers alone, and a fresh KV cache per job.
    pub stage: Option<crate::run::engine::Stage>,
}

/// Runs on its own thread until the queue's senders are gone: opens the pack, reports through
/// `ready`, then serves jobs. An error before it is ready goes to `ready` as text.
pub fn run(
    opts: WorkerOptions,
    mut jobs: mpsc::Receiver<Job>,
    counters: Arc<Counters>,
    ready: oneshot::Sender<Result<Ready, String>>,
) {
    let opened = match &opts.stage {
        None => crate::run::open::open(&opts.pack, opts.engine.verify),
        Some(stage) => crate::run::open::open_stage(&opts.pack, opts.engine.verify, &stage.layers),
    };
    let (pack, cfg, weights) = match opened {
        Ok(o) => o,
        Err(e) => {
            let _ = ready.send(Err(format!(
                "cannot serve {}: {}",
                opts.pack.display(),
                chain(&e)
            )));
            return;
        }
    };
    let built = Engine::new_stage(
        &pack,
        &cfg,
        &weights,
        &opts.engine,
        &Warnings,
        opts.stage.clone(),
    );
    let mut engine = match built {
        Ok(e) => e,
        Err(e) => {
            let _ = ready.send(Err(chain(&e)));
            return;
        }
    };
    drop(weights);
    match PressureWatch::from_env() {
        Ok(watch) => engine.watch_pressure(watch),
        Err(e) => {
            let _ = ready.send(Err(chain(&e)));
            return;
        }
    }
    if let Some(handle) = engine.pressure_handle() {
        let _ = counters.pressure.set(handle);
    }
    let context = engine.max_sequence();
    let tool_format = ToolFormat::detect(
        engine.config().arch.model_type(),
        engine.template().source(),
        engine.harmony(),
    );
    let thinking_switch = engine.template().has_thinking_switch();
    if ready
        .send(Ok(Ready {
            context,
            tool_format,
            thinking_switch,
        }))
        .is_err()
    {
        return;
    }
    let max_sequence = engine.max_sequence();
    let max_prompt = opts.max_prompt_tokens.min(max_sequence.saturating_sub(1));
    let concurrency = if opts.decode_concurrency > 1 && !engine.batches() {
        eprintln!(
            "note: {} decodes one request at a time (--decode-concurrency {} needs a model whose layers pass one hidden state)",
            engine.config().arch,
            opts.decode_concurrency
        );
        1
    } else {
        opts.decode_concurrency.max(1)
    };
    // Waiting for a job, a watching engine looks at the system's memory every IDLE_POLL: a
    // server left idle gives memory back while other programs need it.
    let idle = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .ok()
        .filter(|_| engine.pressure_status().is_some());
    let next_job = |engine: &mut Engine<'_>, jobs: &mut mpsc::Receiver<Job>| loop {
        match &idle {
            Some(rt) => {
                match rt.block_on(async { tokio::time::timeout(IDLE_POLL, jobs.recv()).await }) {
                    Ok(job) => return job,
                    Err(_) => {
                        if let Err(e) = engine.relieve_pressure(&Warnings) {
                            eprintln!("warning: memory pressure: {}", chain(&e));
                        }
                    }
                }
            }
            None => return jobs.blocking_recv(),
        }
    };
    let serving = Serving {
        counters: &counters,
        pack: &opts.pack,
        max_prompt,
    };
    if concurrency > 1 {
        // Jobs that came while others run join them between steps.
        let mut running: Vec<Running> = Vec::new();
        let mut open = true;
        while open || !running.is_empty() {
            while open && running.len() < concurrency {
                let job = if running.is_empty() {
                    next_job(&mut engine, &mut jobs)
                } else {
                    match jobs.try_recv() {
                        Ok(job) => Some(job),
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => None,
                    }
                };
                let Some(job) = job else {
                    open = false;
                    break;
                };
                if let Some(r) = serving.admit(&mut engine, job) {
                    running.push(r);
                }
            }
            serving.step(&mut engine, &mut running);
        }
        return;
    }
    while let Some(job) = next_job(&mut engine, &mut jobs) {
        if !serving.take(&job) {
            continue;
        }
        // A panic is a bug, but it must not take the server down: the job fails, the KV cache
        // is dropped (it may hold half a step), and the next job runs.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if opts.stage.is_some() {
                engine.reset();
            }
            serve_job(&mut engine, &job, max_prompt)
        }));
        let outcome = outcome.unwrap_or_else(|_| {
            engine.reset();
            Err(engine_bug())
        });
        serving.account(&job, outcome);
        counters.running.fetch_sub(1, Ordering::Relaxed);
        counters.busy.store(false, Ordering::Relaxed);
    }
}

/// A job being decoded beside others.
struct Running {
    job: Job,
    lane: EngineLane,
}

/// What the loops share: the counters, and how an outcome is told.
struct Serving<'a> {
    counters: &'a Counters,
    pack: &'a std::path::Path,
    max_prompt: usize,
}

/// What a panic in the engine tells the client.
fn engine_bug() -> ApiError {
    ApiError::server("the engine failed on this request (a bug: please report it with the request)")
}

impl Serving<'_> {
    /// Takes `job` off the queue; `false` when its client went away while it waited.
    fn take(&self, job: &Job) -> bool {
        let c = self.counters;
        c.queued.fetch_sub(1, Ordering::Relaxed);
        if job.events.is_closed() {
            c.cancelled.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        c.running.fetch_add(1, Ordering::Relaxed);
        c.busy.store(true, Ordering::Relaxed);
        true
    }

    /// Counts `outcome` and tells the client (a cancelled job's client is gone).
    fn account(&self, job: &Job, outcome: Result<Completion, ApiError>) {
        let counters = self.counters;
        match outcome {
            Ok(_) if job.count_only => {
                counters.completed.fetch_add(1, Ordering::Relaxed);
            }
            Ok(c) if c.finish == crate::run::engine::Finish::Cancelled => {
                counters.cancelled.fetch_add(1, Ordering::Relaxed);
                counters
                    .generated_tokens
                    .fetch_add(c.completion_tokens as u64, Ordering::Relaxed);
            }
            Ok(c) => {
                counters.completed.fetch_add(1, Ordering::Relaxed);
                counters
                    .generated_tokens
                    .fetch_add(c.completion_tokens as u64, Ordering::Relaxed);
                counters
                    .prompt_tokens
                    .fetch_add(c.prompt_tokens as u64, Ordering::Relaxed);
                counters
                    .cached_tokens
                    .fetch_add(c.cached_tokens as u64, Ordering::Relaxed);
                let _ = job.events.send(Event::Done(Box::new(c)));
            }
            Err(e) => {
                let counter = if e.status < 500 {
                    &counters.rejected
                } else {
                    &counters.failed
                };
                counter.fetch_add(1, Ordering::Relaxed);
                let _ = job.events.send(Event::Error(without_path(e, self.pack)));
            }
        }
    }

    /// Ends a job that is not running: counts and tells its outcome.
    fn end(&self, job: &Job, outcome: Result<Completion, ApiError>) {
        self.account(job, outcome);
        self.counters.running.fetch_sub(1, Ordering::Relaxed);
    }

    /// Takes `job`, checks it and prefills it into a lane; `None` when it is already over
    /// (refused, counted only, cancelled, or failed: told to its client).
    fn admit(&self, engine: &mut Engine<'_>, job: Job) -> Option<Running> {
        if !self.take(&job) {
            return None;
        }
        let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let (ids, request) = match prepare(engine, &job, self.max_prompt)? {
                Prepared::Ready(ids, request) => (ids, request),
                Prepared::Over(c) => return Ok(Err(*c)),
            };
            let events = &job.events;
            match engine.start_lane(&ids, &request, &Warnings, &|| events.is_closed()) {
                Ok(Some(lane)) => Ok(Ok(lane)),
                Ok(None) => Ok(Err(cancelled(ids.len()))),
                Err(e) => Err(ApiError::server(chain(&e))),
            }
        }));
        match started {
            Ok(Ok(Ok(lane))) => Some(Running { job, lane }),
            Ok(Ok(Err(c))) => {
                self.end(&job, Ok(c));
                None
            }
            Ok(Err(e)) => {
                self.end(&job, Err(e));
                None
            }
            Err(_) => {
                // The lane's cache went with the panic; the other lanes hold their own.
                engine.reset();
                self.end(&job, Err(engine_bug()));
                None
            }
        }
    }

    /// One decode step of the running jobs, then each one that ended is told and leaves.
    /// A failed step fails every running job (their caches may hold half a step).
    fn step(&self, engine: &mut Engine<'_>, running: &mut Vec<Running>) {
        if running.is_empty() {
            self.counters.busy.store(false, Ordering::Relaxed);
            return;
        }
        // A client gone while its text was held back (a possible stop string) is found here.
        let mut i = 0;
        while i < running.len() {
            if running[i].job.events.is_closed() {
                let r = running.remove(i);
                let outcome = engine
                    .end_lane(r.lane, &mut |_| false)
                    .map(|mut c| {
                        c.finish = crate::run::engine::Finish::Cancelled;
                        c
                    })
                    .map_err(|e| ApiError::server(chain(&e)));
                self.end(&r.job, outcome);
            } else {
                i += 1;
            }
        }
        let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let (mut lanes, events): (Vec<&mut EngineLane>, Vec<&mpsc::UnboundedSender<Event>>) =
                running
                    .iter_mut()
                    .map(|r| (&mut r.lane, &r.job.events))
                    .unzip();
            engine.step_lanes(&mut lanes, &Warnings, &mut |i, p| {
                events[i].send(Event::Piece(p.clone())).is_ok()
            })
        }));
        let failed = match stepped {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(ApiError::server(chain(&e))),
            Err(_) => {
                engine.reset();
                Some(engine_bug())
            }
        };
        if let Some(e) = failed {
            for r in running.drain(..) {
                self.end(&r.job, Err(e.clone()));
            }
            self.counters.busy.store(false, Ordering::Relaxed);
            return;
        }
        let mut i = 0;
        while i < running.len() {
            if running[i].lane.done() {
                let r = running.remove(i);
                let events = &r.job.events;
                let outcome = engine
                    .end_lane(r.lane, &mut |p| {
                        events.send(Event::Piece(p.clone())).is_ok()
                    })
                    .map_err(|e| ApiError::server(chain(&e)));
                self.end(&r.job, outcome);
            } else {
                i += 1;
            }
        }
        if running.is_empty() {
            self.counters.busy.store(false, Ordering::Relaxed);
        }
    }
}

/// A job checked and its prompt tokenized: ready to run, or already over.
enum Prepared {
    Ready(Vec<u32>, Request),
    Over(Box<Completion>),
}

/// Tokenizes and checks `job`'s prompt within `max_prompt` tokens, and tells the client it
/// started (how much of it the prompt cache gives).
fn prepare(engine: &mut Engine<'_>, job: &Job, max_prompt: usize) -> Result<Prepared, ApiError> {
    let param = if job.chat { "messages" } else { "prompt" };
    let too_long = |n: String| {
        ApiError::invalid(
            Some(param),
            format!(
                "the prompt has {n} tokens; this server takes at most {max_prompt}: shorten it"
            ),
        )
        .with_code("context_length_exceeded")
    };
    // Tokenized within the server's limit: a long text is refused once counting passes it.
    let ids = match &job.prompt {
        Prompt::Chat(messages) => engine.encode_chat_with(messages, &job.render, max_prompt),
        Prompt::Text(t) => engine.encode_within(t, max_prompt),
        Prompt::Ids(ids) => Ok(ids.clone()),
    }
    .map_err(|e| match e {
        EngineError::PromptTooLong { at_least, .. } => too_long(format!("at least {at_least}")),
        // The template refused the conversation (`raise_exception`, a role it does not take):
        // the client's to change.
        e @ EngineError::Template(_) => ApiError::invalid(Some(param), chain(&e)),
        e => ApiError::server(chain(&e)),
    })?;
    if ids.is_empty() {
        return Err(ApiError::invalid(
            Some("prompt"),
            "the prompt is empty: send some text",
        ));
    }
    let vocab = engine.config().vocab_size;
    if let Some(id) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(ApiError::invalid(
            Some("prompt"),
            format!("token id {id} is outside the vocabulary of {vocab}"),
        ));
    }
    if ids.len() > max_prompt {
        return Err(too_long(ids.len().to_string()));
    }
    let mut request = job.request.clone();
    // The answer ends where the sequence reaches what the engine was sized for ("length").
    request.max_tokens = request
        .max_tokens
        .min(engine.max_sequence().saturating_sub(ids.len()));
    if job.chat {
        request.stop.extend(engine.template().stops());
    }
    if job
        .events
        .send(Event::Started {
            prompt_tokens: ids.len(),
            cached_tokens: engine.shared_prefix(&ids),
        })
        .is_err()
        || job.count_only
    {
        return Ok(Prepared::Over(Box::new(cancelled(ids.len()))));
    }
    Ok(Prepared::Ready(ids, request))
}

fn serve_job(
    engine: &mut Engine<'_>,
    job: &Job,
    max_prompt: usize,
) -> Result<Completion, ApiError> {
    let (ids, request) = match prepare(engine, job, max_prompt)? {
        Prepared::Ready(ids, request) => (ids, request),
        Prepared::Over(c) => return Ok(*c),
    };
    let events = &job.events;
    // A client that goes away during the prefill closes its channel: the prefill stops at the
    // next layer it reaches, not at the first token.
    engine
        .complete_until(
            &ids,
            &request,
            // Warnings only: the memory-pressure floor is said on the server's stderr.
            &Warnings,
            &|| events.is_closed(),
            |p| events.send(Event::Piece(p.clone())).is_ok(),
        )
        .map_err(|e| ApiError::server(chain(&e)))
}

fn cancelled(prompt_tokens: usize) -> Completion {
    Completion {
        reasoning: String::new(),
        text: String::new(),
        finish: crate::run::engine::Finish::Cancelled,
        stop_string: None,
        prompt_tokens,
        completion_tokens: 0,
        cached_tokens: 0,
        logprobs: Vec::new(),
        stats: Default::default(),
        tokens: Vec::new(),
        at_first_token: None,
        cpu_s: Default::default(),
    }
}

/// A server error's message names the pack by its file name: where it lies on the server is
/// none of the client's business.
fn without_path(mut e: ApiError, pack: &std::path::Path) -> ApiError {
    let name = pack
        .file_name()
        .map_or("the pack".into(), |n| n.to_string_lossy().into_owned());
    let mut paths = vec![pack.display().to_string()];
    if let Ok(abs) = std::path::absolute(pack) {
        paths.push(abs.display().to_string());
    }
    if let Ok(real) = pack.canonicalize() {
        paths.push(real.display().to_string());
    }
    paths.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in paths.iter().filter(|p| !p.is_empty()) {
        e.message = e.message.replace(p.as_str(), &name);
    }
    e
}

/// An error and its causes, joined with ": ".
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let s = c.to_string();
        if !msg.contains(&s) {
            msg.push_str(": ");
            msg.push_str(&s);
        }
        cause = c.source();
    }
    msg
}
