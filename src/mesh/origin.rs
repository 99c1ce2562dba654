//! Origin fallback: chunks no peer holds, fetched from the release's origin
//! URL with HTTP Range requests, the ETag pinned at the first response.
//!
//! A minimal HTTP/1.1 client, one connection per request, over plain TCP
//! (`http://`) or TLS (`https://`, rustls with the ring provider). TLS
//! trusts the system's CA bundle plus an optional extra PEM file of CA
//! certificates ([`MeshConfig::origin_ca_file`](super::MeshConfig::origin_ca_file),
//! for sites with an internal CA); the server's certificate must be valid
//! for the URL's host (SNI and name check on, no way to turn them off). The
//! bytes are verified by the store like any peer's.
//!
//! The same client also talks to a daemon's admin API ([`crate::api::client`]).

use parking_lot::Mutex;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest HTTP response accepted (a chunk, or an admin API answer).
const MAX_RESPONSE: usize = 64 << 20;
/// Room for the response head on top of [`MAX_RESPONSE`].
const MAX_HEAD: usize = 64 << 10;
/// Time allowed for one origin request (connect, TLS handshake, transfer).
const ORIGIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors talking to an origin (or to any HTTP server through this module).
#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    /// The URL cannot be used.
    #[error("bad URL {url:?}: {reason}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The TCP connection could not be made.
    #[error("cannot connect to {authority}: {source}")]
    Connect {
        /// `host:port`.
        authority: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TLS handshake (or the TLS layer later on) failed: an untrusted
    /// or wrong-name certificate, no common protocol version, a bad record.
    #[error("TLS with {host} failed: {reason}")]
    Tls {
        /// The server name that was checked.
        host: String,
        /// The TLS error, with a hint for certificate problems.
        reason: String,
    },
    /// The extra CA file cannot be used.
    #[error("CA file {}: {reason}", path.display())]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// No trust roots at all: no system CA bundle and no CA file.
    #[error(
        "no trusted CA certificates for https:// (no system CA bundle found; set mesh.origin_ca_file)"
    )]
    NoTrustRoots,
    /// Sending the request or reading the answer failed.
    #[error("I/O with {authority}: {source}")]
    Io {
        /// `host:port`.
        authority: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The request did not complete in time.
    #[error("{authority} timed out after {after:?}")]
    Timeout {
        /// `host:port`.
        authority: String,
        /// The time allowed.
        after: Duration,
    },
    /// The answer is not a well-formed HTTP/1.1 response.
    #[error("malformed HTTP response: {0}")]
    Malformed(String),
    /// The answer ended before its declared end.
    #[error("truncated HTTP response: {0}")]
    Truncated(String),
    /// The answer is larger than this client accepts.
    #[error("HTTP response larger than {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// The origin answered with an unexpected status.
    #[error("origin answered {status} to {what}")]
    Status {
        /// HTTP status code.
        status: u16,
        /// What was asked (and why the status is wrong).
        what: String,
    },
    /// The origin's ETag differs from the one pinned at its first answer:
    /// the file changed during the download, and versions are never mixed.
    #[error("origin ETag changed from {was} to {now} (the file changed; refusing to mix versions)")]
    EtagChanged {
        /// The pinned ETag.
        was: String,
        /// The ETag now (or `none`).
        now: String,
    },
    /// The origin answered a range request with another range or length.
    #[error("origin sent the wrong range: {0}")]
    WrongRange(String),
    /// The manifest published next to the file does not verify against the artifact id.
    #[error("the origin's manifest does not verify: {0}")]
    Manifest(#[from] crate::store::ManifestError),
}

/// URL scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP.
    Http,
    /// HTTP over TLS.
    Https,
}

impl Scheme {
    /// 80 or 443.
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

/// A parsed `http://` or `https://` URL: `scheme://host[:port][/path][?query]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    /// Plain or TLS.
    pub scheme: Scheme,
    /// `host:port` to connect to (IPv6 addresses in brackets).
    pub authority: String,
    /// Host header value (host and port as written in the URL).
    pub host: String,
    /// The host alone (no port, no brackets): the TLS server name that is checked.
    pub hostname: String,
    /// Path and query.
    pub path: String,
}

