//! TLS to Redis (`rediss://`) and RabbitMQ (`amqps://`) with the CA bundle
//! option (`--tls-ca-file`, `TIDEMARK_TLS_CA_FILE`).
//!
//! Redis is a private `redis-server` speaking only TLS, with a certificate
//! from a CA made at test time. The shared RabbitMQ has no TLS listener and
//! is not reconfigured, so `amqps://` goes through a [`TlsFront`] in this
//! process that terminates TLS with the same CA's certificate and forwards
//! to it: the client side (tidemark's, rustls) is the real one, the
//! broker's own TLS listener is not what is tested.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use tidemark_bus::BusError;
use tidemark_bus::amqp::{AmqpBus, BusConfig, open_connection};
use tidemark_state::{Jobs, RedisStore};
use tidemark_tests::redis_server::RedisServer;
use tidemark_tests::tls::{TestCa, TlsFront};
use tidemark_tests::{
    Checker, Cluster, amqp_url, eventually, host_port, spawn_to, tidemark, versions,
};

const PASSWORD: &str = "s3cret-Pw-never-printed";

/// The shared broker's URL (credentials and vhost) as `amqps://` to
/// `localhost:<port>`: the front's certificate names `localhost` as well as
/// `127.0.0.1`, so this checks a DNS name where Redis checks an IP.
fn amqps_url(port: u16) -> String {
    let plain = amqp_url();
    let rest = plain.split("://").nth(1).unwrap_or(&plain);
    let (user, rest) = rest.rsplit_once('@').unwrap_or(("guest:guest", rest));
    let path = rest.find('/').map_or("/%2f", |i| &rest[i..]);
    format!("amqps://{user}@localhost:{port}{path}")
}

/// `rediss://:PASSWORD@host:port`: what an operator's URL looks like.
fn with_password(url: &str) -> String {
    url.replacen("://", &format!("://:{PASSWORD}@"), 1)
}

fn feeds() -> String {
    let feed = |name: &str, path: &str, rest: &str| {
        format!(
            "  - name: {name}\n    source: mock\n    path: {path}\n    key: /id\n    version: /updated_at\n    {rest}\n"
        )
    };
    [
        feed(
            "tickets",
            "/api/v2/incremental/tickets/cursor.json",
            "records: /tickets\n    pagination: { preset: zendesk_cursor, page_size: 50 }\n    start: { param: start_time, format: unix, from: \"2024-01-01T00:00:00Z\" }",
        ),
        feed(
            "items",
            "/items",
            "pagination: { preset: cursor, page_size: 50 }",
        ),
    ]
    .concat()
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// Coordinator and worker over `rediss://` and `amqps://` with the CA
/// option: every record arrives, the cursors are committed in the TLS Redis,
/// `tidemark status` and `tidemark tail` work over TLS too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_distributed_sync_runs_over_rediss_and_amqps_with_the_ca_option() {
    let ca = TestCa::new("tidemark e2e test CA");
    let redis = tokio::task::block_in_place(|| RedisServer::start_tls(&ca.files()));
    let front = TlsFront::start(host_port(&amqp_url()), &ca).await.unwrap();
    let ca_file = ca.ca_file().display().to_string();

    let mut c = Cluster::start(&feeds(), &["--records", "300"]);
    c.redis = redis.url();
    c.env.extend(env(&[
        ("AMQP_URL", &amqps_url(front.port())),
        ("TIDEMARK_TLS_CA_FILE", &ca_file),
    ]));
    let checker = Checker::start(&c.exchange()).await;

    // A tail over amqps, bound before records flow; it stops after 100.
    let tail_out = c.dir.path().join("tail.jsonl");
    let mut tail = spawn_to(
        "tail",
        &["tail", "--limit", "100"],
        &c.role_env(),
        c.dir.path(),
        "bound",
        std::fs::File::create(&tail_out).unwrap(),
    );

    c.coordinator("coord");
    c.worker("w1", &[]);
    let truth = c.truth().await.records;
    let want: HashSet<_> = truth.iter().cloned().collect();
    let keys = ["tickets.all", "items.all"];
    let all = eventually(Duration::from_secs(90), async || {
        let parts = checker.by_partition();
        keys.iter()
            .all(|k| parts.get(*k).is_some_and(|a| want.is_subset(&versions(a))))
    })
    .await;
    assert!(all, "not every record arrived over TLS{}", c.logs());
    assert!(
        front.handshakes() >= 2,
        "coordinator, worker and tail connect through the TLS front: {} handshakes",
        front.handshakes()
    );

    // The state is in the TLS Redis: the jobs' cursors moved there.
    let store = RedisStore::connect_with_ca(&redis.url(), &c.redis_prefix(), Some(ca.ca_pem()))
        .await
        .expect("connect to the TLS Redis with the CA");
    let jobs = store.list().await.unwrap();
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    assert!(jobs.iter().all(|(_, cp)| cp.pages > 0), "{jobs:?}");

    let (code, out, err) = tidemark(&["status"], &c.role_env());
    assert_eq!(code, 0, "status over rediss: {err}");
    assert!(out.contains("tickets") && out.contains("items"), "{out}");

    let exited = tail.wait(Duration::from_secs(30));
    assert!(
        exited.is_some_and(|s| s.success()),
        "tail over amqps stops after --limit: {exited:?}\n{}",
        tail.log_tail(20)
    );
    assert_eq!(lines(&tail_out), 100, "{}", tail.log_tail(20));
}

