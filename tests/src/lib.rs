//! The end-to-end suites' own support: the `tidemark` binary of this build,
//! [`Cluster`] (one isolated deployment of real processes: mock API,
//! coordinators, workers, against real Redis and RabbitMQ) and [`Checker`],
//! which consumes the downstream exchange so a test can compare what
//! arrived with the mock's ground truth. Processes and services come from
//! tidemark-harness.
//!
//! Every cluster uses its own Redis key prefix, queue prefix and records
//! exchange, and removes them (and its processes) when dropped, even when
//! the test failed.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test support: a panic is the failure report

pub mod monitor;
pub mod proxy;
pub use tidemark_harness::redis_server;
pub mod tls;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicAckOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use tidemark_bus::amqp::BusConfig;
use tidemark_core::checkpoint::{Checkpoint, JobId};
use tidemark_harness::services;
pub use tidemark_harness::services::host_port;
pub use tidemark_harness::{Proc, Spawn};
use tidemark_mock::{Truth, TruthRecord};
use tidemark_state::{Jobs, RedisStore, StateStore};

/// REDIS_URL (default the local server) when it answers; else a container
/// when Docker is there ([`tidemark_harness::services`]).
pub fn redis_url() -> String {
    services::redis_url().unwrap_or_else(|e| panic!("{e}"))
}

/// AMQP_URL (default the local broker) when it answers; else a container
/// when Docker is there ([`tidemark_harness::services`]).
pub fn amqp_url() -> String {
    services::amqp_url().unwrap_or_else(|e| panic!("{e}"))
}

/// The `tidemark` binary of this build. `cargo test --workspace` builds it
/// fresh (the CLI's own tests need it); when this crate's tests run alone
/// (`cargo test -p tidemark-tests`) it is built here if missing, or always
/// with `TIDEMARK_E2E_BUILD=1` (a build with this crate's feature set
/// recompiles dependencies, so it is not done by default).
pub fn tidemark_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("current exe");
        // target/<profile>/deps/<test> -> target/<profile>/tidemark
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .to_path_buf();
        let bin = profile_dir.join("tidemark");
        if bin.exists() && std::env::var_os("TIDEMARK_E2E_BUILD").is_none() {
            return bin;
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "-p",
                "tidemark",
                "--bin",
                "tidemark",
                "--features",
                "tidemark-worker/failpoints",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build -p tidemark failed");
        assert!(bin.exists(), "no binary at {}", bin.display());
        bin
    })
    .clone()
}

/// Run `tidemark args...` to completion: (exit code, stdout, stderr).
pub fn tidemark(args: &[&str], env: &[(String, String)]) -> (i32, String, String) {
    let out = Command::new(tidemark_bin())
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run tidemark {args:?}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `tidemark <args>` against the deployment `c` (its [`Cluster::role_env`]);
/// panics unless it exits with `code`. Returns stdout then stderr.
pub fn ctl(c: &Cluster, args: &[&str], code: i32) -> String {
    let (got, out, err) = tidemark(args, &c.role_env());
    assert_eq!(got, code, "tidemark {args:?}: exit {got}\n{out}\n{err}");
    out + &err
}

/// Run `fut` to completion (or for at most 20 s) on a fresh runtime on its
/// own thread, and wait for it: for cleanup from `Drop`, which runs during a
/// panic too, and inside or outside a runtime.
pub fn block_on_cleanup(fut: impl Future<Output = ()> + Send + 'static) {
    let _ = std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            rt.block_on(async {
                let _ = tokio::time::timeout(Duration::from_secs(20), fut).await;
            });
        }
    })
    .join();
}

/// The Redis key prefix of the deployment named `prefix`.
fn redis_prefix_of(prefix: &str) -> String {
    format!("{prefix}:")
}

/// The records exchange of the deployment named `prefix`.
pub fn exchange_of(prefix: &str) -> String {
    format!("{prefix}.records")
}

/// The environment that gives the roles of the deployment named `prefix`
/// its Redis key prefix, queue prefix and records exchange.
pub fn prefix_env(prefix: &str) -> [(String, String); 3] {
    [
        ("TIDEMARK_REDIS_PREFIX".to_string(), redis_prefix_of(prefix)),
        ("TIDEMARK_QUEUE_PREFIX".to_string(), prefix.to_string()),
        ("TIDEMARK_RECORDS_EXCHANGE".to_string(), exchange_of(prefix)),
    ]
}

