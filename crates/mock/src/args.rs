//! Command-line knobs of `tidemark mock-api`.

use std::time::Duration;

use crate::{CommentsConfig, Faults, MockConfig};

#[derive(clap::Args, Debug, Clone)]
pub struct MockArgs {
    /// Records in the initial dataset.
    #[arg(long, default_value_t = 1000)]
    pub records: usize,
    /// Records in each tenant's initial dataset (`/t/{tenant}/...`).
    #[arg(long, default_value_t = 20)]
    pub tenant_records: usize,
    /// Page size when a request names none.
    #[arg(long, default_value_t = 100)]
    pub page_size: usize,
    /// Approximate JSON size of one record.
    #[arg(long, default_value_t = 330)]
    pub record_bytes: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Delay added to every data request.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Hide records updated within this many seconds of now.
    #[arg(long, default_value_t = 0)]
    pub hide_newest_secs: u64,
    /// Answer every Nth data request with 429.
    #[arg(long)]
    pub fail_429_every: Option<u64>,
    /// Answer the first N data requests of every path with 429.
    #[arg(long, default_value_t = 0)]
    pub fail_429_first: u64,
    /// The Retry-After (seconds) of those 429s.
    #[arg(long, default_value_t = 1)]
    pub retry_after_secs: u64,
    /// Answer every Nth data request with 500.
    #[arg(long)]
    pub fail_500_every: Option<u64>,
    /// Delay every Nth data request by --slow-ms.
    #[arg(long)]
    pub slow_every: Option<u64>,
    #[arg(long, default_value_t = 5000)]
    pub slow_ms: u64,
    /// Cut the connection halfway through every Nth body.
    #[arg(long)]
    pub truncate_every: Option<u64>,
    /// Send invalid JSON on every Nth data request.
    #[arg(long)]
    pub corrupt_every: Option<u64>,
    /// Refuse cursors older than this.
    #[arg(long)]
    pub cursor_ttl_secs: Option<u64>,
    /// Insert and update --mutate-count records after every Nth data request.
    #[arg(long)]
    pub mutate_every: Option<u64>,
    #[arg(long, default_value_t = 1)]
    pub mutate_count: usize,
    /// Default page size of the comments endpoints (`page[size]`).
    #[arg(long, default_value_t = 5)]
    pub comments_page_size: usize,
    /// The most comments a ticket has from its creation (each update of a
    /// ticket adds one more).
    #[arg(long, default_value_t = 25)]
    pub comments_max: usize,
    /// Give every ticket exactly N comments (plus one per update) instead
    /// of the spread of 0, one page, two pages and many.
    #[arg(long, value_name = "N")]
    pub comments_per_ticket: Option<usize>,
}

impl MockArgs {
    pub fn to_config(&self) -> MockConfig {
        MockConfig {
            records: self.records,
            tenant_records: self.tenant_records,
            page_size: self.page_size.max(1),
            record_bytes: self.record_bytes,
            seed: self.seed,
            latency: Duration::from_millis(self.latency_ms),
            hide_newest: Duration::from_secs(self.hide_newest_secs),
            faults: Faults {
                fail_429_every: self.fail_429_every,
                fail_429_first: self.fail_429_first,
                retry_after_secs: self.retry_after_secs,
                fail_500_every: self.fail_500_every,
                slow_every: self.slow_every,
                slow_ms: self.slow_ms,
                truncate_every: self.truncate_every,
                corrupt_every: self.corrupt_every,
                cursor_ttl_secs: self.cursor_ttl_secs,
                mutate_every: self.mutate_every,
                mutate_count: self.mutate_count,
            },
            comments: CommentsConfig {
                page_size: self.comments_page_size.max(1),
                max_per_ticket: self.comments_max,
                fixed_per_ticket: self.comments_per_ticket,
            },
            ..MockConfig::default()
        }
    }
}