/// Without the CA (or with another CA), a TLS Redis is refused with a
/// certificate error that says what to do, and the URL's password is never
/// printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_redis_certificate_is_a_clear_error_without_the_password() {
    let ca = TestCa::new("tidemark test CA");
    let other = TestCa::new("some other CA");
    let redis = tokio::task::block_in_place(|| RedisServer::start_tls(&ca.files()));
    let url = with_password(&redis.url());
    let other_file = other.ca_file().display().to_string();
    let prefix = format!("tmtls{}:", &uuid::Uuid::new_v4().simple().to_string()[..8]);

    for (what, extra) in [
        ("no CA option", vec![]),
        (
            "another CA",
            vec![("TIDEMARK_TLS_CA_FILE", other_file.as_str())],
        ),
    ] {
        let mut e = vec![
            ("REDIS_URL", url.as_str()),
            ("TIDEMARK_REDIS_PREFIX", prefix.as_str()),
        ];
        e.extend(extra);
        let (code, out, err) = tidemark(&["status"], &env(&e));
        assert_eq!(code, 1, "{what}: status must fail: {out}{err}");
        assert!(
            err.contains("cannot connect to Redis") && err.contains("certificate"),
            "{what}: {err}"
        );
        assert!(err.contains("--tls-ca-file"), "{what}: a hint: {err}");
        assert!(
            !err.contains(PASSWORD) && !out.contains(PASSWORD),
            "{what}: {err}"
        );
    }

    // In process: the same through the library, and success with the CA.
    let e = RedisStore::connect(&url, &prefix).await.err().unwrap();
    assert!(e.to_string().contains("certificate"), "{e}");
    let store = RedisStore::connect_with_ca(&redis.url(), &prefix, Some(ca.ca_pem()))
        .await
        .unwrap();
    store.ping().await.unwrap();
}

