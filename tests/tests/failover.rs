//! Lose a server, lose nothing: the distributed sync rides through the loss
//! of the Redis master (Sentinel promotes the replica) and of the RabbitMQ
//! node the workers are connected to (a three-node cluster with quorum
//! queues).
//!
//! The test starts everything of its own on loopback, never the shared
//! services: a Redis master, one replica and three sentinels
//! (`tidemark_harness::sentinel`), a three-node RabbitMQ cluster
//! (`tidemark_harness::rabbit_cluster`), the mock API, a coordinator and
//! three workers, all with `REDIS_URL` = the `redis+sentinel://` URL and
//! `AMQP_URL` = the list of the three nodes. Four feeds of two partitions
//! each sync (a backfill of a few thousand records per routing key, with
//! the API slowed down and changing all the time), and during the sync, per
//! round:
//!
//! 1. the Redis master is SIGKILLed; the sentinels promote the replica.
//!    In a lossy round (every round of the CI form, the second of the
//!    soak's; `TIDEMARK_FAILOVER_LAG=0|1` for none|all) the replica is
//!    first frozen and cut off from the master for 500 ms, as asynchronous
//!    replication allows, so the failover loses the commits of that time.
//!    Measured: from the kill until the first commit applied on the new
//!    master (the workers' `commit` log lines after their "Redis master
//!    moved" line), and until the stored checkpoints (their sum, and every
//!    job's) move past where they were at the kill;
//! 2. the RabbitMQ node most of the workers are connected to (as their
//!    sockets in /proc show) is SIGKILLed. Measured: from the kill until
//!    every worker that was on it has reconnected to another node and
//!    committed a page published there; and the new records a second
//!    downstream before and after the kill;
//! 3. the killed Redis and the RabbitMQ node are restarted, at once. The
//!    old master comes back as the master it was, with its old data, until
//!    the sentinels make it a replica of the new one: it must run no
//!    command of tidemark's meanwhile (its `INFO commandstats`).
//!
//! The downstream subscriber is a durable quorum queue bound to the records
//! exchange, consumed by a checker that reconnects through the node list (a
//! subscriber's private queue would die with its node). Afterwards:
//!
//! - every current record version of the mock's truth arrived under every
//!   routing key (0 lost), and nothing the source never had. Duplicates
//!   (the same message id again) are counted, each with its cause: the
//!   broker redelivered it to the subscriber; its page was published again
//!   after a fault error (a worker's log line names the page); its page
//!   task ran twice (a task publish nacked or cut off, yet enqueued: the
//!   second run's commit is ALREADY_APPLIED or CONFLICT); the github feed's
//!   last page read again at each poll (by design, docs/GUARANTEES.md);
//!   other (none so far);
//! - the coordinator and the workers never exited: the same PIDs, running;
//! - no commit was applied under a stale epoch (the reliability suite's
//!   audit of the workers' `commit` lines, ordered by time as well as by
//!   page), and every new epoch a job got was above every epoch it had
//!   before (never reused, even across the failover);
//! - no cursor went back past what was delivered: the reliability suite's
//!   monitor of every checkpoint; a `seq` or high-water mark that goes back
//!   is allowed only while a Redis failover is under way (Redis replicates
//!   asynchronously: the failover may lose the last commits), and then only
//!   over pages whose records had all arrived downstream before.
//!
//! It prints one summary line (`failover: records ..., duplicates ..., lost
//! 0, redis failover ..., rabbitmq failover ..., total ...`) and a report
//! (also written to `target/tmp/failover.md`, and to
//! `TIDEMARK_FAILOVER_OUT` when set).
//!
//! The CI form runs one round in about 45 s on two cores, cluster boot
//! included; `TIDEMARK_SOAK=1` runs three rounds over ten times the
//! records (each fault in the middle of the first walk). The roles' logs
//! are kept in `target/tmp/failover-logs/`.
//! Without root, the `rabbitmq-server` package or `redis-server` it skips,
//! saying why.
//!
//! ```sh
//! cargo build --workspace   # the tidemark binary, with the worker's failpoints
//! cargo test --workspace --test failover -- --nocapture
//! TIDEMARK_SOAK=1 cargo test -p tidemark-tests --test failover -- --nocapture
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use lapin::options::BasicAckOptions;
use lapin::types::AMQPValue;
use tidemark_bus::amqp::SubscribeOptions;
use tidemark_core::checkpoint::Phase;
use tidemark_harness::rabbit_cluster::{RabbitCluster, skip_reason};
use tidemark_harness::sentinel::{SentinelSet, SentinelSetup};
use tidemark_mock::TruthRecord;
use tidemark_tests::monitor::Monitor;
use tidemark_tests::{Cluster, eventually};
use tokio::task::block_in_place;

/// Retries of the source: enough to outlast every fault.
const RETRY: &str = "{ max_attempts: 30, base_delay: 200ms, max_delay: 2s }";

const FEEDS: [&str; 4] = ["tickets", "items", "sync", "github"];
const PARTITIONS: [&str; 2] = ["a", "b"];

/// Every routing key: feed.partition.
fn keys() -> Vec<String> {
    FEEDS
        .iter()
        .flat_map(|f| PARTITIONS.iter().map(move |p| format!("{f}.{p}")))
        .collect()
}

/// Four change-ordered, versioned feeds of four API styles, two partitions
/// each, polled every second.
fn feeds(page: usize) -> String {
    let parts = r#"partitions: { param: account, values: ["a", "b"] }"#;
    format!(
        r#"  - name: tickets
    source: mock
    path: /api/v2/incremental/tickets/cursor.json
    records: /tickets
    pagination: {{ preset: zendesk_cursor, page_size: {page} }}
    key: /id
    version: /updated_at
    start: {{ param: start_time, format: unix, from: "2024-01-01T00:00:00Z" }}
    every: 1s
    {parts}
  - name: items
    source: mock
    path: /items
    pagination: {{ preset: cursor, page_size: {page} }}
    key: /id
    version: /updated_at
    start: {{ param: updated_since, format: iso8601 }}
    every: 1s
    {parts}
  - name: sync
    source: mock
    path: /sync/records
    records: /records
    pagination: {{ preset: cursor, cursor_param: cursor, next_cursor: /cursor, page_size: {page} }}
    key: /id
    version: /updated_at
    start: {{ param: updated_since, format: iso8601 }}
    every: 1s
    {parts}
  - name: github
    source: mock
    path: /github/records
    pagination: {{ preset: link_header, page_size: {page} }}
    key: /id
    version: /updated_at
    start: {{ param: since_ms, format: unix_ms, from: "2024-01-01" }}
    every: 1s
    {parts}
"#
    )
}

/// Microseconds since the epoch, now.
fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A log line's RFC 3339 UTC timestamp (`2025-01-31T12:34:56.123456Z`) in
/// microseconds since the epoch.
fn parse_ts_us(s: &str) -> Option<i64> {
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|v| v.parse::<i64>());
    let (y, mo, da) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let time = time.trim_end_matches('Z');
    let time = time.split('+').next()?;
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.split(':').map(|v| v.parse::<i64>());
    let (h, mi, se) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    let mut micros = 0i64;
    for (i, c) in frac.chars().take(6).enumerate() {
        micros += i64::from(c.to_digit(10)?) * 10i64.pow(5 - i as u32);
    }
    let secs = days_from_civil(y, mo, da) * 86_400 + h * 3600 + mi * 60 + se;
    Some(secs * 1_000_000 + micros)
}

fn secs(us: i64) -> f64 {
    us as f64 / 1e6
}

// ---------------------------------------------------------------------
// The downstream subscriber.

/// One message id as it arrived.
struct Seen {
    first_at: Instant,
    page_seq: Option<u64>,
    /// Every arrival, the first included, and whether the broker flagged
    /// it as redelivered (to this subscriber).
    arrivals: Vec<(Instant, bool)>,
}

#[derive(Default)]
struct Flow {
    /// (routing key, message id) -> how it arrived.
    messages: HashMap<(String, String), Seen>,
    /// Distinct record versions per routing key.
    versions: HashMap<String, HashSet<TruthRecord>>,
    /// When each message id arrived for the first time, in order.
    firsts: Vec<Instant>,
    deliveries: u64,
    /// Deliveries the broker flagged as redelivered (to this subscriber).
    redelivered: u64,
    /// The checker's own reconnections, with why.
    reconnects: Vec<(Instant, String)>,
}

