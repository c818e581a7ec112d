//! tidemark-mock: a real HTTP server that serves one deterministic dataset
//! through the wire format of every cursor-API style tidemark reads, with
//! fault knobs and a ground-truth endpoint, for tests, the demo and benchmarks.
//!
//! It also serves many tenants on the same port: `/t/{tenant}/<endpoint>`
//! reads that tenant's own dataset with `Authorization: Bearer tok-{tenant}`
//! (see `tenants`).
//!
//! Every ticket also has comments, a child resource for parent→child feeds:
//! `/api/v2/tickets/{id}/comments` and `/api/v2/comments?ticket_ids=`
//! (see `comments`).
//!
//! The same records are also served through request dialects (see
//! `dialects`), each a full walk of the current records in change order:
//! - `POST /graphql` `{"query":"…records…","variables":{"first","after","since"}}`:
//!   Relay edges, `pageInfo.endCursor`/`hasNextPage`; errors as 200s with
//!   `errors[].extensions.code` (`GRAPHQL_PARSE_FAILED`, `INVALID_CURSOR`,
//!   `CURSOR_EXPIRED`, `BAD_USER_INPUT`).
//! - `POST /notion/v1/databases/{id}/query` `{"page_size","start_cursor"}`:
//!   `{"object":"list","results","next_cursor","has_more"}`;
//!   `start_cursor: null` is refused with Notion's 400 `validation_error`.
//! - `POST /es/records/_search` `{"size","search_after":[t,id],"query":{"range":{"updated_at":{"gte":t}}}}`:
//!   Elasticsearch hits, each with `"sort":[updated_at unix seconds, id]`.
//! - `GET /kinto/records?_limit=&_since=&_token=`: `{"data":[…]}` and the
//!   next page's full URL in a `Next-Page` header.
//! - `GET /slack/conversations.history?channel=&limit=&cursor=&oldest=`:
//!   `{"ok":true,"messages","has_more","response_metadata":{"next_cursor"}}`,
//!   errors as 200 `{"ok":false,"error"}`.
//!
//! Data endpoints take any method: a GET endpoint answers POST with 405 and
//! vice versa; a request body (at most 1 MiB, else 413) must be JSON (else
//! 400). Besides the faults on every Nth request, [`Faults`] sets errors
//! inside a 200 (`error_200_every`) and a fixed-window rate-limit budget
//! with `X-RateLimit-*` or IETF `RateLimit-*` headers (`ratelimit_limit`).

mod args;
mod comments;
mod cursor;
mod dataset;
mod dialects;
mod endpoints;
mod server;
mod tenants;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use args::MockArgs;
pub use comments::{CommentTruth, CommentsConfig, CommentsTruth};
pub use dataset::{Truth, TruthRecord};
pub use server::{MockServer, MockState, Stats, router};
pub use tenants::{TENANT_PREFIX, is_tenant_name, tenant_token};

/// What the mock serves and how it misbehaves.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// Records in the initial dataset.
    pub records: usize,
    /// Records in each tenant's initial dataset (created on the tenant's
    /// first request, from `seed` and the tenant's name).
    pub tenant_records: usize,
    /// Page size when a request names none.
    pub page_size: usize,
    pub max_page_size: usize,
    /// Approximate size of one record's JSON.
    pub record_bytes: usize,
    pub seed: u64,
    /// Added to every data request.
    pub latency: Duration,
    /// Records updated within this much of now are not served yet (seed 003).
    pub hide_newest: Duration,
    pub faults: Faults,
    /// Each ticket's comments (`/api/v2/tickets/{id}/comments`).
    pub comments: CommentsConfig,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            records: 1000,
            tenant_records: 20,
            page_size: 100,
            max_page_size: 10_000,
            record_bytes: 330,
            seed: 1,
            latency: Duration::ZERO,
            hide_newest: Duration::ZERO,
            faults: Faults::default(),
            comments: CommentsConfig::default(),
        }
    }
}

/// Faults on every Nth data request (the /_ endpoints do not count).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    /// 429 with `Retry-After: retry_after_secs`.
    pub fail_429_every: Option<u64>,
    /// The first N data requests of every path answer 429 likewise.
    pub fail_429_first: u64,
    pub retry_after_secs: u64,
    /// 500.
    pub fail_500_every: Option<u64>,
    /// Sleep `slow_ms` before answering.
    pub slow_every: Option<u64>,
    pub slow_ms: u64,
    /// Announce the full Content-Length, send half the body, cut the connection.
    pub truncate_every: Option<u64>,
    /// A 200 whose body is not JSON.
    pub corrupt_every: Option<u64>,
    /// Cursors older than this are refused with `400 {"error":"cursor_expired"}`.
    pub cursor_ttl_secs: Option<u64>,
    /// After every N data requests, insert and update `mutate_count` records.
    pub mutate_every: Option<u64>,
    pub mutate_count: usize,
    /// Data request number N, M·N, … (the same count as the faults above)
    /// answers an error inside a 200 if it goes to `/graphql`
    /// (`{"data":null,"errors":[{…"code":"RATE_LIMITED","retryAfter":…}]}`)
    /// or `/slack/…` (`{"ok":false,"error":"ratelimited"}`); other
    /// endpoints ignore it. Counted in `Stats::errors_200`.
    pub error_200_every: Option<u64>,
    /// A fixed-window request budget: at most this many data requests per
    /// `ratelimit_window_ms` (per tenant under `/t/{tenant}/`, else one
    /// budget for the main dataset). 2xx answers carry the budget's headers
    /// (see `ratelimit_style`); a request beyond it answers 429 with
    /// `Retry-After` (counted in `Stats::rate_limited_429`). None: no budget.
    pub ratelimit_limit: Option<u64>,
    /// The budget's window; it starts with the first request after the
    /// previous window ended.
    pub ratelimit_window_ms: u64,
    /// Which headers carry the budget.
    pub ratelimit_style: RateLimitStyle,
}

/// The headers that announce the rate-limit budget.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitStyle {
    /// `X-RateLimit-Limit`, `X-RateLimit-Remaining` and `X-RateLimit-Reset`
    /// (unix seconds when the window ends, rounded up), GitHub style.
    #[default]
    X,
    /// `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset`
    /// (seconds until the window ends, rounded up; at least 1 when nothing
    /// remains), the IETF draft's.
    Ietf,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            fail_429_every: None,
            fail_429_first: 0,
            retry_after_secs: 1,
            fail_500_every: None,
            slow_every: None,
            slow_ms: 0,
            truncate_every: None,
            corrupt_every: None,
            cursor_ttl_secs: None,
            mutate_every: None,
            mutate_count: 0,
            error_200_every: None,
            ratelimit_limit: None,
            ratelimit_window_ms: 1000,
            ratelimit_style: RateLimitStyle::X,
        }
    }
}
