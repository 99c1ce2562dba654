//! Who may call the API: the admin token, API keys, the `Host` allow-list,
//! the `Origin` check (CORS), JSON-only bodies, and the pull bound.
//!
//! One axum middleware ([`guard`]) runs before every route, in this order:
//!
//! 1. `Host` must be an IP address, `localhost` (or `*.localhost`), or in
//!    `api.allowed_hosts`; otherwise 403. A DNS-rebinding page reaches the node
//!    under the attacker's host name, so it is refused here.
//! 2. An `Origin` header (sent by browsers) must be the node's own origin
//!    (same scheme-less authority as `Host`) or in `api.allowed_origins`;
//!    otherwise 403. Allowed cross-origin requests get CORS headers, and their
//!    preflights (`OPTIONS`) are answered here.
//! 3. `/admin/*` needs `Authorization: Bearer <admin token>` from every caller
//!    (401 otherwise). `/v1/*` and `/api/*` (the OpenAI and Ollama routes)
//!    need `Authorization: Bearer <key>` with a key of `api.keys_file` when
//!    one is set (the admin token is accepted too).
//!    Tokens are compared by their BLAKE3 hashes, whose comparison is constant-time.
//! 4. `POST`/`PUT`/`PATCH` bodies to `/v1/*`, `/api/*` and `/admin/*` must be
//!    `application/json` (415 otherwise): a page cannot send JSON to another
//!    origin without a preflight, which step 2 refuses.
//!
//! Public without a token: the dashboard (`/`, its files, `/dashboard/state`,
//! `/events`) and `/metrics`; they only read.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Errors reading or creating the admin token or the API keys file.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file's content is not usable.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// No randomness for a new token.
    #[error("no randomness for a new admin token: {0}")]
    Random(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> AuthError + '_ {
    move |source| AuthError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Shortest token accepted from a file someone wrote by hand.
pub const MIN_TOKEN_LEN: usize = 32;

/// File name of the admin token in the data directory, by default.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// The admin API's bearer token.
#[derive(Clone)]
pub struct AdminToken {
    secret: String,
    hash: blake3::Hash,
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

impl AdminToken {
    fn new(secret: String) -> Self {
        let hash = blake3::hash(secret.as_bytes());
        AdminToken { secret, hash }
    }

    /// The token as sent in `Authorization: Bearer <token>`.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// Whether `presented` is this token (constant-time in its content).
    pub fn matches(&self, presented: &str) -> bool {
        blake3::hash(presented.as_bytes()) == self.hash
    }

    /// Reads the token at `path` (what the CLI does).
    pub fn read(path: &Path) -> Result<AdminToken, AuthError> {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        let t = text.trim();
        if t.len() < MIN_TOKEN_LEN || t.contains(|c: char| c.is_whitespace() || c.is_control()) {
            return Err(AuthError::Invalid {
                path: path.to_owned(),
                reason: format!(
                    "not an admin token (one line of at least {MIN_TOKEN_LEN} characters, no spaces); \
                     delete it to have the node make a new one"
                ),
            });
        }
        Ok(AdminToken::new(t.to_owned()))
    }

    /// Reads the token at `path`, or makes a new random one (256 bits, hex)
    /// there if the file does not exist: written to a temporary file with
    /// mode 0600, synced, then linked into place (never over another file).
    pub fn load_or_create(path: &Path) -> Result<AdminToken, AuthError> {
        use std::io::Write;
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        match std::fs::metadata(path) {
            Ok(m) => {
                if m.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(
                        path = %path.display(),
                        "the admin token file is readable by other users; chmod 600 it"
                    );
                }
                return AdminToken::read(path);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(path)(e)),
        }
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).map_err(|e| AuthError::Random(e.to_string()))?;
        let secret = hex::encode(raw);
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let tmp = dir.join(format!(
            ".{}.tmp-{}",
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| ADMIN_TOKEN_FILE.into()),
            std::process::id()
        ));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            // A stale temporary file keeps its old mode: set it again.
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            f.write_all(format!("{secret}\n").as_bytes())?;
            f.sync_all()
        };
        let linked = write().and_then(|()| std::fs::hard_link(&tmp, path));
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                if let Ok(d) = std::fs::File::open(dir) {
                    let _ = d.sync_all();
                }
                tracing::info!(path = %path.display(), "made a new admin API token");
                Ok(AdminToken::new(secret))
            }
            // Another process made it first: use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => AdminToken::read(path),
            Err(e) => Err(io_err(path)(e)),
        }
    }
}

