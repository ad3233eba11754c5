//! `flashpack serve`: an OpenAI-compatible HTTP server over one [`crate::run::engine::Engine`].
//!
//! In: HTTP requests on `/v1/chat/completions`, `/v1/completions` (both streaming as
//! server-sent events, ending `data: [DONE]`, or not), OpenAI's Responses API `/v1/responses`
//! (streamed as its named events), `/v1/models` and `/health`, and Anthropic's `/v1/messages`
//! (streamed as its named events) and `/v1/messages/count_tokens`.
//! Out: OpenAI's response and error objects, and Anthropic's on its paths (`anthropic.rs`);
//! `response` objects (`responses.rs`, which keeps stored responses' conversations for
//! `previous_response_id`); tool calls read from the answer in the pack's format (`tools.rs`).
//! Invariant: requests queue for the one engine thread (`worker.rs`) in arrival order, at most
//! `max_queue` waiting (then 429 with Retry-After); a client that goes away stops its
//! generation at the next token (in the prefill, at the next layer); one that half-closes
//! after its request is answered; no request body, however malformed, panics the server: it
//! gets a 4xx with OpenAI's error object.
//!
//! Safety limits: bound to 127.0.0.1 unless told otherwise; bound to loopback, a `Host` that
//! is not a local name gets 403, and without an API key so does an `Origin` that is not local
//! (docs/decisions/0017-serve-host-and-origin.md); with an API key every request without it
//! (`Authorization: Bearer KEY` or Anthropic's `x-api-key: KEY`) gets 401; completions must be `application/json` (415); bodies over `max_body_bytes` get
//! 413, prompts over the limit 400;
//! a connection that sends no complete request head within `idle_timeout` (a new connection,
//! or a kept-alive one between requests) is closed, and so is one whose body stalls that long.

pub mod anthropic;
pub mod openai;
pub mod responses;
pub mod tools;
pub mod worker;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request as HttpRequest, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use crate::run::engine::EngineOptions;
use crate::run::engine::{Completion, Piece};
use anthropic::{MessageResponder, PackTraits};
use openai::{ApiError, Endpoint, Limits, Parsed, Responder};
use responses::{NamedEvent, ResponseStore, ResponsesResponder};
use tools::ToolFormat;
use worker::{Counters, Event, Job, WorkerOptions};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The pack could not be opened or the engine built (the message has the cause).
    #[error("{0}")]
    Engine(String),
    #[error("cannot listen on {addr}: {source}; pick another --port or --host")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot start the server's runtime: {0}")]
    Runtime(std::io::Error),
}

/// How to serve.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub pack: PathBuf,
    /// The model id clients name (`model` in requests, `/v1/models`).
    pub model: String,
    pub host: String,
    /// 0 picks a free port (the bound address is reported to `on_listen`).
    pub port: u16,
    pub api_key: Option<String>,
    pub engine: EngineOptions,
    /// Requests that may wait for the engine; one more gets 429.
    pub max_queue: usize,
    pub max_body_bytes: usize,
    pub max_prompt_tokens: usize,
    /// `max_tokens` when a request gives none (chat; completions default to 16).
    pub default_max_tokens: usize,
    pub max_tokens: usize,
    pub idle_timeout: Duration,
    /// Bytes of conversations kept for the Responses API's `previous_response_id`.
    pub response_store_bytes: u64,
    /// Requests decoded at once (continuous batching; 1: one at a time). Set
    /// `engine.sequences` to the same under a memory budget.
    pub decode_concurrency: usize,
    /// Rank 0 of a pipeline (`serve --hostfile`): the engine holds these layers and sends its
    /// last one's output down the pipeline; every request then starts from an empty KV cache
    /// (the other ranks' caches follow rank 0's positions, not its prompt cache).
    pub stage: Option<crate::run::engine::Stage>,
}

