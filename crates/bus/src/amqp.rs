//! RabbitMQ: topology, supervision, page tasks and downstream publishing.
//!
//! A supervisor task owns the connection. The broker URL may list several
//! nodes of a cluster ([`crate::endpoints`]): on every connection and
//! every reconnection the supervisor tries them in a fresh random order
//! (the node it just lost last) until one takes the connection, the
//! topology declarations and the channels. It declares the topology
//! (idempotent, so whichever role starts first creates it, on whichever
//! node), opens a confirm-mode publishing channel and, for consumers, a
//! consuming channel with bounded prefetch, then watches the connection and
//! both channels. On any error it drops that generation and starts over.
//! Deliveries taken on a lost channel keep their old acker, so acking them
//! fails (`Abandoned`) instead of touching the new channel; the broker
//! redelivers them. Publishes whose confirms were pending fail with the
//! connection (the client rejects every pending confirm of a channel that
//! goes away), or at the confirm timeout at the latest: never confirmed.
//!
//! Topology under a prefix `P` (default `tidemark`), every queue a quorum
//! queue (replicated; it survives the loss of a minority of its replicas):
//! - `P.tasks`: page tasks, `x-delivery-limit`, dead-letters to `P.dead`;
//! - `P.delay.<ms>`: one queue per delay tier with `x-message-ttl`,
//!   dead-lettering (at least once) back to `P.tasks`: a delayed retry;
//! - `P.dead`: dead letters; tidemark's own carry `x-reason` and
//!   `x-last-error` headers, the broker's carry `x-death` (the latest
//!   reason first, e.g. `delivery_limit`);
//! - the downstream topic exchange (default `tidemark.records`), durable.
//!
//! Older versions kept the delay tiers in classic queues named
//! `P.retry.<ms>`, which live on one node: a cluster could not declare them
//! while that node was down. Nothing declares those any more; what waits in
//! them still expires into `P.tasks` by their own arguments.
//!
//! Every connection is opened through [`open_connection`]'s path: `amqps://`
//! goes over rustls, trusting the system's roots plus the configured CA bundle.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties,
    DefaultConnectionBuilder, ExchangeKind, PublisherConfirm,
};
use tidemark_core::config::DeliveryPer;
use tokio::sync::{Mutex, Semaphore, mpsc, watch};

use crate::endpoints::shuffled;
pub use crate::endpoints::{AmqpUrl, Endpoint};
use crate::message::Acker;
use crate::{
    BusError, DeadLetter, Downstream, OutPage, PageTask, TaskDelivery, TaskQueue, routing_key,
};

/// How to reach and lay out the broker.
#[derive(Debug, Clone)]
pub struct BusConfig {
    /// The broker's URL, or a comma-separated list of a cluster's nodes
    /// ([`crate::endpoints`]); its `Debug` hides every password.
    pub url: AmqpUrl,
    /// PEM CA certificates an `amqps://` broker's certificate may chain to,
    /// besides the system's roots (`--tls-ca-file`).
    pub tls_ca_pem: Option<String>,
    /// Prefix of every queue name, so deployments can share a broker.
    pub prefix: String,
    /// The downstream topic exchange.
    pub records_exchange: String,
    /// Deliveries of one task before the broker dead-letters it.
    pub delivery_limit: u32,
    /// Unacked page tasks one consumer may hold.
    pub prefetch: u16,
    /// Longest wait for the publisher confirms of one page.
    pub confirm_timeout: Duration,
    /// Delays a retried task can wait, in ascending order; a request rounds up.
    pub retry_tiers: Vec<Duration>,
    /// Longest wait for a connection before an operation fails.
    pub connect_wait: Duration,
    /// Longest wait for one node of the list to take a connection (TCP,
    /// TLS, the AMQP handshake) before the next one is tried; a URL's
    /// `connection_timeout` query parameter (ms) overrides it. The topology
    /// declarations that follow may take up to `confirm_timeout`.
    pub connect_timeout: Duration,
    /// Replicas each quorum queue starts with when it is created
    /// (`x-quorum-initial-group-size`); `None`: the broker's default (3, or
    /// the cluster's size when smaller). RabbitMQ compares it on every
    /// declaration, so every role must be given the same value, and the
    /// value of a queue's creation: changing it for existing queues fails
    /// (see [`crate::BusError::Topology`]).
    pub quorum_initial_group_size: Option<u32>,
    /// Downstream bytes awaiting the broker's confirms at once, across all
    /// pages; a page that would exceed it waits its turn (first come, first
    /// served). Each record counts its body plus [`MESSAGE_OVERHEAD`], in
    /// per-page delivery too (a generous bound on the page message).
    /// Bounds a worker's memory at high concurrency without slowing it: the
    /// broker, not the number of pages in flight, is the limit.
    pub max_unconfirmed_bytes: usize,
    /// Messages awaiting the broker's confirms at once, likewise. The client
    /// (lapin 4) scans every pending confirm on each acknowledgement from
    /// the broker, so thousands pending cost CPU that the broker needs.
    pub max_unconfirmed_messages: usize,
}

