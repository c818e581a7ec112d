//! tidemark-telemetry: the metrics of both roles, with fixed names and
//! labels (docs/OPERATING.md's metrics table lists them), and the HTTP endpoints
//! every long-running role serves: `/metrics` (Prometheus text),
//! `/healthz` (the process is alive) and `/readyz` (its dependencies answer).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

/// A gauge of whole numbers, as the families hand them out (a handle: clones
/// share the value the registry exports).
pub type IntGauge = Gauge;
/// A gauge of seconds and other fractions.
pub type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;
use prometheus_client::registry::{Metric, Registry};

type Labels = Vec<(&'static str, String)>;

fn l1(k: &'static str, v: &str) -> Labels {
    vec![(k, v.to_string())]
}

/// A registry that also remembers the exported name of everything registered.
struct Reg {
    registry: Registry,
    names: Vec<String>,
}

/// Register `metric` under `name` and return it (clones share values).
fn register<M: Metric + Clone>(r: &mut Reg, name: &str, help: &str, metric: M) -> M {
    let suffix = match metric.metric_type() {
        prometheus_client::metrics::MetricType::Counter => "_total",
        _ => "",
    };
    r.names.push(format!("tidemark_{name}{suffix}"));
    r.registry.register(name, help, metric.clone());
    metric
}

/// Register a new, empty metric of type `M`.
fn reg<M: Metric + Clone + Default>(r: &mut Reg, name: &str, help: &str) -> M {
    register(r, name, help, M::default())
}

/// Every metric tidemark exports. Cheap to clone; clones share values.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    names: Arc<Vec<String>>,
    pub pages_fetched: Family<Labels, Counter>,
    pub records_published: Family<Labels, Counter>,
    pub commits: Family<Labels, Counter>,
    pub fetch_seconds: Family<Labels, Histogram>,
    pub page_latency_seconds: Family<Labels, Histogram>,
    pub fetch_errors: Family<Labels, Counter>,
    pub tenant_pages_fetched: Family<Labels, Counter>,
    pub tenant_records_published: Family<Labels, Counter>,
    pub tenant_fetch_errors: Family<Labels, Counter>,
    pub tasks_dropped: Family<Labels, Counter>,
    pub tasks_retried: Family<Labels, Counter>,
    pub tasks_dead_lettered: Family<Labels, Counter>,
    pub rate_limit_waits: Family<Labels, Counter>,
    pub source_pauses: Family<Labels, Counter>,
    pub cursor_recoveries: Family<Labels, Counter>,
    pub jobs_failed: Family<Labels, Counter>,
    pub tasks_in_flight: Gauge,
    pub pages_carried: Family<Labels, Counter>,
    pub prefetches: Family<Labels, Counter>,
    pub chains_started: Family<Labels, Counter>,
    pub chains_reissued: Family<Labels, Counter>,
    pub feed_lag_seconds: Family<Labels, FloatGauge>,
    pub feed_cursor_age_seconds: Family<Labels, FloatGauge>,
    pub jobs: Family<Labels, Gauge>,
    pub chains_running: Gauge,
    pub tenants: Family<Labels, Gauge>,
    pub tenants_file_errors: Family<Labels, Counter>,
    pub admission_limit: Gauge,
    pub workers_seen: Gauge,
    pub leader: Gauge,
    pub coordinator_pass_seconds: Histogram,
    pub redis_wait_shortfalls: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Reg {
            registry: Registry::with_prefix("tidemark"),
            names: Vec::new(),
        };
        let fetch_buckets = || {
            Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ])
        };
        let mut m = Self {
            registry: Arc::new(Mutex::new(Registry::default())),
            names: Arc::new(Vec::new()),
            pages_fetched: reg(&mut r, "pages_fetched", "Pages fetched and read, by feed"),
            records_published: reg(
                &mut r,
                "records_published",
                "Records published downstream and confirmed by the broker, by feed",
            ),
            commits: reg(
                &mut r,
                "commits",
                "Cursor commits by result (ok, already_applied, fenced, conflict)",
            ),
            fetch_seconds: register(
                &mut r,
                "fetch_duration_seconds",
                "Time to fetch one page, by feed",
                Family::new_with_constructor(fetch_buckets),
            ),
            page_latency_seconds: register(
                &mut r,
                "page_latency_seconds",
                "Time from a page task's first publish to its committed cursor (queueing, rate-limit waits, retries, fetch, publish and commit; for a page a hot chain carried on, from the commit before it, its fetch possibly done ahead), by feed",
                Family::new_with_constructor(|| {
                    // Fine below a second, where page latency usually is, so that
                    // quantiles read off the buckets (`tidemark bench`) are close.
                    Histogram::new([
                        0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5,
                        2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0,
                    ])
                }),
            ),
            fetch_errors: reg(
                &mut r,
                "fetch_errors",
                "Failed page fetches, by feed and kind (transient, rate_limited, cursor_expired, permanent, unreadable)",
            ),
            tenant_pages_fetched: reg(
                &mut r,
                "tenant_pages_fetched",
                "Pages fetched and read, by feed and tenant (only for sources with tenants.metrics: true)",
            ),
            tenant_records_published: reg(
                &mut r,
                "tenant_records_published",
                "Records published downstream and confirmed, by feed and tenant (only for sources with tenants.metrics: true)",
            ),
            tenant_fetch_errors: reg(
                &mut r,
                "tenant_fetch_errors",
                "Failed page fetches, by feed, tenant and kind (only for sources with tenants.metrics: true)",
            ),
            tasks_dropped: reg(
                &mut r,
                "tasks_dropped",
                "Page tasks acked without work, by reason (stale_epoch, already_applied, conflict, not_running, fenced)",
            ),
            tasks_retried: reg(
                &mut r,
                "tasks_retried",
                "Page tasks re-queued with a delay after a transient failure, by feed",
            ),
            tasks_dead_lettered: reg(
                &mut r,
                "tasks_dead_lettered",
                "Page tasks moved to the dead-letter queue, by feed",
            ),
            rate_limit_waits: reg(
                &mut r,
                "rate_limit_waits",
                "Times a worker waited for the shared rate limiter or a source pause, by source",
            ),
            source_pauses: reg(
                &mut r,
                "source_pauses",
                "Source-wide pauses set after a 429 with Retry-After, an error_when retry_after or spent rate-limit headers, by source",
            ),
            cursor_recoveries: reg(
                &mut r,
                "cursor_recoveries",
                "Chains restarted from the high-water mark after an expired or rejected cursor, by feed",
            ),
            jobs_failed: reg(
                &mut r,
                "jobs_failed",
                "Jobs marked failed by a worker, by feed",
            ),
            tasks_in_flight: reg(
                &mut r,
                "tasks_in_flight",
                "Page tasks this worker is working on",
            ),
            pages_carried: reg(
                &mut r,
                "pages_carried",
                "Pages a worker took on itself after committing the page before (a hot chain), not through the task queue, by feed",
            ),
            prefetches: reg(
                &mut r,
                "prefetches",
                "Pages fetched ahead while the page before was published and committed, by feed and result (used, discarded, no_room)",
            ),
            chains_started: reg(
                &mut r,
                "chains_started",
                "Chains started for due jobs, by feed",
            ),
            chains_reissued: reg(
                &mut r,
                "chains_reissued",
                "Chains re-issued under a new epoch after their lease expired, by feed",
            ),
            feed_lag_seconds: reg(
                &mut r,
                "feed_lag_seconds",
                "Now minus the lowest high-water mark among the feed's jobs (feeds whose versions are times), by feed",
            ),
            feed_cursor_age_seconds: reg(
                &mut r,
                "feed_cursor_age_seconds",
                "Time since the feed's least recently advanced cursor last moved (or its job was created), by feed",
            ),
            jobs: reg(
                &mut r,
                "jobs",
                "Jobs by feed and phase (idle, running, paused, failed), from the store's counters",
            ),
            tenants: reg(
                &mut r,
                "tenants",
                "Tenants the coordinator runs, by source (sources with tenants)",
            ),
            tenants_file_errors: reg(
                &mut r,
                "tenants_file_errors",
                "Times a tenants file could not be read or had errors (its tenants were kept as they were), by source",
            ),
            chains_running: reg(
                &mut r,
                "chains_running",
                "Chains running now (queued, in a worker, or waiting to retry)",
            ),
            admission_limit: reg(
                &mut r,
                "admission_limit",
                "Chains that may run at once: --max-running, or four per worker slot seen (at least 64)",
            ),
            workers_seen: reg(
                &mut r,
                "workers_seen",
                "Workers whose heartbeat the coordinator sees",
            ),
            leader: reg(
                &mut r,
                "coordinator_leader",
                "1 while this coordinator is the leader",
            ),
            redis_wait_shortfalls: reg(
                &mut r,
                "redis_wait_shortfalls",
                "Redis writes that fewer replicas than --redis-wait-replicas acknowledged within --redis-wait-timeout (applied on the master; a failover now could lose them)",
            ),
            coordinator_pass_seconds: register(
                &mut r,
                "coordinator_pass_seconds",
                "Time of one leader pass: reading what is due or expired and starting those chains",
                Histogram::new([
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0,
                ]),
            ),
        };
        m.registry = Arc::new(Mutex::new(r.registry));
        m.names = Arc::new(r.names);
        m
    }

    /// The exported name of every metric (counters with `_total`), as the
    /// docs/OPERATING.md's table and the Grafana dashboard use them.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn feed(feed: &str) -> Labels {
        l1("feed", feed)
    }
    pub fn source(source: &str) -> Labels {
        l1("source", source)
    }
    pub fn result(result: &str) -> Labels {
        l1("result", result)
    }
    pub fn reason(reason: &str) -> Labels {
        l1("reason", reason)
    }
    pub fn phase(phase: &str) -> Labels {
        l1("phase", phase)
    }
    pub fn feed_kind(feed: &str, kind: &str) -> Labels {
        vec![("feed", feed.to_string()), ("kind", kind.to_string())]
    }
    pub fn feed_result(feed: &str, result: &str) -> Labels {
        vec![("feed", feed.to_string()), ("result", result.to_string())]
    }
    pub fn feed_tenant(feed: &str, tenant: &str) -> Labels {
        vec![("feed", feed.to_string()), ("tenant", tenant.to_string())]
    }
    pub fn feed_tenant_kind(feed: &str, tenant: &str, kind: &str) -> Labels {
        vec![
            ("feed", feed.to_string()),
            ("tenant", tenant.to_string()),
            ("kind", kind.to_string()),
        ]
    }
    pub fn feed_phase(feed: &str, phase: &str) -> Labels {
        vec![("feed", feed.to_string()), ("phase", phase.to_string())]
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let r = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        if encode(&mut out, &r).is_err() {
            out.clear();
        }
        out
    }

    /// The value of the series `name{labels}` as `/metrics` shows it, 0 when
    /// absent; labels match as a set, whatever their order. For tests and
    /// checks that read a counter of a role running in process.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        want.sort();
        for line in self.encode().lines() {
            let Some((series, value)) = line.split_once(' ') else {
                continue;
            };
            let (n, mut got) = match series.split_once('{') {
                Some((n, rest)) => (
                    n,
                    rest.trim_end_matches('}')
                        .split(',')
                        .filter(|l| !l.is_empty())
                        .map(str::to_string)
                        .collect::<Vec<_>>(),
                ),
                None => (series, Vec::new()),
            };
            got.sort();
            if n == name && got == want {
                return value.parse().unwrap_or(0.0);
            }
        }
        0.0
    }
}