/// Spawn `tidemark args...` and wait until its stderr has a line containing
/// `ready_marker`; the URL in that line becomes `addr`.
pub fn spawn(
    name: &str,
    args: &[&str],
    env: &[(String, String)],
    dir: &Path,
    ready_marker: &str,
) -> Proc {
    spawn_to(name, args, env, dir, ready_marker, Stdio::null())
}

/// [`spawn`], with the process's stdout going to `stdout`.
pub fn spawn_to(
    name: &str,
    args: &[&str],
    env: &[(String, String)],
    dir: &Path,
    ready_marker: &str,
    stdout: impl Into<Stdio>,
) -> Proc {
    Spawn::new(tidemark_bin(), name, dir)
        .args(args)
        .envs(env)
        .ready(ready_marker)
        .stdout(stdout)
        .start()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The `feeds:` list of the tenant suites: the mock's tickets (Zendesk
/// cursor), 5 records a page, polled every 2 s; with
/// [`Cluster::start_tenanted`] it runs once per tenant.
pub const TENANT_FEED: &str = r#"  - name: tickets
    source: mock
    path: /api/v2/incremental/tickets/cursor.json
    records: /tickets
    pagination: { preset: zendesk_cursor, page_size: 5 }
    key: /id
    version: /updated_at
    start: { param: start_time, format: unix, from: "2024-01-01T00:00:00Z" }
    every: 2s
"#;

/// One isolated deployment: mock API, config, names, processes.
pub struct Cluster {
    pub prefix: String,
    pub dir: tempfile::TempDir,
    pub mock: Proc,
    pub mock_url: String,
    pub config: PathBuf,
    pub procs: Vec<Proc>,
    /// Extra environment for every role (e.g. TIDEMARK_LEASE).
    pub env: Vec<(String, String)>,
    /// The Redis the roles use (default: [`redis_url`]); set it before starting them.
    pub redis: String,
    store: OnceLock<Arc<RedisStore>>,
    /// The RabbitMQ the roles use; `None`: the shared one ([`amqp_url`]).
    amqp: Option<String>,
    /// Started with [`Cluster::start_on`]: its Redis and RabbitMQ are the
    /// test's own, so dropping it leaves the shared services alone.
    own_services: bool,
}

impl Cluster {
    /// Start the mock API with `mock_args` and write `feeds_yaml` (the
    /// `feeds:` list; the source is named `mock`) as the config.
    pub fn start(feeds_yaml: &str, mock_args: &[&str]) -> Cluster {
        Cluster::start_with_source(feeds_yaml, mock_args, |mock_url, _| {
            format!("    base_url: {mock_url}\n    timeout: 10s\n")
        })
    }

    /// [`Cluster::start`] with the `mock` source's lines (indented four
    /// spaces, a `base_url:` line among them) made by `source` from the
    /// mock's URL and the cluster's directory.
    fn start_with_source(
        feeds_yaml: &str,
        mock_args: &[&str],
        source: impl FnOnce(&str, &Path) -> String,
    ) -> Cluster {
        Cluster::assemble(feeds_yaml, mock_args, source, None)
    }

    /// [`Cluster::start`] against a Redis and a RabbitMQ of the test's own
    /// (a Sentinel URL, a list of a cluster's nodes: anything the roles
    /// take in `REDIS_URL` and `AMQP_URL`) instead of the shared services,
    /// which it never touches: not to start, not to clean up. The
    /// deployment's names are still its own, but nothing is deleted when it
    /// is dropped (the services are thrown away with the test).
    pub fn start_on(feeds_yaml: &str, mock_args: &[&str], redis: &str, amqp: &str) -> Cluster {
        Cluster::assemble(
            feeds_yaml,
            mock_args,
            |mock_url, _| format!("    base_url: {mock_url}\n    timeout: 10s\n"),
            Some((redis.to_string(), amqp.to_string())),
        )
    }

    /// The mock, the config and the names; `services`: (REDIS_URL,
    /// AMQP_URL) of the test's own, else the shared ones.
    fn assemble(
        feeds_yaml: &str,
        mock_args: &[&str],
        source: impl FnOnce(&str, &Path) -> String,
        services: Option<(String, String)>,
    ) -> Cluster {
        let prefix = format!("tme2e{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let dir = tempfile::Builder::new()
            .prefix(&format!("{prefix}-"))
            .tempdir()
            .expect("tempdir");
        let mut args = vec!["mock-api", "--port", "0"];
        args.extend_from_slice(mock_args);
        let mock = spawn("mock", &args, &[], dir.path(), "listening on");
        let mock_url = mock.addr.clone().expect("mock address");
        let config = dir.path().join("feeds.yaml");
        std::fs::write(
            &config,
            format!(
                "sources:\n  mock:\n{}\nfeeds:\n{feeds_yaml}",
                source(&mock_url, dir.path())
            ),
        )
        .expect("write config");
        let own_services = services.is_some();
        let (redis, amqp) = match services {
            Some((redis, amqp)) => (redis, Some(amqp)),
            None => (redis_url(), None),
        };
        Cluster {
            prefix,
            dir,
            mock,
            mock_url,
            config,
            procs: Vec::new(),
            env: Vec::new(),
            redis,
            store: OnceLock::new(),
            amqp,
            own_services,
        }
    }

    /// The RabbitMQ the roles use: the shared one, or the test's own
    /// ([`Cluster::start_on`]).
    pub fn amqp_url(&self) -> String {
        self.amqp.clone().unwrap_or_else(amqp_url)
    }

    /// Point the config's source at `base_url` (e.g. a proxy in front of the mock).
    pub fn set_base_url(&self, base_url: &str) {
        let text = std::fs::read_to_string(&self.config).expect("config");
        let text = text.replacen(
            &format!("base_url: {}", self.mock_url),
            &format!("base_url: {base_url}"),
            1,
        );
        std::fs::write(&self.config, text).expect("write config");
    }

    /// Give every source of the config this `retry:` block (e.g.
    /// `{ max_attempts: 2, base_delay: 100ms }`): the one retry policy of
    /// every role. Call before the coordinator starts (it registers the config).
    pub fn set_retry(&self, retry: &str) {
        let text = std::fs::read_to_string(&self.config).expect("config");
        let mut out = String::new();
        for line in text.lines() {
            out.push_str(line);
            out.push('\n');
            if line.starts_with("    base_url:") {
                out.push_str(&format!("    retry: {retry}\n"));
            }
        }
        std::fs::write(&self.config, out).expect("write config");
    }

    /// Start the mock (tenants at `/t/{tenant}/...`) and write a config
    /// whose source `mock` runs every feed once per tenant: base URL
    /// `<mock>/t/{tenant}`, each tenant's bearer token read from
    /// [`Cluster::secret_path`] (`${file:<dir>/secrets/{tenant}}`), tenants
    /// from [`Cluster::tenants_file`] (`tenants.yaml` beside the config),
    /// which lists `tenants` (and their secrets are written). `source_extra`
    /// are more lines of the source (indented four spaces), e.g. a
    /// `rate_limit:`.
    pub fn start_tenanted(
        feeds_yaml: &str,
        mock_args: &[&str],
        tenants: &[String],
        source_extra: &str,
    ) -> Cluster {
        let c = Cluster::start_with_source(feeds_yaml, mock_args, |mock_url, dir| {
            format!(
                "    base_url: {mock_url}/t/{{tenant}}\n    timeout: 10s\n    \
                 auth: {{ bearer: \"${{file:{}/{{tenant}}}}\" }}\n    \
                 tenants: {{ file: tenants.yaml }}\n{source_extra}",
                dir.join("secrets").display()
            )
        });
        std::fs::create_dir_all(c.dir.path().join("secrets")).expect("secrets dir");
        c.write_tenants(tenants);
        c
    }

    /// The tenants file of a [`Cluster::start_tenanted`] deployment.
    pub fn tenants_file(&self) -> PathBuf {
        self.dir.path().join("tenants.yaml")
    }

    /// Where `tenant`'s bearer token is read from.
    pub fn secret_path(&self, tenant: &str) -> PathBuf {
        self.dir.path().join("secrets").join(tenant)
    }

    /// Write `tenant`'s token, the one the mock accepts (`tok-<tenant>`).
    pub fn write_secret(&self, tenant: &str) {
        std::fs::write(
            self.secret_path(tenant),
            tidemark_mock::tenant_token(tenant),
        )
        .expect("write secret");
    }

    /// Replace the tenants file with `tenants` the way an operator's tool
    /// should: a temporary file renamed over it (a reader never sees half
    /// a file). Each tenant's secret is written first.
    pub fn write_tenants(&self, tenants: &[String]) {
        for t in tenants {
            self.write_secret(t);
        }
        let text: String = tenants.iter().map(|t| format!("- {t}\n")).collect();
        self.write_tenants_text(&text);
    }

    /// Replace the tenants file with `text` (any text: a test may write a
    /// broken file), atomically.
    pub fn write_tenants_text(&self, text: &str) {
        let tmp = self.dir.path().join(".tenants.yaml.tmp");
        std::fs::write(&tmp, text).expect("write tenants");
        std::fs::rename(&tmp, self.tenants_file()).expect("rename tenants file");
    }

    /// `tenant`'s ground truth.
    pub async fn tenant_truth(&self, tenant: &str) -> Truth {
        reqwest::get(format!("{}/_truth?tenant={tenant}", self.mock_url))
            .await
            .expect("truth")
            .json()
            .await
            .expect("truth json")
    }

    /// POST a tenant admin action to the mock: `revoke`, `restore`,
    /// `throttle?secs=5`, `insert?n=3`, `update?n=1`.
    pub async fn admin_tenant(&self, tenant: &str, action: &str) {
        self.admin(&format!("/_admin/tenants/{tenant}/{action}"), None)
            .await;
    }

    /// The mock's `/_stats`.
    pub async fn stats(&self) -> serde_json::Value {
        reqwest::get(format!("{}/_stats", self.mock_url))
            .await
            .expect("stats")
            .json()
            .await
            .expect("stats json")
    }

    /// Data requests per tenant (`all`), or only those answered 401 or 429
    /// (`refused`), as the mock counted them.
    pub async fn tenant_requests(&self, refused: bool) -> BTreeMap<String, u64> {
        let stats = self.stats().await;
        let field = if refused {
            "refused_by_tenant"
        } else {
            "by_tenant"
        };
        serde_json::from_value(stats[field].clone()).expect("per-tenant counts")
    }

    pub fn exchange(&self) -> String {
        exchange_of(&self.prefix)
    }
    pub fn redis_prefix(&self) -> String {
        redis_prefix_of(&self.prefix)
    }

    /// The environment of every role (and of CLI commands against this deployment).
    pub fn role_env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("REDIS_URL".to_string(), self.redis.clone()),
            ("AMQP_URL".to_string(), self.amqp_url()),
        ];
        env.extend(prefix_env(&self.prefix));
        env.extend([
            ("TIDEMARK_LISTEN".to_string(), "127.0.0.1:0".to_string()),
            (
                "TIDEMARK_ADMIN_LISTEN".to_string(),
                "127.0.0.1:0".to_string(),
            ),
            (
                "TIDEMARK_LOG".to_string(),
                "info,lapin=warn,tidemark_bus=warn".to_string(),
            ),
        ]);
        env.extend(self.env.iter().cloned());
        env
    }

    /// Start a coordinator; returns its index in `procs`.
    pub fn coordinator(&mut self, id: &str) -> usize {
        self.coordinator_with(id, &[])
    }

    /// Start a coordinator with extra flags; returns its index in `procs`.
    pub fn coordinator_with(&mut self, id: &str, extra: &[&str]) -> usize {
        let config = self.config.display().to_string();
        let mut args = vec!["coordinator", "--config", &config, "--id", id];
        args.extend_from_slice(extra);
        let p = spawn(id, &args, &self.role_env(), self.dir.path(), "metrics on");
        self.procs.push(p);
        self.procs.len() - 1
    }

    /// Start a worker; returns its index in `procs`.
    pub fn worker(&mut self, name: &str, extra: &[&str]) -> usize {
        self.worker_with_env(name, extra, &[])
    }

    /// Start a worker with extra environment (which wins over the cluster's).
    pub fn worker_with_env(&mut self, name: &str, extra: &[&str], env: &[(&str, &str)]) -> usize {
        let mut args = vec!["worker"];
        args.extend_from_slice(extra);
        let mut all = self.role_env();
        all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let p = spawn(name, &args, &all, self.dir.path(), "metrics on");
        self.procs.push(p);
        self.procs.len() - 1
    }

    pub async fn store(&self) -> Arc<RedisStore> {
        if let Some(s) = self.store.get() {
            return s.clone();
        }
        let s = Arc::new(
            RedisStore::connect(&self.redis, &self.redis_prefix())
                .await
                .expect("redis"),
        );
        let _ = self.store.set(s.clone());
        s
    }

    pub async fn jobs(&self) -> Vec<(JobId, Checkpoint)> {
        self.store().await.list().await.expect("list jobs")
    }

    pub async fn truth(&self) -> Truth {
        reqwest::get(format!("{}/_truth", self.mock_url))
            .await
            .expect("truth")
            .json()
            .await
            .expect("truth json")
    }

    /// Data requests the mock has served on `path`.
    pub async fn requests(&self, path: &str) -> u64 {
        let stats: serde_json::Value = reqwest::get(format!("{}/_stats", self.mock_url))
            .await
            .expect("stats")
            .json()
            .await
            .expect("stats json");
        stats["by_path"][path].as_u64().unwrap_or(0)
    }

    /// POST to a mock admin endpoint (`/_admin/insert?n=5`, ...).
    pub async fn admin(&self, path: &str, body: Option<serde_json::Value>) {
        let c = reqwest::Client::new();
        let mut req = c.post(format!("{}{path}", self.mock_url));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.expect("admin");
        assert!(r.status().is_success(), "{path}: {}", r.status());
    }

    /// The id of the leading coordinator, if one leads.
    pub async fn leader(&self) -> Option<String> {
        let client = redis::Client::open(self.redis.as_str()).expect("redis url");
        let mut c = client
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        redis::cmd("GET")
            .arg(format!("{}leader", self.redis_prefix()))
            .query_async(&mut c)
            .await
            .expect("GET leader")
    }

    /// Messages waiting in the dead-letter queue.
    pub async fn dead_letters(&self) -> u32 {
        let conn = match &self.amqp {
            None => Connection::connect(&amqp_url(), ConnectionProperties::default())
                .await
                .expect("amqp"),
            // One URL or a list of a cluster's nodes.
            Some(url) => tidemark_bus::amqp::open_connection(url, None)
                .await
                .expect("amqp"),
        };
        let ch = conn.create_channel().await.expect("channel");
        let q = ch
            .queue_declare(
                format!("{}.dead", self.prefix).as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("dead-letter queue");
        let n = q.message_count();
        let _ = conn.close(200, "bye".into()).await;
        n
    }

    /// The last lines of every process log, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for p in std::iter::once(&self.mock).chain(self.procs.iter()) {
            s.push_str(&format!("\n----- {} -----\n{}\n", p.name, p.log_tail(30)));
        }
        s
    }

    /// Delete the Redis keys, queues and records exchange of the
    /// deployment named `prefix` (the names [`Cluster::role_env`] gives).
    pub async fn cleanup(prefix: String) {
        if let Ok(store) = RedisStore::connect(&redis_url(), &redis_prefix_of(&prefix)).await {
            let _ = store.delete_all().await;
        }
        let mut cfg = BusConfig::new(amqp_url());
        cfg.records_exchange = exchange_of(&prefix);
        cfg.prefix = prefix;
        let _ = tidemark_bus::amqp::delete_topology(&cfg).await;
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.procs.clear();
        if !self.own_services {
            block_on_cleanup(Cluster::cleanup(self.prefix.clone()));
        }
    }
}

