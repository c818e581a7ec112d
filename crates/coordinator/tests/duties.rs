//! The coordinator's duties, in process: its public `run` over the embedded
//! store and the in-process task queue, with the test standing in for the
//! workers (it takes the page tasks and commits as they would) and for the
//! operator (through `tidemark_coordinator::ops`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use std::time::{Duration, Instant};

use support::{TICK, World, eventually, inspections, now_ms, partitioned, tickets};
use tidemark_coordinator::CoordinatorOptions;
use tidemark_coordinator::ops::{self, Action, RewindTo};
use tidemark_core::checkpoint::{Checkpoint, Commit, CommitOutcome, JobId, Phase, Stage};
use tidemark_core::tenant::Tenant;
use tidemark_state::{Leases, TenantRegistry};

/// A chain lease no test outlives.
const LONG: Duration = Duration::from_secs(30);
const LEADER_TTL: Duration = Duration::from_millis(300);

/// Every due job gets one chain: a new epoch, the job running under it, and
/// its first page task from the stored start. A job not yet due is left
/// alone, and the registry the workers read is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_job_gets_one_chain_with_a_new_epoch_and_its_first_task() {
    let w = World::new(&[tickets("tickets")]);
    let (a, b) = (JobId::new("tickets", "a"), JobId::new("tickets", "b"));
    let later = now_ms() + 3_600_000;
    w.seed(
        &b,
        Checkpoint {
            next_due_ms: later,
            ..Checkpoint::default()
        },
    )
    .await;
    let c = w.coordinator("c1", LONG, LEADER_TTL);

    let task = w.next_task().await;
    let cp = w.checkpoint(&a).await;
    assert_eq!(task.job, a);
    assert!(task.epoch > 0);
    assert_eq!(
        (task.seq, task.cursor.as_deref(), task.start_from.as_deref()),
        (0, None, None)
    );
    assert_eq!((cp.phase, cp.epoch), (Phase::Running, task.epoch), "{cp:?}");
    assert!(
        cp.lease_until_ms > now_ms() + LONG.as_millis() as u64 / 2,
        "{cp:?}"
    );
    // A running chain is not started twice; a job not due is not started.
    w.no_task("a is running and b is not due").await;
    let b_cp = w.checkpoint(&b).await;
    assert_eq!(
        (b_cp.phase, b_cp.epoch, b_cp.next_due_ms),
        (Phase::Idle, 0, later)
    );
    c.metric_is("tidemark_chains_started_total", &[("feed", "tickets")], 1)
        .await;
    let jobs = |phase| c.metric("tidemark_jobs", &[("feed", "tickets"), ("phase", phase)]);
    assert_eq!((jobs("running"), jobs("idle")), (1, 1));
    let (_, registered) = w
        .registry()
        .await
        .expect("the feed registry for the workers");
    assert_eq!(registered.feeds.len(), 1);
    assert_eq!(registered.feeds[0].name, "tickets");
    c.stop().await;
}

/// Seed 002: T0 is recorded before the bulk walk's first task, and a chain
/// re-issued mid-walk keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_walk_records_t0_before_its_first_task_and_keeps_it() {
    let w = World::new(&[inspections("inspections")]);
    let job = JobId::new("inspections", "all");
    let before = chrono::Utc::now().timestamp();
    let c = w.coordinator("c1", Duration::from_millis(150), LEADER_TTL);

    let first = w.next_task().await;
    let cp = w.checkpoint(&job).await;
    let t0 = cp.t0.clone().expect("T0 recorded");
    let t0_secs = chrono::DateTime::parse_from_rfc3339(&t0)
        .unwrap()
        .timestamp();
    assert!(
        (before..=chrono::Utc::now().timestamp()).contains(&t0_secs),
        "T0 {t0}"
    );
    assert_eq!(cp.stage, Stage::Bulk);
    // Nobody works the chain: its lease runs out and it is re-issued.
    let again = w.next_task().await;
    assert!(again.epoch > first.epoch);
    assert_eq!(
        w.checkpoint(&job).await.t0.as_deref(),
        Some(t0.as_str()),
        "T0 moved"
    );
    c.stop().await;
}

