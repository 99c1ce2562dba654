//! Origin fallback: chunks no peer holds, fetched from the release's origin
//! URL with HTTP Range requests, the ETag pinned at the first response.
//!
//! Plain `http://` only (a minimal HTTP/1.1 client, one connection per
//! request); the bytes are verified by the store like any peer's.

use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest HTTP response accepted (a chunk, or an admin API answer).
const MAX_RESPONSE: usize = 64 << 20;

/// A parsed `http://host:port/path` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    /// `host:port` to connect to.
    pub authority: String,
    /// Host header value.
    pub host: String,
    /// Path and query.
    pub path: String,
}

impl HttpUrl {
    /// Parses an `http://` URL (no userinfo, no TLS).
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("{url}: only http:// origins are supported"))?;
        let (auth, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if auth.is_empty() || auth.contains('@') {
            return Err(format!("{url}: bad host"));
        }
        let authority = if auth
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            auth.to_owned()
        } else {
            format!("{auth}:80")
        };
        Ok(Self {
            authority,
            host: auth.to_owned(),
            path: path.to_owned(),
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

/// One HTTP/1.1 request with `Connection: close`.
pub async fn http_request(
    method: &str,
    url: &HttpUrl,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<HttpResponse, String> {
    let fut = async {
        let mut s = TcpStream::connect(&url.authority)
            .await
            .map_err(|e| format!("connect {}: {e}", url.authority))?;
        let mut req = format!(
            "{method} {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            url.path,
            url.host,
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(body).await.map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        (&mut s)
            .take(MAX_RESPONSE as u64 + 65536)
            .read_to_end(&mut raw)
            .await
            .map_err(|e| e.to_string())?;
        parse_response(&raw)
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| format!("{} timed out", url.authority))?
}

/// Parses a complete HTTP/1.1 response (Content-Length, chunked, or read-to-close bodies).
pub fn parse_response(raw: &[u8]) -> Result<HttpResponse, String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("truncated response head")?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| "response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or("empty response")?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
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
    if res
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        let mut at = rest;
        loop {
            let nl = at
                .windows(2)
                .position(|w| w == b"\r\n")
                .ok_or("truncated chunked body")?;
            let size_str = std::str::from_utf8(&at[..nl]).map_err(|_| "bad chunk size")?;
            let size = usize::from_str_radix(size_str.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| "bad chunk size")?;
            at = &at[nl + 2..];
            if size == 0 {
                break;
            }
            if at.len() < size + 2 || res.body.len() + size > MAX_RESPONSE {
                return Err("truncated chunked body".into());
            }
            res.body.extend_from_slice(&at[..size]);
            at = &at[size + 2..];
        }
    } else if let Some(len) = res.header("content-length") {
        let len: usize = len.parse().map_err(|_| "bad content-length")?;
        if rest.len() < len {
            return Err(format!("body truncated at {} of {len} bytes", rest.len()));
        }
        res.body = rest[..len].to_vec();
    } else {
        res.body = rest.to_vec();
    }
    Ok(res)
}

/// An origin serving one artifact's file.
#[derive(Clone)]
pub struct Origin {
    url: HttpUrl,
    etag: Arc<Mutex<Option<String>>>,
    bytes: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
}

impl Origin {
    /// An origin at `url` (`http://` only).
    pub fn new(url: &str) -> Result<Self, String> {
        Ok(Self {
            url: HttpUrl::parse(url)?,
            etag: Arc::new(Mutex::new(None)),
            bytes: Arc::new(AtomicU64::new(0)),
            requests: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Bytes received from the origin so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Requests made so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Fetches the manifest published next to the file (`<url>.manifest`, the
    /// canonical bytes) and verifies it against `id`.
    pub async fn manifest(
        &self,
        id: &crate::store::ArtifactId,
    ) -> Result<crate::store::Manifest, String> {
        let url = HttpUrl {
            path: format!("{}.manifest", self.url.path),
            ..self.url.clone()
        };
        self.requests.fetch_add(1, Ordering::Relaxed);
        let res = http_request("GET", &url, &[], &[], Duration::from_secs(60)).await?;
        if res.status != 200 {
            return Err(format!("origin answered {} for the manifest", res.status));
        }
        crate::store::Manifest::decode_verified(&res.body, id).map_err(|e| e.to_string())
    }

    /// Fetches `[offset, offset+len)` with a Range request; the ETag must not change between requests.
    pub async fn fetch(&self, offset: u64, len: u32) -> Result<Vec<u8>, String> {
        let range = format!("bytes={}-{}", offset, offset + u64::from(len) - 1);
        let etag = self.etag.lock().clone();
        let mut headers = vec![("Range", range.as_str())];
        if let Some(e) = &etag {
            headers.push(("If-Range", e.as_str()));
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        let res = http_request("GET", &self.url, &headers, &[], Duration::from_secs(60)).await?;
        if res.status != 206 {
            return Err(format!(
                "origin answered {} to a range request (file changed?)",
                res.status
            ));
        }
        match (etag, res.header("etag")) {
            (Some(want), Some(got)) if want != got => {
                return Err(format!("origin ETag changed from {want} to {got}"));
            }
            (None, Some(got)) => *self.etag.lock() = Some(got.to_owned()),
            _ => {}
        }
        if res.body.len() != len as usize {
            return Err(format!(
                "origin sent {} bytes for a {len}-byte range",
                res.body.len()
            ));
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
        assert_eq!(u.authority, "10.0.0.1:8080");
        assert_eq!(u.path, "/models/a.gguf");
        assert_eq!(
            HttpUrl::parse("http://host").expect("url").authority,
            "host:80"
        );
        assert!(HttpUrl::parse("https://host/x").is_err());
        assert!(HttpUrl::parse("http:///x").is_err());
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
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab").is_err());
        assert!(parse_response(b"garbage").is_err());
    }
}
