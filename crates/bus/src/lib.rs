//! tidemark-bus: the queues between the roles and the records' way out.
//!
//! [`TaskQueue`] carries page tasks (confirmed publishes, manual acks,
//! bounded prefetch, delayed retries, a dead-letter queue). [`Downstream`]
//! publishes a page's records to subscribers and returns only when the
//! broker has confirmed every one: a nack, a returned (unroutable) message,
//! a lost connection or a timeout is an error, never a success.
//! [`amqp::AmqpBus`] implements both on RabbitMQ with a supervisor that
//! reconnects, to any node of a cluster's list ([`endpoints`]); [`memory`]
//! implements both in process for embedded mode.
//! [`subscriber::Subscription`] reads the records exchange, as a downstream
//! consumer does.

pub mod amqp;
pub mod endpoints;
pub mod memory;
mod message;
pub mod subscriber;

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tidemark_core::checkpoint::JobId;

pub use message::{OutPage, OutRecord, ParentRecord, routing_key};

/// "Fetch page `seq` of `job` at `cursor` under `epoch`."
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageTask {
    pub job: JobId,
    pub epoch: u64,
    pub seq: u64,
    /// `None`: the chain's start point.
    pub cursor: Option<String>,
    /// The start time (RFC 3339) of a chain without a cursor.
    #[serde(default)]
    pub start_from: Option<String>,
    #[serde(default)]
    pub attempt: u32,
    /// Empty pages in a row just before this one, each claiming more.
    #[serde(default)]
    pub empty_run: u32,
    /// When this page's task was first published (unix ms; retries keep
    /// it), for the page latency metric. 0: unknown.
    #[serde(default)]
    pub published_ms: u64,
    /// The `{vars.NAME}` values of the job's tenant (a tenanted feed), as
    /// the coordinator knew them when it started the chain.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub vars: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("broker: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("not connected to the broker (reconnecting)")]
    NotConnected,
    /// `AMQP_URL` is not a URL or a list of them (no password in the text).
    #[error("AMQP URL: {0}")]
    Url(String),
    /// One broker node did not take a connection in time.
    #[error("no connection within {0:?}")]
    ConnectTimeout(Duration),
    /// Every node of the list failed; each one's error, by its redacted URL.
    #[error("no broker node of the list could be used: {0}")]
    NoNode(String),
    /// A queue or exchange exists with other arguments than tidemark
    /// declares (PRECONDITION_FAILED): what differs and how to migrate.
    #[error("{0}")]
    Topology(String),
    /// The first connection did not come within `connect_wait`; the last attempt's error.
    #[error("not connected to the broker (last attempt: {0})")]
    Unreachable(String),
    #[error("publisher confirms not received within {0:?}")]
    ConfirmTimeout(Duration),
    #[error("the broker refused (nacked) {0} message(s)")]
    Nacked(usize),
    /// The channel was not in confirm mode: never taken for a confirm.
    #[error("{0} message(s) published without publisher confirms: not known to be stored")]
    Unconfirmed(usize),
    #[error(
        "{count} message(s) could not be routed to any queue (routing key {routing_key}): nothing is bound to receive them"
    )]
    Unroutable { count: usize, routing_key: String },
    #[error("delivery abandoned: its channel is gone, the broker will redeliver it")]
    Abandoned,
    #[error("the bus is shut down")]
    Closed,
    #[error("{0}")]
    Encode(String),
}

/// A page task as received. Ack it only after its work is committed.
pub struct TaskDelivery {
    pub body: bytes::Bytes,
    pub redelivered: bool,
    acker: message::Acker,
}

impl TaskDelivery {
    /// The task, or why the message is not one (it then belongs in the dead-letter queue).
    pub fn task(&self) -> Result<PageTask, String> {
        serde_json::from_slice(&self.body).map_err(|e| format!("malformed page task: {e}"))
    }
    pub async fn ack(self) -> Result<(), BusError> {
        self.acker.ack().await
    }
    /// Give the task back to the queue now (counts toward the delivery limit).
    pub async fn requeue(self) -> Result<(), BusError> {
        self.acker.requeue().await
    }
}

/// A dead-lettered task and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub body: bytes::Bytes,
    /// `x-reason`, or the broker's own, its latest (`delivery_limit`, ...).
    pub reason: String,
    pub last_error: Option<String>,
}

#[async_trait]
pub trait TaskQueue: Send + Sync {
    /// Publish a task (confirmed); with a delay, it reaches consumers no sooner.
    async fn publish_task(&self, task: &PageTask, delay: Option<Duration>) -> Result<(), BusError>;
    /// The next delivered task.
    async fn next_delivery(&self) -> Result<TaskDelivery, BusError>;
    /// Move a delivery to the dead-letter queue with its reason and last error, and ack it.
    async fn dead_letter(
        &self,
        delivery: TaskDelivery,
        reason: &str,
        error: &str,
    ) -> Result<(), BusError>;
    /// Take the oldest dead letter, if any.
    async fn take_dead_letter(&self) -> Result<Option<DeadLetter>, BusError>;
}

#[async_trait]
pub trait Downstream: Send + Sync {
    /// Publish a page and wait for every confirm.
    async fn publish_page(&self, page: &OutPage) -> Result<(), BusError>;

    /// [`Downstream::publish_page`], telling `sent` once the page has its
    /// room in the unconfirmed window and its messages are going out: from
    /// then on, room taken with [`Downstream::try_reserve`] can no longer
    /// hold this page up. A downstream without a window tells at once.
    async fn publish_page_then(
        &self,
        page: &OutPage,
        sent: tokio::sync::oneshot::Sender<()>,
    ) -> Result<(), BusError> {
        let _ = sent.send(());
        self.publish_page(page).await
    }

    /// Room for `bytes` of a page read ahead of its turn, taken from the
    /// unconfirmed-bytes window if it has that much free now (never waits):
    /// `None` when it has not. The room is given back when the
    /// [`Reservation`] is dropped. A downstream without a window always
    /// has room.
    fn try_reserve(&self, bytes: usize) -> Option<Reservation> {
        let _ = bytes;
        Some(Reservation::default())
    }
}

/// Room held in a downstream's unconfirmed-bytes window by a page read
/// ahead of its turn (see [`Downstream::try_reserve`]); given back on drop.
#[derive(Debug, Default)]
pub struct Reservation {
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Reservation {
    pub(crate) fn held(permit: tokio::sync::OwnedSemaphorePermit) -> Self {
        Reservation {
            permit: Some(permit),
        }
    }

    /// The bytes held (0 for a downstream without a window).
    pub fn bytes(&self) -> usize {
        self.permit.as_ref().map_or(0, |p| p.num_permits())
    }
}
