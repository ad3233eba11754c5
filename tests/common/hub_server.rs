//! A local stand-in for the Hugging Face Hub that serves exactly the endpoints flashpack's
//! hub client uses, with the behaviour docs/hub.md records (huggingface_hub 0.2x / 1.x era):
//!
//! hub origin: `GET /api/models/{repo}/revision/{rev}`, `HEAD|GET /{repo}/resolve/{rev}/{file}`
//! (302 to the CDN for LFS files, with `X-Linked-Etag` / `X-Linked-Size`), `POST
//! /api/repos/create`, `POST /api/models/{repo}/branch/{branch}`, `POST
//! /{repo}.git/info/lfs/objects/batch`, `POST /{repo}.git/info/lfs/objects/verify`, `POST
//! /lfs-complete/{oid}` (multipart completion), `POST /api/models/{repo}/commit/{rev}` (NDJSON).
//! CDN origin (another port, so another origin): `GET /lfs/{oid}` with `Range`, `PUT
//! /upload/{oid}`, `PUT /upload/{oid}/part/{n}`.
//!
//! Tokens (read or write), 401/403/404 with `X-Error-Code`, and faults: a download or an
//! upload whose connection is dropped after N bytes, a given number of times. Every request is
//! logged (method, path, origin, Authorization, Range, status) and every commit recorded, so
//! tests assert on what the client really sent. HTTP/1.1, one request per connection
//! (`Connection: close`), bodies by `Content-Length` only (the client always sends it).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[derive(Clone, Debug)]
pub struct StoredFile {
    pub bytes: Vec<u8>,
    pub lfs: bool,
}

#[derive(Clone, Debug, Default)]
pub struct Repo {
    pub private: bool,
    pub branches: BTreeMap<String, String>,
    pub commits: BTreeMap<String, BTreeMap<String, StoredFile>>,
}

#[derive(Clone, Debug)]
pub struct Logged {
    pub method: String,
    pub path: String,
    /// "hub" or "cdn".
    pub origin: &'static str,
    pub authorization: Option<String>,
    pub range: Option<String>,
    pub status: u16,
}

#[derive(Clone, Debug)]
pub struct CommitRecord {
    pub repo: String,
    pub revision: String,
    pub oid: String,
    pub lines: Vec<Value>,
}

/// Connection drops to inject: after `bytes` bytes of body, for the next `times` requests.
#[derive(Clone, Copy, Debug, Default)]
pub struct Drop {
    pub bytes: u64,
    pub times: u32,
}

#[derive(Default)]
pub struct State {
    pub repos: BTreeMap<String, Repo>,
    /// token -> (user, write access)
    pub tokens: BTreeMap<String, (String, bool)>,
    /// LFS objects by sha256.
    pub lfs: BTreeMap<String, Vec<u8>>,
    pub requests: Vec<Logged>,
    pub commits: Vec<CommitRecord>,
    /// Body bytes sent, per request path (`/{repo}/resolve/{rev}/{file}`, `/lfs/{oid}`).
    pub served: BTreeMap<String, u64>,
    /// Drops applied to `GET /lfs/{oid}` on the CDN.
    pub drop_download: Drop,
    /// Drops applied to `PUT /upload/...` on the CDN.
    pub drop_upload: Drop,
    /// When set, the batch API answers with multipart uploads of this chunk size.
    pub multipart_chunk: Option<u64>,
    parts: BTreeMap<(String, u64), Vec<u8>>,
    next_commit: u64,
    hub: String,
    cdn: String,
}

impl State {
    fn new_commit_id(&mut self, seed: &[u8]) -> String {
        self.next_commit += 1;
        let mut h = Sha256::new();
        h.update(self.next_commit.to_le_bytes());
        h.update(seed);
        sha256_hex(&h.finalize())[..40].to_string()
    }

    /// The files of `repo` at `rev` (branch or commit).
    pub fn files_at(&self, repo: &str, rev: &str) -> Option<&BTreeMap<String, StoredFile>> {
        let r = self.repos.get(repo)?;
        let commit = r.branches.get(rev).map(String::as_str).unwrap_or(rev);
        r.commits.get(commit)
    }
}

pub struct HubServer {
    pub endpoint: String,
    pub cdn: String,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

struct Request {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
    stream: TcpStream,
}

impl Request {
    fn header(&self, k: &str) -> Option<&str> {
        self.headers.get(k).map(String::as_str)
    }