impl ServeOptions {
    /// Defaults for `pack`: 127.0.0.1:8080, no key, 64 queued, 1 MiB bodies, prompts up to the
    /// model's context, 512 tokens per answer by default and at most 32768, 30 s idle timeout,
    /// 64 MiB of stored responses.
    pub fn new(pack: PathBuf) -> ServeOptions {
        let model = pack
            .file_stem()
            .map_or("flashpack".into(), |s| s.to_string_lossy().into_owned());
        ServeOptions {
            pack,
            model,
            host: "127.0.0.1".into(),
            port: 8080,
            api_key: None,
            engine: EngineOptions::default(),
            max_queue: 64,
            max_body_bytes: 1 << 20,
            max_prompt_tokens: usize::MAX,
            default_max_tokens: 512,
            max_tokens: 32768,
            idle_timeout: Duration::from_secs(30),
            response_store_bytes: 64 << 20,
            decode_concurrency: 1,
            stage: None,
        }
    }
}

/// Most open connections; further ones wait in the listen backlog.
const MAX_CONNECTIONS: usize = 512;

struct Shared {
    opts: ServeOptions,
    limits: Limits,
    tool_format: ToolFormat,
    pack: PackTraits,
    jobs: mpsc::Sender<Job>,
    counters: Arc<Counters>,
    /// Conversations of stored responses, for `previous_response_id`.
    responses: Arc<ResponseStore>,
    requests: AtomicU64,
    started: u64,
}

/// Opens the pack, binds, reports the address to `on_listen`, and serves until SIGINT or
/// SIGTERM.
pub fn serve(opts: ServeOptions, on_listen: impl FnOnce(SocketAddr)) -> Result<(), ServeError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?;
    let (jobs_tx, jobs_rx) = mpsc::channel(opts.max_queue.max(1));
    let counters = Arc::new(Counters::default());
    let (ready_tx, ready_rx) = oneshot::channel();
    let worker_opts = WorkerOptions {
        pack: opts.pack.clone(),
        engine: opts.engine.clone(),
        max_prompt_tokens: opts.max_prompt_tokens,
        decode_concurrency: opts.decode_concurrency,
        stage: opts.stage.clone(),
    };
    let worker_counters = counters.clone();
    let worker = std::thread::Builder::new()
        .name("flashpack-engine".into())
        .spawn(move || worker::run(worker_opts, jobs_rx, worker_counters, ready_tx))
        .map_err(ServeError::Runtime)?;
    let ready = match ready_rx.blocking_recv() {
        Ok(Ok(r)) => r,
        Ok(Err(msg)) => return Err(ServeError::Engine(msg)),
        Err(_) => {
            let _ = worker.join();
            return Err(ServeError::Engine(
                "the engine thread stopped while opening the pack".into(),
            ));
        }
    };
    let limits = Limits {
        default_max_tokens: opts.default_max_tokens.min(opts.max_tokens),
        max_tokens: opts.max_tokens.min(ready.context),
    };
    let shared = Arc::new(Shared {
        opts: opts.clone(),
        limits,
        tool_format: ready.tool_format,
        pack: PackTraits {
            thinking_switch: ready.thinking_switch,
        },
        jobs: jobs_tx,
        counters,
        responses: Arc::new(ResponseStore::new(opts.response_store_bytes)),
        requests: AtomicU64::new(0),
        started: openai::now_s(),
    });
    runtime.block_on(async move {
        let addr = format!("{}:{}", opts.host, opts.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|source| ServeError::Bind {
                addr: addr.clone(),
                source,
            })?;
        let local = listener.local_addr().map_err(|source| ServeError::Bind {
            addr: addr.clone(),
            source,
        })?;
        on_listen(local);
        let names = LocalNames::new(&opts.host, local, opts.api_key.is_none());
        let app = router(shared, Arc::new(names));
        tokio::select! {
            _ = accept_loop(listener, app, opts.idle_timeout) => {}
            _ = shutdown_signal() => {}
        }
        Ok::<(), ServeError>(())
    })?;
    // Dropping the connections closes every job's channel and the queue: the engine stops at
    // its next token and its thread ends, so nothing runs once this returns (a pipeline's rank
    // 0 then tells the other ranks to stop).
    drop(runtime);
    let _ = worker.join();
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Accepts connections and serves each with hyper's HTTP/1 server, whose header-read timeout
/// closes connections idle for `idle` (axum's `serve` has no such setting).
async fn accept_loop(listener: tokio::net::TcpListener, app: Router, idle: Duration) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(_) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            // A client may shut down its sending side once its request is out (`nc -N`, some
            // proxies): it still reads the answer. A client gone altogether is found when a
            // write fails: a token, or a stream's keep-alive comment during the prefill.
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .half_close(true)
                .header_read_timeout(idle)
                .serve_connection(TokioIo::new(stream), service);
            let _ = conn.await;
            drop(permit);
        });
    }
}

