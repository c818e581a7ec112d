//! The HTTP client of one source.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use reqwest::header::{
    ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue, LOCATION, RETRY_AFTER, USER_AGENT,
};
use tidemark_core::config::{AuthConfig, Method, RateLimitHeaders, RetryConfig, SourceConfig};
use tidemark_core::pagination::{Headers, PageRequest, redact_query};
use tidemark_core::secret::Secret;
use url::Url;

use crate::FetchError;
use crate::oauth::TokenSource;
use crate::retry::{backoff_delay, parse_retry_after};

const MAX_REDIRECTS: usize = 5;
const SNIPPET_CHARS: usize = 300;

/// One response, fully read.
#[derive(Debug, Clone)]
pub struct FetchedPage {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Attempts it took, the successful one included.
    pub attempts: u32,
    pub elapsed: Duration,
    /// How long to stop sending to the source: its rate-limit headers say
    /// the remaining requests are at the floor (`rate_limit_headers`).
    pub pause: Option<Duration>,
    /// The secret values the request carried (`Debug` prints `***`).
    sent: crate::auth::Sent,
}

impl FetchedPage {
    /// `text` (taken from the body) without any secret the request carried.
    pub fn scrub(&self, text: &str) -> String {
        let sent: Vec<&str> = self.sent.iter().map(|s| s.expose()).collect();
        crate::auth::scrub(text, &sent)
    }
}

impl Headers for FetchedPage {
    fn header_values(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::to_string)
            .collect()
    }
}

/// The client of one source; cheap to clone and share between tasks.
#[derive(Clone)]
pub struct HttpSource {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    base: Url,
    client: reqwest::Client,
    auth: Option<AuthConfig>,
    oauth: Option<TokenSource>,
    headers: BTreeMap<String, Secret>,
    retry: RetryConfig,
    max_body: u64,
    max_headers: usize,
    /// Origins a redirect may lead to, without credentials.
    redirects_to: Vec<url::Origin>,
    rate_headers: Option<RateLimitHeaders>,
    /// Until when [`HttpSource::fetch`] sends nothing (rate-limit headers).
    paused_until: std::sync::Mutex<Option<Instant>>,
}

impl std::fmt::Debug for HttpSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSource")
            .field("name", &self.inner.name)
            .field("base", &self.inner.base.as_str())
            .field("auth", &self.inner.auth)
            .finish_non_exhaustive()
    }
}

/// The connections of one source: shared by the clients of its tenants
/// (each with its own base URL, credentials and OAuth2 token).
#[derive(Clone, Debug)]
pub struct Pool {
    client: reqwest::Client,
}

impl Pool {
    pub fn new(cfg: &SourceConfig) -> Result<Self, FetchError> {
        let timeout = cfg.timeout();
        // Redirects are followed by `send`, which decides per hop what
        // the next origin may see.
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| {
                FetchError::Config(format!("cannot build the HTTP client: {}", e.without_url()))
            })?;
        Ok(Self { client })
    }

    /// The client of `cfg` (a source, or one tenant's view of it with its
    /// templates filled) over these connections.
    pub fn source(&self, name: &str, cfg: &SourceConfig) -> Result<HttpSource, FetchError> {
        HttpSource::with_client(name, cfg, self.client.clone())
    }
}

impl HttpSource {
    /// The client of a source whose base URL is a URL (not a tenant template).
    pub fn new(name: &str, cfg: &SourceConfig) -> Result<Self, FetchError> {
        Pool::new(cfg)?.source(name, cfg)
    }

