//! The files tidemark ships for deployment, checked without Docker or a
//! cluster:
//!
//! - docker-compose.yml: its tidemark services run as local processes with
//!   their own commands and environment (compose host names mapped to the
//!   local Redis, RabbitMQ and free ports), and the records reach its
//!   printer, across a restart of the printer;
//! - k8s/: every overlay renders with `kubectl kustomize` and passes the
//!   strict schema check (`k8s/check`), the check fails on a broken
//!   manifest, and the manifests agree with the binary: ports, probes,
//!   shutdown grace, queue names, config, secrets, selectors; the ha
//!   overlay's URLs name the sentinels and RabbitMQ nodes it deploys;
//! - deploy/Dockerfile: a multi-stage build of the `tidemark` binary into a
//!   distroless, non-root image that has every library the binary needs.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test: a panic is the failure report

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use serde_yaml_ng::Value;
use tidemark_tests::{
    Checker, Cluster, Proc, amqp_url, block_on_cleanup, eventually, exchange_of, prefix_env,
    redis_url, tidemark_bin,
};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

/// `v` at a dotted path (`spec.template.spec.containers.0.args`); Null when absent.
fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    static NULL: Value = Value::Null;
    let mut cur = v;
    for part in path.split('.') {
        cur = match part.parse::<usize>() {
            Ok(i) => cur.get(i),
            Err(_) => cur.get(part),
        }
        .unwrap_or(&NULL);
    }
    cur
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => String::new(),
        other => panic!("not a scalar: {other:?}"),
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| s.iter().map(text).collect())
        .unwrap_or_default()
}

fn string_map(v: &Value) -> BTreeMap<String, String> {
    v.as_mapping()
        .map(|m| m.iter().map(|(k, v)| (text(k), text(v))).collect())
        .unwrap_or_default()
}

/// The default of `--flag` as `tidemark <role> --help` prints it.
fn cli_default(role: &str, flag: &str) -> String {
    let out = Command::new(tidemark_bin())
        .args([role, "--help"])
        .output()
        .expect("tidemark --help");
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = help
        .lines()
        .skip_while(|l| !l.trim_start().starts_with(flag));
    let mut block = String::new();
    for l in lines.by_ref().take(6) {
        block.push_str(l);
        if l.contains("[default: ") {
            break;
        }
    }
    let start = block
        .find("[default: ")
        .unwrap_or_else(|| panic!("no default for {flag} in `tidemark {role} --help`"));
    block[start + 10..]
        .split(']')
        .next()
        .unwrap_or_default()
        .to_string()
}

fn seconds(d: &str) -> u64 {
    d.parse::<tidemark_core::Duration>()
        .unwrap_or_else(|e| panic!("duration {d:?}: {e}"))
        .std()
        .as_secs()
}

// ----------------------------------------------------------------------
// docker-compose.yml

#[derive(Debug, Clone)]
struct ComposeService {
    name: String,
    image: String,
    dockerfile: Option<String>,
    command: Vec<String>,
    env: BTreeMap<String, String>,
    /// (host path relative to the repository, path in the container)
    mounts: Vec<(String, String)>,
    ports: Vec<String>,
    replicas: usize,
    depends_on: Vec<String>,
    stop_grace_period: Option<String>,
}

impl ComposeService {
    fn is_tidemark(&self) -> bool {
        self.image.starts_with("tidemark")
    }
    fn role(&self) -> &str {
        self.command.first().map(String::as_str).unwrap_or_default()
    }
    fn arg_after(&self, flag: &str) -> Option<&str> {
        let i = self.command.iter().position(|a| a == flag)?;
        self.command.get(i + 1).map(String::as_str)
    }
    /// The host path (relative to the repository) mounted at `container`.
    fn host_path(&self, container: &str) -> Option<&str> {
        self.mounts
            .iter()
            .find(|(_, c)| c == container)
            .map(|(host, _)| host.as_str())
    }
}

fn compose() -> BTreeMap<String, ComposeService> {
    let text_ =
        std::fs::read_to_string(repo().join("docker-compose.yml")).expect("docker-compose.yml");
    let mut doc: Value = serde_yaml_ng::from_str(&text_).expect("docker-compose.yml is YAML");
    doc.apply_merge().expect("merge keys");
    let services = doc["services"].as_mapping().expect("services");
    services
        .iter()
        .map(|(name, s)| {
            let name = text(name);
            let env = match &s["environment"] {
                Value::Sequence(items) => items
                    .iter()
                    .map(|i| {
                        let kv = text(i);
                        let (k, v) = kv.split_once('=').unwrap_or((&kv, ""));
                        (k.to_string(), v.to_string())
                    })
                    .collect(),
                other => string_map(other),
            };
            let command = match &s["command"] {
                Value::String(c) => c.split_whitespace().map(str::to_string).collect(),
                other => strings(other),
            };
            let mounts = strings(&s["volumes"])
                .into_iter()
                .filter(|v| v.starts_with("./") || v.starts_with('/'))
                .map(|v| {
                    let mut parts = v.split(':');
                    let host = parts.next().unwrap_or_default().to_string();
                    let container = parts.next().unwrap_or_default().to_string();
                    (host, container)
                })
                .collect();
            let depends_on = match &s["depends_on"] {
                Value::Mapping(m) => m.keys().map(text).collect(),
                other => strings(other),
            };
            let svc = ComposeService {
                image: text(&s["image"]),
                dockerfile: s["build"].get("dockerfile").map(text),
                command,
                env,
                mounts,
                ports: strings(&s["ports"]),
                replicas: s["deploy"]
                    .get("replicas")
                    .and_then(Value::as_u64)
                    .unwrap_or(1) as usize,
                depends_on,
                stop_grace_period: s.get("stop_grace_period").map(text),
                name: name.clone(),
            };
            (name, svc)
        })
        .collect()
}

