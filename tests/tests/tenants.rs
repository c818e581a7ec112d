//! Tenants end to end: one feed definition run for 200 accounts of one API
//! (the tenant in the path, each with its own token in a secrets
//! directory), by a coordinator and two workers over Redis and RabbitMQ,
//! while one tenant's token is revoked, another is throttled, and the
//! tenants file gains 50 tenants and loses 20, all without a restart; then
//! the tenant commands of the CLI against the same deployment.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use tidemark_core::checkpoint::{JobId, Phase};
use tidemark_mock::TruthRecord;
use tidemark_state::Leases;
use tidemark_tests::{Checker, Cluster, TENANT_FEED, ctl, eventually, missing_by_key, tidemark};

const RECORDS: usize = 12;

/// Names of one width: none is part of another's routing key.
fn tenant(i: usize) -> String {
    format!("t{i:03}")
}

fn key(tenant: &str) -> String {
    format!("tickets.{tenant}.all")
}

fn job(tenant: &str) -> JobId {
    JobId::new("tickets", format!("{tenant}/all"))
}

/// The current record versions of `tenants`, by routing key.
async fn truths(c: &Cluster, tenants: &[String]) -> BTreeMap<String, Vec<TruthRecord>> {
    let mut out = BTreeMap::new();
    for t in tenants {
        out.insert(key(t), c.tenant_truth(t).await.records);
    }
    out
}

/// The data requests the mock has seen from `tenants`.
async fn requests_of(c: &Cluster, tenants: &[String]) -> BTreeMap<String, u64> {
    let all = c.tenant_requests(false).await;
    tenants
        .iter()
        .map(|t| (t.clone(), all.get(t).copied().unwrap_or(0)))
        .collect()
}

