//! Each branch of DESIGN.md's "life of a page", in process: the worker's
//! public `run` over the in-process task queue, the embedded store and the
//! mock API, checked by what a user relies on (the stored checkpoint, what
//! the downstream received, the worker's metrics).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;

use support::{World, commit, hostile, inspections, job, mock, now_ms, settle, take_over, tickets};
use tidemark_core::checkpoint::{CommitOutcome, Phase, Stage};
use tidemark_mock::Faults;
use tidemark_state::Leases;

const DROPPED: &str = "tidemark_tasks_dropped_total";
const COMMITS: &str = "tidemark_commits_total";
const CARRIED: &str = "tidemark_pages_carried_total";
const PREFETCHES: &str = "tidemark_prefetches_total";

/// Step 1: a task under an older epoch than the stored one is acked and
/// dropped before anything is fetched or published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_from_an_older_epoch_is_dropped_without_a_request() {
    let w = World::start(mock(25), &[tickets("tickets")]).await;
    let j = job("tickets");
    let old = w.take(&j).await;
    let stale = w.first_task(&j, old).await;
    let current = w.take_over(&j).await;
    assert!(current > old);
    let before = w.checkpoint(&j).await;

    w.publish(&stale).await;
    w.metric_reaches(DROPPED, &[("reason", "stale_epoch")], 1)
        .await;
    settle().await;
    assert_eq!(w.requests(), 0, "a stale task fetched a page");
    assert!(w.received.pages().is_empty(), "a stale task published");
    assert_eq!(w.checkpoint(&j).await, before);

    // The current epoch's task walks the chain: only the old one was refused.
    let task = w.first_task(&j, current).await;
    w.publish(&task).await;
    let cp = w.chain_ended(&j).await;
    assert_eq!((cp.phase, cp.records, cp.epoch), (Phase::Idle, 25, current));
    assert_eq!(w.metric(DROPPED, &[("reason", "stale_epoch")]), 1);
    w.stop().await;
}

/// Step 1: a redelivered task whose page is already committed (a crash
/// between commit and ack) is acked without a second fetch or publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_task_of_an_applied_page_is_dropped() {
    let w = World::start(mock(25), &[tickets("tickets")]).await;
    let j = job("tickets");
    let first = w.start_chain(&j).await;
    let done = w.chain_ended(&j).await;
    assert_eq!((done.seq, done.records), (3, 25));
    let requests = w.requests();

    w.publish(&first).await;
    w.metric_reaches(DROPPED, &[("reason", "already_applied")], 1)
        .await;
    settle().await;
    assert_eq!(w.requests(), requests, "an applied page was fetched again");
    assert_eq!(
        w.received.records().len(),
        25,
        "an applied page was published again"
    );
    assert_eq!(w.checkpoint(&j).await, done);
    w.stop().await;
}

/// Step 1: a task ahead of the stored seq does not chain: dropped as a conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_ahead_of_the_checkpoint_is_dropped_as_a_conflict() {
    let w = World::start(mock(25), &[tickets("tickets")]).await;
    let j = job("tickets");
    let epoch = w.take(&j).await;
    let mut ahead = w.first_task(&j, epoch).await;
    ahead.seq = 2;
    ahead.cursor = Some("somewhere-ahead".into());
    let before = w.checkpoint(&j).await;

    w.publish(&ahead).await;
    w.metric_reaches(DROPPED, &[("reason", "conflict")], 1)
        .await;
    settle().await;
    assert_eq!(w.requests(), 0);
    assert!(w.received.pages().is_empty());
    assert_eq!(w.checkpoint(&j).await, before);
    w.stop().await;
}