impl BusConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: AmqpUrl::new(url),
            tls_ca_pem: None,
            prefix: "tidemark".into(),
            records_exchange: "tidemark.records".into(),
            delivery_limit: 10,
            prefetch: 16,
            confirm_timeout: Duration::from_secs(30),
            retry_tiers: [1, 5, 30, 120, 600]
                .into_iter()
                .map(Duration::from_secs)
                .collect(),
            connect_wait: Duration::from_secs(10),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            quorum_initial_group_size: None,
            max_unconfirmed_bytes: 16 * 1024 * 1024,
            max_unconfirmed_messages: 4096,
        }
    }
    pub fn tasks_queue(&self) -> String {
        format!("{}.tasks", self.prefix)
    }
    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.prefix)
    }
    /// The quorum queue of a delay tier.
    pub fn retry_queue(&self, tier: Duration) -> String {
        format!("{}.delay.{}", self.prefix, tier.as_millis())
    }
    /// The classic queue older versions kept a delay tier in (module doc):
    /// nothing declares it any more; delete it once it is empty.
    pub fn legacy_retry_queue(&self, tier: Duration) -> String {
        format!("{}.retry.{}", self.prefix, tier.as_millis())
    }
    /// Every queue this layout declares: tasks, dead letters, retry tiers.
    pub fn queue_names(&self) -> Vec<String> {
        let mut q = vec![self.tasks_queue(), self.dead_queue()];
        q.extend(self.retry_tiers.iter().map(|t| self.retry_queue(*t)));
        q
    }
    /// The tier a requested delay waits in: the smallest not shorter than it.
    pub fn tier_for(&self, delay: Duration) -> Duration {
        self.retry_tiers
            .iter()
            .copied()
            .find(|t| *t >= delay)
            .or_else(|| self.retry_tiers.last().copied())
            .unwrap_or(delay)
    }
}

/// [`BusConfig::connect_timeout`]'s default, and [`open_connection`]'s.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

struct Generation {
    connection: Connection,
    /// The node of the list it is connected to.
    endpoint: Endpoint,
    /// Confirm-mode channel shared by concurrent page publishes: each awaits
    /// its own messages' confirms; order holds within a page, and a partition
    /// never has two pages in flight (one chain per job).
    publish: Channel,
}

/// What one downstream message costs in the publish window beyond its body:
/// the client's bookkeeping of its pending confirm, its frames and headers.
pub const MESSAGE_OVERHEAD: usize = 512;

/// A publish window: `size` units (bytes or messages) awaiting confirms at
/// once, handed out first come, first served.
struct Window {
    permits: Arc<Semaphore>,
    size: u32,
}

impl Window {
    fn new(size: usize) -> Self {
        let size = u32::try_from(size.max(1)).unwrap_or(u32::MAX);
        Window {
            permits: Arc::new(Semaphore::new(size as usize)),
            size,
        }
    }

    /// Wait for `n` units; more than the whole window takes the whole window.
    async fn acquire(&self, n: usize) -> Result<tokio::sync::SemaphorePermit<'_>, BusError> {
        let n = n.min(self.size as usize) as u32;
        self.permits
            .acquire_many(n)
            .await
            .map_err(|_| BusError::Closed)
    }

    /// `n` units if they are free now (at most the whole window).
    fn try_reserve(&self, n: usize) -> Option<crate::Reservation> {
        let n = n.min(self.size as usize) as u32;
        self.permits
            .clone()
            .try_acquire_many_owned(n)
            .ok()
            .map(crate::Reservation::held)
    }
}

struct Shared {
    cfg: BusConfig,
    /// See `max_unconfirmed_bytes`.
    window_bytes: Window,
    /// See `max_unconfirmed_messages`.
    window_messages: Window,
    current: watch::Receiver<Option<Arc<Generation>>>,
    deliveries: Option<Mutex<mpsc::Receiver<TaskDelivery>>>,
    stop: watch::Sender<bool>,
    /// Why the supervisor's last attempt to connect failed, while it has
    /// not connected since: what `start` reports when it gives up waiting.
    last_error: watch::Receiver<Option<LastError>>,
}

/// Why the last attempt to connect failed.
#[derive(Debug, Clone)]
struct LastError {
    text: String,
    /// A topology mismatch: the same on every node, and not fixed by waiting.
    topology: bool,
}

/// Page tasks and downstream publishing on RabbitMQ.
#[derive(Clone)]
pub struct AmqpBus {
    shared: Arc<Shared>,
}

fn s(v: &str) -> ShortString {
    v.into()
}

fn long(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v.to_string()))
}