/// One record as it arrived downstream.
#[derive(Debug, Clone)]
pub struct Arrived {
    pub routing_key: String,
    pub message_id: String,
    pub id: String,
    pub updated_at: String,
    /// The message's `x-tenant` header (a tenanted feed's).
    pub tenant_header: Option<String>,
    /// The record's own `tenant` field (the mock tags tenants' records).
    pub record_tenant: Option<String>,
    /// When the checker received it.
    pub at: std::time::Instant,
}

/// A downstream subscriber bound to the cluster's exchange with `#`.
pub struct Checker {
    arrived: Arc<Mutex<Vec<Arrived>>>,
    /// How often each (routing key, message id) arrived.
    messages: Arc<Mutex<HashMap<(String, String), u64>>>,
    _conn: Connection,
}

impl Checker {
    pub async fn start(exchange: &str) -> Checker {
        let (conn, mut consumer, _) =
            tidemark_bus::amqp::subscribe(&amqp_url(), exchange, "#", "checker")
                .await
                .expect("subscribe to the records exchange");
        let arrived = Arc::new(Mutex::new(Vec::new()));
        let messages = Arc::new(Mutex::new(HashMap::new()));
        let (a, m) = (arrived.clone(), messages.clone());
        tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                let rk = d.routing_key.to_string();
                let mid = d
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                *m.lock()
                    .unwrap()
                    .entry((rk.clone(), mid.clone()))
                    .or_insert(0) += 1;
                let tenant_header = d
                    .properties
                    .headers()
                    .as_ref()
                    .and_then(|h| h.inner().get("x-tenant").cloned())
                    .map(|v| match v {
                        lapin::types::AMQPValue::LongString(s) => s.to_string(),
                        other => format!("{other:?}"),
                    });
                let at = std::time::Instant::now();
                let v: serde_json::Value = serde_json::from_slice(&d.data).expect("json body");
                let recs: Vec<serde_json::Value> = match v.get("records") {
                    Some(serde_json::Value::Array(rs)) => rs.clone(),
                    _ => vec![v],
                };
                {
                    let mut a = a.lock().unwrap();
                    for r in recs {
                        a.push(Arrived {
                            routing_key: rk.clone(),
                            message_id: mid.clone(),
                            id: r["id"].as_str().unwrap_or_default().to_string(),
                            updated_at: r["updated_at"].as_str().unwrap_or_default().to_string(),
                            tenant_header: tenant_header.clone(),
                            record_tenant: r["tenant"].as_str().map(str::to_string),
                            at,
                        });
                    }
                }
                let _ = d.ack(BasicAckOptions::default()).await;
            }
        });
        Checker {
            arrived,
            messages,
            _conn: conn,
        }
    }

    pub fn arrived(&self) -> Vec<Arrived> {
        self.arrived.lock().unwrap().clone()
    }

    /// Records arrived so far.
    pub fn count(&self) -> usize {
        self.arrived.lock().unwrap().len()
    }

    /// Wait until at least `n` records have arrived; false after `timeout`.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> bool {
        eventually(timeout, async || self.count() >= n).await
    }

    /// Messages whose id arrived more than once, counted once per repeat.
    pub fn duplicate_messages(&self) -> u64 {
        self.duplicates_by_partition().values().sum()
    }

    /// Repeated message ids per routing key.
    pub fn duplicates_by_partition(&self) -> BTreeMap<String, u64> {
        let mut out: BTreeMap<String, u64> = BTreeMap::new();
        for ((key, _), n) in self.messages.lock().unwrap().iter() {
            *out.entry(key.clone()).or_insert(0) += n.saturating_sub(1);
        }
        out
    }

    /// Every (routing key, message id) seen, with how often it arrived.
    pub fn messages(&self) -> HashMap<(String, String), u64> {
        self.messages.lock().unwrap().clone()
    }

    /// Arrived records grouped by routing key, in arrival order.
    pub fn by_partition(&self) -> BTreeMap<String, Vec<Arrived>> {
        let mut m: BTreeMap<String, Vec<Arrived>> = BTreeMap::new();
        for a in self.arrived() {
            m.entry(a.routing_key.clone()).or_default().push(a);
        }
        m
    }
}

