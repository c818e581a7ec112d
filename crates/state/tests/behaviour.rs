//! One behavioural suite, run against Redis and against the embedded store.
//! Each test reaches the store through the capabilities it exercises.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::*;
use tidemark_core::checkpoint::{
    BatchTriggers, Checkpoint, Commit, CommitOutcome, JobId, NEVER_DUE_MS, Phase, Restart, Stage,
    Trigger,
};
use tidemark_core::clock::now_ms;
use tidemark_state::{
    Acquire, ActiveTenant, Control, FeedRegistry, Fleet, JobQuery, Jobs, Leadership, Leases,
    Rewind, Schedule, SourceLimits, TenantOrigin, TenantRegistry,
};

const LEASE: Duration = Duration::from_secs(30);

fn commit(epoch: u64, seq: u64, cursor: &str) -> Commit {
    Commit {
        epoch,
        expected_seq: seq,
        new_cursor: Some(cursor.to_string()),
        new_seq: seq + 1,
        high_water: Some(format!("2024-01-01T00:00:{:02}Z", seq % 60)),
        count: 100,
        end_of_stream: false,
        next_due_ms: 0,
        lease_ms: 30_000,
        restart: None,
        note: None,
        triggers: Vec::new(),
        batches: Vec::new(),
    }
}

async fn granted(s: &dyn Jobs, job: &JobId, force: bool) -> u64 {
    match s.acquire(job, LEASE, force).await.unwrap() {
        Acquire::Granted { epoch } => epoch,
        other => panic!("expected a lease, got {other:?}"),
    }
}

async fn new_job(s: &dyn Jobs, name: &str) -> JobId {
    let job = JobId::new(name, "p/1 ü");
    assert!(s.ensure(&job, &Checkpoint::default()).await.unwrap());
    assert!(
        !s.ensure(&job, &Checkpoint::default()).await.unwrap(),
        "ensure must not overwrite"
    );
    job
}

async fn lifecycle<S: Jobs + Leases>(s: Arc<S>) {
    let job = new_job(&*s, "life").await;
    let e = granted(&*s, &job, false).await;
    assert_eq!(
        s.acquire(&job, LEASE, false).await.unwrap(),
        Acquire::Busy {
            until_ms: s.get(&job).await.unwrap().unwrap().lease_until_ms
        }
    );
    assert_eq!(
        s.commit(&job, &commit(e, 0, "c1")).await.unwrap(),
        CommitOutcome::Ok
    );
    // A retry after a lost reply: applied once, answered ALREADY_APPLIED.
    assert_eq!(
        s.commit(&job, &commit(e, 0, "c1")).await.unwrap(),
        CommitOutcome::AlreadyApplied
    );
    let cp = s.get(&job).await.unwrap().unwrap();
    assert_eq!(
        (cp.seq, cp.pages, cp.records, cp.cursor.as_deref()),
        (1, 1, 100, Some("c1"))
    );
    assert!(cp.lease_until_ms > now_ms());
    let mut last = commit(e, 1, "resume-here");
    last.end_of_stream = true;
    last.next_due_ms = 12345;
    assert_eq!(s.commit(&job, &last).await.unwrap(), CommitOutcome::Ok);
    let cp = s.get(&job).await.unwrap().unwrap();
    assert_eq!(
        (
            cp.phase,
            cp.cursor.as_deref(),
            cp.next_due_ms,
            cp.lease_until_ms
        ),
        (Phase::Idle, Some("resume-here"), 12345, 0)
    );
    assert!(cp.last_end_of_stream_ms.is_some());
    assert_eq!(
        cp.high_water.as_deref(),
        Some("2024-01-01T00:00:01.000000000Z")
    );
    assert_eq!(
        s.commit(&job, &last).await.unwrap(),
        CommitOutcome::AlreadyApplied
    );
    let listed = s.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].0, job);
}

