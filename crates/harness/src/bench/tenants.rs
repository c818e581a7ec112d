//! The `tenants` scenario of `tidemark bench e2e`: one tenanted source of
//! 1,000 tenants (`--tenants`) and three feeds (`--tenants-feeds`), so
//! 3,000 jobs, against the mock's per-tenant datasets (`/t/{tenant}/...`,
//! each request with its tenant's bearer token). Besides the usual figures
//! of the initial sync it measures what only this scenario needs: once
//! every tenant is synced, tenants are appended to the tenants file one
//! after another (`--tenants-adds`), each timed from the file's write to
//! its first record downstream (routing key `*.<tenant>.*`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use super::e2e::{E2eBench, RunResult, STYLES, Spec, opt};
use super::sink::{Sink, unix_ms};
use crate::HarnessError;

/// The feeds' names, one per style of [`STYLES`], in its order.
const NAMES: [&str; 6] = ["tickets", "events", "items", "sync", "jsonapi", "github"];

/// The tenants part of a run: the tenants file and what is added to it.
pub(super) struct Plan {
    pub tenants: usize,
    /// The tenanted source's feeds.
    pub feeds: Vec<String>,
    /// Records of each tenant's dataset (every feed walks all of them).
    pub records: usize,
    pub adds: usize,
    /// The coordinator's `--tick`: how often it looks at the tenants file.
    pub tick: Duration,
}

impl Plan {
    /// Records one tenant sends downstream: its dataset, once per feed.
    fn per_tenant(&self) -> u64 {
        (self.records * self.feeds.len()) as u64
    }
}

/// One tenant added to the tenants file after the initial sync, each time
/// from the file's write (its rename over the old file) to:
#[derive(Debug, Clone, Serialize)]
pub struct TenantAdd {
    pub tenant: String,
    /// its jobs in Redis (the coordinator's pass read the file and made
    /// them): the wait for the next tick, then the pass's own work;
    pub registered_ms: Option<f64>,
    /// the first of its chains started (the coordinator took the job's
    /// lease and published its first page task);
    pub started_ms: Option<f64>,
    /// its first record downstream;
    pub first_record_ms: f64,
    /// its last record downstream.
    pub all_records_ms: f64,
    pub records: u64,
}

/// The run of `--tenants` tenants of `--tenants-feeds` feeds.
pub(super) fn spec(b: &E2eBench) -> Spec {
    let feeds = b.tenants_feeds.max(1);
    let tenants = b.tenants.max(1);
    let mut yaml = String::new();
    let mut names = Vec::new();
    for i in 0..feeds {
        let (path, fields) = STYLES[i % STYLES.len()];
        let name = match i / STYLES.len() {
            0 => NAMES[i % NAMES.len()].to_string(),
            n => format!("{}{n}", NAMES[i % NAMES.len()]),
        };
        yaml.push_str(&format!(
            "  - name: {name}\n    source: mock\n    path: {path}\n    {}\n    key: /id\n    \
             version: /updated_at\n    mode: snapshot\n    every: 24h\n",
            fields.replace("PS", &b.tenants_page_size.to_string())
        ));
        names.push(name);
    }
    let jobs = tenants * feeds;
    Spec {
        label: format!("tenants, {tenants} x {feeds} feeds"),
        feeds_yaml: yaml,
        // The main dataset: no feed reads it.
        records: 1,
        page_size: b.tenants_page_size,
        latency_ms: 0,
        workers: b.tenants_workers,
        concurrency: b.tenants_concurrency,
        jobs,
        expected_records: (b.tenants_records * jobs) as u64,
        feeds,
        idle_window: None,
        tenants: Some(Plan {
            tenants,
            feeds: names,
            records: b.tenants_records,
            adds: b.tenants_adds,
            tick: b.tenants_tick.std(),
        }),
        worker_env: Vec::new(),
        external: None,
    }
}

/// The `n`th tenant of the initial file.
fn tenant(plan: &Plan, n: usize) -> String {
    let width = plan.tenants.saturating_sub(1).to_string().len().max(4);
    format!("t{n:0width$}")
}

/// The `k`th tenant added.
fn added(k: usize) -> String {
    format!("added-{k:02}")
}

fn tenants_file(dir: &Path) -> PathBuf {
    dir.join("tenants.yaml")
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl Fn(std::io::Error) -> HarnessError + 'a {
    move |source| HarnessError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Replace the tenants file with `text` at once: a temporary file renamed
/// over it, so the coordinator never reads half of it.
fn write_atomically(path: &Path, text: &str) -> Result<(), HarnessError> {
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text).map_err(io("cannot write the tenants file", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("cannot replace the tenants file", path))
}

/// The initial tenants file, one name a line.
fn initial_list(plan: &Plan) -> String {
    (0..plan.tenants)
        .map(|n| format!("- {}\n", tenant(plan, n)))
        .collect()
}

/// Write the initial tenants file into `dir` and return the config's
/// `sources:` entry: the mock's tenant URLs, each tenant's own token.
pub(super) fn source(plan: &Plan, mock_url: &str, dir: &Path) -> Result<String, HarnessError> {
    let file = tenants_file(dir);
    write_atomically(&file, &initial_list(plan))?;
    Ok(format!(
        "  mock:\n    base_url: \"{mock_url}/t/{{tenant}}\"\n    auth: {{ bearer: \"tok-{{tenant}}\" }}\n    \
         timeout: 30s\n    tenants: {{ file: {} }}\n",
        serde_json::to_string(&file.display().to_string()).unwrap_or_default()
    ))
}

/// Where the run's Redis keys are: to watch a new tenant's jobs appear and start.
pub(super) struct Probe<'a> {
    pub redis_url: &'a str,
    pub ca_pem: Option<&'a str>,
    /// The run's key prefix, `tmbench…:`.
    pub prefix: String,
}

