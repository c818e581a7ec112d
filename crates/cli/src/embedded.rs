//! Embedded mode (`tidemark run`, `tidemark demo`): the coordinator and
//! worker libraries of the distributed deployment, in one process, over the
//! in-process task queue, the embedded state store (a JSON file in the state
//! directory) and a JSON Lines sink.
//!
//! The guarantees are those of the distributed mode within one process: a
//! page's records are written (and fsynced) before its cursor is committed,
//! so a SIGKILL at any moment loses nothing; on restart the chains that were
//! running are re-issued at once from their stored cursors, so only the page
//! in flight can be written twice. A record line cut in half by the kill is
//! removed when its file is opened again (its page was not committed, so it
//! is written again whole).
//!
//! One process owns a state directory at a time (an exclusive lock on
//! `D/lock`). `tidemark pause|resume|rewind|retry --state-dir D` apply their
//! change directly when no run holds the lock; while one does, they leave a
//! request in `D/requests/`, which the run applies within a tick and
//! answers, so its in-memory state and the file never disagree.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidemark_bus::memory::{MemoryDownstream, MemoryQueue};
use tidemark_bus::{OutPage, TaskQueue};
use tidemark_coordinator::ops::{self, Action, ActionReport};
use tidemark_coordinator::{CoordinatorDeps, CoordinatorOptions};
use tidemark_core::Config;
use tidemark_core::checkpoint::Phase;
use tidemark_core::clock::now_ms;
use tidemark_core::config::DeliveryPer;
use tidemark_state::{EmbeddedStore, StateStore};
use tidemark_telemetry::Metrics;
use tidemark_worker::{WorkerDeps, WorkerOptions};
use tokio::sync::watch;

use crate::exit::Failure;
use tidemark_core::jsonbytes::compact_json;

/// The files of a state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub dir: PathBuf,
}

impl StateDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    pub fn state_file(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    fn lock_file(&self) -> PathBuf {
        self.dir.join("lock")
    }
    fn requests(&self) -> PathBuf {
        self.dir.join("requests")
    }

    /// Read the state as it was last written (consistent: the file is replaced atomically).
    pub fn read(&self) -> Result<EmbeddedStore, Failure> {
        if !self.state_file().exists() {
            return Err(Failure::usage(format!(
                "no tidemark state in {} (expected {})",
                self.dir.display(),
                self.state_file().display()
            )));
        }
        EmbeddedStore::open(&self.state_file()).map_err(|e| Failure::runtime(e.to_string()))
    }

    /// Take the directory for this process: create it, lock it, open the store.
    pub fn take(&self) -> Result<Option<Owned>, Failure> {
        std::fs::create_dir_all(self.requests())
            .map_err(|e| Failure::runtime(format!("cannot create {}: {e}", self.dir.display())))?;
        let mut lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(self.lock_file())
            .map_err(|e| Failure::runtime(format!("cannot open the lock file: {e}")))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(Failure::runtime(format!(
                    "cannot lock the state directory: {e}"
                )));
            }
        }
        let _ = lock.set_len(0);
        let _ = write!(lock, "{}", std::process::id());
        let store =
            EmbeddedStore::open(&self.state_file()).map_err(|e| Failure::runtime(e.to_string()))?;
        Ok(Some(Owned {
            dir: self.clone(),
            store: Arc::new(store),
            _lock: lock,
        }))
    }

    /// The pid written by the process that holds the lock (for messages).
    fn holder(&self) -> String {
        std::fs::read_to_string(self.lock_file())
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    }

    /// Apply an operator action: directly when no run holds the directory,
    /// else through the running process.
    pub async fn apply(
        &self,
        feed: &str,
        partition: Option<&str>,
        action: &Action,
    ) -> Result<ActionReport, Failure> {
        if !self.state_file().exists() {
            return Err(Failure::usage(format!(
                "no tidemark state in {}",
                self.dir.display()
            )));
        }
        if let Some(owned) = self.take()? {
            return ops::apply(&*owned.store, feed, partition, action)
                .await
                .map_err(op_failure);
        }
        self.ask_runner(&Request {
            feed: feed.into(),
            partition: partition.map(str::to_string),
            action: action.clone(),
        })
        .await
    }

    async fn ask_runner(&self, req: &Request) -> Result<ActionReport, Failure> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let dir = self.requests();
        let body = serde_json::to_vec(req).map_err(|e| Failure::runtime(e.to_string()))?;
        write_atomic(&dir.join(format!("{id}.json")), &body)?;
        let reply = dir.join(format!("{id}.reply"));
        let request = dir.join(format!("{id}.json"));
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            // The holder may have been another command, now done: then apply it here.
            if request.exists()
                && let Some(owned) = self.take()?
            {
                let _ = std::fs::remove_file(&request);
                return ops::apply(
                    &*owned.store,
                    &req.feed,
                    req.partition.as_deref(),
                    &req.action,
                )
                .await
                .map_err(op_failure);
            }
            let Ok(bytes) = std::fs::read(&reply) else {
                continue;
            };
            let _ = std::fs::remove_file(&reply);
            let r: Reply = serde_json::from_slice(&bytes)
                .map_err(|e| Failure::runtime(format!("unreadable answer from the run: {e}")))?;
            return match r {
                Reply::Ok(report) => Ok(report),
                Reply::Usage(e) => Err(Failure::usage(e)),
                Reply::Error(e) => Err(Failure::runtime(e)),
            };
        }
        let _ = std::fs::remove_file(dir.join(format!("{id}.json")));
        Err(Failure::runtime(format!(
            "the tidemark run holding {} (pid {}) did not answer within 10s",
            self.dir.display(),
            self.holder()
        )))
    }
}