/// The tidemark services in an order that respects `depends_on`.
fn start_order(services: &BTreeMap<String, ComposeService>) -> Vec<ComposeService> {
    let mut order: Vec<ComposeService> = Vec::new();
    let mut left: Vec<&ComposeService> = services.values().filter(|s| s.is_tidemark()).collect();
    while !left.is_empty() {
        let ready = left
            .iter()
            .position(|s| {
                s.depends_on
                    .iter()
                    .all(|d| !services[d].is_tidemark() || order.iter().any(|o| &o.name == d))
            })
            .expect("depends_on has a cycle");
        order.push(left.remove(ready).clone());
    }
    order
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

async fn delete_queue(name: &str) {
    use lapin::options::QueueDeleteOptions;
    if let Ok(conn) =
        lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default()).await
    {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .queue_delete(name.into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = conn.close(200, "bye".into()).await;
    }
}

/// What a compose service becomes as a local process.
struct Mapping {
    services: BTreeMap<String, ComposeService>,
    /// (service, port it listens on in its container) -> local port, once
    /// the service has started on port 0 and announced the one it got.
    ports: HashMap<(String, u16), u16>,
    dir: PathBuf,
    prefix: String,
}

impl Mapping {
    /// A value of the compose file, with its host names mapped: the
    /// Redis and RabbitMQ services become the local servers, a tidemark
    /// service becomes 127.0.0.1 on its local port, and a listen address
    /// on all interfaces becomes a free local port.
    fn value(&self, v: &str) -> String {
        if let Some(port) = v.strip_prefix("0.0.0.0:") {
            assert!(port.parse::<u16>().is_ok(), "listen address {v}");
            return "127.0.0.1:0".into();
        }
        let Ok(url) = reqwest::Url::parse(v) else {
            return v.to_string();
        };
        let Some(svc) = url.host_str().and_then(|h| self.services.get(h)) else {
            return v.to_string();
        };
        if svc.image.starts_with("redis") {
            assert_eq!(url.scheme(), "redis", "{v}");
            return redis_url();
        }
        if svc.image.starts_with("rabbitmq") {
            assert_eq!(url.scheme(), "amqp", "{v}");
            assert_eq!(url.port_or_known_default(), Some(5672), "{v}");
            return amqp_url();
        }
        let port = url.port_or_known_default().expect("port");
        let local = self.ports[&(svc.name.clone(), port)];
        v.replacen(
            &format!("{}:{port}", svc.name),
            &format!("127.0.0.1:{local}"),
            1,
        )
    }

    /// A mounted file: copied with `service:port` mapped like [`Mapping::value`].
    fn file(&self, host: &str) -> PathBuf {
        let mut content = std::fs::read_to_string(repo().join(host))
            .unwrap_or_else(|e| panic!("mounted file {host}: {e}"));
        for ((svc, port), local) in &self.ports {
            content = content.replace(&format!("{svc}:{port}"), &format!("127.0.0.1:{local}"));
        }
        let to = self
            .dir
            .join(Path::new(host).file_name().expect("file name"));
        std::fs::write(&to, content).expect("write mapped file");
        to
    }

    fn command(&self, svc: &ComposeService) -> Vec<String> {
        let mut out = Vec::new();
        let mut prev = "";
        for arg in &svc.command {
            let mapped = if let Some(host) = svc.host_path(arg) {
                self.file(host).display().to_string()
            } else if prev == "--host" && arg == "0.0.0.0" {
                "127.0.0.1".to_string()
            } else if prev == "--port" {
                // Any free port: the service announces the one it got.
                "0".to_string()
            } else {
                self.value(arg)
            };
            out.push(mapped);
            prev = arg;
        }
        out
    }

    fn env(&self, svc: &ComposeService) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = svc
            .env
            .iter()
            .map(|(k, v)| {
                let v = match k.as_str() {
                    // Isolation from other test runs on the shared servers,
                    // not wiring: the durable queue gets this run's prefix.
                    "TIDEMARK_TAIL_QUEUE" => format!("{}.{v}", self.prefix),
                    _ => self.value(v),
                };
                (k.clone(), v)
            })
            .collect();
        env.extend(prefix_env(&self.prefix));
        env
    }

    fn spawn(&mut self, svc: &ComposeService, instance: &str) -> Proc {
        let marker = match svc.role() {
            "mock-api" => "mock API listening",
            "tail" => "tidemark tail: bound",
            _ => "metrics on",
        };
        let args = self.command(svc);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out =
            std::fs::File::create(self.dir.join(format!("{instance}.out"))).expect("stdout file");
        let p = tidemark_tests::spawn_to(instance, &args, &self.env(svc), &self.dir, marker, out);
        if let Some(port) = svc.arg_after("--port") {
            let announced = p.addr.as_deref().expect("an announced address");
            let local = reqwest::Url::parse(announced)
                .ok()
                .and_then(|u| u.port())
                .expect("a port in the announced address");
            self.ports
                .insert((svc.name.clone(), port.parse().expect("port")), local);
        }
        p
    }
}

