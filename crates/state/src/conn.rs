//! The store's connection to Redis: one server (`redis://`, `rediss://`),
//! reconnecting to the same address, or the master of a Sentinel
//! deployment (`redis+sentinel://`), re-found through the sentinels after a
//! failure; and the writes that wait for replicas (`WAIT`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::{
    AsyncConnectionConfig, Client, Cmd, FromRedisValue, Pipeline, RedisError, RedisFuture,
    RedisResult, ScriptInvocation, Value,
};
use tidemark_core::clock::now_ms;

use crate::sentinel::{
    NODE_CONNECT_TIMEOUT, NODE_RESPONSE_TIMEOUT, SentinelConn, Sentinels, connect_master,
    is_demoted, is_link_failure,
};

/// How many replicas must acknowledge a write that matters (a commit, a
/// new epoch, a lease change) before it is reported done, and how long to
/// wait for them (Redis `WAIT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitReplicas {
    pub replicas: u32,
    /// More than zero (`WAIT` with 0 would wait forever).
    pub timeout: Duration,
}

/// A connection the store's commands go through; cheap to clone.
#[derive(Clone)]
pub(crate) enum Conn {
    Direct {
        manager: ConnectionManager,
        client: Arc<Client>,
    },
    Sentinel(SentinelConn),
}

impl Conn {
    pub(crate) fn sentinels(s: Arc<Sentinels>) -> Self {
        Conn::Sentinel(SentinelConn(s))
    }

    /// A connection of its own to the master (for a write and its `WAIT`,
    /// which blocks the connection it is sent on), with the generation of
    /// the master it reaches (always 0 for one server).
    async fn open(&self, response_timeout: Duration) -> RedisResult<(u64, MultiplexedConnection)> {
        match self {
            Conn::Direct { client, .. } => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(NODE_CONNECT_TIMEOUT)
                    .set_response_timeout(response_timeout);
                Ok((
                    0,
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                ))
            }
            Conn::Sentinel(s) => {
                let m = s.0.master().await?;
                match connect_master(&m.client, response_timeout).await {
                    Ok(c) => Ok((m.generation, c)),
                    Err(e) => {
                        if is_demoted(&e) || is_link_failure(&e) {
                            s.0.forget(m.generation, &e).await;
                        }
                        Err(e)
                    }
                }
            }
        }
    }

    /// The current master's generation (0 for one server).
    async fn generation(&self) -> RedisResult<u64> {
        match self {
            Conn::Direct { .. } => Ok(0),
            Conn::Sentinel(s) => Ok(s.0.master().await?.generation),
        }
    }

    /// A connection of `generation` failed: find the master again.
    async fn forget(&self, generation: u64, why: &RedisError) {
        if let Conn::Sentinel(s) = self {
            s.0.forget(generation, why).await;
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Direct { manager, .. } => manager.req_packed_command(cmd),
            Conn::Sentinel(s) => s.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Direct { manager, .. } => manager.req_packed_commands(cmd, offset, count),
            Conn::Sentinel(s) => s.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Direct { manager, .. } => manager.get_db(),
            Conn::Sentinel(s) => s.get_db(),
        }
    }
}

/// Idle waited-write connections kept for reuse, at most.
const MAX_IDLE: usize = 64;
/// At most one warning about missing acknowledgements this often.
const WARN_EVERY_MS: u64 = 10_000;