fn router(shared: Arc<Shared>, origins: Arc<LocalNames>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/messages", post(messages))
        .route("/v1/messages/count_tokens", post(count_tokens))
        .route("/v1/responses", post(responses))
        .route("/v1/models", get(models))
        // A catch-all: model ids may hold slashes (`org/model`).
        .route("/v1/models/{*id}", get(model))
        .route("/health", get(health))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(shared.clone(), auth))
        .layer(axum::middleware::from_fn_with_state(origins, local_only))
        .with_state(shared)
}

/// What a web page must not reach (docs/decisions/0017-serve-host-and-origin.md). `loopback`:
/// the server listens on a loopback address, so every honest request names it by a local name
/// (`Host`), and any other name is DNS rebinding. `keyless`: no `--api-key`, so a cross-origin
/// request from a page that is not local is refused; with a key, the key decides.
struct LocalNames {
    loopback: bool,
    keyless: bool,
    /// Lower-case host names that mean this server: localhost, 127.0.0.1, [::1], the `--host`
    /// given and the address bound.
    names: Vec<String>,
}

impl LocalNames {
    fn new(host: &str, bound: SocketAddr, keyless: bool) -> LocalNames {
        let bracket = |h: &str| {
            if h.contains(':') && !h.starts_with('[') {
                format!("[{h}]")
            } else {
                h.to_string()
            }
        };
        let mut names: Vec<String> = ["localhost", "127.0.0.1", "[::1]"]
            .iter()
            .map(|n| n.to_string())
            .collect();
        names.push(bracket(&host.to_ascii_lowercase()));
        names.push(bracket(&bound.ip().to_string()));
        LocalNames {
            loopback: bound.ip().is_loopback(),
            keyless,
            names,
        }
    }

    /// Whether `authority` (`host`, `host:port`, `[v6]:port`) names this server.
    fn is_local(&self, authority: &str) -> bool {
        let authority = authority.trim().to_ascii_lowercase();
        let host = if authority.starts_with('[') {
            authority.split_inclusive(']').next().unwrap_or("")
        } else {
            authority.split(':').next().unwrap_or("")
        };
        let host = host.strip_suffix('.').unwrap_or(host);
        self.names.iter().any(|n| n == host)
    }
}

/// Refuses what a web page could send a local server without its user knowing: a `Host` that
/// is not a local name while bound to loopback (DNS rebinding), and without an API key an
/// `Origin` that is not local (a cross-origin page).
async fn local_only(
    State(names): State<Arc<LocalNames>>,
    req: HttpRequest,
    next: Next,
) -> Response {
    let anthropic = is_anthropic(&req);
    match names.refusal(req.headers()) {
        Some(refused) if anthropic => reshape(refused).await,
        Some(refused) => refused,
        None => next.run(req).await,
    }
}

/// Whether a request is for Anthropic's API, whose errors take its shape.
fn is_anthropic(req: &HttpRequest) -> bool {
    req.uri().path().starts_with("/v1/messages")
}