/// A chain whose lease expired (its worker died, or its next task was lost)
/// is re-issued under a new epoch from the stored cursor; the dead worker's
/// late commit is fenced. A chain whose lease is live is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_is_reissued_from_the_stored_cursor_under_a_new_epoch() {
    let w = World::new(&[tickets("tickets")]);
    let (a, b) = (JobId::new("tickets", "a"), JobId::new("tickets", "b"));
    // b's chain is alive elsewhere: a live lease under epoch 7.
    let alive = Checkpoint {
        phase: Phase::Running,
        epoch: 7,
        seq: 4,
        cursor: Some("b4".into()),
        lease_until_ms: now_ms() + 3_600_000,
        ..Checkpoint::default()
    };
    w.seed(&b, alive.clone()).await;
    let lease = Duration::from_millis(250);
    let c = w.coordinator("c1", lease, LEADER_TTL);

    // A worker takes a's first task, commits its first page, and dies.
    let first = w.next_task().await;
    assert_eq!(first.job, a);
    let committed = w.commit(&a, first.epoch, 0, "a1", lease).await;
    assert_eq!(committed, CommitOutcome::Ok);

    let reissued = w.next_task().await;
    assert_eq!(reissued.job, a);
    assert!(reissued.epoch > first.epoch);
    assert_eq!((reissued.seq, reissued.cursor.as_deref()), (1, Some("a1")));
    let cp = w.checkpoint(&a).await;
    assert_eq!((cp.phase, cp.epoch), (Phase::Running, reissued.epoch));
    c.metric_is("tidemark_chains_reissued_total", &[("feed", "tickets")], 1)
        .await;
    c.metric_is("tidemark_chains_started_total", &[("feed", "tickets")], 1)
        .await;
    // The old chain's worker comes back too late: nothing moves.
    assert_eq!(
        w.commit(&a, first.epoch, 1, "a2", lease).await,
        CommitOutcome::Fenced
    );
    assert_eq!(w.checkpoint(&a).await.cursor.as_deref(), Some("a1"));
    assert_eq!(w.checkpoint(&b).await, alive, "a live chain was touched");
    c.stop().await;
}

/// Pause fences the chain in flight and no chain starts while paused (a
/// rewind then moves the job but keeps it paused); resume starts a chain
/// at once, from where the job stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_fences_the_chain_and_resume_starts_one_from_where_the_job_stands() {
    let w = World::new(&[tickets("tickets")]);
    let a = JobId::new("tickets", "a");
    let c = w.coordinator("c1", LONG, LEADER_TTL);
    let _ = (w.next_task().await, w.next_task().await); // a's and b's chains
    let first = w.checkpoint(&a).await.epoch;

    let paused = w.operator("tickets", Some("a"), Action::Pause).await;
    assert_eq!(paused.applied.len(), 1);
    let cp = w.checkpoint(&a).await;
    assert_eq!(
        (cp.phase, cp.epoch),
        (Phase::Paused, paused.applied[0].epoch)
    );
    assert!(cp.epoch > first);
    assert_eq!(
        w.commit(&a, first, 0, "a1", LONG).await,
        CommitOutcome::Fenced,
        "the paused chain committed"
    );
    let rewound = w
        .operator(
            "tickets",
            Some("a"),
            Action::Rewind {
                to: RewindTo::Cursor("from-here".into()),
            },
        )
        .await;
    let cp = w.checkpoint(&a).await;
    assert_eq!(
        (cp.phase, cp.cursor.as_deref()),
        (Phase::Paused, Some("from-here"))
    );
    assert!(rewound.applied[0].epoch > paused.applied[0].epoch);
    w.no_task("the job is paused").await;

    let resumed = w.operator("tickets", Some("a"), Action::Resume).await;
    let task = w.next_task().await;
    assert_eq!(task.job, a);
    assert!(task.epoch > resumed.applied[0].epoch);
    assert_eq!((task.seq, task.cursor.as_deref()), (0, Some("from-here")));
    assert_eq!(w.checkpoint(&a).await.phase, Phase::Running);
    c.stop().await;
}