/// Step 6, CONFLICT: another holder of the same epoch (a duplicate of the
/// task, answered differently) committed this seq while the page was in
/// flight. The worker's commit is refused and its chain stops there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_lost_the_race_for_its_seq_is_a_conflict() {
    let w = World::start(mock(25), &[tickets("tickets")]).await;
    let j = job("tickets");
    let store = w.store.clone();
    let (rj, first) = (j.clone(), w.take(&j).await);
    w.received.during_next_page(Box::new(move || {
        Box::pin(async move {
            assert_eq!(
                commit(&store, &rj, first, 0, "the-rival-cursor").await,
                CommitOutcome::Ok
            );
        })
    }));

    let task = w.first_task(&j, first).await;
    w.publish(&task).await;
    w.metric_reaches(COMMITS, &[("result", "conflict")], 1)
        .await;
    w.metric_reaches(DROPPED, &[("reason", "conflict")], 1)
        .await;
    settle().await;
    let cp = w.checkpoint(&j).await;
    assert_eq!(cp.cursor.as_deref(), Some("the-rival-cursor"), "{cp:?}");
    assert_eq!((cp.seq, cp.pages, cp.records), (1, 1, 0), "{cp:?}");
    assert_eq!(w.metric(COMMITS, &[("result", "ok")]), 0);
    // The next page may have been fetched ahead; it was thrown away.
    assert!(
        w.requests() <= 2,
        "the losing chain went on past the next page"
    );
    assert_eq!(w.received.pages().len(), 1, "the losing chain published on");
    assert_eq!(w.metric(CARRIED, &[("feed", "tickets")]), 0);
    w.stop().await;
}

/// Step 6, FENCED: a newer epoch takes the job while the page is in flight.
/// Nothing is committed under the old epoch and its chain stops; the new
/// chain re-sends the page with the same message ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_epoch_taking_the_job_mid_page_fences_the_commit() {
    let w = World::start(mock(25), &[tickets("tickets")]).await;
    let j = job("tickets");
    let (store, hj) = (w.store.clone(), j.clone());
    let newer = Arc::new(std::sync::Mutex::new(None));
    let seen = newer.clone();
    w.received.during_next_page(Box::new(move || {
        Box::pin(async move {
            *seen.lock().unwrap() = Some(take_over(&store, &hj).await);
        })
    }));

    let old = w.start_chain(&j).await;
    w.metric_reaches(DROPPED, &[("reason", "fenced")], 1).await;
    settle().await;
    let newer = newer.lock().unwrap().expect("the hook ran");
    assert!(newer > old.epoch);
    assert_eq!(w.metric(COMMITS, &[("result", "fenced")]), 1);
    assert_eq!(w.metric(COMMITS, &[("result", "ok")]), 0);
    let cp = w.checkpoint(&j).await;
    assert_eq!(
        (
            cp.epoch,
            cp.seq,
            cp.cursor.as_deref(),
            cp.pages,
            cp.high_water.as_deref()
        ),
        (newer, 0, None, 0, None),
        "something was committed under the fenced epoch"
    );
    // The next page may have been fetched ahead; it was thrown away.
    assert!(
        w.requests() <= 2,
        "the fenced chain went on past the next page"
    );
    assert_eq!(w.metric(CARRIED, &[("feed", "tickets")]), 0);
    let first_send = w.received.records();
    assert_eq!(first_send.len(), 10);

    // The newer epoch's chain starts where the checkpoint is: the page again.
    let task = w.first_task(&j, newer).await;
    w.publish(&task).await;
    let cp = w.chain_ended(&j).await;
    assert_eq!((cp.seq, cp.records, cp.last_error), (3, 25, None));
    let all = w.received.records();
    assert_eq!(all.len(), 35);
    assert_eq!(
        &all[10..20],
        &first_send[..],
        "a re-sent page changed its message ids"
    );
    w.stop().await;
}