pub(crate) fn op_failure(e: ops::OpError) -> Failure {
    if e.is_usage() {
        Failure::usage(e.to_string())
    } else {
        Failure::runtime(e.to_string())
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Failure> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| Failure::runtime(format!("cannot write {}: {e}", path.display())))
}

#[derive(Serialize, Deserialize)]
struct Request {
    feed: String,
    partition: Option<String>,
    action: Action,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Reply {
    Ok(ActionReport),
    Usage(String),
    Error(String),
}

/// A state directory held by this process.
pub struct Owned {
    pub dir: StateDir,
    pub store: Arc<EmbeddedStore>,
    _lock: File,
}

impl Owned {
    /// Forget requests nobody answered (their command gave up or was
    /// killed): a run must not apply them, perhaps hours later.
    fn clear_requests(&self) {
        if let Ok(entries) = std::fs::read_dir(self.dir.requests()) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Answer the requests other processes left in `D/requests/`.
    async fn serve_requests(&self) {
        let Ok(entries) = std::fs::read_dir(self.dir.requests()) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let reply = match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Request>(&b).map_err(|e| e.to_string()))
            {
                Err(e) => Reply::Usage(format!("unreadable request: {e}")),
                Ok(req) => {
                    match ops::apply(
                        &*self.store,
                        &req.feed,
                        req.partition.as_deref(),
                        &req.action,
                    )
                    .await
                    {
                        Ok(r) => Reply::Ok(r),
                        Err(e) if e.is_usage() => Reply::Usage(e.to_string()),
                        Err(e) => Reply::Error(e.to_string()),
                    }
                }
            };
            let _ = std::fs::remove_file(&path);
            if let Ok(bytes) = serde_json::to_vec(&reply)
                && let Err(e) = write_atomic(&path.with_extension("reply"), &bytes)
            {
                tracing::warn!(error = %e, "cannot answer a control request");
            }
        }
    }
}

/// Where records go.
#[derive(Debug, Clone)]
pub enum Out {
    /// One `<feed>.jsonl` file per feed in this directory.
    Dir(PathBuf),
    Stdout,
}

impl Out {
    /// `-` is stdout; anything else a directory.
    pub fn parse(s: &str) -> Out {
        if s == "-" {
            Out::Stdout
        } else {
            Out::Dir(PathBuf::from(s))
        }
    }
}

/// Writes confirmed pages as JSON Lines: one record per line (per-record
/// delivery) or one `{"records": [...]}` line per page (per-page delivery).
pub struct JsonlSink {
    out: Out,
    files: Mutex<HashMap<String, File>>,
}

impl JsonlSink {
    pub fn new(out: Out) -> Result<Self, Failure> {
        if let Out::Dir(d) = &out {
            std::fs::create_dir_all(d)
                .map_err(|e| Failure::runtime(format!("cannot create {}: {e}", d.display())))?;
        }
        Ok(Self {
            out,
            files: Mutex::new(HashMap::new()),
        })
    }

    pub fn path(&self, feed: &str) -> Option<PathBuf> {
        match &self.out {
            Out::Dir(d) => Some(d.join(format!("{feed}.jsonl"))),
            Out::Stdout => None,
        }
    }