async fn concurrent_commits<S: Jobs + Leases + 'static>(s: Arc<S>) {
    let job = new_job(&*s, "race").await;
    let e = granted(&*s, &job, false).await;
    let mut tasks = Vec::new();
    for i in 0..32 {
        let s = s.clone();
        let job = job.clone();
        let cursor = if i % 2 == 0 {
            "same".to_string()
        } else {
            format!("other-{i}")
        };
        tasks.push(tokio::spawn(async move {
            s.commit(&job, &commit(e, 0, &cursor)).await.unwrap()
        }));
    }
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.unwrap());
    }
    assert_eq!(
        outcomes.iter().filter(|o| **o == CommitOutcome::Ok).count(),
        1,
        "{outcomes:?}"
    );
    assert!(outcomes.iter().all(|o| matches!(
        o,
        CommitOutcome::Ok | CommitOutcome::AlreadyApplied | CommitOutcome::Conflict
    )));
    assert_eq!(s.get(&job).await.unwrap().unwrap().seq, 1);

    // Mixed epochs: only the current one applies.
    let old = e;
    let new = granted(&*s, &job, true).await;
    assert!(new > old);
    let mut tasks = Vec::new();
    for i in 0..32u64 {
        let s = s.clone();
        let job = job.clone();
        let epoch = if i % 2 == 0 { old } else { new };
        tasks.push(tokio::spawn(async move {
            (
                epoch,
                s.commit(&job, &commit(epoch, 1, "two")).await.unwrap(),
            )
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let (epoch, o) = t.await.unwrap();
        if epoch == old {
            assert_eq!(o, CommitOutcome::Fenced);
        } else if o == CommitOutcome::Ok {
            ok += 1;
        } else {
            assert_eq!(o, CommitOutcome::AlreadyApplied);
        }
    }
    assert_eq!(ok, 1);
}

async fn expired_lease_fences_the_old_epoch<S: Jobs + Leases>(s: Arc<S>) {
    let job = new_job(&*s, "expiry").await;
    let Acquire::Granted { epoch: old } = s
        .acquire(&job, Duration::from_millis(100), false)
        .await
        .unwrap()
    else {
        panic!()
    };
    assert!(
        s.renew(&job, old, Duration::from_millis(100))
            .await
            .unwrap()
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    let new = granted(&*s, &job, false).await;
    assert!(new > old);
    assert_eq!(
        s.commit(&job, &commit(old, 0, "late")).await.unwrap(),
        CommitOutcome::Fenced
    );
    assert!(!s.renew(&job, old, LEASE).await.unwrap());
    assert!(!s.release(&job, old).await.unwrap());
    assert_eq!(
        s.commit(&job, &commit(new, 0, "c1")).await.unwrap(),
        CommitOutcome::Ok
    );
    assert!(s.release(&job, new).await.unwrap());
    assert_eq!(s.get(&job).await.unwrap().unwrap().lease_until_ms, 0);
}

async fn controls_take_new_epochs<S: Jobs + Leases>(s: Arc<S>) {
    let job = new_job(&*s, "ctl").await;
    let e1 = granted(&*s, &job, false).await;
    assert_eq!(
        s.commit(&job, &commit(e1, 0, "c1")).await.unwrap(),
        CommitOutcome::Ok
    );
    let e2 = s.control(&job, &Control::Pause).await.unwrap();
    assert!(e2 > e1);
    assert_eq!(
        s.commit(&job, &commit(e1, 1, "c2")).await.unwrap(),
        CommitOutcome::Fenced
    );
    assert_eq!(s.acquire(&job, LEASE, true).await.unwrap(), Acquire::Paused);
    assert_eq!(s.get(&job).await.unwrap().unwrap().phase, Phase::Paused);
    let e3 = s.control(&job, &Control::Resume).await.unwrap();
    assert!(e3 > e2);
    let e4 = granted(&*s, &job, false).await;
    let e5 = s
        .control(&job, &Control::Rewind(Rewind::Cursor("back".into())))
        .await
        .unwrap();
    assert!(e5 > e4);
    assert_eq!(
        s.commit(&job, &commit(e4, 1, "c2")).await.unwrap(),
        CommitOutcome::Fenced
    );
    let cp = s.get(&job).await.unwrap().unwrap();
    assert_eq!(
        (cp.cursor.as_deref(), cp.phase, cp.seq),
        (Some("back"), Phase::Idle, 1)
    );
    s.control(
        &job,
        &Control::Rewind(Rewind::Time("2024-05-01T00:00:00Z".into())),
    )
    .await
    .unwrap();
    let cp = s.get(&job).await.unwrap().unwrap();
    assert_eq!(
        (cp.cursor, cp.start_from.as_deref()),
        (None, Some("2024-05-01T00:00:00Z"))
    );
    assert!(cp.high_water.is_some());
    s.control(&job, &Control::Rewind(Rewind::Start))
        .await
        .unwrap();
    let cp = s.get(&job).await.unwrap().unwrap();
    assert_eq!(
        (cp.cursor, cp.start_from, cp.high_water),
        (None, None, None)
    );
    let missing = JobId::new("nope", "x");
    assert!(s.control(&missing, &Control::Pause).await.is_err());
    assert_eq!(
        s.acquire(&missing, LEASE, false).await.unwrap(),
        Acquire::Missing
    );
    assert_eq!(
        s.commit(&missing, &commit(1, 0, "x")).await.unwrap(),
        CommitOutcome::Fenced
    );
}

async fn failure_is_visible_and_retried_by_force<S: Jobs + Leases>(s: Arc<S>) {
    let job = new_job(&*s, "fail").await;
    let e = granted(&*s, &job, false).await;
    assert!(!s.fail(&job, e - 1, "stale").await.unwrap());
    assert!(
        s.fail(
            &job,
            e,
            "HTTP 500 from https://api.test/x (after 5 attempts)"
        )
        .await
        .unwrap()
    );
    let cp = s.get(&job).await.unwrap().unwrap();
    assert_eq!(cp.phase, Phase::Failed);
    assert_eq!(
        cp.last_error.as_deref(),
        Some("HTTP 500 from https://api.test/x (after 5 attempts)")
    );
    assert_eq!(
        s.acquire(&job, LEASE, false).await.unwrap(),
        Acquire::Failed
    );
    granted(&*s, &job, true).await;
    assert_eq!(s.get(&job).await.unwrap().unwrap().last_error, None);
}

async fn source_pause_and_leadership<S: SourceLimits + Leadership>(s: Arc<S>) {
    assert_eq!(s.source_paused_until("api").await.unwrap(), None);
    let until = now_ms() + 2000;
    s.pause_source("api", until).await.unwrap();
    s.pause_source("api", until - 1000).await.unwrap();
    assert_eq!(s.source_paused_until("api").await.unwrap(), Some(until));
    assert_eq!(s.source_paused_until("other").await.unwrap(), None);

    let ttl = Duration::from_secs(5);
    assert!(s.try_lead("a", ttl).await.unwrap());
    assert!(!s.try_lead("b", ttl).await.unwrap());
    assert!(s.try_lead("a", ttl).await.unwrap());
    s.resign("b").await.unwrap();
    assert!(!s.try_lead("b", ttl).await.unwrap());
    s.resign("a").await.unwrap();
    assert!(s.try_lead("b", ttl).await.unwrap());
}

async fn rate_limiter_shares_one_budget(s: Arc<dyn SourceLimits>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut granted = 0u32;
            loop {
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    return granted;
                }
                match s.rate_acquire("limited", 50.0, 1).await.unwrap() {
                    None => granted += 1,
                    Some(wait) => tokio::time::sleep(wait.min(deadline - now)).await,
                }
            }
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    // Never more than the budget (50/s for 3 s, plus the burst of 1, plus
    // a permit at each edge); fewer only when a loaded machine oversleeps,
    // so the lower bound is loose on purpose.
    assert!(
        (100..=153).contains(&total),
        "granted {total} permits in 3 s at 50/s"
    );
}

/// Tenants added at run time move the version the survey reads; the set a
/// coordinator runs is replaced whole; a retired job's state can be purged,
/// a registered one's cannot.
async fn tenants_and_purge<S: Jobs + Leases + Schedule + TenantRegistry>(s: Arc<S>) {
    let v0 = s.survey(now_ms(), 10, 10).await.unwrap().tenants_version;
    let acme = tidemark_core::tenant::Tenant::new("acme").with_var("region", "eu");
    assert!(s.add_tenant("helpdesk", &acme).await.unwrap(), "new");
    assert!(
        !s.add_tenant("helpdesk", &acme).await.unwrap(),
        "known: vars replaced"
    );
    assert!(
        s.add_tenant("helpdesk", &tidemark_core::tenant::Tenant::new("globex"))
            .await
            .unwrap()
    );
    let v1 = s.survey(now_ms(), 10, 10).await.unwrap().tenants_version;
    assert!(v1 > v0, "adding moved the version ({v0} -> {v1})");
    assert_eq!(s.tenants_version().await.unwrap(), v1);
    let added = s.added_tenants("helpdesk").await.unwrap();
    assert_eq!(
        added.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        vec!["acme", "globex"]
    );
    assert_eq!(added[0].vars["region"], "eu");
    assert!(s.added_tenants("other").await.unwrap().is_empty());
    assert!(s.remove_tenant("helpdesk", "globex").await.unwrap());
    assert!(!s.remove_tenant("helpdesk", "globex").await.unwrap());
    assert!(s.tenants_version().await.unwrap() > v1);

    let active = vec![
        ActiveTenant {
            name: "acme".into(),
            vars: [("region".to_string(), "eu".to_string())].into(),
            origin: TenantOrigin::Added,
        },
        ActiveTenant {
            name: "zeta".into(),
            vars: Default::default(),
            origin: TenantOrigin::File,
        },
    ];
    s.set_active_tenants("helpdesk", &active).await.unwrap();
    assert_eq!(s.active_tenants("helpdesk").await.unwrap(), active);
    s.set_active_tenants("helpdesk", &active[1..])
        .await
        .unwrap();
    assert_eq!(
        s.active_tenants("helpdesk").await.unwrap(),
        active[1..].to_vec()
    );

    // Purge: only what is retired.
    let job = JobId::new("tickets", "acme/all");
    s.ensure(&job, &Checkpoint::default()).await.unwrap();
    let e = granted(&*s, &job, false).await;
    assert_eq!(
        s.commit(&job, &commit(e, 0, "c1")).await.unwrap(),
        CommitOutcome::Ok
    );
    assert_eq!(
        s.purge(&job).await.unwrap(),
        None,
        "a registered job is not purged"
    );
    assert!(s.retire(&job).await.unwrap());
    assert_eq!(s.purge(&job).await.unwrap(), Some(true));
    assert!(s.get(&job).await.unwrap().is_none(), "its state is gone");
    assert_eq!(s.purge(&job).await.unwrap(), Some(false), "nothing left");
    // Ensured again, it starts afresh.
    s.ensure(&job, &Checkpoint::default()).await.unwrap();
    let cp = s.get(&job).await.unwrap().unwrap();
    assert_eq!((cp.cursor, cp.seq), (None, 0));
}

fn trigger(child: &JobId, version: &str) -> Trigger {
    Trigger {
        job: child.clone(),
        version: version.to_string(),
        vars: [("ticket_id".to_string(), child.partition.clone())].into(),
    }
}

/// A child's last commit: it waits for its parent.
fn child_end(epoch: u64, seq: u64) -> Commit {
    let mut end = commit(epoch, seq, "done");
    end.end_of_stream = true;
    end.next_due_ms = NEVER_DUE_MS;
    end
}

/// A parent page's commit creates, triggers or leaves its child jobs, in
/// the same step: a new child is due now; the same parent version again
/// triggers nothing; a changed one makes an idle child due and a running one
/// run again when its chain ends; a child that ran waits in no due index; a
/// rewound parent triggers its children again.
async fn parents_trigger_children<S: Jobs + Leases + Schedule>(s: Arc<S>) {
    let parent = new_job(&*s, "tickets").await;
    let (a, b) = (JobId::new("comments", "1"), JobId::new("comments", "2/x y"));
    let due = |s: Arc<S>| async move {
        s.due_jobs(&[("comments".to_string(), 10)], now_ms() + 1000)
            .await
            .unwrap()
    };
    let e = granted(&*s, &parent, false).await;
    let mut c = commit(e, 0, "c1");
    c.triggers = vec![trigger(&a, "v1"), trigger(&b, "v1")];
    assert_eq!(s.commit(&parent, &c).await.unwrap(), CommitOutcome::Ok);
    // A retry of the same commit changes nothing.
    assert_eq!(
        s.commit(&parent, &c).await.unwrap(),
        CommitOutcome::AlreadyApplied
    );
    let cp = s.get(&b).await.unwrap().unwrap();
    assert_eq!(
        (
            cp.phase,
            cp.parent_version.as_deref(),
            cp.vars["ticket_id"].as_str()
        ),
        (Phase::Idle, Some("v1"), "2/x y")
    );
    assert_eq!(due(s.clone()).await.len(), 2, "new children are due");

    // Child a runs to its end: it waits for its parent, due never.
    let ea = granted(&*s, &a, false).await;
    let end = child_end(ea, 0);
    assert_eq!(s.commit(&a, &end).await.unwrap(), CommitOutcome::Ok);
    assert_eq!(due(s.clone()).await, vec![b.clone()]);
    // Child b is running when its parent changes.
    let eb = granted(&*s, &b, false).await;

    let mut c = commit(e, 1, "c2");
    c.triggers = vec![trigger(&a, "v1"), trigger(&b, "v2")];
    assert_eq!(s.commit(&parent, &c).await.unwrap(), CommitOutcome::Ok);
    assert!(due(s.clone()).await.is_empty(), "a is unchanged, b runs");
    assert!(s.get(&b).await.unwrap().unwrap().rerun);
    let end = child_end(eb, 0);
    assert_eq!(s.commit(&b, &end).await.unwrap(), CommitOutcome::Ok);
    let cp = s.get(&b).await.unwrap().unwrap();
    assert!(
        !cp.rerun && cp.next_due_ms <= now_ms(),
        "b runs again at once"
    );
    assert_eq!(due(s.clone()).await, vec![b.clone()]);

    // A changed parent makes the idle child a due.
    let mut c = commit(e, 2, "c3");
    c.triggers = vec![trigger(&a, "v2")];
    assert_eq!(s.commit(&parent, &c).await.unwrap(), CommitOutcome::Ok);
    assert_eq!(due(s.clone()).await.len(), 2);
    let census = s.census().await.unwrap();
    let comments = census.iter().find(|c| c.feed == "comments").unwrap();
    assert_eq!(
        (comments.idle, comments.oldest_progress_ms),
        (2, None),
        "a child's cursor does not age"
    );

    // The parent is rewound: the same records trigger their children again.
    s.control(&parent, &Control::Rewind(Rewind::Start))
        .await
        .unwrap();
    let ea = granted(&*s, &a, false).await;
    let end = child_end(ea, 1);
    assert_eq!(s.commit(&a, &end).await.unwrap(), CommitOutcome::Ok);
    assert_eq!(due(s.clone()).await, vec![b.clone()]);
    let e = granted(&*s, &parent, false).await;
    let seq = s.get(&parent).await.unwrap().unwrap().seq;
    let mut c = commit(e, seq, "c1");
    c.triggers = vec![trigger(&a, "v2")];
    assert_eq!(s.commit(&parent, &c).await.unwrap(), CommitOutcome::Ok);
    assert_eq!(
        due(s.clone()).await.len(),
        2,
        "the rewound parent triggered a again"
    );

    // A note rides an end of stream as the job's last error (a 404 child).
    let eb = granted(&*s, &b, false).await;
    let mut end = child_end(eb, 1);
    end.note = Some(format!("parent gone: HTTP 404 {}", "x".repeat(80)));
    assert_eq!(s.commit(&b, &end).await.unwrap(), CommitOutcome::Ok);
    let cp = s.get(&b).await.unwrap().unwrap();
    assert_eq!(cp.phase, Phase::Idle);
    assert!(cp.last_error.unwrap().starts_with("parent gone"));

    // Paused while waiting, resumed: it waits on; changed while paused, it runs.
    s.control(&b, &Control::Pause).await.unwrap();
    s.control(&b, &Control::Resume).await.unwrap();
    assert!(
        !due(s.clone()).await.contains(&b),
        "a waiting child waits on"
    );
    s.control(&b, &Control::Pause).await.unwrap();
    let mut c = commit(e, seq + 1, "c2");
    c.triggers = vec![trigger(&b, "v9")];
    assert_eq!(s.commit(&parent, &c).await.unwrap(), CommitOutcome::Ok);
    s.control(&b, &Control::Resume).await.unwrap();
    assert!(due(s.clone()).await.contains(&b), "changed while paused");

    // Retired (its tenant went), a child is findable, comes back with its
    // state, and is gone from the list once purged.
    assert!(s.retire(&b).await.unwrap());
    assert_eq!(
        s.retired_children("comments", Some("2/")).await.unwrap(),
        vec![b.clone()]
    );
    assert!(
        s.retired_children("comments", Some("1"))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        s.ensure_many(std::slice::from_ref(&b), &Checkpoint::default())
            .await
            .unwrap(),
        1
    );
    assert!(
        s.retired_children("comments", None)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        due(s.clone()).await.contains(&b),
        "back with its pending run"
    );
    assert!(s.retire(&b).await.unwrap());
    assert_eq!(s.purge(&b).await.unwrap(), Some(true));
    assert!(
        s.retired_children("comments", None)
            .await
            .unwrap()
            .is_empty()
    );
}

fn parents(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(p, v)| (p.to_string(), v.to_string()))
        .collect()
}

/// A batched child feed: changed parents wait as pending until an idle
/// slot without a batch claims up to `size` of them, oldest first; a slot's
/// last commit claims the next batch; an unchanged parent is not pending
/// again; a parent that changes while its batch runs is pending again.
async fn batched_children<S: Jobs + Leases + Schedule>(s: Arc<S>) {
    let parent = new_job(&*s, "orders").await;
    let slots = vec![
        JobId::new("items", "batch-0"),
        JobId::new("items", "batch-1"),
    ];
    let group = |list: &[(&str, &str)]| BatchTriggers {
        feed: "items".into(),
        tenant: None,
        size: 2,
        slots: slots.clone(),
        parents: parents(list),
    };
    let due = |s: Arc<S>| async move {
        let mut d = s
            .due_jobs(&[("items".to_string(), 10)], now_ms() + 1000)
            .await
            .unwrap();
        d.sort();
        d
    };
    let e = granted(&*s, &parent, false).await;
    let mut c = commit(e, 0, "c1");
    c.batches = vec![group(&[("o1", "v1"), ("o2", "v1"), ("o3", "v1")])];
    assert_eq!(s.commit(&parent, &c).await.unwrap(), CommitOutcome::Ok);
    let batch = |s: Arc<S>, i: usize| {
        let slot = slots[i].clone();
        async move { s.get(&slot).await.unwrap().unwrap().batch }
    };
    assert_eq!(batch(s.clone(), 0).await, ["o1", "o2"]);
    assert_eq!(batch(s.clone(), 1).await, ["o3"]);
    assert_eq!(due(s.clone()).await, slots);

    // The same versions again: nothing pending, the batches unchanged.
    let mut c = commit(e, 1, "c2");
    c.batches = vec![group(&[("o1", "v1"), ("o2", "v1"), ("o3", "v1")])];
    assert_eq!(s.commit(&parent, &c).await.unwrap(), CommitOutcome::Ok);
    assert_eq!(batch(s.clone(), 0).await, ["o1", "o2"]);

    // Slot 0 runs its batch to the end: nothing pending, it waits.
    let e0 = granted(&*s, &slots[0], false).await;
    assert_eq!(
        s.commit(&slots[0], &child_end(e0, 0)).await.unwrap(),
        CommitOutcome::Ok
    );
    assert!(batch(s.clone(), 0).await.is_empty());
    assert_eq!(due(s.clone()).await, vec![slots[1].clone()]);

    // o1 changed and o4 came: slot 0 claims them; slot 1 keeps its batch.
    let mut c = commit(e, 2, "c3");
    c.batches = vec![group(&[("o1", "v2"), ("o4", "v1")])];
    assert_eq!(s.commit(&parent, &c).await.unwrap(), CommitOutcome::Ok);
    assert_eq!(batch(s.clone(), 0).await, ["o1", "o4"]);
    assert_eq!(batch(s.clone(), 1).await, ["o3"]);

    // o3 changes while slot 1 runs it: pending again, claimed by slot 1's end.
    let e1 = granted(&*s, &slots[1], false).await;
    let mut c = commit(e, 3, "c4");
    c.batches = vec![group(&[("o3", "v2")])];
    assert_eq!(s.commit(&parent, &c).await.unwrap(), CommitOutcome::Ok);
    assert_eq!(batch(s.clone(), 1).await, ["o3"]);
    assert_eq!(
        s.commit(&slots[1], &child_end(e1, 0)).await.unwrap(),
        CommitOutcome::Ok
    );
    let cp = s.get(&slots[1]).await.unwrap().unwrap();
    assert_eq!(
        (cp.batch.as_slice(), cp.phase),
        (["o3".to_string()].as_slice(), Phase::Idle)
    );
    assert_eq!(
        due(s.clone()).await,
        slots,
        "both slots have a batch to run"
    );

    // Forgotten parents (a purge) are pending again when read again.
    assert_eq!(s.purge_parents("items", None).await.unwrap(), 4);
    // One slot now (parallel: 1): slot 1 runs its batch and claims no more.
    let one = |list: &[(&str, &str)]| BatchTriggers {
        slots: vec![slots[0].clone()],
        ..group(list)
    };
    let mut c = commit(e, 4, "c5");
    c.batches = vec![one(&[("o2", "v1")])];
    assert_eq!(s.commit(&parent, &c).await.unwrap(), CommitOutcome::Ok);
    let e1 = granted(&*s, &slots[1], false).await;
    assert_eq!(
        s.commit(&slots[1], &child_end(e1, 1)).await.unwrap(),
        CommitOutcome::Ok
    );
    assert!(
        batch(s.clone(), 1).await.is_empty(),
        "slot 1 is beyond the slots in force"
    );
    let e0 = granted(&*s, &slots[0], false).await;
    assert_eq!(
        s.commit(&slots[0], &child_end(e0, 1)).await.unwrap(),
        CommitOutcome::Ok
    );
    assert_eq!(
        batch(s.clone(), 0).await,
        ["o2"],
        "slot 0 claims the forgotten parent"
    );
}

macro_rules! both {
    ($($name:ident),*) => {
        mod redis_backed {
            use super::*;
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let s = redis_store().await;
                super::$name(s.clone()).await;
                s.delete_all().await.unwrap();
            })*
        }
        mod embedded_backed {
            use super::*;
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let dir = tempfile::tempdir().unwrap();
                super::$name(embedded_store(&dir)).await;
            })*
        }
    };
}