/// A downstream subscriber on a durable quorum queue bound to the records
/// exchange with `#`, reconnecting through the node list when its node
/// goes: what a subscriber of a cluster does, and what cannot lose a
/// record with the node it was connected to.
struct FlowChecker {
    flow: Arc<Mutex<Flow>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl FlowChecker {
    /// Declared and bound before this returns, so nothing published after
    /// it is unroutable.
    async fn start(url: &str, exchange: &str, queue: &str) -> FlowChecker {
        let first = subscribe(url, exchange, queue)
            .await
            .unwrap_or_else(|e| panic!("subscribe to {exchange}: {e}"));
        let flow = Arc::new(Mutex::new(Flow::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (f, st) = (flow.clone(), stop.clone());
        let (url, exchange, queue) = (url.to_string(), exchange.to_string(), queue.to_string());
        let task = tokio::spawn(async move {
            let mut current = Some(first);
            while !st.load(Ordering::SeqCst) {
                let (conn, mut consumer) = match current.take() {
                    Some(c) => c,
                    None => match subscribe(&url, &exchange, &queue).await {
                        Ok(c) => c,
                        Err(e) => {
                            f.lock()
                                .unwrap()
                                .reconnects
                                .push((Instant::now(), format!("cannot subscribe: {e}")));
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            continue;
                        }
                    },
                };
                let why = loop {
                    if st.load(Ordering::SeqCst) {
                        break "stopped".to_string();
                    }
                    let next =
                        tokio::time::timeout(Duration::from_millis(500), consumer.next()).await;
                    match next {
                        Err(_) => {
                            if !conn.status().connected() {
                                break "connection closed".into();
                            }
                        }
                        Ok(None) => break "consumer ended".into(),
                        Ok(Some(Err(e))) => break format!("consumer error: {e}"),
                        Ok(Some(Ok(d))) => {
                            record(&f, &d);
                            let _ = d.ack(BasicAckOptions::default()).await;
                        }
                    }
                };
                if why != "stopped" {
                    f.lock().unwrap().reconnects.push((Instant::now(), why));
                }
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    conn.close(200, "checker reconnects".into()),
                )
                .await;
            }
        });
        FlowChecker { flow, stop, task }
    }

    fn distinct_messages(&self) -> usize {
        self.flow.lock().unwrap().messages.len()
    }

    /// Current versions of `want` missing under each routing key (keys
    /// with none missing left out).
    fn missing(&self, want: &[TruthRecord]) -> BTreeMap<String, usize> {
        let flow = self.flow.lock().unwrap();
        keys()
            .into_iter()
            .map(|k| {
                let got = flow.versions.get(&k);
                let n = want
                    .iter()
                    .filter(|v| !got.is_some_and(|g| g.contains(*v)))
                    .count();
                (k, n)
            })
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    async fn finish(self) -> Flow {
        self.stop.store(true, Ordering::SeqCst);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
        Arc::try_unwrap(self.flow)
            .ok()
            .map(|m| m.into_inner().unwrap())
            .expect("the checker's task is done")
    }
}

async fn subscribe(
    url: &str,
    exchange: &str,
    queue: &str,
) -> Result<(lapin::Connection, lapin::Consumer), tidemark_bus::BusError> {
    let (conn, consumer, _) = tidemark_bus::amqp::subscribe_with(
        url,
        exchange,
        "#",
        "failover-checker",
        SubscribeOptions {
            queue: Some(queue),
            ..Default::default()
        },
    )
    .await?;
    Ok((conn, consumer))
}

fn record(flow: &Mutex<Flow>, d: &lapin::message::Delivery) {
    let rk = d.routing_key.to_string();
    let mid = d
        .properties
        .message_id()
        .as_ref()
        .map(|s| s.to_string())
        .unwrap_or_default();
    let page_seq = d
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-page-seq").cloned())
        .and_then(|v| match v {
            AMQPValue::LongLongInt(n) => u64::try_from(n).ok(),
            AMQPValue::LongInt(n) => u64::try_from(n).ok(),
            AMQPValue::LongUInt(n) => Some(u64::from(n)),
            _ => None,
        });
    let v: serde_json::Value = serde_json::from_slice(&d.data).expect("json body");
    let recs: Vec<serde_json::Value> = match v.get("records") {
        Some(serde_json::Value::Array(rs)) => rs.clone(),
        _ => vec![v],
    };
    let now = Instant::now();
    let mut f = flow.lock().unwrap();
    f.deliveries += 1;
    if d.redelivered {
        f.redelivered += 1;
    }
    let seen = f.messages.entry((rk.clone(), mid)).or_insert(Seen {
        first_at: now,
        page_seq,
        arrivals: Vec::new(),
    });
    seen.arrivals.push((now, d.redelivered));
    if seen.arrivals.len() == 1 {
        f.firsts.push(now);
    }
    let versions = f.versions.entry(rk).or_default();
    for r in recs {
        versions.insert(TruthRecord {
            id: r["id"].as_str().unwrap_or_default().to_string(),
            updated_at: r["updated_at"].as_str().unwrap_or_default().to_string(),
        });
    }
}

// ---------------------------------------------------------------------
// The roles' logs (JSON lines).

#[derive(Debug, Clone)]
enum Kind {
    Commit {
        job: String,
        epoch: u64,
        seq: u64,
        outcome: String,
    },
    /// A task of an old epoch dropped before any work (stale_epoch, fenced).
    StaleDropped,
    BrokerConnected(String),
    BrokerLost(String),
    /// "Redis master moved (failover)": connected to the new master.
    RedisMoved(String),
    RedisLost,
    /// Any other WARN or ERROR line: its message and error, and the page
    /// (job, seq) it is about, if any.
    Warn(String, Option<(String, u64)>),
}

impl Kind {
    /// One line for the report.
    fn describe(&self) -> String {
        match self {
            Kind::Commit {
                job,
                epoch,
                seq,
                outcome,
            } => format!("commit {job} epoch {epoch} seq {seq}: {outcome}"),
            Kind::StaleDropped => "stale task dropped".into(),
            Kind::BrokerConnected(to) => format!("connected to the broker {to}"),
            Kind::BrokerLost(why) => format!("lost the broker: {why}"),
            Kind::RedisMoved(to) => format!("Redis master moved to {to}"),
            Kind::RedisLost => "lost the Redis master".into(),
            Kind::Warn(m, _) => format!("warning: {m}"),
        }
    }
}

#[derive(Debug, Clone)]
struct Event {
    ts: i64,
    proc: String,
    kind: Kind,
}

/// Reads the roles' logs as they grow.
struct Logs {
    files: Vec<(String, PathBuf, usize)>,
    events: Vec<Event>,
    unparsed_ts: u64,
}

impl Logs {
    fn new(c: &Cluster) -> Logs {
        Logs {
            files: c
                .procs
                .iter()
                .map(|p| (p.name.clone(), p.log.clone(), 0))
                .collect(),
            events: Vec::new(),
            unparsed_ts: 0,
        }
    }

    fn poll(&mut self) {
        for (name, path, offset) in &mut self.files {
            let mut bytes = Vec::new();
            let read = std::fs::File::open(&*path).and_then(|mut f| {
                f.seek(SeekFrom::Start(*offset as u64))?;
                f.read_to_end(&mut bytes)
            });
            if read.is_err() {
                continue;
            }
            // Whole lines only: the rest waits for the next poll.
            let Some(end) = bytes.iter().rposition(|b| *b == b'\n') else {
                continue;
            };
            let text = String::from_utf8_lossy(&bytes[..end + 1]).into_owned();
            *offset += end + 1;
            for line in text.lines().filter(|l| l.starts_with('{')) {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue;
                };
                let Some(ts) = v["timestamp"].as_str().and_then(parse_ts_us) else {
                    self.unparsed_ts += 1;
                    continue;
                };
                let f = &v["fields"];
                let msg = f["message"].as_str().unwrap_or_default();
                let level = v["level"].as_str().unwrap_or_default();
                let text = |k: &str| f[k].as_str().unwrap_or_default().to_string();
                let kind = match msg {
                    "commit" => Kind::Commit {
                        job: text("job"),
                        epoch: f["epoch"].as_u64().unwrap_or(0),
                        seq: f["seq"].as_u64().unwrap_or(0),
                        outcome: text("outcome"),
                    },
                    "task dropped"
                        if matches!(f["reason"].as_str(), Some("stale_epoch" | "fenced")) =>
                    {
                        Kind::StaleDropped
                    }
                    "connected to the broker" => Kind::BrokerConnected(text("endpoint")),
                    m if m.starts_with("broker connection lost")
                        || m.starts_with("task consumer ended")
                        || m.starts_with("publishing channel closed") =>
                    {
                        Kind::BrokerLost(format!("{m} ({})", text("reason")))
                    }
                    m if m.starts_with("Redis master moved") => Kind::RedisMoved(text("to")),
                    m if m.starts_with("lost the Redis master") => Kind::RedisLost,
                    m if level == "WARN" || level == "ERROR" => {
                        let e = text("error");
                        let page = f["seq"].as_u64().map(|seq| (text("job"), seq));
                        let m = if e.is_empty() {
                            m.to_string()
                        } else {
                            format!("{m}: {e}")
                        };
                        Kind::Warn(m, page)
                    }
                    _ => continue,
                };
                self.events.push(Event {
                    ts,
                    proc: name.clone(),
                    kind,
                });
            }
        }
    }

    /// `proc`'s first applied commit at or after `after`.
    fn commit_of_after(&self, proc: &str, after: i64) -> Option<i64> {
        self.events
            .iter()
            .filter(|e| {
                e.proc == proc
                    && e.ts >= after
                    && matches!(&e.kind, Kind::Commit { outcome, .. } if outcome == "OK")
            })
            .map(|e| e.ts)
            .min()
    }

    /// `proc`'s first event matching `is` at or after `after`.
    fn first_of_after(&self, proc: &str, after: i64, is: impl Fn(&Kind) -> bool) -> Option<i64> {
        self.events
            .iter()
            .filter(|e| e.proc == proc && e.ts >= after && is(&e.kind))
            .map(|e| e.ts)
            .min()
    }
}

/// What the workers' `commit` lines show (the reliability suite's audit,
/// by page and by time, knowing when Redis failed over).
#[derive(Default, Debug)]
struct CommitAudit {
    applied: u64,
    already_applied: u64,
    fenced: u64,
    conflict: u64,
    stale_dropped: u64,
    /// A page applied again after a Redis failover lost its first commit.
    redone_after_failover: Vec<String>,
    /// Those pages: (routing key, seq).
    redone_pages: HashSet<(String, u64)>,
    /// A page committed twice with no failover between, or a commit applied
    /// under an epoch older than one applied before: must stay empty.
    stale_applied: Vec<String>,
}

fn audit(events: &[Event], redis_kills: &[i64]) -> CommitAudit {
    let mut a = CommitAudit::default();
    // job -> applied commits (ts, epoch, seq, proc) in time order
    let mut applied: HashMap<String, Vec<(i64, u64, u64, String)>> = HashMap::new();
    for e in events {
        match &e.kind {
            Kind::StaleDropped => a.stale_dropped += 1,
            Kind::Commit {
                job,
                epoch,
                seq,
                outcome,
            } => match outcome.as_str() {
                "OK" => {
                    a.applied += 1;
                    applied.entry(job.clone()).or_default().push((
                        e.ts,
                        *epoch,
                        *seq,
                        e.proc.clone(),
                    ));
                }
                "ALREADY_APPLIED" => a.already_applied += 1,
                "FENCED" => a.fenced += 1,
                _ => a.conflict += 1,
            },
            _ => {}
        }
    }
    // A commit logged before a kill's time plus the sentinels' down-after
    // was applied on the old master (the new one takes no write before the
    // sentinels agree the old one is down), one logged after it on the new:
    // a failover lies between them. (A commit applied an instant before the
    // kill is logged an instant after it.)
    let promoted_no_sooner = SentinelSetup::default().down_after.as_micros() as i64;
    let failover_between = |t0: i64, t1: i64| {
        redis_kills
            .iter()
            .any(|k| t0 < k + promoted_no_sooner && t1 >= k + promoted_no_sooner)
    };
    for (job, commits) in &mut applied {
        commits.sort();
        // By time: never an epoch older than one applied before.
        let mut max: Option<(i64, u64)> = None;
        // By page: the last application of each page.
        let mut pages: BTreeMap<u64, (i64, u64)> = BTreeMap::new();
        for (ts, epoch, seq, proc) in commits.iter() {
            if let Some((max_ts, max_epoch)) = max
                && *epoch < max_epoch
            {
                let why = if failover_between(max_ts, *ts) {
                    " (a Redis failover between)"
                } else {
                    ""
                };
                a.stale_applied.push(format!(
                    "{job}: page {seq} applied by {proc} under epoch {epoch} after epoch {max_epoch} was{why}"
                ));
            }
            if max.is_none_or(|(_, e)| *epoch >= e) {
                max = Some((*ts, *epoch));
            }
            if let Some((prev_ts, prev_epoch)) = pages.insert(*seq, (*ts, *epoch)) {
                let what =
                    format!("{job}: page {seq} applied twice (epochs {prev_epoch} and {epoch})");
                if failover_between(prev_ts, *ts) {
                    a.redone_after_failover.push(what);
                    a.redone_pages.insert((job.replacen('/', ".", 1), *seq));
                } else {
                    a.stale_applied.push(what);
                }
            }
        }
        let mut max_epoch = 0;
        for (seq, (_, epoch)) in &pages {
            if *epoch < max_epoch {
                a.stale_applied.push(format!(
                    "{job}: page {seq} applied under epoch {epoch} after epoch {max_epoch} (by page)"
                ));
            }
            max_epoch = max_epoch.max(*epoch);
        }
    }
    a
}

// ---------------------------------------------------------------------
// Which broker node a process is connected to.

/// The indices (in `ports`' order) of the AMQP ports `pid` has established
/// TCP connections to: its sockets (/proc/PID/fd) matched with the
/// machine's connections (/proc/net/tcp*).
fn amqp_nodes_of(pid: u32, ports: &[u16]) -> Vec<usize> {
    let mut inodes = HashSet::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in dir.flatten() {
            if let Ok(target) = std::fs::read_link(e.path()) {
                let t = target.to_string_lossy();
                if let Some(n) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                    inodes.insert(n.to_string());
                }
            }
        }
    }
    let mut nodes = Vec::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st ... inode (the 10th)
            if f.len() < 10 || f[3] != "01" || !inodes.contains(f[9]) {
                continue;
            }
            let Some(port) = f[2]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok())
            else {
                continue;
            };
            if let Some(i) = ports.iter().position(|p| *p == port) {
                nodes.push(i);
            }
        }
    }
    nodes
}

