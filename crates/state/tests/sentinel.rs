//! Redis Sentinel and WAIT, against private redis-server processes on
//! loopback (never the shared Redis):
//!
//! - the same store follows a SIGKILLed master to the replica the sentinels
//!   promote (scripts loaded again there), loses none of the commits the
//!   replica acknowledged, and never reuses an epoch, even one the
//!   failover lost;
//! - a node that says it is a replica is never written, even when a
//!   sentinel names it, a demoted master's READONLY sends the store back to
//!   the sentinels, and a master the sentinels replaced while its
//!   connection still works is left within RECHECK_EVERY;
//! - WAIT: a commit is acknowledged with the replica up, and still applied
//!   (counted as a shortfall) with it down;
//! - `rediss+sentinel://`: TLS to the sentinels and the data nodes, trusting
//!   the given CA, and refused at once without it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tidemark_core::checkpoint::{Checkpoint, Commit, CommitOutcome, JobId};
use tidemark_harness::redis_server::{NodeOptions, RedisServer, TlsFiles};
use tidemark_harness::sentinel::{SentinelSet, SentinelSetup};
use tidemark_state::{Acquire, Jobs, Leases, RedisStore, WaitReplicas};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::task::block_in_place;

const LEASE: Duration = Duration::from_secs(60);

fn commit(epoch: u64, seq: u64) -> Commit {
    Commit {
        epoch,
        expected_seq: seq,
        new_cursor: Some(format!("c{}", seq + 1)),
        new_seq: seq + 1,
        high_water: None,
        count: 1,
        end_of_stream: false,
        next_due_ms: 0,
        lease_ms: 60_000,
        restart: None,
        note: None,
        triggers: Vec::new(),
        batches: Vec::new(),
    }
}

async fn granted(store: &RedisStore, job: &JobId) -> u64 {
    match store.acquire(job, LEASE, true).await.unwrap() {
        Acquire::Granted { epoch } => epoch,
        other => panic!("expected a lease, got {other:?}"),
    }
}

/// The commit script's SHA1, as the store loads it (lua/index.lua, then
/// lua/commit.lua).
fn commit_sha() -> String {
    redis::Script::new(&format!(
        "{}\n{}",
        include_str!("../src/lua/index.lua"),
        include_str!("../src/lua/commit.lua")
    ))
    .get_hash()
    .to_string()
}

/// One command to a loopback node.
async fn ask<T: redis::FromRedisValue>(port: u16, password: Option<&str>, cmd: &redis::Cmd) -> T {
    let auth = password.map(|p| format!(":{p}@")).unwrap_or_default();
    let client = redis::Client::open(format!("redis://{auth}127.0.0.1:{port}")).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    cmd.query_async(&mut c).await.unwrap()
}

async fn script_loaded(port: u16, password: Option<&str>) -> bool {
    let found: Vec<bool> = ask(
        port,
        password,
        redis::cmd("SCRIPT").arg("EXISTS").arg(commit_sha()),
    )
    .await;
    found == [true]
}

async fn role(port: u16, password: Option<&str>) -> String {
    let r: Vec<redis::Value> = ask(port, password, &redis::cmd("ROLE")).await;
    redis::from_redis_value(&r[0]).unwrap()
}

