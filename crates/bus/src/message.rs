//! Downstream messages (DESIGN.md "Downstream contract") and acking.

use bytes::Bytes;
use tidemark_core::config::DeliveryPer;

use crate::BusError;

/// One record on its way downstream.
#[derive(Debug, Clone)]
pub struct OutRecord {
    pub key: String,
    /// The record's message id; empty in a page delivered as one message
    /// (`per: page`), which carries the page's id instead.
    pub message_id: String,
    /// The record exactly as the API sent it.
    pub body: Bytes,
    /// A batched child feed's record: its parent record's key
    /// (`x-parent-key`), read from the record.
    pub parent_key: Option<String>,
}

/// One page on its way downstream.
#[derive(Debug, Clone)]
pub struct OutPage {
    pub feed: String,
    /// The tenant of a tenanted feed's page.
    pub tenant: Option<String>,
    /// The partition within the feed (and tenant).
    pub partition: String,
    pub seq: u64,
    pub per: DeliveryPer,
    /// The message id of the whole page (per-page delivery).
    pub page_message_id: String,
    pub records: Vec<OutRecord>,
    /// A child feed's page: its parent record (`x-parent-feed`, `x-parent-key`).
    pub parent: Option<ParentRecord>,
}

/// The parent record of a child feed's page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentRecord {
    pub feed: String,
    /// `None` for a batched child feed, whose records name their parents.
    pub key: Option<String>,
}

impl OutPage {
    /// The body of a per-page message: `{"records": [...]}`.
    pub fn page_body(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(self.records.iter().map(|r| r.body.len() + 1).sum::<usize>() + 16);
        out.extend_from_slice(b"{\"records\":[");
        for (i, r) in self.records.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(&r.body);
        }
        out.extend_from_slice(b"]}");
        out
    }
}

/// `<feed>.<partition>`, or `<feed>.<tenant>.<partition>` for a tenanted feed.
pub fn routing_key(feed: &str, tenant: Option<&str>, partition: &str) -> String {
    match tenant {
        Some(t) => format!("{feed}.{t}.{partition}"),
        None => format!("{feed}.{partition}"),
    }
}

pub(crate) enum Acker {
    Amqp(lapin::Acker),
    Memory(Option<crate::memory::Requeue>),
}

impl Acker {
    pub(crate) async fn ack(self) -> Result<(), BusError> {
        match self {
            // false: the channel is gone (or it was acked already); never acked elsewhere.
            Acker::Amqp(a) => match a.ack(lapin::options::BasicAckOptions::default()).await {
                Ok(true) => Ok(()),
                _ => Err(BusError::Abandoned),
            },
            Acker::Memory(mut r) => {
                if let Some(r) = r.as_mut() {
                    r.disarm();
                }
                Ok(())
            }
        }
    }
    pub(crate) async fn requeue(self) -> Result<(), BusError> {
        match self {
            Acker::Amqp(a) => match a
                .nack(lapin::options::BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await
            {
                Ok(true) => Ok(()),
                _ => Err(BusError::Abandoned),
            },
            // Dropping the guard puts it back.
            Acker::Memory(r) => {
                drop(r);
                Ok(())
            }
        }
    }
}