/// Steps 2-3: a 429 with Retry-After pauses the whole source; the task is
/// retried after the pause, and no request to the source (from any feed)
/// is made before it ends. Every record arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_pauses_the_source_and_the_task_is_retried_after_it() {
    let w = World::start(mock(15), &[tickets("tickets"), tickets("other")]).await;
    let j = job("tickets");
    // The page after the first answers 429 Retry-After: 1.
    let mock_state = w.mock_state();
    w.received.during_next_page(Box::new(move || {
        Box::pin(async move {
            mock_state.set_faults(Faults {
                fail_429_every: Some(1),
                retry_after_secs: 1,
                ..Faults::default()
            });
        })
    }));
    let t0 = now_ms();
    w.start_chain(&j).await;
    let until = w.paused_until("mock").await;
    // Retry-After: 1, within the source's max_retry_after of 300 ms.
    assert!(
        until > now_ms() && until <= t0 + 300 + 100,
        "pause until {until}, started {t0}"
    );
    // The pause holds every request to the source; answer normally after it.
    w.set_faults(Faults::default());
    let other = w.start_chain(&job("other")).await;
    assert_eq!(other.seq, 0);

    let cp = w.chain_ended(&j).await;
    let other_cp = w.chain_ended(&job("other")).await;
    assert_eq!(
        (cp.seq, cp.records, cp.last_error.as_deref()),
        (2, 15, None)
    );
    assert_eq!(
        (other_cp.records, other_cp.last_error.as_deref()),
        (15, None)
    );
    let pages = w.received.pages();
    assert!(
        pages.iter().filter(|p| p.at_ms < until).count() == 1,
        "a page was fetched during the source's pause: {:?}",
        pages
            .iter()
            .map(|p| (&p.feed, p.seq, p.at_ms))
            .collect::<Vec<_>>()
    );
    let mut keys = w.received.keys();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 15, "a record is missing");
    assert_eq!(w.requests(), 2 + 1 + 2, "two pages each, one 429");
    assert_eq!(
        w.metric(
            "tidemark_fetch_errors_total",
            &[("feed", "tickets"), ("kind", "rate_limited")]
        ),
        1
    );
    assert_eq!(
        w.metric("tidemark_source_pauses_total", &[("source", "mock")]),
        1
    );
    assert_eq!(
        w.metric("tidemark_tasks_retried_total", &[("feed", "tickets")]),
        1
    );
    w.stop().await;
}

/// Hostile input: a first answer of `429 Retry-After: 99999999999` (about
/// 3,000 years) pauses the source for the source's `max_retry_after`
/// (300 ms here), never longer; every record then arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absurd_retry_after_is_capped_by_max_retry_after() {
    let w = World::start(mock(15), &[tickets("tickets")]).await;
    let j = job("tickets");
    w.set_faults(Faults {
        fail_429_first: 1,
        retry_after_secs: 99_999_999_999,
        ..Faults::default()
    });
    let t0 = now_ms();
    w.start_chain(&j).await;
    let until = w.paused_until("mock").await;
    assert!(
        until <= now_ms() + 300,
        "pause until {until}, {} ms away: longer than max_retry_after",
        until.saturating_sub(now_ms())
    );
    let cp = w.chain_ended(&j).await;
    assert_eq!(
        (cp.records, cp.last_error.as_deref()),
        (15, None),
        "every record arrives"
    );
    let took = now_ms() - t0;
    assert!(took < 3_000, "the chain took {took} ms");
    assert_eq!(
        w.metric("tidemark_tasks_retried_total", &[("feed", "tickets")]),
        1
    );
    w.stop().await;
}

/// Step 3, recovery: a refused cursor ends the chain; the job restarts from
/// its high-water mark minus lag under a new epoch. Re-sent records are
/// duplicates with the same message ids, never gaps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_cursor_restarts_from_the_high_water_mark_under_a_new_epoch() {
    // Every cursor is refused (`400 cursor_expired`): a cursor is at least
    // the mock's latency old when it comes back.
    let mut m = mock(25);
    m.latency = std::time::Duration::from_millis(2);
    m.faults.cursor_ttl_secs = Some(0);
    let w = World::start(m, &[tickets("tickets")]).await;
    let j = job("tickets");
    let first = w.start_chain(&j).await;

    w.metric_reaches(
        "tidemark_cursor_recoveries_total",
        &[("feed", "tickets")],
        1,
    )
    .await;
    let cp = w.chain_ended(&j).await;
    assert_eq!(cp.phase, Phase::Idle, "{cp:?}");
    assert_eq!(cp.cursor, None);
    assert_eq!(
        cp.high_water.as_deref(),
        Some("2024-01-01T00:00:09.000000000Z")
    );
    // The tenth record's time minus the feed's 5 s lag.
    assert_eq!(cp.start_from.as_deref(), Some("2024-01-01T00:00:04Z"));
    assert_eq!(
        (cp.recoveries, cp.seq, cp.last_error.as_deref()),
        (1, 1, None)
    );
    assert!(cp.next_due_ms <= now_ms(), "a recovered job is due at once");
    assert_eq!(
        w.metric(
            "tidemark_fetch_errors_total",
            &[("feed", "tickets"), ("kind", "cursor_expired")]
        ),
        1
    );
    let first_send = w.received.records();
    assert_eq!(first_send.len(), 10);

    w.set_faults(Faults::default());
    let again = w.start_chain(&j).await;
    assert!(again.epoch > first.epoch);
    assert_eq!(
        (again.cursor.as_deref(), again.start_from.as_deref()),
        (None, Some("2024-01-01T00:00:04Z"))
    );
    let cp = w.chain_ended(&j).await;
    assert_eq!((cp.phase, cp.last_error.as_deref()), (Phase::Idle, None));
    let resent = &w.received.records()[10..];
    assert_eq!(
        resent[0].updated_at, "2024-01-01T00:00:04Z",
        "restarted elsewhere"
    );
    assert_eq!(
        &resent[..6],
        &first_send[4..],
        "re-sent records changed their message ids"
    );
    let keys: BTreeSet<String> = w.received.keys().into_iter().collect();
    assert_eq!(keys.len(), 25, "a gap");
    w.stop().await;
}