/// The handoff, snapshot restarts, cursor recovery, T0 and the registry.
async fn restarts_recovery_t0_and_registry<S: Jobs + Leases + FeedRegistry>(s: Arc<S>) {
    let job = new_job(&*s, "restart").await;
    let e = granted(&*s, &job, false).await;
    assert!(s.set_t0(&job, e, "2024-05-01T00:00:00Z").await.unwrap());
    assert!(s.set_t0(&job, e, "2030-01-01T00:00:00Z").await.unwrap());
    assert!(!s.set_t0(&job, e - 1, "2030-01-01T00:00:00Z").await.unwrap());
    let mut end = commit(e, 0, "bulk-last");
    end.end_of_stream = true;
    end.restart = Some(Restart {
        stage: Stage::Incremental,
        start_from: Some("2024-04-30T23:59:00Z".into()),
    });
    assert_eq!(s.commit(&job, &end).await.unwrap(), CommitOutcome::Ok);
    assert_eq!(
        s.commit(&job, &end).await.unwrap(),
        CommitOutcome::AlreadyApplied,
        "a retried restart commit is recognised"
    );
    let cp = s.get(&job).await.unwrap().unwrap();
    assert_eq!(
        (
            cp.stage,
            cp.cursor.as_deref(),
            cp.start_from.as_deref(),
            cp.t0.as_deref(),
            cp.phase
        ),
        (
            Stage::Incremental,
            None,
            Some("2024-04-30T23:59:00Z"),
            Some("2024-05-01T00:00:00Z"),
            Phase::Idle
        )
    );

    // Recovery drops the cursor, keeps the high-water mark, and makes the job due now.
    let e = granted(&*s, &job, false).await;
    assert_eq!(
        s.commit(&job, &commit(e, 1, "c2")).await.unwrap(),
        CommitOutcome::Ok
    );
    assert!(!s.recover(&job, e - 1, None).await.unwrap(), "fenced");
    assert!(
        s.recover(&job, e, Some("2024-01-01T00:00:00Z"))
            .await
            .unwrap()
    );
    let cp = s.get(&job).await.unwrap().unwrap();
    assert_eq!(
        (
            cp.cursor.as_deref(),
            cp.start_from.as_deref(),
            cp.phase,
            cp.recoveries,
            cp.seq
        ),
        (None, Some("2024-01-01T00:00:00Z"), Phase::Idle, 1, 2)
    );
    assert!(cp.high_water.is_some());
    assert!(cp.next_due_ms <= now_ms());

    // Rewind to the start forgets the stage and T0 too.
    s.control(&job, &Control::Rewind(Rewind::Start))
        .await
        .unwrap();
    let cp = s.get(&job).await.unwrap().unwrap();
    assert_eq!((cp.stage, cp.t0, cp.high_water), (Stage::Bulk, None, None));

    // The registry changes version only when its digest changes.
    assert_eq!(s.registry().await.unwrap(), None);
    assert_eq!(s.put_registry("d1", "{\"a\":1}").await.unwrap(), 1);
    assert_eq!(s.put_registry("d1", "{\"a\":1}").await.unwrap(), 1);
    assert_eq!(s.put_registry("d2", "{\"a\":2}").await.unwrap(), 2);
    assert_eq!(s.registry_version().await.unwrap(), Some(2));
    assert_eq!(
        s.registry().await.unwrap(),
        Some((2, "{\"a\":2}".to_string()))
    );
}