impl HttpUrl {
    /// Parses an `http://` or `https://` URL (no user info; the fragment is dropped).
    pub fn parse(url: &str) -> Result<Self, OriginError> {
        let bad = |reason: &str| OriginError::BadUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        if url.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(bad("contains spaces or control characters"));
        }
        let (scheme, rest) = match url.split_once("://") {
            Some((s, r)) if s.eq_ignore_ascii_case("http") => (Scheme::Http, r),
            Some((s, r)) if s.eq_ignore_ascii_case("https") => (Scheme::Https, r),
            _ => return Err(bad("only http:// and https:// URLs are supported")),
        };
        let rest = rest.split('#').next().unwrap_or_default();
        let (auth, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let path = if path.starts_with('/') {
            path.to_owned()
        } else {
            format!("/{path}")
        };
        if auth.contains('@') {
            return Err(bad("user names and passwords in URLs are not supported"));
        }
        let (hostname, port, bracketed) = match auth.strip_prefix('[') {
            Some(r) => {
                let (h, after) = r
                    .split_once(']')
                    .ok_or_else(|| bad("unclosed '[' in the host"))?;
                h.parse::<Ipv6Addr>().map_err(|_| bad("bad IPv6 address"))?;
                let port = match after {
                    "" => None,
                    p => Some(
                        p.strip_prefix(':')
                            .ok_or_else(|| bad("junk after the IPv6 address"))?,
                    ),
                };
                (h, port, true)
            }
            None => match auth.split_once(':') {
                Some((h, p)) => (h, Some(p), false),
                None => (auth, None, false),
            },
        };
        if hostname.is_empty() {
            return Err(bad("no host"));
        }
        let port = match port {
            None => scheme.default_port(),
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| bad("bad port (IPv6 addresses need brackets)"))?,
        };
        if scheme == Scheme::Https && ServerName::try_from(hostname).is_err() {
            return Err(bad("the host is not a valid TLS server name"));
        }
        let authority = if bracketed {
            format!("[{hostname}]:{port}")
        } else {
            format!("{hostname}:{port}")
        };
        Ok(Self {
            scheme,
            authority,
            host: auth.to_owned(),
            hostname: hostname.to_owned(),
            path,
        })
    }
}

/// An HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// First header named `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Trust roots and TLS settings for `https://` URLs: the system's CA bundle
/// plus, optionally, the certificates of a PEM file.
#[derive(Clone)]
pub struct OriginTls {
    connector: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for OriginTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OriginTls")
    }
}

/// The system's CA bundle, read once per process (it can be a large file).
/// `SSL_CERT_FILE` / `SSL_CERT_DIR` replace the default locations.
fn system_roots() -> &'static RootCertStore {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::debug!(error = %e, "reading the system CA bundle");
        }
        let mut roots = RootCertStore::empty();
        let (added, ignored) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            tracing::warn!(
                "no system CA certificates found: https:// origins need mesh.origin_ca_file"
            );
        } else {
            tracing::debug!(added, ignored, "system CA certificates loaded");
        }
        roots
    })
}

/// Reads a PEM file of CA certificates (one or more `CERTIFICATE` blocks;
/// other blocks are ignored) into trust roots. Fails when the file cannot
/// be read, holds no certificate, or holds one that is not a usable CA.
pub fn read_ca_file(path: &Path) -> Result<RootCertStore, OriginError> {
    let err = |reason: String| OriginError::CaFile {
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no PEM CERTIFICATE block in the file".into()));
    }
    let mut roots = RootCertStore::empty();
    for (i, c) in certs.into_iter().enumerate() {
        roots
            .add(c)
            .map_err(|e| err(format!("certificate {}: {e}", i + 1)))?;
    }
    Ok(roots)
}

impl OriginTls {
    /// The system's CA bundle plus the certificates in `extra_ca` (PEM), if given.
    pub fn new(extra_ca: Option<&Path>) -> Result<Self, OriginError> {
        let mut roots = system_roots().clone();
        if let Some(p) = extra_ca {
            let extra = read_ca_file(p)?;
            tracing::debug!(file = %p.display(), certs = extra.len(), "extra CA certificates for origins");
            roots.roots.extend(extra.roots);
        }
        if roots.is_empty() {
            return Err(OriginError::NoTrustRoots);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| OriginError::Tls {
                host: "-".into(),
                reason: e.to_string(),
            })?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }
}

