//! `tidemark run`: embedded mode on your own feeds (see [`tidemark_embedded`]).

use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use tidemark_core::config::load_file;
use tidemark_embedded::{EngineOptions, JsonlSink, Out, Owned, StateDir};
use tidemark_telemetry::{Metrics, ReadyCheck};
use tidemark_worker::WorkerOptions;

use crate::exit::Failure;
use crate::roles::Http;

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[arg(long, short)]
    pub config: PathBuf,
    /// Where the jobs' state (cursors, checkpoints) is kept.
    #[arg(long, env = "TIDEMARK_STATE_DIR", default_value = "tidemark-state")]
    pub state_dir: PathBuf,
    /// A directory for one `<feed>.jsonl` file per feed, or `-` for stdout.
    #[arg(long, default_value = "tidemark-out")]
    pub out: String,
    /// Walk every feed to its end of stream once, then exit (exit 1 if a job failed).
    #[arg(long)]
    pub once: bool,
    /// Time between two passes of the scheduler.
    #[arg(long, env = "TIDEMARK_TICK", default_value = "500ms")]
    pub tick: tidemark_core::Duration,
    /// The worker's flags, as `tidemark worker` takes them.
    #[command(flatten)]
    pub worker: WorkerOptions,
    /// Serve /metrics, /healthz, /readyz, the status page and the admin API here.
    #[arg(long, env = "TIDEMARK_LISTEN")]
    pub listen: Option<String>,
}

impl RunArgs {
    pub fn engine(&self) -> EngineOptions {
        EngineOptions {
            worker: self.worker.clone(),
            tick: self.tick.std(),
            once: self.once,
        }
    }
}

pub async fn run(
    args: &RunArgs,
    shutdown: impl Future<Output = ()> + Send,
    err: &mut (dyn Write + Send),
) -> Result<(), Failure> {
    let config = load_file(&args.config).map_err(|e| Failure::usage(e.to_string()))?;
    // A tenants file with errors is refused at start (later, while running,
    // a broken edit is logged and ignored).
    tidemark_core::config::load_tenants(&config).map_err(|e| Failure::usage(e.to_string()))?;
    let owned = StateDir::new(&args.state_dir).take()?;
    let out = Out::parse(&args.out);
    let sink = Arc::new(JsonlSink::new(out.clone())?);
    let metrics = Metrics::new();
    let http = match &args.listen {
        Some(listen) => Some(serve(listen, &owned, &metrics, err).await?),
        None => None,
    };
    let _ = writeln!(
        err,
        "tidemark run: {} feed(s) from {}; state in {}; records {}",
        config.feeds.len(),
        args.config.display(),
        args.state_dir.display(),
        match &out {
            Out::Dir(d) => format!("in {}/<feed>.jsonl", d.display()),
            Out::Stdout => "on stdout".into(),
        }
    );
    let result =
        tidemark_embedded::sync(config, &owned, sink, metrics, &args.engine(), shutdown).await;
    if let Some(http) = http {
        http.stop().await;
    }
    let _ = writeln!(err, "tidemark run: stopped; run it again to resume");
    Ok(result?)
}

/// Serve the endpoints of an embedded run: metrics, health, status page, admin API.
pub(crate) async fn serve(
    listen: &str,
    owned: &Owned,
    metrics: &Metrics,
    err: &mut (dyn Write + Send),
) -> Result<Http, Failure> {
    let ready: ReadyCheck = Arc::new(|| Box::pin(async { Ok(()) }));
    let admin = tidemark_coordinator::admin::router(
        owned.store.clone(),
        tidemark_coordinator::admin::AdminToken::from_env(),
    );
    let router = tidemark_telemetry::router(metrics.clone(), ready).merge(admin);
    let http = Http::start(listen, router).await?;
    let addr = http.addr;
    let _ = writeln!(
        err,
        "tidemark run: status page on http://{addr}/ (admin API with TIDEMARK_ADMIN_TOKEN), metrics on http://{addr}/metrics"
    );
    Ok(http)
}
