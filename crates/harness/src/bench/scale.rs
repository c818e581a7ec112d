//! The `scale` scenario of `tidemark bench e2e`: many small jobs (by
//! default 2,000, 20,000 and 100,000, a hundred partitions per feed) of a
//! couple of pages each, two workers. Besides the usual figures it reads
//! what only this scenario needs: the Redis memory the jobs take, and what
//! a coordinator pass costs once every job is idle and none is due.

use super::e2e::{E2eBench, RunResult, Spec, opt};
use crate::HarnessError;

/// One run of `jobs` jobs, `per_feed` partitions to a feed.
pub(super) fn spec(b: &E2eBench, jobs: usize) -> Spec {
    let per_feed = b.jobs_per_feed.max(1);
    let feeds = jobs.div_ceil(per_feed);
    let mut yaml = String::with_capacity(jobs * 8 + feeds * 300);
    for f in 0..feeds {
        let n = per_feed.min(jobs - f * per_feed);
        yaml.push_str(&format!(
            "  - name: s{f:04}\n    source: mock\n    path: /jsonapi/records\n    \
             pagination: {{ preset: next_url, page_size: {} }}\n    key: /id\n    version: /updated_at\n    \
             mode: snapshot\n    every: 24h\n    {}\n",
            b.jobs_page_size,
            super::e2e::partitions(n)
        ));
    }
    Spec {
        label: format!("scale, {jobs} jobs"),
        feeds_yaml: yaml,
        records: b.jobs_records,
        page_size: b.jobs_page_size,
        latency_ms: 0,
        workers: b.jobs_workers,
        concurrency: b.jobs_concurrency,
        jobs,
        expected_records: (b.jobs_records * jobs) as u64,
        feeds,
        idle_window: Some(b.jobs_idle_window.std()),
        tenants: None,
        worker_env: Vec::new(),
        external: None,
    }
}

/// Redis's `used_memory`, in bytes.
pub(super) async fn redis_used_memory(
    url: &str,
    ca_pem: Option<&str>,
) -> Result<u64, HarnessError> {
    let client = tidemark_state::redis_client(url, ca_pem)
        .map_err(|e| HarnessError::bench(format!("redis: {e}")))?;
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| HarnessError::bench(format!("redis: {e}")))?;
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut c)
        .await
        .map_err(|e| HarnessError::bench(format!("redis INFO: {e}")))?;
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| HarnessError::bench("redis INFO has no used_memory"))
}

/// The scale runs as a table.
pub(super) fn render(runs: &[RunResult]) -> String {
    if runs.is_empty() {
        return String::new();
    }
    let mut s = String::from(
        "\n| scale | feeds | seconds | jobs/s | coordinator CPU µs/job | pass p50 / p99 ms | page latency p50 / p99 ms | duplicates | Redis B/job | idle pass: CPU ms, p50 ms |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for x in runs {
        s.push_str(&format!(
            "| {} jobs | {} | {:.1} | {:.0} | {} | {} / {} | {} / {} | {} | {} | {}, {} |\n",
            x.jobs,
            x.feeds,
            x.seconds,
            x.jobs as f64 / x.seconds,
            opt(
                x.coordinator_cpu_seconds.map(|c| c * 1e6 / x.jobs as f64),
                0
            ),
            opt(x.coordinator_pass_p50_ms, 1),
            opt(x.coordinator_pass_p99_ms, 1),
            opt(x.page_latency_p50_ms, 0),
            opt(x.page_latency_p99_ms, 0),
            x.duplicates,
            opt(x.redis_bytes_per_job, 0),
            opt(x.idle_pass_cpu_ms, 2),
            opt(x.idle_pass_p50_ms, 2),
        ));
    }
    s
}

/// The targets for the scale runs: (target, measured, met).
pub(super) fn targets(runs: &[RunResult]) -> Vec<(String, String, Option<bool>)> {
    let mut rows = Vec::new();
    for x in runs {
        rows.push((
            format!("scale: 0 duplicates without faults, {} jobs", x.jobs),
            x.duplicates.to_string(),
            Some(x.duplicates == 0),
        ));
    }
    let cpu_per_job = |x: &RunResult| x.coordinator_cpu_seconds.map(|c| c / x.jobs as f64);
    let small = runs.iter().min_by_key(|x| x.jobs);
    let large = runs.iter().max_by_key(|x| x.jobs);
    if let (Some(small), Some(large)) = (small, large)
        && small.jobs < large.jobs
    {
        if let (Some(a), Some(b)) = (cpu_per_job(small), cpu_per_job(large)) {
            let ratio = b / a;
            rows.push((
                format!(
                    "scale: coordinator CPU per job at {} jobs within 2x of {} jobs",
                    large.jobs, small.jobs
                ),
                format!("{ratio:.2}x"),
                Some(ratio <= 2.0),
            ));
        }
        let (ra, rb) = (
            small.jobs as f64 / small.seconds,
            large.jobs as f64 / large.seconds,
        );
        rows.push((
            format!(
                "scale: {} jobs finish at no less than the rate of {} ({ra:.0} jobs/s)",
                large.jobs, small.jobs
            ),
            format!("{rb:.0} jobs/s"),
            Some(rb >= ra),
        ));
    }
    if let Some(large) = large {
        if let Some(ms) = large.idle_pass_cpu_ms {
            rows.push((
                format!(
                    "scale: an idle pass at {} jobs costs < 5 ms of coordinator CPU",
                    large.jobs
                ),
                format!("{ms:.2} ms"),
                Some(ms < 5.0),
            ));
        }
        if let Some(b) = large.redis_bytes_per_job {
            rows.push((
                format!("scale: Redis memory per job < 1 KiB ({} jobs)", large.jobs),
                format!("{b:.0} B"),
                Some(b < 1024.0),
            ));
        }
    }
    rows
}