/// Distinct (id, updated_at) pairs among `arrived`.
pub fn versions(arrived: &[Arrived]) -> HashSet<TruthRecord> {
    arrived
        .iter()
        .map(|a| TruthRecord {
            id: a.id.clone(),
            updated_at: a.updated_at.clone(),
        })
        .collect()
}

/// How many of the record versions `want` names per routing key have not
/// arrived under that key (keys with none missing are left out).
pub fn missing_by_key(
    checker: &Checker,
    want: &BTreeMap<String, Vec<TruthRecord>>,
) -> BTreeMap<String, usize> {
    let parts = checker.by_partition();
    want.iter()
        .map(|(key, records)| {
            let got = versions(parts.get(key).map(Vec::as_slice).unwrap_or_default());
            (
                key.clone(),
                records.iter().filter(|r| !got.contains(*r)).count(),
            )
        })
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// Check that `epoch` is fenced on `job`: a commit under it is refused and
/// the stored cursor stays `cursor` (what an operator's rewind set).
pub async fn assert_epoch_fenced(store: &dyn StateStore, job: &JobId, epoch: u64, cursor: &str) {
    use tidemark_core::checkpoint::{Commit, CommitOutcome};
    let seq = store.get(job).await.unwrap().unwrap().seq;
    let stale = Commit {
        epoch,
        expected_seq: seq,
        new_cursor: Some("stale".into()),
        new_seq: seq + 1,
        high_water: None,
        count: 1,
        end_of_stream: false,
        next_due_ms: 0,
        lease_ms: 1000,
        restart: None,
        note: None,
        triggers: Vec::new(),
        batches: Vec::new(),
    };
    assert_eq!(
        store.commit(job, &stale).await.unwrap(),
        CommitOutcome::Fenced
    );
    assert_eq!(
        store.get(job).await.unwrap().unwrap().cursor.as_deref(),
        Some(cursor)
    );
}

/// Poll `check` every 250 ms until it returns true or `timeout` passes.
pub async fn eventually(timeout: Duration, check: impl AsyncFnMut() -> bool) -> bool {
    tidemark_harness::eventually(timeout, Duration::from_millis(250), check).await
}
