//! `tidemark status | pause | resume | rewind | retry`: see and steer feeds,
//! in a distributed deployment (Redis at `REDIS_URL`) or in an embedded
//! state directory (`--state-dir D`).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use clap::builder::TypedValueParser as _;
use tidemark_coordinator::ops::{self, Action, ActionReport, RewindTo};
use tidemark_embedded::StateDir;
use tidemark_state::StateStore;

use crate::exit::Failure;
use crate::tls::TlsArgs;

/// Where the jobs' state is.
#[derive(Args, Debug, Clone)]
pub struct Target {
    /// An embedded run's state directory (`tidemark run --state-dir`); without it, Redis.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    #[command(flatten)]
    pub redis: crate::services::RedisArg,
    /// Prefix of the deployment's Redis keys.
    #[arg(long, env = "TIDEMARK_REDIS_PREFIX", default_value = tidemark_state::DEFAULT_PREFIX)]
    pub redis_prefix: String,
    #[command(flatten)]
    pub tls: TlsArgs,
}

impl Target {
    async fn redis(&self) -> Result<Arc<dyn StateStore>, Failure> {
        let ca_pem = self.tls.ca_pem()?;
        Ok(
            crate::roles::connect_store(&self.redis.url, &self.redis_prefix, ca_pem.as_deref())
                .await?,
        )
    }

    /// The store to read from.
    async fn reader(&self) -> Result<Arc<dyn StateStore>, Failure> {
        match &self.state_dir {
            Some(d) => Ok(Arc::new(StateDir::new(d).read()?)),
            None => self.redis().await,
        }
    }

    async fn apply(
        &self,
        feed: &str,
        partition: Option<&str>,
        action: &Action,
    ) -> Result<ActionReport, Failure> {
        match &self.state_dir {
            Some(d) => Ok(StateDir::new(d).apply(feed, partition, action).await?),
            None => Ok(ops::apply(&*self.redis().await?, feed, partition, action).await?),
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    #[command(flatten)]
    pub target: Target,
    /// Only this feed, and list its jobs (a page at a time).
    #[arg(long)]
    pub feed: Option<String>,
    /// With --feed: only partitions that start with this.
    #[arg(long, requires = "feed")]
    pub partition_prefix: Option<String>,
    /// With --feed: the page after this partition (printed as "more: …").
    #[arg(long, requires = "feed")]
    pub after: Option<String>,
    /// Jobs per page (without --feed, jobs are listed only when there are
    /// at most this many in all).
    #[arg(long, default_value_t = tidemark_coordinator::ops::STATUS_LIMIT,
          value_parser = clap::value_parser!(u32).range(1..=100_000).map(|n| n as usize))]
    pub limit: usize,
    /// Print JSON (the admin API's `/api/status` document) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct ActArgs {
    /// The feed to act on (every partition of it, unless --partition).
    pub feed: String,
    #[arg(long)]
    pub partition: Option<String>,
    #[command(flatten)]
    pub target: Target,
}

#[derive(Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("where").required(true).args(["to", "cursor", "start"])))]
pub struct RewindArgs {
    #[command(flatten)]
    pub act: ActArgs,
    /// Restart from this time (RFC 3339, a date, or unix seconds).
    #[arg(long)]
    pub to: Option<String>,
    /// Continue from this cursor (or next URL, page number, offset).
    #[arg(long)]
    pub cursor: Option<String>,
    /// Start over from the feed's start point; forgets the high-water mark.
    #[arg(long)]
    pub start: bool,
}

impl RewindArgs {
    pub fn action(&self) -> Action {
        let to = match (&self.to, &self.cursor) {
            (Some(t), _) => RewindTo::Time(t.clone()),
            (None, Some(c)) => RewindTo::Cursor(c.clone()),
            (None, None) => RewindTo::Start,
        };
        Action::Rewind { to }
    }
}

pub async fn status(args: &StatusArgs, out: &mut dyn Write) -> Result<(), Failure> {
    let store = args.target.reader().await?;
    let q = ops::StatusQuery {
        feed: args.feed.clone(),
        partition_prefix: args.partition_prefix.clone(),
        after: args.after.clone(),
        limit: args.limit,
    };
    let report = ops::status(&*store, &q).await?;
    if let Some(f) = &args.feed
        && report.feeds.is_empty()
    {
        return Err(Failure::usage(format!("no feed named {f:?} has jobs")));
    }
    let written = if args.json {
        serde_json::to_writer_pretty(&mut *out, &report)
            .map_err(std::io::Error::other)
            .and_then(|_| writeln!(out))
    } else {
        out.write_all(ops::render(&report, &q).as_bytes())
    };
    written.map_err(|e| Failure::runtime(format!("cannot write: {e}")))
}

/// Apply `action` and say what it did.
pub async fn act(args: &ActArgs, action: &Action, out: &mut dyn Write) -> Result<(), Failure> {
    let report = args
        .target
        .apply(&args.feed, args.partition.as_deref(), action)
        .await?;
    let mut text = String::new();
    for a in &report.applied {
        text.push_str(&format!(
            "{} {}/{}: done (epoch {})\n",
            report.action, args.feed, a.partition, a.epoch
        ));
    }
    for s in &report.skipped {
        text.push_str(&format!(
            "{} {}/{}: skipped ({})\n",
            report.action, args.feed, s.partition, s.reason
        ));
    }
    out.write_all(text.as_bytes())
        .map_err(|e| Failure::runtime(format!("cannot write: {e}")))
}
