//! The bus against several broker endpoints: a URL list whose first nodes
//! are dead, two TCP proxies in front of the shared broker standing for two
//! nodes of a cluster (one of them lost with confirms pending), and the
//! quorum queues' declarations. Each test uses its own queue and exchange
//! names and deletes them.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Connection, ConnectionProperties};
use rand::Rng;
use tidemark_bus::amqp::{AmqpBus, BusConfig, open_connection};
use tidemark_bus::{BusError, Downstream, OutPage, OutRecord, PageTask, TaskQueue};
use tidemark_core::checkpoint::JobId;
use tidemark_core::config::DeliveryPer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Every test ends within a minute: a hang is a failure, not a stuck CI.
async fn within(test: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(Duration::from_secs(60), test)
        .await
        .expect("test timed out");
}

/// Await `fut` for at most 15 s; a hang names the step that hung.
async fn step<T>(name: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(15), fut)
        .await
        .unwrap_or_else(|_| panic!("step {name:?} did not finish within 15 s"))
}

/// The shared broker: AMQP_URL, default amqp://guest:guest@127.0.0.1:5672/%2f.
fn amqp_url() -> String {
    tidemark_harness::services::amqp_url().unwrap_or_else(|e| panic!("{e}"))
}

/// `url` with its `host:port` replaced by `127.0.0.1:<port>`.
fn at_port(url: &str, port: u16) -> String {
    let hp = tidemark_harness::services::host_port(url);
    url.replacen(hp, &format!("127.0.0.1:{port}"), 1)
}

fn test_config(url: &str) -> BusConfig {
    let id: u64 = rand::rng().random();
    let mut cfg = BusConfig::new(url);
    cfg.prefix = format!("tmtest.{id:x}");
    cfg.records_exchange = format!("tmtest.{id:x}.records");
    cfg.retry_tiers = vec![Duration::from_secs(1)];
    cfg.delivery_limit = 2;
    cfg.confirm_timeout = Duration::from_secs(8);
    cfg
}

/// Delete everything a test declared, through the shared broker itself.
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