/// A TLS failure as an [`OriginError`], with a hint for certificate problems.
fn tls_error(host: &str, e: &std::io::Error) -> OriginError {
    let reason = match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(c)) => {
            let hint = match c {
                rustls::CertificateError::UnknownIssuer
                | rustls::CertificateError::BadSignature => {
                    " (the server's CA is not trusted: add it to the system bundle or set mesh.origin_ca_file)"
                }
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. } => {
                    " (the certificate is for another host name)"
                }
                rustls::CertificateError::Expired
                | rustls::CertificateError::ExpiredContext { .. }
                | rustls::CertificateError::NotValidYet
                | rustls::CertificateError::NotValidYetContext { .. } => {
                    " (check the certificate's dates and this machine's clock)"
                }
                _ => "",
            };
            format!("invalid server certificate: {c}{hint}")
        }
        Some(r) => r.to_string(),
        None => e.to_string(),
    };
    OriginError::Tls {
        host: host.to_owned(),
        reason,
    }
}

/// How a response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// Content-Length or chunked: its end is known.
    Delimited,
    /// Read until the connection closes.
    Close,
}

/// Writes the request and reads everything until the server closes.
/// Returns the bytes and whether the close was clean (a TLS close_notify;
/// always true for plain TCP).
async fn exchange<S>(mut s: S, head: &[u8], body: &[u8]) -> std::io::Result<(Vec<u8>, bool)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    s.write_all(head).await?;
    s.write_all(body).await?;
    s.flush().await?;
    let mut raw = Vec::with_capacity(64 << 10);
    loop {
        if raw.len() > MAX_RESPONSE + MAX_HEAD {
            return Err(std::io::Error::other(OriginError::TooLarge {
                limit: MAX_RESPONSE,
            }));
        }
        raw.reserve(64 << 10);
        match s.read_buf(&mut raw).await {
            Ok(0) => return Ok((raw, true)),
            Ok(_) => {}
            // rustls: the peer closed the TCP connection without close_notify.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok((raw, false)),
            Err(e) => return Err(e),
        }
    }
}

