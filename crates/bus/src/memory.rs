//! The in-process twin of the bus, for embedded mode: the same traits and
//! the same behaviour (delays, dead letters, redelivery of what was not
//! acked) with no broker.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Mutex as AsyncMutex, mpsc};

use crate::message::Acker;
use crate::{BusError, DeadLetter, Downstream, OutPage, PageTask, TaskDelivery, TaskQueue};

struct Item {
    body: bytes::Bytes,
    redelivered: bool,
}

/// Puts an unacked delivery back on the queue when dropped.
pub struct Requeue {
    tx: mpsc::UnboundedSender<Item>,
    body: Option<bytes::Bytes>,
}

impl Requeue {
    pub(crate) fn disarm(&mut self) {
        self.body = None;
    }
}

impl Drop for Requeue {
    fn drop(&mut self) {
        if let Some(body) = self.body.take() {
            let _ = self.tx.send(Item {
                body,
                redelivered: true,
            });
        }
    }
}

/// An in-process task queue.
pub struct MemoryQueue {
    tx: mpsc::UnboundedSender<Item>,
    rx: AsyncMutex<mpsc::UnboundedReceiver<Item>>,
    dead: Mutex<VecDeque<DeadLetter>>,
}

impl Default for MemoryQueue {
    fn default() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            tx,
            rx: AsyncMutex::new(rx),
            dead: Mutex::new(VecDeque::new()),
        }
    }
}

impl MemoryQueue {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
}

#[async_trait]
impl TaskQueue for MemoryQueue {
    async fn publish_task(&self, task: &PageTask, delay: Option<Duration>) -> Result<(), BusError> {
        let body = bytes::Bytes::from(
            serde_json::to_vec(task).map_err(|e| BusError::Encode(e.to_string()))?,
        );
        match delay {
            Some(d) if !d.is_zero() => {
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(d).await;
                    let _ = tx.send(Item {
                        body,
                        redelivered: false,
                    });
                });
                Ok(())
            }
            _ => self
                .tx
                .send(Item {
                    body,
                    redelivered: false,
                })
                .map_err(|_| BusError::Closed),
        }
    }

    async fn next_delivery(&self) -> Result<TaskDelivery, BusError> {
        let item = self.rx.lock().await.recv().await.ok_or(BusError::Closed)?;
        let guard = Requeue {
            tx: self.tx.clone(),
            body: Some(item.body.clone()),
        };
        Ok(TaskDelivery {
            body: item.body,
            redelivered: item.redelivered,
            acker: Acker::Memory(Some(guard)),
        })
    }

    async fn dead_letter(
        &self,
        delivery: TaskDelivery,
        reason: &str,
        error: &str,
    ) -> Result<(), BusError> {
        self.dead
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(DeadLetter {
                body: delivery.body.clone(),
                reason: reason.to_string(),
                last_error: Some(error.to_string()),
            });
        delivery.ack().await
    }

    async fn take_dead_letter(&self) -> Result<Option<DeadLetter>, BusError> {
        Ok(self
            .dead
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front())
    }
}

/// Where an in-process downstream hands confirmed pages.
pub type Sink = Box<dyn Fn(&OutPage) -> Result<(), String> + Send + Sync>;

/// An in-process downstream: hands every confirmed page to a sink (embedded
/// mode writes JSON Lines there). A sink error is a publish error.
pub struct MemoryDownstream {
    sink: Sink,
}

impl MemoryDownstream {
    pub fn new(sink: impl Fn(&OutPage) -> Result<(), String> + Send + Sync + 'static) -> Self {
        Self {
            sink: Box::new(sink),
        }
    }
}

#[async_trait]
impl Downstream for MemoryDownstream {
    async fn publish_page(&self, page: &OutPage) -> Result<(), BusError> {
        (self.sink)(page).map_err(BusError::Encode)
    }
}
