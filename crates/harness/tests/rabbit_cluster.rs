//! The private RabbitMQ cluster of `tidemark_harness::rabbit_cluster`, and
//! what a quorum queue on it survives: three nodes, a queue with three
//! replicas declared through node 0 (its leader starts there), publishes
//! confirmed through node 1, then node 0 SIGKILLed: the queue still takes
//! confirmed publishes and delivers every message through node 2, and node
//! 0 rejoins after a restart. Prints the boot and failover times.
//!
//! Skips (saying why) where the cluster cannot run: not root, no
//! `rabbitmq-server` package, or `TIDEMARK_SKIP_RABBIT_CLUSTER` set (see
//! `RabbitCluster::unavailable`).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties,
    DefaultConnectionBuilder,
};
use tidemark_harness::rabbit_cluster::{RabbitCluster, skip_reason};

/// Messages published through node 1 before the kill, through node 2
/// before it, and through node 2 after it; ids 0..TOTAL in that order.
const BEFORE: usize = 200;
const WARM_UP: usize = 10;
const AFTER: usize = 200;
const TOTAL: usize = BEFORE + WARM_UP + AFTER;

fn s(v: &str) -> ShortString {
    v.into()
}

async fn connect(url: &str, name: &str) -> Connection {
    DefaultConnectionBuilder::new()
        .expect("a lapin connection builder")
        .with_uri_str(url.to_owned())
        .with_properties(ConnectionProperties::default().with_connection_name(name.into()))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect {name} to {url}: {e}"))
}