#[test]
fn compose_file_describes_the_demo_stack() {
    let services = compose();
    let redis = &services["redis"];
    assert!(redis.image.starts_with("redis:"), "{redis:?}");
    let appendonly = redis.command.iter().position(|a| a == "--appendonly");
    assert_eq!(
        appendonly
            .and_then(|i| redis.command.get(i + 1))
            .map(String::as_str),
        Some("yes"),
        "Redis keeps its append-only file: {:?}",
        redis.command
    );
    let rabbit = &services["rabbitmq"];
    assert!(rabbit.image.contains("management"), "{rabbit:?}");
    assert!(
        rabbit.ports.iter().any(|p| p.ends_with(":15672")),
        "{rabbit:?}"
    );

    let by_role = |role: &str| -> Vec<&ComposeService> {
        services
            .values()
            .filter(|s| s.is_tidemark() && s.role() == role)
            .collect()
    };
    let replicas = |role: &str| by_role(role).iter().map(|s| s.replicas).sum::<usize>();
    assert_eq!(replicas("coordinator"), 1);
    assert_eq!(replicas("worker"), 3);
    assert_eq!(replicas("mock-api"), 1);
    assert_eq!(replicas("tail"), 1, "a downstream consumer that prints");

    let grace = seconds(&cli_default("worker", "--grace"));
    for s in services.values().filter(|s| s.is_tidemark()) {
        assert_eq!(
            s.dockerfile.as_deref(),
            Some("deploy/Dockerfile"),
            "{} is built from deploy/Dockerfile",
            s.name
        );
        // Connections name the compose services: a missing URL would fall
        // back to 127.0.0.1, which works here and nowhere in compose.
        let needs: &[&str] = match s.role() {
            "coordinator" | "worker" => &["REDIS_URL", "AMQP_URL"],
            "tail" => &["AMQP_URL"],
            _ => &[],
        };
        for var in needs {
            let url = reqwest::Url::parse(
                s.env
                    .get(*var)
                    .unwrap_or_else(|| panic!("{} has no {var}", s.name)),
            )
            .expect("URL");
            let host = url.host_str().unwrap_or_default();
            assert!(
                services.contains_key(host),
                "{}: {var} points at {host}, not a compose service",
                s.name
            );
        }
        if s.role() == "worker" {
            let g = s
                .env
                .get("TIDEMARK_GRACE")
                .map(|g| seconds(g))
                .unwrap_or(grace);
            let stop = seconds(s.stop_grace_period.as_deref().unwrap_or("10s"));
            assert!(
                stop > g,
                "worker stop_grace_period {stop}s must outlast its {g}s grace"
            );
        }
    }
    let coord = by_role("coordinator")[0];
    let config = coord.arg_after("--config").expect("coordinator --config");
    let host = coord
        .host_path(config)
        .expect("the config is a mounted file");
    tidemark_core::config::load_file(&repo().join(host)).expect("the compose feeds load");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_services_run_as_local_processes_and_records_reach_the_printer() {
    let services = compose();
    let prefix = format!(
        "tmcompose{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    );
    let dir = tempfile::Builder::new()
        .prefix(&format!("{prefix}-"))
        .tempdir()
        .expect("tempdir");
    let mut map = Mapping {
        services: services.clone(),
        ports: HashMap::new(),
        dir: dir.path().to_path_buf(),
        prefix: prefix.clone(),
    };
    let exchange = exchange_of(&prefix);
    let printer_queue = services
        .values()
        .find(|s| s.role() == "tail")
        .and_then(|s| s.env.get("TIDEMARK_TAIL_QUEUE"))
        .map(|q| format!("{prefix}.{q}"));
    let _cleanup = Cleanup {
        prefix: prefix.clone(),
        queue: printer_queue,
    };

    // A checker bound before anything runs sees every message, by feed.
    let checker = Checker::start(&exchange).await;
    let mut procs: Vec<(ComposeService, Proc)> = Vec::new();
    for svc in start_order(&services) {
        for i in 1..=svc.replicas {
            let instance = if svc.replicas > 1 {
                format!("{}-{i}", svc.name)
            } else {
                svc.name.clone()
            };
            procs.push((svc.clone(), map.spawn(&svc, &instance)));
        }
    }
    let logs = |procs: &[(ComposeService, Proc)]| -> String {
        procs
            .iter()
            .map(|(_, p)| format!("\n----- {} -----\n{}", p.name, p.log_tail(20)))
            .collect()
    };

    let mock = services
        .values()
        .find(|s| s.role() == "mock-api")
        .expect("mock-api");
    let records: usize = mock
        .arg_after("--records")
        .expect("--records")
        .parse()
        .expect("number");
    let coord = services
        .values()
        .find(|s| s.role() == "coordinator")
        .expect("coordinator");
    let config_host = coord
        .arg_after("--config")
        .and_then(|c| coord.host_path(c))
        .expect("mounted config");
    let config = tidemark_core::config::load_file(&map.file(config_host)).expect("config");
    let feeds: Vec<String> = config.feeds.iter().map(|f| f.name.clone()).collect();
    let printer = procs
        .iter()
        .position(|(s, _)| s.role() == "tail")
        .expect("printer");
    let printer_name = procs[printer].1.name.clone();
    let out1 = dir.path().join(format!("{printer_name}.out"));

    // Restart the printer a third of the way in: its durable queue keeps
    // what arrives meanwhile.
    let third = feeds.len() * records / 3;
    assert!(
        eventually(Duration::from_secs(120), async || lines(&out1).len()
            >= third)
        .await,
        "the printer printed {} of {third} records{}",
        lines(&out1).len(),
        logs(&procs)
    );
    let (svc, mut first) = procs.remove(printer);
    let status = first.term(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "printer on SIGTERM: {status:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let restarted = map.spawn(&svc, &format!("{printer_name}-again"));
    let out2 = dir.path().join(format!("{printer_name}-again.out"));
    procs.push((svc, restarted));

    // Every feed delivers every record of the mock.
    let complete = eventually(Duration::from_secs(180), async || {
        let by = checker.by_partition();
        feeds.iter().all(|f| {
            by.get(&format!("{f}.all"))
                .map(|a| a.iter().map(|r| &r.id).collect::<BTreeSet<_>>().len())
                .unwrap_or(0)
                >= records
        })
    })
    .await;
    let counts: BTreeMap<String, usize> = checker
        .by_partition()
        .into_iter()
        .map(|(k, v)| (k, v.len()))
        .collect();
    assert!(
        complete,
        "records by feed: {counts:?} (want {records} each){}",
        logs(&procs)
    );

    // And the printer printed at least everything the checker saw so far,
    // across its restart: nothing was lost while it was down.
    let seen = checker.count();
    let printed = || lines(&out1).len() + lines(&out2).len();
    assert!(
        eventually(Duration::from_secs(60), async || printed() >= seen).await,
        "the printer printed {} of {seen} records{}",
        printed(),
        logs(&procs)
    );
    for line in lines(&out1).iter().chain(lines(&out2).iter()).take(200) {
        let v: serde_json::Value = serde_json::from_str(line).expect("a JSON record per line");
        assert!(v.get("id").is_some(), "{line}");
    }

    // Every role stops cleanly on SIGTERM, within the worker's grace.
    for (svc, p) in procs.iter_mut() {
        let status = p.term(Duration::from_secs(40));
        assert!(
            status.is_some_and(|s| s.success()),
            "{} ({}) on SIGTERM: {status:?}",
            p.name,
            svc.role()
        );
    }
}

/// Deletes a compose run's keys, queues and exchange when dropped, also
/// when the test failed.
struct Cleanup {
    prefix: String,
    queue: Option<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (prefix, queue) = (self.prefix.clone(), self.queue.clone());
        block_on_cleanup(async move {
            Cluster::cleanup(prefix).await;
            if let Some(q) = queue {
                delete_queue(&q).await;
            }
        });
    }
}

// ----------------------------------------------------------------------
// k8s/

/// Why the Kubernetes checks cannot run here, when `scripts/test` found no
/// kubectl new enough to render kustomize components (it says so loudly).
fn k8s_skipped() -> bool {
    match std::env::var("TIDEMARK_SKIP_K8S") {
        Ok(reason) if !reason.is_empty() => {
            eprintln!("SKIPPED: the Kubernetes manifest checks: {reason}");
            true
        }
        _ => false,
    }
}

/// Run `k8s/check` (render every overlay, validate strictly) into a fresh
/// directory and return the documents of each overlay.
fn rendered() -> BTreeMap<String, Vec<Value>> {
    static RENDERED: std::sync::OnceLock<BTreeMap<String, Vec<Value>>> = std::sync::OnceLock::new();
    RENDERED
        .get_or_init(|| {
            let out = tempfile::tempdir().expect("tempdir");
            let run = Command::new(repo().join("k8s/check"))
                .arg(out.path())
                .output()
                .expect("run k8s/check");
            assert!(
                run.status.success(),
                "k8s/check failed:\n{}\n{}",
                String::from_utf8_lossy(&run.stdout),
                String::from_utf8_lossy(&run.stderr)
            );
            let overlays: Vec<String> = std::fs::read_dir(repo().join("k8s/overlays"))
                .expect("k8s/overlays")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            assert!(overlays.len() >= 2, "{overlays:?}");
            overlays
                .into_iter()
                .map(|o| {
                    let text_ = std::fs::read_to_string(out.path().join(format!("{o}.yaml")))
                        .unwrap_or_else(|e| panic!("overlay {o} was not rendered: {e}"));
                    let docs: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&text_)
                        .map(|d| serde::Deserialize::deserialize(d).expect("rendered YAML"))
                        .filter(|d: &Value| !d.is_null())
                        .collect();
                    (o, docs)
                })
                .collect()
        })
        .clone()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| text(&d["kind"]) == kind).collect()
}

