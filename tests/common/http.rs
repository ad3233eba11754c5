#![allow(dead_code)] // each test file uses part of it
//! A `flashpack serve` process on the bundled tiny model, and a small HTTP/1.1 client over a
//! plain socket (so tests can also send what no client library would).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

/// The bundled tiny model converted once per run and name, as `target/tmp/NAME.flashpack`
/// (written anew each run: conversion writes a temporary file and renames it). The name is the
/// model's name as `serve` reports it.
pub fn tiny_pack(name: &str) -> &'static Path {
    static PACKS: Mutex<BTreeMap<String, &'static Path>> = Mutex::new(BTreeMap::new());
    let mut packs = PACKS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(pack) = packs.get(name) {
        return pack;
    }
    let pack = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.flashpack"));
    convert_quiet(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/qwen3moe-tiny"),
        &pack,
    );
    let pack: &'static Path = Box::leak(pack.into_boxed_path());
    packs.insert(name.to_string(), pack);
    pack
}

/// `flashpack convert SRC -o PACK --quiet`, which must succeed.
pub fn convert_quiet(src: &Path, pack: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_flashpack"))
        .args([
            "convert",
            src.to_str().unwrap(),
            "-o",
            pack.to_str().unwrap(),
        ])
        .arg("--quiet")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A running server; killed when dropped.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Server {
    /// `flashpack serve PACK --port 0 ARGS`, once it listens.
    pub fn start(pack: &Path, args: &[&str]) -> Server {
        Server::start_with_env(pack, args, &[])
    }

    /// [`Server::start`] with these environment variables set.
    pub fn start_with_env(pack: &Path, args: &[&str], envs: &[(&str, &str)]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_flashpack"))
            .args(["serve", pack.to_str().unwrap(), "--port", "0"])
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut seen = String::new();
        let addr = loop {
            let mut line = String::new();
            if err.read_line(&mut line).unwrap() == 0 {
                let status = child.wait().unwrap();
                panic!("serve exited ({status}) before listening: {seen}");
            }
            seen.push_str(&line);
            if let Some(rest) = line.split("http://").nth(1) {
                break rest.split('/').next().unwrap().parse().unwrap();
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = String::new();
            let _ = err.read_to_string(&mut sink);
        });
        Server { child, addr }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The server is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Peak resident memory of the server process (Linux), in bytes.
    pub fn peak_rss(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }

    pub fn health(&self) -> serde_json::Value {
        let r = request(self.addr, "GET", "/health", &[], b"");
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response: status, headers (names lower-cased), body (chunked encoding undone).
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {:?}", self.text()))
    }

    /// The `data:` payloads of a server-sent event stream, in order.
    pub fn events(&self) -> Vec<String> {
        self.text()
            .split("\n\n")
            // Comment lines (`:`, the server's keep-alive) are not events.
            .filter(|e| !e.is_empty() && !e.starts_with(':'))
            .map(|e| {
                e.strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("not an SSE data event: {e:?}"))
                    .to_string()
            })
            .collect()
    }
}

/// Sends one request (`Connection: close`) and reads the whole response.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        raw.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        raw.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    raw.push_str("\r\n");
    let mut bytes = raw.into_bytes();
    bytes.extend_from_slice(body);
    send_raw(addr, &bytes).expect("a response")
}

/// POSTs JSON.
pub fn post(addr: SocketAddr, path: &str, body: &serde_json::Value) -> Response {
    request(addr, "POST", path, &[], body.to_string().as_bytes())
}

/// Writes `bytes` as they are and parses what comes back; `None` if the server closed the
/// connection without a response.
pub fn send_raw(addr: SocketAddr, bytes: &[u8]) -> Option<Response> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    // A server may answer and close before reading everything; that is not a failure here.
    // (No half-close after writing: hyper takes it as the client going away.)
    let _ = s.write_all(bytes);
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    parse(&all)
}

fn parse(all: &[u8]) -> Option<Response> {
    let end = all.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&all[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = all[end + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    Some(Response {
        status,
        headers,
        body,
    })
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(nl) = b.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..nl]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = nl + 2;
        let stop = (start + size).min(b.len());
        out.extend_from_slice(&b[start..stop]);
        b = &b[(stop + 2).min(b.len())..];
    }
    out
}
