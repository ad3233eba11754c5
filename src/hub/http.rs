//! The one place that speaks HTTP: a blocking ureq agent; redirects followed by hand so that
//! the bearer token goes to the endpoint's origin only (never to the CDN a download is
//! redirected to); HTTP statuses turned into [`HubError`]s that name the repo and file.

use std::io::Read;
use std::time::Duration;

use serde::de::DeserializeOwned;
use ureq::http::{self, HeaderMap};
use ureq::SendBody;

use super::error::{auth_hint, Access};
use super::{HubConfig, HubError};

/// Most redirects followed for one request (huggingface_hub relies on requests' default, 30;
/// the Hub itself uses one for a renamed repo and one to the CDN).
const MAX_REDIRECTS: usize = 10;
/// Error bodies are read up to this many bytes for the message.
const ERROR_BODY_LIMIT: u64 = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Method {
    Get,
    Head,
    Post,
    Put,
}

impl Method {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
        }
    }
}

/// A request body. Readers carry their exact length: presigned upload URLs refuse chunked
/// transfer encoding, so every body is sent with `Content-Length`.
pub(crate) enum Body<'a> {
    Empty,
    Bytes(&'a [u8]),
    Reader(&'a mut dyn Read, u64),
}

/// Which redirects [`Client::send`] follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Follow {
    /// Every redirect (GET and HEAD only).
    All,
    /// Redirects that stay on the endpoint's origin (a renamed repo); a redirect elsewhere
    /// (the CDN of an LFS file) is returned as is so its headers can be read.
    SameOrigin,
}

/// What a request is about, for error messages.
pub(crate) struct Ctx<'a> {
    pub repo: &'a str,
    pub revision: Option<&'a str>,
    pub file: Option<&'a str>,
    pub access: Access,
}

/// A response: status, final URL, headers and the unread body.
pub(crate) struct Reply {
    pub status: u16,
    pub url: String,
    pub method: Method,
    pub token_sent: bool,
    headers: HeaderMap,
    body: ureq::Body,
}

impl Reply {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub(crate) fn is_redirect(&self) -> bool {
        matches!(self.status, 301 | 302 | 303 | 307 | 308)
    }

    /// Parses the body as JSON, reading at most `limit` bytes.
    pub(crate) fn json<T: DeserializeOwned>(mut self, limit: u64) -> Result<T, HubError> {
        let url = self.url.clone();
        let bytes = self
            .body
            .with_config()
            .limit(limit)
            .read_to_vec()
            .map_err(|e| HubError::Transport {
                url: url.clone(),
                detail: e.to_string(),
            })?;
        serde_json::from_slice(&bytes).map_err(|e| HubError::BadResponse {
            url,
            detail: format!("not the JSON expected: {e}"),
        })
    }

    /// The body as a reader (downloads).
    pub(crate) fn into_reader(self) -> impl Read {
        self.body.into_reader()
    }

    /// The error message the Hub sent: `X-Error-Message`, else the body (truncated).
    fn error_detail(mut self) -> String {
        if let Some(m) = self.header("x-error-message") {
            return m.to_string();
        }
        let text = self
            .body
            .with_config()
            .limit(ERROR_BODY_LIMIT)
            .lossy_utf8(true)
            .read_to_string()
            .unwrap_or_default();
        let text = text.trim();
        // JSON errors from the Hub look like {"error": "..."}.
        let msg = serde_json::from_str::<serde_json::Value>(text)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| text.chars().take(300).collect());
        if msg.is_empty() {
            "(no message)".to_string()
        } else {
            msg
        }
    }
}

/// `scheme://host[:port]` of a URL, lowercased.
pub(crate) fn origin(url: &str) -> String {
    let start = url.find("://").map(|i| i + 3).unwrap_or(0);
    let end = url[start..]
        .find(['/', '?', '#'])
        .map(|i| start + i)
        .unwrap_or(url.len());
    url[..end].to_ascii_lowercase()
}

