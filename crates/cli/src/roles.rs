//! `tidemark coordinator` and `tidemark worker`: wire Redis, RabbitMQ and
//! the HTTP endpoints to the two roles of the distributed deployment.

use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use tidemark_bus::amqp::{AmqpBus, BusConfig};
use tidemark_coordinator::{CoordinatorDeps, CoordinatorOptions};
use tidemark_core::config::load_file;
use tidemark_state::{RedisStore, StateStore};
use tidemark_telemetry::{Metrics, ReadyCheck};
use tidemark_worker::{WorkerDeps, WorkerOptions};

use crate::exit::Failure;
use crate::tls::{TlsArgs, explain};

/// Where the distributed roles find Redis and RabbitMQ.
#[derive(Args, Debug, Clone)]
pub struct Infra {
    #[command(flatten)]
    pub redis: crate::services::RedisArg,
    /// Prefix of every Redis key, so deployments can share a Redis.
    #[arg(long, env = "TIDEMARK_REDIS_PREFIX", default_value = tidemark_state::DEFAULT_PREFIX)]
    pub redis_prefix: String,
    #[command(flatten)]
    pub amqp: crate::services::AmqpArg,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Prefix of the task, retry and dead-letter queue names.
    #[arg(long, env = "TIDEMARK_QUEUE_PREFIX", default_value = "tidemark")]
    pub queue_prefix: String,
    /// Replicas of each quorum queue when it is created
    /// (x-quorum-initial-group-size); unset, the broker's default (3, or
    /// fewer nodes). Give every role the same value, the one the queues were
    /// created with: RabbitMQ refuses a declaration that differs.
    #[arg(long, env = "TIDEMARK_QUORUM_INITIAL_GROUP_SIZE",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub quorum_initial_group_size: Option<u32>,
    /// The downstream topic exchange.
    #[arg(
        long,
        env = "TIDEMARK_RECORDS_EXCHANGE",
        default_value = "tidemark.records"
    )]
    pub records_exchange: String,
    /// Serve /metrics, /healthz and /readyz here (port 0: a free port, printed on stderr).
    #[arg(long, env = "TIDEMARK_LISTEN")]
    pub listen: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct CoordinatorArgs {
    #[arg(long, short)]
    pub config: PathBuf,
    #[command(flatten)]
    pub infra: Infra,
    #[command(flatten)]
    pub opts: CoordinatorOptions,
    /// Serve the status page and the admin API here (the API needs TIDEMARK_ADMIN_TOKEN).
    #[arg(long, env = "TIDEMARK_ADMIN_LISTEN", default_value = "127.0.0.1:9465")]
    pub admin_listen: String,
}

#[derive(Args, Debug, Clone)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub infra: Infra,
    #[command(flatten)]
    pub opts: WorkerOptions,
    /// MiB of downstream messages awaiting the broker's confirms at once;
    /// pages beyond it wait their turn. Bounds memory at high concurrency.
    #[arg(long, env = "TIDEMARK_MAX_UNCONFIRMED_MIB", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=4095))]
    pub max_unconfirmed_mib: u32,
    /// Downstream messages awaiting the broker's confirms at once, likewise.
    #[arg(long, env = "TIDEMARK_MAX_UNCONFIRMED_MESSAGES", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_unconfirmed_messages: u32,
}

/// Connect to Redis (`--redis-url`, and `--redis-wait-replicas` for its
/// writes) and check that it answers. `ca_pem`: the checked
/// `--tls-ca-file` bundle, for `rediss://` and `rediss+sentinel://`.
pub(crate) async fn connect_store(
    redis: &crate::services::RedisArg,
    prefix: &str,
    ca_pem: Option<&str>,
) -> Result<Arc<RedisStore>, Failure> {
    let store = RedisStore::connect_with_ca(&redis.url, prefix, ca_pem)
        .await
        .map_err(|e| match e {
            // The URL itself: a usage error (the message quotes no password).
            tidemark_state::StateError::Url(why) => Failure::usage(format!("--redis-url: {why}")),
            e => Failure::runtime(format!("cannot connect to Redis: {}", explain(e))),
        })?
        .with_wait(redis.wait());
    store
        .ping()
        .await
        .map_err(|e| Failure::runtime(format!("Redis does not answer: {e}")))?;
    Ok(Arc::new(store))
}

async fn connect_bus(
    infra: &Infra,
    ca_pem: Option<String>,
    consume: bool,
    prefetch: u16,
    window: Option<(u32, u32)>,
) -> Result<AmqpBus, Failure> {
    let mut cfg = BusConfig::new(infra.amqp.url.to_string());
    cfg.tls_ca_pem = ca_pem;
    if let Some((mib, messages)) = window {
        cfg.max_unconfirmed_bytes = mib as usize * 1024 * 1024;
        cfg.max_unconfirmed_messages = messages as usize;
    }
    cfg.prefix = infra.queue_prefix.clone();
    cfg.quorum_initial_group_size = infra.quorum_initial_group_size;
    cfg.records_exchange = infra.records_exchange.clone();
    cfg.prefetch = prefetch;
    AmqpBus::start(cfg, consume)
        .await
        .map_err(|e| Failure::runtime(format!("cannot connect to RabbitMQ: {}", explain(e))))
}

fn ready_check(store: Arc<RedisStore>, bus: AmqpBus) -> ReadyCheck {
    Arc::new(move || {
        let store = store.clone();
        let bus = bus.clone();
        Box::pin(async move {
            tokio::time::timeout(Duration::from_secs(2), store.ping())
                .await
                .map_err(|_| "redis: no answer within 2s".to_string())?
                .map_err(|e| format!("redis: {e}"))?;
            if !bus.is_connected() {
                return Err("rabbitmq: not connected (reconnecting)".into());
            }
            Ok(())
        })
    })
}