async fn confirm_channel(conn: &Connection) -> Channel {
    let ch = conn.create_channel().await.expect("a channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    ch
}

/// Publishes `ids` to `queue` (default exchange, persistent) and waits for
/// every confirm; Err names the first that was not acked.
async fn publish_confirmed(ch: &Channel, queue: &str, ids: &[usize]) -> Result<(), String> {
    let mut confirms = Vec::with_capacity(ids.len());
    for id in ids {
        let confirm = ch
            .basic_publish(
                s(""),
                s(queue),
                BasicPublishOptions::default(),
                id.to_string().as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .map_err(|e| format!("publish {id}: {e}"))?;
        confirms.push((id, confirm));
    }
    for (id, confirm) in confirms {
        match confirm.await.map_err(|e| format!("confirm of {id}: {e}"))? {
            Confirmation::Ack(None) => {}
            other => return Err(format!("message {id}: {other:?}")),
        }
    }
    Ok(())
}

/// Polls `check` every 200 ms for up to `within`; how long it took to pass.
async fn until<F, Fut>(what: &str, within: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool, String>>,
{
    let t0 = Instant::now();
    let mut last = String::new();
    loop {
        match check().await {
            Ok(true) => return t0.elapsed(),
            Ok(false) => {}
            Err(e) => last = e,
        }
        assert!(
            t0.elapsed() < within,
            "{what}: not within {within:?} (last error: {last})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queue_survives_the_loss_of_a_node() {
    let t_all = Instant::now();
    let mut cluster = match RabbitCluster::start(3).await {
        Ok(c) => c,
        Err(e) => match skip_reason(&e) {
            Some(why) => {
                eprintln!("SKIPPED: the private RabbitMQ cluster test: {why}");
                return;
            }
            None => panic!("{e}"),
        },
    };
    let boot = cluster.boot_time();
    eprintln!(
        "rabbit_cluster: 3 nodes booted and clustered in {boot:.1?}: {}",
        cluster.amqp_url_list()
    );
    let names = cluster.node_names();
    assert_eq!(names.len(), 3);
    assert_eq!(cluster.amqp_urls().len(), 3);
    assert_eq!(
        cluster.running_nodes(2).await.expect("cluster_status"),
        vec![0, 1, 2]
    );

    // A quorum queue with three replicas, declared through node 0.
    let queue = format!("tidemark.failover.{}", uuid::Uuid::new_v4().simple());
    let admin = connect(&cluster.amqp_url(0), "admin").await;
    let ch = admin.create_channel().await.expect("a channel");
    let mut args = FieldTable::default();
    args.insert(
        s("x-queue-type"),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    args.insert(s("x-quorum-initial-group-size"), AMQPValue::LongInt(3));
    ch.queue_declare(
        s(&queue),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .expect("declare the quorum queue");
    let members = cluster
        .quorum_members(0, &queue)
        .await
        .expect("quorum_status");
    eprintln!("rabbit_cluster: quorum members before the kill: {members:?}");
    assert_eq!(
        members.iter().map(|m| m.node).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    let leader = members
        .iter()
        .find(|m| m.raft_state == "leader")
        .map(|m| m.node);
    assert_eq!(leader, Some(0), "the declaring node leads: {members:?}");

    // Publishes confirmed through node 1; its client is found there.
    let publisher = connect(&cluster.amqp_url(1), "publisher").await;
    let pub_ch = confirm_channel(&publisher).await;
    let before: Vec<usize> = (0..BEFORE).collect();
    publish_confirmed(&pub_ch, &queue, &before)
        .await
        .expect("confirmed publishes before the kill");
    assert_eq!(
        cluster
            .node_of_connection("publisher")
            .await
            .expect("list_connections"),
        Some(1)
    );
    let on_0 = cluster.connections_on(0).await.expect("list_connections");
    assert!(
        on_0.iter()
            .any(|c| c.connection_name.as_deref() == Some("admin") && c.user == "guest"),
        "{on_0:?}"
    );

    // A publisher on node 2 that was at work before the kill: its channel
    // has published to the queue (a channel whose *first* publish to the
    // queue falls in the election is nacked for good on RabbitMQ 3.10; see
    // `a_channel_first_publishing_during_the_election_stays_nacked`).
    let survivor = connect(&cluster.amqp_url(2), "survivor").await;
    let mut survivor_pub = confirm_channel(&survivor).await;
    let warm_up: Vec<usize> = (BEFORE..BEFORE + WARM_UP).collect();
    publish_confirmed(&survivor_pub, &queue, &warm_up)
        .await
        .expect("confirmed publishes through node 2 before the kill");

    // SIGKILL node 0: the queue's leader.
    let killed_at = Instant::now();
    cluster.kill(0).await.expect("SIGKILL node 0");
    assert!(!cluster.is_running(0));
    assert!(
        cluster.kill(0).await.is_err(),
        "a node not running is not killed"
    );
    drop(admin); // its node is gone

    // Publishes confirmed through node 2, right away. A batch not
    // confirmed (nacked, or no confirm within 10 s) may or may not be in
    // the queue: it is published again on a new channel (at-least-once,
    // as tidemark's bus must), and duplicates are allowed below.
    let mut first_confirm_after = None;
    let mut failed_batches = Vec::new();
    let mut next = BEFORE + WARM_UP;
    let deadline = Instant::now() + Duration::from_secs(120);
    while next < TOTAL {
        let batch: Vec<usize> = (next..(next + 20).min(TOTAL)).collect();
        let outcome = tokio::time::timeout(
            Duration::from_secs(10),
            publish_confirmed(&survivor_pub, &queue, &batch),
        )
        .await
        .unwrap_or_else(|_| Err("no confirm within 10 s".into()));
        match outcome {
            Ok(()) => {
                first_confirm_after.get_or_insert(killed_at.elapsed());
                next += batch.len();
            }
            Err(e) => {
                failed_batches.push(format!("{:.1?}: {e}", killed_at.elapsed()));
                tokio::time::sleep(Duration::from_millis(200)).await;
                survivor_pub = confirm_channel(&survivor).await;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no confirmed publishes through node 2 within 120 s: {failed_batches:?}"
        );
    }
    let first_confirm_after = first_confirm_after.expect("a confirmed publish");

    // A new leader among the survivors.
    let members = cluster
        .quorum_members(1, &queue)
        .await
        .expect("quorum_status");
    eprintln!("rabbit_cluster: quorum members after the kill: {members:?}");
    let leader = members
        .iter()
        .find(|m| m.raft_state == "leader")
        .map(|m| m.node);
    assert!(matches!(leader, Some(1 | 2)), "{members:?}");

    // Every message, before and after the kill, delivered through node 2.
    let consume_ch = survivor.create_channel().await.expect("a channel");
    consume_ch
        .basic_qos(100, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = consume_ch
        .basic_consume(
            s(&queue),
            s("failover-test"),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume through node 2");
    let mut seen = BTreeSet::new();
    let mut deliveries = 0usize;
    let all_delivered = tokio::time::timeout(Duration::from_secs(120), async {
        while seen.len() < TOTAL {
            let d = consumer
                .next()
                .await
                .expect("the consumer stays open")
                .expect("a delivery");
            let id: usize = String::from_utf8_lossy(&d.data).parse().expect("an id");
            seen.insert(id);
            deliveries += 1;
            d.acker.ack(BasicAckOptions::default()).await.expect("ack");
        }
    })
    .await;
    assert!(
        all_delivered.is_ok(),
        "only {} of {} messages delivered within 120 s",
        seen.len(),
        TOTAL
    );
    let delivered_after = killed_at.elapsed();
    assert_eq!(seen, (0..TOTAL).collect::<BTreeSet<_>>(), "nothing lost");
    assert_eq!(
        cluster
            .node_of_connection("survivor")
            .await
            .expect("list_connections"),
        Some(2)
    );

    // Node 0 back: it rejoins the cluster and the queue.
    let rejoin = cluster.restart(0).await.expect("restart node 0");
    for i in 0..3 {
        assert_eq!(
            cluster.running_nodes(i).await.expect("cluster_status"),
            vec![0, 1, 2]
        );
    }
    let member_again = until(
        "node 0 back in the quorum",
        Duration::from_secs(120),
        || {
            let cluster = &cluster;
            let queue = &queue;
            async move {
                let m = cluster
                    .quorum_members(0, queue)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(m.len() == 3
                    && m.iter()
                        .all(|m| m.raft_state == "leader" || m.raft_state == "follower"))
            }
        },
    )
    .await;
    // And it serves clients again: publish through it, consume on node 2.
    let back = connect(&cluster.amqp_url(0), "back").await;
    let back_ch = confirm_channel(&back).await;
    publish_confirmed(&back_ch, &queue, &[TOTAL])
        .await
        .expect("a confirmed publish through the restarted node");
    let d = tokio::time::timeout(Duration::from_secs(60), consumer.next())
        .await
        .expect("a delivery within 60 s")
        .expect("the consumer stays open")
        .expect("a delivery");
    assert_eq!(String::from_utf8_lossy(&d.data), (TOTAL).to_string());
    d.acker.ack(BasicAckOptions::default()).await.expect("ack");

    drop((back, survivor, publisher));
    let t_stop = Instant::now();
    cluster.stop().await.expect("stop the cluster");
    eprintln!(
        "rabbit_cluster: boot {boot:.1?}; after SIGKILL of the leader's node: first \
         confirmed publish through node 2 at {first_confirm_after:.1?} ({retried} batches \
         published again), all {total} messages delivered ({deliveries} deliveries, {dups} \
         duplicates) at {delivered_after:.1?}; restart and rejoin {rejoin:.1?}, back in the \
         quorum {member_again:.1?} later; stop {stop:.1?}; whole test {all:.1?}",
        total = TOTAL,
        retried = failed_batches.len(),
        dups = deliveries - seen.len(),
        stop = t_stop.elapsed(),
        all = t_all.elapsed(),
    );
}

/// What the main test steps around, shown (RabbitMQ 3.10.8, Debian 12):
/// a confirm-mode channel whose first publish to a quorum queue falls in
/// the election after its leader's node was SIGKILLed is nacked, and keeps
/// being nacked on that queue for as long as it is open (over two minutes
/// seen), while a channel that had published before the kill, and any
/// channel opened after the election, are acked. A publisher must take a
/// nack as "open a new channel", not only as "publish again".
/// Ignored: it shows a broker behaviour (a later RabbitMQ may not have it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "shows a RabbitMQ 3.10 behaviour; run with --ignored"]
async fn a_channel_first_publishing_during_the_election_stays_nacked() {
    let mut cluster = match RabbitCluster::start(3).await {
        Ok(c) => c,
        Err(e) => match skip_reason(&e) {
            Some(why) => {
                eprintln!("SKIPPED: the private RabbitMQ cluster test: {why}");
                return;
            }
            None => panic!("{e}"),
        },
    };
    let queue = format!("tidemark.election.{}", uuid::Uuid::new_v4().simple());
    let admin = connect(&cluster.amqp_url(0), "admin").await;
    let ch = admin.create_channel().await.expect("a channel");
    let mut args = FieldTable::default();
    args.insert(
        s("x-queue-type"),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    ch.queue_declare(
        s(&queue),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .expect("declare the quorum queue");
    let survivor = connect(&cluster.amqp_url(2), "survivor").await;
    let fresh = confirm_channel(&survivor).await;
    let warm = confirm_channel(&survivor).await;
    publish_confirmed(&warm, &queue, &[0])
        .await
        .expect("a publish before the kill");

    let killed_at = Instant::now();
    cluster.kill(0).await.expect("SIGKILL the leader's node");
    let mut fresh_results = Vec::new();
    let mut warm_results = Vec::new();
    let mut new_results = Vec::new();
    for n in 1..=10 {
        let within = |r: Result<Result<(), String>, _>| {
            let ok = matches!(r, Ok(Ok(())));
            (killed_at.elapsed(), ok)
        };
        let timeout = Duration::from_secs(5);
        fresh_results.push(within(
            tokio::time::timeout(timeout, publish_confirmed(&fresh, &queue, &[n])).await,
        ));
        warm_results.push(within(
            tokio::time::timeout(timeout, publish_confirmed(&warm, &queue, &[n])).await,
        ));
        if killed_at.elapsed() > Duration::from_secs(3) {
            let new = confirm_channel(&survivor).await;
            new_results.push(within(
                tokio::time::timeout(timeout, publish_confirmed(&new, &queue, &[n])).await,
            ));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    eprintln!("rabbit_cluster: first publish during the election: {fresh_results:.1?}");
    eprintln!("rabbit_cluster: published before the kill too: {warm_results:.1?}");
    eprintln!("rabbit_cluster: new channel after 3 s: {new_results:.1?}");
    assert!(warm_results.iter().all(|r| r.1), "{warm_results:?}");
    assert!(!new_results.is_empty() && new_results.iter().all(|r| r.1));
    if fresh_results.iter().any(|r| r.1) {
        eprintln!(
            "rabbit_cluster: this broker recovers such a channel (no longer the 3.10 behaviour)"
        );
    }
    cluster.stop().await.expect("stop the cluster");
}
