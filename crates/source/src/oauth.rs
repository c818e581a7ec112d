//! OAuth2 client credentials (RFC 6749 section 4.4): one token per source
//! and process, fetched when first needed, cached, and fetched again shortly
//! before it expires or when the API answers 401. Concurrent requests share
//! one fetch. The client secret goes only to the token endpoint, the token
//! only to the source's origin; neither appears in an error or a log line.

use std::time::{Duration, Instant};

use base64::Engine;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use tidemark_core::config::{ClientAuth, OAuth2Auth};
use tidemark_core::pagination::redact_query;
use tidemark_core::secret::Resolved;

use crate::FetchError;

/// Largest token endpoint answer read.
const MAX_TOKEN_RESPONSE: u64 = 64 * 1024;
/// A token is renewed this long before it expires (at most half its life).
const RENEW_BEFORE: Duration = Duration::from_secs(60);

struct Cached {
    /// The access token (a `Resolved`: `***` in every `Debug`).
    token: Resolved,
    /// When to fetch a new one; `None`: the endpoint gave no lifetime, so
    /// until the API refuses it.
    renew_at: Option<Instant>,
}

pub(crate) struct TokenSource {
    cfg: OAuth2Auth,
    client: reqwest::Client,
    cached: tokio::sync::Mutex<Option<Cached>>,
}

impl TokenSource {
    pub(crate) fn new(cfg: OAuth2Auth, client: reqwest::Client) -> Self {
        Self {
            cfg,
            client,
            cached: tokio::sync::Mutex::new(None),
        }
    }

    /// The current token: the cached one while it is fresh, else a new one.
    /// `stale` is a token the API just refused: it is replaced even if fresh
    /// (unless another request already replaced it).
    pub(crate) async fn token(&self, stale: Option<&str>) -> Result<Resolved, FetchError> {
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref() {
            let refused = stale.is_some_and(|s| s == c.token.expose());
            let expired = c.renew_at.is_some_and(|at| Instant::now() >= at);
            if !refused && !expired {
                return Ok(c.token.clone());
            }
        }
        let (token, lifetime) = self.fetch().await?;
        *cached = Some(Cached {
            token: token.clone(),
            renew_at: lifetime.map(|l| Instant::now() + l - RENEW_BEFORE.min(l / 2)),
        });
        Ok(token)
    }

    async fn fetch(&self) -> Result<(Resolved, Option<Duration>), FetchError> {
        let url = redact_query(&self.cfg.token_url);
        let fail = |reason: String, transient: bool| FetchError::Token {
            url: url.clone(),
            reason,
            transient,
        };
        let id = self.cfg.client_id.resolve()?;
        let secret = self.cfg.client_secret.resolve()?;
        let body = {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", "client_credentials");
            if !self.cfg.scopes.is_empty() {
                form.append_pair("scope", &self.cfg.scopes.join(" "));
            }
            if let Some(a) = &self.cfg.audience {
                form.append_pair("audience", a);
            }
            if self.cfg.client_auth == ClientAuth::Body {
                form.append_pair("client_id", id.expose());
                form.append_pair("client_secret", secret.expose());
            }
            form.finish()
        };
        let mut req = self
            .client
            .post(self.cfg.token_url.clone())
            .header(ACCEPT, "application/json")
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded");
        if self.cfg.client_auth == ClientAuth::Basic {
            // RFC 6749 section 2.3.1: both form-encoded, then Basic.
            let enc =
                |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
            let pair = format!("{}:{}", enc(id.expose()), enc(secret.expose()));
            let v = crate::auth::sensitive(&format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            ))
            .map_err(|_| {
                fail(
                    "the client id or secret holds characters not allowed in a header".into(),
                    false,
                )
            })?;
            req = req.header(AUTHORIZATION, v);
        }
        let resp = req.body(body).send().await.map_err(|e| {
            fail(
                if e.is_timeout() {
                    "timed out".into()
                } else {
                    "cannot reach the token endpoint".into()
                },
                true,
            )
        })?;
        let status = resp.status();
        let body = crate::client::read_capped(resp, MAX_TOKEN_RESPONSE)
            .await
            .map_err(|_| fail("the answer was cut off".into(), true))?
            .ok_or_else(|| {
                fail(
                    format!("the answer exceeds {MAX_TOKEN_RESPONSE} bytes"),
                    true,
                )
            })?;
        let scrub = |text: &str| crate::auth::scrub(text, &[id.expose(), secret.expose()]);
        let json: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
        if !status.is_success() {
            // RFC 6749 section 5.2: `error` and `error_description`.
            let what = json
                .as_ref()
                .map(|j| {
                    [j.get("error"), j.get("error_description")]
                        .iter()
                        .flatten()
                        .filter_map(|v| v.as_str())
                        .collect::<Vec<_>>()
                        .join(": ")
                })
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "no OAuth2 error in the answer".into());
            let transient = status.is_server_error() || status.as_u16() == 429;
            return Err(fail(
                format!("HTTP {}: {}", status.as_u16(), scrub(&what)),
                transient,
            ));
        }
        let json = json.ok_or_else(|| fail("the answer is not JSON".into(), false))?;
        let token = json
            .get("access_token")
            .and_then(|t| t.as_str())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| fail("the answer has no access_token".into(), false))?;
        if let Some(kind) = json.get("token_type").and_then(|t| t.as_str())
            && !kind.eq_ignore_ascii_case("bearer")
        {
            return Err(fail(
                format!(
                    "token_type {:?} is not supported (only bearer)",
                    scrub(kind)
                ),
                false,
            ));
        }
        let lifetime = json
            .get("expires_in")
            .and_then(|e| {
                e.as_u64()
                    .or_else(|| e.as_str().and_then(|s| s.parse().ok()))
            })
            .map(Duration::from_secs);
        tracing::debug!(token_url = %url, expires_in_s = lifetime.map(|l| l.as_secs()), "OAuth2 token fetched");
        Ok((Resolved::from_value(token.to_string()), lifetime))
    }
}
