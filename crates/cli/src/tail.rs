//! `tidemark tail`: a downstream subscriber. It binds a private, temporary
//! queue to the records exchange and prints every record as a JSON line,
//! optionally dropping message ids it has already printed (the consumer side
//! of the delivery guarantee).

use std::collections::HashSet;
use std::future::Future;
use std::io::Write;

use clap::Args;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};

use crate::exit::Failure;

#[derive(Args, Debug, Clone)]
pub struct TailArgs {
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    #[arg(
        long,
        env = "TIDEMARK_RECORDS_EXCHANGE",
        default_value = "tidemark.records"
    )]
    pub records_exchange: String,
    /// Only this feed (routing key `<feed>.#`).
    #[arg(long)]
    pub feed: Option<String>,
    /// Drop records whose message id was already printed.
    #[arg(long)]
    pub dedupe: bool,
    /// Stop after this many records.
    #[arg(long)]
    pub limit: Option<u64>,
}

pub async fn run(
    args: &TailArgs,
    shutdown: impl Future<Output = ()>,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> Result<(), Failure> {
    let fail = |what: &str, e: lapin::Error| Failure::runtime(format!("{what}: {e}"));
    let conn = Connection::connect(&args.amqp_url, ConnectionProperties::default())
        .await
        .map_err(|e| fail("cannot connect to RabbitMQ", e))?;
    let ch = conn
        .create_channel()
        .await
        .map_err(|e| fail("channel", e))?;
    ch.exchange_declare(
        args.records_exchange.as_str().into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(|e| fail("declare the records exchange", e))?;
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
        .map_err(|e| fail("declare a queue", e))?;
    let pattern = match &args.feed {
        Some(f) => format!("{f}.#"),
        None => "#".to_string(),
    };
    ch.queue_bind(
        q.name().as_str().into(),
        args.records_exchange.as_str().into(),
        pattern.as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(|e| fail("bind", e))?;
    let mut consumer = ch
        .basic_consume(
            q.name().as_str().into(),
            "tidemark-tail".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| fail("consume", e))?;
    let _ = writeln!(
        err,
        "tidemark tail: bound {} to {} with {pattern}; Ctrl-C stops",
        q.name(),
        args.records_exchange
    );
    let mut seen: HashSet<String> = HashSet::new();
    let (mut printed, mut dropped) = (0u64, 0u64);
    tokio::pin!(shutdown);
    loop {
        let d = tokio::select! {
            () = &mut shutdown => break,
            d = consumer.next() => match d {
                Some(Ok(d)) => d,
                Some(Err(e)) => return Err(fail("delivery", e)),
                None => break,
            },
        };
        let id = d
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        if args.dedupe && !seen.insert(id) {
            dropped += 1;
        } else {
            out.write_all(&d.data)
                .and_then(|_| out.write_all(b"\n"))
                .map_err(|e| Failure::runtime(format!("cannot write: {e}")))?;
            printed += 1;
        }
        let _ = d.ack(BasicAckOptions::default()).await;
        if args.limit.is_some_and(|l| printed >= l) {
            break;
        }
    }
    let _ = out.flush();
    let _ = writeln!(
        err,
        "tidemark tail: {printed} message(s) printed, {dropped} repeat(s) dropped"
    );
    let _ = conn.close(200, "bye".into()).await;
    Ok(())
}