impl AmqpBus {
    /// Start the supervisor. With `consume`, also consume page tasks.
    /// Returns once connected for the first time (or after `connect_wait`);
    /// at once for a URL that does not parse or a topology that differs
    /// from the one on the broker ([`BusError::Topology`]).
    pub async fn start(cfg: BusConfig, consume: bool) -> Result<Self, BusError> {
        let endpoints = cfg.url.endpoints()?;
        let (gen_tx, gen_rx) = watch::channel(None);
        let (stop_tx, stop_rx) = watch::channel(false);
        let (error_tx, error_rx) = watch::channel(None);
        let (del_tx, del_rx) = mpsc::channel(usize::from(cfg.prefetch.max(1)));
        let bus = AmqpBus {
            shared: Arc::new(Shared {
                window_bytes: Window::new(cfg.max_unconfirmed_bytes),
                window_messages: Window::new(cfg.max_unconfirmed_messages),
                cfg: cfg.clone(),
                current: gen_rx,
                deliveries: consume.then(|| Mutex::new(del_rx)),
                stop: stop_tx,
                last_error: error_rx,
            }),
        };
        let supervisor = Supervisor {
            current: gen_tx,
            deliveries: consume.then_some(del_tx),
            stop: stop_rx,
            last_error: error_tx,
        };
        tokio::spawn(supervise(cfg, endpoints, supervisor));
        let mut errors = bus.shared.last_error.clone();
        let mismatch = async move {
            errors
                .wait_for(|e| e.as_ref().is_some_and(|e| e.topology))
                .await
                .ok()
                .and_then(|e| e.clone())
        };
        tokio::select! {
            connected = bus.generation() => match connected {
                Ok(_) => Ok(bus),
                Err(BusError::NotConnected) => {
                    let why = bus.shared.last_error.borrow().clone();
                    let _ = bus.shared.stop.send(true);
                    Err(why.map_or(BusError::NotConnected, |e| {
                        if e.topology {
                            BusError::Topology(e.text)
                        } else {
                            BusError::Unreachable(e.text)
                        }
                    }))
                }
                Err(e) => Err(e),
            },
            Some(e) = mismatch => {
                let _ = bus.shared.stop.send(true);
                Err(BusError::Topology(e.text))
            }
        }
    }

    pub fn config(&self) -> &BusConfig {
        &self.shared.cfg
    }

    /// True while connected (for readiness probes).
    pub fn is_connected(&self) -> bool {
        self.shared.current.borrow().is_some()
    }

    /// The node of the list the bus is connected to (its URL without the
    /// password), while connected.
    pub fn connected_to(&self) -> Option<String> {
        self.shared
            .current
            .borrow()
            .as_ref()
            .map(|g| g.endpoint.redacted().to_string())
    }

    /// Stop the supervisor and close the connection; unacked deliveries go back to the queue.
    pub async fn close(&self) {
        let _ = self.shared.stop.send(true);
        let generation = self.shared.current.borrow().clone();
        if let Some(g) = generation {
            let closing = g.connection.close(200, s("tidemark shutting down"));
            let _ = tokio::time::timeout(Duration::from_secs(5), closing).await;
        }
    }

    async fn generation(&self) -> Result<Arc<Generation>, BusError> {
        let mut rx = self.shared.current.clone();
        let wait = rx.wait_for(|g| g.is_some());
        match tokio::time::timeout(self.shared.cfg.connect_wait, wait).await {
            Ok(Ok(g)) => g.clone().ok_or(BusError::NotConnected),
            Ok(Err(_)) => Err(BusError::Closed),
            Err(_) => Err(BusError::NotConnected),
        }
    }

    /// Publish `payloads` and wait for all their confirms.
    async fn publish_confirmed(
        &self,
        exchange: &str,
        rk: &str,
        messages: impl Iterator<Item = (bytes::Bytes, BasicProperties)>,
        mandatory: bool,
    ) -> Result<(), BusError> {
        let g = self.generation().await?;
        let timeout = self.shared.cfg.confirm_timeout;
        let work = async {
            let mut confirms: Vec<PublisherConfirm> = Vec::new();
            for (body, props) in messages {
                let c = g
                    .publish
                    .basic_publish(
                        s(exchange),
                        s(rk),
                        BasicPublishOptions {
                            mandatory,
                            immediate: false,
                        },
                        &body,
                        props,
                    )
                    .await?;
                confirms.push(c);
            }
            // A confirm pending when the channel or connection goes away
            // comes back as an error (lapin rejects every pending one), so
            // the `?` fails the whole publish: never taken for an ack.
            let (mut nacked, mut returned, mut unconfirmed) = (0usize, 0usize, 0usize);
            for c in confirms {
                match c.await? {
                    Confirmation::Ack(None) => {}
                    Confirmation::Ack(Some(_)) => returned += 1,
                    Confirmation::Nack(_) => nacked += 1,
                    Confirmation::NotRequested => unconfirmed += 1,
                }
            }
            if unconfirmed > 0 {
                return Err(BusError::Unconfirmed(unconfirmed));
            }
            if returned > 0 {
                return Err(BusError::Unroutable {
                    count: returned,
                    routing_key: rk.to_string(),
                });
            }
            if nacked > 0 {
                // A quorum queue's new leader can keep refusing a channel
                // whose first publish fell in its election (RabbitMQ
                // 3.10, seen in the private cluster's test): close this
                // channel, so the supervisor opens a new one, and the
                // publish is retried there, not on a channel that nacks.
                let closing = g.publish.close(200, s("nacked: opening a new channel"));
                let _ = tokio::time::timeout(Duration::from_secs(1), closing).await;
                return Err(BusError::Nacked(nacked));
            }
            Ok(())
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(BusError::ConfirmTimeout(timeout)),
        }
    }
}

fn persistent() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(s("application/json"))
}

