//! `tidemark demo`: the mock API in this process, four feeds of different
//! pagination styles and request dialects synced by the embedded engine into `./tidemark-demo/`,
//! live progress per feed, then polling for the records the mock keeps
//! adding. Ctrl-C stops it; running it again resumes from the stored cursors.

use std::collections::HashMap;
use std::future::Future;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tidemark_core::clock::now_ms;
use tidemark_core::config::load_file;
use tidemark_embedded::{EngineOptions, JsonlSink, Out, StateDir, progress};
use tidemark_mock::{MockConfig, MockServer};
use tidemark_state::{EmbeddedStore, Jobs};
use tidemark_telemetry::Metrics;
use tidemark_worker::WorkerOptions;

use crate::exit::Failure;

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Where the demo keeps its config, state and records.
    #[arg(long, default_value = "tidemark-demo")]
    pub dir: PathBuf,
    /// Records the mock API starts with.
    #[arg(long, default_value_t = 20_000)]
    pub records: usize,
    /// The mock API's port (the default is tried, then any free port).
    #[arg(long, default_value_t = 18_080)]
    pub port: u16,
    /// Records the mock inserts and updates every few seconds, for the polls to find.
    #[arg(long, default_value_t = 20)]
    pub churn: usize,
    /// Serve the status page, metrics and admin API here (e.g. 127.0.0.1:9465).
    #[arg(long)]
    pub listen: Option<String>,
}

/// The four feeds: seed 003's Zendesk cursor, seed 001's Self/Next, seed
/// 004's base64 keyset, and GraphQL over POST; `BASE_URL` becomes the mock's.
const DEMO_CONFIG: &str = include_str!("demo.yaml");

async fn start_mock(args: &DemoArgs) -> Result<MockServer, Failure> {
    let config = MockConfig {
        records: args.records,
        // A little latency, so the walk is something to watch.
        latency: Duration::from_millis(15),
        ..MockConfig::default()
    };
    let preferred = SocketAddr::from(([127, 0, 0, 1], args.port));
    match MockServer::start(config.clone(), preferred).await {
        Ok(s) => Ok(s),
        Err(_) => MockServer::start(config, SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .map_err(|e| Failure::runtime(format!("cannot start the mock API: {e}"))),
    }
}

pub async fn run(
    args: &DemoArgs,
    shutdown: impl Future<Output = ()> + Send,
    err: &mut (dyn Write + Send),
) -> Result<(), Failure> {
    let dir = StateDir::new(args.dir.join("state"));
    let owned = dir.take()?;
    let mock = start_mock(args).await?;
    let config_path = args.dir.join("feeds.yaml");
    std::fs::write(
        &config_path,
        DEMO_CONFIG.replace("BASE_URL", &mock.base_url()),
    )
    .map_err(|e| Failure::runtime(format!("cannot write {}: {e}", config_path.display())))?;
    let config = load_file(&config_path).map_err(|e| Failure::usage(e.to_string()))?;
    let out_dir = args.dir.join("out");
    let sink = Arc::new(JsonlSink::new(Out::Dir(out_dir.clone()))?);
    let metrics = Metrics::new();
    let http = match &args.listen {
        Some(l) => Some(crate::run::serve(l, &owned, &metrics, err).await?),
        None => None,
    };
    let resumed = owned.store.list().await.is_ok_and(|j| !j.is_empty());
    let _ = writeln!(
        err,
        "tidemark demo: mock API on {} ({} records); {} {} feeds into {}/<feed>.jsonl\n\
         config: {}   state: {}   Ctrl-C stops; run it again to resume",
        mock.base_url(),
        mock.state().len(),
        if resumed { "resuming" } else { "syncing" },
        config.feeds.len(),
        out_dir.display(),
        config_path.display(),
        dir.dir.display(),
    );
    let feeds: Vec<String> = config.feeds.iter().map(|f| f.name.clone()).collect();

    // The mock keeps changing, so every poll finds something new.
    let churn = {
        let state = mock.state();
        let n = args.churn;
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(4));
            every.tick().await;
            loop {
                every.tick().await;
                state.insert(n);
                state.update(n / 2);
            }
        })
    };
    let (stop_progress, progress_stop) = tokio::sync::oneshot::channel::<()>();
    let progress = tokio::spawn(show_progress(
        progress_stop,
        owned.store.clone(),
        feeds,
        sink_paths(&sink, &config),
        mock.state(),
    ));
    let opts = EngineOptions {
        worker: WorkerOptions {
            concurrency: 4,
            grace: Duration::from_secs(10),
            ..WorkerOptions::default()
        },
        tick: Duration::from_millis(250),
        ..EngineOptions::default()
    };
    let result = tidemark_embedded::sync(config, &owned, sink, metrics, &opts, shutdown).await;
    churn.abort();
    let _ = stop_progress.send(());
    let _ = progress.await;
    mock.shutdown().await;
    if let Some(http) = http {
        http.stop().await;
    }
    let summary = progress::summary(&*owned.store).await;
    let _ = writeln!(
        err,
        "\ntidemark demo: stopped. {summary}\n\
         records: {}/   see the jobs: tidemark status --state-dir {}\n\
         run `tidemark demo` again to resume where it stopped",
        out_dir.display(),
        dir.dir.display()
    );
    Ok(result?)
}