// ---------------------------------------------------------------------
// Redis: one query to a node of the set.

async fn ask<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> redis::RedisResult<T> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let mut c = tokio::time::timeout(
        Duration::from_secs(2),
        client.get_multiplexed_async_connection(),
    )
    .await
    .map_err(|_| redis::RedisError::from((redis::ErrorKind::IoError, "connect timed out")))??;
    tokio::time::timeout(Duration::from_secs(2), cmd.query_async(&mut c))
        .await
        .map_err(|_| redis::RedisError::from((redis::ErrorKind::IoError, "timed out")))?
}

/// The node on `port` is a replica in sync with its master and, with
/// `promotable`, every sentinel sees it as a healthy replica (so that the
/// next failover can promote it).
async fn replica_ready(set: &SentinelSet, port: u16, promotable: bool) -> bool {
    let Ok(info) = ask::<String>(port, redis::cmd("INFO").arg("replication")).await else {
        return false;
    };
    if !info.contains("role:slave") || !info.contains("master_link_status:up") {
        return false;
    }
    if !promotable {
        return true;
    }
    for s in set.sentinel_ports() {
        let replicas: Vec<HashMap<String, String>> = ask(
            s,
            redis::cmd("SENTINEL")
                .arg("replicas")
                .arg(set.master_name()),
        )
        .await
        .unwrap_or_default();
        let healthy = replicas.iter().any(|r| {
            r.get("port").map(String::as_str) == Some(port.to_string().as_str())
                && r.get("flags").is_some_and(|f| {
                    f.contains("slave") && !f.contains("down") && !f.contains("disconnected")
                })
                && r.get("master-link-status").map(String::as_str) == Some("ok")
        });
        if !healthy {
            return false;
        }
    }
    true
}

// ---------------------------------------------------------------------
// The rounds.

struct RedisRound {
    old: u16,
    new: u16,
    /// How long the replica was cut off before the kill (the failover lost that).
    lag: Option<Duration>,
    cut_at: Option<Instant>,
    kill_us: i64,
    kill_at: Instant,
    /// When a majority of the sentinels named the replica (as polled).
    promoted: Duration,
    /// Kill -> the checkpoints moved past where they were at the kill.
    store_moved: Option<Duration>,
    /// Its restart -> an in-sync replica of the new master, every sentinel agreeing.
    rejoined_as_replica: Option<Duration>,
    /// Its restart -> the sentinels demoted it: it answered as a master
    /// (with the data of before the kill) that long.
    stale_master_for: Option<Duration>,
    /// Commands other than the sentinels' (and this test's INFO) the
    /// stale master ran meanwhile, by name: must stay empty.
    stale_master_commands: BTreeMap<String, u64>,
}