fn named<'a>(docs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    of_kind(docs, kind)
        .into_iter()
        .find(|d| text(at(d, "metadata.name")) == name)
}

/// `selector` (matchLabels or a plain map) selects pods labelled `labels`.
fn selects(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
    let wanted = match selector.get("matchLabels") {
        Some(m) => string_map(m),
        None => string_map(selector),
    };
    !wanted.is_empty() && wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The ports a connection URL reaches and the passwords it holds, as
/// tidemark's own parsers read them: a Sentinel URL's sentinels, every node
/// of an `AMQP_URL` list.
fn connection(key: &str, url: &str) -> (Vec<u16>, Vec<String>) {
    if key == "REDIS_URL" && tidemark_state::is_sentinel_url(url) {
        let s =
            tidemark_state::SentinelUrl::parse(url).unwrap_or_else(|e| panic!("REDIS_URL: {e}"));
        let ports = s.sentinels.iter().map(|(_, p)| *p).collect();
        return (
            ports,
            [s.password, s.sentinel_password]
                .into_iter()
                .flatten()
                .collect(),
        );
    }
    let urls: Vec<String> = match key {
        "AMQP_URL" => tidemark_bus::endpoints::AmqpUrl::new(url)
            .endpoints()
            .unwrap_or_else(|e| panic!("AMQP_URL: {e}"))
            .iter()
            .map(|e| e.url().to_string())
            .collect(),
        _ => vec![url.to_string()],
    };
    let mut out = (Vec::new(), Vec::new());
    for u in urls {
        let u = reqwest::Url::parse(&u).expect("URL");
        out.0.push(u.port_or_known_default().unwrap_or(match key {
            "REDIS_URL" => 6379,
            _ => 5672,
        }));
        out.1.extend(u.password().map(str::to_string));
    }
    out
}

/// The names of a value's `$(NAME)`s, which Kubernetes fills in from the
/// container's variables listed before it.
fn var_refs(value: &str) -> Vec<String> {
    value
        .split("$(")
        .skip(1)
        .filter_map(|s| s.split_once(')'))
        .map(|(name, _)| name.to_string())
        .collect()
}

/// A tidemark role's Deployment in an overlay.
struct Role<'a> {
    /// What the Deployment runs: `tidemark <role>`.
    role: &'a str,
    deployment: &'a Value,
    pod_labels: BTreeMap<String, String>,
    container: &'a Value,
    env: BTreeMap<String, String>,
}

impl<'a> Role<'a> {
    fn find(docs: &'a [Value], role: &'a str) -> Role<'a> {
        let deployment = of_kind(docs, "Deployment")
            .into_iter()
            .find(|d| {
                strings(at(d, "spec.template.spec.containers.0.args"))
                    .first()
                    .map(String::as_str)
                    == Some(role)
            })
            .unwrap_or_else(|| panic!("no Deployment runs `tidemark {role}`"));
        let container = at(deployment, "spec.template.spec.containers.0");
        let env = container["env"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter(|e| e.get("value").is_some())
            .map(|e| (text(&e["name"]), text(&e["value"])))
            .collect();
        Role {
            role,
            deployment,
            pod_labels: string_map(at(deployment, "spec.template.metadata.labels")),
            container,
            env,
        }
    }
    fn name(&self) -> String {
        text(at(self.deployment, "metadata.name"))
    }
    /// The setting `var`, else the CLI's default for `flag`.
    fn setting(&self, var: &str, flag: &str) -> String {
        self.env
            .get(var)
            .cloned()
            .unwrap_or_else(|| cli_default(self.role, flag))
    }
    fn port(&self, name: &str) -> u16 {
        self.container["ports"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|p| text(&p["name"]) == name)
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("{}: no container port {name}", self.name())) as u16
    }
    /// The variables listed before `var` whose values come from a Secret.
    fn secret_vars_before(&self, var: &str) -> Vec<String> {
        self.container["env"]
            .as_sequence()
            .into_iter()
            .flatten()
            .take_while(|e| text(&e["name"]) != var)
            .filter(|e| at(e, "valueFrom.secretKeyRef").is_mapping())
            .map(|e| text(&e["name"]))
            .collect()
    }
    fn secret_refs(&self) -> Vec<(String, String)> {
        self.container["env"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter_map(|e| e.get("valueFrom")?.get("secretKeyRef"))
            .filter(|r| r.get("optional").and_then(Value::as_bool) != Some(true))
            .map(|r| (text(&r["name"]), text(&r["key"])))
            .collect()
    }
}

