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

mod args;
mod comments;
mod cursor;
mod dataset;
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
        }
    }
}