/// The API keys of the OpenAI routes (`api.keys_file`).
#[derive(Clone)]
pub struct ApiKeys {
    hashes: Vec<blake3::Hash>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.hashes.len())
    }
}

impl ApiKeys {
    /// Reads a keys file: one key per line; blank lines and lines starting
    /// with `#` are skipped. A key has no spaces. At least one key is needed.
    pub fn read(path: &Path) -> Result<ApiKeys, AuthError> {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        let mut hashes = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let k = line.trim();
            if k.is_empty() || k.starts_with('#') {
                continue;
            }
            if k.contains(|c: char| c.is_whitespace() || c.is_control()) {
                return Err(AuthError::Invalid {
                    path: path.to_owned(),
                    reason: format!("line {}: a key must not contain spaces", n + 1),
                });
            }
            hashes.push(blake3::hash(k.as_bytes()));
        }
        if hashes.is_empty() {
            return Err(AuthError::Invalid {
                path: path.to_owned(),
                reason: "no keys in the file (one key per line)".into(),
            });
        }
        Ok(ApiKeys { hashes })
    }

    /// Whether `presented` is one of the keys (every key is compared, each in constant time).
    pub fn matches(&self, presented: &str) -> bool {
        let h = blake3::hash(presented.as_bytes());
        self.hashes.iter().fold(false, |acc, k| acc | (*k == h))
    }

    /// Whether `hash` is the BLAKE3 hash of one of the keys (a key scope a
    /// peer forwarded: `crate::route::proxy::KeyScope`).
    pub fn matches_hash(&self, hash: &[u8; 32]) -> bool {
        let h = blake3::Hash::from_bytes(*hash);
        self.hashes.iter().fold(false, |acc, k| acc | (*k == h))
    }

    /// How many keys there are.
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    /// Whether there are none (never true for a file read by [`ApiKeys::read`]).
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }
}

/// What [`guard`] checks against, built once when the router is.
#[derive(Clone, Debug)]
pub struct Guard {
    inner: Arc<GuardInner>,
}

#[derive(Debug)]
struct GuardInner {
    /// The admin token, or why there is none (then `/admin/*` answers 503).
    admin: Result<AdminToken, String>,
    /// Where the token lives (named in 401 answers).
    admin_path: PathBuf,
    keys: Option<ApiKeys>,
    hosts: Vec<String>,
    origins: Vec<String>,
}

impl Guard {
    /// A guard with these parts. `admin` is the token, or why none could be
    /// read (admin routes then answer 503 with that reason).
    pub fn new(
        admin: Result<AdminToken, String>,
        admin_path: PathBuf,
        keys: Option<ApiKeys>,
        allowed_hosts: &[String],
        allowed_origins: &[String],
    ) -> Guard {
        let norm = |v: &[String]| -> Vec<String> {
            v.iter()
                .map(|s| s.trim().trim_end_matches('/').to_ascii_lowercase())
                .collect()
        };
        Guard {
            inner: Arc::new(GuardInner {
                admin,
                admin_path,
                keys,
                hosts: norm(allowed_hosts),
                origins: norm(allowed_origins),
            }),
        }
    }

    /// Whether a `Host` header value (with or without port) is accepted.
    pub fn host_allowed(&self, host: &str) -> bool {
        let name = host_name(host);
        if name.parse::<std::net::IpAddr>().is_ok()
            || name == "localhost"
            || name.ends_with(".localhost")
        {
            return true;
        }
        self.inner.hosts.iter().any(|h| {
            h == "*"
                || *h == name
                || h.strip_prefix("*.")
                    .is_some_and(|suffix| name.ends_with(&format!(".{suffix}")))
        })
    }

    /// Whether a browser at `origin` may call the API reached under `host`.
    pub fn origin_allowed(&self, origin: &str, host: Option<&str>) -> bool {
        let origin = origin.trim().trim_end_matches('/').to_ascii_lowercase();
        if let (Some(host), Some(authority)) = (
            host,
            origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://")),
        ) && strip_default_port(authority) == strip_default_port(&host.to_ascii_lowercase())
        {
            return true;
        }
        self.cross_origin_allowed(&origin)
    }

    fn cross_origin_allowed(&self, origin: &str) -> bool {
        let origin = origin.trim().trim_end_matches('/').to_ascii_lowercase();
        origin != "null" && self.inner.origins.iter().any(|o| o == "*" || *o == origin)
    }
}

