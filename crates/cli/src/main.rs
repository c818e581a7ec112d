//! The `tidemark` binary: parse flags, set up logging, call the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tidemark::exit::Failure;
use tidemark::{ctl, demo, mockapi, roles, run, tail, validate};
use tidemark_coordinator::ops::Action;
use tidemark_embedded::pull;

#[derive(Parser)]
#[command(
    name = "tidemark",
    version,
    about = "Sync records out of cursor-paginated HTTP APIs, resuming exactly where it stopped"
)]
struct Cli {
    /// Log filter (also RUST_LOG), e.g. info or tidemark_source=debug.
    #[arg(long, global = true, env = "TIDEMARK_LOG", default_value = "warn")]
    log: String,
    /// Log format: text, or json (one JSON object per line).
    #[arg(long, global = true, env = "TIDEMARK_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Try it: the mock API and three feeds synced in this process, with live progress. Zero setup.
    Demo(demo::DemoArgs),
    /// Embedded mode: sync your feeds in one process; state in a directory, records as JSON Lines.
    Run(run::RunArgs),
    /// Show every job: phase, cursor age, high-water mark, lag, pages, records, last error.
    Status(ctl::StatusArgs),
    /// Stop starting chains of a feed (the page in flight is fenced).
    Pause(ctl::ActArgs),
    /// Let a paused feed run again, at once.
    Resume(ctl::ActArgs),
    /// Move a feed's cursor: --to TIME, --cursor C or --start (in-flight pages are fenced).
    Rewind(ctl::RewindArgs),
    /// Run the failed jobs of a feed again, from their stored cursors.
    Retry(ctl::ActArgs),
    /// Add, remove and list the tenants of a source with tenants, while it runs.
    #[command(subcommand)]
    Tenants(ctl::TenantsCommand),
    /// Check a config file: exit 0, or exit 2 printing file:line:col: field: reason.
    Validate {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print the JSON Schema of the config file, for editors (yaml-language-server) and tools.
    Schema,
    /// Walk one chain of one feed and print its records as JSON Lines on stdout. No state.
    Pull {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        feed: String,
        /// The tenant, for a feed of a source with tenants (its vars come from the tenants file or list).
        #[arg(long)]
        tenant: Option<String>,
        /// Partition id (a partition value, or a window start); needed when the feed has several.
        #[arg(long)]
        partition: Option<String>,
        /// A child feed's value of one of its parent vars, NAME=VALUE (repeat for each var):
        /// pull the children of that one parent record.
        #[arg(long = "var", value_parser = ctl::parse_var)]
        vars: Vec<(String, String)>,
        /// Stop after this many pages.
        #[arg(long)]
        max_pages: Option<u64>,
        /// Start at this time (RFC 3339, a date, or unix seconds) instead of start.from.
        #[arg(long, conflicts_with = "cursor")]
        from: Option<String>,
        /// Start at this cursor (or next URL, page number, offset).
        #[arg(long)]
        cursor: Option<String>,
        /// Do not show the live progress line.
        #[arg(long)]
        no_progress: bool,
        /// Also write the summary as JSON to this file.
        #[arg(long)]
        stats_json: Option<PathBuf>,
    },
    /// Distributed: lead (or stand by), register the feeds, start and re-issue chains. Needs REDIS_URL, AMQP_URL.
    Coordinator(roles::CoordinatorArgs),
    /// Distributed: fetch, publish and commit page tasks. Needs REDIS_URL, AMQP_URL; no config file.
    Worker(roles::WorkerArgs),
    /// A downstream subscriber: print records from the records exchange as JSON lines.
    Tail(tail::TailArgs),
    /// Serve the mock cursor API (every pagination style, with fault knobs).
    MockApi {
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long, default_value_t = 8080)]
        port: u16,
        #[command(flatten)]
        mock: tidemark_mock::MockArgs,
    },
    /// Benchmarks; results go to docs/BENCHMARKS.md.
    #[cfg(feature = "bench")]
    Bench {
        #[command(subcommand)]
        which: tidemark_harness::bench::BenchCommand,
    },
}