/// An error response in OpenAI's shape, rewritten in Anthropic's (same status).
async fn reshape(resp: Response) -> Response {
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let message = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_default();
    let e = ApiError::invalid(None, message).status(parts.status.as_u16());
    let mut out = (parts.status, axum::Json(anthropic::error_body(&e))).into_response();
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

/// An error of the Anthropic endpoints.
struct AnthropicError(ApiError);

impl IntoResponse for AnthropicError {
    fn into_response(self) -> Response {
        let e = self.0;
        let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
        let mut resp = (status, axum::Json(anthropic::error_body(&e))).into_response();
        if let Some(s) = e.retry_after_s {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

impl From<ApiError> for AnthropicError {
    fn from(e: ApiError) -> AnthropicError {
        AnthropicError(e)
    }
}

impl LocalNames {
    fn refusal(&self, headers: &axum::http::HeaderMap) -> Option<Response> {
        let header = |h: header::HeaderName| {
            headers
                .get(h)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        if self.loopback {
            if let Some(host) = header(header::HOST).filter(|h| !self.is_local(h)) {
                return Some(forbidden(
                    format!(
                        "Host {host:?} is not this server: it listens on a loopback address and answers only to localhost, 127.0.0.1 or [::1] (a page on another site reaching it through DNS rebinding is refused)"
                    ),
                    "host_not_allowed",
                ));
            }
        }
        if self.keyless {
            let origin = header(header::ORIGIN)?;
            let local = origin.split_once("://").is_some_and(|(scheme, rest)| {
                matches!(scheme, "http" | "https") && self.is_local(rest.trim_end_matches('/'))
            });
            if !local {
                return Some(forbidden(
                    format!(
                        "requests from the web page {origin:?} are refused: this server has no --api-key, so only local pages may call it; start it with --api-key to let other origins in"
                    ),
                    "origin_not_allowed",
                ));
            }
        }
        None
    }
}

fn forbidden(message: String, code: &'static str) -> Response {
    ApiError::invalid(None, message)
        .status(403)
        .with_code(code)
        .into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        let mut resp = (status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after_s {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// With `--api-key`, every request must carry the key: `Authorization: Bearer KEY` (OpenAI's
/// clients) or `x-api-key: KEY` (Anthropic's), on every endpoint.
async fn auth(State(shared): State<Arc<Shared>>, req: HttpRequest, next: Next) -> Response {
    if let Some(key) = &shared.opts.api_key {
        let headers = req.headers();
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim_start().split_once(' '))
            // RFC 7235 §2.1: the scheme is case-insensitive.
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        let x_api_key = headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::trim);
        let right =
            |g: Option<&str>| g.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes()));
        if !(right(bearer) | right(x_api_key)) {
            let e = ApiError {
                status: 401,
                message: "a valid API key is needed: send `Authorization: Bearer KEY` or `x-api-key: KEY` with the server's --api-key".into(),
                kind: "invalid_request_error",
                param: None,
                code: Some("invalid_api_key"),
                retry_after_s: None,
            };
            return if is_anthropic(&req) {
                AnthropicError(e).into_response()
            } else {
                e.into_response()
            };
        }
    }
    next.run(req).await
}

/// Compares without an early exit, so the time taken does not tell how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn not_found(req: HttpRequest) -> Response {
    let e = ApiError::invalid(
        None,
        format!(
            "no endpoint {} {}: this server has /v1/chat/completions, /v1/completions, /v1/responses, /v1/messages, /v1/messages/count_tokens, /v1/models and /health",
            req.method(),
            req.uri().path()
        ),
    )
    .status(404)
    .with_code("unknown_url");
    in_shape_of(&req, e)
}

async fn method_not_allowed(req: HttpRequest) -> Response {
    let e = ApiError::invalid(
        None,
        format!(
            "{} is not allowed on {}: completions, responses and messages take POST, models and health GET",
            req.method(),
            req.uri().path()
        ),
    )
    .status(405);
    in_shape_of(&req, e)
}

/// `e` in the shape of the API `req` was for.
fn in_shape_of(req: &HttpRequest, e: ApiError) -> Response {
    if is_anthropic(req) {
        AnthropicError(e).into_response()
    } else {
        e.into_response()
    }
}

fn model_object(shared: &Shared) -> Value {
    json!({
        "id": shared.opts.model,
        "object": "model",
        "created": shared.started,
        "owned_by": "flashpack",
    })
}

async fn models(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(json!({"object": "list", "data": [model_object(&shared)]})).into_response()
}

async fn model(
    State(shared): State<Arc<Shared>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    match check_model(&shared, Some(&id)) {
        Ok(()) => axum::Json(model_object(&shared)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn health(State(shared): State<Arc<Shared>>) -> Response {
    let c = &shared.counters;
    axum::Json(json!({
        "status": "ok",
        "model": shared.opts.model,
        "queued": c.queued.load(Ordering::Relaxed),
        "busy": c.busy.load(Ordering::Relaxed),
        "running": c.running.load(Ordering::Relaxed),
        "decode_concurrency": shared.opts.decode_concurrency,
        "completed": c.completed.load(Ordering::Relaxed),
        "cancelled": c.cancelled.load(Ordering::Relaxed),
        "failed": c.failed.load(Ordering::Relaxed),
        "rejected": c.rejected.load(Ordering::Relaxed),
        "generated_tokens": c.generated_tokens.load(Ordering::Relaxed),
        "prompt_tokens": c.prompt_tokens.load(Ordering::Relaxed),
        "cached_tokens": c.cached_tokens.load(Ordering::Relaxed),
        "memory_pressure": c.pressure.get().map(|p| pressure_json(&p.lock().unwrap_or_else(|e| e.into_inner()))),
    }))
    .into_response()
}

/// The memory-pressure status as `/health` shows it: the status without its list of resizes,
/// and the last resize.
fn pressure_json(p: &crate::run::pressure::PressureStatus) -> serde_json::Value {
    let mut v = serde_json::to_value(p).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.remove("changes");
        o.insert("last_change".into(), json!(p.changes.last()));
    }
    v
}

fn check_model(shared: &Shared, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        // Absent: the one model this server has (llama-server and mlx-lm's server do the same).
        None => Ok(()),
        Some(m) if m == shared.opts.model => Ok(()),
        Some(m) => Err(ApiError::invalid(
            Some("model"),
            format!(
                "the model {m:?} does not exist here: this server serves {:?}",
                shared.opts.model
            ),
        )
        .status(404)
        .with_code("model_not_found")),
    }
}

/// A completion must say its body is JSON: a browser sends other types (text/plain, forms)
/// cross-origin without asking first (no CORS preflight), and JSON it does not.
fn check_json(req: &HttpRequest) -> Result<(), ApiError> {
    let given = req
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let json = given.as_deref().is_some_and(|t| {
        t.split(';')
            .next()
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
    });
    if json {
        return Ok(());
    }
    Err(ApiError::invalid(
        None,
        format!(
            "the body must be sent as Content-Type: application/json (it was {})",
            given.map_or("not given".into(), |t| format!("{t:?}"))
        ),
    )
    .status(415)
    .with_code("unsupported_media_type"))
}

/// The request body, within the size limit and the idle timeout.
async fn read_body(shared: &Shared, req: HttpRequest) -> Result<axum::body::Bytes, ApiError> {
    let limit = shared.opts.max_body_bytes;
    let too_large = || {
        ApiError::invalid(
            None,
            format!("the request body is larger than this server takes ({limit} bytes): send a shorter prompt"),
        )
        .status(413)
        .with_code("request_too_large")
    };
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit as u64 {
            return Err(too_large());
        }
    }
    let body = req.into_body();
    match tokio::time::timeout(shared.opts.idle_timeout, axum::body::to_bytes(body, limit)).await {
        Err(_) => Err(ApiError::invalid(
            None,
            "the request body did not arrive in time: send it whole",
        )
        .status(408)),
        Ok(Err(e)) => {
            // http-body-util's `LengthLimitError`, which axum does not name publicly.
            if worker::chain(&e).contains("length limit") {
                Err(too_large())
            } else {
                Err(ApiError::invalid(
                    None,
                    format!("the request body could not be read: {e}"),
                ))
            }
        }
        Ok(Ok(b)) => Ok(b),
    }
}

async fn chat(State(shared): State<Arc<Shared>>, req: HttpRequest) -> Response {
    respond(shared, req, Endpoint::Chat)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(shared): State<Arc<Shared>>, req: HttpRequest) -> Response {
    respond(shared, req, Endpoint::Completion)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn respond(
    shared: Arc<Shared>,
    req: HttpRequest,
    endpoint: Endpoint,
) -> Result<Response, ApiError> {
    check_json(&req)?;
    let body = read_body(&shared, req).await?;
    let parsed: Parsed = match endpoint {
        Endpoint::Chat => openai::parse_chat(&body, &shared.limits)?,
        Endpoint::Completion => openai::parse_completion(&body, &shared.limits)?,
    };
    check_model(&shared, parsed.model.as_deref())?;
    let chat = endpoint == Endpoint::Chat;
    let (n, rx, _) = submit(&shared, &parsed, chat, false).await?;
    let mut responder = Responder::new(endpoint, n, &shared.opts.model, parsed.include_usage);
    if chat && parsed.parse_tools {
        let tools = parsed.render.tools.clone().unwrap_or_default();
        responder = responder.with_tools(shared.tool_format, tools);
    }
    let logprobs = parsed.request.logprobs.is_some();
    if parsed.stream {
        Ok(stream_response(rx, responder, logprobs))
    } else {
        let mut rx = rx;
        let mut text = String::new();
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Piece(p) => text.push_str(&p.text),
                Event::Done(c) => {
                    debug_assert_eq!(text, c.text);
                    return Ok(axum::Json(responder.full(&c, logprobs)).into_response());
                }
                Event::Error(e) => return Err(e),
                Event::Started { .. } => {}
            }
        }
        Err(ApiError::server("the engine stopped before finishing"))
    }
}

/// The prompt's size, and how much of it the KV cache gives, once the engine has taken it.
struct Taken {
    prompt_tokens: usize,
    cached_tokens: usize,
}

/// Queues a job for `parsed` and waits for the engine to take its prompt (or refuse it): the
/// request's number, its event channel, and the prompt's size. Refusals are plain 4xx
/// responses, not a stream that starts and fails.
async fn submit(
    shared: &Shared,
    parsed: &Parsed,
    chat: bool,
    count_only: bool,
) -> Result<(u64, mpsc::UnboundedReceiver<Event>, Taken), ApiError> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let job = Job {
        prompt: parsed.prompt.clone(),
        request: parsed.request.clone(),
        chat,
        render: parsed.render.clone(),
        count_only,
        events: tx,
    };
    shared.counters.queued.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = shared.jobs.try_send(job) {
        shared.counters.queued.fetch_sub(1, Ordering::Relaxed);
        return Err(match e {
            mpsc::error::TrySendError::Full(_) => ApiError {
                status: 429,
                message: format!(
                    "the server is busy: {} requests are already waiting; retry later",
                    shared.opts.max_queue
                ),
                kind: "rate_limit_error",
                param: None,
                code: Some("queue_full"),
                retry_after_s: Some(1),
            },
            mpsc::error::TrySendError::Closed(_) => {
                ApiError::server("the engine has stopped; restart the server").status(503)
            }
        });
    }
    let n = shared.requests.fetch_add(1, Ordering::Relaxed);
    match rx.recv().await {
        Some(Event::Started {
            prompt_tokens,
            cached_tokens,
        }) => Ok((
            n,
            rx,
            Taken {
                prompt_tokens,
                cached_tokens,
            },
        )),
        Some(Event::Error(e)) => Err(e),
        Some(_) | None => Err(ApiError::server("the engine stopped before answering")),
    }
}

/// Anthropic's `/v1/messages`.
async fn messages(State(shared): State<Arc<Shared>>, req: HttpRequest) -> Response {
    anthropic_messages(shared, req, false)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// Anthropic's `/v1/messages/count_tokens`: the rendered prompt's tokens, `{"input_tokens"}`.
async fn count_tokens(State(shared): State<Arc<Shared>>, req: HttpRequest) -> Response {
    anthropic_messages(shared, req, true)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn anthropic_messages(
    shared: Arc<Shared>,
    req: HttpRequest,
    count: bool,
) -> Result<Response, AnthropicError> {
    check_json(&req)?;
    let body = read_body(&shared, req).await?;
    // Any `model` is served by the one pack: Claude Code names Claude models (its main and its
    // small fast one) unless told otherwise, and the answer names the model that gave it.
    let parsed = anthropic::parse_messages(&body, &shared.limits, shared.pack, count)?;
    let (n, mut rx, taken) =
        submit(&shared, &parsed, true, count)
            .await
            .map_err(|e| match e.code {
                // Anthropic's word for a server that cannot take more now.
                Some("queue_full") => e.status(529),
                _ => e,
            })?;
    if count {
        return Ok(axum::Json(json!({"input_tokens": taken.prompt_tokens})).into_response());
    }
    let responder = MessageResponder::new(n, &shared.opts.model, &parsed, shared.tool_format);
    if parsed.stream {
        let first = responder.start(taken.prompt_tokens, taken.cached_tokens);
        return Ok(named_stream(rx, responder, first));
    }
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Done(c) => return Ok(axum::Json(responder.full(&c)).into_response()),
            Event::Error(e) => return Err(e.into()),
            Event::Piece(_) | Event::Started { .. } => {}
        }
    }
    Err(ApiError::server("the engine stopped before finishing").into())
}

/// A responder whose stream is named events (`event: NAME` then `data: JSON`): Anthropic's
/// messages and OpenAI's Responses API.
trait NamedEvents: Send + 'static {
    fn piece(&mut self, p: &Piece) -> Vec<NamedEvent>;
    fn end(&mut self, c: &Completion) -> Vec<NamedEvent>;
    /// A failure after the stream started: its last events.
    fn error(&mut self, e: &ApiError) -> Vec<NamedEvent>;
}

