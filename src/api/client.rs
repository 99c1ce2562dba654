//! A small client for the admin API (used by the CLI; plain HTTP/1.1 on loopback).
//!
//! The admin API needs the node's bearer token: [`AdminClient::with_token_file`]
//! reads it from the node's data directory (`<data_dir>/admin.token`, or
//! `api.admin_token_file`), which is what the CLI on the same machine does.

use super::auth::AdminToken;
use crate::mesh::origin::{HttpUrl, http_request};
use serde::{Serialize, de::DeserializeOwned};
use std::path::Path;
use std::time::Duration;

/// Talks to a daemon's admin API at `host:port`.
#[derive(Debug, Clone)]
pub struct AdminClient {
    base: String,
    /// `Authorization` header value.
    auth: Option<String>,
    /// Why no token could be read, added to a 401's message.
    token_problem: Option<String>,
    /// How long one request may take.
    timeout: Duration,
}

impl AdminClient {
    /// A client for the API at `addr` (`host:port`), without a token.
    pub fn new(addr: &str) -> Self {
        Self {
            base: format!("http://{addr}"),
            auth: None,
            token_problem: None,
            timeout: Duration::from_secs(30),
        }
    }

    /// Lets each request take up to `timeout` (30 s by default): store
    /// commands run through the daemon (hashing a large file) take longer.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sends `token` with every request.
    pub fn with_token(mut self, token: &AdminToken) -> Self {
        self.auth = Some(format!("Bearer {}", token.secret()));
        self.token_problem = None;
        self
    }

    /// Sends the token read from `path` with every request; if it cannot be
    /// read, requests go without one and a refusal says why.
    pub fn with_token_file(self, path: &Path) -> Self {
        match AdminToken::read(path) {
            Ok(t) => self.with_token(&t),
            Err(e) => Self {
                token_problem: Some(format!(
                    "could not read the admin token: {e} (run the command as the node's user, \
                     or give the node's --data-dir / api.admin_token_file)"
                )),
                ..self
            },
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, String> {
        let url = HttpUrl::parse(&format!("{}{path}", self.base)).map_err(|e| e.to_string())?;
        let mut headers: Vec<(&str, &str)> = Vec::new();
        if body.is_some() {
            headers.push(("Content-Type", "application/json"));
        }
        if let Some(a) = &self.auth {
            headers.push(("Authorization", a));
        }
        let res = http_request(
            method,
            &url,
            &headers,
            body.as_deref().unwrap_or(&[]),
            self.timeout,
        )
        .await
        .map_err(|e| {
            format!(
                "cannot reach the shoal daemon at {}: {e} (is `shoal serve` running?)",
                self.base
            )
        })?;
        if !(200..300).contains(&res.status) {
            let msg = serde_json::from_slice::<serde_json::Value>(&res.body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&res.body).into_owned());
            let hint = match (&self.token_problem, res.status) {
                (Some(p), 401) => format!(" ({p})"),
                _ => String::new(),
            };
            return Err(format!("{} {path}: {} {msg}{hint}", method, res.status));
        }
        serde_json::from_slice(&res.body).map_err(|e| format!("{path}: bad answer: {e}"))
    }

    /// `GET path`, JSON answer.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, String> {
        self.call("GET", path, None).await
    }

    /// `POST path` with a JSON body, JSON answer.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, String> {
        let b = serde_json::to_vec(body).map_err(|e| e.to_string())?;
        self.call("POST", path, Some(b)).await
    }
}