/// Rewind fences the running chain and the coordinator starts a new one at
/// once from where the rewind put the job: a cursor, a time, the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewind_fences_the_chain_and_a_new_one_starts_where_it_points() {
    let w = World::new(&[tickets("tickets")]);
    let a = JobId::new("tickets", "a");
    let c = w.coordinator("c1", LONG, LEADER_TTL);
    let mut task = w.next_task_of(&a).await;
    assert_eq!(
        w.commit(&a, task.epoch, 0, "a1", LONG).await,
        CommitOutcome::Ok
    );

    let rewinds = [
        (RewindTo::Cursor("c-x".into()), Some("c-x"), None),
        (
            RewindTo::Time("2024-03-01".into()),
            None,
            Some("2024-03-01T00:00:00Z"),
        ),
        (RewindTo::Start, None, None),
    ];
    for (to, cursor, start_from) in rewinds {
        let report = w
            .operator("tickets", Some("a"), Action::Rewind { to: to.clone() })
            .await;
        assert!(report.applied[0].epoch > task.epoch, "{to:?}");
        assert_eq!(
            w.commit(&a, task.epoch, task.seq, "old", LONG).await,
            CommitOutcome::Fenced,
            "{to:?}: the rewound chain committed"
        );
        let next = w.next_task_of(&a).await;
        assert!(next.epoch > report.applied[0].epoch, "{to:?}");
        assert_eq!(
            (next.cursor.as_deref(), next.start_from.as_deref()),
            (cursor, start_from),
            "{to:?}"
        );
        let cp = w.checkpoint(&a).await;
        assert_eq!((cp.phase, cp.epoch), (Phase::Running, next.epoch), "{to:?}");
        task = next;
    }
    let cp = w.checkpoint(&a).await;
    assert_eq!((cp.high_water, cp.stage, cp.t0), (None, Stage::Bulk, None));
    c.stop().await;
}

/// Two coordinators on one store: one leads, the other waits. When the
/// leader stops it resigns, and the standby leads well within the leader
/// TTL and carries on (here: re-issuing a chain nobody works).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_at_once_when_the_leader_stops() {
    let w = World::new(&[inspections("inspections")]);
    // The first leader stops well before its chain's lease runs out, so
    // only the new leader can re-issue it.
    let lease = Duration::from_millis(400);
    let ttl = Duration::from_millis(800);
    let first_leader = w.coordinator("one", lease, ttl);
    let first = w.next_task().await;
    let standby = w.coordinator("two", lease, ttl);
    eventually("the first coordinator says it leads", async || {
        first_leader.leads()
    })
    .await;
    tokio::time::sleep(support::TICK * 5).await;
    assert!(!standby.leads(), "two leaders at once");

    let stopped = Instant::now();
    first_leader.stop().await;
    eventually("the standby leads", async || standby.leads()).await;
    assert!(
        stopped.elapsed() < ttl / 2,
        "took {:?}: the leader did not resign",
        stopped.elapsed()
    );
    let reissued = w.next_task().await;
    assert!(reissued.epoch > first.epoch);
    standby
        .metric_is(
            "tidemark_chains_reissued_total",
            &[("feed", "inspections")],
            1,
        )
        .await;
    standby.stop().await;
}

/// A leader that dies without resigning keeps its leadership until its
/// TTL lapses; then the standby leads and carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_once_a_dead_leaders_ttl_lapses() {
    let w = World::new(&[inspections("inspections")]);
    let lease = Duration::from_millis(200);
    let first_leader = w.coordinator("one", lease, LEADER_TTL);
    let first = w.next_task().await;
    let standby = w.coordinator("two", lease, LEADER_TTL);

    let died = Instant::now();
    first_leader.crash().await;
    tokio::time::sleep(LEADER_TTL / 3).await;
    assert!(
        !standby.leads(),
        "took the leadership of a leader whose lease was live"
    );
    eventually("the standby leads", async || standby.leads()).await;
    assert!(
        died.elapsed() >= LEADER_TTL / 2,
        "took over after {:?}",
        died.elapsed()
    );
    let reissued = w.next_task().await;
    assert!(reissued.epoch > first.epoch);
    standby
        .metric_is(
            "tidemark_chains_reissued_total",
            &[("feed", "inspections")],
            1,
        )
        .await;
    standby.stop().await;
}

