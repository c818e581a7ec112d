//! Fetch errors, each able to say whether a retry could help. Messages never
//! contain a query string (it may hold an API key) or a header value.

use std::time::Duration;

use tidemark_core::secret::SecretError;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{url} is on another origin than the source ({origin}); not requested")]
    CrossOrigin { url: String, origin: String },
    #[error("{0}")]
    Secret(#[from] SecretError),
    #[error("invalid auth or header configuration: {0}")]
    Config(String),
    #[error("request to {url} timed out")]
    Timeout { url: String },
    #[error("cannot reach {url}: {reason}")]
    Connect { url: String, reason: String },
    /// The connection failed after it was made: the request may have been
    /// received, and even processed.
    #[error("request to {url} failed: {reason}")]
    Send { url: String, reason: String },
    #[error("response body from {url} was cut off: {reason}")]
    Body { url: String, reason: String },
    #[error("redirect refused for {url}: {reason}")]
    Redirect { url: String, reason: String },
    #[error("HTTP {status} from {url}{}{}", retry_after.map(|d| format!(" (Retry-After {}s)", d.as_secs())).unwrap_or_default(), if body_snippet.is_empty() { String::new() } else { format!(": {body_snippet}") })]
    Status {
        status: u16,
        url: String,
        retry_after: Option<Duration>,
        body_snippet: String,
    },
    #[error("response body from {url} exceeds the limit of {limit} bytes (max_body_bytes)")]
    TooLarge { url: String, limit: u64 },
    #[error(
        "response headers from {url} are {size} bytes, over the limit of {limit} (max_header_bytes)"
    )]
    HeadersTooLarge {
        url: String,
        size: usize,
        limit: usize,
    },
    #[error("no OAuth2 token from {url}: {reason}")]
    Token {
        url: String,
        reason: String,
        transient: bool,
    },
}

impl FetchError {
    /// True when the same request may succeed later: timeouts, connection
    /// failures, cut-off bodies, 5xx, 408 and 429.
    pub fn is_transient(&self) -> bool {
        match self {
            FetchError::Timeout { .. }
            | FetchError::Connect { .. }
            | FetchError::Send { .. }
            | FetchError::Body { .. } => true,
            FetchError::Status { status, .. } => *status >= 500 || *status == 408 || *status == 429,
            FetchError::Token { transient, .. } => *transient,
            // A mounted secret file that is not there (yet): a Kubernetes
            // Secret's new key reaches each pod on its own kubelet sync, a
            // rotation swaps the files. Retried within the source's policy;
            // an unset variable or a relative path never mends itself.
            FetchError::Secret(SecretError::File { .. }) => true,
            _ => false,
        }
    }

    /// True when the server surely did not act on the request: it was
    /// never sent (no connection, a secret or token missing), or the
    /// server refused it unread (429). Only then is a request that is not
    /// read-only sent again.
    pub fn surely_unprocessed(&self) -> bool {
        match self {
            FetchError::Connect { .. }
            | FetchError::CrossOrigin { .. }
            | FetchError::Secret(_)
            | FetchError::Config(_)
            | FetchError::Token { .. } => true,
            FetchError::Status { status, .. } => *status == 429,
            _ => false,
        }
    }

    /// The server's Retry-After, when it sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            FetchError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            FetchError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// True when the configuration (a secret, auth) is at fault, not the API.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            FetchError::Secret(_)
                | FetchError::Config(_)
                | FetchError::Token {
                    transient: false,
                    ..
                }
        )
    }
}