fn sink_paths(sink: &JsonlSink, config: &tidemark_core::Config) -> HashMap<String, PathBuf> {
    config
        .feeds
        .iter()
        .filter_map(|f| sink.path(&f.name).map(|p| (f.name.clone(), p)))
        .collect()
}

/// Live progress: a bar per feed on a terminal, a line per feed every few
/// seconds otherwise.
async fn show_progress(
    mut stop: tokio::sync::oneshot::Receiver<()>,
    store: Arc<EmbeddedStore>,
    feeds: Vec<String>,
    files: HashMap<String, PathBuf>,
    mock: tidemark_mock::MockState,
) {
    let tty = std::io::stderr().is_terminal();
    let multi = MultiProgress::with_draw_target(if tty {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    // The bar: records committed against the records the API holds now
    // (updates and re-read pages can take a feed past 100%).
    let style = ProgressStyle::with_template("{prefix:>8} [{bar:24.cyan/blue}] {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let bars: Vec<ProgressBar> = feeds
        .iter()
        .map(|f| {
            let b = multi.add(ProgressBar::new(1));
            b.set_style(style.clone());
            b.set_prefix(f.clone());
            b
        })
        .collect();
    let mut rates: HashMap<String, progress::Rate> = HashMap::new();
    let mut last_line = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = &mut stop => {
                // Leave the last figures on screen.
                bars.iter().for_each(ProgressBar::abandon);
                return;
            }
            _ = tick.tick() => {}
        }
        let Ok(jobs) = store.list().await else {
            continue;
        };
        let now = Instant::now();
        let mut lines = Vec::new();
        for (feed, bar) in feeds.iter().zip(&bars) {
            let v = progress::view(&jobs, feed);
            let rate = rates
                .entry(feed.clone())
                .or_default()
                .sample(now, v.records);
            let phase = match v.phase {
                "idle" => {
                    let wait = v.next_due_ms.saturating_sub(now_ms()) / 1000;
                    format!("idle, next poll in {wait}s")
                }
                "failed" => format!("FAILED: {}", v.error.unwrap_or_default()),
                p => p.to_string(),
            };
            let file = files
                .get(feed)
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            let msg = format!(
                "{phase:<24} {:>6} pages {:>9} records {:>8.0} records/s  -> {file}",
                v.pages, v.records, rate
            );
            let total = mock.len() as u64;
            bar.set_length(total.max(1));
            bar.set_position(v.records.min(total));
            bar.set_message(msg.clone());
            lines.push(format!("{feed:>8}: {msg}"));
        }
        if !tty && last_line.elapsed() >= Duration::from_secs(5) {
            last_line = Instant::now();
            let mut e = std::io::stderr().lock();
            for l in lines {
                let _ = writeln!(e, "{l}");
            }
        }
    }
}
