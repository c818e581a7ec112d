//! Downstream publishing against the broker's ceiling (docs/BENCHMARKS.md).
//!
//! `cargo run --release -p tidemark-bus --example publish_bench [SECONDS]`
//! In one run against AMQP_URL, into one quorum queue bound to a throwaway
//! exchange: a minimal lapin publisher with batched confirms (the ceiling),
//! for 330-byte and 330 kB messages; then the bus publishing pages of 1000
//! records per record and per page.

use std::time::{Duration, Instant};

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tidemark_bus::amqp::{AmqpBus, BusConfig};
use tidemark_bus::{Downstream, OutPage, OutRecord};
use tidemark_core::config::DeliveryPer;

const RECORD: usize = 330;

fn record(i: usize) -> bytes::Bytes {
    let head = format!(r#"{{"id":"{i:012}","payload":""#);
    bytes::Bytes::from(format!("{head}{}\"}}", "x".repeat(RECORD - head.len() - 2)))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let secs: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let tag = format!("tmbench.{}", std::process::id());
    let exchange = format!("{tag}.records");
    let queue = format!("{tag}.sink");
    let conn = Connection::connect(&url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    tidemark_bus::amqp::declare_records_exchange(&ch, &exchange).await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum".to_string())),
    );
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await?;
    ch.queue_bind(
        queue.as_str().into(),
        exchange.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let run_for = Duration::from_secs(secs);

    // The ceiling: publish in batches of 1000, then wait for the batch's confirms.
    let ceiling = |size: usize| {
        let ch = ch.clone();
        let exchange = exchange.clone();
        async move {
            let body = vec![b'x'; size];
            let batch = if size > 10_000 { 10 } else { 1000 };
            let (start, mut n) = (Instant::now(), 0u64);
            while start.elapsed() < run_for {
                for _ in 0..batch {
                    ch.basic_publish(
                        exchange.as_str().into(),
                        "bench.a".into(),
                        BasicPublishOptions {
                            mandatory: true,
                            immediate: false,
                        },
                        &body,
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await?;
                }
                ch.wait_for_confirms().await?;
                n += batch as u64;
            }
            Ok::<(f64, f64), lapin::Error>((
                n as f64 / start.elapsed().as_secs_f64(),
                n as f64 * size as f64 / start.elapsed().as_secs_f64(),
            ))
        }
    };
    let (small_mps, _) = ceiling(RECORD).await?;
    ch.queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
        .await?;
    let (_, big_bps) = ceiling(RECORD * 1000).await?;
    ch.queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
        .await?;

    let mut cfg = BusConfig::new(&url);
    cfg.prefix = tag.clone();
    cfg.records_exchange = exchange.clone();
    let bus = AmqpBus::start(cfg.clone(), false).await?;
    // Built once, like the ceiling's body, so the bench does not compete with the broker for CPU.
    let template = std::sync::Arc::new(OutPage {
        feed: "bench".into(),
        tenant: None,
        partition: "a".into(),
        seq: 0,
        per: DeliveryPer::Record,
        page_message_id: "p".into(),
        parent: None,
        records: (0..1000)
            .map(|i| OutRecord {
                parent_key: None,
                key: i.to_string(),
                message_id: format!("m-{i}"),
                body: record(i),
            })
            .collect(),
    });
    let page = move |seq: u64, per: DeliveryPer| {
        let mut p = (*template).clone();
        p.seq = seq;
        p.per = per;
        p
    };
    // `jobs` pages in flight at once, as a worker running that many page tasks.
    let measure =
        async |per: DeliveryPer, jobs: usize| -> Result<(f64, f64), Box<dyn std::error::Error>> {
            let start = Instant::now();
            let mut tasks = Vec::new();
            for _ in 0..jobs {
                let bus = bus.clone();
                let page = page.clone();
                tasks.push(tokio::spawn(async move {
                    let mut pages = 0u64;
                    while start.elapsed() < run_for {
                        bus.publish_page(&page(pages, per)).await?;
                        pages += 1;
                    }
                    Ok::<u64, tidemark_bus::BusError>(pages)
                }));
            }
            let mut pages = 0;
            for t in tasks {
                pages += t.await??;
            }
            let t = start.elapsed().as_secs_f64();
            Ok((
                pages as f64 * 1000.0 / t,
                pages as f64 * 1000.0 * RECORD as f64 / t,
            ))
        };
    let (rec_mps, _) = measure(DeliveryPer::Record, 1).await?;
    ch.queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
        .await?;
    let (rec8_mps, _) = measure(DeliveryPer::Record, 8).await?;
    ch.queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
        .await?;
    let (page1_rps, page1_bps) = measure(DeliveryPer::Page, 1).await?;
    ch.queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
        .await?;
    let (page_rps, page_bps) = measure(DeliveryPer::Page, 8).await?;
    bus.close().await;

    println!("| publisher | messages/s | MB/s | vs ceiling |");
    println!("|---|---:|---:|---:|");
    println!(
        "| ceiling: lapin, 330 B messages, batched confirms | {small_mps:.0} | {:.1} | 1.00 |",
        small_mps * RECORD as f64 / 1e6
    );
    println!(
        "| ceiling: lapin, 330 kB messages, batched confirms | {:.0} | {:.1} | 1.00 |",
        big_bps / (RECORD * 1000) as f64,
        big_bps / 1e6
    );
    println!(
        "| bus, per record, 1 page in flight | {rec_mps:.0} | {:.1} | {:.2} of messages/s |",
        rec_mps * RECORD as f64 / 1e6,
        rec_mps / small_mps
    );
    println!(
        "| bus, per record, 8 pages in flight | {rec8_mps:.0} | {:.1} | {:.2} of messages/s |",
        rec8_mps * RECORD as f64 / 1e6,
        rec8_mps / small_mps
    );
    println!(
        "| bus, per page (330 kB), 1 page in flight | {:.0} | {:.1} | {:.2} of bytes/s |",
        page1_rps / 1000.0,
        page1_bps / 1e6,
        page1_bps / big_bps
    );
    println!(
        "| bus, per page (330 kB), 8 pages in flight | {:.0} | {:.1} | {:.2} of bytes/s |",
        page_rps / 1000.0,
        page_bps / 1e6,
        page_bps / big_bps
    );

    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = ch
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await;
    for q in cfg.queue_names() {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    Ok(())
}