    fn content_length(&self) -> usize {
        self.header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    fn body(&mut self, reader: &mut BufReader<TcpStream>) -> Vec<u8> {
        let mut body = vec![0u8; self.content_length()];
        if reader.read_exact(&mut body).is_err() {
            body.clear();
        }
        body
    }
}

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Close the connection after this many body bytes (a fault).
    cut_after: Option<u64>,
}

impl Resp {
    fn new(status: u16) -> Resp {
        Resp {
            status,
            headers: vec![],
            body: vec![],
            cut_after: None,
        }
    }
    fn json(status: u16, v: Value) -> Resp {
        Resp::new(status)
            .header("content-type", "application/json")
            .body(v.to_string().into_bytes())
    }
    fn error(status: u16, code: &str, msg: &str) -> Resp {
        let mut r = Resp::json(status, json!({"error": msg}));
        if !code.is_empty() {
            r = r.header("x-error-code", code);
        }
        r.header("x-error-message", msg)
    }
    fn header(mut self, k: &str, v: impl Into<String>) -> Resp {
        self.headers.push((k.to_string(), v.into()));
        self
    }
    fn body(mut self, b: Vec<u8>) -> Resp {
        self.body = b;
        self
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        409 => "Conflict",
        416 => "Range Not Satisfiable",
        _ => "Status",
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

enum Who {
    Nobody,
    BadToken,
    User(String, bool),
}

fn who(state: &State, req: &Request) -> Who {
    match req
        .header("authorization")
        .and_then(|a| a.strip_prefix("Bearer "))
    {
        None => Who::Nobody,
        Some(t) => match state.tokens.get(t) {
            Some((u, w)) => Who::User(u.clone(), *w),
            None => Who::BadToken,
        },
    }
}

/// Read access to `repo`: Ok, or the error response the Hub gives.
fn can_read(state: &State, req: &Request, repo: &str) -> Result<(), Resp> {
    let w = who(state, req);
    if matches!(w, Who::BadToken) {
        return Err(Resp::error(
            401,
            "",
            "Invalid credentials in Authorization header",
        ));
    }
    match state.repos.get(repo) {
        None if matches!(w, Who::Nobody) => {
            Err(Resp::error(401, "RepoNotFound", "Repository not found"))
        }
        None => Err(Resp::error(404, "RepoNotFound", "Repository not found")),
        Some(r) if r.private && matches!(w, Who::Nobody) => {
            Err(Resp::error(401, "RepoNotFound", "Repository not found"))
        }
        Some(_) => Ok(()),
    }
}

fn can_write(state: &State, req: &Request) -> Result<String, Resp> {
    match who(state, req) {
        Who::Nobody => Err(Resp::error(401, "", "You must be authenticated")),
        Who::BadToken => Err(Resp::error(
            401,
            "",
            "Invalid credentials in Authorization header",
        )),
        Who::User(_, false) => Err(Resp::error(403, "", "You don't have the rights to write")),
        Who::User(u, true) => Ok(u),
    }
}

/// Serves `bytes` honouring `Range: bytes=N-` and `Range: bytes=N-M`.
fn ranged(req: &Request, bytes: &[u8]) -> Resp {
    let len = bytes.len() as u64;
    let range = req
        .header("range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
        .and_then(|(a, b)| {
            let start = a.parse::<u64>().ok()?;
            let end = match b {
                "" => len.checked_sub(1)?,
                b => b.parse::<u64>().ok()?.min(len.checked_sub(1)?),
            };
            Some((start, end))
        });
    match (req.header("range"), range) {
        (None, _) => Resp::new(200).body(bytes.to_vec()),
        (Some(_), Some((s, e))) if s <= e && s < len => Resp::new(206)
            .header("content-range", format!("bytes {s}-{e}/{len}"))
            .body(bytes[s as usize..=e as usize].to_vec()),
        (Some(_), _) => Resp::new(416).header("content-range", format!("bytes */{len}")),
    }
}

impl HubServer {
    pub fn start() -> HubServer {
        let hub = TcpListener::bind("127.0.0.1:0").unwrap();
        let cdn = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", hub.local_addr().unwrap());
        let cdn_url = format!("http://{}", cdn.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State {
            hub: endpoint.clone(),
            cdn: cdn_url.clone(),
            ..State::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (listener, origin) in [(hub, "hub"), (cdn, "cdn")] {
            let state = state.clone();
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = conn else { continue };
                    let state = state.clone();
                    std::thread::spawn(move || serve(stream, origin, &state));
                }
            }));
        }
        HubServer {
            endpoint,
            cdn: cdn_url,
            state,
            stop,
            threads,
        }
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    pub fn add_token(&self, token: &str, user: &str, write: bool) {
        self.state()
            .tokens
            .insert(token.to_string(), (user.to_string(), write));
    }

    /// Creates `repo` with one commit on `main` holding `files` (name, bytes, stored in LFS);
    /// returns the commit id.
    pub fn add_repo(&self, repo: &str, private: bool, files: &[(&str, Vec<u8>, bool)]) -> String {
        let mut s = self.state();
        let mut map = BTreeMap::new();
        for (name, bytes, lfs) in files {
            if *lfs {
                s.lfs.insert(sha256_hex(bytes), bytes.clone());
            }
            map.insert(
                name.to_string(),
                StoredFile {
                    bytes: bytes.clone(),
                    lfs: *lfs,
                },
            );
        }
        let commit = s.new_commit_id(repo.as_bytes());
        let mut r = Repo {
            private,
            ..Repo::default()
        };
        r.commits.insert(commit.clone(), map);
        r.branches.insert("main".into(), commit.clone());
        s.repos.insert(repo.to_string(), r);
        commit
    }

    /// Requests logged so far, then forgets them.
    pub fn take_log(&self) -> Vec<Logged> {
        std::mem::take(&mut self.state().requests)
    }
}

impl std::ops::Drop for HubServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for url in [&self.endpoint, &self.cdn] {
            let _ = TcpStream::connect(url.trim_start_matches("http://"));
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn serve(stream: TcpStream, origin: &'static str, state: &Mutex<State>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(20)));
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(path)) = (parts.next(), parts.next()) else {
        return;
    };
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 {
            return;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let mut req = Request {
        method: method.to_string(),
        path: path.to_string(),
        headers,
        stream,
    };
    // An upload fault reads part of the body, then hangs up without answering.
    if origin == "cdn" && req.method == "PUT" {
        let mut s = state.lock().unwrap();
        if s.drop_upload.times > 0 {
            s.drop_upload.times -= 1;
            let n = (s.drop_upload.bytes as usize).min(req.content_length());
            s.requests.push(Logged {
                method: req.method.clone(),
                path: req.path.clone(),
                origin,
                authorization: req.header("authorization").map(str::to_string),
                range: None,
                status: 0,
            });
            drop(s);
            let mut part = vec![0u8; n];
            let _ = reader.read_exact(&mut part);
            let _ = req.stream.shutdown(Shutdown::Both);
            return;
        }
    }
    let body = req.body(&mut reader);
    let resp = {
        let mut s = state.lock().unwrap();
        let resp = route(&mut s, &req, origin, &body);
        let sent = match resp.cut_after {
            Some(n) => (resp.body.len() as u64).min(n),
            None => resp.body.len() as u64,
        };
        if req.method != "HEAD" {
            *s.served.entry(req.path.clone()).or_default() += sent;
        }
        s.requests.push(Logged {
            method: req.method.clone(),
            path: req.path.clone(),
            origin,
            authorization: req.header("authorization").map(str::to_string),
            range: req.header("range").map(str::to_string),
            status: resp.status,
        });
        resp
    };
    let mut head = format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status));
    for (k, v) in &resp.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!(
        "content-length: {}\r\nconnection: close\r\n\r\n",
        resp.body.len()
    ));
    let mut out = req.stream;
    let _ = out.write_all(head.as_bytes());
    if req.method != "HEAD" {
        let body = match resp.cut_after {
            Some(n) => &resp.body[..(n as usize).min(resp.body.len())],
            None => &resp.body[..],
        };
        let _ = out.write_all(body);
    }
    let _ = out.flush();
    let _ = out.shutdown(Shutdown::Both);
}

fn route(s: &mut State, req: &Request, origin: &str, body: &[u8]) -> Resp {
    let (path, _query) = req.path.split_once('?').unwrap_or((&req.path, ""));
    let segs: Vec<String> = path
        .trim_start_matches('/')
        .split('/')
        .map(percent_decode)
        .collect();
    let seg: Vec<&str> = segs.iter().map(String::as_str).collect();
    let m = req.method.as_str();
    if origin == "cdn" {
        return match (m, seg.as_slice()) {
            ("GET", ["lfs", oid]) => cdn_download(s, req, oid),
            ("PUT", ["upload", oid]) => cdn_upload(s, req, oid, body),
            ("PUT", ["upload", oid, "part", n]) => {
                let n: u64 = n.parse().unwrap_or(0);
                s.parts.insert((oid.to_string(), n), body.to_vec());
                Resp::new(200).header("etag", format!("\"p{n}-{}\"", &sha256_hex(body)[..16]))
            }
            _ => Resp::error(404, "", "no such CDN route"),
        };
    }
    match (m, seg.as_slice()) {
        ("GET", ["api", "models", org, name, "revision", rev]) => {
            revision_info(s, req, &format!("{org}/{name}"), rev)
        }
        ("HEAD" | "GET", [org, name, "resolve", rev, file @ ..]) => {
            resolve(s, req, &format!("{org}/{name}"), rev, &file.join("/"))
        }
        ("POST", ["api", "repos", "create"]) => create_repo(s, req, body),
        ("POST", ["api", "models", org, name, "branch", branch]) => {
            create_branch(s, req, &format!("{org}/{name}"), branch)
        }
        ("POST", ["api", "models", org, name, "commit", rev]) => {
            commit(s, req, &format!("{org}/{name}"), rev, body)
        }
        ("POST", [org, name_git, "info", "lfs", "objects", "batch"]) => {
            let name = name_git.trim_end_matches(".git");
            lfs_batch(s, req, &format!("{org}/{name}"), body)
        }
        ("POST", [_org, _name_git, "info", "lfs", "objects", "verify"]) => lfs_verify(s, req, body),
        ("POST", ["lfs-complete", oid]) => lfs_complete(s, oid, body),
        _ => Resp::error(404, "", "no such route"),
    }
}

fn revision_info(s: &State, req: &Request, repo: &str, rev: &str) -> Resp {
    if let Err(r) = can_read(s, req, repo) {
        return r;
    }
    let r = &s.repos[repo];
    let commit = r
        .branches
        .get(rev)
        .cloned()
        .unwrap_or_else(|| rev.to_string());
    let Some(files) = r.commits.get(&commit) else {
        return Resp::error(404, "RevisionNotFound", &format!("Invalid rev id: {rev}"));
    };
    let siblings: Vec<Value> = files.keys().map(|f| json!({"rfilename": f})).collect();
    Resp::json(
        200,
        json!({"id": repo, "modelId": repo, "sha": commit, "private": r.private, "siblings": siblings}),
    )
}

fn resolve(s: &mut State, req: &Request, repo: &str, rev: &str, file: &str) -> Resp {
    if let Err(r) = can_read(s, req, repo) {
        return r;
    }
    let r = &s.repos[repo];
    let commit = r
        .branches
        .get(rev)
        .cloned()
        .unwrap_or_else(|| rev.to_string());
    let Some(files) = r.commits.get(&commit) else {
        return Resp::error(404, "RevisionNotFound", &format!("Invalid rev id: {rev}"));
    };
    let Some(f) = files.get(file) else {
        return Resp::error(404, "EntryNotFound", &format!("{file} does not exist"));
    };
    let sha = sha256_hex(&f.bytes);
    if f.lfs {
        Resp::new(302)
            .header("location", format!("{}/lfs/{sha}", s.cdn))
            .header("x-repo-commit", commit)
            .header("x-linked-etag", format!("\"{sha}\""))
            .header("x-linked-size", f.bytes.len().to_string())
            .header("etag", format!("\"{}\"", &sha[..40]))
    } else {
        ranged(req, &f.bytes.clone())
            .header("x-repo-commit", commit)
            .header("etag", format!("\"{}\"", &sha[..40]))
    }
}

fn cdn_download(s: &mut State, req: &Request, oid: &str) -> Resp {
    let Some(bytes) = s.lfs.get(oid).cloned() else {
        return Resp::error(404, "", "no such object");
    };
    let mut resp = ranged(req, &bytes);
    if s.drop_download.times > 0 && resp.status / 100 == 2 {
        s.drop_download.times -= 1;
        resp.cut_after = Some(s.drop_download.bytes);
    }
    resp
}

fn cdn_upload(s: &mut State, req: &Request, oid: &str, body: &[u8]) -> Resp {
    if req.header("x-upload-token") != Some(&format!("t-{}", &oid[..8.min(oid.len())])) {
        return Resp::error(403, "", "missing the upload header of the batch action");
    }
    if sha256_hex(body) != oid {
        return Resp::error(400, "", "body does not hash to the object id");
    }
    s.lfs.insert(oid.to_string(), body.to_vec());
    Resp::new(200)
}

fn create_repo(s: &mut State, req: &Request, body: &[u8]) -> Resp {
    if let Err(r) = can_write(s, req) {
        return r;
    }
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let (Some(name), Some(org)) = (v["name"].as_str(), v["organization"].as_str()) else {
        return Resp::error(400, "", "name and organization are required");
    };
    if v.get("type").is_some_and(|t| t != "model") {
        return Resp::error(400, "", "only model repos here");
    }
    let repo = format!("{org}/{name}");
    if s.repos.contains_key(&repo) {
        return Resp::json(
            409,
            json!({"error": "You already created this model repo", "url": format!("{}/{repo}", s.hub)}),
        );
    }
    let commit = s.new_commit_id(repo.as_bytes());
    let mut r = Repo {
        private: v["private"].as_bool().unwrap_or(false),
        ..Repo::default()
    };
    let mut files = BTreeMap::new();
    files.insert(
        ".gitattributes".to_string(),
        StoredFile {
            bytes: b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n".to_vec(),
            lfs: false,
        },
    );
    r.commits.insert(commit.clone(), files);
    r.branches.insert("main".into(), commit);
    s.repos.insert(repo.clone(), r);
    Resp::json(200, json!({"url": format!("{}/{repo}", s.hub)}))
}

fn create_branch(s: &mut State, req: &Request, repo: &str, branch: &str) -> Resp {
    if let Err(r) = can_write(s, req) {
        return r;
    }
    let Some(r) = s.repos.get_mut(repo) else {
        return Resp::error(404, "RepoNotFound", "Repository not found");
    };
    if r.branches.contains_key(branch) {
        return Resp::error(409, "", "Reference already exists");
    }
    let main = r.branches["main"].clone();
    r.branches.insert(branch.to_string(), main);
    Resp::json(200, json!({}))
}

fn lfs_batch(s: &mut State, req: &Request, repo: &str, body: &[u8]) -> Resp {
    if let Err(r) = can_write(s, req) {
        return r;
    }
    if !s.repos.contains_key(repo) {
        return Resp::error(404, "RepoNotFound", "Repository not found");
    }
    if req.header("accept") != Some("application/vnd.git-lfs+json") {
        return Resp::error(400, "", "Accept must be application/vnd.git-lfs+json");
    }
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    if v["operation"] != "upload" || v["hash_algo"] != "sha256" {
        return Resp::error(400, "", "operation upload with hash_algo sha256 expected");
    }
    let mut transfer = "basic";
    let mut objects = Vec::new();
    for o in v["objects"].as_array().cloned().unwrap_or_default() {
        let oid = o["oid"].as_str().unwrap_or("").to_string();
        let size = o["size"].as_u64().unwrap_or(0);
        if oid.len() != 64 {
            objects.push(
                json!({"oid": oid, "size": size, "error": {"code": 422, "message": "bad oid"}}),
            );
            continue;
        }
        if s.lfs.get(&oid).is_some_and(|b| b.len() as u64 == size) {
            objects.push(json!({"oid": oid, "size": size}));
            continue;
        }
        let verify =
            json!({"href": format!("{}/{repo}.git/info/lfs/objects/verify", s.hub), "header": {}});
        let upload = match s.multipart_chunk.filter(|&c| size > c) {
            Some(chunk) => {
                transfer = "multipart";
                let mut header = serde_json::Map::new();
                header.insert("chunk_size".into(), json!(chunk.to_string()));
                for n in 1..=size.div_ceil(chunk) {
                    header.insert(
                        n.to_string(),
                        json!(format!("{}/upload/{oid}/part/{n}", s.cdn)),
                    );
                }
                json!({"href": format!("{}/lfs-complete/{oid}", s.hub), "header": header})
            }
            None => json!({
                "href": format!("{}/upload/{oid}", s.cdn),
                "header": {"x-upload-token": format!("t-{}", &oid[..8])},
            }),
        };
        objects.push(json!({"oid": oid, "size": size, "authenticated": true,
            "actions": {"upload": upload, "verify": verify}}));
    }
    Resp::json(200, json!({"transfer": transfer, "objects": objects}))
        .header("content-type", "application/vnd.git-lfs+json")
}

fn lfs_complete(s: &mut State, oid: &str, body: &[u8]) -> Resp {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    if v["oid"] != oid {
        return Resp::error(400, "", "oid mismatch");
    }
    let mut all = Vec::new();
    for (i, p) in v["parts"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let n = p["partNumber"].as_u64().unwrap_or(0);
        if n != i as u64 + 1 {
            return Resp::error(400, "", "parts out of order");
        }
        let Some(bytes) = s.parts.get(&(oid.to_string(), n)) else {
            return Resp::error(400, "", "part not uploaded");
        };
        let etag = format!("\"p{n}-{}\"", &sha256_hex(bytes)[..16]);
        if p["etag"] != etag.as_str() {
            return Resp::error(400, "", "etag mismatch");
        }
        all.extend_from_slice(bytes);
    }
    if sha256_hex(&all) != oid {
        return Resp::error(400, "", "parts do not hash to the object id");
    }
    s.lfs.insert(oid.to_string(), all);
    Resp::json(200, json!({}))
}

fn lfs_verify(s: &State, req: &Request, body: &[u8]) -> Resp {
    if let Err(r) = can_write(s, req) {
        return r;
    }
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let oid = v["oid"].as_str().unwrap_or("");
    match s.lfs.get(oid) {
        Some(b) if Some(b.len() as u64) == v["size"].as_u64() => Resp::json(200, json!({})),
        _ => Resp::error(404, "", "object not found"),
    }
}

fn commit(s: &mut State, req: &Request, repo: &str, rev: &str, body: &[u8]) -> Resp {
    if let Err(r) = can_write(s, req) {
        return r;
    }
    if req.header("content-type") != Some("application/x-ndjson") {
        return Resp::error(400, "", "Content-Type must be application/x-ndjson");
    }
    let Some(r) = s.repos.get(repo) else {
        return Resp::error(404, "RepoNotFound", "Repository not found");
    };
    let Some(parent) = r.branches.get(rev).cloned() else {
        return Resp::error(404, "RevisionNotFound", &format!("Invalid rev id: {rev}"));
    };
    let mut files = r.commits[&parent].clone();
    let mut lines = Vec::new();
    for (i, l) in body
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .enumerate()
    {
        let Ok(v) = serde_json::from_slice::<Value>(l) else {
            return Resp::error(400, "", "bad NDJSON line");
        };
        let key = v["key"].as_str().unwrap_or("");
        let val = &v["value"];
        match (i, key) {
            (0, "header") if val["summary"].is_string() => {}
            (0, _) => return Resp::error(400, "", "the first line must be the header"),
            (_, "file") => {
                if val["encoding"] != "base64" {
                    return Resp::error(400, "", "encoding must be base64");
                }
                let Ok(bytes) = base64::engine::general_purpose::STANDARD
                    .decode(val["content"].as_str().unwrap_or(""))
                else {
                    return Resp::error(400, "", "bad base64");
                };
                let path = val["path"].as_str().unwrap_or("").to_string();
                files.insert(path, StoredFile { bytes, lfs: false });
            }
            (_, "lfsFile") => {
                let oid = val["oid"].as_str().unwrap_or("");
                if val["algo"] != "sha256" {
                    return Resp::error(400, "", "algo must be sha256");
                }
                let Some(bytes) = s
                    .lfs
                    .get(oid)
                    .filter(|b| Some(b.len() as u64) == val["size"].as_u64())
                else {
                    return Resp::error(400, "", "LFS object not found; upload it first");
                };
                let path = val["path"].as_str().unwrap_or("").to_string();
                files.insert(
                    path,
                    StoredFile {
                        bytes: bytes.clone(),
                        lfs: true,
                    },
                );
            }
            _ => return Resp::error(400, "", &format!("unknown key {key}")),
        }
        lines.push(v);
    }
    let oid = s.new_commit_id(body);
    let r = s.repos.get_mut(repo).unwrap();
    r.commits.insert(oid.clone(), files);
    r.branches.insert(rev.to_string(), oid.clone());
    s.commits.push(CommitRecord {
        repo: repo.to_string(),
        revision: rev.to_string(),
        oid: oid.clone(),
        lines,
    });
    Resp::json(
        200,
        json!({"success": true, "commitOid": oid, "commitUrl": format!("{}/{repo}/commit/{oid}", s.hub)}),
    )
}