/// Admission control: no more chains run than `--max-running`, due jobs
/// wait in the store instead of the queue, the feed of one job is served
/// beside the feed of forty, and a chain that ends lets the next one in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_holds_the_bound_and_serves_every_feed() {
    let w = World::new(&[partitioned("big", 40), partitioned("small", 1)]);
    let c = w.coordinator_with(CoordinatorOptions {
        id: "c1".into(),
        tick: TICK,
        queue_lease: LONG,
        leader_ttl: LEADER_TTL,
        max_running: 4,
        ..CoordinatorOptions::default()
    });
    let mut tasks = Vec::new();
    for _ in 0..4 {
        tasks.push(w.next_task().await);
    }
    w.no_task("four chains run: the bound").await;
    assert!(
        tasks.iter().any(|t| t.job.feed == "small"),
        "the one-job feed waited behind the big one: {:?}",
        tasks.iter().map(|t| t.job.to_string()).collect::<Vec<_>>()
    );
    let running = tidemark_state::Schedule::running(&*w.store).await.unwrap();
    assert_eq!(running, 4);
    let due = tidemark_state::Schedule::due_jobs(&*w.store, &[("big".into(), 100)], now_ms())
        .await
        .unwrap();
    assert_eq!(due.len(), 37, "the rest wait, due, in the store");
    assert_eq!(c.metric("tidemark_admission_limit", &[]), 4);

    // One chain reaches its end of stream: one more is admitted, no more.
    let done = &tasks[0];
    let end = Commit {
        epoch: done.epoch,
        expected_seq: 0,
        new_cursor: Some("end".into()),
        new_seq: 1,
        high_water: None,
        count: 1,
        end_of_stream: true,
        next_due_ms: now_ms() + 3_600_000,
        lease_ms: 0,
        restart: None,
        note: None,
        triggers: Vec::new(),
        batches: Vec::new(),
    };
    assert_eq!(
        tidemark_state::Leases::commit(&*w.store, &done.job, &end)
            .await
            .unwrap(),
        CommitOutcome::Ok
    );
    let next = w.next_task().await;
    assert_eq!(next.job.feed, "big");
    assert!(!tasks.iter().any(|t| t.job == next.job));
    w.no_task("still four running").await;
    c.stop().await;
}

