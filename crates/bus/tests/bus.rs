//! The bus against the real RabbitMQ (AMQP_URL), and its in-process twin.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use rand::Rng;
use tidemark_bus::amqp::{AmqpBus, BusConfig};
use tidemark_bus::memory::MemoryQueue;
use tidemark_bus::{BusError, Downstream, OutPage, OutRecord, PageTask, TaskQueue};
use tidemark_core::checkpoint::JobId;
use tidemark_core::config::DeliveryPer;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// Every test ends within two minutes: a hang is a failure, not a stuck CI.
async fn within(test: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(Duration::from_secs(120), test)
        .await
        .expect("test timed out");
}

/// AMQP_URL (default the local broker) when it answers; else, when Docker is
/// available, a RabbitMQ container (tidemark-harness finds it for every suite).
fn amqp_url() -> String {
    tidemark_harness::services::amqp_url().unwrap_or_else(|e| panic!("{e}"))
}

fn test_config(url: &str) -> BusConfig {
    let id: u64 = rand::rng().random();
    let mut cfg = BusConfig::new(url);
    cfg.prefix = format!("tmtest.{id:x}");
    cfg.records_exchange = format!("tmtest.{id:x}.records");
    cfg.retry_tiers = vec![Duration::from_secs(1), Duration::from_secs(2)];
    cfg.delivery_limit = 2;
    cfg.confirm_timeout = Duration::from_secs(5);
    cfg
}