#[async_trait]
impl Downstream for AmqpBus {
    async fn publish_page(&self, page: &OutPage) -> Result<(), BusError> {
        self.publish_page_in_window(page, None).await
    }

    async fn publish_page_then(
        &self,
        page: &OutPage,
        sent: tokio::sync::oneshot::Sender<()>,
    ) -> Result<(), BusError> {
        self.publish_page_in_window(page, Some(sent)).await
    }

    fn try_reserve(&self, bytes: usize) -> Option<crate::Reservation> {
        self.shared.window_bytes.try_reserve(bytes)
    }
}

impl AmqpBus {
    /// Publish `page` within the unconfirmed windows, telling `sent` once
    /// it has its room.
    async fn publish_page_in_window(
        &self,
        page: &OutPage,
        sent: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Result<(), BusError> {
        // Messages first, then bytes, in every publish: no two pages can
        // each hold what the other waits for.
        let messages = match page.per {
            DeliveryPer::Record => page.records.len(),
            DeliveryPer::Page => 1,
        };
        let _messages = self.shared.window_messages.acquire(messages).await?;
        let bytes = page
            .records
            .iter()
            .map(|r| r.body.len() + MESSAGE_OVERHEAD)
            .sum();
        let _bytes = self.shared.window_bytes.acquire(bytes).await?;
        if let Some(sent) = sent {
            let _ = sent.send(());
        }
        let rk = routing_key(&page.feed, page.tenant.as_deref(), &page.partition);
        let base_headers = |h: &mut FieldTable| {
            h.insert(s("x-feed"), long(&page.feed));
            if let Some(t) = &page.tenant {
                h.insert(s("x-tenant"), long(t));
            }
            h.insert(s("x-partition"), long(&page.partition));
            h.insert(s("x-page-seq"), AMQPValue::LongLongInt(page.seq as i64));
            if let Some(p) = &page.parent {
                h.insert(s("x-parent-feed"), long(&p.feed));
                if let Some(k) = &p.key {
                    h.insert(s("x-parent-key"), long(k));
                }
            }
        };
        let exchange = self.shared.cfg.records_exchange.clone();
        match page.per {
            DeliveryPer::Record => {
                let msgs = page.records.iter().map(|r| {
                    let mut h = FieldTable::default();
                    base_headers(&mut h);
                    h.insert(s("x-record-key"), long(&r.key));
                    if let Some(k) = &r.parent_key {
                        h.insert(s("x-parent-key"), long(k));
                    }
                    (
                        r.body.clone(),
                        persistent()
                            .with_message_id(s(&r.message_id))
                            .with_headers(h),
                    )
                });
                self.publish_confirmed(&exchange, &rk, msgs, true).await
            }
            DeliveryPer::Page => {
                let mut h = FieldTable::default();
                base_headers(&mut h);
                h.insert(
                    s("x-record-count"),
                    AMQPValue::LongLongInt(page.records.len() as i64),
                );
                let props = persistent()
                    .with_message_id(s(&page.page_message_id))
                    .with_headers(h);
                self.publish_confirmed(
                    &exchange,
                    &rk,
                    std::iter::once((page.page_body().into(), props)),
                    true,
                )
                .await
            }
        }
    }
}

#[async_trait]
impl TaskQueue for AmqpBus {
    async fn publish_task(&self, task: &PageTask, delay: Option<Duration>) -> Result<(), BusError> {
        let body = serde_json::to_vec(task).map_err(|e| BusError::Encode(e.to_string()))?;
        let cfg = &self.shared.cfg;
        let queue = match delay {
            Some(d) if !d.is_zero() => cfg.retry_queue(cfg.tier_for(d)),
            _ => cfg.tasks_queue(),
        };
        self.publish_confirmed(
            "",
            &queue,
            std::iter::once((body.into(), persistent())),
            true,
        )
        .await
    }

    async fn next_delivery(&self) -> Result<TaskDelivery, BusError> {
        let Some(rx) = &self.shared.deliveries else {
            return Err(BusError::Closed);
        };
        rx.lock().await.recv().await.ok_or(BusError::Closed)
    }

    async fn dead_letter(
        &self,
        delivery: TaskDelivery,
        reason: &str,
        error: &str,
    ) -> Result<(), BusError> {
        let mut h = FieldTable::default();
        h.insert(s("x-reason"), long(reason));
        h.insert(
            s("x-last-error"),
            long(&error.chars().take(4000).collect::<String>()),
        );
        let props = persistent().with_headers(h);
        let dead = self.shared.cfg.dead_queue();
        self.publish_confirmed(
            "",
            &dead,
            std::iter::once((delivery.body.clone(), props)),
            true,
        )
        .await?;
        delivery.ack().await
    }