/// Step 4: a next cursor equal to the one just used, with more claimed, is
/// a loop: the job fails with the reason, its cursor stays where it was and
/// the task is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pagination_loop_fails_the_job_and_keeps_the_cursor() {
    let w = World::start(mock(0), &[hostile("looping", "loop")]).await;
    let j = job("looping");
    w.start_chain(&j).await;

    let cp = w.chain_ended(&j).await;
    assert_eq!(cp.phase, Phase::Failed, "{cp:?}");
    let error = cp.last_error.clone().unwrap_or_default();
    assert!(error.contains("loop"), "{error}");
    assert_eq!(
        (cp.cursor.as_deref(), cp.seq, cp.records),
        (Some("p2"), 1, 3)
    );
    assert_eq!(
        w.received.keys(),
        ["h1", "h2", "h3"],
        "the looping page was published"
    );
    let dead = w.dead_letter().await;
    assert_eq!(dead.reason, "failed");
    assert!(dead.last_error.unwrap_or_default().contains("loop"));
    assert_eq!(
        w.metric("tidemark_jobs_failed_total", &[("feed", "looping")]),
        1
    );
    assert_eq!(w.requests(), 2, "the loop was fetched more than once");
    w.stop().await;
}

/// Step 7: at the end of the stream the job goes idle, due again after
/// `every`, holding the cursor the API gave; the next poll continues there
/// and delivers only what is new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_of_stream_leaves_the_job_idle_with_its_due_time_and_resume_cursor() {
    let w = World::start(mock(25), &[tickets("tickets")]).await;
    let j = job("tickets");
    let before = now_ms();
    w.start_chain(&j).await;
    let cp = w.chain_ended(&j).await;
    let after = now_ms();

    assert_eq!(cp.phase, Phase::Idle, "{cp:?}");
    assert_eq!(
        (cp.seq, cp.pages, cp.records, cp.lease_until_ms),
        (3, 3, 25, 0)
    );
    assert_eq!(
        cp.high_water.as_deref(),
        Some("2024-01-01T00:00:24.000000000Z")
    );
    let hour = 3_600_000;
    assert!(
        (before + hour..=after + hour).contains(&cp.next_due_ms),
        "next due {} not an hour after the end",
        cp.next_due_ms
    );
    assert!(
        cp.cursor.as_deref().is_some_and(|c| !c.is_empty()),
        "{cp:?}"
    );
    assert!(cp.last_end_of_stream_ms.is_some());
    let keys = w.received.keys();
    let want: Vec<String> = (1..=25)
        .map(|i| format!("00000000-0000-0000-0000-{i:012}"))
        .collect();
    assert_eq!(keys, want, "every record once, in order");

    // The next poll: three new records, and only they.
    w.mock_state().insert(3);
    let next = w.start_chain(&j).await;
    assert_eq!((next.seq, next.cursor.as_ref()), (3, cp.cursor.as_ref()));
    let cp = w.chain_ended(&j).await;
    assert_eq!((cp.seq, cp.records), (4, 28));
    let new: Vec<String> = w.received.keys()[25..].to_vec();
    let want: Vec<String> = (26..=28)
        .map(|i| format!("00000000-0000-0000-0000-{i:012}"))
        .collect();
    assert_eq!(new, want);
    w.stop().await;
}