/// When, in unix ms by Redis's clock, a tenant's first job was made and its
/// first chain started, as far as seen so far.
#[derive(Default)]
struct Seen {
    /// The jobs' `feed:F:progress` score when first seen: their creation
    /// time, unless a commit had moved it already.
    made: Option<f64>,
    started: Option<f64>,
}

impl Probe<'_> {
    async fn connect(&self) -> Result<redis::aio::MultiplexedConnection, HarnessError> {
        tidemark_state::redis_client(self.redis_url, self.ca_pem)
            .map_err(|e| HarnessError::bench(format!("redis: {e}")))?
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| HarnessError::bench(format!("redis: {e}")))
    }

    /// One round trip: each of `tenant`'s jobs' progress score (set when
    /// the job is made) and epoch (`now_ms * 1024` when its lease is taken,
    /// 0 before).
    async fn look(
        &self,
        c: &mut redis::aio::MultiplexedConnection,
        plan: &Plan,
        tenant: &str,
        seen: &mut Seen,
    ) -> Result<(), HarnessError> {
        let member = tidemark_state::member(&tidemark_core::tenant::job_partition(
            tenant,
            tidemark_core::config::DEFAULT_PARTITION,
        ));
        let mut pipe = redis::pipe();
        for feed in &plan.feeds {
            let p = &self.prefix;
            pipe.cmd("ZSCORE")
                .arg(format!("{p}feed:{feed}:progress"))
                .arg(&member)
                .cmd("HGET")
                .arg(format!("{p}job:{feed}:{member}"))
                .arg("epoch");
        }
        let answers: Vec<(Option<f64>, Option<String>)> = pipe
            .query_async(c)
            .await
            .map_err(|e| HarnessError::bench(format!("redis: {e}")))?;
        if seen.made.is_none() {
            // One pass makes all of a tenant's jobs.
            seen.made = answers.iter().filter_map(|(m, _)| *m).reduce(f64::min);
        }
        seen.started = answers
            .iter()
            .filter_map(|(_, e)| e.as_deref()?.parse::<u64>().ok())
            .filter(|&e| e > 0)
            .map(|e| (e / 1024) as f64)
            .reduce(f64::min);
        Ok(())
    }
}