fn page(seq: u64, n: usize) -> OutPage {
    OutPage {
        feed: "orders".into(),
        tenant: None,
        partition: "a".into(),
        seq,
        per: DeliveryPer::Record,
        page_message_id: format!("page-{seq}"),
        parent: None,
        records: (0..n)
            .map(|i| OutRecord {
                parent_key: None,
                key: format!("{seq}-{i}"),
                message_id: format!("m-{seq}-{i}"),
                body: bytes::Bytes::from(format!(r#"{{"id":"{seq}-{i}"}}"#)),
            })
            .collect(),
    }
}

/// A port nothing listens on (a node that is down).
async fn dead_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

/// A TCP proxy in front of the shared broker, standing for one node of a
/// cluster: it can hold the broker's replies (so confirms stay pending)
/// and go away (listener closed, every connection cut).
struct Node {
    port: u16,
    hold: watch::Sender<bool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Node {
    async fn start(target: String) -> Node {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (hold, _) = watch::channel(false);
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (c2, h2) = (conns.clone(), hold.clone());
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let target = target.clone();
                let mut held = h2.subscribe();
                let h = tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let (mut from_client, mut to_client) = inbound.into_split();
                    let (mut from_broker, mut to_broker) = outbound.into_split();
                    let up = tokio::io::copy(&mut from_client, &mut to_broker);
                    let down = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = from_broker.read(&mut buf).await?;
                            if n == 0 {
                                return Ok::<_, std::io::Error>(());
                            }
                            // While held, the broker's bytes wait here.
                            let _ = held.wait_for(|h| !*h).await;
                            to_client.write_all(&buf[..n]).await?;
                        }
                    };
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                    }
                });
                c2.lock().unwrap().push(h);
            }
        });
        Node {
            port,
            hold,
            conns,
            accept,
        }
    }

    /// Connections open through this node.
    fn live(&self) -> usize {
        self.conns
            .lock()
            .unwrap()
            .iter()
            .filter(|h| !h.is_finished())
            .count()
    }

    /// Stop passing the broker's bytes to clients: confirms stay pending.
    fn hold_replies(&self) {
        self.hold.send_replace(true);
    }

    /// The node goes away: nothing listens on its port any more and every
    /// connection through it is cut (both ends see it closed).
    fn kill(&self) {
        self.accept.abort();
        for h in self.conns.lock().unwrap().drain(..) {
            h.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_list_whose_first_nodes_are_down_connects_whatever_the_order() {
    within(body_a_list_whose_first_nodes_are_down_connects_whatever_the_order()).await;
}

async fn body_a_list_whose_first_nodes_are_down_connects_whatever_the_order() {
    let url = amqp_url();
    let broker = tidemark_harness::services::host_port(&url).to_string();
    let (d1, d2) = (dead_port().await, dead_port().await);
    // Whole URLs, and the short form: later entries give only host:port
    // and take the scheme, credentials and vhost of the first.
    let whole = format!("{},{},{url}", at_port(&url, d1), at_port(&url, d2));
    let short = format!("{}, 127.0.0.1:{d2} ,{broker}", at_port(&url, d1));
    for list in [&whole, &short] {
        // A fresh order each time: 8 tries miss the live node's every
        // position with a chance of (2/3)^8 < 4 %.
        for _ in 0..8 {
            let conn = step("open", open_connection(list, None)).await.unwrap();
            assert!(conn.status().connected());
            let _ = conn.close(200, "bye".into()).await;
        }
        let cfg = test_config(list);
        let bus = step("start", AmqpBus::start(cfg.clone(), false))
            .await
            .unwrap();
        let on = bus.connected_to().unwrap();
        assert!(on.contains(&broker), "connected to {on}");
        assert!(!on.contains("guest@"), "the password shows: {on}");
        bus.publish_task(&task(1), None).await.unwrap();
        bus.close().await;
        cleanup(&cfg).await;
    }
    // No node up: every node's error, none with its password.
    let all_dead = format!("{},127.0.0.1:{d2}", at_port(&url, d1));
    let err = open_connection(&all_dead, None).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, BusError::NoNode(_)), "{text}");
    assert!(
        text.contains(&format!(":{d1}")) && text.contains(&format!(":{d2}")),
        "{text}"
    );
    assert!(!text.contains("guest@"), "the password shows: {text}");
    let mut cfg = test_config(&all_dead);
    cfg.connect_wait = Duration::from_secs(1);
    match AmqpBus::start(cfg, false).await {
        Err(BusError::Unreachable(why)) => assert!(why.contains(&format!(":{d2}")), "{why}"),
        Err(e) => panic!("expected every node's error, got {e}"),
        Ok(_) => panic!("connected to nothing"),
    }
    // A list that does not parse fails at once, without the password.
    let bad = format!("{url},user:canary@host");
    match AmqpBus::start(test_config(&bad), false).await {
        Err(BusError::Url(why)) => assert!(why.contains("entry 2") && !why.contains("canary")),
        Err(e) => panic!("expected a URL error, got {e}"),
        Ok(_) => panic!("took a malformed list"),
    }
}