struct RabbitRound {
    victim: usize,
    /// Process -> nodes it was connected to before the kill.
    placement: Vec<(String, Vec<usize>)>,
    kill_us: i64,
    kill_at: Instant,
    /// The workers connected to the victim.
    affected: Vec<String>,
    /// (queue, node of its leader) before the kill.
    leaders: Vec<(String, Option<usize>)>,
    restart_took: Option<Duration>,
}

struct Rig {
    c: Cluster,
    set: SentinelSet,
    rabbit: RabbitCluster,
    checker: FlowChecker,
    monitor: Monitor,
    logs: Logs,
    /// (name, index in c.procs, pid at start)
    roles: Vec<(String, usize, u32)>,
}

impl Rig {
    fn amqp_ports(&self) -> Vec<u16> {
        (0..self.rabbit.len())
            .map(|i| self.rabbit.amqp_port(i))
            .collect()
    }

    fn workers(&self) -> Vec<String> {
        self.roles
            .iter()
            .filter(|(n, _, _)| n.starts_with('w'))
            .map(|(n, _, _)| n.clone())
            .collect()
    }

    fn log_tails(&self) -> String {
        self.c.logs()
    }

    /// SIGKILL the Redis master; wait for the promotion and for the first
    /// commit applied on the new master.
    ///
    /// With `lag`, the replica falls behind first, as asynchronous
    /// replication allows: it is frozen (SIGSTOP) and cut off from the
    /// master (`CLIENT KILL TYPE replica`), the sync goes on for `lag` on
    /// the master alone, then the master is killed and the replica thawed:
    /// the failover loses what the master applied in that time.
    async fn redis_failover(
        &mut self,
        round: usize,
        within: Duration,
        lag: Option<Duration>,
    ) -> RedisRound {
        let old = self.set.master_port().expect("a sentinel names the master");
        let replica = self
            .set
            .node_ports()
            .into_iter()
            .find(|p| *p != old)
            .expect("a replica");
        let mut cut_at = None;
        if let Some(lag) = lag {
            self.set.node(replica).expect("the replica").freeze();
            let cut: redis::RedisResult<redis::Value> = ask(
                old,
                redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("replica"),
            )
            .await;
            cut.unwrap_or_else(|e| panic!("cannot cut the replica off: {e}"));
            cut_at = Some(Instant::now());
            tokio::time::sleep(lag).await;
        }
        let before_total = self.monitor.last_total().unwrap_or(0);
        let (kill_at, kill_us) = (Instant::now(), now_us());
        self.set
            .node_mut(old)
            .expect("the master is one of the set's nodes")
            .kill9();
        if lag.is_some() {
            self.set.node(replica).expect("the replica").thaw();
        }
        eprintln!(
            "failover: round {round}: Redis master {old} SIGKILLed{}",
            lag.map_or(String::new(), |l| format!(
                " ({l:?} after its replica {replica} was cut off)"
            ))
        );
        let new =
            block_in_place(|| self.set.wait_for_promotion(old, within)).unwrap_or_else(|| {
                panic!(
                    "no replica promoted within {within:?}; the sentinels' logs:\n{}",
                    self.set.sentinel_logs()
                )
            });
        let promoted = kill_at.elapsed();
        eprintln!("failover: round {round}: replica {new} promoted after {promoted:.2?}");
        // The first commit applied on the new master: a worker's, after
        // its line saying it found the new master.
        let workers = self.workers();
        let logs = &mut self.logs;
        let committed = eventually(within, async || {
            logs.poll();
            workers.iter().any(|w| {
                logs.first_of_after(w, kill_us, |k| matches!(k, Kind::RedisMoved(_)))
                    .and_then(|m| logs.commit_of_after(w, m))
                    .is_some()
            })
        })
        .await;
        assert!(
            committed,
            "round {round}: no commit applied within {within:?} of the Redis master's kill{}",
            self.log_tails()
        );
        let monitor = &self.monitor;
        let moved = eventually(within, async || {
            monitor.first_progress(kill_at, before_total).is_some()
        })
        .await;
        let store_moved = moved
            .then(|| monitor.first_progress(kill_at, before_total))
            .flatten()
            .map(|t| t - kill_at);
        eprintln!(
            "failover: round {round}: commits applied again; checkpoints moved past the kill's after {store_moved:.2?}"
        );
        RedisRound {
            old,
            new,
            lag,
            cut_at,
            kill_us,
            kill_at,
            promoted,
            store_moved,
            rejoined_as_replica: None,
            stale_master_for: None,
            stale_master_commands: BTreeMap::new(),
        }
    }

    /// SIGKILL the broker node most workers are connected to; wait until
    /// every worker that was on it has reconnected and committed again.
    async fn rabbit_failover(&mut self, round: usize, within: Duration) -> RabbitRound {
        let ports = self.amqp_ports();
        let mut placement: Vec<(String, Vec<usize>)> = self
            .roles
            .iter()
            .map(|(name, _, pid)| (name.clone(), amqp_nodes_of(*pid, &ports)))
            .collect();
        placement.push((
            "checker (this test)".into(),
            amqp_nodes_of(std::process::id(), &ports),
        ));
        let mut votes = vec![(0usize, 0usize); ports.len()];
        for (name, nodes) in &placement {
            for n in nodes {
                if name.starts_with('w') {
                    votes[*n].0 += 1;
                } else {
                    votes[*n].1 += 1;
                }
            }
        }
        let victim = (0..ports.len())
            .filter(|&i| self.rabbit.is_running(i))
            .max_by_key(|&i| (votes[i], std::cmp::Reverse(i)))
            .expect("a running node");
        // The broker's own view, for the report (who is where).
        let listed = self
            .rabbit
            .connections()
            .await
            .map(|cs| {
                let mut per = vec![0usize; ports.len()];
                for c in cs {
                    per[c.node] += 1;
                }
                format!("{per:?}")
            })
            .unwrap_or_else(|e| format!("list_connections failed: {e}"));
        // Where the quorum queues' leaders are: a leader on the victim means an election.
        let mut leaders = Vec::new();
        for q in [
            format!("{}.tasks", self.c.prefix),
            format!("{}.checker", self.c.prefix),
        ] {
            let ask = (0..ports.len())
                .find(|&i| self.rabbit.is_running(i))
                .unwrap_or(0);
            let leader = self
                .rabbit
                .quorum_members(ask, &q)
                .await
                .ok()
                .and_then(|ms| ms.into_iter().find(|m| m.raft_state == "leader"))
                .map(|m| m.node);
            leaders.push((q, leader));
        }
        let affected: Vec<String> = placement
            .iter()
            .filter(|(n, nodes)| n.starts_with('w') && nodes.contains(&victim))
            .map(|(n, _)| n.clone())
            .collect();
        assert!(
            !affected.is_empty(),
            "no worker is connected to any broker node (as /proc shows): {placement:?}"
        );
        eprintln!(
            "failover: round {round}: broker connections per node (rabbitmqctl) {listed}; \
             placement {placement:?}; quorum leaders {leaders:?}; killing node {victim} ({})",
            self.rabbit.node_name(victim)
        );
        let (kill_at, kill_us) = (Instant::now(), now_us());
        self.rabbit
            .kill(victim)
            .await
            .unwrap_or_else(|e| panic!("SIGKILL of RabbitMQ node {victim}: {e}"));
        let logs = &mut self.logs;
        let back = eventually(within, async || {
            logs.poll();
            affected.iter().all(|w| {
                logs.first_of_after(w, kill_us, |k| matches!(k, Kind::BrokerConnected(_)))
                    .and_then(|t| logs.commit_of_after(w, t))
                    .is_some()
            })
        })
        .await;
        if !back {
            let mut why = String::new();
            for w in &affected {
                let evs: Vec<String> = self
                    .logs
                    .events
                    .iter()
                    .filter(|e| &e.proc == w && e.ts >= kill_us)
                    .take(40)
                    .map(|e| format!("  {:+.3}s {}", secs(e.ts - kill_us), e.kind.describe()))
                    .collect();
                why.push_str(&format!("\n{w} since the kill:\n{}", evs.join("\n")));
            }
            panic!(
                "round {round}: the workers on RabbitMQ node {victim} ({affected:?}) did not \
                 reconnect and commit within {within:?} of its kill{why}{}",
                self.log_tails()
            );
        }
        eprintln!(
            "failover: round {round}: workers {affected:?} reconnected and committed after {:.2?}",
            kill_at.elapsed()
        );
        RabbitRound {
            victim,
            placement,
            kill_us,
            kill_at,
            affected,
            leaders,
            restart_took: None,
        }
    }