/// After `settle`, no request of `tenants` reaches the mock for `watch`.
async fn not_polled(c: &Cluster, tenants: &[String], settle: Duration, watch: Duration, who: &str) {
    tokio::time::sleep(settle).await;
    let before = requests_of(c, tenants).await;
    tokio::time::sleep(watch).await;
    assert_eq!(before, requests_of(c, tenants).await, "{who}: still polled");
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_tenants_on_one_port_with_revocation_throttling_and_churn() {
    let started = Instant::now();
    let initial: Vec<String> = (0..200).map(tenant).collect();
    // Removed: every tenth, so some are done and polling, some mid-chain
    // and some not started when the file changes.
    let removed: Vec<String> = (0..200).filter(|i| i % 10 == 9).map(tenant).collect();
    let added: Vec<String> = (200..250).map(tenant).collect();
    let revoked = tenant(3);
    let throttled = tenant(7);
    let mut c = Cluster::start_tenanted(
        TENANT_FEED,
        &["--tenant-records", &RECORDS.to_string()],
        &initial,
        "    rate_limit: { per_second: 50, per: tenant }\n",
    );
    let checker = Checker::start(&c.exchange()).await;
    c.coordinator("coord");

    // One tenant throttled (429, Retry-After) for 5 s from before the first
    // worker starts, with 3 more records: all of its records arrive late,
    // and the other tenants do not wait for it.
    let throttle_began = Instant::now();
    c.admin_tenant(&throttled, "throttle?secs=5").await;
    c.admin_tenant(&throttled, "insert?n=3").await;
    c.worker("w1", &[]);
    c.worker("w2", &[]);

    // Mid-sync: revoke one tenant's token, and rewrite the tenants file:
    // 20 tenants gone, 50 new.
    assert!(
        checker
            .wait_for(initial.len() * RECORDS / 3, Duration::from_secs(60))
            .await,
        "a third of the first records did not arrive ({}){}",
        checker.count(),
        c.logs()
    );
    c.admin_tenant(&revoked, "revoke").await;
    let mut now_listed: Vec<String> = initial
        .iter()
        .filter(|t| !removed.contains(t))
        .cloned()
        .collect();
    now_listed.extend(added.iter().cloned());
    let removed_served = requests_of(&c, &removed).await.values().sum::<u64>();
    c.write_tenants(&now_listed);
    let changed_at = Instant::now();

    // Every record of every healthy tenant arrives, the added ones too.
    let healthy: Vec<String> = now_listed
        .iter()
        .filter(|t| **t != revoked)
        .cloned()
        .collect();
    let want = truths(&c, &healthy).await;
    assert!(
        eventually(Duration::from_secs(60), async || missing_by_key(
            &checker, &want
        )
        .is_empty())
        .await,
        "records missing downstream: {:?}{}",
        missing_by_key(&checker, &want),
        c.logs()
    );
    let all_synced = changed_at.elapsed();
    // The added tenants started within a few ticks of the change.
    let added_keys: HashSet<String> = added.iter().map(|t| key(t)).collect();
    let added_first = checker
        .arrived()
        .iter()
        .filter(|a| added_keys.contains(&a.routing_key))
        .map(|a| a.at)
        .min()
        .expect("records of the added tenants");
    let added_after = added_first.saturating_duration_since(changed_at);
    assert!(
        added_after < Duration::from_secs(10),
        "the added tenants' first record came {added_after:?} after the change"
    );

    // The revoked tenant's job failed on a 401; no other job failed.
    assert!(
        eventually(Duration::from_secs(20), async || {
            c.store()
                .await
                .get(&job(&revoked))
                .await
                .unwrap()
                .is_some_and(|cp| cp.phase == Phase::Failed)
        })
        .await,
        "{revoked}'s job did not fail{}",
        c.logs()
    );
    let jobs = c.jobs().await;
    let (_, cp) = jobs
        .iter()
        .find(|(j, _)| *j == job(&revoked))
        .expect("the revoked tenant's job");
    let error = cp.last_error.clone().unwrap_or_default();
    assert!(error.contains("401"), "{revoked}: {error}");
    let failed: Vec<String> = jobs
        .iter()
        .filter(|(j, cp)| cp.phase == Phase::Failed && *j != job(&revoked))
        .map(|(j, cp)| format!("{j}: {:?}", cp.last_error))
        .collect();
    assert!(failed.is_empty(), "other tenants' jobs failed: {failed:?}");

    // The removed tenants' jobs are retired: one job per running tenant.
    let listed: BTreeSet<String> = jobs.iter().map(|(j, _)| j.to_string()).collect();
    let expected: BTreeSet<String> = now_listed.iter().map(|t| job(t).to_string()).collect();
    assert_eq!(listed, expected, "the jobs are those of the tenants listed");

    // The throttle: 429s (and 401s) only for the two tenants they were
    // meant for; the throttled tenant's records all came after the
    // throttle, while the others went on.
    let refused = c.tenant_requests(true).await;
    let refused_names: BTreeSet<&str> = refused.keys().map(String::as_str).collect();
    assert_eq!(
        refused_names,
        BTreeSet::from([revoked.as_str(), throttled.as_str()]),
        "refused requests: {refused:?}"
    );
    let arrived = checker.arrived();
    let throttled_first = arrived
        .iter()
        .filter(|a| a.routing_key == key(&throttled))
        .map(|a| a.at)
        .min()
        .expect("the throttled tenant's records");
    assert!(
        throttled_first >= throttle_began + Duration::from_millis(4500),
        "{throttled}'s first record came {:?} after the throttle began",
        throttled_first - throttle_began
    );
    eprintln!(
        "tenants: {throttled}'s first record {:?} after its throttle began; {} of its requests refused, {} in all",
        throttled_first - throttle_began,
        refused[&throttled],
        c.tenant_requests(false).await[&throttled]
    );
    let others_before = arrived
        .iter()
        .filter(|a| a.routing_key != key(&throttled) && a.at < throttled_first)
        .count();
    assert!(
        others_before >= initial.len() * RECORDS / 4,
        "only {others_before} records of other tenants arrived while {throttled} was paused: \
         its pause held them up"
    );

    // Delivery is isolated: a record is under its own tenant's routing key
    // with its own x-tenant header; no message id is under two keys.
    for a in &arrived {
        let t = a.record_tenant.as_deref().expect("a tenant's record");
        assert_eq!(a.routing_key, key(t), "{a:?}");
        assert_eq!(a.tenant_header.as_deref(), Some(t), "{a:?}");
    }
    let mut keys_of_id: HashMap<String, HashSet<String>> = HashMap::new();
    for (rk, mid) in checker.messages().into_keys() {
        keys_of_id.entry(mid).or_default().insert(rk);
    }
    let shared: Vec<_> = keys_of_id.iter().filter(|(_, k)| k.len() > 1).collect();
    assert!(shared.is_empty(), "message ids under two keys: {shared:?}");
    let known: HashSet<String> = initial.iter().chain(&added).map(|t| key(t)).collect();
    let strays: Vec<String> = checker
        .by_partition()
        .into_keys()
        .filter(|k| !known.contains(k))
        .collect();
    assert!(strays.is_empty(), "unexpected routing keys: {strays:?}");

    // The removed tenants: no request reaches the mock any more.
    not_polled(
        &c,
        &removed,
        Duration::ZERO,
        Duration::from_secs(5),
        "removed tenants",
    )
    .await;
    assert!(
        removed_served > 0,
        "no removed tenant had been served before the change: the check above proves little"
    );

    // The CLI against the same deployment.
    let list = json(&ctl(&c, &["tenants", "list", "mock", "--json"], 0));
    let origins: BTreeMap<String, String> = list["active"]
        .as_array()
        .expect("active")
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap().to_string(),
                t["origin"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        origins.keys().cloned().collect::<BTreeSet<_>>(),
        now_listed.iter().cloned().collect::<BTreeSet<_>>(),
        "{list}"
    );
    assert!(origins.values().all(|o| o == "file"), "{list}");

    // A tenants file that does not parse changes nothing, and is logged.
    let job_names = async || -> BTreeSet<String> {
        c.jobs()
            .await
            .into_iter()
            .map(|(j, _)| j.to_string())
            .collect()
    };
    c.write_tenants_text("- t000\n- { name: [not, a, name\n");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        job_names().await,
        expected,
        "a broken tenants file changed the jobs"
    );
    let coord_log = std::fs::read_to_string(&c.procs[0].log).unwrap_or_default();
    assert!(
        coord_log.contains("the tenants file has errors"),
        "the broken tenants file was not logged{}",
        c.logs()
    );
    c.write_tenants(&now_listed);

    let cli = "x900";
    c.write_secret(cli);
    let said = ctl(&c, &["tenants", "add", "mock", cli], 0);
    assert!(said.contains("added"), "{said}");
    let want_cli = truths(&c, &[cli.to_string()]).await;
    assert!(
        eventually(Duration::from_secs(20), async || missing_by_key(
            &checker, &want_cli
        )
        .is_empty())
        .await,
        "the tenant added by the CLI did not sync: {:?}{}",
        missing_by_key(&checker, &want_cli),
        c.logs()
    );
    let list = json(&ctl(&c, &["tenants", "list", "mock", "--json"], 0));
    let entry = list["active"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == cli)
        .unwrap_or_else(|| panic!("{cli} not listed: {list}"));
    assert_eq!(entry["origin"], "added", "{list}");
    assert_eq!(
        list["active"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == initial[0].as_str())
            .map(|t| t["origin"].clone()),
        Some(serde_json::json!("file")),
        "{list}"
    );

    // status --tenant: the tenant's summary and its jobs.
    let st = json(&ctl(&c, &["status", "--tenant", cli, "--json"], 0));
    let sums = st["tenants"].as_array().expect("tenants");
    assert_eq!(sums.len(), 1, "{st}");
    assert_eq!(sums[0]["tenant"], cli, "{st}");
    assert_eq!(sums[0]["jobs"], 1, "{st}");
    assert_eq!(sums[0]["failed"], 0, "{st}");
    assert_eq!(sums[0]["records"], RECORDS as u64, "{st}");
    let parts: Vec<&str> = st["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .filter_map(|j| j["partition"].as_str())
        .collect();
    assert_eq!(parts, vec![format!("{cli}/all")], "{st}");

    // status --tenants: one summary per running tenant; only the revoked one failed.
    let st = json(&ctl(&c, &["status", "--tenants", "--json"], 0));
    let sums: BTreeMap<String, serde_json::Value> = st["tenants"]
        .as_array()
        .expect("tenants")
        .iter()
        .map(|s| (s["tenant"].as_str().unwrap().to_string(), s.clone()))
        .collect();
    let mut running: BTreeSet<String> = now_listed.iter().cloned().collect();
    running.insert(cli.to_string());
    assert_eq!(
        sums.keys().cloned().collect::<BTreeSet<_>>(),
        running,
        "tenants in status --tenants"
    );
    for (t, s) in &sums {
        if *t == revoked {
            assert_eq!(s["failed"], 1, "{s}");
            let e = s["failures"][0]["error"].as_str().unwrap_or_default();
            assert!(e.contains("401"), "{s}");
            assert_eq!(s["failures"][0]["feed"], "tickets", "{s}");
        } else {
            assert_eq!(s["failed"], 0, "{t}: {s}");
            assert_eq!(s["jobs"], 1, "{t}: {s}");
        }
    }

    // The revoked tenant, its token restored: retry --tenant runs its job
    // again from its stored cursor, and all of its records arrive.
    c.admin_tenant(&revoked, "restore").await;
    c.admin_tenant(&revoked, "insert?n=2").await;
    let said = ctl(&c, &["retry", "--tenant", &revoked], 0);
    assert!(
        said.contains(&format!("retry tickets/{revoked}/all: done")),
        "{said}"
    );
    let want_revoked = truths(&c, std::slice::from_ref(&revoked)).await;
    assert!(
        eventually(Duration::from_secs(20), async || missing_by_key(
            &checker,
            &want_revoked
        )
        .is_empty())
        .await,
        "{revoked} did not sync after retry --tenant: {:?}{}",
        missing_by_key(&checker, &want_revoked),
        c.logs()
    );
    let st = json(&ctl(&c, &["status", "--tenant", &revoked, "--json"], 0));
    assert_eq!(st["tenants"][0]["failed"], 0, "{st}");

    // A tenant of the file cannot be removed by the CLI.
    let (code, out, err) = tidemark(&["tenants", "remove", "mock", &initial[0]], &c.role_env());
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("tenants file"), "{out}{err}");

    // Remove the added tenant: its job is retired (its state kept), the
    // mock sees no more requests; --purge then deletes its state.
    let said = ctl(&c, &["tenants", "remove", "mock", cli], 0);
    assert!(said.contains("removed"), "{said}");
    assert!(
        eventually(Duration::from_secs(10), async || !c
            .jobs()
            .await
            .iter()
            .any(|(j, _)| *j == job(cli)))
        .await,
        "{cli}'s job is still listed{}",
        c.logs()
    );
    let store = c.store().await;
    assert!(
        store.get(&job(cli)).await.unwrap().is_some(),
        "a removed tenant's state is kept"
    );
    let one = [cli.to_string()];
    not_polled(
        &c,
        &one,
        Duration::from_secs(1),
        Duration::from_secs(5),
        "a removed tenant",
    )
    .await;
    let list = json(&ctl(&c, &["tenants", "list", "mock", "--json"], 0));
    assert!(
        !list["active"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == cli),
        "{list}"
    );
    // Added again, it carries on from its kept cursor: only the records
    // new since arrive (no repeats: checked at the end).
    c.admin_tenant(cli, "insert?n=2").await;
    ctl(&c, &["tenants", "add", "mock", cli], 0);
    let want_cli = truths(&c, &[cli.to_string()]).await;
    assert!(
        eventually(Duration::from_secs(20), async || missing_by_key(
            &checker, &want_cli
        )
        .is_empty())
        .await,
        "the tenant added again did not sync: {:?}{}",
        missing_by_key(&checker, &want_cli),
        c.logs()
    );
    // Removed with --purge: retired and its state deleted at once.
    let said = ctl(&c, &["tenants", "remove", "mock", cli, "--purge"], 0);
    assert!(said.contains("removed"), "{said}");
    assert!(said.contains("state of 1 job(s) deleted"), "{said}");
    assert!(
        store.get(&job(cli)).await.unwrap().is_none(),
        "--purge left {cli}'s state"
    );
    not_polled(
        &c,
        &one,
        Duration::from_secs(1),
        Duration::from_secs(4),
        "a purged tenant",
    )
    .await;
    assert!(
        store.get(&job(cli)).await.unwrap().is_none(),
        "{cli}'s state came back after --purge"
    );
    // --purge also deletes the state of a tenant gone from the file.
    assert!(store.get(&job(&removed[0])).await.unwrap().is_some());
    let said = ctl(
        &c,
        &["tenants", "remove", "mock", &removed[0], "--purge"],
        0,
    );
    assert!(said.contains("state of 1 job(s) deleted"), "{said}");
    assert!(store.get(&job(&removed[0])).await.unwrap().is_none());

    // Nothing repeated (there were no crashes), and no process restarted.
    assert_eq!(
        checker.duplicate_messages(),
        0,
        "{:?}",
        checker
            .duplicates_by_partition()
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .collect::<Vec<_>>()
    );
    for p in c.procs.iter_mut() {
        p.check_alive().unwrap_or_else(|e| panic!("{e}"));
    }
    eprintln!(
        "tenants: {} tenants synced {:?} after the file changed (the added ones' first \
         record after {added_after:?}; {removed_served} requests of \
         removed tenants before it); {others_before} records of others before the throttled one's \
         first; {} records, {:?} in all",
        healthy.len(),
        all_synced,
        checker.count(),
        started.elapsed()
    );
}