    async fn take_dead_letter(&self) -> Result<Option<DeadLetter>, BusError> {
        let g = self.generation().await?;
        let get = g.publish.basic_get(
            s(&self.shared.cfg.dead_queue()),
            BasicGetOptions { no_ack: true },
        );
        let got = tokio::time::timeout(self.shared.cfg.confirm_timeout, get)
            .await
            .map_err(|_| BusError::ConfirmTimeout(self.shared.cfg.confirm_timeout))??;
        Ok(got.map(|m| {
            let headers = m.delivery.properties.headers().clone().unwrap_or_default();
            let text = |k: &str| match headers.inner().get(k) {
                Some(AMQPValue::LongString(v)) => {
                    Some(String::from_utf8_lossy(v.as_bytes()).into_owned())
                }
                Some(AMQPValue::ShortString(v)) => Some(v.as_str().to_string()),
                _ => None,
            };
            // The broker's latest death first: `x-death` lists the most
            // recent one first, while `x-first-death-reason` of a task that
            // waited in a delay tier before is that tier's `expired`.
            let latest = match headers.inner().get("x-death") {
                Some(AMQPValue::FieldArray(deaths)) => match deaths.as_slice().first() {
                    Some(AMQPValue::FieldTable(death)) => match death.inner().get("reason") {
                        Some(AMQPValue::LongString(v)) => {
                            Some(String::from_utf8_lossy(v.as_bytes()).into_owned())
                        }
                        Some(AMQPValue::ShortString(v)) => Some(v.as_str().to_string()),
                        _ => None,
                    },
                    _ => None,
                },
                _ => None,
            };
            let reason = text("x-reason")
                .or(latest)
                .or_else(|| text("x-first-death-reason"))
                .unwrap_or_else(|| "unknown".into());
            DeadLetter {
                body: bytes::Bytes::from(m.delivery.data.clone()),
                reason,
                last_error: text("x-last-error"),
            }
        }))
    }
}

/// Delete every queue of `cfg`'s layout and its records exchange: the
/// teardown of a throwaway deployment (tests, `tidemark bench`). Messages in
/// them are lost; never point this at a deployment in use.
pub async fn delete_topology(cfg: &BusConfig) -> Result<(), BusError> {
    let conn = open_connection(&cfg.url, cfg.tls_ca_pem.as_deref()).await?;
    let ch = conn.create_channel().await?;
    for q in cfg.queue_names() {
        ch.queue_delete(s(&q), QueueDeleteOptions::default())
            .await?;
    }
    ch.exchange_delete(s(&cfg.records_exchange), Default::default())
        .await?;
    let _ = conn.close(200, s("topology deleted")).await;
    Ok(())
}

/// Open a connection to the broker at `url`: the one way tidemark connects
/// to RabbitMQ. `url` may list several nodes ([`crate::endpoints`]): they
/// are tried in a fresh random order until one takes the connection, each
/// for at most [`DEFAULT_CONNECT_TIMEOUT`] (or its `connection_timeout`).
/// `amqps://` goes over rustls and trusts the system's roots plus the PEM
/// CA certificates in `ca_pem`, if any (which `amqp://` does not use).
/// Certificates that do not parse in `ca_pem` are skipped, so check a
/// bundle before handing it over (the CLI does).
pub async fn open_connection(url: &str, ca_pem: Option<&str>) -> Result<Connection, BusError> {
    let endpoints = AmqpUrl::new(url).endpoints()?;
    let (connection, endpoint) = connect_any(&endpoints, ca_pem, DEFAULT_CONNECT_TIMEOUT).await?;
    tracing::debug!(endpoint = endpoint.redacted(), "connected to the broker");
    Ok(connection)
}

/// The first of `endpoints`, in a fresh random order, that takes a connection.
async fn connect_any(
    endpoints: &[Endpoint],
    ca_pem: Option<&str>,
    timeout: Duration,
) -> Result<(Connection, Endpoint), BusError> {
    let mut failures = Failures::default();
    for ep in shuffled(endpoints, None) {
        match open_endpoint(&ep, ca_pem, timeout).await {
            Ok(c) => return Ok((c, ep)),
            Err(e) => failures.add(&ep, e, endpoints.len()),
        }
    }
    Err(failures.into_error())
}

/// What went wrong with each node tried.
#[derive(Default)]
struct Failures {
    each: Vec<(String, BusError)>,
}

impl Failures {
    fn add(&mut self, ep: &Endpoint, e: BusError, of: usize) {
        if of > 1 {
            tracing::warn!(endpoint = ep.redacted(), error = %e, "cannot use this broker node; trying the next one");
        }
        self.each.push((ep.redacted().to_string(), e));
    }
    /// One node: its own error, as before lists. Several: each one's.
    fn into_error(mut self) -> BusError {
        match self.each.len() {
            0 => BusError::NotConnected,
            1 => self.each.pop().map_or(BusError::NotConnected, |(_, e)| e),
            _ => BusError::NoNode(
                self.each
                    .iter()
                    .map(|(ep, e)| format!("{ep}: {e}"))
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
        }
    }
}

/// Connect to one node, within its `connection_timeout` or `timeout`. A
/// connection that comes after the timeout is closed as it is dropped.
async fn open_endpoint(
    ep: &Endpoint,
    ca_pem: Option<&str>,
    timeout: Duration,
) -> Result<Connection, BusError> {
    let timeout = ep.connection_timeout().unwrap_or(timeout);
    let tls = OwnedTLSConfig {
        identity: None,
        cert_chain: ca_pem.map(str::to_owned),
    };
    let builder = DefaultConnectionBuilder::new()?
        .with_uri_str(ep.url().to_owned())
        .with_properties(ConnectionProperties::default())
        .with_tls_config(tls);
    match tokio::time::timeout(timeout, builder.connect()).await {
        Ok(connected) => Ok(connected?),
        Err(_) => Err(BusError::ConnectTimeout(timeout)),
    }
}

/// Declare the downstream records exchange: topic, durable. Idempotent.
pub async fn declare_records_exchange(ch: &Channel, name: &str) -> Result<(), BusError> {
    ch.exchange_declare(
        s(name),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(|e| mismatch(e, Declared::Exchange, name))?;
    Ok(())
}

/// What a declaration was of, for [`mismatch`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Declared {
    Exchange,
    Queue,
}

/// A declaration's error; PRECONDITION_FAILED (the broker has `name` with
/// other arguments, or refuses these) becomes [`BusError::Topology`], with
/// what differs (the broker's words) and how to migrate.
fn mismatch(e: lapin::Error, what: Declared, name: &str) -> BusError {
    let lapin::ErrorKind::ProtocolError(amqp) = e.kind() else {
        return e.into();
    };
    if amqp.get_id() != 406 {
        return e.into();
    }
    let broker = amqp.get_message().as_str();
    let kind = match what {
        Declared::Exchange => "exchange",
        Declared::Queue => "queue",
    };
    if !broker.contains("inequivalent") {
        // Not a difference with what exists: arguments this broker does
        // not take (quorum queues with a message TTL and at-least-once
        // dead-lettering need RabbitMQ 3.10 or later).
        return BusError::Topology(format!(
            "the broker refused to declare the {kind} `{name}` ({broker}); \
             tidemark needs RabbitMQ 3.10 or later"
        ));
    }
    let how = match what {
        Declared::Exchange => {
            "tidemark needs a durable topic exchange there: name another one \
             (--records-exchange), or delete this one (its bindings go with it) \
             and let tidemark declare it again"
        }
        Declared::Queue if broker.contains("'x-quorum-initial-group-size'") => {
            "the initial group size counts only when a queue is created, but \
             RabbitMQ compares it on every declaration: give every role the value \
             the queue was created with (--quorum-initial-group-size, or none if \
             it was created without), and change an existing queue's replicas with \
             `rabbitmq-queues add_member`/`delete_member` (or `grow`/`shrink`)"
        }
        Declared::Queue if broker.contains("'x-queue-type'") => {
            "tidemark's queues are quorum queues and this one is of another type \
             (an older setup, or made by hand). To migrate: stop every tidemark \
             role, let the queue drain or move its messages to a new quorum queue \
             (a shovel), delete it (`rabbitmqctl delete_queue NAME`), then start \
             the roles, which declare it again; or start afresh under another \
             --queue-prefix"
        }
        Declared::Queue => {
            "it was declared otherwise (by another tidemark version, with other \
             settings, as a classic queue, or by hand; the broker names only the \
             first difference; tidemark's queues are quorum queues). Give every \
             role the settings it was declared with; or migrate: stop every \
             tidemark role, let the queue drain or move its messages to a new \
             quorum queue (a shovel), delete it (`rabbitmqctl delete_queue NAME`), \
             then start the roles, which declare it again; or start afresh under \
             another --queue-prefix"
        }
    };
    BusError::Topology(format!(
        "the {kind} `{name}` exists with other arguments than tidemark declares \
         (the broker: {broker}): {how}"
    ))
}

/// A quorum queue's arguments: the type, and the initial group size if set.
fn quorum(cfg: &BusConfig) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(s("x-queue-type"), long("quorum"));
    if let Some(n) = cfg.quorum_initial_group_size {
        args.insert(
            s("x-quorum-initial-group-size"),
            AMQPValue::LongLongInt(i64::from(n)),
        );
    }
    args
}

/// Declare everything; safe to run again, from every role, on every node
/// of a cluster, and after a reconnection: every queue is a durable quorum
/// queue (its metadata and replicas are the cluster's, not one node's)
/// declared with the same arguments each time, and the exchange likewise.
async fn declare(ch: &Channel, cfg: &BusConfig) -> Result<(), BusError> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    declare_records_exchange(ch, &cfg.records_exchange).await?;
    let queue = |name: String, args: FieldTable| async move {
        ch.queue_declare(s(&name), durable, args)
            .await
            .map_err(|e| mismatch(e, Declared::Queue, &name))
    };
    queue(cfg.dead_queue(), quorum(cfg)).await?;
    let mut tasks = quorum(cfg);
    tasks.insert(
        s("x-delivery-limit"),
        AMQPValue::LongLongInt(i64::from(cfg.delivery_limit)),
    );
    tasks.insert(s("x-dead-letter-exchange"), long(""));
    tasks.insert(s("x-dead-letter-routing-key"), long(&cfg.dead_queue()));
    queue(cfg.tasks_queue(), tasks).await?;
    for tier in &cfg.retry_tiers {
        let mut delay = quorum(cfg);
        delay.insert(
            s("x-message-ttl"),
            AMQPValue::LongLongInt(tier.as_millis() as i64),
        );
        delay.insert(s("x-dead-letter-exchange"), long(""));
        delay.insert(s("x-dead-letter-routing-key"), long(&cfg.tasks_queue()));
        // An expired task moves to the tasks queue only once the tasks
        // queue has it (the default, at-most-once, could drop it while the
        // tasks queue elects a leader); that strategy needs reject-publish,
        // which does nothing here: the queue has no length limit.
        delay.insert(s("x-dead-letter-strategy"), long("at-least-once"));
        delay.insert(s("x-overflow"), long("reject-publish"));
        queue(cfg.retry_queue(*tier), delay).await?;
    }
    Ok(())
}