/// The peak resident set size (`VmHWM`) of a `/proc/<pid>/status` file, in
/// bytes (Linux; None elsewhere): `pull --stats-json` reports its own, the
/// benchmark its children's.
pub fn peak_rss_bytes(status_file: &str) -> Option<u64> {
    let status = std::fs::read_to_string(status_file).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Answers `/readyz`: `Err(reason)` while a dependency does not answer.
pub type ReadyCheck =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    ready: ReadyCheck,
}

/// The router of `/metrics`, `/healthz` and `/readyz`; more routes may be merged in.
pub fn router(metrics: Metrics, ready: ReadyCheck) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready_handler))
        .with_state(AppState { metrics, ready })
}

async fn metrics_handler(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

async fn ready_handler(State(s): State<AppState>) -> impl IntoResponse {
    match (s.ready)().await {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")),
    }
}

/// Bind `listen` (port 0 picks a free port) and serve `router` until
/// `shutdown` resolves. Returns the bound address and the server task.
pub async fn serve(
    listen: &str,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "the HTTP endpoint stopped");
        }
    });
    Ok((addr, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn endpoints_answer() {
        let m = Metrics::new();
        m.pages_fetched
            .get_or_create(&Metrics::feed("tickets"))
            .inc();
        m.commits.get_or_create(&Metrics::result("ok")).inc_by(3);
        let ready: ReadyCheck = Arc::new(|| Box::pin(async { Err("redis: refused".to_string()) }));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (addr, task) = serve("127.0.0.1:0", router(m, ready), async {
            let _ = rx.await;
        })
        .await
        .expect("bind");
        let base = format!("http://{addr}");
        let text = reqwest::get(format!("{base}/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("body");
        assert!(
            text.contains(r#"tidemark_pages_fetched_total{feed="tickets"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"tidemark_commits_total{result="ok"} 3"#));
        let h = reqwest::get(format!("{base}/healthz"))
            .await
            .expect("healthz");
        assert_eq!(h.status(), 200);
        let r = reqwest::get(format!("{base}/readyz"))
            .await
            .expect("readyz");
        assert_eq!(r.status(), 503);
        assert!(r.text().await.expect("body").contains("redis: refused"));
        let _ = tx.send(());
        task.await.expect("server task");
    }
}

#[cfg(test)]
mod documented {
    use std::collections::BTreeSet;

    use super::Metrics;

    /// Every metric family this build exports, as Prometheus names it
    /// (counters with `_total`).
    fn exported() -> BTreeSet<String> {
        Metrics::new().names().iter().cloned().collect()
    }

    /// `tidemark_…` words in `text`, with histogram series suffixes removed.
    fn mentioned(text: &str) -> BTreeSet<String> {
        text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("tidemark_") && w.len() > "tidemark_".len())
            .map(|w| {
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| w.strip_suffix(s))
                    .unwrap_or(w)
                    .to_string()
            })
            .collect()
    }

    fn repo_file(path: &str) -> String {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(path);
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[test]
    fn the_dashboard_uses_only_exported_metrics() {
        let exported = exported();
        assert!(exported.len() >= 18, "{exported:?}");
        let doc: serde_json::Value =
            serde_json::from_str(&repo_file("deploy/grafana-dashboard.json")).expect("json");
        let mut exprs = String::new();
        fn walk(v: &serde_json::Value, out: &mut String) {
            match v {
                serde_json::Value::Object(m) => {
                    for (k, v) in m {
                        if k == "expr" {
                            out.push_str(v.as_str().unwrap_or_default());
                            out.push('\n');
                        } else {
                            walk(v, out);
                        }
                    }
                }
                serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
                _ => {}
            }
        }
        walk(&doc, &mut exprs);
        let used = mentioned(&exprs);
        let unknown: Vec<_> = used.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "the dashboard queries metrics that do not exist: {unknown:?}"
        );
        let unused: Vec<_> = exported.difference(&used).collect();
        assert!(
            unused.is_empty(),
            "metrics missing from the dashboard: {unused:?}"
        );
    }

    #[test]
    fn the_operating_guide_documents_every_metric() {
        let guide = mentioned(&repo_file("docs/OPERATING.md"));
        let missing: Vec<_> = exported()
            .into_iter()
            .filter(|m| !guide.contains(m))
            .collect();
        assert!(
            missing.is_empty(),
            "metrics docs/OPERATING.md does not document: {missing:?}"
        );
    }
}
