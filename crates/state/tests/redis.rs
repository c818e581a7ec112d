//! What only a real Redis can show: surviving a SIGKILL and an AOF restart,
//! leadership moving when a leader goes quiet, and the same answers as the
//! embedded store for random sequences of operations.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use support::*;
use tidemark_core::checkpoint::{
    Checkpoint, Commit, CommitOutcome, JobId, NEVER_DUE_MS, Phase, Trigger,
};
use tidemark_core::clock::now_ms;
use tidemark_harness::redis_server::RedisServer;
use tidemark_state::{
    Acquire, Control, EmbeddedStore, Jobs, LeaderGuard, Leadership, Leases, RedisStore, Rewind,
    Schedule,
};

fn commit(epoch: u64, seq: u64, cursor: &str) -> Commit {
    Commit {
        epoch,
        expected_seq: seq,
        new_cursor: Some(cursor.into()),
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

#[tokio::test(flavor = "multi_thread")]
async fn a_sigkilled_aof_redis_comes_back_with_state_and_never_reuses_an_epoch() {
    let mut server = tokio::task::block_in_place(RedisServer::start_aof);
    let store = RedisStore::connect(&server.url(), "tidemark:")
        .await
        .unwrap();
    let job = JobId::new("feed", "p");
    store.ensure(&job, &Checkpoint::default()).await.unwrap();
    let mut epochs = Vec::new();
    for seq in 0..5 {
        let Acquire::Granted { epoch } = store
            .acquire(&job, Duration::from_secs(60), true)
            .await
            .unwrap()
        else {
            panic!()
        };
        epochs.push(epoch);
        assert_eq!(
            store
                .commit(&job, &commit(epoch, seq, &format!("c{}", seq + 1)))
                .await
                .unwrap(),
            CommitOutcome::Ok
        );
    }
    tokio::time::sleep(Duration::from_millis(1200)).await; // everysec: now on disk
    // Writes in the last second may be lost; this one is allowed to be.
    let Acquire::Granted { epoch: last } = store
        .acquire(&job, Duration::from_secs(60), true)
        .await
        .unwrap()
    else {
        panic!()
    };
    epochs.push(last);
    server.kill9();
    tokio::task::block_in_place(|| server.restart());

    let fresh = RedisStore::connect(&server.url(), "tidemark:")
        .await
        .unwrap();
    let cp = fresh
        .get(&job)
        .await
        .unwrap()
        .expect("the checkpoint survived");
    assert_eq!(
        (cp.seq, cp.cursor.as_deref()),
        (5, Some("c5")),
        "at most the last second is lost"
    );
    let max_before = *epochs.iter().max().unwrap();
    // Even if the restored epoch were older still, time has moved past every lost one.
    let Acquire::Granted { epoch: next } = fresh
        .acquire(&job, Duration::from_secs(60), true)
        .await
        .unwrap()
    else {
        panic!()
    };
    assert!(
        next > max_before,
        "epoch {next} reused or went back (max before kill {max_before})"
    );
    // The commit script is loaded again after the restart (NOSCRIPT is handled).
    assert_eq!(
        fresh.commit(&job, &commit(next, 5, "c6")).await.unwrap(),
        CommitOutcome::Ok
    );
    // The old store's connection reconnects by itself.
    let mut ok = false;
    for _ in 0..20 {
        if let Ok(Some(cp)) = store.get(&job).await {
            assert_eq!(cp.seq, 6);
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "the first store did not reconnect");
}

#[tokio::test(flavor = "multi_thread")]
async fn leadership_moves_when_the_leader_goes_quiet() {
    let redis = redis_store().await;
    let s: Arc<dyn Leadership> = redis.clone();
    let ttl = Duration::from_millis(600);
    let a = LeaderGuard::new(s.clone(), "coordinator-a", ttl);
    let b = LeaderGuard::new(s.clone(), "coordinator-b", ttl);
    assert!(a.tick().await.unwrap());
    assert!(!b.tick().await.unwrap());
    assert!(a.is_leader() && !b.is_leader());
    // a stops renewing (a stalled process): it stops acting before b can take over.
    tokio::time::sleep(ttl.mul_f64(0.85)).await;
    assert!(!a.is_leader(), "a stale leader must stop acting at once");
    tokio::time::sleep(ttl.mul_f64(0.3)).await;
    assert!(b.tick().await.unwrap());
    assert!(b.is_leader());
    assert!(!a.tick().await.unwrap());
    b.resign().await.unwrap();
    assert!(!b.is_leader());
    assert!(a.tick().await.unwrap());
    redis.delete_all().await.unwrap();
}

#[derive(Debug, Clone)]
enum Op {
    Acquire {
        force: bool,
    },
    Renew {
        stale: bool,
    },
    Release {
        stale: bool,
    },
    Commit {
        stale: bool,
        seq_offset: i8,
        same_cursor: bool,
        eos: bool,
        hw: u8,
        /// A cursor too long for Redis's compact hash encoding.
        long: bool,
        /// The page's record triggers the child job, with this version.
        trigger: Option<u8>,
    },
    /// The child job's chain starts, and ends (waiting for its parent).
    ChildStart,
    ChildEnd,
    Fail {
        stale: bool,
    },
    Pause,
    Resume,
    RewindCursor,
    RewindStart,
    Take {
        stale: bool,
    },
    Retire,
    Ensure,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        any::<bool>().prop_map(|force| Op::Acquire { force }),
        any::<bool>().prop_map(|stale| Op::Renew { stale }),
        any::<bool>().prop_map(|stale| Op::Release { stale }),
        (
            prop::bool::weighted(0.2),
            -1i8..=1,
            prop::bool::weighted(0.8),
            prop::bool::weighted(0.2),
            0u8..20,
            any::<bool>(),
            prop::option::of(0u8..3),
        )
            .prop_map(|(stale, seq_offset, same_cursor, eos, hw, long, trigger)| {
                Op::Commit {
                    stale,
                    seq_offset,
                    same_cursor,
                    eos,
                    hw,
                    long,
                    trigger,
                }
            }),
        Just(Op::ChildStart),
        Just(Op::ChildEnd),
        any::<bool>().prop_map(|stale| Op::Fail { stale }),
        Just(Op::Pause),
        Just(Op::Resume),
        Just(Op::RewindCursor),
        Just(Op::RewindStart),
        any::<bool>().prop_map(|stale| Op::Take { stale }),
        Just(Op::Retire),
        Just(Op::Ensure),
    ]
}

/// Apply `op` to `s`, tracking its current and previous epochs; return a comparable answer.
async fn run<S: Jobs + Leases + Schedule + ?Sized>(
    s: &S,
    job: &JobId,
    epochs: &mut (u64, u64),
    op: &Op,
) -> String {
    let lease = Duration::from_secs(60);
    let pick = |stale: bool, e: &(u64, u64)| if stale { e.1 } else { e.0 };
    match op {
        Op::Acquire { force } => match s.acquire(job, lease, *force).await.unwrap() {
            Acquire::Granted { epoch } => {
                *epochs = (epoch, epochs.0);
                "granted".into()
            }
            Acquire::Busy { .. } => "busy".into(),
            other => format!("{other:?}"),
        },
        Op::Renew { stale } => s
            .renew(job, pick(*stale, epochs), lease)
            .await
            .unwrap()
            .to_string(),
        Op::Release { stale } => s
            .release(job, pick(*stale, epochs))
            .await
            .unwrap()
            .to_string(),
        Op::Commit {
            stale,
            seq_offset,
            same_cursor,
            eos,
            hw,
            long,
            trigger,
        } => {
            let seq = s.get(job).await.unwrap().unwrap().seq;
            let expected = (seq as i64 + i64::from(*seq_offset)).max(0) as u64;
            let mut c = commit(
                pick(*stale, epochs),
                expected,
                if *same_cursor { "c" } else { "d" },
            );
            c.new_cursor = Some(format!(
                "{}{}{}",
                c.new_cursor.unwrap_or_default(),
                expected + 1,
                if *long {
                    "/".repeat(100)
                } else {
                    String::new()
                }
            ));
            c.end_of_stream = *eos;
            c.high_water = Some(hw.to_string());
            if let Some(v) = trigger {
                c.triggers = vec![Trigger {
                    job: child(),
                    version: format!("v{v}"),
                    vars: [("id".to_string(), "k".repeat(70))].into(),
                }];
            }
            format!("{:?}", s.commit(job, &c).await.unwrap())
        }
        Op::Fail { stale } => s
            .fail(
                job,
                pick(*stale, epochs),
                &format!("boom: {}", "e".repeat(80)),
            )
            .await
            .unwrap()
            .to_string(),
        Op::Pause | Op::Resume | Op::RewindCursor | Op::RewindStart => {
            let control = match op {
                Op::Pause => Control::Pause,
                Op::Resume => Control::Resume,
                Op::RewindCursor => {
                    Control::Rewind(Rewind::Cursor(format!("rewound{}", "~".repeat(70))))
                }
                _ => Control::Rewind(Rewind::Start),
            };
            let e = s.control(job, &control).await.unwrap();
            *epochs = (e, epochs.0);
            "controlled".into()
        }
        Op::Take { stale } => {
            let seq = s.get(job).await.unwrap().unwrap().seq;
            let cp = s
                .take(job, pick(*stale, epochs), seq, lease)
                .await
                .unwrap()
                .unwrap();
            cp.phase.as_str().into()
        }
        Op::Retire => {
            let retired = s.retire(job).await.unwrap();
            if retired {
                // The retirement took a new epoch: nobody holds it.
                *epochs = (s.get(job).await.unwrap().unwrap().epoch, epochs.0);
            }
            retired.to_string()
        }
        Op::Ensure => s
            .ensure(job, &Checkpoint::default())
            .await
            .unwrap()
            .to_string(),
        Op::ChildStart => match s.acquire(&child(), lease, false).await.unwrap() {
            Acquire::Granted { .. } => "granted".into(),
            // Each store reads its own clock: the lease end may differ by a
            // millisecond, so only the answer's kind is compared.
            Acquire::Busy { .. } => "busy".into(),
            other => format!("{other:?}"),
        },
        Op::ChildEnd => match s.get(&child()).await.unwrap() {
            None => "none".into(),
            Some(cp) => {
                let mut c = commit(cp.epoch, cp.seq, "end");
                c.end_of_stream = true;
                c.next_due_ms = NEVER_DUE_MS;
                format!("{:?}", s.commit(&child(), &c).await.unwrap())
            }
        },
    }
}

/// The child job the parent's commits trigger.
fn child() -> JobId {
    JobId::new("prop_child", "k/1")
}

/// What both stores must agree on about the child job: its phase, parent
/// version, rerun flag, whether it waits for its parent, and whether it is
/// due or running in the indexes.
async fn child_state<S: Jobs + Leases + Schedule + ?Sized>(s: &S) -> String {
    let Some(cp) = s.get(&child()).await.unwrap() else {
        return "none".into();
    };
    let due = s
        .due_jobs(&[("prop_child".to_string(), 10)], u64::MAX - 1)
        .await
        .unwrap()
        .contains(&child());
    let running = s.expired(u64::MAX, 10).await.unwrap().contains(&child());
    let waits = cp.next_due_ms >= NEVER_DUE_MS;
    assert_eq!(
        (due, running),
        (
            cp.phase == Phase::Idle && !waits,
            cp.phase == Phase::Running
        ),
        "the child's indexes say what its checkpoint says: {cp:?}"
    );
    format!(
        "{:?} {:?} rerun={} waits={waits} vars={:?} due={due}",
        cp.phase, cp.parent_version, cp.rerun, cp.vars
    )
}

/// Where the job is in the store's indexes: (registered, phase counts,
/// in the due index, in the running index, in the failed list).
async fn indexed<S: Jobs + Schedule + ?Sized>(
    s: &S,
    job: &JobId,
) -> (bool, [u64; 4], bool, bool, bool) {
    let census = s.census().await.unwrap();
    let c = census.iter().find(|c| c.feed == job.feed);
    let counts = c.map_or([0; 4], |c| [c.idle, c.running, c.paused, c.failed]);
    let registered = s.feeds().await.unwrap().contains(&job.feed);
    let due = s
        .due_jobs(&[(job.feed.clone(), 10)], u64::MAX)
        .await
        .unwrap()
        .contains(job);
    let running = s.expired(u64::MAX, 10).await.unwrap().contains(job);
    let failed = s
        .failures(&job.feed, 10)
        .await
        .unwrap()
        .iter()
        .any(|(j, _)| j == job);
    (registered, counts, due, running, failed)
}

fn comparable(
    cp: &Checkpoint,
) -> (
    Option<String>,
    u64,
    String,
    Option<String>,
    u64,
    u64,
    Option<String>,
) {
    (
        cp.cursor.clone(),
        cp.seq,
        cp.phase.as_str().into(),
        cp.high_water.clone(),
        cp.pages,
        cp.records,
        cp.last_error.clone(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn redis_and_the_embedded_store_answer_alike(ops in prop::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let redis = redis_store().await;
            let embedded = EmbeddedStore::in_memory();
            let job = JobId::new("prop", "p");
            redis.ensure(&job, &Checkpoint::default()).await.unwrap();
            embedded.ensure(&job, &Checkpoint::default()).await.unwrap();
            let (mut er, mut ee) = ((0, 0), (0, 0));
            for (i, op) in ops.iter().enumerate() {
                let a = run(&*redis, &job, &mut er, op).await;
                let b = run(&embedded, &job, &mut ee, op).await;
                assert_eq!(a, b, "step {i} {op:?}");
                let (x, y) = (redis.get(&job).await.unwrap().unwrap(), embedded.get(&job).await.unwrap().unwrap());
                assert_eq!(comparable(&x), comparable(&y), "state after step {i} {op:?}");
                assert_eq!(child_state(&*redis).await, child_state(&embedded).await, "the child after step {i} {op:?}");
                // The indexes say what the checkpoint says, in both stores.
                let (ix, iy) = (indexed(&*redis, &job).await, indexed(&embedded, &job).await);
                assert_eq!(ix, iy, "indexes after step {i} {op:?}");
                let (registered, counts, due, running, failed) = ix;
                if registered {
                    let mut want = [0; 4];
                    want[[Phase::Idle, Phase::Running, Phase::Paused, Phase::Failed].iter().position(|p| *p == x.phase).unwrap()] = 1;
                    assert_eq!(counts, want, "counts after step {i} {op:?}");
                    assert_eq!((due, running, failed), (x.phase == Phase::Idle, x.phase == Phase::Running, x.phase == Phase::Failed), "after step {i} {op:?}");
                } else {
                    assert_eq!((counts, due, running, failed), ([0; 4], false, false, false), "a retired job is in no index (step {i} {op:?})");
                }
            }
            redis.delete_all().await.unwrap();
        });
    }
}

/// State written by a version without indexes (one hash per job and a set
/// of every job key) joins the indexes, once, with each job where it was.
#[tokio::test(flavor = "multi_thread")]
async fn state_of_the_layout_without_indexes_is_migrated_once() {
    let store = redis_store().await;
    let prefix = store.prefix().to_string();
    let client = redis::Client::open(redis_url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    // Exactly what layout 1's ensure and scripts wrote: a next URL as the
    // cursor, in the hash (which that turned into a hashtable).
    let url = format!("https://api.example.com/records?after={}", "c".repeat(80));
    type OldJob<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);
    let old: [OldJob; 4] = [
        (
            "orders",
            "p/1 ü",
            &[
                ("phase", "idle"),
                ("next_due_ms", "0"),
                ("seq", "3"),
                ("cursor", url.as_str()),
            ],
        ),
        (
            "orders",
            "p2",
            &[
                ("phase", "running"),
                ("lease_until_ms", "1"),
                ("epoch", "7"),
                ("seq", "1"),
            ],
        ),
        (
            "orders",
            "p3",
            &[("phase", "failed"), ("last_error", "HTTP 401")],
        ),
        ("users", "all", &[("phase", "paused"), ("next_due_ms", "0")]),
    ];
    for (feed, part, fields) in old {
        tidemark_harness::legacy::write_job(&mut c, &prefix, feed, part, fields)
            .await
            .unwrap();
    }
    assert!(
        store.census().await.unwrap().is_empty(),
        "nothing is indexed before the migration"
    );

    assert_eq!(store.migrate().await.unwrap(), 4);
    assert_eq!(store.migrate().await.unwrap(), 0, "the migration runs once");
    let legacy: bool = redis::cmd("EXISTS")
        .arg(format!("{prefix}jobs"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(!legacy, "the old set of job keys is gone");

    let census = store.census().await.unwrap();
    let orders = census.iter().find(|c| c.feed == "orders").unwrap();
    assert_eq!((orders.idle, orders.running, orders.failed), (1, 1, 1));
    assert_eq!(census.iter().find(|c| c.feed == "users").unwrap().paused, 1);
    let due = store
        .due_jobs(&[("orders".into(), 10), ("users".into(), 10)], now_ms())
        .await
        .unwrap();
    assert_eq!(due, vec![JobId::new("orders", "p/1 ü")]);
    assert_eq!(
        store.expired(now_ms(), 10).await.unwrap(),
        vec![JobId::new("orders", "p2")]
    );
    let failed = store.failures("orders", 10).await.unwrap();
    assert_eq!(failed[0].1.last_error.as_deref(), Some("HTTP 401"));
    // The checkpoints are untouched: the chain of p2 is re-issued from seq 1.
    match store
        .acquire(&JobId::new("orders", "p2"), Duration::from_secs(5), false)
        .await
        .unwrap()
    {
        Acquire::Granted { epoch } => assert!(epoch > 7),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        store
            .get(&JobId::new("orders", "p/1 ü"))
            .await
            .unwrap()
            .unwrap()
            .cursor
            .as_deref(),
        Some(url.as_str())
    );
    // Indexing rewrote that hash compactly, the URL beside it.
    let key = format!("{prefix}job:orders:{}", tidemark_state::member("p/1 ü"));
    let encoding: String = redis::cmd("OBJECT")
        .arg("ENCODING")
        .arg(&key)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(encoding, "listpack");
    store.delete_all().await.unwrap();
}

/// A long cursor or error (a next URL, an API's error text) is kept beside
/// the job's hash, so the hash keeps Redis's compact encoding: a few hundred
/// bytes a job instead of about a thousand (docs/BENCHMARKS.md).
#[tokio::test(flavor = "multi_thread")]
async fn long_values_keep_the_job_hash_compact() {
    let store = redis_store().await;
    let prefix = store.prefix().to_string();
    let client = redis::Client::open(redis_url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let job = JobId::new("urls", "p1");
    let key = format!("{prefix}job:urls:p1");
    store.ensure(&job, &Checkpoint::default()).await.unwrap();
    let epoch = match store
        .acquire(&job, Duration::from_secs(60), false)
        .await
        .unwrap()
    {
        Acquire::Granted { epoch } => epoch,
        other => panic!("{other:?}"),
    };
    let url = format!(
        "https://api.example.com/v1/records?after={}&limit=100",
        "x".repeat(120)
    );
    assert_eq!(
        store.commit(&job, &commit(epoch, 0, &url)).await.unwrap(),
        CommitOutcome::Ok
    );
    let encoding = |c: &mut redis::aio::MultiplexedConnection| {
        let key = key.clone();
        let mut c = c.clone();
        async move {
            let e: String = redis::cmd("OBJECT")
                .arg("ENCODING")
                .arg(&key)
                .query_async(&mut c)
                .await
                .unwrap();
            e
        }
    };
    assert_eq!(encoding(&mut c).await, "listpack");
    // Read back whole, through every path: the checkpoint, a take, a page.
    assert_eq!(
        store.get(&job).await.unwrap().unwrap().cursor.as_deref(),
        Some(url.as_str())
    );
    let taken = store
        .take(&job, epoch, 1, Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(taken.cursor.as_deref(), Some(url.as_str()));
    assert_eq!(
        store.list().await.unwrap()[0].1.cursor.as_deref(),
        Some(url.as_str())
    );
    // The same commit again is recognised (the stored cursor is compared whole).
    assert_eq!(
        store.commit(&job, &commit(epoch, 0, &url)).await.unwrap(),
        CommitOutcome::AlreadyApplied
    );
    let error = format!("HTTP 401: {}", "token revoked ".repeat(20));
    assert!(store.fail(&job, epoch, &error).await.unwrap());
    assert_eq!(encoding(&mut c).await, "listpack");
    assert_eq!(
        store.failures("urls", 1).await.unwrap()[0]
            .1
            .last_error
            .as_deref(),
        Some(error.as_str())
    );
    // Retried and rewound to a short cursor: the long values are gone.
    store
        .control(&job, &Control::Rewind(Rewind::Cursor("short".into())))
        .await
        .unwrap();
    store.control(&job, &Control::Resume).await.unwrap();
    let cp = store.get(&job).await.unwrap().unwrap();
    assert_eq!((cp.cursor.as_deref(), cp.last_error), (Some("short"), None));
    let left: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{key}:*"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
    store.delete_all().await.unwrap();
}