/// The scheduler's reads: due jobs oldest first per feed, running chains by
/// deadline, a processing lease from the take, counts, failures, pages
/// through a feed, retiring and rejoining, and the fleet.
async fn scheduling_indexes<S: Jobs + Leases + Schedule + Fleet>(s: Arc<S>) {
    let now = now_ms();
    let a: Vec<JobId> = (0..5).map(|i| JobId::new("a", format!("p{i}"))).collect();
    let b = JobId::new("b", "only");
    let due_at = |t: u64| Checkpoint {
        next_due_ms: t,
        ..Checkpoint::default()
    };
    assert_eq!(
        s.ensure_many(&a[..3], &due_at(now - 3_000)).await.unwrap(),
        3
    );
    assert_eq!(
        s.ensure_many(&a[3..], &due_at(now + 3_600_000))
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        s.ensure_many(&a, &due_at(0)).await.unwrap(),
        0,
        "never overwrites"
    );
    assert!(s.ensure(&b, &due_at(now - 1_000)).await.unwrap());
    assert_eq!(
        s.feeds().await.unwrap(),
        vec!["a".to_string(), "b".to_string()]
    );
    assert_eq!(
        s.due_feeds(now, 10).await.unwrap(),
        vec!["a", "b"],
        "the oldest due first"
    );
    let due = s
        .due_jobs(&[("a".into(), 2), ("b".into(), 5)], now)
        .await
        .unwrap();
    assert_eq!(due, vec![a[0].clone(), a[1].clone(), b.clone()]);

    // A chain runs: out of the due index, into the running one.
    let e = granted(&*s, &b, false).await;
    assert_eq!(s.running().await.unwrap(), 1);
    assert_eq!(s.due_feeds(now, 10).await.unwrap(), vec!["a"]);
    assert!(s.expired(now_ms(), 10).await.unwrap().is_empty());
    // Its task is taken: the deadline is the processing lease from now.
    let cp = s
        .take(&b, e, 0, Duration::from_millis(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((cp.epoch, cp.phase), (e, Phase::Running));
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(s.expired(now_ms(), 10).await.unwrap(), vec![b.clone()]);
    // A stale take changes nothing.
    s.take(&b, e - 1, 0, LEASE).await.unwrap().unwrap();
    assert_eq!(s.expired(now_ms(), 10).await.unwrap(), vec![b.clone()]);
    assert!(s.renew(&b, e, LEASE).await.unwrap());
    assert!(s.expired(now_ms(), 10).await.unwrap().is_empty());
    assert!(s.fail(&b, e, "HTTP 401").await.unwrap());
    assert_eq!(s.running().await.unwrap(), 0);
    let failed = s.failures("b", 10).await.unwrap();
    assert_eq!((failed.len(), failed[0].0.clone()), (1, b.clone()));

    let census = s.census().await.unwrap();
    let count = |feed: &str| {
        let c = census.iter().find(|c| c.feed == feed).unwrap();
        (c.idle, c.running, c.paused, c.failed)
    };
    assert_eq!((count("a"), count("b")), ((5, 0, 0, 0), (0, 0, 0, 1)));

    // Pages through a feed, with a prefix.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = s
            .page(&JobQuery {
                feed: "a".into(),
                prefix: Some("p".into()),
                after,
                limit: 2,
            })
            .await
            .unwrap();
        seen.extend(page.jobs.into_iter().map(|(j, _)| j));
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(seen, a);
    let one = s
        .page(&JobQuery {
            feed: "a".into(),
            prefix: Some("p3".into()),
            after: None,
            limit: 10,
        })
        .await
        .unwrap();
    assert_eq!((one.jobs.len(), one.next), (1, None));

    // Retired: in no index, not listed; ensured again: back as it was.
    let e = granted(&*s, &a[0], false).await;
    assert!(s.retire(&a[0]).await.unwrap());
    assert!(!s.retire(&a[0]).await.unwrap());
    assert_eq!(
        s.commit(&a[0], &commit(e, 0, "late")).await.unwrap(),
        CommitOutcome::Fenced,
        "retiring fences the chain in flight"
    );
    assert_eq!(s.running().await.unwrap(), 0);
    assert_eq!(s.list().await.unwrap().len(), 5);
    assert_eq!(
        s.census()
            .await
            .unwrap()
            .iter()
            .find(|c| c.feed == "a")
            .unwrap()
            .jobs(),
        4
    );
    assert!(s.ensure(&a[0], &Checkpoint::default()).await.unwrap());
    assert!(
        s.due_jobs(&[("a".into(), 10)], now_ms())
            .await
            .unwrap()
            .contains(&a[0])
    );

    // The fleet: live heartbeats only.
    s.heartbeat("w1", 8, Duration::from_secs(30)).await.unwrap();
    s.heartbeat("w2", 4, Duration::from_millis(1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let fleet = s.fleet().await.unwrap();
    assert_eq!(fleet.len(), 1);
    assert_eq!((fleet[0].id.as_str(), fleet[0].concurrency), ("w1", 8));
    s.leave("w1", 8).await.unwrap();
    assert!(s.fleet().await.unwrap().is_empty());
}

both!(
    parents_trigger_children,
    batched_children,
    scheduling_indexes,
    restarts_recovery_t0_and_registry,
    lifecycle,
    concurrent_commits,
    expired_lease_fences_the_old_epoch,
    controls_take_new_epochs,
    failure_is_visible_and_retried_by_force,
    source_pause_and_leadership,
    rate_limiter_shares_one_budget,
    tenants_and_purge
);

#[tokio::test]
async fn the_embedded_store_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let job = JobId::new("f", "p");
    let epoch;
    {
        let s = embedded_store(&dir);
        s.ensure(&job, &Checkpoint::default()).await.unwrap();
        epoch = granted(&*s, &job, false).await;
        assert_eq!(
            s.commit(&job, &commit(epoch, 0, "kept")).await.unwrap(),
            CommitOutcome::Ok
        );
    }
    let s = embedded_store(&dir);
    let cp = s.get(&job).await.unwrap().unwrap();
    assert_eq!(
        (cp.cursor.as_deref(), cp.seq, cp.epoch),
        (Some("kept"), 1, epoch)
    );
    assert!(granted(&*s, &job, true).await > epoch);
    std::fs::write(dir.path().join("state.json"), b"{not json").unwrap();
    assert!(tidemark_state::EmbeddedStore::open(&dir.path().join("state.json")).is_err());
}