/// Connect to one of the nodes, in a fresh random order with `lost_on`
/// (where the last connection was lost) last, and set up there. A topology
/// mismatch stops the round: every node would say the same.
async fn connect(
    cfg: &BusConfig,
    endpoints: &[Endpoint],
    lost_on: Option<&Endpoint>,
    deliveries: Option<&mpsc::Sender<TaskDelivery>>,
) -> Result<(Arc<Generation>, Option<tokio::task::JoinHandle<()>>), BusError> {
    let mut failures = Failures::default();
    for ep in shuffled(endpoints, lost_on) {
        match connect_to(cfg, &ep, deliveries).await {
            Ok(connected) => return Ok(connected),
            Err(e @ BusError::Topology(_)) => return Err(e),
            Err(e) => failures.add(&ep, e, endpoints.len()),
        }
    }
    Err(failures.into_error())
}

/// Connect to `ep`, declare the topology, open the channels: a generation.
async fn connect_to(
    cfg: &BusConfig,
    ep: &Endpoint,
    deliveries: Option<&mpsc::Sender<TaskDelivery>>,
) -> Result<(Arc<Generation>, Option<tokio::task::JoinHandle<()>>), BusError> {
    let connection = open_endpoint(ep, cfg.tls_ca_pem.as_deref(), cfg.connect_timeout).await?;
    let setting_up =
        tokio::time::timeout(cfg.confirm_timeout, set_up(&connection, cfg, deliveries));
    let failed = match setting_up.await {
        Ok(Ok((publish, forwarder))) => {
            return Ok((
                Arc::new(Generation {
                    connection,
                    endpoint: ep.clone(),
                    publish,
                }),
                forwarder,
            ));
        }
        Ok(Err(e)) => e,
        Err(_) => BusError::ConfirmTimeout(cfg.confirm_timeout),
    };
    let closing = connection.close(200, s("tidemark: setting up failed"));
    let _ = tokio::time::timeout(Duration::from_secs(1), closing).await;
    Err(failed)
}