/// The host part of a `Host` value: no port, no brackets, lower case, no trailing dot.
fn host_name(host: &str) -> String {
    let h = host.trim();
    let name = if let Some(rest) = h.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        match h.rsplit_once(':') {
            Some((n, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !n.contains(':') => n,
            _ => h,
        }
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn strip_default_port(authority: &str) -> &str {
    authority
        .strip_suffix(":80")
        .or_else(|| authority.strip_suffix(":443"))
        .unwrap_or(authority)
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    super::ApiError(status, msg.into()).into_response()
}

/// An error in the OpenAI shape (`{"error": {"message", "type", "code"}}`), for `/v1/*`.
fn openai_error(status: StatusCode, msg: &str, kind: &str, code: &str) -> Response {
    (
        status,
        axum::Json(serde_json::json!({
            "error": { "message": msg, "type": kind, "param": null, "code": code }
        })),
    )
        .into_response()
}

/// Whether a request targets the model routes: OpenAI's (`/v1/*`) or
/// Ollama's (`/api/*`, the same keys).
fn is_openai(path: &str) -> bool {
    path == "/v1" || path.starts_with("/v1/") || path.starts_with("/api/")
}

/// Whether a request targets the admin routes.
fn is_admin(path: &str) -> bool {
    path == "/admin" || path.starts_with("/admin/")
}

/// The middleware: see the module documentation for what it checks, in order.
// long: the checks in the order the module documentation lists them, each
// an early return, so the whole policy is audited in one place.
pub async fn guard(State(g): State<Guard>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    let headers = req.headers();
    // 1. Host.
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    if let Some(h) = &host
        && !g.host_allowed(h)
    {
        tracing::debug!(host = %h, %path, "refused: Host not allowed");
        return error(
            StatusCode::FORBIDDEN,
            format!(
                "host {h:?} is not allowed; reach the node by IP address or localhost, \
                 or add the name to api.allowed_hosts"
            ),
        );
    }
    // 2. Origin (browsers), and CORS for allowed foreign origins.
    let origin = headers
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .map(str::to_owned);
    let mut cors: Option<HeaderValue> = None;
    if let Some(o) = &origin {
        if !g.origin_allowed(o, host.as_deref()) {
            tracing::debug!(origin = %o, %path, "refused: Origin not allowed");
            return error(
                StatusCode::FORBIDDEN,
                format!("origin {o:?} is not allowed; add it to api.allowed_origins"),
            );
        }
        if g.cross_origin_allowed(o) {
            cors = HeaderValue::from_str(o).ok();
        }
        if req.method() == Method::OPTIONS
            && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
        {
            let mut r = StatusCode::NO_CONTENT.into_response();
            let h = r.headers_mut();
            if let Some(v) = cors {
                h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
            }
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST"),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static("authorization, content-type, x-shoal-route"),
            );
            h.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("600"),
            );
            h.insert(header::VARY, HeaderValue::from_static("origin"));
            return r;
        }
    }
    // 3. Tokens.
    if is_admin(&path) {
        let token = match &g.inner.admin {
            Ok(t) => t,
            Err(why) => {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the admin API is off: no admin token ({why})"),
                );
            }
        };
        match bearer(headers) {
            Some(t) if token.matches(t) => {}
            presented => {
                let what = if presented.is_some() {
                    "wrong admin token"
                } else {
                    "the admin API needs a token"
                };
                let mut r = error(
                    StatusCode::UNAUTHORIZED,
                    format!(
                        "{what}: send `Authorization: Bearer <token>` with the token in {} \
                         on the node (the shoal CLI on that machine reads it)",
                        g.inner.admin_path.display()
                    ),
                );
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"shoal admin\""),
                );
                return r;
            }
        }
    } else if is_openai(&path)
        && let Some(keys) = &g.inner.keys
    {
        let ok = bearer(headers)
            .is_some_and(|t| keys.matches(t) | g.inner.admin.as_ref().is_ok_and(|a| a.matches(t)));
        if !ok {
            let msg = if bearer(headers).is_some() {
                "Incorrect API key provided."
            } else {
                "This node needs an API key: send `Authorization: Bearer <key>`."
            };
            let mut r = if path.starts_with("/api/") {
                // Ollama's shape on Ollama's routes.
                error(StatusCode::UNAUTHORIZED, msg)
            } else {
                openai_error(
                    StatusCode::UNAUTHORIZED,
                    msg,
                    "invalid_request_error",
                    "invalid_api_key",
                )
            };
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"shoal\""),
            );
            return r;
        }
    }
    // 4. JSON bodies only.
    if matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH)
        && (is_admin(&path) || is_openai(&path))
    {
        let json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            let msg = "request bodies must be JSON (Content-Type: application/json)";
            return if is_openai(&path) {
                openai_error(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    msg,
                    "invalid_request_error",
                    "unsupported_media_type",
                )
            } else {
                error(StatusCode::UNSUPPORTED_MEDIA_TYPE, msg)
            };
        }
    }
    // The key scope a forwarded request keeps (`crate::route`): the key's
    // hash, never the key.
    let mut req = req;
    if g.inner.keys.is_some() && is_openai(&path) {
        let scope = bearer(req.headers()).map(|t| *blake3::hash(t.as_bytes()).as_bytes());
        req.extensions_mut()
            .insert(crate::route::proxy::KeyScope(scope));
    }
    let mut resp = next.run(req).await;
    if let Some(v) = cors {
        let h = resp.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
        h.append(header::VARY, HeaderValue::from_static("origin"));
    }
    resp
}