    /// Restart the old Redis master and the broker node, at once. The old
    /// master comes back as the master it was, with its old data, until the
    /// sentinels make it a replica of the new one (nothing of tidemark may
    /// reach it meanwhile); then it is waited for as an in-sync replica,
    /// and with `promotable` until every sentinel sees it so (another round
    /// follows: it is the replica the next failover promotes).
    async fn restart_both(
        &mut self,
        r: &mut RedisRound,
        b: &mut RabbitRound,
        within: Duration,
        promotable: bool,
    ) {
        let t = Instant::now();
        block_in_place(|| {
            self.set
                .node_mut(r.old)
                .expect("the old master is one of the set's nodes")
                .restart()
        });
        let (set, rabbit) = (&self.set, &mut self.rabbit);
        let old = r.old;
        let redis = async {
            let mut stale_for = within;
            let mut others = BTreeMap::new();
            while t.elapsed() < within {
                let info = ask::<String>(old, redis::cmd("INFO").arg("replication"))
                    .await
                    .unwrap_or_default();
                if info.contains("role:slave") {
                    stale_for = t.elapsed();
                    break;
                }
                if let Ok(stats) = ask::<String>(old, redis::cmd("INFO").arg("commandstats")).await
                {
                    others = foreign_commands(&stats);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let ready =
                eventually(within, async || replica_ready(set, old, promotable).await).await;
            (stale_for, others, ready, t.elapsed())
        };
        let broker = rabbit.restart(b.victim);
        let ((stale_for, others, ready, rejoined), took) = tokio::join!(redis, broker);
        assert!(
            ready,
            "the old master {} did not come back as an in-sync replica of {} within {within:?} \
             (role now {:?}); the sentinels' logs:\n{}",
            r.old,
            r.new,
            self.set.role(r.old),
            self.set.sentinel_logs()
        );
        r.stale_master_for = Some(stale_for);
        r.stale_master_commands = others;
        r.rejoined_as_replica = Some(rejoined);
        let took = took.unwrap_or_else(|e| panic!("restart of RabbitMQ node {}: {e}", b.victim));
        b.restart_took = Some(took);
        eprintln!(
            "failover: Redis {} a stale master for {stale_for:.2?}, then a replica of {} in sync \
             after {rejoined:.2?}; RabbitMQ node {} back in {took:.2?}",
            r.old, r.new, b.victim
        );
    }
}

/// The commands in an `INFO commandstats` answer other than those of the
/// sentinels (monitoring, hello messages, reconfiguration) and of this
/// test (INFO), with their calls.
fn foreign_commands(stats: &str) -> BTreeMap<String, u64> {
    const OURS: [&str; 16] = [
        "ping",
        "info",
        "publish",
        "subscribe",
        "client",
        "slaveof",
        "replicaof",
        "config",
        "multi",
        "exec",
        "psync",
        "replconf",
        "sync",
        "hello",
        "auth",
        "command",
    ];
    stats
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse::<u64>()
                .ok()?;
            let base = name.split('|').next().unwrap_or(name);
            (!OURS.contains(&base) && calls > 0).then(|| (name.to_string(), calls))
        })
        .collect()
}

/// The longest pause in new message ids downstream between `from` and
/// `until`: (when it ended, relative to `from`; its length).
fn longest_pause(firsts: &[Instant], from: Instant, until: Instant) -> (Duration, Duration) {
    let mut last = from;
    let mut best = (Duration::ZERO, Duration::ZERO);
    for t in firsts.iter().filter(|t| **t >= from && **t <= until) {
        let gap = *t - last;
        if gap > best.1 {
            best = (*t - from, gap);
        }
        last = *t;
    }
    best
}