/// On a new connection: the topology, the confirm-mode publishing channel
/// and, for a consumer, the consuming channel and its forwarder.
async fn set_up(
    connection: &Connection,
    cfg: &BusConfig,
    deliveries: Option<&mpsc::Sender<TaskDelivery>>,
) -> Result<(Channel, Option<tokio::task::JoinHandle<()>>), BusError> {
    let publish = connection.create_channel().await?;
    declare(&publish, cfg).await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let forwarder = match deliveries {
        None => None,
        Some(tx) => {
            let ch = connection.create_channel().await?;
            ch.basic_qos(cfg.prefetch, BasicQosOptions::default())
                .await?;
            let mut consumer = ch
                .basic_consume(
                    s(&cfg.tasks_queue()),
                    s(""),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            let tx = tx.clone();
            Some(tokio::spawn(async move {
                let _channel = ch;
                while let Some(d) = consumer.next().await {
                    let Ok(d) = d else { break };
                    let delivery = TaskDelivery {
                        body: bytes::Bytes::from(d.data),
                        redelivered: d.redelivered,
                        acker: Acker::Amqp(d.acker),
                    };
                    if tx.send(delivery).await.is_err() {
                        break;
                    }
                }
            }))
        }
    };
    Ok((publish, forwarder))
}

/// The supervisor's ends of the bus's channels.
struct Supervisor {
    current: watch::Sender<Option<Arc<Generation>>>,
    deliveries: Option<mpsc::Sender<TaskDelivery>>,
    stop: watch::Receiver<bool>,
    last_error: watch::Sender<Option<LastError>>,
}

async fn supervise(cfg: BusConfig, endpoints: Vec<Endpoint>, ends: Supervisor) {
    let Supervisor {
        current,
        deliveries,
        mut stop,
        last_error,
    } = ends;
    let mut backoff = Duration::from_millis(100);
    // The node the last connection was lost on: tried last next time.
    let mut lost_on: Option<Endpoint> = None;
    loop {
        if *stop.borrow() {
            break;
        }
        match connect(&cfg, &endpoints, lost_on.as_ref(), deliveries.as_ref()).await {
            Ok((generation, forwarder)) => {
                backoff = Duration::from_millis(100);
                let _ = last_error.send(None);
                tracing::info!(prefix = %cfg.prefix, endpoint = generation.endpoint.redacted(), "connected to the broker");
                let mut events = generation.connection.events_listener();
                let _ = current.send(Some(generation.clone()));
                let lost = async {
                    loop {
                        match events.next().await {
                            Some(lapin::Event::Error(e)) => return e.to_string(),
                            Some(_) => {}
                            None => return "connection closed".to_string(),
                        }
                    }
                };
                let consumer_ended = async {
                    match forwarder {
                        Some(f) => {
                            let _ = f.await;
                        }
                        None => std::future::pending::<()>().await,
                    }
                };
                // The broker may close the publishing channel alone (an
                // exchange deleted under it): publishes would fail until the
                // connection went, so start over.
                let publish_closed = async {
                    loop {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                        if !generation.publish.status().connected() {
                            return;
                        }
                    }
                };
                tokio::select! {
                    reason = lost => tracing::warn!(%reason, endpoint = generation.endpoint.redacted(), "broker connection lost; reconnecting"),
                    _ = consumer_ended => tracing::warn!(endpoint = generation.endpoint.redacted(), "task consumer ended; reconnecting"),
                    _ = publish_closed => tracing::warn!(endpoint = generation.endpoint.redacted(), "publishing channel closed; reconnecting"),
                    _ = stop.changed() => {}
                }
                let _ = current.send(None);
                lost_on = Some(generation.endpoint.clone());
                if !generation.connection.status().connected() {
                    // Already gone.
                } else {
                    let stopping = *stop.borrow();
                    let (code, text) = if stopping {
                        (200, "tidemark shutting down")
                    } else {
                        (320, "reconnecting")
                    };
                    let _ = tokio::time::timeout(
                        Duration::from_secs(5),
                        generation.connection.close(code, s(text)),
                    )
                    .await;
                    if stopping {
                        break;
                    }
                }
            }
            Err(e) => {
                let topology = matches!(e, BusError::Topology(_));
                if topology {
                    tracing::error!(error = %e, delay_ms = backoff.as_millis() as u64, "the broker's topology differs; retrying");
                } else {
                    tracing::warn!(error = %e, delay_ms = backoff.as_millis() as u64, "cannot connect to the broker; retrying");
                }
                let _ = last_error.send(Some(LastError {
                    text: e.to_string(),
                    topology,
                }));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    let _ = current.send(None);
}

/// How a downstream subscriber's queue is made.
#[derive(Debug, Default, Clone, Copy)]
pub struct SubscribeOptions<'a> {
    /// `None`: a private queue, deleted when the connection closes.
    /// `Some(name)`: a durable quorum queue of that name, kept (with what
    /// arrives while nobody consumes it) across restarts of the subscriber
    /// and of the broker.
    pub queue: Option<&'a str>,
    /// The broker forgets each message once sent: for a counter that cannot
    /// fail (`tidemark bench`).
    pub no_ack: bool,
    /// PEM CA certificates an `amqps://` broker may chain to, besides the
    /// system's roots ([`open_connection`]).
    pub tls_ca_pem: Option<&'a str>,
}

/// A downstream subscriber's queue, on the broker at `url` (a URL or a
/// list of a cluster's nodes: [`open_connection`]): private, deleted when its connection
/// closes, bound to the records `exchange` with `pattern` (`#` for all,
/// `<feed>.#` for one feed), consumed with manual acks. Keep the connection
/// alive as long as the consumer is used.
pub async fn subscribe(
    url: &str,
    exchange: &str,
    pattern: &str,
    consumer_tag: &str,
) -> Result<(Connection, lapin::Consumer, String), BusError> {
    subscribe_with(
        url,
        exchange,
        pattern,
        consumer_tag,
        SubscribeOptions::default(),
    )
    .await
}

/// [`subscribe`] with a durable named queue or without acks ([`SubscribeOptions`]).
pub async fn subscribe_with(
    url: &str,
    exchange: &str,
    pattern: &str,
    consumer_tag: &str,
    opts: SubscribeOptions<'_>,
) -> Result<(Connection, lapin::Consumer, String), BusError> {
    use lapin::options::QueueBindOptions;
    let conn = open_connection(url, opts.tls_ca_pem).await?;
    let ch = conn.create_channel().await?;
    declare_records_exchange(&ch, exchange).await?;
    let q = match opts.queue {
        None => {
            ch.queue_declare(
                s(""),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?
        }
        Some(name) => {
            let mut args = FieldTable::default();
            args.insert(s("x-queue-type"), long("quorum"));
            ch.queue_declare(
                s(name),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await?
        }
    };
    let name = q.name().to_string();
    ch.queue_bind(
        s(&name),
        s(exchange),
        s(pattern),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let consumer = ch
        .basic_consume(
            s(&name),
            s(consumer_tag),
            BasicConsumeOptions {
                no_ack: opts.no_ack,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok((conn, consumer, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_of_a_list_hides_every_password() {
        let cfg =
            BusConfig::new("amqps://tm:canary1@r0:5671/%2f,amqps://tm:canary2@r1:5671/%2f,r2");
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("canary"), "{shown}");
        assert!(shown.contains("amqps://tm:***@r1:5671/%2f,r2"), "{shown}");
    }

    #[test]
    fn delay_tiers_have_new_names_and_the_old_ones_are_known() {
        let cfg = BusConfig::new("amqp://h");
        let tier = Duration::from_secs(5);
        assert_eq!(cfg.retry_queue(tier), "tidemark.delay.5000");
        assert_eq!(cfg.legacy_retry_queue(tier), "tidemark.retry.5000");
        assert!(
            cfg.queue_names()
                .contains(&"tidemark.delay.600000".to_string())
        );
    }
}