/// `amqps://` through the TLS front: refused without the CA and with
/// another one (a certificate error, from the helper, from the bus's first
/// connection and from `tidemark tail`), connected with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_trusts_the_configured_ca_and_refuses_an_unknown_one() {
    let ca = TestCa::new("tidemark test CA");
    let other = TestCa::new("some other CA");
    let front = TlsFront::start(host_port(&amqp_url()), &ca).await.unwrap();
    let url = amqps_url(front.port());

    for (what, bundle) in [("no CA", None), ("another CA", Some(other.ca_pem()))] {
        let e = open_connection(&url, bundle)
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("certificate"), "{what}: {e}");
    }
    assert_eq!(front.handshakes(), 0);
    // The front sees the client's alert a moment after the client gave up.
    let refused = eventually(Duration::from_secs(5), async || {
        front.failed_handshakes() >= 2
    });
    assert!(
        refused.await,
        "{} failed handshakes",
        front.failed_handshakes()
    );

    let conn = open_connection(&url, Some(ca.ca_pem())).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    assert!(ch.status().connected());
    let _ = conn.close(200, "bye".into()).await;
    assert_eq!(front.handshakes(), 1);

    // The bus reports why its first connection did not come.
    let mut cfg = BusConfig::new(url.clone());
    cfg.prefix = format!("tmtls{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    cfg.connect_wait = Duration::from_secs(2);
    match AmqpBus::start(cfg.clone(), false).await {
        Err(BusError::Unreachable(why)) => assert!(why.contains("certificate"), "{why}"),
        Err(e) => panic!("expected the last attempt's error, got {e}"),
        Ok(_) => panic!("connected without trusting the CA"),
    }
    cfg.tls_ca_pem = Some(ca.ca_pem().to_string());
    let bus = AmqpBus::start(cfg.clone(), false).await.unwrap();
    assert!(bus.is_connected());
    bus.close().await;
    tidemark_bus::amqp::delete_topology(&cfg).await.unwrap();

    // The CLI: a certificate error with a hint, no password.
    let with_pw = url.replacen("guest@", &format!("{PASSWORD}@"), 1);
    let (code, out, err) = tidemark(&["tail", "--limit", "1"], &env(&[("AMQP_URL", &with_pw)]));
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("certificate") && err.contains("--tls-ca-file"),
        "{err}"
    );
    assert!(!err.contains(PASSWORD) && !out.contains(PASSWORD), "{err}");
}

/// A CA file that is missing or not PEM certificates is a usage error
/// (exit 2) naming it, before anything connects, on every command that has
/// the option.
#[test]
fn a_bad_ca_file_is_a_usage_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-ca.pem");
    let junk = dir.path().join("junk-ca.pem");
    std::fs::write(&junk, "this is not a certificate\n").unwrap();
    let config = dir.path().join("feeds.yaml");
    std::fs::write(
        &config,
        "sources:\n  mock:\n    base_url: http://127.0.0.1:9\nfeeds:\n  - name: f\n    source: mock\n    path: /items\n    key: /id\n    pagination: { preset: cursor }\n",
    )
    .unwrap();
    let config = config.display().to_string();
    // Nothing listens on these: the CA check must come first.
    let infra = env(&[
        ("REDIS_URL", "rediss://127.0.0.1:9"),
        ("AMQP_URL", "amqps://guest:guest@127.0.0.1:9/%2f"),
        ("TIDEMARK_LISTEN", "127.0.0.1:0"),
        ("TIDEMARK_ADMIN_LISTEN", "127.0.0.1:0"),
    ]);
    let commands: [&[&str]; 6] = [
        &["status"],
        &["pause", "f"],
        &["retry", "f"],
        &["worker"],
        &["coordinator", "--config", &config],
        &["tail"],
    ];
    for file in [&missing, &junk] {
        let shown = file.display().to_string();
        for args in commands {
            // Through the environment variable...
            let mut e = infra.clone();
            e.push(("TIDEMARK_TLS_CA_FILE".into(), shown.clone()));
            let (code, _, err) = tidemark(args, &e);
            assert_eq!(code, 2, "{args:?} with {shown}: {err}");
            assert!(err.contains(&shown), "{args:?} names the file: {err}");
            // ... and the flag.
            let mut with_flag = args.to_vec();
            with_flag.extend(["--tls-ca-file", &shown]);
            let (code, _, err) = tidemark(&with_flag, &infra);
            assert_eq!(code, 2, "{with_flag:?}: {err}");
            assert!(err.contains(&shown), "{with_flag:?} names the file: {err}");
        }
    }
}