    /// Write a page and make it durable before the caller commits its cursor.
    pub fn write_page(&self, page: &OutPage) -> Result<(), String> {
        let mut buf = Vec::with_capacity(page.records.iter().map(|r| r.body.len() + 1).sum());
        match page.per {
            DeliveryPer::Record => {
                for r in &page.records {
                    compact_json(&r.body, &mut buf);
                    buf.push(b'\n');
                }
            }
            DeliveryPer::Page => {
                compact_json(&page.page_body(), &mut buf);
                buf.push(b'\n');
            }
        }
        match &self.out {
            Out::Stdout => {
                let mut o = std::io::stdout().lock();
                o.write_all(&buf)
                    .and_then(|_| o.flush())
                    .map_err(|e| format!("stdout: {e}"))
            }
            Out::Dir(_) => {
                let path = self.path(&page.feed).unwrap_or_default();
                let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
                if !files.contains_key(&page.feed) {
                    let f = open_repaired(&path)
                        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
                    files.insert(page.feed.clone(), f);
                }
                let Some(f) = files.get_mut(&page.feed) else {
                    return Err("output file vanished".into());
                };
                let written = f.write_all(&buf).and_then(|_| f.sync_data());
                if let Err(e) = written {
                    // Part of the page may be in the file: reopen (and so
                    // repair) it before the retry appends the page again.
                    files.remove(&page.feed);
                    return Err(format!("cannot write {}: {e}", path.display()));
                }
                Ok(())
            }
        }
    }
}

/// Open `path` for appending, first cutting off a last line that a crash
/// left without its newline (its page was never committed).
fn open_repaired(path: &Path) -> std::io::Result<File> {
    let existed = path.exists();
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)?;
    if !existed && let Some(dir) = path.parent() {
        // A new file's name must survive a power loss as its lines do.
        File::open(dir)?.sync_all()?;
    }
    let len = f.metadata()?.len();
    if len > 0 {
        // Find the last newline, reading backwards in blocks.
        let mut end = len;
        let mut keep = 0;
        let mut block = vec![0u8; 64 * 1024];
        'scan: while end > 0 {
            let start = end.saturating_sub(block.len() as u64);
            let n = (end - start) as usize;
            f.seek(SeekFrom::Start(start))?;
            f.read_exact(&mut block[..n])?;
            for i in (0..n).rev() {
                if block[i] == b'\n' {
                    keep = start + i as u64 + 1;
                    break 'scan;
                }
            }
            end = start;
        }
        if keep < len {
            tracing::warn!(file = %path.display(), bytes = len - keep, "removing a partial last line left by a crash");
            f.set_len(keep)?;
            f.sync_data()?;
        }
    }
    f.seek(SeekFrom::End(0))?;
    Ok(f)
}

/// How an embedded run behaves.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub concurrency: usize,
    pub tick: Duration,
    pub lease: Duration,
    pub grace: Duration,
    pub max_attempts: u32,
    pub retry_base: Duration,
    /// Stop once every job has walked to the end of its stream (and is
    /// waiting for its schedule), or failed or is paused.
    pub once: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            concurrency: 8,
            tick: Duration::from_millis(500),
            lease: Duration::from_secs(60),
            grace: Duration::from_secs(25),
            max_attempts: 5,
            retry_base: Duration::from_secs(1),
            once: false,
        }
    }
}