/// Step 7, seed 002: after the bulk walk a `bulk_then_incremental` job
/// moves to the incremental stage, due at once, starting at T0 minus lag;
/// the incremental sync delivers what changed since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bulk_walk_hands_off_to_incremental_syncs_from_t0_minus_lag() {
    let w = World::start(mock(25), &[inspections("inspections")]).await;
    let j = job("inspections");
    w.start_chain(&j).await;
    let cp = w.chain_ended(&j).await;
    let t0 = cp.t0.clone().expect("T0 recorded before the bulk walk");

    assert_eq!(
        (cp.phase, cp.stage),
        (Phase::Idle, Stage::Incremental),
        "{cp:?}"
    );
    assert_eq!((cp.seq, cp.records, cp.cursor.as_deref()), (3, 25, None));
    let t0_minus_lag =
        chrono::DateTime::parse_from_rfc3339(&t0).unwrap() - chrono::Duration::seconds(2);
    let start = cp
        .start_from
        .as_deref()
        .expect("an incremental start point");
    assert_eq!(
        chrono::DateTime::parse_from_rfc3339(start).unwrap(),
        t0_minus_lag
    );
    assert!(
        cp.next_due_ms <= now_ms(),
        "the first incremental sync is due at once"
    );

    // The incremental sync: the records changed since T0 - lag, by page number.
    w.mock_state().update(3);
    let changed: BTreeSet<String> = w
        .mock_state()
        .truth()
        .records
        .into_iter()
        .filter(|r| r.updated_at.as_str() >= t0.as_str())
        .map(|r| r.id)
        .collect();
    assert_eq!(changed.len(), 3);
    let task = w.start_chain(&j).await;
    assert_eq!(
        (task.cursor.as_deref(), task.start_from.as_deref()),
        (None, Some(start))
    );
    let cp = w.chain_ended(&j).await;
    assert_eq!(
        (cp.phase, cp.stage, cp.last_error.as_deref()),
        (Phase::Idle, Stage::Incremental, None)
    );
    assert_eq!(cp.t0.as_deref(), Some(t0.as_str()), "T0 changed");
    let synced: BTreeSet<String> = w.received.keys()[25..].iter().cloned().collect();
    assert_eq!(synced, changed);
    w.stop().await;
}

/// Tenants of one source: each request goes to the tenant's own URL with
/// its own token; a revoked token fails that tenant's job alone; a 429
/// pauses that tenant alone (the budget is per tenant); records go out
/// under their tenant, with message ids of their own, and are counted per
/// tenant when the source asks for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tenant_has_its_own_url_token_budget_and_failures() {
    let cfg = tidemark_mock::MockConfig {
        tenant_records: 15,
        ..mock(15)
    };
    let mut w = World::tenanted(
        cfg,
        "    rate_limit: { per_second: 1000 }\n",
        &["acme", "globex", "initech"],
        &[tickets("tickets")],
    )
    .await;
    w.start_worker();
    let mock_state = w.mock_state();
    mock_state.revoke_tenant("globex");
    mock_state.throttle_tenant("initech", std::time::Duration::from_millis(400));
    let jobs: Vec<tidemark_core::checkpoint::JobId> = ["acme", "globex", "initech"]
        .iter()
        .map(|t| tidemark_core::checkpoint::JobId::new("tickets", format!("{t}/all")))
        .collect();
    for j in &jobs {
        w.start_chain(j).await;
    }
    // The 429 pauses the tenant's budget, while the source's stays open.
    w.paused_until("mock/initech").await;
    assert!(w.source_paused_until("mock").await.is_none());
    let acme = w.chain_ended(&jobs[0]).await;
    let globex = w.chain_ended(&jobs[1]).await;
    let initech = w.chain_ended(&jobs[2]).await;
    assert_eq!((acme.phase, acme.records), (Phase::Idle, 15));
    assert_eq!(globex.phase, Phase::Failed);
    assert!(
        globex
            .last_error
            .as_deref()
            .unwrap_or_default()
            .contains("401"),
        "{:?}",
        globex.last_error
    );
    assert_eq!(
        (
            initech.phase,
            initech.records,
            initech.last_error.as_deref()
        ),
        (Phase::Idle, 15, None),
        "the throttled tenant is late, not failed"
    );
    assert!(w.metric("tidemark_source_pauses_total", &[("source", "mock")]) >= 1);
    let stats = mock_state.stats();
    assert!(stats.refused_by_tenant.get("initech").copied().unwrap_or(0) >= 1);
    assert!(!stats.refused_by_tenant.contains_key("acme"));
    // Records went out under their tenant, partition `all`.
    let pages = w.received.pages();
    assert!(pages.iter().all(|p| p.partition == "all"));
    let ids = |t: &str| -> std::collections::HashSet<String> {
        pages
            .iter()
            .filter(|p| p.tenant.as_deref() == Some(t))
            .flat_map(|p| p.records.iter().map(|r| r.message_id.clone()))
            .collect()
    };
    let (a, i) = (ids("acme"), ids("initech"));
    assert_eq!((a.len(), i.len()), (15, 15));
    assert!(a.is_disjoint(&i), "message ids are unique across tenants");
    assert!(ids("globex").is_empty());
    assert_eq!(
        w.metric(
            "tidemark_tenant_records_published_total",
            &[("feed", "tickets"), ("tenant", "acme")]
        ),
        15
    );
    assert_eq!(
        w.metric(
            "tidemark_tenant_fetch_errors_total",
            &[
                ("feed", "tickets"),
                ("tenant", "globex"),
                ("kind", "permanent")
            ]
        ),
        1
    );
    w.stop().await;
}

