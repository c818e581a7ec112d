//! The HTTP client of one source.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use reqwest::header::{ACCEPT, HeaderMap, HeaderValue, RETRY_AFTER, USER_AGENT};
use tidemark_core::config::{AuthConfig, RetryConfig, SourceConfig};
use tidemark_core::pagination::{Headers, PageRequest, redact_query};
use tidemark_core::secret::Secret;
use url::Url;

use crate::FetchError;
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
}

impl Headers for FetchedPage {
    fn header(&self, name: &str) -> Option<String> {
        let vals: Vec<&str> = self
            .headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        (!vals.is_empty()).then(|| vals.join(", "))
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
    headers: BTreeMap<String, Secret>,
    retry: RetryConfig,
    max_body: u64,
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

impl HttpSource {
    pub fn new(name: &str, cfg: &SourceConfig) -> Result<Self, FetchError> {
        let origin = cfg.base_url.origin();
        let policy = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                attempt.error(format!("more than {MAX_REDIRECTS} redirects"))
            } else if attempt.url().origin() != origin {
                let to = attempt.url().origin().ascii_serialization();
                attempt.error(format!("redirect to another origin ({to}) is not followed"))
            } else {
                attempt.follow()
            }
        });
        let timeout = cfg.timeout();
        let client = reqwest::Client::builder()
            .redirect(policy)
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| {
                FetchError::Config(format!("cannot build the HTTP client: {}", e.without_url()))
            })?;
        Ok(HttpSource {
            inner: Arc::new(Inner {
                name: name.to_string(),
                base: cfg.base_url.clone(),
                client,
                auth: cfg.auth.clone(),
                headers: cfg.headers.clone(),
                retry: cfg.retry(),
                max_body: cfg.max_body_bytes(),
            }),
        })
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn base_url(&self) -> &Url {
        &self.inner.base
    }

    /// Fetch with retries on transient failures.
    pub async fn fetch(&self, req: &PageRequest) -> Result<FetchedPage, FetchError> {
        let retry = &self.inner.retry;
        let started = Instant::now();
        let mut attempt = 1u32;
        loop {
            match self.fetch_once(req).await {
                Ok(mut page) => {
                    page.attempts = attempt;
                    page.elapsed = started.elapsed();
                    return Ok(page);
                }
                Err(e) if e.is_transient() && attempt < retry.max_attempts => {
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
        let mut url = req.url.clone();
        let mut headers = HeaderMap::new();
        headers.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("tidemark/", env!("CARGO_PKG_VERSION"))),
        );
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        crate::auth::apply(
            self.inner.auth.as_ref(),
            &self.inner.headers,
            &mut headers,
            &mut url,
        )?;
        tracing::debug!(source = %self.inner.name, url = %shown, "GET");
        let resp = self
            .inner
            .client
            .get(url)
            .headers(headers)
            .send()
            .await
            .map_err(|e| classify(e, &shown))?;
        let status = resp.status().as_u16();
        let resp_headers = resp.headers().clone();
        if !resp.status().is_success() {
            let retry_after = resp_headers
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, SystemTime::now()));
            let body_snippet = snippet(resp).await;
            return Err(FetchError::Status {
                status,
                url: shown,
                retry_after,
                body_snippet,
            });
        }
        let body = self.read_body(resp, &shown).await?;
        Ok(FetchedPage {
            status,
            headers: resp_headers,
            body,
            attempts: 1,
            elapsed: started.elapsed(),
        })
    }

    async fn read_body(
        &self,
        mut resp: reqwest::Response,
        shown: &str,
    ) -> Result<Bytes, FetchError> {
        let limit = self.inner.max_body;
        let too_large = || FetchError::TooLarge {
            url: shown.to_string(),
            limit,
        };
        if resp.content_length().is_some_and(|n| n > limit) {
            return Err(too_large());
        }
        let cap = resp.content_length().unwrap_or(64 * 1024).min(limit) as usize;
        let mut buf = BytesMut::with_capacity(cap);
        while let Some(chunk) = resp.chunk().await.map_err(|e| classify(e, shown))? {
            if (buf.len() + chunk.len()) as u64 > limit {
                return Err(too_large());
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    }
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
    } else {
        FetchError::Connect { url, reason }
    }
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
