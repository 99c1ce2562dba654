//! A small client for the admin API (used by the CLI; plain HTTP/1.1 on loopback).

use crate::mesh::origin::{HttpUrl, http_request};
use serde::{Serialize, de::DeserializeOwned};
use std::time::Duration;

/// Talks to a daemon's admin API at `host:port`.
#[derive(Debug, Clone)]
pub struct AdminClient {
    base: String,
}

impl AdminClient {
    /// A client for the API at `addr` (`host:port`).
    pub fn new(addr: &str) -> Self {
        Self {
            base: format!("http://{addr}"),
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, String> {
        let url = HttpUrl::parse(&format!("{}{path}", self.base)).map_err(|e| e.to_string())?;
        let headers: &[(&str, &str)] = if body.is_some() {
            &[("Content-Type", "application/json")]
        } else {
            &[]
        };
        let res = http_request(
            method,
            &url,
            headers,
            body.as_deref().unwrap_or(&[]),
            Duration::from_secs(30),
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
            return Err(format!("{} {path}: {} {msg}", method, res.status));
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