/// Once the initial sync is in: append `plan.adds` tenants to the tenants
/// file one after another, each timed from the write to its first and last
/// record downstream. The writes are spread over a tick (the k-th waits
/// k/adds of a tick more), so that they fall at different points of the
/// coordinator's cycle.
pub(super) async fn add(
    plan: &Plan,
    dir: &Path,
    sink: &Sink,
    probe: &Probe<'_>,
    timeout: Duration,
    mut alive: impl FnMut() -> Result<(), HarnessError>,
) -> Result<Vec<TenantAdd>, HarnessError> {
    let mut c = probe.connect().await?;
    let file = tenants_file(dir);
    let mut list = initial_list(plan);
    let expected = plan.per_tenant();
    let mut out = Vec::new();
    for k in 0..plan.adds {
        let stagger = plan.tick.mul_f64(k as f64 / plan.adds as f64);
        tokio::time::sleep(Duration::from_millis(300) + stagger).await;
        let name = added(k);
        list.push_str(&format!("- {name}\n"));
        write_atomically(&file, &list)?;
        let wrote = unix_ms();
        eprintln!("bench: tenant {name} added ...");
        let deadline = tokio::time::Instant::now() + timeout;
        let mut seen = Seen::default();
        let arrived = loop {
            if seen.started.is_none() {
                probe.look(&mut c, plan, &name, &mut seen).await?;
            }
            if let Some(a) = sink.tenant(&name)
                && a.records >= expected
                && seen.started.is_some()
            {
                break a;
            }
            alive()?;
            if tokio::time::Instant::now() >= deadline {
                return Err(HarnessError::bench(format!(
                    "tenant {name}: {} of {expected} records arrived within {timeout:?} of its addition",
                    sink.tenant(&name).map_or(0, |a| a.records)
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        // The progress score is the job's creation time only if the poll
        // saw it before the job's first commit, which follows its start.
        let made = seen
            .made
            .filter(|ms| seen.started.is_some_and(|s| *ms <= s));
        out.push(TenantAdd {
            tenant: name,
            registered_ms: made.map(|m| m - wrote),
            started_ms: seen.started.map(|s| s - wrote),
            first_record_ms: arrived.first_ms - wrote,
            all_records_ms: arrived.last_ms - wrote,
            records: arrived.records,
        });
    }
    Ok(out)
}

/// Every tenant, those of the initial file and those added, sent at least
/// its dataset once per feed (more is what the duplicates count), and no
/// other tenant sent anything.
pub(super) fn check_every_tenant(plan: &Plan, sink: &Sink) -> Result<(), HarnessError> {
    let mut arrived = sink.tenants();
    let expected = plan.per_tenant();
    let names = (0..plan.tenants)
        .map(|n| tenant(plan, n))
        .chain((0..plan.adds).map(added));
    let wrong: Vec<String> = names
        .filter_map(|t| {
            let got = arrived.remove(&t).map_or(0, |a| a.records);
            (got < expected).then(|| format!("{t}: {got}"))
        })
        .collect();
    // What is left came from no tenant of the run.
    let mut strangers: Vec<&String> = arrived.keys().collect();
    strangers.sort();
    let unknown = strangers.len();
    strangers.truncate(10);
    if !wrong.is_empty() || unknown > 0 {
        return Err(HarnessError::bench(format!(
            "tenants: expected {expected} records of every tenant; {} tenant(s) sent fewer ({}{}); records of {unknown} unknown tenant(s) {strangers:?}",
            wrong.len(),
            wrong
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
            if wrong.len() > 10 { ", ..." } else { "" },
        )));
    }
    Ok(())
}

/// The median of `v` (the mean of the middle two for an even count).
pub(super) fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// The tenants runs as tables: the initial sync, then each added tenant.
pub(super) fn render(runs: &[RunResult]) -> String {
    if runs.is_empty() {
        return String::new();
    }
    let mut s = String::from(
        "\n| tenants | feeds | jobs | records | seconds | jobs/s | records/s | page latency p50 / p99 ms | coordinator CPU µs/job | pass p50 / p99 ms | duplicates |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for x in runs {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {:.1} | {:.0} | {:.0} | {} / {} | {} | {} / {} | {} |\n",
            x.tenants.unwrap_or(0),
            x.feeds,
            x.jobs,
            x.records,
            x.seconds,
            x.jobs as f64 / x.seconds,
            x.records_per_sec,
            opt(x.page_latency_p50_ms, 0),
            opt(x.page_latency_p99_ms, 0),
            opt(
                x.coordinator_cpu_seconds.map(|c| c * 1e6 / x.jobs as f64),
                0
            ),
            opt(x.coordinator_pass_p50_ms, 1),
            opt(x.coordinator_pass_p99_ms, 1),
            x.duplicates,
        ));
    }
    for x in runs.iter().filter(|x| !x.tenant_adds.is_empty()) {
        s.push_str(&format!(
            "\n| tenant added to {} (ms from the write) | jobs made | first chain started | first record | all records | records |\n|---|---:|---:|---:|---:|---:|\n",
            x.tenants.unwrap_or(0)
        ));
        for a in &x.tenant_adds {
            s.push_str(&format!(
                "| {} | {} | {} | {:.0} | {:.0} | {} |\n",
                a.tenant,
                opt(a.registered_ms, 0),
                opt(a.started_ms, 0),
                a.first_record_ms,
                a.all_records_ms,
                a.records
            ));
        }
        s.push_str(&format!(
            "\nnew tenant's first record: median {} ms, max {} ms over {} additions (coordinator tick {} ms)\n",
            opt(x.tenant_add_first_record_median_ms, 0),
            opt(x.tenant_add_first_record_max_ms, 0),
            x.tenant_adds.len(),
            opt(x.coordinator_tick_ms, 0),
        ));
    }
    s
}

/// The targets of the tenants runs: (target, measured, met).
pub(super) fn targets(runs: &[RunResult]) -> Vec<(String, String, Option<bool>)> {
    let mut rows = Vec::new();
    for x in runs {
        let tenants = x.tenants.unwrap_or(0);
        rows.push((
            format!("tenants: 0 duplicates without faults, {tenants} tenants"),
            x.duplicates.to_string(),
            Some(x.duplicates == 0),
        ));
        if let (Some(max), Some(median), Some(tick)) = (
            x.tenant_add_first_record_max_ms,
            x.tenant_add_first_record_median_ms,
            x.coordinator_tick_ms,
        ) {
            let bound = 2000.0 + tick;
            rows.push((
                format!(
                    "tenants: a new tenant's first record < 2 s + one tick ({bound:.0} ms), slowest of {} additions",
                    x.tenant_adds.len()
                ),
                format!("{max:.0} ms (median {median:.0})"),
                Some(max < bound),
            ));
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_in_order_and_the_median_is_the_middle() {
        let plan = |tenants| Plan {
            tenants,
            feeds: vec!["tickets".into()],
            records: 10,
            adds: 2,
            tick: Duration::from_secs(1),
        };
        assert_eq!(tenant(&plan(1000), 7), "t0007");
        assert_eq!(tenant(&plan(100_000), 7), "t00007");
        assert_eq!(initial_list(&plan(2)), "- t0000\n- t0001\n");
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }
}