/// A hot chain: after each commit the worker goes on with the next page
/// itself, fetched while the page before was published and committed. No
/// page is fetched twice, every record arrives once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_chain_carries_its_pages_on_and_fetches_each_ahead() {
    let w = World::start(mock(45), &[tickets("tickets")]).await;
    let j = job("tickets");
    // While page 0 is published (its successor being fetched ahead), arm
    // a look at the checkpoint from inside page 1's publish.
    let (rx, store, hj) = (w.received.clone(), w.store.clone(), j.clone());
    let seen = Arc::new(std::sync::Mutex::new(None));
    let at_publish = seen.clone();
    w.received.during_next_page(Box::new(move || {
        Box::pin(async move {
            rx.during_next_page(Box::new(move || {
                Box::pin(async move {
                    let cp = store.get(&hj).await.unwrap().unwrap();
                    *at_publish.lock().unwrap() = Some(cp.seq);
                })
            }));
        })
    }));
    w.start_chain(&j).await;
    let cp = w.chain_ended(&j).await;
    assert_eq!((cp.phase, cp.seq, cp.records), (Phase::Idle, 5, 45));
    assert_eq!(
        *seen.lock().unwrap(),
        Some(1),
        "page 1 was published before page 0 was committed"
    );
    // Five pages: the delivery's, then four carried on, each fetched ahead.
    assert_eq!(w.metric(CARRIED, &[("feed", "tickets")]), 4);
    assert_eq!(
        w.metric(PREFETCHES, &[("feed", "tickets"), ("result", "used")]),
        4
    );
    assert_eq!(w.requests(), 5, "a page was fetched twice");
    let keys = w.received.keys();
    assert_eq!(keys.len(), 45);
    let unique: BTreeSet<&String> = keys.iter().collect();
    assert_eq!(unique.len(), 45, "a record arrived twice");
    let seqs: Vec<u64> = w.received.pages().iter().map(|p| p.seq).collect();
    assert_eq!(seqs, [0, 1, 2, 3, 4], "pages out of order");
    w.stop().await;
}

/// `--hot-chain-pages` bounds how long one worker keeps a chain: past it
/// the next page goes back through the task queue (where another job's
/// task may come first); 0 sends every page through the queue and fetches
/// nothing ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_chain_pages_bounds_a_chain_before_it_goes_back_through_the_queue() {
    for (bound, carried) in [(2u32, 2u64), (0, 0)] {
        let mut w = World::new(mock(45), &[tickets("tickets")]).await;
        w.hot_chain_pages = bound;
        w.start_worker();
        let j = job("tickets");
        w.start_chain(&j).await;
        let cp = w.chain_ended(&j).await;
        assert_eq!((cp.seq, cp.records), (5, 45), "--hot-chain-pages {bound}");
        // Pages 2 and 4 carried on; 3 and 5 came through the queue.
        assert_eq!(
            w.metric(CARRIED, &[("feed", "tickets")]),
            carried,
            "--hot-chain-pages {bound}"
        );
        assert_eq!(
            w.metric(PREFETCHES, &[("feed", "tickets"), ("result", "used")]),
            carried,
            "--hot-chain-pages {bound}"
        );
        assert_eq!(w.requests(), 5, "--hot-chain-pages {bound}");
        assert_eq!(w.received.records().len(), 45);
        w.stop().await;
    }
}