#[test]
fn k8s_check_rejects_a_broken_manifest() {
    if k8s_skipped() {
        return;
    }
    let docs = &rendered()["example"];
    let venv_python = repo().join("target/k8s-venv/bin/python");
    let check = |docs: &[Value]| -> (bool, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("broken.yaml");
        let text_: Vec<String> = docs
            .iter()
            .map(|d| serde_yaml_ng::to_string(d).expect("yaml"))
            .collect();
        std::fs::write(&file, text_.join("---\n")).expect("write");
        let out = Command::new(&venv_python)
            .arg(repo().join("k8s/validate.py"))
            .arg(&file)
            .output()
            .expect("run validate.py");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert!(check(docs).0, "the rendered example passes as it is");

    // A misspelled container field, as Kubernetes' schema sees it.
    let mut broken = docs.clone();
    for d in broken
        .iter_mut()
        .filter(|d| text(&d["kind"]) == "Deployment")
    {
        d["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = Value::from("Always");
    }
    let (ok, err) = check(&broken);
    assert!(!ok && err.contains("imagePullPolicyy"), "{err}");

    // A misspelled KEDA trigger parameter and a bad scrape interval, as the
    // repository's schemas see them.
    let mut broken = docs.clone();
    for d in broken.iter_mut() {
        match text(&d["kind"]).as_str() {
            "ScaledObject" => {
                let m = d["spec"]["triggers"][0]["metadata"]
                    .as_mapping_mut()
                    .expect("metadata");
                let q = m.remove("queueName").expect("queueName");
                m.insert(Value::from("queuName"), q);
            }
            "ServiceMonitor" => d["spec"]["endpoints"][0]["interval"] = Value::from("15 seconds"),
            _ => {}
        }
    }
    let (ok, err) = check(&broken);
    assert!(
        !ok && err.contains("queuName") && err.contains("15 seconds"),
        "{err}"
    );

    // A misspelled RabbitmqCluster field (the ha overlay's), as the schema
    // derived from the operator's CRD sees it.
    let mut rabbit = named(&rendered()["ha"], "RabbitmqCluster", "rabbit")
        .expect("the ha overlay's RabbitmqCluster")
        .clone();
    let spec = rabbit["spec"].as_mapping_mut().expect("spec");
    let replicas = spec.remove("replicas").expect("replicas");
    spec.insert(Value::from("replica"), replicas);
    let (ok, err) = check(&[rabbit]);
    assert!(!ok && err.contains("'replica'"), "{err}");

    // A kind nobody has a schema for is an error, not a pass.
    let mut unknown = docs.clone();
    unknown.push(
        serde_yaml_ng::from_str(
            "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w}\nspec: {}\n",
        )
        .expect("yaml"),
    );
    let (ok, err) = check(&unknown);
    assert!(!ok && err.contains("Widget"), "{err}");
}

#[test]
fn k8s_manifests_agree_with_the_binary() {
    if k8s_skipped() {
        return;
    }
    for (overlay, docs) in rendered() {
        let ctx = |what: &str| format!("overlay {overlay}: {what}");
        let coordinator = Role::find(&docs, "coordinator");
        let worker = Role::find(&docs, "worker");

        // Two coordinators, one of which leads.
        assert_eq!(
            at(coordinator.deployment, "spec.replicas").as_u64(),
            Some(2),
            "{}",
            ctx("coordinator replicas")
        );

        // What both roles connect to: the ports of the URLs written in the
        // Deployment or in the Secret the overlay ships, else Redis's and
        // RabbitMQ's defaults.
        let shipped = named(&docs, "Secret", "tidemark-connections");
        let mut connections: Vec<(String, u16)> = Vec::new();
        for (key, default) in [("REDIS_URL", 6379), ("AMQP_URL", 5672)] {
            let url = coordinator.env.get(key).cloned().or_else(|| {
                let b64 = text(&shipped?["data"][key]);
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .expect("base64");
                Some(String::from_utf8(bytes).expect("utf-8"))
            });
            match url {
                Some(url) => connections.extend(
                    connection(key, &url)
                        .0
                        .into_iter()
                        .map(|p| (key.to_string(), p)),
                ),
                None => connections.push((key.to_string(), default)),
            }
        }

        // The feeds, as the coordinator reads them from the ConfigMap it mounts.
        let config_path = {
            let args = strings(&coordinator.container["args"]);
            let i = args.iter().position(|a| a == "--config").expect("--config");
            PathBuf::from(&args[i + 1])
        };
        let mount = coordinator.container["volumeMounts"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|m| Path::new(&text(&m["mountPath"])) == config_path.parent().expect("dir"))
            .unwrap_or_else(|| panic!("{}", ctx("the config's directory is mounted")));
        let volume = at(coordinator.deployment, "spec.template.spec.volumes")
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|v| text(&v["name"]) == text(&mount["name"]))
            .expect("volume");
        let cm = named(&docs, "ConfigMap", &text(at(volume, "configMap.name")))
            .unwrap_or_else(|| panic!("{}", ctx("the mounted ConfigMap exists")));
        let file = config_path
            .file_name()
            .expect("file")
            .to_string_lossy()
            .into_owned();
        let config = tidemark_core::config::load_str(&file, &text(&cm["data"][file.as_str()]))
            .unwrap_or_else(|e| panic!("{}", ctx(&format!("the feeds load: {e}"))));

        for r in [&coordinator, &worker] {
            let role = r.role;
            let pod = at(r.deployment, "spec.template.spec");
            let what = |s: &str| ctx(&format!("{role}: {s}"));
            // Restricted security context.
            assert_eq!(
                at(pod, "securityContext.runAsNonRoot").as_bool(),
                Some(true),
                "{}",
                what("runAsNonRoot")
            );
            assert_ne!(
                at(pod, "securityContext.runAsUser").as_u64(),
                Some(0),
                "{}",
                what("runAsUser")
            );
            assert_eq!(
                at(pod, "automountServiceAccountToken").as_bool(),
                Some(false),
                "{}",
                what("no API token")
            );
            let sc = &r.container["securityContext"];
            assert_eq!(
                at(sc, "readOnlyRootFilesystem").as_bool(),
                Some(true),
                "{}",
                what("read-only root")
            );
            assert_eq!(
                at(sc, "allowPrivilegeEscalation").as_bool(),
                Some(false),
                "{}",
                what("no escalation")
            );
            assert!(
                strings(at(sc, "capabilities.drop")).contains(&"ALL".to_string()),
                "{}",
                what("caps")
            );
            for res in [
                "requests.cpu",
                "requests.memory",
                "limits.cpu",
                "limits.memory",
            ] {
                assert!(
                    !at(&r.container["resources"], res).is_null(),
                    "{}",
                    what(res)
                );
            }
            // The probes hit the endpoints the role serves, on the port it listens on.
            let listen = r
                .env
                .get("TIDEMARK_LISTEN")
                .unwrap_or_else(|| panic!("{}", what("TIDEMARK_LISTEN")));
            let port: u16 = listen
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .expect("listen port");
            assert!(
                listen.starts_with("0.0.0.0:"),
                "{}",
                what("listens on all interfaces")
            );
            assert_eq!(r.port("metrics"), port, "{}", what("metrics port"));
            for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
                let get = &r.container[probe]["httpGet"];
                assert_eq!(text(&get["path"]), path, "{}", what(probe));
                let p = text(&get["port"]);
                assert!(p == "metrics" || p == port.to_string(), "{}", what(probe));
            }
            // Connections come from a Secret; an overlay that ships the
            // Secret has every key the roles read.
            let refs = r.secret_refs();
            for var in ["REDIS_URL", "AMQP_URL"] {
                let Some(url) = r.env.get(var) else {
                    assert!(
                        refs.iter().any(|(_, k)| k == var),
                        "{}",
                        what(&format!("{var} from a Secret"))
                    );
                    continue;
                };
                // A URL written in the Deployment holds no password: each
                // is a $(VAR) of a variable from a Secret, listed before it.
                let from_secrets = r.secret_vars_before(var);
                for name in var_refs(url) {
                    assert!(
                        from_secrets.contains(&name),
                        "{}",
                        what(&format!(
                            "$({name}) in {var} comes from a Secret, listed before it"
                        ))
                    );
                }
                for password in connection(var, url).1 {
                    assert!(
                        password.starts_with("$(") && password.ends_with(')'),
                        "{}",
                        what(&format!("{var} has a literal password"))
                    );
                }
            }
            for (name, key) in &refs {
                if let Some(secret) = named(&docs, "Secret", name) {
                    assert!(
                        !secret["data"][key.as_str()].is_null(),
                        "{}",
                        what(&format!("Secret {name} has {key}"))
                    );
                }
            }
            // Services point at the pods and at ports they have.
            let svcs: Vec<&Value> = of_kind(&docs, "Service")
                .into_iter()
                .filter(|s| selects(&s["spec"]["selector"], &r.pod_labels))
                .collect();
            assert_eq!(svcs.len(), 1, "{}", what("one Service"));
            for p in svcs[0]["spec"]["ports"].as_sequence().into_iter().flatten() {
                r.port(&text(&p["targetPort"]));
            }
            // A disruption budget and the network policy cover the pods.
            let pdbs = of_kind(&docs, "PodDisruptionBudget")
                .into_iter()
                .filter(|p| selects(&p["spec"]["selector"], &r.pod_labels))
                .count();
            assert_eq!(pdbs, 1, "{}", what("one PodDisruptionBudget"));
            let np = of_kind(&docs, "NetworkPolicy")
                .into_iter()
                .find(|p| selects(&p["spec"]["podSelector"], &r.pod_labels))
                .unwrap_or_else(|| panic!("{}", what("a NetworkPolicy")));
            let policy_ports = |dir: &str| -> BTreeSet<u64> {
                np["spec"][dir]
                    .as_sequence()
                    .into_iter()
                    .flatten()
                    .flat_map(|rule| rule["ports"].as_sequence().into_iter().flatten())
                    .filter_map(|p| p["port"].as_u64())
                    .collect()
            };
            assert!(
                policy_ports("ingress").contains(&u64::from(port)),
                "{}",
                what("metrics reachable")
            );
            let egress = policy_ports("egress");
            assert!(egress.contains(&53), "{}", what("DNS"));
            let mut needed = connections.clone();
            if role == "worker" {
                for (name, s) in &config.sources {
                    needed.push((
                        format!("source {name}"),
                        s.base_url
                            .url()
                            .expect("a URL")
                            .port_or_known_default()
                            .expect("port"),
                    ));
                }
            }
            for (what_, p) in needed {
                assert!(
                    egress.contains(&u64::from(p)),
                    "{}",
                    what(&format!("egress to {what_} on {p}"))
                );
            }
        }

        // The worker's shutdown fits in its termination grace period.
        let grace = seconds(&worker.setting("TIDEMARK_GRACE", "--grace"));
        let termination = at(
            worker.deployment,
            "spec.template.spec.terminationGracePeriodSeconds",
        )
        .as_u64()
        .unwrap_or(30);
        assert!(
            termination >= grace + 5,
            "{}",
            ctx(&format!(
                "terminationGracePeriodSeconds {termination} < grace {grace}s + 5s"
            ))
        );
        assert!(
            worker.container.get("envFrom").is_some(),
            "{}",
            ctx("source credentials from a Secret")
        );

        // The feeds' credentials are ${VAR} references, never literals.
        for (name, source) in &config.sources {
            for s in source.auth.iter().flat_map(|a| a.secrets()) {
                assert!(
                    !s.is_literal(),
                    "{}",
                    ctx(&format!("source {name} has a literal credential"))
                );
            }
        }
        let admin = coordinator
            .env
            .get("TIDEMARK_ADMIN_LISTEN")
            .expect("TIDEMARK_ADMIN_LISTEN");
        let admin_port = admin.rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
        assert_eq!(
            admin_port,
            Some(coordinator.port("admin")),
            "{}",
            ctx("admin port")
        );

        // Exactly one autoscaler drives the workers.
        let scaled: Vec<&Value> = of_kind(&docs, "ScaledObject")
            .into_iter()
            .chain(of_kind(&docs, "HorizontalPodAutoscaler"))
            .filter(|s| text(at(s, "spec.scaleTargetRef.name")) == worker.name())
            .collect();
        assert_eq!(scaled.len(), 1, "{}", ctx("one autoscaler for the workers"));
        if text(&scaled[0]["kind"]) == "ScaledObject" {
            // KEDA watches the queue the workers consume, one worker per
            // TIDEMARK_CONCURRENCY tasks.
            let trigger = at(scaled[0], "spec.triggers.0");
            assert_eq!(text(&trigger["type"]), "rabbitmq");
            let mut bus = tidemark_bus::amqp::BusConfig::new(String::new());
            bus.prefix = worker.setting("TIDEMARK_QUEUE_PREFIX", "--queue-prefix");
            assert_eq!(
                text(&trigger["metadata"]["queueName"]),
                bus.tasks_queue(),
                "{}",
                ctx("queueName")
            );
            assert_eq!(
                text(&trigger["metadata"]["value"]),
                worker.setting("TIDEMARK_CONCURRENCY", "--concurrency"),
                "{}",
                ctx("one worker per TIDEMARK_CONCURRENCY tasks")
            );
            let auth = text(at(trigger, "authenticationRef.name"));
            let auth = named(&docs, "TriggerAuthentication", &auth)
                .unwrap_or_else(|| panic!("{}", ctx("TriggerAuthentication")));
            for r in auth["spec"]["secretTargetRef"]
                .as_sequence()
                .into_iter()
                .flatten()
            {
                if let Some(secret) = named(&docs, "Secret", &text(&r["name"])) {
                    assert!(
                        !secret["data"][text(&r["key"]).as_str()].is_null(),
                        "{}",
                        ctx("KEDA's secret key")
                    );
                }
            }
        }

        // The ServiceMonitor, where there is one, scrapes both roles' metrics.
        for sm in of_kind(&docs, "ServiceMonitor") {
            let port = text(at(sm, "spec.endpoints.0.port"));
            for r in [&coordinator, &worker] {
                let svc = of_kind(&docs, "Service")
                    .into_iter()
                    .find(|s| selects(&s["spec"]["selector"], &r.pod_labels))
                    .expect("service");
                assert!(
                    selects(
                        &sm["spec"]["selector"],
                        &string_map(at(svc, "metadata.labels"))
                    ),
                    "{}",
                    ctx("ServiceMonitor selects the Services")
                );
                assert!(
                    svc["spec"]["ports"]
                        .as_sequence()
                        .into_iter()
                        .flatten()
                        .any(|p| text(&p["name"]) == port),
                    "{}",
                    ctx("ServiceMonitor port")
                );
            }
        }
    }
}