/// Resolves a `Location` header against the URL that answered with it.
fn resolve_location(base: &str, location: &str) -> String {
    if location.starts_with("http://") || location.starts_with("https://") {
        location.to_string()
    } else if let Some(rest) = location.strip_prefix("//") {
        let scheme = base.split("://").next().unwrap_or("https");
        format!("{scheme}://{rest}")
    } else if location.starts_with('/') {
        format!("{}{location}", origin(base))
    } else {
        let path_end = base.find(['?', '#']).unwrap_or(base.len());
        let dir = &base[..base[..path_end]
            .rfind('/')
            .map(|i| i + 1)
            .unwrap_or(path_end)];
        format!("{dir}{location}")
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters (and `/` when
/// `keep_slash`): revisions are encoded whole (`refs/pr/1` -> `refs%2Fpr%2F1`), file paths
/// per segment, as huggingface_hub does.
pub(crate) fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'_' | b'.' | b'~')
            || (keep_slash && b == b'/')
        {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub(crate) struct Client {
    agent: ureq::Agent,
    origin: String,
    pub(crate) endpoint: String,
    token: Option<String>,
}

impl Client {
    pub(crate) fn new(cfg: &HubConfig) -> Client {
        let origin = origin(&cfg.endpoint);
        let loopback = ["http://127.", "http://localhost", "http://[::1]"]
            .iter()
            .any(|p| origin.starts_with(p));
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .max_redirects_will_error(false)
            .user_agent(format!(
                "flashpack/{}; rust/ureq",
                env!("CARGO_PKG_VERSION")
            ))
            .accept_encoding("identity")
            .timeout_connect(Some(Duration::from_secs(20)))
            // A stalled transfer fails after a minute without bytes, then resumes.
            .timeout_per_read(Some(Duration::from_secs(60)))
            .timeout_per_write(Some(Duration::from_secs(60)));
        if loopback {
            // A local endpoint (tests, a mirror on this machine) is never reached through
            // HTTP(S)_PROXY from the environment.
            config = config.proxy(None);
        }
        Client {
            agent: config.build().new_agent(),
            origin,
            endpoint: cfg.endpoint.clone(),
            token: cfg.token.clone(),
        }
    }

    /// Whether a request to `url` carries the token.
    fn sends_token(&self, url: &str) -> bool {
        self.token.is_some() && origin(url) == self.origin
    }

    /// Sends one request and follows redirects as `follow` says (bodies are never re-sent,
    /// so only GET and HEAD follow). Statuses are not errors here; see [`Client::check`].
    pub(crate) fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        mut body: Body<'_>,
        follow: Follow,
    ) -> Result<Reply, HubError> {
        let mut url = url.to_string();
        for _ in 0..=MAX_REDIRECTS {
            let token_sent = self.sends_token(&url);
            let mut req = http::Request::builder()
                .method(method.as_str())
                .uri(url.as_str());
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            if token_sent {
                if let Some(t) = &self.token {
                    req = req.header("authorization", format!("Bearer {t}"));
                }
            }
            let build = |req: http::request::Builder, body: SendBody<'_>| {
                let request = req.body(body).map_err(|e| HubError::BadResponse {
                    url: url.clone(),
                    detail: format!("cannot build the request: {e}"),
                })?;
                self.agent.run(request).map_err(|e| HubError::Transport {
                    url: url.clone(),
                    detail: e.to_string(),
                })
            };
            let response = match &mut body {
                Body::Empty if matches!(method, Method::Post | Method::Put) => {
                    build(req.header("content-length", "0"), SendBody::none())?
                }
                Body::Empty => build(req, SendBody::none())?,
                Body::Bytes(b) => {
                    let mut r: &[u8] = b;
                    let req = req.header("content-length", b.len().to_string());
                    build(req, SendBody::from_reader(&mut r))?
                }
                Body::Reader(r, len) => {
                    let req = req.header("content-length", len.to_string());
                    build(req, SendBody::from_reader(*r))?
                }
            };
            let (parts, body_in) = response.into_parts();
            let reply = Reply {
                status: parts.status.as_u16(),
                url: url.clone(),
                method,
                token_sent,
                headers: parts.headers,
                body: body_in,
            };
            let redirect = reply.is_redirect() && matches!(method, Method::Get | Method::Head);
            let Some(location) = reply.header("location").filter(|_| redirect) else {
                return Ok(reply);
            };
            let next = resolve_location(&url, location);
            if follow == Follow::SameOrigin && origin(&next) != self.origin {
                return Ok(reply);
            }
            url = next;
        }
        Err(HubError::BadResponse {
            url,
            detail: format!("more than {MAX_REDIRECTS} redirects"),
        })
    }

    /// Passes a 2xx (or a redirect [`Follow::SameOrigin`] stopped at) through and turns any
    /// other status into the error that names what was missing or refused.
    pub(crate) fn check(&self, reply: Reply, ctx: &Ctx<'_>) -> Result<Reply, HubError> {
        let status = reply.status;
        if (200..300).contains(&status) || reply.is_redirect() {
            return Ok(reply);
        }
        let code = reply.header("x-error-code").unwrap_or("").to_string();
        let repo = ctx.repo.to_string();
        // Only the Hub's own answers speak of tokens and repos; a CDN or a presigned storage
        // URL refusing a request (an expired signature) is reported as the HTTP error it is.
        if origin(&reply.url) != self.origin {
            return Err(HubError::Http {
                method: reply.method.as_str(),
                url: reply.url.clone(),
                status,
                detail: reply.error_detail(),
            });
        }
        match (status, code.as_str()) {
            (404, "RepoNotFound") | (401 | 403, "RepoNotFound") if reply.token_sent => {
                Err(HubError::RepoNotFound {
                    endpoint: self.endpoint.clone(),
                    repo,
                })
            }
            (401 | 403, _) => Err(HubError::Auth {
                status,
                endpoint: self.endpoint.clone(),
                repo,
                hint: auth_hint(status, ctx.access, reply.token_sent),
            }),
            (404, "RepoNotFound") => Err(HubError::RepoNotFound {
                endpoint: self.endpoint.clone(),
                repo,
            }),
            (404, "RevisionNotFound") => Err(HubError::RevisionNotFound {
                repo,
                revision: ctx.revision.unwrap_or("main").to_string(),
            }),
            (404, _) if ctx.file.is_some() => Err(HubError::FileNotFound {
                repo,
                revision: ctx.revision.unwrap_or("main").to_string(),
                file: ctx.file.unwrap_or_default().to_string(),
            }),
            _ => {
                let method = reply.method.as_str();
                let url = reply.url.clone();
                Err(HubError::Http {
                    method,
                    url,
                    status,
                    detail: reply.error_detail(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_and_locations() {
        assert_eq!(origin("https://HF.co/a/b?x"), "https://hf.co");
        assert_eq!(origin("http://127.0.0.1:8080"), "http://127.0.0.1:8080");
        let base = "https://hf.co/org/m/resolve/main/config.json";
        assert_eq!(
            resolve_location(base, "/api/x"),
            "https://hf.co/api/x".to_string()
        );
        assert_eq!(
            resolve_location(base, "https://cdn.example/o"),
            "https://cdn.example/o"
        );
        assert_eq!(
            resolve_location(base, "//cdn.example/o"),
            "https://cdn.example/o"
        );
        assert_eq!(
            resolve_location(base, "tokenizer.json"),
            "https://hf.co/org/m/resolve/main/tokenizer.json"
        );
    }

    #[test]
    fn encodes_revisions_whole_and_paths_by_segment() {
        assert_eq!(encode("refs/pr/1", false), "refs%2Fpr%2F1");
        assert_eq!(encode("v1.0-rc_2~x", false), "v1.0-rc_2~x");
        assert_eq!(encode("sub dir/a+b.json", true), "sub%20dir/a%2Bb.json");
    }
}