/// Only reads are fetched ahead: a POST the feed does not mark
/// `read_only: true` is sent once its turn comes, never before the page
/// before it is committed (the chain is still carried on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_that_may_write_is_never_fetched_ahead() {
    for read_only in [false, true] {
        let feed = format!(
            "  - name: gql\n    source: mock\n    path: /graphql\n    method: POST\n    read_only: {read_only}\n    \
             body:\n      query: \"{{ records {{ edges {{ cursor node }} pageInfo {{ endCursor hasNextPage }} }} }}\"\n      variables: {{}}\n    \
             records: /data/records/edges\n    record: /node\n    key: /id\n    version: /updated_at\n    every: 1h\n    \
             pagination:\n      cursor_param: body:/variables/after\n      next_cursor: /data/records/pageInfo/endCursor\n      \
             has_more: /data/records/pageInfo/hasNextPage\n      page_size_param: body:/variables/first\n      page_size: 10\n"
        );
        let w = World::start(mock(25), &[feed]).await;
        let j = job("gql");
        w.start_chain(&j).await;
        let cp = w.chain_ended(&j).await;
        assert_eq!((cp.phase, cp.records), (Phase::Idle, 25), "{cp:?}");
        assert_eq!(w.metric(CARRIED, &[("feed", "gql")]), 2);
        let used = w.metric(PREFETCHES, &[("feed", "gql"), ("result", "used")]);
        assert_eq!(
            used,
            if read_only { 2 } else { 0 },
            "read_only: {read_only}"
        );
        assert_eq!(w.requests(), 3);
        w.stop().await;
    }
}

/// A carried page that fails the job dead-letters its own task (the page
/// that failed), not the delivery the chain came in on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_carried_page_that_fails_dead_letters_its_own_task() {
    let w = World::start(mock(5), &[hostile("bad", "types")]).await;
    let j = job("bad");
    let first = w.start_chain(&j).await;
    let cp = w.chain_ended(&j).await;
    assert_eq!(cp.phase, Phase::Failed, "{cp:?}");
    assert_eq!(w.metric(CARRIED, &[("feed", "bad")]), 1);
    let dead = w.dead_letter().await;
    let task: tidemark_bus::PageTask = serde_json::from_slice(&dead.body).unwrap();
    assert_eq!((task.epoch, task.seq), (first.epoch, first.seq + 1));
    assert_eq!(dead.reason, "failed");
    w.stop().await;
}

/// A worker told to stop hands its hot chain back through the task queue
/// after the page in flight: nothing waits for a lease to run out (this
/// world has no coordinator to re-issue a stranded chain), and the next
/// worker finishes the chain under the same epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_worker_hands_its_hot_chain_back_through_the_queue() {
    let mut w = World::start(mock(200), &[tickets("tickets")]).await;
    w.set_faults(Faults {
        slow_every: Some(1),
        slow_ms: 40,
        ..Faults::default()
    });
    let j = job("tickets");
    let first = w.start_chain(&j).await;
    support::eventually("a few pages are committed", async || {
        w.checkpoint(&j).await.seq >= 3
    })
    .await;
    w.stop_worker().await;
    let stopped = w.checkpoint(&j).await;
    assert_eq!(stopped.phase, Phase::Running, "{stopped:?}");
    assert!(
        stopped.seq < 20,
        "the chain ended before the stop: {stopped:?}"
    );
    assert!(w.metric(CARRIED, &[("feed", "tickets")]) >= 2);

    w.set_faults(Faults::default());
    w.start_worker();
    let cp = w.chain_ended(&j).await;
    assert_eq!((cp.phase, cp.seq, cp.records), (Phase::Idle, 20, 200));
    assert_eq!(
        cp.epoch, first.epoch,
        "the chain was re-issued, not handed back"
    );
    let keys = w.received.keys();
    let unique: BTreeSet<&String> = keys.iter().collect();
    assert_eq!(unique.len(), 200);
    w.stop().await;
}
