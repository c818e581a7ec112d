//! Command-line knobs of `tidemark mock-api`.

use std::time::Duration;

use crate::{CommentsConfig, Faults, MockConfig, RateLimitStyle};

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
    /// Answer every Nth data request to /graphql or /slack/... with an
    /// error inside a 200 (RATE_LIMITED / ratelimited).
    #[arg(long)]
    pub error_200_every: Option<u64>,
    /// A fixed-window budget of data requests (per tenant, else global):
    /// 2xx answers carry rate-limit headers, requests beyond it get 429.
    #[arg(long)]
    pub ratelimit_limit: Option<u64>,
    /// The rate-limit window.
    #[arg(long, default_value_t = 1000)]
    pub ratelimit_window_ms: u64,
    /// The rate-limit headers: x (X-RateLimit-*, Reset in unix seconds) or
    /// ietf (RateLimit-*, Reset in seconds from now).
    #[arg(long, value_enum, default_value_t = RateLimitStyle::X)]
    pub ratelimit_style: RateLimitStyle,
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
                error_200_every: self.error_200_every,
                ratelimit_limit: self.ratelimit_limit,
                ratelimit_window_ms: self.ratelimit_window_ms,
                ratelimit_style: self.ratelimit_style,
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        mock: MockArgs,
    }

    #[test]
    fn the_dialect_fault_flags_reach_the_config() {
        let f = Cli::parse_from(["mock"]).mock.to_config().faults;
        assert_eq!(
            (f.error_200_every, f.ratelimit_limit, f.ratelimit_window_ms),
            (None, None, 1000)
        );
        assert_eq!(f.ratelimit_style, RateLimitStyle::X);
        let f = Cli::parse_from([
            "mock",
            "--error-200-every",
            "3",
            "--ratelimit-limit",
            "10",
            "--ratelimit-window-ms",
            "60000",
            "--ratelimit-style",
            "ietf",
        ])
        .mock
        .to_config()
        .faults;
        assert_eq!(
            (f.error_200_every, f.ratelimit_limit, f.ratelimit_window_ms),
            (Some(3), Some(10), 60_000)
        );
        assert_eq!(f.ratelimit_style, RateLimitStyle::Ietf);
    }
}