/// One HTTP/1.1 request with `Connection: close`, over TLS for `https://`
/// (with `tls`, or the system's CA bundle when `None`).
async fn request(
    method: &str,
    url: &HttpUrl,
    headers: &[(&str, &str)],
    body: &[u8],
    tls: Option<&OriginTls>,
) -> Result<HttpResponse, OriginError> {
    let mut head = format!(
        "{method} {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
        url.path,
        url.host,
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let tcp = TcpStream::connect(&url.authority)
        .await
        .map_err(|source| OriginError::Connect {
            authority: url.authority.clone(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    let io_err = |source: std::io::Error| {
        if source
            .get_ref()
            .is_some_and(|inner| inner.is::<rustls::Error>())
        {
            return tls_error(&url.hostname, &source);
        }
        match source.downcast::<OriginError>() {
            Ok(e) => e,
            Err(source) => OriginError::Io {
                authority: url.authority.clone(),
                source,
            },
        }
    };
    let (raw, clean) = match url.scheme {
        Scheme::Http => exchange(tcp, head.as_bytes(), body).await.map_err(io_err)?,
        Scheme::Https => {
            let system;
            let tls = match tls {
                Some(t) => t,
                None => {
                    system = OriginTls::new(None)?;
                    &system
                }
            };
            let name =
                ServerName::try_from(url.hostname.clone()).map_err(|e| OriginError::BadUrl {
                    url: url.host.clone(),
                    reason: e.to_string(),
                })?;
            let s = tls
                .connector
                .connect(name, tcp)
                .await
                .map_err(|e| tls_error(&url.hostname, &e))?;
            exchange(s, head.as_bytes(), body).await.map_err(io_err)?
        }
    };
    let (res, framing) = parse(&raw)?;
    if !clean && framing == Framing::Close {
        // Without close_notify, a body that ends at the close may be cut short.
        return Err(OriginError::Truncated(
            "the TLS connection closed without close_notify before a body of unknown length".into(),
        ));
    }
    Ok(res)
}

/// One HTTP/1.1 request with `Connection: close`. `https://` URLs trust the
/// system's CA bundle only (origins use [`Origin`], which adds the configured CA file).
pub async fn http_request(
    method: &str,
    url: &HttpUrl,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<HttpResponse, OriginError> {
    tokio::time::timeout(timeout, request(method, url, headers, body, None))
        .await
        .map_err(|_| OriginError::Timeout {
            authority: url.authority.clone(),
            after: timeout,
        })?
}

/// Parses a complete HTTP/1.1 response (Content-Length, chunked, or read-to-close bodies).
pub fn parse_response(raw: &[u8]) -> Result<HttpResponse, OriginError> {
    parse(raw).map(|(r, _)| r)
}

fn parse(raw: &[u8]) -> Result<(HttpResponse, Framing), OriginError> {
    let malformed = |m: &str| OriginError::Malformed(m.to_owned());
    let truncated = |m: String| OriginError::Truncated(m);
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| truncated("no end of the response head".into()))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| malformed("head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or_else(|| malformed("empty response"))?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| OriginError::Malformed(format!("bad status line {status_line:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let rest = &raw[end + 4..];
    let mut res = HttpResponse {
        status,
        headers,
        body: Vec::new(),
    };
    let mut framing = Framing::Delimited;
    if res
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        let mut at = rest;
        loop {
            let nl = at
                .windows(2)
                .position(|w| w == b"\r\n")
                .ok_or_else(|| truncated("chunked body ends inside a chunk size".into()))?;
            let size_str =
                std::str::from_utf8(&at[..nl]).map_err(|_| malformed("bad chunk size"))?;
            let size = usize::from_str_radix(size_str.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| malformed("bad chunk size"))?;
            at = &at[nl + 2..];
            if size == 0 {
                break;
            }
            if res.body.len().saturating_add(size) > MAX_RESPONSE {
                return Err(OriginError::TooLarge {
                    limit: MAX_RESPONSE,
                });
            }
            if at.len() < size.saturating_add(2) {
                return Err(truncated("chunked body ends inside a chunk".into()));
            }
            res.body.extend_from_slice(&at[..size]);
            at = &at[size + 2..];
        }
    } else if let Some(len) = res.header("content-length") {
        let len: usize = len.parse().map_err(|_| malformed("bad content-length"))?;
        if len > MAX_RESPONSE {
            return Err(OriginError::TooLarge {
                limit: MAX_RESPONSE,
            });
        }
        if rest.len() < len {
            return Err(truncated(format!(
                "body ends at {} of {len} bytes",
                rest.len()
            )));
        }
        res.body = rest[..len].to_vec();
    } else {
        framing = Framing::Close;
        res.body = rest.to_vec();
    }
    Ok((res, framing))
}

/// An origin serving one artifact's file.
#[derive(Clone)]
pub struct Origin {
    url: HttpUrl,
    tls: Option<OriginTls>,
    etag: Arc<Mutex<Option<String>>>,
    bytes: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    warned: Arc<AtomicBool>,
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origin")
            .field("url", &self.url)
            .field("etag", &*self.etag.lock())
            .finish_non_exhaustive()
    }
}

impl Origin {
    /// An origin at `url` (`http://` or `https://`). For `https://`, the
    /// server's certificate must chain to the system's CA bundle or to a
    /// certificate in `extra_ca` (a PEM file), and be valid for the URL's host.
    pub fn new(url: &str, extra_ca: Option<&Path>) -> Result<Self, OriginError> {
        let url = HttpUrl::parse(url)?;
        let tls = match url.scheme {
            Scheme::Https => Some(OriginTls::new(extra_ca)?),
            Scheme::Http => None,
        };
        Ok(Self {
            url,
            tls,
            etag: Arc::new(Mutex::new(None)),
            bytes: Arc::new(AtomicU64::new(0)),
            requests: Arc::new(AtomicU64::new(0)),
            warned: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The origin's URL.
    pub fn url(&self) -> &HttpUrl {
        &self.url
    }

    /// Bytes received from the origin so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Requests made so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// The ETag pinned by the first range answer, if any.
    pub fn etag(&self) -> Option<String> {
        self.etag.lock().clone()
    }

    async fn get(
        &self,
        url: &HttpUrl,
        headers: &[(&str, &str)],
    ) -> Result<HttpResponse, OriginError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let res = tokio::time::timeout(
            ORIGIN_TIMEOUT,
            request("GET", url, headers, &[], self.tls.as_ref()),
        )
        .await
        .unwrap_or_else(|_| {
            Err(OriginError::Timeout {
                authority: url.authority.clone(),
                after: ORIGIN_TIMEOUT,
            })
        });
        if let Err(e) = &res {
            // Loud once per download (a TLS or connection problem repeats on every retry).
            if self.warned.swap(true, Ordering::Relaxed) {
                tracing::debug!(origin = %url.authority, path = %url.path, error = %e, "origin request failed");
            } else {
                tracing::warn!(origin = %url.authority, path = %url.path, error = %e, "origin request failed");
            }
        }
        res
    }

    /// Fetches the manifest published next to the file (`<url>.manifest`, the
    /// canonical bytes) and verifies it against `id`.
    pub async fn manifest(
        &self,
        id: &crate::store::ArtifactId,
    ) -> Result<crate::store::Manifest, OriginError> {
        let (path, query) = match self.url.path.split_once('?') {
            Some((p, q)) => (p, format!("?{q}")),
            None => (self.url.path.as_str(), String::new()),
        };
        let url = HttpUrl {
            path: format!("{path}.manifest{query}"),
            ..self.url.clone()
        };
        let res = self.get(&url, &[]).await?;
        if res.status != 200 {
            return Err(OriginError::Status {
                status: res.status,
                what: format!("GET {} (the manifest)", url.path),
            });
        }
        Ok(crate::store::Manifest::decode_verified(&res.body, id)?)
    }

    /// Fetches `[offset, offset+len)` with a Range request. The first answer's
    /// ETag is pinned and sent as `If-Range` from then on; an answer with
    /// another ETag (or none), a status other than 206, another range or
    /// another length is refused.
    pub async fn fetch(&self, offset: u64, len: u32) -> Result<Vec<u8>, OriginError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let last = offset + u64::from(len) - 1;
        let range = format!("bytes={offset}-{last}");
        let pinned = self.etag();
        let mut headers = vec![("Range", range.as_str())];
        if let Some(e) = &pinned {
            headers.push(("If-Range", e.as_str()));
        }
        let res = self.get(&self.url, &headers).await?;
        if res.status != 206 {
            return Err(OriginError::Status {
                status: res.status,
                what: format!("a range request, {range} (206 expected: file changed?)"),
            });
        }
        {
            // Compared with the ETag pinned now (not when the request left):
            // of two first answers that race, both must carry the same ETag.
            let mut etag = self.etag.lock();
            match (etag.as_deref(), res.header("etag")) {
                (Some(want), got) if got != Some(want) => {
                    return Err(OriginError::EtagChanged {
                        was: want.to_owned(),
                        now: got.unwrap_or("none").to_owned(),
                    });
                }
                (None, Some(got)) => *etag = Some(got.to_owned()),
                _ => {}
            }
        }
        match res.header("content-range") {
            Some(cr) if cr.starts_with(&format!("bytes {offset}-{last}/")) => {}
            Some(cr) => {
                return Err(OriginError::WrongRange(format!(
                    "asked for {range}, got Content-Range {cr}"
                )));
            }
            None => {
                return Err(OriginError::WrongRange(format!(
                    "asked for {range}, got a 206 without Content-Range"
                )));
            }
        }
        if res.body.len() != len as usize {
            return Err(OriginError::WrongRange(format!(
                "{} bytes for a {len}-byte range",
                res.body.len()
            )));
        }
        self.bytes.fetch_add(u64::from(len), Ordering::Relaxed);
        Ok(res.body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = HttpUrl::parse("http://10.0.0.1:8080/models/a.gguf").expect("url");
        assert_eq!(u.scheme, Scheme::Http);
        assert_eq!(u.authority, "10.0.0.1:8080");
        assert_eq!(u.host, "10.0.0.1:8080");
        assert_eq!(u.hostname, "10.0.0.1");
        assert_eq!(u.path, "/models/a.gguf");
        let u = HttpUrl::parse("http://host").expect("url");
        assert_eq!((u.authority.as_str(), u.path.as_str()), ("host:80", "/"));
        assert_eq!(
            HttpUrl::parse("http://host?x=1#frag").expect("url").path,
            "/?x=1"
        );
        for bad in [
            "ftp://host/x",
            "host/x",
            "http:///x",
            "http://user:pw@host/x",
            "http://host:/x",
            "http://host:0/x",
            "http://host:99999/x",
            "http://::1/x",
            "http://[::1/x",
            "http://[nonsense]/x",
            "http://host/a b",
            "http://host/a\r\nX-Injected: 1",
        ] {
            assert!(HttpUrl::parse(bad).is_err(), "{bad} should not parse");
        }
        let e = HttpUrl::parse("ftp://h/x").expect_err("ftp");
        assert!(e.to_string().contains("only http:// and https://"), "{e}");
    }

    #[test]
    fn https_urls() {
        let u = HttpUrl::parse("https://models.example.lan/m/a.gguf").expect("url");
        assert_eq!(u.scheme, Scheme::Https);
        assert_eq!(u.authority, "models.example.lan:443");
        assert_eq!(u.host, "models.example.lan");
        assert_eq!(u.hostname, "models.example.lan");
        assert_eq!(u.path, "/m/a.gguf");
        let u = HttpUrl::parse("HTTPS://127.0.0.1:8443/a.bin").expect("url");
        assert_eq!(
            (u.scheme, u.authority.as_str(), u.hostname.as_str()),
            (Scheme::Https, "127.0.0.1:8443", "127.0.0.1")
        );
        let u = HttpUrl::parse("https://[::1]:8443/a.bin").expect("url");
        assert_eq!(
            (u.authority.as_str(), u.host.as_str(), u.hostname.as_str()),
            ("[::1]:8443", "[::1]:8443", "::1")
        );
        assert_eq!(
            HttpUrl::parse("https://[::1]/a").expect("url").authority,
            "[::1]:443"
        );
        assert!(HttpUrl::parse("https://bad_name!/a").is_err());
        assert!(HttpUrl::parse("https://host:443x/a").is_err());
    }

    #[test]
    fn responses() {
        let r = parse_response(
            b"HTTP/1.1 206 Partial Content\r\nETag: \"x\"\r\nContent-Length: 3\r\n\r\nabcdef",
        )
        .expect("parse");
        assert_eq!(
            (r.status, r.header("etag"), r.body.as_slice()),
            (206, Some("\"x\""), &b"abc"[..])
        );
        let r = parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
            .expect("parse");
        assert_eq!(r.body, b"abcde");
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab"),
            Err(OriginError::Truncated(_))
        ));
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab"),
            Err(OriginError::Truncated(_))
        ));
        assert!(parse_response(b"garbage").is_err());
        assert!(matches!(
            parse_response(b"HTTP/1.1 xyz\r\n\r\n"),
            Err(OriginError::Malformed(_))
        ));
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n"),
            Err(OriginError::TooLarge { .. })
        ));
        let (_, f) = parse(b"HTTP/1.1 200 OK\r\n\r\nto the end").expect("parse");
        assert_eq!(f, Framing::Close);
    }

    #[test]
    fn ca_files() {
        let dir = tempfile::tempdir().expect("tmp");
        let missing = dir.path().join("missing.pem");
        assert!(matches!(
            read_ca_file(&missing),
            Err(OriginError::CaFile { .. })
        ));
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no pem here\n").expect("write");
        let e = read_ca_file(&empty).expect_err("empty");
        assert!(e.to_string().contains("no PEM CERTIFICATE"), "{e}");
        let junk = dir.path().join("junk.pem");
        std::fs::write(
            &junk,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        assert!(read_ca_file(&junk).is_err());
        assert!(Origin::new("https://127.0.0.1:1/a", Some(&junk)).is_err());
        // Plain http never reads the CA file.
        assert!(Origin::new("http://127.0.0.1:1/a", Some(&junk)).is_ok());
    }
}