/// Writes followed by `WAIT`. `WAIT` blocks the connection it is sent on
/// until the replicas answer (or the timeout), so each waited write takes a
/// connection of its own from a small pool: the store's other commands,
/// on the shared connection, never queue behind a wait.
pub(crate) struct Durable {
    wait: WaitReplicas,
    conn: Conn,
    idle: std::sync::Mutex<Vec<(u64, MultiplexedConnection)>>,
    /// Writes that fewer than `wait.replicas` replicas acknowledged in time.
    shortfalls: AtomicU64,
    /// Shortfalls not yet in a warning, and when the last warning was.
    unreported: AtomicU64,
    warned_ms: AtomicU64,
    /// Told of each shortfall (a role counts them in its metrics).
    on_shortfall: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl Durable {
    pub(crate) fn new(conn: Conn, wait: WaitReplicas) -> Self {
        Durable {
            wait: WaitReplicas {
                replicas: wait.replicas,
                timeout: wait.timeout.max(Duration::from_millis(1)),
            },
            conn,
            idle: std::sync::Mutex::new(Vec::new()),
            shortfalls: AtomicU64::new(0),
            unreported: AtomicU64::new(0),
            warned_ms: AtomicU64::new(0),
            on_shortfall: std::sync::OnceLock::new(),
        }
    }

    /// Call `f` at each shortfall from now on (the first call wins).
    pub(crate) fn on_shortfall(&self, f: Box<dyn Fn() + Send + Sync>) {
        let _ = self.on_shortfall.set(f);
    }

    pub(crate) fn wait(&self) -> WaitReplicas {
        self.wait
    }

    pub(crate) fn shortfalls(&self) -> u64 {
        self.shortfalls.load(Ordering::Relaxed)
    }

    async fn checkout(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        let generation = self.conn.generation().await?;
        loop {
            let next = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            match next {
                // Connections of an older master are dropped.
                Some((g, c)) if g == generation => return Ok((g, c)),
                Some(_) => continue,
                None => break,
            }
        }
        // The reply to WAIT may take the whole wait.
        self.conn
            .open(NODE_RESPONSE_TIMEOUT + self.wait.timeout)
            .await
    }

    fn checkin(&self, generation: u64, conn: MultiplexedConnection) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push((generation, conn));
        }
    }

    /// Run `inv` and then `WAIT` on the same connection. A write that fewer
    /// replicas acknowledged is still done: it is logged and counted. A
    /// write refused as `READONLY` (the master was demoted) is sent once
    /// more, to the master found again.
    pub(crate) async fn invoke<T: FromRedisValue>(
        &self,
        inv: &ScriptInvocation<'_>,
    ) -> RedisResult<T> {
        let mut retried = false;
        loop {
            let (generation, mut c) = self.checkout().await?;
            let out: T = match inv.invoke_async(&mut c).await {
                Ok(v) => v,
                Err(e) => {
                    let demoted = is_demoted(&e);
                    if demoted || is_link_failure(&e) {
                        self.conn.forget(generation, &e).await;
                    } else {
                        self.checkin(generation, c);
                    }
                    if demoted && !retried {
                        retried = true;
                        continue;
                    }
                    return Err(e);
                }
            };
            let acked: u32 = match redis::cmd("WAIT")
                .arg(self.wait.replicas)
                .arg(self.wait.timeout.as_millis() as u64)
                .query_async(&mut c)
                .await
            {
                Ok(n) => n,
                Err(e) => {
                    // The write may or may not have been applied, like a
                    // write whose reply was lost: the caller retries.
                    if is_link_failure(&e) {
                        self.conn.forget(generation, &e).await;
                    }
                    return Err(e);
                }
            };
            self.checkin(generation, c);
            if acked < self.wait.replicas {
                self.shortfall(acked);
            }
            return Ok(out);
        }
    }

    fn shortfall(&self, acked: u32) {
        self.shortfalls.fetch_add(1, Ordering::Relaxed);
        if let Some(f) = self.on_shortfall.get() {
            f();
        }
        let unreported = self.unreported.fetch_add(1, Ordering::Relaxed) + 1;
        let now = now_ms();
        let last = self.warned_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= WARN_EVERY_MS
            && self
                .warned_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.unreported.fetch_sub(unreported, Ordering::Relaxed);
            tracing::warn!(
                acked,
                wanted = self.wait.replicas,
                timeout_ms = self.wait.timeout.as_millis() as u64,
                writes = unreported,
                "Redis writes acknowledged by fewer replicas than --redis-wait-replicas \
                 (applied on the master, but a failover now could lose them)"
            );
        } else {
            tracing::debug!(
                acked,
                wanted = self.wait.replicas,
                "a Redis write acknowledged by fewer replicas than wanted"
            );
        }
    }
}