/// The ha overlay: tidemark against the Redis with Sentinel and the
/// three-node RabbitMQ cluster it deploys, by the names their Services and
/// the operator give them.
#[test]
fn k8s_ha_overlay_wires_tidemark_to_sentinel_and_a_rabbitmq_cluster() {
    if k8s_skipped() {
        return;
    }
    let docs = &rendered()["ha"];
    let ns = text(at(
        named(docs, "Deployment", "tidemark-worker").expect("worker"),
        "metadata.namespace",
    ));
    let statefulset = |name: &str| {
        let sts = named(docs, "StatefulSet", name).unwrap_or_else(|| panic!("StatefulSet {name}"));
        assert_eq!(
            at(sts, "spec.replicas").as_u64(),
            Some(3),
            "{name} replicas"
        );
        // Its per-pod names come from a headless Service that selects it.
        let svc_name = text(at(sts, "spec.serviceName"));
        let svc = named(docs, "Service", &svc_name).unwrap_or_else(|| panic!("Service {svc_name}"));
        assert_eq!(
            text(at(svc, "spec.clusterIP")),
            "None",
            "{svc_name} is headless"
        );
        let labels = string_map(at(sts, "spec.template.metadata.labels"));
        assert!(
            selects(&svc["spec"]["selector"], &labels),
            "{svc_name} selects {name}"
        );
        let pdbs = of_kind(docs, "PodDisruptionBudget")
            .into_iter()
            .filter(|p| selects(&p["spec"]["selector"], &labels))
            .count();
        assert_eq!(pdbs, 1, "one PodDisruptionBudget for {name}");
        let cm = at(sts, "spec.template.spec.volumes")
            .as_sequence()
            .into_iter()
            .flatten()
            .find_map(|v| v.get("configMap"))
            .map(|c| text(&c["name"]))
            .unwrap_or_else(|| panic!("{name} mounts its config"));
        let data = named(docs, "ConfigMap", &cm).expect("the Redis ConfigMap")["data"].clone();
        (sts, svc_name, data)
    };

    // Redis: three data nodes with the append-only file, three sentinels
    // that start from redis-0 as master, with a quorum of 2.
    let (redis, redis_svc, data) = statefulset("redis");
    let conf = |file: &str| -> Vec<Vec<String>> {
        text(&data[file])
            .lines()
            .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .filter(|w| !w.is_empty() && !w[0].starts_with('#'))
            .collect()
    };
    assert!(conf("redis.conf").contains(&vec!["appendonly".into(), "yes".into()]));
    let monitor = conf("sentinel.conf")
        .into_iter()
        .find(|w| w.len() == 6 && w[..2] == ["sentinel", "monitor"])
        .expect("sentinel monitor");
    assert_eq!(
        monitor[3..],
        [
            format!("redis-0.{redis_svc}.{ns}.svc"),
            "6379".into(),
            "2".into()
        ],
        "{monitor:?}"
    );
    let redis_port = at(
        redis,
        "spec.template.spec.containers.0.ports.0.containerPort",
    )
    .as_u64()
    .expect("Redis port");
    let (sentinel, sentinel_svc, _) = statefulset("redis-sentinel");
    assert_eq!(
        strings(at(sentinel, "spec.template.spec.containers.0.args")),
        ["redis-server", "/etc/redis/sentinel.conf", "--sentinel"]
    );

    // RabbitMQ: the operator's three-node cluster, pause_minority.
    let rabbit = named(docs, "RabbitmqCluster", "rabbit").expect("RabbitmqCluster rabbit");
    assert_eq!(at(rabbit, "spec.replicas").as_u64(), Some(3));
    assert!(
        !at(rabbit, "spec.persistence.storage").is_null(),
        "persistence"
    );
    assert!(
        text(at(rabbit, "spec.rabbitmq.additionalConfig"))
            .lines()
            .any(|l| l.trim() == "cluster_partition_handling = pause_minority"),
        "pause_minority"
    );
    // The operator labels its pods app.kubernetes.io/name: <cluster>.
    let rabbit_pods =
        BTreeMap::from([("app.kubernetes.io/name".to_string(), "rabbit".to_string())]);
    assert!(
        of_kind(docs, "PodDisruptionBudget")
            .iter()
            .any(|p| selects(&p["spec"]["selector"], &rabbit_pods)),
        "a PodDisruptionBudget for the RabbitMQ pods"
    );

    for role in ["coordinator", "worker"] {
        let r = Role::find(docs, role);
        // Sentinel's URL lists the three sentinels and the master's name.
        let redis_url = tidemark_state::SentinelUrl::parse(&r.env["REDIS_URL"])
            .unwrap_or_else(|e| panic!("{role}: REDIS_URL: {e}"));
        let sentinels: Vec<(String, u16)> = (0..3)
            .map(|i| (format!("redis-sentinel-{i}.{sentinel_svc}.{ns}.svc"), 26379))
            .collect();
        assert_eq!(redis_url.sentinels, sentinels, "{role}");
        assert_eq!(
            redis_url.master_name, monitor[2],
            "{role}: the monitored name"
        );
        assert!(
            redis_url.sentinel_password.is_some(),
            "{role}: the sentinels' password"
        );
        // AMQP_URL lists the three RabbitMQ pods by the operator's names.
        let nodes: Vec<String> = tidemark_bus::endpoints::AmqpUrl::new(r.env["AMQP_URL"].as_str())
            .endpoints()
            .unwrap_or_else(|e| panic!("{role}: AMQP_URL: {e}"))
            .iter()
            .map(|e| {
                let u = reqwest::Url::parse(e.url()).expect("URL");
                format!(
                    "{}:{}",
                    u.host_str().unwrap_or_default(),
                    u.port_or_known_default().unwrap_or(0)
                )
            })
            .collect();
        let expected: Vec<String> = (0..3)
            .map(|i| format!("rabbit-server-{i}.rabbit-nodes.{ns}.svc:5672"))
            .collect();
        assert_eq!(nodes, expected, "{role}");
        // The settings, from the ConfigMap in its environment: WAIT for one
        // of the two replicas, a quorum queue replica on each node.
        let mut settings = r.env.clone();
        for from in r.container["envFrom"].as_sequence().into_iter().flatten() {
            if let Some(cm) = from.get("configMapRef") {
                let cm = named(docs, "ConfigMap", &text(&cm["name"])).expect("envFrom ConfigMap");
                settings.extend(string_map(&cm["data"]));
            }
        }
        assert_eq!(
            settings
                .get("TIDEMARK_REDIS_WAIT_REPLICAS")
                .map(String::as_str),
            Some("1"),
            "{role}"
        );
        assert_eq!(
            settings
                .get("TIDEMARK_QUORUM_INITIAL_GROUP_SIZE")
                .map(String::as_str),
            Some("3"),
            "{role}"
        );
        // The pods reach the data nodes too (the sentinels give their names).
        let np = named(docs, "NetworkPolicy", "tidemark").expect("NetworkPolicy");
        assert!(
            np["spec"]["egress"]
                .as_sequence()
                .into_iter()
                .flatten()
                .flat_map(|rule| rule["ports"].as_sequence().into_iter().flatten())
                .any(|p| p["port"].as_u64() == Some(redis_port)),
            "egress to the Redis data nodes on {redis_port}"
        );
    }
}