/// Run the sync in this process until `shutdown` resolves (or, with
/// `once`, until every job has reached its end of stream). Returns the
/// failed jobs' errors when `once` ends with failures.
pub async fn sync(
    config: Config,
    owned: &Owned,
    sink: Arc<JsonlSink>,
    metrics: Metrics,
    opts: &EngineOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Failure> {
    let store: Arc<dyn StateStore> = owned.store.clone();
    let started_ms = now_ms();
    owned.clear_requests();
    // Chains that were running when the last process died: re-issue them now
    // from their stored cursors instead of waiting for their leases to expire.
    for (job, cp) in store.list().await.map_err(state_failure)? {
        if cp.phase == Phase::Running {
            let _ = store.release(&job, cp.epoch).await;
            tracing::info!(job = %job, seq = cp.seq, "resuming a chain left running by the last run");
        }
        if opts.once && cp.phase == Phase::Idle && cp.next_due_ms > started_ms {
            // --once: every job walks now, whatever its schedule says.
            let _ = store.control(&job, &tidemark_state::Control::Resume).await;
        }
    }
    let queue = MemoryQueue::new();
    let downstream = MemoryDownstream::new(move |page| sink.write_page(page));
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let coordinator = tidemark_coordinator::run(
        CoordinatorDeps {
            store: store.clone(),
            tasks: queue.clone() as Arc<dyn TaskQueue>,
            metrics: metrics.clone(),
        },
        config.clone(),
        CoordinatorOptions {
            id: format!("embedded-{}", std::process::id()),
            tick: opts.tick,
            lease: opts.lease,
            leader_ttl: Duration::from_secs(3600),
            ..CoordinatorOptions::default()
        },
        stopped(stop_rx.clone()),
    );
    let worker = tidemark_worker::run(
        WorkerDeps {
            store: store.clone(),
            tasks: queue.clone(),
            downstream: Arc::new(downstream),
            metrics,
        },
        WorkerOptions {
            concurrency: opts.concurrency.max(1),
            lease: opts.lease,
            grace: opts.grace,
            registry_refresh: Duration::from_millis(500),
        },
        stopped(stop_rx.clone()),
    );
    let feeds: Vec<String> = config.feeds.iter().map(|f| f.name.clone()).collect();
    // --once waits for a job of every feed that has partitions now (a
    // backfill whose windows have not begun has none yet).
    let feeds_with_jobs: Vec<String> = config
        .feeds
        .iter()
        .filter(|f| {
            f.partitions(chrono::Utc::now())
                .is_ok_and(|p| !p.is_empty())
        })
        .map(|f| f.name.clone())
        .collect();
    let watcher = async {
        tokio::pin!(shutdown);
        let mut every = tokio::time::interval(opts.tick.min(Duration::from_millis(250)));
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = every.tick() => {}
            }
            owned.serve_requests().await;
            if opts.once && all_done(&*store, &feeds_with_jobs, started_ms).await {
                tracing::info!("--once: every job reached its end of stream");
                break;
            }
        }
        let _ = stop_tx.send(true);
    };
    let (c, w, ()) = tokio::join!(coordinator, worker, watcher);
    c.map_err(state_failure)?;
    w.map_err(|e| Failure::runtime(e.to_string()))?;
    if opts.once {
        let failed: Vec<String> = store
            .list()
            .await
            .map_err(state_failure)?
            .into_iter()
            .filter(|(j, cp)| cp.phase == Phase::Failed && feeds.contains(&j.feed))
            .map(|(j, cp)| format!("{j}: {}", cp.last_error.unwrap_or_default()))
            .collect();
        if !failed.is_empty() {
            return Err(Failure::runtime(format!(
                "{} job(s) failed:\n  {}",
                failed.len(),
                failed.join("\n  ")
            )));
        }
    }
    Ok(())
}

/// True when every job of `feeds` exists and has finished a walk since
/// `since_ms` and waits for its schedule, or is failed or paused.
async fn all_done(store: &dyn StateStore, feeds: &[String], since_ms: u64) -> bool {
    let Ok(jobs) = store.list().await else {
        return false;
    };
    let now = now_ms();
    let mut seen: Vec<&str> = Vec::new();
    for (job, cp) in &jobs {
        let Some(f) = feeds.iter().find(|f| **f == job.feed) else {
            continue;
        };
        seen.push(f);
        let done = match cp.phase {
            Phase::Failed | Phase::Paused => true,
            Phase::Idle => {
                cp.last_end_of_stream_ms.is_some_and(|t| t >= since_ms) && cp.next_due_ms > now
            }
            Phase::Running => false,
        };
        if !done {
            return false;
        }
    }
    feeds.iter().all(|f| seen.contains(&f.as_str()))
}

pub(crate) fn state_failure(e: tidemark_state::StateError) -> Failure {
    Failure::runtime(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_off_last_line_is_removed_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f.jsonl");
        std::fs::write(&p, b"{\"a\":1}\n{\"a\":2}\n{\"a\":").expect("write");
        let mut f = open_repaired(&p).expect("open");
        f.write_all(b"{\"a\":3}\n").expect("append");
        drop(f);
        assert_eq!(
            std::fs::read_to_string(&p).expect("read"),
            "{\"a\":1}\n{\"a\":2}\n{\"a\":3}\n"
        );
        // A file of one partial line is emptied; a whole file is kept.
        std::fs::write(&p, b"{\"a\"").expect("write");
        drop(open_repaired(&p).expect("open"));
        assert_eq!(std::fs::read(&p).expect("read").len(), 0);
        std::fs::write(&p, b"{}\n").expect("write");
        drop(open_repaired(&p).expect("open"));
        assert_eq!(std::fs::read_to_string(&p).expect("read"), "{}\n");
    }

    #[test]
    fn one_process_owns_a_state_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sd = StateDir::new(dir.path());
        let first = sd.take().expect("take");
        assert!(first.is_some());
        assert!(sd.take().expect("take again").is_none());
        drop(first);
        assert!(sd.take().expect("take after release").is_some());
    }
}
