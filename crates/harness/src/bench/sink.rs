//! The benchmark's downstream: a consumer that counts what arrives on the
//! records exchange, and the broker ceiling measured through it.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use serde::Serialize;
use tidemark_bus::amqp::SubscribeOptions;
use tidemark_bus::subscriber::Subscription;

use crate::HarnessError;

fn amqp(what: &str) -> impl Fn(lapin::Error) -> HarnessError + '_ {
    move |e| HarnessError::bench(format!("{what}: {e}"))
}

/// Unix time in milliseconds, with sub-millisecond precision.
pub fn unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

#[derive(Default)]
struct Counts {
    messages: AtomicU64,
    records: AtomicU64,
    duplicates: AtomicU64,
    /// Unix ms (as f64 bits) of the latest delivery.
    last_ms: AtomicU64,
    /// Per tenant (the middle segment of a `<feed>.<tenant>.<partition>`
    /// routing key), when the sink was started [`Sink::by_tenant`].
    tenants: Option<Mutex<HashMap<String, Arrivals>>>,
}

/// What arrived of one tenant.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Arrivals {
    /// Unix ms of the tenant's first and latest message.
    pub first_ms: f64,
    pub last_ms: f64,
    pub records: u64,
}

/// The tenant of a tenanted feed's routing key, `<feed>.<tenant>.<partition>`
/// (feed and tenant names hold no dot; a partition may).
pub fn routing_tenant(routing_key: &str) -> Option<&str> {
    let mut parts = routing_key.splitn(3, '.');
    let (_feed, tenant, _partition) = (parts.next()?, parts.next()?, parts.next()?);
    Some(tenant)
}

/// Counts every message and record bound from an exchange with `#`: a
/// per-page message counts its `x-record-count` header, any other message
/// one record. Repeated message ids are counted as duplicates. Started with
/// [`Sink::by_tenant`], it also keeps each tenant's first arrival and count.
pub struct Sink {
    counts: Arc<Counts>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Snapshot {
    pub messages: u64,
    pub records: u64,
    pub duplicates: u64,
    pub last_ms: f64,
}

impl Sink {
    pub async fn start(
        url: &str,
        ca_pem: Option<&str>,
        exchange: &str,
    ) -> Result<Sink, HarnessError> {
        Self::start_with(url, ca_pem, exchange, false).await
    }

    /// [`Sink::start`], also counting per tenant ([`Sink::tenant`]).
    pub async fn by_tenant(
        url: &str,
        ca_pem: Option<&str>,
        exchange: &str,
    ) -> Result<Sink, HarnessError> {
        Self::start_with(url, ca_pem, exchange, true).await
    }