/// The tidemark keys a node holds.
async fn keys(port: u16, password: Option<&str>) -> Vec<String> {
    ask(port, password, redis::cmd("KEYS").arg("tm*")).await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_store_follows_a_sentinel_failover_and_never_reuses_an_epoch() {
    let started = Instant::now();
    let pw = Some("datapw1");
    let mut set = block_in_place(|| {
        SentinelSet::start(SentinelSetup {
            password: pw.map(str::to_string),
            sentinel_password: Some("sentinelpw1".into()),
            ..SentinelSetup::default()
        })
    });
    let set_up = started.elapsed();
    let old_master = set.master_port().unwrap();
    let replica = set
        .node_ports()
        .into_iter()
        .find(|p| *p != old_master)
        .unwrap();
    let url = set.url();
    assert!(
        url.starts_with("redis+sentinel://:datapw1@127.0.0.1:"),
        "{url}"
    );
    let wait = WaitReplicas {
        replicas: 1,
        timeout: Duration::from_millis(500),
    };
    let store = RedisStore::connect(&url, "tmsentinel:")
        .await
        .unwrap()
        .with_wait(Some(wait));

    // Commits under three epochs, each acknowledged by the replica.
    let job = JobId::new("feed", "p");
    store.ensure(&job, &Checkpoint::default()).await.unwrap();
    let mut epochs = Vec::new();
    let mut seq = 0;
    for _ in 0..3 {
        let e = granted(&store, &job).await;
        epochs.push(e);
        for _ in 0..5 {
            assert_eq!(
                store.commit(&job, &commit(e, seq)).await.unwrap(),
                CommitOutcome::Ok
            );
            seq += 1;
        }
    }
    assert_eq!(
        store.wait_shortfalls(),
        0,
        "the replica acknowledged every write"
    );
    assert_eq!(role(replica, pw).await, "slave");
    assert!(
        !script_loaded(replica, pw).await,
        "Redis 7 does not replicate SCRIPT LOAD: the replica has no scripts yet"
    );
    let acknowledged_seq = seq;
    let acknowledged_epoch = *epochs.last().unwrap();

    // One more epoch that the failover loses: the replica is cut off (and
    // stalled, so it cannot reconnect) before the lease is taken, and the
    // master is killed before it could pass it on.
    set.node(replica).unwrap().freeze();
    let _: redis::Value = ask(
        old_master,
        pw,
        redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("replica"),
    )
    .await;
    let lost_epoch = granted(&store, &job).await;
    epochs.push(lost_epoch);
    assert_eq!(
        store.wait_shortfalls(),
        1,
        "the lease taken with the replica cut off is counted as not acknowledged"
    );
    let killed_at = Instant::now();
    let killed = block_in_place(|| set.kill_master());
    assert_eq!(killed, old_master);
    set.node(replica).unwrap().thaw();

    // The same store, as a worker would: retry until a new lease and a
    // commit go through.
    let mut failures = 0u32;
    let mut first_error = None;
    let (new_epoch, promoted_after) = loop {
        match store.acquire(&job, LEASE, true).await {
            Ok(Acquire::Granted { epoch }) => break (epoch, killed_at.elapsed()),
            Ok(other) => panic!("{other:?}"),
            Err(e) => {
                failures += 1;
                first_error.get_or_insert_with(|| e.to_string());
                assert!(
                    killed_at.elapsed() < Duration::from_secs(20),
                    "no new master within 20 s: {e}\n{}",
                    set.sentinel_logs()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let cp = store.get(&job).await.unwrap().unwrap();
    assert_eq!(
        store
            .commit(&job, &commit(new_epoch, cp.seq))
            .await
            .unwrap(),
        CommitOutcome::Ok
    );
    let recovered = killed_at.elapsed();
    let new_master = set.master_port().unwrap();
    eprintln!(
        "sentinel failover: set up in {set_up:?}; master {old_master} SIGKILLed, replica {new_master} \
         promoted; first lease on it {promoted_after:?} and first commit {recovered:?} after the \
         kill ({failures} failed attempts before, the first: {})",
        first_error.as_deref().unwrap_or("none")
    );
    assert_eq!(new_master, replica);
    assert_eq!(role(new_master, pw).await, "master");
    // Nothing acknowledged was lost; the unacknowledged lease was.
    assert_eq!(
        (cp.seq, cp.cursor.as_deref()),
        (
            acknowledged_seq,
            Some(format!("c{acknowledged_seq}").as_str())
        ),
        "every commit the replica acknowledged survived the failover"
    );
    assert!(
        new_epoch > acknowledged_epoch,
        "the lease the failover lost must not have survived ({new_epoch})"
    );
    // Never reused: above every epoch before the kill, the lost one too
    // (the server's clock has moved past its millisecond).
    let max_before = *epochs.iter().max().unwrap();
    assert_eq!(max_before, lost_epoch);
    assert!(
        new_epoch > max_before,
        "epoch {new_epoch} after the failover is not above {max_before}"
    );
    // Every holder of an epoch from before the failover is fenced.
    for stale in [acknowledged_epoch, lost_epoch] {
        assert_eq!(
            store
                .commit(&job, &commit(stale, cp.seq + 1))
                .await
                .unwrap(),
            CommitOutcome::Fenced
        );
    }
    // The store loaded its scripts on the new master by itself (NOSCRIPT).
    assert!(script_loaded(new_master, pw).await);
    // No replica is left to acknowledge: writes go on, counted.
    assert!(store.wait_shortfalls() >= 2);
    assert_eq!(store.get(&job).await.unwrap().unwrap().seq, cp.seq + 1);
    eprintln!("sentinel failover test: {:?} in all", started.elapsed());
}

/// A sentinel that names whichever port it is told to, for the cases real
/// sentinels only show by chance: a sentinel naming a replica.
struct FakeSentinel {
    port: u16,
    asked: Arc<AtomicU64>,
}

impl FakeSentinel {
    async fn start(names: Arc<AtomicU16>) -> FakeSentinel {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let asked = Arc::new(AtomicU64::new(0));
        let count = asked.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let (names, count) = (names.clone(), count.clone());
                tokio::spawn(async move {
                    let (read, mut write) = socket.into_split();
                    let mut read = BufReader::new(read);
                    while let Some(args) = read_command(&mut read).await {
                        let reply = if args
                            .first()
                            .is_some_and(|a| a.eq_ignore_ascii_case("sentinel"))
                        {
                            count.fetch_add(1, Ordering::SeqCst);
                            let p = names.load(Ordering::SeqCst).to_string();
                            format!("*2\r\n$9\r\n127.0.0.1\r\n${}\r\n{p}\r\n", p.len())
                        } else {
                            "+OK\r\n".to_string()
                        };
                        if write.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        FakeSentinel { port, asked }
    }
}

/// One RESP command (an array of bulk strings), or None at the end.
async fn read_command<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> Option<Vec<String>> {
    let mut line = String::new();
    r.read_line(&mut line).await.ok().filter(|n| *n > 0)?;
    let n: usize = line.trim_end().strip_prefix('*')?.parse().ok()?;
    let mut args = Vec::with_capacity(n);
    for _ in 0..n {
        line.clear();
        r.read_line(&mut line).await.ok()?;
        let len: usize = line.trim_end().strip_prefix('$')?.parse().ok()?;
        let mut buf = vec![0u8; len + 2];
        r.read_exact(&mut buf).await.ok()?;
        buf.truncate(len);
        args.push(String::from_utf8_lossy(&buf).into_owned());
    }
    Some(args)
}

/// Wait until the node on `master` has a replica in sync: a write on it
/// acknowledged (WAIT on the connection that wrote).
async fn synced(master: u16) {
    let client = redis::Client::open(format!("redis://127.0.0.1:{master}")).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    for _ in 0..100 {
        let (_, acked): ((), u32) = redis::pipe()
            .cmd("SET")
            .arg("sync-probe")
            .arg("1")
            .cmd("WAIT")
            .arg(1)
            .arg(100)
            .query_async(&mut c)
            .await
            .unwrap();
        if acked == 1 {
            return;
        }
    }
    panic!("no replica of {master} in sync");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_is_never_written_and_a_demoted_master_sends_the_store_back_to_the_sentinels() {
    let a = block_in_place(RedisServer::start_aof);
    let b = block_in_place(|| {
        RedisServer::start_with(NodeOptions {
            replica_of: Some(a.port()),
            ..NodeOptions::default()
        })
    });
    synced(a.port()).await;
    let names = Arc::new(AtomicU16::new(a.port()));
    let sentinel = FakeSentinel::start(names.clone()).await;
    let url = format!("redis+sentinel://127.0.0.1:{}/fake", sentinel.port);
    let plain = RedisStore::connect(&url, "tmfake:").await.unwrap();
    let waited = RedisStore::connect(&url, "tmfake:")
        .await
        .unwrap()
        .with_wait(Some(WaitReplicas {
            replicas: 1,
            timeout: Duration::from_millis(300),
        }));
    let job = JobId::new("feed", "p");
    plain.ensure(&job, &Checkpoint::default()).await.unwrap();
    let e = granted(&plain, &job).await;
    assert_eq!(
        plain.commit(&job, &commit(e, 0)).await.unwrap(),
        CommitOutcome::Ok
    );
    assert_eq!(
        waited.commit(&job, &commit(e, 1)).await.unwrap(),
        CommitOutcome::Ok
    );
    assert_eq!(waited.wait_shortfalls(), 0);

    // The roles swap behind the sentinel's back, without closing any
    // client connection (Redis keeps them on REPLICAOF): a becomes a
    // replica of b, and the sentinel still names a.
    let _: () = ask(b.port(), None, redis::cmd("REPLICAOF").arg("NO").arg("ONE")).await;
    let _: () = ask(
        a.port(),
        None,
        redis::cmd("REPLICAOF").arg("127.0.0.1").arg(b.port()),
    )
    .await;
    synced(b.port()).await;
    let asked_before = sentinel.asked.load(Ordering::SeqCst);
    let before_a = keys(a.port(), None).await;
    // Each store meets READONLY on its connection to a, asks the sentinel
    // again, is told a, and refuses it: ROLE says replica.
    for store in [&plain, &waited] {
        let e = store.commit(&job, &commit(e, 2)).await.unwrap_err();
        assert!(e.to_string().contains("the node is a replica of"), "{e}");
    }
    assert!(
        sentinel.asked.load(Ordering::SeqCst) > asked_before,
        "READONLY sent the stores back to the sentinel"
    );
    assert_eq!(
        keys(a.port(), None).await,
        before_a,
        "nothing was written to the replica"
    );

    // The sentinel names b: both stores follow, same objects.
    names.store(b.port(), Ordering::SeqCst);
    // (Each store answers from memory that no master was found, a moment.)
    tokio::time::sleep(tidemark_state::sentinel::FAILURE_REMEMBERED).await;
    assert_eq!(
        plain.commit(&job, &commit(e, 2)).await.unwrap(),
        CommitOutcome::Ok
    );
    assert_eq!(
        waited.commit(&job, &commit(e, 3)).await.unwrap(),
        CommitOutcome::Ok
    );
    assert_eq!(
        waited.wait_shortfalls(),
        0,
        "a, now b's replica, acknowledged"
    );
    assert_eq!(waited.get(&job).await.unwrap().unwrap().seq, 4);
    assert_eq!(role(a.port(), None).await, "slave");

    // A master the sentinels gave up on while our connection to it still
    // works (cut off from them, not from us): a is promoted too, and the
    // sentinel names it. Within RECHECK_EVERY the store moves to a.
    let _: () = ask(a.port(), None, redis::cmd("REPLICAOF").arg("NO").arg("ONE")).await;
    names.store(a.port(), Ordering::SeqCst);
    tokio::time::sleep(tidemark_state::sentinel::RECHECK_EVERY + Duration::from_millis(100)).await;
    assert_eq!(
        plain.commit(&job, &commit(e, 4)).await.unwrap(),
        CommitOutcome::Ok
    );
    let seq_on = |port: u16| async move {
        let seq: u64 = ask(
            port,
            None,
            redis::cmd("HGET").arg("tmfake:job:feed:p").arg("seq"),
        )
        .await;
        seq
    };
    assert_eq!((seq_on(a.port()).await, seq_on(b.port()).await), (5, 4));
}

#[tokio::test(flavor = "multi_thread")]
async fn wait_acknowledges_with_the_replica_up_and_applies_with_it_down() {
    let a = block_in_place(RedisServer::start_aof);
    let mut b = block_in_place(|| {
        RedisServer::start_with(NodeOptions {
            replica_of: Some(a.port()),
            ..NodeOptions::default()
        })
    });
    synced(a.port()).await;
    let timeout = Duration::from_millis(300);
    let plain = RedisStore::connect(&a.url(), "tmwait:").await.unwrap();
    let waited = RedisStore::connect(&a.url(), "tmwait:")
        .await
        .unwrap()
        .with_wait(Some(WaitReplicas {
            replicas: 1,
            timeout,
        }));
    assert_eq!(
        waited.wait_replicas(),
        Some(WaitReplicas {
            replicas: 1,
            timeout
        })
    );
    assert_eq!(plain.wait_replicas(), None);
    // What a role counts in tidemark_redis_wait_shortfalls_total.
    let told = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = told.clone();
    waited.on_wait_shortfall(move || {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    });

    // The cost: one job committed page after page, with and without WAIT.
    let n = 200u64;
    let mut mean = Vec::new();
    for (name, store) in [("without WAIT", &plain), ("with WAIT 1", &waited)] {
        let job = JobId::new("cost", name);
        store.ensure(&job, &Checkpoint::default()).await.unwrap();
        let e = granted(store, &job).await;
        let t = Instant::now();
        for seq in 0..n {
            assert_eq!(
                store.commit(&job, &commit(e, seq)).await.unwrap(),
                CommitOutcome::Ok
            );
        }
        mean.push((name, t.elapsed() / n as u32));
    }
    eprintln!("commit latency on loopback, one job at a time: {mean:?}");
    assert_eq!(waited.wait_shortfalls(), 0, "the replica acknowledged");

    // The replica down: the commit waits the timeout, is applied, and is counted.
    let job = JobId::new("wait", "down");
    waited.ensure(&job, &Checkpoint::default()).await.unwrap();
    let e = granted(&waited, &job).await;
    let shortfalls = waited.wait_shortfalls();
    block_in_place(|| b.kill9());
    let t = Instant::now();
    assert_eq!(
        waited.commit(&job, &commit(e, 0)).await.unwrap(),
        CommitOutcome::Ok
    );
    let took = t.elapsed();
    assert!(took >= timeout, "the commit waited the timeout ({took:?})");
    assert_eq!(waited.wait_shortfalls(), shortfalls + 1);
    assert_eq!(
        told.load(std::sync::atomic::Ordering::SeqCst),
        waited.wait_shortfalls(),
        "every shortfall is told"
    );
    assert_eq!(plain.get(&job).await.unwrap().unwrap().seq, 1);
    // Commands not waiting for replicas do not queue behind a wait.
    let other = JobId::new("wait", "other");
    plain.ensure(&other, &Checkpoint::default()).await.unwrap();
    let next = commit(e, 1);
    let (slow, fast) = tokio::join!(waited.commit(&job, &next), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let t = Instant::now();
        waited.get(&other).await.unwrap();
        t.elapsed()
    });
    assert_eq!(slow.unwrap(), CommitOutcome::Ok);
    assert!(
        fast < Duration::from_millis(150),
        "a read waited behind a WAIT ({fast:?})"
    );
}

/// A CA and a server certificate for 127.0.0.1 it signed, as PEM files.
fn test_ca(dir: &std::path::Path) -> (TlsFiles, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "tidemark sentinel test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut server = CertificateParams::new(vec!["127.0.0.1".into()]).unwrap();
    server.use_authority_key_identifier_extension = true;
    let cert = server.signed_by(&key, &issuer).unwrap();
    let files = TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
    };
    std::fs::write(&files.ca, ca_cert.pem()).unwrap();
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    (files, ca_cert.pem())
}

#[tokio::test(flavor = "multi_thread")]
async fn rediss_sentinel_speaks_tls_to_the_sentinels_and_the_master() {
    let dir = tempfile::tempdir().unwrap();
    let (files, ca_pem) = test_ca(dir.path());
    let set = block_in_place(|| {
        SentinelSet::start(SentinelSetup {
            password: Some("datapw2".into()),
            sentinel_password: Some("sentinelpw2".into()),
            tls: Some(files),
            ..SentinelSetup::default()
        })
    });
    let url = set.url();
    assert!(url.starts_with("rediss+sentinel://"), "{url}");
    assert!(tidemark_state::is_tls(&url));
    let store = RedisStore::connect_with_ca(&url, "tmtls:", Some(&ca_pem))
        .await
        .unwrap();
    let job = JobId::new("feed", "p");
    store.ensure(&job, &Checkpoint::default()).await.unwrap();
    let e = granted(&store, &job).await;
    assert_eq!(
        store.commit(&job, &commit(e, 0)).await.unwrap(),
        CommitOutcome::Ok
    );
    // A one-off client of the master, as the benchmark takes one.
    let client = tidemark_state::redis_client(&url, Some(&ca_pem)).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let seq: u64 = redis::cmd("HGET")
        .arg("tmtls:job:feed:p")
        .arg("seq")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(seq, 1);
    // Without the CA: refused at once (a certificate is not retried).
    let t = Instant::now();
    let e = RedisStore::connect(&url, "tmtls:").await.err().unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
}