// ----------------------------------------------------------------------
// deploy/Dockerfile

/// The libraries of gcr.io/distroless/cc-debian12: glibc (with its split-out
/// libm, libpthread, libdl, librt), libgcc_s, and the loader.
const DISTROLESS_CC_LIBS: &[&str] = &[
    "linux-vdso.so.1",
    "libc.so.6",
    "libm.so.6",
    "libpthread.so.0",
    "libdl.so.2",
    "librt.so.1",
    "libgcc_s.so.1",
    "ld-linux-x86-64.so.2",
];

#[test]
fn dockerfile_builds_the_binary_into_a_distroless_non_root_image() {
    let dockerfile =
        std::fs::read_to_string(repo().join("deploy/Dockerfile")).expect("deploy/Dockerfile");
    let instructions: Vec<(String, String)> = dockerfile
        .replace("\\\n", " ")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (op, rest) = l.split_once(' ').unwrap_or((l, ""));
            (op.to_uppercase(), rest.trim().to_string())
        })
        .collect();
    let stages: Vec<usize> = instructions
        .iter()
        .enumerate()
        .filter(|(_, (op, _))| op == "FROM")
        .map(|(i, _)| i)
        .collect();
    assert!(stages.len() >= 2, "a multi-stage build");
    let last = &instructions[*stages.last().expect("stages")..];
    let from = &last[0].1;
    assert!(
        from.starts_with("gcr.io/distroless/cc-debian12"),
        "final stage: {from}"
    );
    // The build stage's glibc is the final image's (Debian 12, bookworm).
    assert!(
        instructions[stages[0]].1.contains("-bookworm"),
        "{}",
        instructions[stages[0]].1
    );

    // The build compiles the `tidemark` binary of the package that has it.
    let build = instructions
        .iter()
        .find(|(op, a)| op == "RUN" && a.contains("cargo build"))
        .expect("a cargo build");
    let cli =
        std::fs::read_to_string(repo().join("crates/cli/Cargo.toml")).expect("cli Cargo.toml");
    let package = cli
        .lines()
        .find_map(|l| l.strip_prefix("name = "))
        .expect("package name")
        .trim_matches('"');
    assert!(
        build.1.contains(&format!("--package {package} ")),
        "{}",
        build.1
    );
    assert!(
        build.1.contains("--bin tidemark")
            && build.1.contains("--release")
            && build.1.contains("--locked"),
        "{}",
        build.1
    );

    // Non-root, and the entrypoint is the binary the COPY put there, in exec form.
    let user = last
        .iter()
        .rev()
        .find(|(op, _)| op == "USER")
        .expect("USER")
        .1
        .clone();
    let uid: u32 = user
        .split(':')
        .next()
        .unwrap_or_default()
        .parse()
        .expect("numeric USER");
    assert_ne!(uid, 0, "the image runs as non-root");
    let entry = &last
        .iter()
        .find(|(op, _)| op == "ENTRYPOINT")
        .expect("ENTRYPOINT")
        .1;
    let entry: Vec<String> =
        serde_json::from_str(entry).expect("ENTRYPOINT in exec form (no shell)");
    let copied = last
        .iter()
        .filter(|(op, _)| op == "COPY")
        .any(|(_, a)| a.split_whitespace().last() == Some(entry[0].as_str()));
    assert!(
        copied,
        "ENTRYPOINT {entry:?} is a file the final stage copies in"
    );

    // The image's port numbers are the ones the manifests use.
    let expose = &last
        .iter()
        .find(|(op, _)| op == "EXPOSE")
        .expect("EXPOSE")
        .1;
    assert!(
        expose.contains("9464") && expose.contains("9465"),
        "{expose}"
    );
}

#[test]
fn the_binary_needs_only_libraries_the_distroless_image_has() {
    let out = Command::new("ldd")
        .arg(tidemark_bin())
        .output()
        .expect("ldd");
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "ldd: {listing}");
    let libs: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(|l| l.rsplit('/').next().unwrap_or(l))
        .collect();
    assert!(libs.contains(&"libc.so.6"), "{listing}");
    for lib in libs {
        assert!(
            DISTROLESS_CC_LIBS.contains(&lib),
            "the binary links {lib}, which gcr.io/distroless/cc-debian12 does not have:\n{listing}"
        );
    }
}
