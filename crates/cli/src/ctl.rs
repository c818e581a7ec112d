//! `tidemark status | pause | resume | rewind | retry | tenants`: see and
//! steer feeds and tenants, in a distributed deployment (Redis at
//! `REDIS_URL`) or in an embedded state directory (`--state-dir D`).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use clap::builder::TypedValueParser as _;
use tidemark_coordinator::ops::{self, Action, ActionReport, RewindTo, Selection};
use tidemark_core::tenant::Tenant;
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
        Ok(crate::roles::connect_store(&self.redis, &self.redis_prefix, ca_pem.as_deref()).await?)
    }

    /// The store to read from.
    async fn reader(&self) -> Result<Arc<dyn StateStore>, Failure> {
        match &self.state_dir {
            Some(d) => Ok(Arc::new(StateDir::new(d).read()?)),
            None => self.redis().await,
        }
    }

    async fn apply(&self, sel: &Selection, action: &Action) -> Result<ActionReport, Failure> {
        match &self.state_dir {
            Some(d) => Ok(StateDir::new(d).apply(sel, action).await?),
            None => Ok(ops::apply(&*self.redis().await?, sel, action).await?),
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
    /// One tenant: its summary over every feed, and its jobs.
    #[arg(long)]
    pub tenant: Option<String>,
    /// A summary of every tenant (reads every job: slower on large deployments).
    #[arg(long, conflicts_with = "tenant")]
    pub tenants: bool,
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
#[command(group(clap::ArgGroup::new("which").required(true).multiple(true).args(["feed", "tenant"])))]
pub struct ActArgs {
    /// The feed to act on (every partition of it, unless --partition or --tenant).
    pub feed: Option<String>,
    /// Only this tenant's jobs (of FEED, or of every feed without it).
    #[arg(long)]
    pub tenant: Option<String>,
    /// One partition (of the tenant, with --tenant).
    #[arg(long, requires = "feed")]
    pub partition: Option<String>,
    #[command(flatten)]
    pub target: Target,
}

impl ActArgs {
    fn selection(&self) -> Selection {
        Selection {
            feed: self.feed.clone(),
            tenant: self.tenant.clone(),
            partition: self.partition.clone(),
        }
    }
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
        tenant: args.tenant.clone(),
        tenants: args.tenants,
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
    let report = args.target.apply(&args.selection(), action).await?;
    let mut text = String::new();
    for a in &report.applied {
        text.push_str(&format!(
            "{} {}/{}: done (epoch {})\n",
            report.action, a.feed, a.partition, a.epoch
        ));
    }
    for s in &report.skipped {
        text.push_str(&format!(
            "{} {}/{}: skipped ({})\n",
            report.action, s.feed, s.partition, s.reason
        ));
    }
    out.write_all(text.as_bytes())
        .map_err(|e| Failure::runtime(format!("cannot write: {e}")))
}

/// `tidemark tenants add | remove | list`.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum TenantsCommand {
    /// Add a tenant to a source with tenants (or change its vars): a
    /// coordinator creates and starts its jobs within one tick.
    Add {
        /// The source (a key of `sources` with a `tenants` block).
        source: String,
        /// The tenant's name: a-z, 0-9, '_' and '-'.
        name: String,
        /// A value for `{vars.NAME}` templates, as NAME=VALUE (repeatable).
        #[arg(long = "var", value_parser = parse_var)]
        vars: Vec<(String, String)>,
        #[command(flatten)]
        target: Target,
    },
    /// Remove a tenant added with `tenants add`: its jobs stop within one
    /// tick (a page in flight is fenced); their state stays unless --purge.
    Remove {
        source: String,
        name: String,
        /// Also delete the state (cursors, counters) of the tenant's jobs;
        /// works too for a tenant already removed from the tenants file.
        #[arg(long)]
        purge: bool,
        #[command(flatten)]
        target: Target,
    },
    /// The tenants of a source, with where each comes from.
    List {
        source: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
}

/// A `NAME=VALUE` var of the command line.
pub fn parse_var(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=VALUE"))?;
    tidemark_core::tenant::check_var_name(k)?;
    Ok((k.to_string(), v.to_string()))
}

pub async fn tenants(cmd: &TenantsCommand, out: &mut dyn Write) -> Result<(), Failure> {
    let text = match cmd {
        TenantsCommand::Add {
            source,
            name,
            vars,
            target,
        } => {
            let t = Tenant {
                name: name.clone(),
                vars: vars.iter().cloned().collect(),
            };
            let new = match &target.state_dir {
                Some(d) => StateDir::new(d).add_tenant(source, &t).await?,
                None => ops::add_tenant(&*target.redis().await?, source, &t).await?,
            };
            format!(
                "tenant {source}/{name}: {}\n",
                if new { "added" } else { "updated" }
            )
        }
        TenantsCommand::Remove {
            source,
            name,
            purge,
            target,
        } => {
            let r = match &target.state_dir {
                Some(d) => StateDir::new(d).remove_tenant(source, name, *purge).await?,
                None => ops::remove_tenant(&*target.redis().await?, source, name, *purge).await?,
            };
            let mut text = String::new();
            if !r.removed && !*purge {
                text.push_str(&format!(
                    "tenant {source}/{name}: not among the tenants added at run time (already removed?); its jobs stop within a tick of its removal\n"
                ));
            }
            if r.removed {
                text.push_str(&format!(
                    "tenant {source}/{name}: removed (its jobs stop within a tick; their state is kept{})\n",
                    if *purge { " until purged below" } else { ": --purge deletes it" }
                ));
            }
            if *purge {
                text.push_str(&format!(
                    "tenant {source}/{name}: state of {} job(s) deleted\n",
                    r.purged
                ));
            }
            text
        }
        TenantsCommand::List {
            source,
            json,
            target,
        } => {
            let store = target.reader().await?;
            let report = ops::tenants(&*store, source).await?;
            if *json {
                serde_json::to_string_pretty(&report)
                    .map(|s| s + "\n")
                    .map_err(|e| Failure::runtime(format!("cannot encode: {e}")))?
            } else {
                let mut text = format!("{:<32} {:<7} VARS\n", "TENANT", "ORIGIN");
                for t in &report.active {
                    let vars: Vec<String> =
                        t.vars.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    text.push_str(&format!(
                        "{:<32} {:<7} {}\n",
                        t.name,
                        t.origin.as_str(),
                        vars.join(",")
                    ));
                }
                for t in &report.pending {
                    text.push_str(&format!(
                        "{:<32} {:<7} (added; not yet applied by a coordinator)\n",
                        t.name, "pending"
                    ));
                }
                text.push_str(&format!("{} tenant(s) running\n", report.active.len()));
                text
            }
        }
    };
    out.write_all(text.as_bytes())
        .map_err(|e| Failure::runtime(format!("cannot write: {e}")))
}