fn metric_sum(text: &str, name: &str, label: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sync_rides_through_a_redis_failover_and_the_loss_of_a_broker_node() {
    let started = Instant::now();
    let soak = std::env::var_os("TIDEMARK_SOAK").is_some();
    if let Some(why) = RabbitCluster::unavailable() {
        eprintln!("SKIPPED: the failover test: {why}");
        return;
    }
    let redis_ok = std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !redis_ok {
        eprintln!(
            "SKIPPED: the failover test: no redis-server on PATH (apt-get install redis-server)"
        );
        return;
    }
    // (records per routing key, page size, API latency, rounds, churn per second)
    let (records, page, latency, rounds, churn) = if soak {
        (30_000, 50, 100, 3, 4)
    } else {
        (3_000, 25, 100, 1, 2)
    };
    let recover_within = Duration::from_secs(if soak { 120 } else { 60 });
    // Which rounds' replica lags behind the master at the kill (the failover
    // then loses the last commits): every round of the CI form, the second
    // of the soak's; TIDEMARK_FAILOVER_LAG=0 or 1 for none or all.
    let lag_of = |round: usize| match std::env::var("TIDEMARK_FAILOVER_LAG").as_deref() {
        Ok("0") => false,
        Ok("1") => true,
        _ => !soak || round == 2,
    };

    // Our own services: the sentinels' set and the broker cluster, booted at once.
    let sentinels = tokio::task::spawn_blocking(|| SentinelSet::start(SentinelSetup::default()));
    let rabbit = match RabbitCluster::start(3).await {
        Ok(c) => c,
        Err(e) => match skip_reason(&e) {
            Some(why) => {
                eprintln!("SKIPPED: the failover test: {why}");
                return;
            }
            None => panic!("the private RabbitMQ cluster: {e}"),
        },
    };
    let set = sentinels.await.expect("the Sentinel set");
    let booted = started.elapsed();
    let redis_url = set.url();
    let amqp_url = rabbit.amqp_url_list();
    eprintln!(
        "failover: {} form; services up in {booted:.1?} (RabbitMQ cluster {:.1?}): REDIS_URL={redis_url} AMQP_URL={amqp_url}",
        if soak { "soak" } else { "CI" },
        rabbit.boot_time()
    );

    let mut c = Cluster::start_on(
        &feeds(page),
        &[
            "--records",
            &records.to_string(),
            "--latency-ms",
            &latency.to_string(),
        ],
        &redis_url,
        &amqp_url,
    );
    c.set_retry(RETRY);
    c.env.extend([
        ("TIDEMARK_LEASE".into(), "4s".into()),
        ("TIDEMARK_QUEUE_LEASE".into(), "8s".into()),
        ("TIDEMARK_LOG_FORMAT".into(), "json".into()),
        (
            "TIDEMARK_LOG".into(),
            "info,tidemark_worker=debug,lapin=warn,tidemark_bus=info".into(),
        ),
    ]);
    let checker =
        FlowChecker::start(&amqp_url, &c.exchange(), &format!("{}.checker", c.prefix)).await;
    let coord = c.coordinator_with("coord", &["--tick", "250ms", "--leader-ttl", "3s"]);
    let mut roles = vec![("coord".to_string(), coord, c.procs[coord].pid())];
    for i in 1..=3 {
        let name = format!("w{i}");
        let idx = c.worker(&name, &["--concurrency", "4"]);
        roles.push((name, idx, c.procs[idx].pid()));
    }
    let monitor = Monitor::start(&c).await;
    let logs = Logs::new(&c);
    let mut rig = Rig {
        c,
        set,
        rabbit,
        checker,
        monitor,
        logs,
        roles,
    };
    let sync_started = Instant::now();

    // The API keeps changing while the faults hit: incremental polls have work.
    let churning = Arc::new(AtomicBool::new(true));
    let churner = {
        let (on, url) = (churning.clone(), rig.c.mock_url.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            while on.load(Ordering::SeqCst) {
                for action in ["insert", "update"] {
                    let _ = http
                        .post(format!("{url}/_admin/{action}?n={churn}"))
                        .send()
                        .await;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };

    // Mid-backfill: a fifth of the first walk has arrived.
    let total_first = records * keys().len();
    assert!(
        rig.checker
            .wait_for_messages(total_first / 5, Duration::from_secs(120))
            .await,
        "a fifth of the first walk did not arrive ({} messages){}",
        rig.checker.distinct_messages(),
        rig.log_tails()
    );

    let mut redis_rounds: Vec<RedisRound> = Vec::new();
    let mut rabbit_rounds: Vec<RabbitRound> = Vec::new();
    for round in 1..=rounds {
        let lag = lag_of(round).then_some(Duration::from_millis(500));
        let mut r = rig.redis_failover(round, recover_within, lag).await;
        // Records flow for a while on the new master before the broker fault.
        let n = rig.checker.distinct_messages();
        let flowing = rig
            .checker
            .wait_for_messages(n + 8 * page, Duration::from_secs(60))
            .await;
        assert!(
            flowing,
            "round {round}: records stopped after the Redis failover{}",
            rig.log_tails()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut b = rig.rabbit_failover(round, recover_within).await;
        rig.restart_both(&mut r, &mut b, recover_within, round < rounds)
            .await;
        redis_rounds.push(r);
        rabbit_rounds.push(b);
        if round < rounds {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
    }

    // Settle: the churn stops, one more change, and every current version arrives.
    churning.store(false, Ordering::SeqCst);
    churner.await.unwrap();
    rig.c.admin("/_admin/insert?n=3", None).await;
    let truth = rig.c.truth().await;
    let checker = &rig.checker;
    let settled = eventually(Duration::from_secs(180), async || {
        checker.missing(&truth.records).is_empty()
    })
    .await;
    let synced = sync_started.elapsed();
    // A moment more, so that a late duplicate is seen too.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let missing = rig.checker.missing(&truth.records);
    let operated = operator_commands(&rig.c);

    // The roles never exited, and are the processes they were.
    let mut exits = Vec::new();
    for (name, idx, pid) in &rig.roles {
        let p = &mut rig.c.procs[*idx];
        if let Err(e) = p.check_alive() {
            exits.push(format!("{name}: {e}"));
        }
        if p.pid() != *pid {
            exits.push(format!("{name}: pid {} is not {pid}", p.pid()));
        }
    }
    // The workers' own counts of fenced commits and stale tasks.
    let mut metrics = (0u64, 0u64, 0u64);
    for (name, idx, _) in &rig.roles {
        if !name.starts_with('w') {
            continue;
        }
        if let Some(url) = rig.c.procs[*idx].addr.clone()
            && let Ok(r) = reqwest::get(format!("{url}/metrics")).await
            && let Ok(text) = r.text().await
        {
            metrics.0 += metric_sum(&text, "tidemark_commits_total", "result=\"ok\"");
            metrics.1 += metric_sum(&text, "tidemark_commits_total", "result=\"fenced\"");
            metrics.2 += metric_sum(&text, "tidemark_tasks_dropped_total", "");
        }
    }
    let jobs = rig.c.jobs().await;
    let failed: Vec<String> = jobs
        .iter()
        .filter(|(_, cp)| cp.phase == Phase::Failed)
        .map(|(j, cp)| format!("{j}: {:?}", cp.last_error))
        .collect();
    let dead_letters = rig.c.dead_letters().await;

    rig.logs.poll();
    let Rig {
        c,
        checker,
        monitor,
        logs,
        rabbit,
        set,
        ..
    } = rig;
    let watch = monitor.finish().await;
    let flow = checker.finish().await;
    let redis_kills: Vec<i64> = redis_rounds.iter().map(|r| r.kill_us).collect();
    let commits = audit(&logs.events, &redis_kills);

    // Cursor regressions: only while Redis failed over, and only over pages delivered.
    let window = |at: Instant| {
        redis_rounds.iter().any(|r| {
            at >= r.cut_at.unwrap_or(r.kill_at)
                && at <= r.kill_at + r.promoted + Duration::from_secs(15)
        })
    };
    let mut bad_regressions = Vec::new();
    for g in &watch.regressions {
        if !window(g.at) {
            bad_regressions.push(format!("{}: {} outside a Redis failover", g.job, g.what));
            continue;
        }
        let (from_seq, from_records) = g.from;
        let (to_seq, to_records) = g.to;
        let owed = from_records.saturating_sub(to_records);
        let delivered = flow
            .messages
            .iter()
            .filter(|((rk, _), s)| {
                *rk == g.routing_key
                    && s.page_seq.is_some_and(|p| p >= to_seq && p < from_seq)
                    && s.first_at <= g.at + Duration::from_secs(1)
            })
            .count() as u64;
        if delivered < owed {
            bad_regressions.push(format!(
                "{}: {} stepped back over {owed} records of which only {delivered} had arrived",
                g.job, g.what
            ));
        }
    }

    // Kill -> every job's seq above where it was at the kill (a chain whose
    // commits the failover lost waits for its lease to run out, then the
    // coordinator re-issues it from the stored cursor).
    let every_chain = |kill_at: Instant| -> Option<Duration> {
        let before = watch
            .seqs
            .iter()
            .rev()
            .find(|(at, _)| *at < kill_at)?
            .1
            .clone();
        let mut worst = Duration::ZERO;
        for (job, seq) in &before {
            let (at, _) = watch
                .seqs
                .iter()
                .find(|(at, m)| *at >= kill_at && m.get(job).is_some_and(|s| s > seq))?;
            worst = worst.max(*at - kill_at);
        }
        Some(worst)
    };
    // Recovery times, from the logs.
    let workers: Vec<String> = ["w1", "w2", "w3"].iter().map(|s| s.to_string()).collect();
    let mut redis_rows = Vec::new();
    for (i, r) in redis_rounds.iter().enumerate() {
        let next_kill = redis_kills.get(i + 1).copied().unwrap_or(i64::MAX);
        // Each worker: connected to the new master, then its first commit there.
        let per: Vec<(String, Option<i64>, Option<i64>)> = workers
            .iter()
            .map(|w| {
                let moved = logs.first_of_after(w, r.kill_us, |k| matches!(k, Kind::RedisMoved(_)));
                let commit = moved
                    .and_then(|m| logs.commit_of_after(w, m))
                    .filter(|t| *t < next_kill);
                (
                    w.clone(),
                    moved.map(|m| m - r.kill_us),
                    commit.map(|t| t - r.kill_us),
                )
            })
            .collect();
        let first = per.iter().filter_map(|p| p.2).min();
        let all = if per.iter().all(|p| p.2.is_some()) {
            per.iter().filter_map(|p| p.2).max()
        } else {
            None
        };
        redis_rows.push((first, all, per));
    }
    let mut rabbit_rows = Vec::new();
    for b in &rabbit_rounds {
        let per: Vec<(String, Option<i64>, Option<i64>)> = b
            .affected
            .iter()
            .map(|w| {
                let back =
                    logs.first_of_after(w, b.kill_us, |k| matches!(k, Kind::BrokerConnected(_)));
                let commit = back.and_then(|t| logs.commit_of_after(w, t));
                (
                    w.clone(),
                    back.map(|t| t - b.kill_us),
                    commit.map(|t| t - b.kill_us),
                )
            })
            .collect();
        let all = per.iter().filter_map(|p| p.2).max();
        let five = Duration::from_secs(5);
        let pause = longest_pause(&flow.firsts, b.kill_at, b.kill_at + five);
        let rate = |from: Instant, to: Instant| {
            flow.firsts
                .iter()
                .filter(|t| **t >= from && **t < to)
                .count() as f64
                / 5.0
        };
        let rates = (
            rate(b.kill_at - five, b.kill_at),
            rate(b.kill_at, b.kill_at + five),
        );
        rabbit_rows.push((all, (pause, rates), per));
    }
    // Who else lost the broker or Redis, and what the roles warned about.
    let mut warns: BTreeMap<String, u64> = BTreeMap::new();
    for e in &logs.events {
        if let Kind::Warn(m, _) = &e.kind {
            let m: String = m.chars().take(160).collect();
            *warns
                .entry(format!(
                    "{}: {m}",
                    e.proc.trim_end_matches(char::is_numeric)
                ))
                .or_insert(0) += 1;
        }
    }
    let broker_events: Vec<String> = logs
        .events
        .iter()
        .filter(|e| {
            matches!(
                e.kind,
                Kind::BrokerConnected(_)
                    | Kind::BrokerLost(_)
                    | Kind::RedisMoved(_)
                    | Kind::RedisLost
            )
        })
        .filter(|e| {
            redis_kills
                .iter()
                .chain(rabbit_rounds.iter().map(|b| &b.kill_us))
                .any(|k| e.ts >= *k && e.ts < k + 60_000_000)
        })
        .map(|e| {
            let since = redis_kills
                .iter()
                .chain(rabbit_rounds.iter().map(|b| &b.kill_us))
                .filter(|k| **k <= e.ts)
                .max()
                .map_or(0, |k| e.ts - k);
            format!(
                "  +{:.3}s after a kill: {} {}",
                secs(since),
                e.proc,
                e.kind.describe()
            )
        })
        .collect();

    let delivered_versions: usize = flow.versions.values().map(HashSet::len).sum();
    let distinct = flow.messages.len() as u64;
    let duplicates: u64 = flow
        .messages
        .values()
        .map(|s| s.arrivals.len() as u64 - 1)
        .sum();
    // Why each repeat came: the broker redelivered it to the subscriber
    // (whose node died); its page was published again because the first
    // try failed with a fault (a worker's "giving the task back" or "page
    // failed; retrying later" line names the page); the github feed's last
    // page read again at each poll (by design: that API gives nothing to
    // continue from at the end, docs/GUARANTEES.md); anything else.
    let retried: HashSet<(String, u64)> = logs
        .events
        .iter()
        .filter_map(|e| match &e.kind {
            Kind::Warn(m, Some((job, seq)))
                if m.starts_with("infrastructure error; giving the task back")
                    || m.starts_with("page failed; retrying later") =>
            {
                Some((job.replacen('/', ".", 1), *seq))
            }
            _ => None,
        })
        .collect();
    // Pages whose task ran twice at once (the broker had it twice: a
    // publish of the task nacked or cut off, yet enqueued): the second run's
    // commit is ALREADY_APPLIED or CONFLICT.
    let twice: HashSet<(String, u64)> = logs
        .events
        .iter()
        .filter_map(|e| match &e.kind {
            Kind::Commit {
                job, seq, outcome, ..
            } if outcome == "ALREADY_APPLIED" || outcome == "CONFLICT" => {
                Some((job.replacen('/', ".", 1), *seq))
            }
            _ => None,
        })
        .collect();
    // Pages a Redis failover lost the commits of: the cursor stepped back
    // over them (as sampled), or their commit was applied again after it
    // (as the logs show: the last commit before the kill is often not sampled).
    let lost_commits: HashSet<(String, u64)> = watch
        .regressions
        .iter()
        .flat_map(|g| (g.to.0..g.from.0).map(move |seq| (g.routing_key.clone(), seq)))
        .chain(commits.redone_pages.iter().cloned())
        .collect();
    let mut dup_causes = [0u64; 6];
    let mut unexplained: BTreeMap<(String, u64), u64> = BTreeMap::new();
    for ((rk, _), s) in &flow.messages {
        for (_, redelivered) in s.arrivals.iter().skip(1) {
            let page = (rk.clone(), s.page_seq.unwrap_or(u64::MAX));
            let i = if *redelivered {
                0
            } else if retried.contains(&page) {
                1
            } else if twice.contains(&page) {
                2
            } else if lost_commits.contains(&page) {
                3
            } else if rk.starts_with("github.") {
                4
            } else {
                *unexplained.entry(page).or_insert(0) += 1;
                5
            };
            dup_causes[i] += 1;
        }
    }
    let known: HashSet<&TruthRecord> = truth.versions.iter().collect();
    let foreign: Vec<String> = flow
        .versions
        .iter()
        .flat_map(|(k, vs)| {
            vs.iter()
                .filter(|v| !known.contains(v))
                .map(move |v| format!("{k}: {v:?}"))
        })
        .take(10)
        .collect();
    let strays: Vec<&String> = flow
        .versions
        .keys()
        .filter(|k| !keys().contains(k))
        .collect();
    let lost: usize = missing.values().sum();
    let took = started.elapsed();
    let redis_first = redis_rows.iter().filter_map(|r| r.0).max();
    let rabbit_all = rabbit_rows.iter().filter_map(|r| r.0).max();

    // The report.
    let mut rep = String::new();
    rep.push_str(&format!(
        "### Failover run: {} ({rounds} round{} of both faults), {:.0} s\n\n",
        if soak { "soak" } else { "CI configuration" },
        if rounds == 1 { "" } else { "s" },
        took.as_secs_f64()
    ));
    rep.push_str(&format!(
        "Redis Sentinel (master, 1 replica, 3 sentinels: quorum 2, down-after 1 s, failover-timeout 5 s; \
         no WAIT), RabbitMQ {} nodes (quorum queues, initial group size 3), coordinator + 3 workers \
         (concurrency 4, lease 4 s, queue lease 8 s); {} feeds × {} partitions, {records} records each \
         at first, {page} a page, API latency {latency} ms, {churn} inserts + {churn} updates a second \
         during the faults; services booted in {:.1} s.\n\n",
        rabbit.len(),
        FEEDS.len(),
        PARTITIONS.len(),
        booted.as_secs_f64()
    ));
    rep.push_str("| measure | value |\n|---|---|\n");
    for (k, v) in [
        ("routing keys", keys().len().to_string()),
        (
            "current record versions in the source (per key)",
            truth.records.len().to_string(),
        ),
        (
            "versions the source ever held (per key)",
            truth.versions.len().to_string(),
        ),
        (
            "distinct record versions delivered (all keys)",
            delivered_versions.to_string(),
        ),
        (
            "messages delivered to the subscriber",
            flow.deliveries.to_string(),
        ),
        ("distinct message ids", distinct.to_string()),
        ("duplicates (same message id again)", duplicates.to_string()),
        (
            "  of which: redelivered to the subscriber / pages published again after a fault error / a page task run twice / pages walked again after a failover lost their commits / github's last page re-read at a poll (by design) / other",
            format!(
                "{} / {} / {} / {} / {} / {}",
                dup_causes[0],
                dup_causes[1],
                dup_causes[2],
                dup_causes[3],
                dup_causes[4],
                dup_causes[5]
            ),
        ),
        (
            "deliveries flagged redelivered by the broker",
            flow.redelivered.to_string(),
        ),
        ("**lost** (must be 0)", lost.to_string()),
        ("versions the source never had", foreign.len().to_string()),
        ("checkpoint samples", watch.samples.to_string()),
        (
            "cursor steps back (all during a Redis failover, over delivered pages)",
            watch.regressions.len().to_string(),
        ),
        (
            "  pages whose commits a failover lost (walked again)",
            lost_commits.len().to_string(),
        ),
        (
            "**cursor steps back past what was delivered** (must be 0)",
            bad_regressions.len().to_string(),
        ),
        (
            "epochs stepped back to one seen before",
            watch.epoch_steps_back.len().to_string(),
        ),
        (
            "**new epochs not above every earlier one** (must be 0)",
            watch.epoch_violations.len().to_string(),
        ),
        ("commits applied", commits.applied.to_string()),
        (
            "commits ALREADY_APPLIED",
            commits.already_applied.to_string(),
        ),
        (
            "commits FENCED (stale epoch refused)",
            commits.fenced.to_string(),
        ),
        ("commits CONFLICT", commits.conflict.to_string()),
        (
            "stale tasks dropped before any work",
            commits.stale_dropped.to_string(),
        ),
        (
            "pages applied again after a failover lost their commit",
            commits.redone_after_failover.len().to_string(),
        ),
        (
            "**commits applied under a stale epoch** (must be 0)",
            commits.stale_applied.len().to_string(),
        ),
        (
            "workers' metrics: commits ok / fenced / tasks dropped",
            format!("{} / {} / {}", metrics.0, metrics.1, metrics.2),
        ),
        ("tasks in the dead-letter queue", dead_letters.to_string()),
        (
            "subscriber reconnections",
            flow.reconnects.len().to_string(),
        ),
        ("**role exits** (must be 0)", exits.len().to_string()),
        (
            "first walk + faults + settling",
            format!("{:.1} s", synced.as_secs_f64()),
        ),
    ] {
        rep.push_str(&format!("| {k} | {v} |\n"));
    }
    rep.push_str("\n| round | replica cut off before the kill | Redis master killed → replica promoted | → first commit on the new master | → every worker committing there | → checkpoints past the kill's (sum; every job) | old master restarted: a stale master for, then an in-sync replica after | commands it ran meanwhile |\n|---|---|---|---|---|---|---|---|\n");
    for (i, (r, (first, all, _))) in redis_rounds.iter().zip(&redis_rows).enumerate() {
        let moved = format!(
            "{}; {}",
            r.store_moved
                .map_or("-".into(), |t| format!("{:.2} s", t.as_secs_f64())),
            every_chain(r.kill_at).map_or("-".into(), |t| format!("{:.2} s", t.as_secs_f64()))
        );
        rep.push_str(&format!(
            "| {} | {} | {:.2} s ({} → {}) | {} | {} | {moved} | {} | {:?} |\n",
            i + 1,
            r.lag
                .map_or("no".into(), |l| format!("{} ms", l.as_millis())),
            r.promoted.as_secs_f64(),
            r.old,
            r.new,
            first.map_or("-".into(), |t| format!("{:.2} s", secs(t))),
            all.map_or("-".into(), |t| format!("{:.2} s", secs(t))),
            r.rejoined_as_replica.map_or("-".into(), |t| format!(
                "{:.1} s, {:.1} s",
                r.stale_master_for.unwrap_or_default().as_secs_f64(),
                t.as_secs_f64()
            )),
            r.stale_master_commands,
        ));
    }
    rep.push_str("\n| round | broker node killed (workers on it) | → those workers reconnected | → and committed through the new node | new records downstream a second, 5 s before / after the kill; longest pause after it | node restart |\n|---|---|---|---|---|---|\n");
    for (i, (b, (all, (pause, rates), per))) in rabbit_rounds.iter().zip(&rabbit_rows).enumerate() {
        let reconnected = per.iter().filter_map(|p| p.1).max();
        rep.push_str(&format!(
            "| {} | {} ({}) | {} | {} | {:.0} / {:.0}; {:.2} s (ended {:.2} s after the kill) | {} |\n",
            i + 1,
            b.victim,
            b.affected.join(", "),
            reconnected.map_or("-".into(), |t| format!("{:.2} s", secs(t))),
            all.map_or("-".into(), |t| format!("{:.2} s", secs(t))),
            rates.0,
            rates.1,
            pause.1.as_secs_f64(),
            pause.0.as_secs_f64(),
            b.restart_took.map_or("-".into(), |t| format!("{:.1} s", t.as_secs_f64())),
        ));
    }
    let walked = flow
        .firsts
        .get(total_first.saturating_sub(1))
        .map_or("-".into(), |t| {
            format!("{:.1} s", (*t - sync_started).as_secs_f64())
        });
    rep.push_str(&format!(
        "\nTimeline from the roles' start: Redis kills at {:?} s, broker kills at {:?} s; \
         {total_first} distinct messages (the first walk's size) had arrived at {walked}.\n",
        redis_rounds
            .iter()
            .map(|r| format!("{:.1}", (r.kill_at - sync_started).as_secs_f64()))
            .collect::<Vec<_>>(),
        rabbit_rounds
            .iter()
            .map(|b| format!("{:.1}", (b.kill_at - sync_started).as_secs_f64()))
            .collect::<Vec<_>>(),
    ));
    rep.push_str("\nPlacement before each broker kill (process → node indices):\n\n");
    for (i, b) in rabbit_rounds.iter().enumerate() {
        rep.push_str(&format!(
            "- round {}: {:?}; quorum queue leaders {:?}\n",
            i + 1,
            b.placement,
            b.leaders
        ));
    }
    if !warns.is_empty() {
        rep.push_str("\nWarnings and errors the roles logged (role: message × count):\n\n");
        for (m, n) in &warns {
            rep.push_str(&format!("- {m} × {n}\n"));
        }
    }
    eprintln!("{rep}");
    eprintln!(
        "failover: connection events around the faults:\n{}",
        broker_events.join("\n")
    );
    if !watch.regressions.is_empty() {
        eprintln!("failover: cursor steps back: {:?}", watch.regressions);
    }
    if !commits.redone_after_failover.is_empty() {
        eprintln!(
            "failover: pages applied again after a failover: {:?}",
            commits.redone_after_failover
        );
    }
    if !unexplained.is_empty() {
        eprintln!("failover: repeats of other causes, by (routing key, page): {unexplained:?}");
    }
    if !flow.reconnects.is_empty() {
        eprintln!(
            "failover: subscriber reconnections: {:?}",
            flow.reconnects
                .iter()
                .map(|(t, w)| (*t - started, w))
                .collect::<Vec<_>>()
        );
    }
    // The roles' logs outlive the deployment's temp dir, for a look afterwards.
    let kept = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("failover-logs");
    let _ = std::fs::remove_dir_all(&kept);
    let _ = std::fs::create_dir_all(&kept);
    for p in c.procs.iter().chain(std::iter::once(&c.mock)) {
        let _ = std::fs::copy(&p.log, kept.join(format!("{}.log", p.name)));
    }
    eprintln!("failover: the roles' logs are in {}", kept.display());
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("failover.md");
    let _ = std::fs::write(&out, &rep);
    if let Ok(path) = std::env::var("TIDEMARK_FAILOVER_OUT") {
        std::fs::write(&path, &rep).unwrap();
    }
    eprintln!(
        "failover: records {delivered_versions} (distinct versions over {} keys; {distinct} distinct messages, {} delivered), \
         duplicates {duplicates}, lost {lost}, redis failover recovery {}, rabbitmq failover recovery {}, total {:.1} s",
        keys().len(),
        flow.deliveries,
        redis_first.map_or("-".into(), |t| format!("{:.2} s", secs(t))),
        rabbit_all.map_or("-".into(), |t| format!("{:.2} s", secs(t))),
        took.as_secs_f64()
    );

    assert!(
        settled && missing.is_empty(),
        "records lost: {missing:?}{}",
        c.logs()
    );
    assert!(
        foreign.is_empty(),
        "versions the source never had: {foreign:?}"
    );
    assert!(strays.is_empty(), "unexpected routing keys: {strays:?}");
    assert!(exits.is_empty(), "roles exited or were replaced: {exits:?}");
    assert!(
        commits.stale_applied.is_empty(),
        "commits applied under a stale epoch: {:?}",
        commits.stale_applied
    );
    assert!(
        watch.epoch_violations.is_empty(),
        "epochs not strictly increasing: {:?}",
        watch.epoch_violations
    );
    assert!(
        bad_regressions.is_empty(),
        "cursors went back past what was delivered: {bad_regressions:?}"
    );
    assert!(
        watch.samples > 50,
        "the monitor barely ran ({} samples)",
        watch.samples
    );
    assert!(
        commits.applied > 100,
        "too few commits in the logs: {commits:?}"
    );
    assert_eq!(
        logs.unparsed_ts, 0,
        "log lines without a readable timestamp"
    );
    assert!(failed.is_empty(), "failed jobs: {failed:?}");
    assert_eq!(dead_letters, 0, "tasks were dead-lettered");
    if let Err(e) = operated {
        panic!("an operator command over the Sentinel URL: {e}");
    }
    for (i, r) in redis_rounds.iter().enumerate() {
        assert!(
            r.stale_master_commands.is_empty(),
            "round {}: the restarted old master ran commands while it was a stale master: {:?}",
            i + 1,
            r.stale_master_commands
        );
    }
    for (i, (first, _, per)) in redis_rows.iter().enumerate() {
        assert!(
            first.is_some(),
            "round {}: no worker committed on the new master: {per:?}",
            i + 1
        );
    }
    for (i, (all, _, per)) in rabbit_rows.iter().enumerate() {
        assert!(
            all.is_some(),
            "round {}: a worker on the killed broker node never committed again: {per:?}",
            i + 1
        );
    }
    drop(c);
    drop(set);
    let _ = rabbit.stop().await;
}

/// The operator commands take the Sentinel URL and the node list too:
/// `status` reads through the sentinels' master, `pause` and `resume`
/// write there (a new epoch each), after the failovers.
fn operator_commands(c: &Cluster) -> Result<(), String> {
    let env = c.role_env();
    let phases = || -> Result<Vec<String>, String> {
        let (code, out, err) = tidemark_tests::tidemark(&["status", "--json"], &env);
        if code != 0 {
            return Err(format!("status --json: exit {code}: {err}"));
        }
        let st: serde_json::Value =
            serde_json::from_str(&out).map_err(|e| format!("status --json: {e}: {out}"))?;
        Ok(st["jobs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|j| j["feed"] == "github")
            .map(|j| j["phase"].as_str().unwrap_or_default().to_string())
            .collect())
    };
    for (command, want) in [("pause", true), ("resume", false)] {
        let (code, out, err) = tidemark_tests::tidemark(&[command, "github"], &env);
        if code != 0 {
            return Err(format!("{command} github: exit {code}: {out}{err}"));
        }
        let got = phases()?;
        if got.len() != PARTITIONS.len() || got.iter().any(|p| (p == "paused") != want) {
            return Err(format!("after {command}, the github jobs are {got:?}"));
        }
    }
    Ok(())
}

impl FlowChecker {
    /// Wait until at least `n` distinct message ids arrived; false after `timeout`.
    async fn wait_for_messages(&self, n: usize, timeout: Duration) -> bool {
        eventually(timeout, async || self.distinct_messages() >= n).await
    }
}
