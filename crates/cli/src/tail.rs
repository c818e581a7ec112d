//! `tidemark tail`: a downstream subscriber. It binds a queue to the records
//! exchange (private and temporary, or with `--queue` a durable one that
//! keeps what arrives while it is stopped) and prints every record as a JSON
//! line, optionally dropping message ids it has already printed (the
//! consumer side of the delivery guarantee).

use std::collections::HashSet;
use std::future::Future;
use std::io::Write;

use clap::Args;
use tidemark_bus::amqp::SubscribeOptions;
use tidemark_bus::subscriber::Subscription;

use crate::exit::Failure;
use crate::tls::{TlsArgs, explain};

#[derive(Args, Debug, Clone)]
pub struct TailArgs {
    #[command(flatten)]
    pub amqp: crate::services::AmqpArg,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[arg(
        long,
        env = "TIDEMARK_RECORDS_EXCHANGE",
        default_value = "tidemark.records"
    )]
    pub records_exchange: String,
    /// Consume from this durable queue (declared and bound if missing)
    /// instead of a private one: records that arrive while tail is stopped
    /// wait for it there.
    #[arg(long, env = "TIDEMARK_TAIL_QUEUE")]
    pub queue: Option<String>,
    /// Only this feed (routing key `<feed>.#`).
    #[arg(long)]
    pub feed: Option<String>,
    /// Only this tenant of tenanted feeds (routing key `<feed>.<tenant>.#`,
    /// or `*.<tenant>.#` without --feed).
    #[arg(long)]
    pub tenant: Option<String>,
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
    let pattern = match (&args.feed, &args.tenant) {
        (Some(f), None) => format!("{f}.#"),
        (Some(f), Some(t)) => format!("{f}.{t}.#"),
        (None, Some(t)) => format!("*.{t}.#"),
        (None, None) => "#".to_string(),
    };
    let ca_pem = args.tls.ca_pem()?;
    let mut sub = Subscription::start(
        &args.amqp.url,
        &args.records_exchange,
        &pattern,
        "tidemark-tail",
        SubscribeOptions {
            queue: args.queue.as_deref(),
            no_ack: false,
            tls_ca_pem: ca_pem.as_deref(),
        },
    )
    .await
    .map_err(|e| {
        Failure::runtime(format!(
            "cannot subscribe to {}: {}",
            args.records_exchange,
            explain(e)
        ))
    })?;
    let _ = writeln!(
        err,
        "tidemark tail: bound {} to {} with {pattern}; Ctrl-C stops",
        sub.queue(),
        args.records_exchange
    );
    let mut seen: HashSet<String> = HashSet::new();
    let (mut printed, mut dropped) = (0u64, 0u64);
    tokio::pin!(shutdown);
    loop {
        let m = tokio::select! {
            () = &mut shutdown => break,
            m = sub.next() => match m {
                Some(Ok(m)) => m,
                Some(Err(e)) => return Err(Failure::runtime(format!("delivery: {e}"))),
                None => break,
            },
        };
        if args.dedupe && !seen.insert(m.message_id.clone().unwrap_or_default()) {
            dropped += 1;
        } else {
            out.write_all(&m.body)
                .and_then(|_| out.write_all(b"\n"))
                .map_err(|e| Failure::runtime(format!("cannot write: {e}")))?;
            printed += 1;
        }
        let _ = m.ack().await;
        if args.limit.is_some_and(|l| printed >= l) {
            break;
        }
    }
    let _ = out.flush();
    let _ = writeln!(
        err,
        "tidemark tail: {printed} message(s) printed, {dropped} repeat(s) dropped"
    );
    sub.close().await;
    Ok(())
}
