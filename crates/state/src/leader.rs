//! Coordinator leadership with a local deadline.
//!
//! The lease lives in the store with a TTL. The guard also keeps a local
//! deadline — the time it *sent* its last successful renewal plus the TTL,
//! less a safety margin — so a leader that cannot reach the store stops
//! acting the moment its lease may have passed to someone else, without
//! waiting for an error.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{Leadership, StateError};

pub struct LeaderGuard {
    store: Arc<dyn Leadership>,
    id: String,
    ttl: Duration,
    deadline: Mutex<Option<Instant>>,
}

impl LeaderGuard {
    pub fn new(store: Arc<dyn Leadership>, id: impl Into<String>, ttl: Duration) -> Self {
        Self {
            store,
            id: id.into(),
            ttl,
            deadline: Mutex::new(None),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Try to take or renew the leadership; call every `ttl / 3`.
    pub async fn tick(&self) -> Result<bool, StateError> {
        let sent = Instant::now();
        let result =
            tokio::time::timeout(self.ttl / 3, self.store.try_lead(&self.id, self.ttl)).await;
        let leads = matches!(result, Ok(Ok(true)));
        let mut d = self.deadline.lock().unwrap_or_else(|e| e.into_inner());
        *d = leads.then(|| sent + self.ttl.mul_f64(0.8));
        match result {
            Ok(r) => r,
            Err(_) => Ok(false),
        }
    }

    /// True only while the last renewal is fresh enough.
    pub fn is_leader(&self) -> bool {
        self.deadline
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|d| Instant::now() < d)
    }

    /// Give the leadership up at once (on shutdown).
    pub async fn resign(&self) -> Result<(), StateError> {
        *self.deadline.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.store.resign(&self.id).await
    }
}