    fn with_client(
        name: &str,
        cfg: &SourceConfig,
        client: reqwest::Client,
    ) -> Result<Self, FetchError> {
        let base = cfg.base_url.url().map_err(FetchError::Config)?.clone();
        let oauth = cfg
            .auth
            .as_ref()
            .and_then(|a| a.oauth2_client_credentials.clone())
            .map(|o| TokenSource::new(o, client.clone()));
        Ok(HttpSource {
            inner: Arc::new(Inner {
                name: name.to_string(),
                base,
                client,
                auth: cfg.auth.clone(),
                oauth,
                headers: cfg.headers.clone(),
                retry: cfg.retry(),
                max_body: cfg.max_body_bytes(),
                max_headers: cfg.max_header_bytes(),
                redirects_to: cfg.redirects_allowed_to.iter().map(Url::origin).collect(),
                rate_headers: cfg.rate_limit_headers.clone(),
                paused_until: std::sync::Mutex::new(None),
            }),
        })
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn base_url(&self) -> &Url {
        &self.inner.base
    }

    /// Fetch with retries on transient failures (a request that is not
    /// [`PageRequest::retriable`] only when it surely was not processed),
    /// after any pause the source's rate-limit headers asked for.
    pub async fn fetch(&self, req: &PageRequest) -> Result<FetchedPage, FetchError> {
        let retry = &self.inner.retry;
        let started = Instant::now();
        let mut attempt = 1u32;
        loop {
            let until = *lock(&self.inner.paused_until);
            if let Some(until) = until {
                tokio::time::sleep_until(until.into()).await;
            }
            match self.fetch_once(req).await {
                Ok(mut page) => {
                    page.attempts = attempt;
                    page.elapsed = started.elapsed();
                    if let Some(p) = page.pause {
                        *lock(&self.inner.paused_until) = Some(Instant::now() + p);
                    }
                    return Ok(page);
                }
                Err(e)
                    if e.is_transient()
                        && (req.retriable() || e.surely_unprocessed())
                        && attempt < retry.max_attempts =>
                {
                    let delay = match e.retry_after() {
                        Some(d) => d.min(retry.max_retry_after.std()),
                        None => {
                            backoff_delay(attempt, retry.base_delay.std(), retry.max_delay.std())
                        }
                    };
                    tracing::warn!(
                        source = %self.inner.name,
                        status = e.status(),
                        attempt,
                        delay_ms = delay.as_millis() as u64,
                        error = %e,
                        "transient failure; retrying"
                    );
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One attempt, no retries.
    pub async fn fetch_once(&self, req: &PageRequest) -> Result<FetchedPage, FetchError> {
        let shown = redact_query(&req.url);
        if req.url.origin() != self.inner.base.origin() {
            return Err(FetchError::CrossOrigin {
                url: shown,
                origin: self.inner.base.origin().ascii_serialization(),
            });
        }
        let started = Instant::now();
        let (resp, sent) = self.send(req, &shown).await?;
        let status = resp.status().as_u16();
        let resp_headers = resp.headers().clone();
        if !resp.status().is_success() {
            let retry_after = resp_headers
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, SystemTime::now()));
            let sent: Vec<&str> = sent.iter().map(|s| s.expose()).collect();
            let body_snippet = crate::auth::scrub(&snippet(resp).await, &sent);
            return Err(FetchError::Status {
                status,
                url: shown,
                retry_after,
                body_snippet,
            });
        }
        let header_bytes: usize = resp_headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum();
        if header_bytes > self.inner.max_headers {
            return Err(FetchError::HeadersTooLarge {
                url: shown,
                size: header_bytes,
                limit: self.inner.max_headers,
            });
        }
        let body = self.read_body(resp, &shown).await?;
        let pause = self.inner.rate_headers.as_ref().and_then(|h| {
            rate_pause(h, &resp_headers, SystemTime::now())
                .map(|d| d.min(self.inner.retry.max_retry_after.std()))
        });
        if let Some(p) = pause {
            tracing::info!(source = %self.inner.name, pause_ms = p.as_millis() as u64, "rate-limit headers: remaining at the floor; pausing until the reset");
        }
        Ok(FetchedPage {
            status,
            headers: resp_headers,
            body,
            attempts: 1,
            elapsed: started.elapsed(),
            pause,
            sent,
        })
    }

    /// GET `first`, following redirects: on the source's origin with the
    /// credentials, to an origin of `redirects_allowed_to` without any
    /// credential or configured header, anywhere else not at all. An OAuth2
    /// source whose token the API refuses (401) gets one retry with a new
    /// token. Returns the response and the secret values sent to the source.
    async fn send(
        &self,
        req: &PageRequest,
        shown: &str,
    ) -> Result<(reqwest::Response, crate::auth::Sent), FetchError> {
        let inner = &self.inner;
        let mut url = req.url.clone();
        let mut method = req.method;
        let mut body = req.body.clone();
        let mut hops = 0usize;
        let mut refused_token: Option<String> = None;
        loop {
            let on_source = url.origin() == inner.base.origin();
            let mut target = url.clone();
            let mut headers = HeaderMap::new();
            headers.insert(
                USER_AGENT,
                HeaderValue::from_static(concat!("tidemark/", env!("CARGO_PKG_VERSION"))),
            );
            headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
            if body.is_some() {
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            }
            let mut sent = crate::auth::Sent::new();
            let mut token = None;
            if on_source {
                sent = crate::auth::apply(
                    inner.auth.as_ref(),
                    &inner.headers,
                    &mut headers,
                    &mut target,
                )?;
                if let Some(oauth) = &inner.oauth {
                    let t = oauth.token(refused_token.as_deref()).await?;
                    headers.insert(AUTHORIZATION, crate::auth::bearer(t.expose())?);
                    sent.push(t.clone());
                    token = Some(t);
                }
            }
            tracing::debug!(source = %inner.name, method = method.as_str(), url = %redact_query(&url), "request");
            let mut request = inner
                .client
                .request(http_method(method), target)
                .headers(headers);
            if let Some(b) = &body {
                request = request.body(b.clone());
            }
            let resp = request.send().await.map_err(|e| classify(e, shown))?;
            let status = resp.status();
            if status.is_redirection()
                && let Some(location) = resp.headers().get(LOCATION)
            {
                hops += 1;
                let refuse = |reason: String| FetchError::Redirect {
                    url: shown.to_string(),
                    reason,
                };
                if hops > MAX_REDIRECTS {
                    return Err(refuse(format!("more than {MAX_REDIRECTS} redirects")));
                }
                let next = location
                    .to_str()
                    .ok()
                    .and_then(|l| url.join(l).ok())
                    .ok_or_else(|| refuse("an invalid Location".into()))?;
                let origin = next.origin();
                if origin != inner.base.origin() && !inner.redirects_to.contains(&origin) {
                    return Err(refuse(format!(
                        "redirect to another origin ({}) is not followed; list it in redirects_allowed_to to follow it without credentials",
                        origin.ascii_serialization()
                    )));
                }
                // 307 and 308 repeat the request as it was; the others
                // turn it into a GET without a body (RFC 9110 15.4).
                if !matches!(status.as_u16(), 307 | 308) {
                    method = Method::Get;
                    body = None;
                }
                url = next;
                continue;
            }
            if status == reqwest::StatusCode::UNAUTHORIZED
                && refused_token.is_none()
                && let Some(t) = token
            {
                tracing::info!(source = %inner.name, "the API refused the OAuth2 token; fetching a new one");
                refused_token = Some(t.expose().to_string());
                continue;
            }
            return Ok((resp, sent));
        }
    }

    async fn read_body(&self, resp: reqwest::Response, shown: &str) -> Result<Bytes, FetchError> {
        let limit = self.inner.max_body;
        read_capped(resp, limit)
            .await
            .map_err(|e| classify(e, shown))?
            .ok_or_else(|| FetchError::TooLarge {
                url: shown.to_string(),
                limit,
            })
    }
}

/// The body of `resp`, or `None` when it is over `limit` bytes (by its
/// Content-Length, or as it is read).
pub(crate) async fn read_capped(
    mut resp: reqwest::Response,
    limit: u64,
) -> Result<Option<Bytes>, reqwest::Error> {
    if resp.content_length().is_some_and(|n| n > limit) {
        return Ok(None);
    }
    let cap = resp.content_length().unwrap_or(64 * 1024).min(limit) as usize;
    let mut buf = BytesMut::with_capacity(cap);
    while let Some(chunk) = resp.chunk().await? {
        if (buf.len() + chunk.len()) as u64 > limit {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Some(buf.freeze()))
}

/// The start of an error body, as text, for the error message.
async fn snippet(mut resp: reqwest::Response) -> String {
    let mut buf = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        buf.extend_from_slice(&chunk);
        if buf.len() >= SNIPPET_CHARS * 4 {
            break;
        }
    }
    let text = String::from_utf8_lossy(&buf);
    let mut s: String = text.chars().take(SNIPPET_CHARS).collect();
    if text.chars().count() > SNIPPET_CHARS {
        s.push('…');
    }
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn classify(e: reqwest::Error, shown: &str) -> FetchError {
    let url = shown.to_string();
    let reason = chain(&e);
    if e.is_timeout() {
        FetchError::Timeout { url }
    } else if e.is_redirect() {
        FetchError::Redirect { url, reason }
    } else if e.is_body() || e.is_decode() {
        FetchError::Body { url, reason }
    } else if e.is_connect() {
        FetchError::Connect { url, reason }
    } else {
        FetchError::Send { url, reason }
    }
}

fn http_method(m: Method) -> reqwest::Method {
    match m {
        Method::Get => reqwest::Method::GET,
        Method::Post => reqwest::Method::POST,
        // A valid token: the constant cannot fail to parse.
        Method::Query => reqwest::Method::from_bytes(b"QUERY").unwrap_or(reqwest::Method::POST),
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Values above this in a reset header are unix times, below it seconds
/// from now (a billion seconds is 31 years; 2001-09-09 as a unix time).
const UNIX_TIME_FLOOR: f64 = 1_000_000_000.0;

/// How long the source's rate-limit headers ask to wait: until the reset,
/// when the remaining count is at `cfg.floor` or below.
pub fn rate_pause(
    cfg: &RateLimitHeaders,
    headers: &HeaderMap,
    now: SystemTime,
) -> Option<Duration> {
    let get = |names: &[&str]| {
        names.iter().find_map(|n| {
            headers
                .get(*n)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.trim().to_string())
        })
    };
    let remaining = match &cfg.remaining {
        Some(n) => get(&[n.as_str()]),
        None => get(&["ratelimit-remaining", "x-ratelimit-remaining"]),
    }?;
    // A list (`100, 100;w=60`) names the tightest budget first.
    let remaining: f64 = remaining.split(',').next()?.trim().parse().ok()?;
    if remaining > cfg.floor as f64 {
        return None;
    }
    let reset = match &cfg.reset {
        Some(n) => get(&[n.as_str()]),
        None => get(&["ratelimit-reset", "x-ratelimit-reset"]),
    };
    let secs = match reset.and_then(|r| r.split(',').next()?.trim().parse::<f64>().ok()) {
        Some(r) if r >= UNIX_TIME_FLOOR => {
            let now = now
                .duration_since(SystemTime::UNIX_EPOCH)
                .ok()?
                .as_secs_f64();
            (r - now).max(0.0)
        }
        Some(r) if r >= 0.0 => r,
        // No reset said: a second, then the next answer tells more.
        _ => 1.0,
    };
    Some(Duration::from_secs_f64(secs.max(0.05)))
}

/// An error and its causes, without any URL.
fn chain(e: &reqwest::Error) -> String {
    let mut parts = Vec::new();
    let mut cur: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(err) = cur {
        parts.push(err.to_string());
        cur = err.source();
    }
    if parts.is_empty() {
        parts.push(if e.is_timeout() {
            "timed out".into()
        } else {
            "request failed".into()
        });
    }
    parts.join(": ")
}