    async fn start_with(
        url: &str,
        ca_pem: Option<&str>,
        exchange: &str,
        by_tenant: bool,
    ) -> Result<Sink, HarnessError> {
        // No acks: the sink only counts, so that it costs the broker and the
        // two cores as little as possible (the ceiling goes through it too).
        let mut sub = Subscription::start(
            url,
            exchange,
            "#",
            "tidemark-bench",
            SubscribeOptions {
                queue: None,
                no_ack: true,
                tls_ca_pem: ca_pem,
            },
        )
        .await
        .map_err(|e| HarnessError::bench(format!("cannot subscribe to {exchange}: {e}")))?;
        let counts = Arc::new(Counts {
            tenants: by_tenant.then(Mutex::default),
            ..Counts::default()
        });
        let c = counts.clone();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let hasher = RandomState::new();
            let mut seen: HashSet<u64> = HashSet::new();
            loop {
                let m = tokio::select! {
                    _ = &mut stopped => break,
                    m = sub.next() => match m {
                        Some(Ok(m)) => m,
                        _ => break,
                    },
                };
                if let Some(id) = &m.message_id
                    && !seen.insert(hasher.hash_one(id.as_str()))
                {
                    c.duplicates.fetch_add(1, Ordering::Relaxed);
                }
                let now = unix_ms();
                let records = m.record_count.unwrap_or(1);
                if let Some(tenants) = &c.tenants
                    && let Some(t) = routing_tenant(&m.routing_key)
                {
                    let mut tenants = tenants.lock().unwrap_or_else(|e| e.into_inner());
                    match tenants.get_mut(t) {
                        Some(a) => {
                            a.records += records;
                            a.last_ms = now;
                        }
                        None => {
                            tenants.insert(
                                t.to_string(),
                                Arrivals {
                                    first_ms: now,
                                    last_ms: now,
                                    records,
                                },
                            );
                        }
                    }
                }
                c.messages.fetch_add(1, Ordering::Relaxed);
                c.last_ms.store(now.to_bits(), Ordering::Relaxed);
                // A per-page message counts its records; any other, one.
                c.records.fetch_add(records, Ordering::Release);
            }
            sub.close().await;
        });
        Ok(Sink { counts, stop, task })
    }

    pub fn snapshot(&self) -> Snapshot {
        let c = &self.counts;
        let records = c.records.load(Ordering::Acquire);
        Snapshot {
            messages: c.messages.load(Ordering::Relaxed),
            records,
            duplicates: c.duplicates.load(Ordering::Relaxed),
            last_ms: f64::from_bits(c.last_ms.load(Ordering::Relaxed)),
        }
    }

    /// What arrived of `tenant` so far (`None`: nothing, or a sink not
    /// started [`Sink::by_tenant`]).
    pub fn tenant(&self, tenant: &str) -> Option<Arrivals> {
        let tenants = self.counts.tenants.as_ref()?;
        tenants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(tenant)
            .copied()
    }

    /// Every tenant's arrivals so far.
    pub fn tenants(&self) -> HashMap<String, Arrivals> {
        self.counts.tenants.as_ref().map_or_else(HashMap::new, |t| {
            t.lock().unwrap_or_else(|e| e.into_inner()).clone()
        })
    }

    /// Wait until `records` have arrived, checking `alive` every 50 ms; an
    /// error after `timeout` or as soon as `alive` fails.
    pub async fn wait_for(
        &self,
        records: u64,
        timeout: Duration,
        mut alive: impl FnMut() -> Result<(), HarnessError>,
    ) -> Result<Snapshot, HarnessError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let s = self.snapshot();
            if s.records >= records {
                return Ok(s);
            }
            alive()?;
            if tokio::time::Instant::now() >= deadline {
                return Err(HarnessError::bench(format!(
                    "only {} of {records} records arrived within {timeout:?}",
                    s.records
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stop counting and close the subscription.
    pub async fn close(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// The broker's ceiling for one message size.
#[derive(Debug, Clone, Serialize)]
pub struct Ceiling {
    pub message_bytes: usize,
    pub messages: u64,
    pub seconds: f64,
    pub messages_per_sec: f64,
    pub mb_per_sec: f64,
}

/// A minimal confirmed publisher: `count` persistent messages of `size`
/// bytes to `exchange` in batches of `batch`, each batch awaiting its
/// confirms (mandatory, as tidemark publishes), timed from the first
/// publish to the sink's last receipt.
pub async fn ceiling(
    url: &str,
    ca_pem: Option<&str>,
    exchange: &str,
    sink: &Sink,
    size: usize,
    count: u64,
    batch: u64,
) -> Result<Ceiling, HarnessError> {
    let conn = tidemark_bus::amqp::open_connection(url, ca_pem)
        .await
        .map_err(|e| HarnessError::bench(format!("cannot connect to RabbitMQ: {e}")))?;
    let ch = conn.create_channel().await.map_err(amqp("channel"))?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(amqp("confirm mode"))?;
    let body = vec![b'x'; size];
    let before = sink.snapshot().messages;
    let started = unix_ms();
    let mut sent = 0u64;
    while sent < count {
        let n = batch.min(count - sent);
        for _ in 0..n {
            // The publisher confirm is awaited for the whole batch below.
            let _confirm = ch
                .basic_publish(
                    exchange.into(),
                    "ceiling.p".into(),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    &body,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .map_err(amqp("publish"))?;
        }
        ch.wait_for_confirms().await.map_err(amqp("confirms"))?;
        sent += n;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let last = loop {
        let s = sink.snapshot();
        if s.messages - before >= count {
            break s.last_ms;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(HarnessError::bench(format!(
                "the ceiling's messages did not all arrive: {} of {count}",
                s.messages - before
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let _ = conn.close(200, "ceiling done".into()).await;
    let seconds = ((last - started) / 1000.0).max(1e-6);
    Ok(Ceiling {
        message_bytes: size,
        messages: count,
        seconds,
        messages_per_sec: count as f64 / seconds,
        mb_per_sec: count as f64 * size as f64 / seconds / 1e6,
    })
}

#[cfg(test)]
mod tests {
    use super::routing_tenant;

    #[test]
    fn the_tenant_is_the_middle_of_a_three_part_routing_key() {
        assert_eq!(routing_tenant("tickets.acme.all"), Some("acme"));
        assert_eq!(routing_tenant("tickets.acme.2024.01"), Some("acme"));
        assert_eq!(routing_tenant("tickets.all"), None);
        assert_eq!(routing_tenant("ceiling.p"), None);
    }
}