impl NamedEvents for MessageResponder {
    fn piece(&mut self, p: &Piece) -> Vec<NamedEvent> {
        MessageResponder::piece(self, p)
    }
    fn end(&mut self, c: &Completion) -> Vec<NamedEvent> {
        MessageResponder::end(self, c)
    }
    fn error(&mut self, e: &ApiError) -> Vec<NamedEvent> {
        vec![("error", anthropic::error_body(e))]
    }
}

impl NamedEvents for ResponsesResponder {
    fn piece(&mut self, p: &Piece) -> Vec<NamedEvent> {
        ResponsesResponder::piece(self, p)
    }
    fn end(&mut self, c: &Completion) -> Vec<NamedEvent> {
        ResponsesResponder::end(self, c)
    }
    fn error(&mut self, e: &ApiError) -> Vec<NamedEvent> {
        ResponsesResponder::error(self, e)
    }
}

/// A stream of named events: `first`, then the responder's events for each piece, then its
/// end (or its error, after which the stream ends). As with OpenAI's chat stream, a comment
/// every second during the prefill finds a client that went away.
fn named_stream(
    rx: mpsc::UnboundedReceiver<Event>,
    responder: impl NamedEvents,
    first: Vec<NamedEvent>,
) -> Response {
    let state = (
        rx,
        responder,
        std::collections::VecDeque::from(first),
        false,
    );
    let events =
        futures_util::stream::unfold(state, |(mut rx, mut r, mut queued, mut done)| async move {
            loop {
                if let Some((name, v)) = queued.pop_front() {
                    let ev = SseEvent::default().event(name).data(v.to_string());
                    return Some((Ok::<_, Infallible>(ev), (rx, r, queued, done)));
                }
                if done {
                    return None;
                }
                let (next, last) = match rx.recv().await {
                    Some(Event::Piece(p)) => (r.piece(&p), false),
                    Some(Event::Done(c)) => (r.end(&c), true),
                    Some(Event::Error(e)) => (r.error(&e), true),
                    Some(Event::Started { .. }) | None => return None,
                };
                queued.extend(next);
                done = last;
            }
        });
    let keep_alive = axum::response::sse::KeepAlive::new().interval(Duration::from_secs(1));
    let mut resp = Sse::new(events).keep_alive(keep_alive).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// OpenAI's `/v1/responses`.
async fn responses(State(shared): State<Arc<Shared>>, req: HttpRequest) -> Response {
    openai_responses(shared, req)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn openai_responses(shared: Arc<Shared>, req: HttpRequest) -> Result<Response, ApiError> {
    check_json(&req)?;
    let body = read_body(&shared, req).await?;
    let store = &shared.responses;
    let parsed =
        responses::parse_responses(&body, &shared.limits, shared.pack, &|id| store.get(id))?;
    check_model(&shared, parsed.parsed.model.as_deref())?;
    let (n, mut rx, _) = submit(&shared, &parsed.parsed, true, false).await?;
    let stream = parsed.parsed.stream;
    let mut responder = ResponsesResponder::new(
        n,
        &shared.opts.model,
        parsed,
        shared.tool_format,
        &shared.responses,
    );
    if stream {
        let first = responder.start();
        return Ok(named_stream(rx, responder, first));
    }
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Done(c) => return Ok(axum::Json(responder.full(&c)).into_response()),
            Event::Error(e) => return Err(e),
            Event::Piece(_) | Event::Started { .. } => {}
        }
    }
    Err(ApiError::server("the engine stopped before finishing"))
}