/// Tenants come from the file, the list and `tenants add`: each tenant's
/// jobs are created and started within a tick of its arrival, with its
/// vars in the first task; a tenant that leaves the file has its jobs
/// retired (the chain in flight fenced) and its state kept; a broken edit
/// of the file changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_come_and_go_within_a_tick() {
    let feed = tickets("tickets").replace(
        "/api/v2/incremental/tickets/cursor.json",
        "/api/{vars.region}/tickets.json",
    );
    let w = World::with_source(
        "    tenants:\n      file: {dir}/tenants.yaml\n      list: [{ name: inline, vars: { region: ap } }]\n",
        &[feed],
    );
    let file = w.dir.path().join("tenants.yaml");
    let write = |text: &str| {
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, &file).expect("rename");
    };
    write("- { name: acme, vars: { region: eu } }\n- { name: globex, vars: { region: us } }\n");
    let c = w.coordinator("c1", Duration::from_secs(60), Duration::from_secs(5));

    // Three tenants × two partitions: six chains, each task with its tenant's vars.
    let mut first = std::collections::BTreeMap::new();
    for _ in 0..6 {
        let t = w.next_task().await;
        first.insert(t.job.partition.clone(), t);
    }
    assert_eq!(
        first.keys().map(String::as_str).collect::<Vec<_>>(),
        vec![
            "acme/a", "acme/b", "globex/a", "globex/b", "inline/a", "inline/b"
        ]
    );
    assert_eq!(first["acme/a"].vars["region"], "eu");
    assert_eq!(first["inline/b"].vars["region"], "ap");
    let active = w.store.active_tenants("api").await.expect("active");
    let origins: Vec<(&str, &str)> = active
        .iter()
        .map(|t| (t.name.as_str(), t.origin.as_str()))
        .collect();
    assert_eq!(
        origins,
        vec![("acme", "file"), ("globex", "file"), ("inline", "list")]
    );

    // Added at run time: started within a tick or two, no restart.
    let newco = Tenant::new("newco").with_var("region", "eu");
    assert!(
        ops::add_tenant(&*w.store, "api", &newco)
            .await
            .expect("add")
    );
    let a = w.next_task().await;
    let b = w.next_task().await;
    let mut got = vec![a.job.partition.clone(), b.job.partition.clone()];
    got.sort();
    assert_eq!(got, vec!["newco/a", "newco/b"]);
    assert_eq!(a.vars["region"], "eu");

    // A tenant that needs a var it lacks is refused before it is stored.
    let err = ops::add_tenant(&*w.store, "api", &Tenant::new("novars"))
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("vars.region"), "{err}");
    // A tenant of the file cannot be removed from here.
    let err = ops::remove_tenant(&*w.store, "api", "acme", false)
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("tenants file"), "{err}");

    // globex leaves the file: its jobs are retired and their chains fenced.
    let globex_a = JobId::new("tickets", "globex/a");
    let before = w.checkpoint(&globex_a).await.epoch;
    write("- { name: acme, vars: { region: eu } }\n");
    eventually("globex's jobs are retired", async || {
        tidemark_state::feed_jobs(&*w.store, "tickets")
            .await
            .expect("jobs")
            .iter()
            .all(|(j, _)| !j.partition.starts_with("globex/"))
    })
    .await;
    let after = w.checkpoint(&globex_a).await;
    assert!(after.epoch > before, "the chain in flight is fenced");
    assert_eq!(
        w.commit(&globex_a, before, 0, "late", Duration::from_secs(60))
            .await,
        CommitOutcome::Fenced
    );

    // A broken edit keeps the tenants as they were.
    write("- { name: acme, vars: { region: eu }\n");
    eventually("the broken file is counted", async || {
        c.metric("tidemark_tenants_file_errors_total", &[("source", "api")]) >= 1
    })
    .await;
    let names: Vec<String> = w
        .store
        .active_tenants("api")
        .await
        .expect("active")
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, vec!["acme", "inline", "newco"]);
    assert_eq!(c.metric("tidemark_tenants", &[("source", "api")]), 3);

    // Removing the added tenant retires it; --purge deletes its state.
    let r = ops::remove_tenant(&*w.store, "api", "newco", true)
        .await
        .expect("remove");
    assert!(r.removed);
    assert_eq!(r.purged, 2);
    assert!(
        w.store
            .get(&JobId::new("tickets", "newco/a"))
            .await
            .expect("get")
            .is_none()
    );
    // A tenant gone from the file can be purged too.
    let r = ops::remove_tenant(&*w.store, "api", "globex", true)
        .await
        .expect("purge globex");
    assert_eq!((r.removed, r.purged), (false, 2));
    c.stop().await;
}

/// A source that starts with no tenants at all: the first one added is
/// started within a tick, not at the next periodic registration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_tenant_of_an_empty_source_starts_at_once() {
    let w = World::with_source("    tenants: {}\n", &[tickets("tickets")]);
    let c = w.coordinator("c1", Duration::from_secs(60), Duration::from_secs(5));
    w.no_task("there is no tenant yet").await;
    assert!(
        ops::add_tenant(&*w.store, "api", &Tenant::new("first"))
            .await
            .expect("add")
    );
    let t = w.next_task().await;
    assert!(t.job.partition.starts_with("first/"), "{:?}", t.job);
    c.stop().await;
}