/// Delete everything a test declared.
async fn cleanup(cfg: &BusConfig) {
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    for q in cfg.queue_names() {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = ch
        .exchange_delete(cfg.records_exchange.as_str().into(), Default::default())
        .await;
    let _ = conn.close(200, "bye".into()).await;
}

fn page(feed: &str, partition: &str, seq: u64, n: usize, per: DeliveryPer) -> OutPage {
    OutPage {
        feed: feed.into(),
        tenant: None,
        partition: partition.into(),
        seq,
        per,
        page_message_id: format!("page-{partition}-{seq}"),
        parent: None,
        records: (0..n)
            .map(|i| OutRecord {
                parent_key: None,
                key: format!("{partition}-{seq}-{i}"),
                message_id: format!("m-{partition}-{seq}-{i}"),
                body: bytes::Bytes::from(format!(
                    r#"{{"id":"{partition}-{seq}-{i}","pad":"{}"}}"#,
                    "x".repeat(280)
                )),
            })
            .collect(),
    }
}

fn task(seq: u64) -> PageTask {
    PageTask {
        job: JobId::new("feed", "p"),
        epoch: 7,
        seq,
        cursor: Some(format!("c{seq}")),
        start_from: None,
        attempt: 0,
        empty_run: 0,
        published_ms: 0,
        vars: Default::default(),
    }
}

/// A queue bound to the records exchange, consumed with auto-ack.
async fn subscriber(cfg: &BusConfig) -> (Connection, lapin::Consumer) {
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    ch.queue_bind(
        q.name().clone(),
        cfg.records_exchange.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let consumer = ch
        .basic_consume(
            q.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    (conn, consumer)
}

fn header(d: &lapin::message::Delivery, k: &str) -> String {
    match d
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(k))
    {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        Some(AMQPValue::LongLongInt(n)) => n.to_string(),
        other => panic!("header {k}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_thousand_records_arrive_in_order_with_ids_and_headers() {
    within(body_a_hundred_thousand_records_arrive_in_order_with_ids_and_headers()).await;
}

async fn body_a_hundred_thousand_records_arrive_in_order_with_ids_and_headers() {
    let cfg = test_config(&amqp_url());
    let bus = AmqpBus::start(cfg.clone(), false).await.unwrap();
    let (_conn, mut consumer) = subscriber(&cfg).await;
    for seq in 0..100u64 {
        let partition = if seq % 2 == 0 { "a" } else { "b" };
        bus.publish_page(&page("orders", partition, seq, 1000, DeliveryPer::Record))
            .await
            .unwrap();
    }
    let mut per_key: HashMap<String, Vec<String>> = HashMap::new();
    for _ in 0..100_000 {
        let d = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(d.properties.delivery_mode(), &Some(2));
        assert_eq!(
            d.properties.content_type().as_ref().map(|c| c.as_str()),
            Some("application/json")
        );
        let id = d
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .as_str()
            .to_string();
        let key = header(&d, "x-record-key");
        assert_eq!(id, format!("m-{key}"));
        assert_eq!(header(&d, "x-feed"), "orders");
        assert_eq!(
            format!("orders.{}", header(&d, "x-partition")),
            d.routing_key.as_str()
        );
        let body: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
        assert_eq!(body["id"], key.as_str());
        per_key
            .entry(d.routing_key.as_str().to_string())
            .or_default()
            .push(format!("{}:{key}", header(&d, "x-page-seq")));
    }
    for (rk, got) in &per_key {
        let partition = rk.trim_start_matches("orders.");
        let want: Vec<String> = (0..100u64)
            .filter(|s| (s % 2 == 0) == (partition == "a"))
            .flat_map(|s| (0..1000).map(move |i| format!("{s}:{partition}-{s}-{i}")))
            .collect();
        assert!(got == &want, "{rk}: out of order or missing");
    }
    // Per-page delivery: one message, {"records": [...]}, the page's id.
    bus.publish_page(&page("orders", "a", 100, 3, DeliveryPer::Page))
        .await
        .unwrap();
    let d = consumer.next().await.unwrap().unwrap();
    assert_eq!(
        d.properties.message_id().as_ref().unwrap().as_str(),
        "page-a-100"
    );
    let body: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
    assert_eq!(body["records"].as_array().unwrap().len(), 3);
    assert_eq!(header(&d, "x-record-count"), "3");
    assert_eq!(header(&d, "x-page-seq"), "100");
    bus.close().await;
    cleanup(&cfg).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn publishing_with_no_queue_bound_is_an_error() {
    within(body_publishing_with_no_queue_bound_is_an_error()).await;
}

async fn body_publishing_with_no_queue_bound_is_an_error() {
    let cfg = test_config(&amqp_url());
    let bus = AmqpBus::start(cfg.clone(), false).await.unwrap();
    let err = bus
        .publish_page(&page("orders", "a", 0, 5, DeliveryPer::Record))
        .await
        .unwrap_err();
    assert!(
        matches!(err, BusError::Unroutable { count: 5, .. }),
        "{err}"
    );
    bus.close().await;
    cleanup(&cfg).await;
}

/// A TCP proxy that can cut every connection it carries.
struct Proxy {
    port: u16,
    cut: Arc<AtomicBool>,
    conns: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let conns: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let c2 = conns.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                let h = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        let _ = outbound.shutdown().await;
                    }
                });
                c2.lock().unwrap().push(h);
            }
        });
        Proxy { port, cut, conns }
    }
    /// Abort every live connection (the broker and the client both see a reset).
    fn cut_all(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for h in self.conns.lock().unwrap().drain(..) {
            h.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_connection_fails_the_page_then_the_bus_reconnects() {
    within(body_a_cut_connection_fails_the_page_then_the_bus_reconnects()).await;
}

async fn body_a_cut_connection_fails_the_page_then_the_bus_reconnects() {
    let url = amqp_url();
    let target = url
        .split('@')
        .next_back()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let proxy = Proxy::start(target).await;
    let proxied = url.replacen(
        url.split('@')
            .next_back()
            .unwrap()
            .split('/')
            .next()
            .unwrap(),
        &format!("127.0.0.1:{}", proxy.port),
        1,
    );
    let cfg = test_config(&proxied);
    let bus = AmqpBus::start(cfg.clone(), false).await.unwrap();
    let (_conn, _consumer) = subscriber(&BusConfig {
        url: url.clone().into(),
        ..cfg.clone()
    })
    .await;
    let big = page("orders", "a", 0, 20_000, DeliveryPer::Record);
    let publishing = {
        let bus = bus.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            (bus.publish_page(&big).await, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(30)).await;
    proxy.cut_all();
    let (result, took) = publishing.await.unwrap();
    assert!(result.is_err(), "a page cut in the middle must fail");
    assert!(
        took <= cfg.confirm_timeout + Duration::from_secs(1),
        "took {took:?}"
    );
    // The supervisor reconnects; the next page goes through.
    let mut ok = false;
    for _ in 0..50 {
        if bus
            .publish_page(&page("orders", "a", 1, 10, DeliveryPer::Record))
            .await
            .is_ok()
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ok, "the bus did not recover after the cut");
    bus.close().await;
    cleanup(&cfg).await;
}

/// The task-queue behaviour every implementation shares.
async fn task_queue_behaviour(q: Arc<dyn TaskQueue>) {
    q.publish_task(&task(1), None).await.unwrap();
    let d = q.next_delivery().await.unwrap();
    assert_eq!(d.task().unwrap(), task(1));
    d.ack().await.unwrap();

    let sent = Instant::now();
    q.publish_task(&task(2), Some(Duration::from_millis(900)))
        .await
        .unwrap();
    let d = q.next_delivery().await.unwrap();
    assert!(
        sent.elapsed() >= Duration::from_millis(900),
        "a delayed task came back after {:?}",
        sent.elapsed()
    );
    assert_eq!(d.task().unwrap().seq, 2);
    q.dead_letter(d, "http_500", "HTTP 500 from https://api.test/x")
        .await
        .unwrap();
    let dead = q.take_dead_letter().await.unwrap().expect("dead letter");
    assert_eq!(
        (dead.reason.as_str(), dead.last_error.as_deref()),
        ("http_500", Some("HTTP 500 from https://api.test/x"))
    );
    assert_eq!(
        serde_json::from_slice::<PageTask>(&dead.body).unwrap().seq,
        2
    );
    assert!(q.take_dead_letter().await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn task_queue_on_rabbitmq() {
    within(body_task_queue_on_rabbitmq()).await;
}

async fn body_task_queue_on_rabbitmq() {
    let cfg = test_config(&amqp_url());
    let bus = AmqpBus::start(cfg.clone(), true).await.unwrap();
    task_queue_behaviour(Arc::new(bus.clone())).await;

    // Past the delivery limit the broker dead-letters the task, with its reason.
    bus.publish_task(&task(3), None).await.unwrap();
    for _ in 0..=cfg.delivery_limit {
        let d = tokio::time::timeout(Duration::from_secs(10), bus.next_delivery())
            .await
            .unwrap()
            .unwrap();
        d.requeue().await.unwrap();
    }
    let mut dead = None;
    for _ in 0..50 {
        dead = bus.take_dead_letter().await.unwrap();
        if dead.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dead = dead.expect("the task reached the dead-letter queue");
    assert_eq!(dead.reason, "delivery_limit");
    assert_eq!(
        serde_json::from_slice::<PageTask>(&dead.body).unwrap().seq,
        3
    );
    bus.close().await;
    cleanup(&cfg).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn task_queue_in_process() {
    within(body_task_queue_in_process()).await;
}

async fn body_task_queue_in_process() {
    let q = MemoryQueue::new();
    task_queue_behaviour(q.clone()).await;
    // A delivery dropped without an ack comes back, marked redelivered.
    q.publish_task(&task(4), None).await.unwrap();
    drop(q.next_delivery().await.unwrap());
    let again = q.next_delivery().await.unwrap();
    assert!(again.redelivered);
    assert_eq!(again.task().unwrap().seq, 4);
    again.ack().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn unacked_tasks_of_a_lost_consumer_go_to_another() {
    within(body_unacked_tasks_of_a_lost_consumer_go_to_another()).await;
}

/// Await `fut` for at most 30 s; a hang names the step that hung.
async fn step<T>(name: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .unwrap_or_else(|_| panic!("step {name:?} did not finish within 30 s"))
}

async fn body_unacked_tasks_of_a_lost_consumer_go_to_another() {
    let cfg = test_config(&amqp_url());
    let a = step("start a", AmqpBus::start(cfg.clone(), true))
        .await
        .unwrap();
    step("publish", a.publish_task(&task(5), None))
        .await
        .unwrap();
    let held = step("first delivery", a.next_delivery()).await.unwrap();
    assert!(!held.redelivered);
    step("close a", a.close()).await;
    // The delivery's channel is gone: acking it now is refused, never done elsewhere.
    assert!(matches!(
        step("ack on the closed channel", held.ack()).await,
        Err(BusError::Abandoned)
    ));
    let b = step("start b", AmqpBus::start(cfg.clone(), true))
        .await
        .unwrap();
    let d = step("redelivery", b.next_delivery()).await.unwrap();
    assert!(d.redelivered);
    assert_eq!(d.task().unwrap().seq, 5);
    step("ack", d.ack()).await.unwrap();
    step("close b", b.close()).await;
    step("cleanup", cleanup(&cfg)).await;
}

#[tokio::test]
async fn the_in_process_downstream_hands_pages_to_its_sink_or_fails() {
    use tidemark_bus::memory::MemoryDownstream;
    let seen: Arc<std::sync::Mutex<Vec<(String, usize)>>> = Arc::default();
    let s2 = seen.clone();
    let ds = MemoryDownstream::new(move |p: &OutPage| {
        s2.lock().unwrap().push((
            tidemark_bus::routing_key(&p.feed, p.tenant.as_deref(), &p.partition),
            p.records.len(),
        ));
        Ok(())
    });
    ds.publish_page(&page("orders", "a", 0, 3, DeliveryPer::Record))
        .await
        .unwrap();
    assert_eq!(*seen.lock().unwrap(), vec![("orders.a".to_string(), 3)]);
    let failing = MemoryDownstream::new(|_| Err("disk full".into()));
    let err = failing
        .publish_page(&page("orders", "a", 1, 1, DeliveryPer::Page))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("disk full"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_page_read_ahead_holds_room_in_the_unconfirmed_window() {
    within(body_a_page_read_ahead_holds_room_in_the_unconfirmed_window()).await;
}

/// Room taken for a page read ahead comes out of the unconfirmed-bytes
/// window: never waited for (no room, no read-ahead), and a page that
/// needs it waits until it is given back. `sent` tells when a page has its
/// room.
async fn body_a_page_read_ahead_holds_room_in_the_unconfirmed_window() {
    let mut cfg = test_config(&amqp_url());
    cfg.max_unconfirmed_bytes = 100_000;
    let bus = AmqpBus::start(cfg.clone(), false).await.unwrap();
    let (_conn, _consumer) = subscriber(&cfg).await;
    let held = bus.try_reserve(60_000).expect("room in an empty window");
    assert_eq!(held.bytes(), 60_000);
    assert!(
        bus.try_reserve(60_000).is_none(),
        "room was handed out twice"
    );
    // 100 records of ~330 bytes (plus their overhead) need more than is left.
    let (sent, has_room) = tokio::sync::oneshot::channel();
    let publishing = {
        let bus = bus.clone();
        tokio::spawn(async move {
            bus.publish_page_then(&page("orders", "a", 0, 100, DeliveryPer::Record), sent)
                .await
        })
    };
    let mut has_room = has_room;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut has_room)
            .await
            .is_err(),
        "the page went out without its room"
    );
    drop(held);
    has_room.await.expect("told once it has its room");
    publishing.await.unwrap().unwrap();
    let all = bus
        .try_reserve(100_000)
        .expect("everything given back once confirmed");
    assert_eq!(all.bytes(), 100_000);
    drop(all);
    // A downstream without a window always has room, and says so at once.
    let sink = tidemark_bus::memory::MemoryDownstream::new(|_| Ok(()));
    assert!(sink.try_reserve(usize::MAX).is_some());
    bus.close().await;
    cleanup(&cfg).await;
}