/// A queue bound to the records exchange, consumed with auto-ack, on the
/// shared broker directly.
async fn subscriber(cfg: &BusConfig) -> (Connection, lapin::Consumer) {
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    tidemark_bus::amqp::declare_records_exchange(&ch, &cfg.records_exchange)
        .await
        .unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn losing_the_node_fails_what_was_in_flight_and_recovers_through_another() {
    within(body_losing_the_node_fails_what_was_in_flight_and_recovers_through_another()).await;
}

async fn body_losing_the_node_fails_what_was_in_flight_and_recovers_through_another() {
    let url = amqp_url();
    let broker = tidemark_harness::services::host_port(&url).to_string();
    let nodes = [
        Node::start(broker.clone()).await,
        Node::start(broker.clone()).await,
    ];
    let list = format!(
        "{},127.0.0.1:{}",
        at_port(&url, nodes[0].port),
        nodes[1].port
    );
    let cfg = test_config(&list);
    let bus = step("start", AmqpBus::start(cfg.clone(), true))
        .await
        .unwrap();
    let (_sub_conn, mut downstream) = subscriber(&cfg).await;
    let i = (0..2)
        .find(|&i| nodes[i].live() > 0)
        .expect("the bus is connected through one of the nodes");
    let (on, other) = (&nodes[i], &nodes[1 - i]);
    assert_eq!(other.live(), 0);
    assert!(
        bus.connected_to()
            .unwrap()
            .contains(&format!(":{}", on.port))
    );

    // A task taken before the loss and not acked yet.
    step("publish 1", bus.publish_task(&task(1), None))
        .await
        .unwrap();
    let held = step("deliver 1", bus.next_delivery()).await.unwrap();
    assert_eq!(held.task().unwrap().seq, 1);

    // Publishes in flight: the node passes them to the broker but holds
    // its confirms, then goes away.
    on.hold_replies();
    let mut in_flight: Vec<(u64, JoinHandle<Result<(), BusError>>)> = (10..20u64)
        .map(|seq| {
            let bus = bus.clone();
            (
                seq,
                tokio::spawn(async move { bus.publish_task(&task(seq), None).await }),
            )
        })
        .collect();
    let page_in_flight = {
        let bus = bus.clone();
        tokio::spawn(async move { bus.publish_page(&page(0, 5)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        in_flight.iter().all(|(_, h)| !h.is_finished()) && !page_in_flight.is_finished(),
        "a publish finished while its confirm was held"
    );
    let cut = Instant::now();
    on.kill();
    let mut failed = BTreeSet::new();
    for (seq, h) in in_flight.drain(..) {
        match step("in-flight publish", h).await.unwrap() {
            Ok(()) => panic!("task {seq} was in flight at the cut and came back confirmed"),
            Err(_) => failed.insert(seq),
        };
    }
    let page_result = step("in-flight page", page_in_flight).await.unwrap();
    assert!(
        page_result.is_err(),
        "a page in flight at the cut came back confirmed"
    );
    assert!(
        cut.elapsed() < cfg.confirm_timeout,
        "the in-flight publishes failed only at the confirm timeout ({:?})",
        cut.elapsed()
    );

    // The delivery's channel is gone with the node: acking it is refused.
    assert!(matches!(
        step("ack after the loss", held.ack()).await,
        Err(BusError::Abandoned)
    ));

    // The publisher recovers through the other node.
    let mut recovered = None;
    while cut.elapsed() < Duration::from_secs(10) {
        if bus.publish_task(&task(100), None).await.is_ok() {
            recovered = Some(cut.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recovered = recovered.expect("the publisher did not recover within 10 s");
    let now_on = bus.connected_to().unwrap();
    assert!(now_on.contains(&format!(":{}", other.port)), "{now_on}");
    assert!(other.live() > 0);
    step("page after the loss", bus.publish_page(&page(1, 3)))
        .await
        .unwrap();

    // The consumer recovers through it too: the new task, and the one held
    // at the loss, redelivered. Tasks whose publish failed may be there
    // as well (the broker had them; a retry would make duplicates, never
    // a loss).
    let mut seen = BTreeSet::new();
    let mut redelivered_1 = false;
    while !(seen.contains(&100) && redelivered_1) {
        let d = step("deliveries after the loss", bus.next_delivery())
            .await
            .unwrap();
        let seq = d.task().unwrap().seq;
        if seq == 1 {
            redelivered_1 = d.redelivered;
        }
        seen.insert(seq);
        d.ack().await.unwrap();
    }
    // Downstream: the page published after the loss arrives.
    let mut pages = BTreeSet::new();
    while !pages.contains("1") {
        let d = step("downstream", downstream.next())
            .await
            .unwrap()
            .unwrap();
        let headers = d.properties.headers().clone().unwrap_or_default();
        if let Some(AMQPValue::LongLongInt(n)) = headers.inner().get("x-page-seq") {
            pages.insert(n.to_string());
        }
    }
    eprintln!(
        "node lost: {} in-flight publishes failed, recovered in {recovered:?}, \
         {} of the failed tasks were stored anyway",
        failed.len(),
        seen.iter().filter(|s| failed.contains(s)).count()
    );
    bus.close().await;
    cleanup(&cfg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queues_are_quorum_queues_and_a_mismatch_says_how_to_migrate() {
    within(body_queues_are_quorum_queues_and_a_mismatch_says_how_to_migrate()).await;
}

fn longstr(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v.to_string()))
}

/// The arguments tidemark declares `queue` of `cfg` with, as an outside
/// client would write them, with `x-queue-type` `kind`.
fn args_of(cfg: &BusConfig, queue: &str, kind: &str) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), longstr(kind));
    if let Some(n) = cfg.quorum_initial_group_size {
        args.insert(
            "x-quorum-initial-group-size".into(),
            AMQPValue::LongLongInt(n.into()),
        );
    }
    if queue == cfg.tasks_queue() {
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(cfg.delivery_limit.into()),
        );
        args.insert("x-dead-letter-exchange".into(), longstr(""));
        args.insert(
            "x-dead-letter-routing-key".into(),
            longstr(&cfg.dead_queue()),
        );
    } else if queue != cfg.dead_queue() {
        let tier = cfg
            .retry_tiers
            .iter()
            .find(|t| cfg.retry_queue(**t) == queue)
            .expect("a delay tier's queue");
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(tier.as_millis() as i64),
        );
        args.insert("x-dead-letter-exchange".into(), longstr(""));
        args.insert(
            "x-dead-letter-routing-key".into(),
            longstr(&cfg.tasks_queue()),
        );
        args.insert("x-dead-letter-strategy".into(), longstr("at-least-once"));
        args.insert("x-overflow".into(), longstr("reject-publish"));
    }
    args
}

/// Declare `queue` (durable) with `args` on the shared broker.
async fn declare_as(queue: &str, args: FieldTable) -> Result<(), lapin::Error> {
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let r = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .map(|_| ());
    let _ = conn.close(200, "bye".into()).await;
    r
}

async fn body_queues_are_quorum_queues_and_a_mismatch_says_how_to_migrate() {
    let url = amqp_url();
    let mut cfg = test_config(&url);
    cfg.quorum_initial_group_size = Some(1);
    let bus = step("start", AmqpBus::start(cfg.clone(), true))
        .await
        .unwrap();
    // Every queue is a quorum queue with exactly these arguments: the
    // broker takes them again, and refuses the same as a classic queue.
    for q in cfg.queue_names() {
        declare_as(&q, args_of(&cfg, &q, "quorum")).await.unwrap();
        let e = declare_as(&q, args_of(&cfg, &q, "classic"))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("x-queue-type"), "{q}: {e}");
    }
    // Declaring again, as every role does on every (re)connection, works.
    let again = step("start again", AmqpBus::start(cfg.clone(), false))
        .await
        .unwrap();
    again.close().await;
    // A delayed task goes through the quorum delay tier and comes back.
    let sent = Instant::now();
    bus.publish_task(&task(2), Some(Duration::from_millis(500)))
        .await
        .unwrap();
    let d = step("delayed", bus.next_delivery()).await.unwrap();
    assert_eq!(d.task().unwrap().seq, 2);
    assert!(
        sent.elapsed() >= Duration::from_millis(900),
        "{:?}",
        sent.elapsed()
    );
    // Handed back past the delivery limit, it is dead-lettered by the
    // broker, which says so (its first death was the delay's expiry).
    d.requeue().await.unwrap();
    for _ in 0..cfg.delivery_limit {
        step("redelivery", bus.next_delivery())
            .await
            .unwrap()
            .requeue()
            .await
            .unwrap();
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
    bus.close().await;

    // Another initial group size than the queues were created with: a
    // clear error at once, not a wait for the connection.
    let mut other = cfg.clone();
    other.quorum_initial_group_size = None;
    let started = Instant::now();
    match AmqpBus::start(other, false).await {
        Err(BusError::Topology(why)) => {
            assert!(why.contains("x-quorum-initial-group-size"), "{why}");
            assert!(why.contains("--quorum-initial-group-size"), "{why}");
        }
        Err(e) => panic!("expected a topology error, got {e}"),
        Ok(_) => panic!("started against queues of another group size"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    cleanup(&cfg).await;

    // A classic tasks queue left by an older setup: how to migrate.
    let old = test_config(&url);
    let mut classic = FieldTable::default();
    classic.insert("x-queue-type".into(), longstr("classic"));
    declare_as(&old.tasks_queue(), classic).await.unwrap();
    match AmqpBus::start(old.clone(), true).await {
        Err(BusError::Topology(why)) => {
            // The broker names the first argument that differs (here the
            // dead-letter exchange, which it compares before the type).
            assert!(why.contains(&old.tasks_queue()), "{why}");
            assert!(why.contains("PRECONDITION_FAILED"), "{why}");
            assert!(why.contains("classic queue"), "{why}");
            assert!(why.contains("delete_queue"), "{why}");
        }
        Err(e) => panic!("expected a topology error, got {e}"),
        Ok(_) => panic!("started on a classic tasks queue"),
    }
    cleanup(&old).await;
}