/// Server-sent events: a role chunk (chat), one chunk per text piece, the finish chunk, usage
/// when asked for, then `data: [DONE]`. Dropping the stream (the client went away) drops the
/// receiver, and the engine stops at its next token.
fn stream_response(
    rx: mpsc::UnboundedReceiver<Event>,
    responder: Responder,
    logprobs: bool,
) -> Response {
    let first: Vec<Value> = responder.role_chunk().into_iter().collect();
    let state = (rx, responder, first, false);
    let events =
        futures_util::stream::unfold(state, move |(mut rx, mut r, mut queued, done)| async move {
            loop {
                if let Some(v) = queued.pop() {
                    return Some((data(&v), (rx, r, queued, done)));
                }
                if done {
                    return None;
                }
                match rx.recv().await {
                    // A piece whose text is all held (it may open a tool call) sends nothing.
                    Some(Event::Piece(p)) => {
                        queued = r.piece_chunks(&p, logprobs);
                        queued.reverse();
                    }
                    Some(Event::Done(c)) => {
                        let mut end = r.end_chunks(&c);
                        end.reverse();
                        let first = end.pop().unwrap_or(Value::Null);
                        return Some((data(&first), (rx, r, end, true)));
                    }
                    Some(Event::Error(e)) => return Some((data(&e.body()), (rx, r, queued, true))),
                    Some(Event::Started { .. }) | None => return None,
                }
            }
        });
    let done =
        futures_util::stream::iter([Ok::<_, Infallible>(SseEvent::default().data("[DONE]"))]);
    let stream = futures_util::StreamExt::chain(events, done);
    // A comment line every second without events (the prefill): a client gone altogether makes
    // the second one fail, which drops the stream and stops the prefill (half-closed
    // connections are not taken as gone, so a write is what finds them).
    let keep_alive = axum::response::sse::KeepAlive::new().interval(Duration::from_secs(1));
    let mut resp = Sse::new(stream).keep_alive(keep_alive).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

fn data(v: &Value) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().data(v.to_string()))
}

/// A finished completion of `text` for the endpoints' tests: 10 prompt tokens, 6 of them from
/// the KV cache, and 4 generated.
#[cfg(test)]
pub(crate) fn completion_for_tests(text: &str, finish: crate::run::engine::Finish) -> Completion {
    Completion {
        text: text.into(),
        reasoning: String::new(),
        finish,
        stop_string: None,
        prompt_tokens: 10,
        completion_tokens: 4,
        cached_tokens: 6,
        logprobs: Vec::new(),
        stats: Default::default(),
        tokens: Vec::new(),
        at_first_token: None,
        cpu_s: Default::default(),
    }
}