/// An HTTP server this process runs: stop it with [`Http::stop`].
pub(crate) struct Http {
    pub addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Http {
    /// Serve `router` on `listen` (port 0: a free port).
    pub(crate) async fn start(listen: &str, router: axum::Router) -> Result<Self, Failure> {
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let (addr, task) = tidemark_telemetry::serve(listen, router, async {
            let _ = rx.await;
        })
        .await
        .map_err(|e| Failure::usage(format!("cannot listen on {listen}: {e}")))?;
        Ok(Self { addr, stop, task })
    }

    /// Stop serving and wait for the server to finish.
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Serve the endpoints of a role.
async fn serve_endpoints(
    role: &str,
    listen: &str,
    metrics: Metrics,
    ready: ReadyCheck,
    err: &mut (dyn Write + Send),
) -> Result<Http, Failure> {
    let http = Http::start(listen, tidemark_telemetry::router(metrics, ready)).await?;
    let addr = http.addr;
    let _ = writeln!(
        err,
        "tidemark {role}: metrics on http://{addr}/metrics, health on /healthz and /readyz"
    );
    tracing::info!(role, %addr, "endpoints listening");
    Ok(http)
}

/// What both roles run on: Redis, RabbitMQ, metrics and the HTTP endpoints.
struct Wiring {
    store: Arc<RedisStore>,
    bus: AmqpBus,
    metrics: Metrics,
    http: Http,
}

impl Wiring {
    /// Connect, and serve the endpoints on `--listen` (else `default_listen`).
    async fn start(
        role: &str,
        infra: &Infra,
        consume: bool,
        prefetch: u16,
        window: Option<(u32, u32)>,
        default_listen: &str,
        err: &mut (dyn Write + Send),
    ) -> Result<Self, Failure> {
        let ca_pem = infra.tls.ca_pem()?;
        let store = connect_store(&infra.redis, &infra.redis_prefix, ca_pem.as_deref()).await?;
        let bus = connect_bus(infra, ca_pem, consume, prefetch, window).await?;
        let metrics = Metrics::new();
        let shortfalls = metrics.redis_wait_shortfalls.clone();
        store.on_wait_shortfall(move || {
            shortfalls.inc();
        });
        let listen = infra.listen.as_deref().unwrap_or(default_listen);
        let http = serve_endpoints(
            role,
            listen,
            metrics.clone(),
            ready_check(store.clone(), bus.clone()),
            err,
        )
        .await?;
        Ok(Self {
            store,
            bus,
            metrics,
            http,
        })
    }

    /// Close the broker connection (returning every unacked delivery to
    /// the queue), stop the endpoints, and report the role's result.
    async fn finish<E: std::fmt::Display>(self, result: Result<(), E>) -> Result<(), Failure> {
        self.bus.close().await;
        self.http.stop().await;
        result.map_err(|e| Failure::runtime(e.to_string()))
    }
}

pub async fn coordinator(
    args: CoordinatorArgs,
    shutdown: impl Future<Output = ()> + Send,
    err: &mut (dyn Write + Send),
) -> Result<(), Failure> {
    let config = load_file(&args.config).map_err(|e| Failure::usage(e.to_string()))?;
    // A tenants file with errors is refused at start (later, while running,
    // a broken edit is logged and ignored).
    tidemark_core::config::load_tenants(&config).map_err(|e| Failure::usage(e.to_string()))?;
    let w = Wiring::start(
        "coordinator",
        &args.infra,
        false,
        1,
        None,
        "127.0.0.1:9464",
        err,
    )
    .await?;
    let token = tidemark_coordinator::admin::AdminToken::from_env();
    let admin = tidemark_coordinator::admin::router(w.store.clone(), token.clone());
    let admin = Http::start(&args.admin_listen, admin).await?;
    let admin_addr = admin.addr;
    let _ = writeln!(
        err,
        "tidemark coordinator: status page on http://{admin_addr}/ and admin API on http://{admin_addr}/api/ ({})",
        if token.is_set() {
            "token from TIDEMARK_ADMIN_TOKEN"
        } else {
            "disabled: TIDEMARK_ADMIN_TOKEN is not set"
        }
    );
    let opts = args.opts;
    let _ = writeln!(
        err,
        "tidemark coordinator {}: {} feed(s) from {}",
        opts.id,
        config.feeds.len(),
        args.config.display()
    );
    let deps = CoordinatorDeps {
        store: w.store.clone() as Arc<dyn StateStore>,
        tasks: Arc::new(w.bus.clone()),
        metrics: w.metrics.clone(),
    };
    let result = tidemark_coordinator::run(deps, config, opts, shutdown).await;
    admin.stop().await;
    w.finish(result).await
}

pub async fn worker(
    args: WorkerArgs,
    shutdown: impl Future<Output = ()> + Send,
    err: &mut (dyn Write + Send),
) -> Result<(), Failure> {
    // At least 1 and at most u16::MAX: the flag's parser checked.
    let prefetch = u16::try_from(args.opts.concurrency).unwrap_or(u16::MAX);
    let w = Wiring::start(
        "worker",
        &args.infra,
        true,
        prefetch,
        Some((args.max_unconfirmed_mib, args.max_unconfirmed_messages)),
        "127.0.0.1:0",
        err,
    )
    .await?;
    let deps = WorkerDeps::new(
        w.store.clone(),
        Arc::new(w.bus.clone()),
        Arc::new(w.bus.clone()),
        w.metrics.clone(),
    );
    let result = tidemark_worker::run(deps, args.opts, shutdown).await;
    w.finish(result).await
}
