//! A downstream subscriber: a queue bound to the records exchange, read one
//! message at a time, for consumers that should not speak AMQP themselves
//! (`tidemark tail`, the benchmark's counting sink).

use futures::StreamExt;
use lapin::types::AMQPValue;

use crate::BusError;
use crate::amqp::{SubscribeOptions, subscribe_with};
use crate::message::Acker;

/// A subscription to the records exchange ([`subscribe_with`]'s queue),
/// holding its connection. Close it with [`Subscription::close`].
pub struct Subscription {
    conn: lapin::Connection,
    consumer: lapin::Consumer,
    queue: String,
    no_ack: bool,
}

/// One message as it arrived. Ack it once it is handled (a subscription
/// made with `no_ack` needs no ack: [`Received::ack`] does nothing).
pub struct Received {
    pub routing_key: String,
    pub message_id: Option<String>,
    /// `x-record-count` of a per-page message; `None` on a per-record one.
    pub record_count: Option<u64>,
    pub body: Vec<u8>,
    acker: Option<Acker>,
}

impl Received {
    pub async fn ack(self) -> Result<(), BusError> {
        match self.acker {
            Some(a) => a.ack().await,
            None => Ok(()),
        }
    }
}

impl Subscription {
    /// Bind a queue to `exchange` with `pattern` (`#` for all, `<feed>.#`
    /// for one feed) and start consuming it as `consumer_tag`.
    pub async fn start(
        url: &str,
        exchange: &str,
        pattern: &str,
        consumer_tag: &str,
        opts: SubscribeOptions<'_>,
    ) -> Result<Self, BusError> {
        let (conn, consumer, queue) =
            subscribe_with(url, exchange, pattern, consumer_tag, opts).await?;
        Ok(Self {
            conn,
            consumer,
            queue,
            no_ack: opts.no_ack,
        })
    }

    /// The bound queue's name (the broker's for a private queue).
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The next message; `None` once the broker ended the consumer.
    pub async fn next(&mut self) -> Option<Result<Received, BusError>> {
        let d = match self.consumer.next().await? {
            Ok(d) => d,
            Err(e) => return Some(Err(e.into())),
        };
        let record_count = match d
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-record-count"))
        {
            Some(AMQPValue::LongLongInt(n)) => u64::try_from(*n).ok(),
            _ => None,
        };
        Some(Ok(Received {
            routing_key: d.routing_key.to_string(),
            message_id: d.properties.message_id().as_ref().map(|s| s.to_string()),
            record_count,
            body: d.data,
            acker: (!self.no_ack).then_some(Acker::Amqp(d.acker)),
        }))
    }

    /// Close the connection (a private queue goes with it).
    pub async fn close(self) {
        let _ = self.conn.close(200, "bye".into()).await;
    }
}