/// Bounds the downloads started through `POST /admin/pull` (`api.max_pulls`).
#[derive(Clone, Debug)]
pub struct PullGate {
    permits: Arc<tokio::sync::Semaphore>,
    max: usize,
}

impl PullGate {
    /// At most `max` at once.
    pub fn new(max: usize) -> PullGate {
        PullGate {
            permits: Arc::new(tokio::sync::Semaphore::new(max.max(1))),
            max: max.max(1),
        }
    }

    /// A slot for one more download, or `None` when `max` are running.
    pub fn try_acquire(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
    }

    /// The bound.
    pub fn max(&self) -> usize {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard_with(hosts: &[&str], origins: &[&str]) -> Guard {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        Guard::new(
            Err("test".into()),
            PathBuf::from("/x"),
            None,
            &s(hosts),
            &s(origins),
        )
    }

    #[test]
    fn hosts() {
        let g = guard_with(&["pi-07.local", "*.example.lan"], &[]);
        for ok in [
            "127.0.0.1",
            "127.0.0.1:7070",
            "[::1]:7070",
            "10.0.0.7:7070",
            "localhost:7070",
            "LOCALHOST",
            "app.localhost",
            "pi-07.local:7070",
            "pi-07.local.",
            "ai.example.lan",
        ] {
            assert!(g.host_allowed(ok), "{ok}");
        }
        for bad in [
            "evil.example.com",
            "evil.example.com:7070",
            "example.lan",
            "localhost.evil.com",
            "127.0.0.1.nip.io",
        ] {
            assert!(!g.host_allowed(bad), "{bad}");
        }
        assert!(guard_with(&["*"], &[]).host_allowed("anything.example"));
    }

    #[test]
    fn origins() {
        let g = guard_with(&[], &["http://notebook.lan:8888"]);
        assert!(g.origin_allowed("http://127.0.0.1:7070", Some("127.0.0.1:7070")));
        assert!(g.origin_allowed("http://pi:80", Some("pi")));
        assert!(g.origin_allowed("http://notebook.lan:8888/", Some("10.0.0.1:7070")));
        assert!(!g.origin_allowed("http://evil.com", Some("127.0.0.1:7070")));
        assert!(!g.origin_allowed("null", Some("127.0.0.1:7070")));
        assert!(!g.origin_allowed("http://127.0.0.1:7071", Some("127.0.0.1:7070")));
        assert!(guard_with(&[], &["*"]).origin_allowed("https://x.y", Some("a")));
    }

    #[test]
    fn token_file_is_made_once_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("sub/admin.token");
        let t = AdminToken::load_or_create(&p).expect("create");
        assert_eq!(t.secret().len(), 64);
        assert!(t.secret().bytes().all(|b| b.is_ascii_hexdigit()));
        let mode = std::fs::metadata(&p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = AdminToken::load_or_create(&p).expect("read");
        assert_eq!(again.secret(), t.secret());
        assert!(t.matches(again.secret()) && !t.matches("x"));
        let names: Vec<_> = std::fs::read_dir(d.path().join("sub"))
            .expect("dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("admin.token")]);
        std::fs::write(&p, "short\n").expect("write");
        assert!(matches!(
            AdminToken::read(&p),
            Err(AuthError::Invalid { .. })
        ));
    }

    #[test]
    fn keys_file() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("keys");
        std::fs::write(&p, "# class keys\n\nsk-alpha\n  sk-beta  \n").expect("write");
        let k = ApiKeys::read(&p).expect("read");
        assert_eq!(k.len(), 2);
        assert!(k.matches("sk-alpha") && k.matches("sk-beta"));
        assert!(!k.matches("sk-gamma") && !k.matches("# class keys"));
        std::fs::write(&p, "# nothing\n").expect("write");
        assert!(ApiKeys::read(&p).is_err());
        std::fs::write(&p, "two words\n").expect("write");
        assert!(ApiKeys::read(&p).is_err());
    }
}