/// Keep glibc's mmap threshold at its default, 128 KiB, unless
/// `MALLOC_MMAP_THRESHOLD_` sets one. glibc raises the threshold each time a
/// large block is freed (up to 32 MiB); a worker's page buffers (bodies,
/// HTTP read buffers, per-page messages: hundreds of KiB each) then come
/// from per-thread arenas that fragment and never shrink, and a worker at
/// concurrency 64 grew past 100 MB. Fixed, they are mapped and unmapped
/// whole: about 20% fewer resident MiB for a little CPU (docs/BENCHMARKS.md).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn fix_mmap_threshold() {
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: mallopt only sets a malloc tunable; it is called once,
        // before the runtime starts any other thread.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn fix_mmap_threshold() {}

fn main() -> ExitCode {
    fix_mmap_threshold();
    let cli = Cli::parse();
    init_tracing(&cli.log, cli.log_format == LogFormat::Json);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("error: {f}");
            ExitCode::from(f.code)
        }
    }
}

async fn dispatch(command: Command) -> Result<(), Failure> {
    let mut stderr = std::io::stderr();
    let mut stdout = std::io::stdout();
    match command {
        Command::Demo(args) => demo::run(&args, shutdown_signal(), &mut stderr).await?,
        Command::Run(args) => run::run(&args, shutdown_signal(), &mut stderr).await?,
        Command::Status(args) => ctl::status(&args, &mut stdout).await?,
        Command::Pause(args) => ctl::act(&args, &Action::Pause, &mut stdout).await?,
        Command::Resume(args) => ctl::act(&args, &Action::Resume, &mut stdout).await?,
        Command::Retry(args) => ctl::act(&args, &Action::Retry, &mut stdout).await?,
        Command::Rewind(args) => ctl::act(&args.act, &args.action(), &mut stdout).await?,
        Command::Tenants(cmd) => ctl::tenants(&cmd, &mut stdout).await?,
        Command::Validate { config } => {
            validate::run(&config, &mut stdout)?;
        }
        Command::Schema => {
            let schema = tidemark_core::config::json_schema();
            // A reader that stops early (`| head`) is no failure.
            match std::io::Write::write_all(&mut stdout, format!("{schema:#}\n").as_bytes()) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    return Err(Failure::runtime(format!("cannot write the schema: {e}")));
                }
                _ => {}
            }
        }
        Command::Pull {
            config,
            feed,
            tenant,
            partition,
            vars,
            max_pages,
            from,
            cursor,
            no_progress,
            stats_json,
        } => {
            let opts = pull::PullOptions {
                config,
                feed,
                tenant,
                partition,
                vars: vars.into_iter().collect(),
                max_pages,
                from,
                cursor,
                progress: !no_progress,
                stats_json,
            };
            pull::run(&opts, Box::new(std::io::stdout()), &mut stderr).await?;
        }
        Command::Coordinator(args) => {
            roles::coordinator(args, shutdown_signal(), &mut stderr).await?;
        }
        Command::Worker(args) => roles::worker(args, shutdown_signal(), &mut stderr).await?,
        Command::Tail(args) => {
            tail::run(
                &args,
                shutdown_signal(),
                &mut std::io::stdout(),
                &mut stderr,
            )
            .await?;
        }
        Command::MockApi { host, port, mock } => {
            mockapi::run(&host, port, &mock, shutdown_signal(), &mut stderr).await?;
        }
        #[cfg(feature = "bench")]
        Command::Bench { which } => {
            // The benchmark starts this very binary for every role.
            let exe = std::env::current_exe()
                .map_err(|e| Failure::runtime(format!("cannot find this binary: {e}")))?;
            tidemark_harness::bench::run(which, &exe, &mut stdout)
                .await
                .map_err(|e| Failure::runtime(e.to_string()))?;
        }
    }
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

fn init_tracing(filter: &str, json: bool) {
    use tracing_subscriber::EnvFilter;
    // lapin logs every returned (unroutable) message with its whole body;
    // tidemark reports those as errors of its own, so lapin's are kept quiet.
    let quiet = |f: String| {
        if f.contains("lapin") {
            f
        } else {
            format!("{f},lapin::returned_messages=error")
        }
    };
    let filter = std::env::var("RUST_LOG")
        .ok()
        .map(quiet)
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_new(quiet(filter.to_string())).ok())
        .unwrap_or_else(|| EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
