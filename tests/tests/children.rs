//! Parent → child feeds end to end (issue 22): the mock's tickets as the
//! parent feed and each ticket's comments (`/api/v2/tickets/{id}/comments`)
//! as its child feed, run by a real coordinator and workers over Redis and
//! RabbitMQ (and by `tidemark run`), checked against the mock's ground truth
//! (`/_truth/comments`) and the requests it counted per ticket
//! (`/_stats` `comment_requests_by_ticket`).
//!
//! What a user relies on: every comment of every ticket arrives, under its
//! ticket's routing key with the parent's feed and key in its headers; a
//! comment that arrives twice comes with the same message id; a child runs
//! when its parent record is new or changed and never otherwise (the API is
//! not asked again for unchanged tickets); a deleted parent leaves its child
//! idle, not failed; crashes and cut links lose nothing; tenants apply.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::BasicAckOptions;
use lapin::types::AMQPValue;
use tidemark_core::checkpoint::{Checkpoint, JobId, Phase, compare_versions};
use tidemark_core::clock::now_ms;
use tidemark_mock::{CommentTruth, CommentsTruth, TruthRecord};
use tidemark_state::Leases;
use tidemark_tests::proxy::FaultProxy;
use tidemark_tests::{Cluster, amqp_url, eventually, host_port, redis_url, spawn, tidemark};

const PARENT: &str = "tickets";
const CHILD: &str = "ticket_comments";
/// `page[size]` of the child feeds (the mock's default page size too).
const PAGE: usize = 5;
/// A child job that has run is never due on a schedule: its next due time
/// is further away than this.
const NOT_DUE_MS: u64 = 24 * 3600 * 1000;

// ---------------------------------------------------------------- config

/// The parent: the mock's tickets in change order (Zendesk cursor).
fn parent_feed(source: &str, page_size: usize, every: &str) -> String {
    format!(
        r#"  - name: {PARENT}
    source: {source}
    path: /api/v2/incremental/tickets/cursor.json
    records: /tickets
    pagination: {{ preset: zendesk_cursor, page_size: {page_size} }}
    key: /id
    version: /updated_at
    start: {{ param: start_time, format: unix, from: "2024-01-01T00:00:00Z" }}
    every: {every}
"#
    )
}

/// How a child feed follows a ticket's comment pages.
#[derive(Clone, Copy)]
enum Paging {
    /// `links.next`, a full URL.
    NextUrl,
    /// `page[after]` from `meta.after_cursor` while `meta.has_more`.
    Cursor,
}

/// A child feed of `tickets`: one ticket's comments, `{ticket_id}` from the
/// ticket's `/id`. `parent_extra` goes inside the `parent:` block (e.g.
/// `, on: change`).
fn child_feed(name: &str, source: &str, paging: Paging, mode: &str, parent_extra: &str) -> String {
    let pagination = match paging {
        Paging::NextUrl => "{ next_url: /links/next }",
        Paging::Cursor => {
            r#"{ cursor_param: "page[after]", next_cursor: /meta/after_cursor, has_more: /meta/has_more }"#
        }
    };
    format!(
        r#"  - name: {name}
    source: {source}
    parent: {{ feed: {PARENT}, vars: {{ ticket_id: /id }}{parent_extra} }}
    path: /api/v2/tickets/{{ticket_id}}/comments
    params: {{ "page[size]": "{PAGE}" }}
    records: /comments
    pagination: {pagination}
    key: /id
    version: /updated_at
    mode: {mode}
"#
    )
}

/// Tickets (20 a page, every 2 s) and their comments: the spec's example,
/// every field of `parent:` written out.
fn main_feeds() -> String {
    format!(
        "{}{}",
        parent_feed("mock", 20, "2s"),
        child_feed(
            CHILD,
            "mock",
            Paging::NextUrl,
            "snapshot",
            ", on: change, on_missing: skip"
        )
    )
}

/// Add a second source `name` to the config of `c`, with these lines
/// (indented four spaces). Call before any role starts.
fn add_source(c: &Cluster, name: &str, lines: &str) {
    let text = std::fs::read_to_string(&c.config).expect("config");
    assert!(text.contains("\nfeeds:\n"), "{text}");
    let text = text.replacen("\nfeeds:\n", &format!("\n  {name}:\n{lines}feeds:\n"), 1);
    std::fs::write(&c.config, text).expect("write config");
}

// ---------------------------------------------------------------- scope

/// The tickets of the main dataset or of one tenant: their jobs, routing
/// keys, truths and request counts.
#[derive(Clone, Debug)]
struct Scope(Option<String>);

impl Scope {
    fn main() -> Scope {
        Scope(None)
    }
    fn tenant(t: &str) -> Scope {
        Scope(Some(t.to_string()))
    }
    fn partition(&self, p: &str) -> String {
        match &self.0 {
            Some(t) => format!("{t}/{p}"),
            None => p.to_string(),
        }
    }
    /// The child job of `ticket`.
    fn job(&self, ticket: &str) -> JobId {
        JobId::new(CHILD, self.partition(ticket))
    }
    fn parent_job(&self) -> JobId {
        JobId::new(PARENT, self.partition("all"))
    }
    /// Whether a child job's partition is one of this scope's.
    fn owns(&self, partition: &str) -> bool {
        match &self.0 {
            Some(t) => partition
                .strip_prefix(&format!("{t}/"))
                .is_some_and(|rest| !rest.contains('/')),
            None => !partition.contains('/'),
        }
    }
    /// Where `ticket`'s comments are published.
    fn routing_key(&self, ticket: &str) -> String {
        match &self.0 {
            Some(t) => format!("{CHILD}.{t}.{ticket}"),
            None => format!("{CHILD}.{ticket}"),
        }
    }
    /// `ticket`'s key in the mock's `comment_requests_by_ticket`.
    fn request_key(&self, ticket: &str) -> String {
        self.partition(ticket)
    }
    async fn tickets(&self, c: &Cluster) -> Vec<TruthRecord> {
        match &self.0 {
            Some(t) => c.tenant_truth(t).await.records,
            None => c.truth().await.records,
        }
    }
    async fn comments(&self, c: &Cluster) -> Vec<CommentTruth> {
        let url = match &self.0 {
            Some(t) => format!("{}/_truth/comments?tenant={t}", c.mock_url),
            None => format!("{}/_truth/comments", c.mock_url),
        };
        let truth: CommentsTruth = reqwest::get(url)
            .await
            .expect("comments truth")
            .json()
            .await
            .expect("comments truth json");
        truth.comments
    }
    /// The comment requests the mock has seen per ticket of this scope.
    async fn requests(&self, c: &Cluster) -> BTreeMap<String, u64> {
        let all = requests_by_ticket(c).await;
        let tickets = self.tickets(c).await;
        tickets
            .iter()
            .map(|t| {
                (
                    t.id.clone(),
                    all.get(&self.request_key(&t.id)).copied().unwrap_or(0),
                )
            })
            .collect()
    }
}

/// Requests to `/api/v2/tickets/{id}/comments`, by ticket (`T/id` for a tenant's).
async fn requests_by_ticket(c: &Cluster) -> BTreeMap<String, u64> {
    serde_json::from_value(c.stats().await["comment_requests_by_ticket"].clone())
        .expect("comment_requests_by_ticket")
}

/// The pages of a walk over `n` comments (an empty walk is one page).
fn pages(n: usize) -> u64 {
    n.div_ceil(PAGE).max(1) as u64
}

/// Comments per ticket: every ticket of `tickets`, 0 for those without.
fn counts(tickets: &[TruthRecord], comments: &[CommentTruth]) -> BTreeMap<String, usize> {
    let mut m: BTreeMap<String, usize> = tickets.iter().map(|t| (t.id.clone(), 0)).collect();
    for c in comments {
        *m.entry(c.ticket_id.clone()).or_insert(0) += 1;
    }
    m
}

fn versions_of(comments: &[CommentTruth]) -> BTreeSet<(String, String, String)> {
    comments
        .iter()
        .map(|c| (c.ticket_id.clone(), c.id.clone(), c.updated_at.clone()))
        .collect()
}

// ---------------------------------------------------------------- downstream

/// One record as it arrived downstream, with every header of its message.
#[derive(Debug, Clone)]
struct Got {
    routing_key: String,
    message_id: String,
    headers: BTreeMap<String, String>,
    id: String,
    ticket_id: String,
    updated_at: String,
    /// The record's own `tenant` field (the mock tags tenants' records).
    record_tenant: Option<String>,
}

/// A subscriber bound to a deployment's records exchange with `#`.
struct Downstream {
    got: Arc<Mutex<Vec<Got>>>,
    _conn: lapin::Connection,
}

fn header_text(v: &AMQPValue) -> String {
    match v {
        AMQPValue::LongString(s) => s.to_string(),
        AMQPValue::ShortString(s) => s.to_string(),
        other => format!("{other:?}"),
    }
}

impl Downstream {
    async fn start(exchange: &str) -> Downstream {
        let (conn, mut consumer, _) =
            tidemark_bus::amqp::subscribe(&amqp_url(), exchange, "#", "children-checker")
                .await
                .expect("subscribe to the records exchange");
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = got.clone();
        tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                let routing_key = d.routing_key.to_string();
                let message_id = d
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                let headers: BTreeMap<String, String> = d
                    .properties
                    .headers()
                    .as_ref()
                    .map(|h| {
                        h.inner()
                            .iter()
                            .map(|(k, v)| (k.to_string(), header_text(v)))
                            .collect()
                    })
                    .unwrap_or_default();
                let v: serde_json::Value = serde_json::from_slice(&d.data).unwrap_or_default();
                let recs = match v.get("records") {
                    Some(serde_json::Value::Array(rs)) => rs.clone(),
                    _ => vec![v],
                };
                {
                    let mut g = sink.lock().unwrap();
                    for r in recs {
                        let text = |k: &str| r[k].as_str().unwrap_or_default().to_string();
                        g.push(Got {
                            routing_key: routing_key.clone(),
                            message_id: message_id.clone(),
                            headers: headers.clone(),
                            id: text("id"),
                            ticket_id: text("ticket_id"),
                            updated_at: text("updated_at"),
                            record_tenant: r["tenant"].as_str().map(str::to_string),
                        });
                    }
                }
                let _ = d.ack(BasicAckOptions::default()).await;
            }
        });
        Downstream { got, _conn: conn }
    }

    fn all(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    /// The records that arrived under the child feed's routing keys.
    fn comments(&self) -> Vec<Got> {
        let prefix = format!("{CHILD}.");
        self.all()
            .into_iter()
            .filter(|g| g.routing_key.starts_with(&prefix))
            .collect()
    }

    /// Distinct (routing key, comment id, version) that arrived.
    fn comment_versions(&self) -> HashSet<(String, String, String)> {
        self.comments()
            .into_iter()
            .map(|g| (g.routing_key, g.id, g.updated_at))
            .collect()
    }

    /// Messages per routing key of the child feed.
    fn messages_by_key(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for g in self.comments() {
            *m.entry(g.routing_key).or_insert(0) += 1;
        }
        m
    }
}

/// What is wrong with the comments that arrived: a comment under another
/// ticket's routing key, a missing or wrong header, one version under two
/// message ids, or one message id for two versions.
fn delivery_problems(got: &[Got]) -> Vec<String> {
    let mut out = Vec::new();
    let mut ids_of_version: HashMap<(String, String, String), BTreeSet<String>> = HashMap::new();
    let mut versions_of_id: HashMap<String, BTreeSet<(String, String, String)>> = HashMap::new();
    for g in got {
        let scope = Scope(g.record_tenant.clone());
        let h = |k: &str| g.headers.get(k).map(String::as_str);
        let mut wrong = Vec::new();
        if g.ticket_id.is_empty() || !g.id.starts_with(&format!("{}-c", g.ticket_id)) {
            wrong.push("not a comment".to_string());
        }
        if g.routing_key != scope.routing_key(&g.ticket_id) {
            wrong.push(format!(
                "routing key {} (want {})",
                g.routing_key,
                scope.routing_key(&g.ticket_id)
            ));
        }
        for (k, want) in [
            ("x-feed", Some(CHILD)),
            ("x-partition", Some(g.ticket_id.as_str())),
            ("x-parent-feed", Some(PARENT)),
            ("x-parent-key", Some(g.ticket_id.as_str())),
            ("x-tenant", g.record_tenant.as_deref()),
        ] {
            if h(k) != want {
                wrong.push(format!("{k}: {:?} (want {want:?})", h(k)));
            }
        }
        if g.message_id.is_empty() {
            wrong.push("no message id".into());
        }
        if !wrong.is_empty() {
            out.push(format!(
                "{} under {}: {}",
                g.id,
                g.routing_key,
                wrong.join(", ")
            ));
        }
        let version = (g.routing_key.clone(), g.id.clone(), g.updated_at.clone());
        ids_of_version
            .entry(version.clone())
            .or_default()
            .insert(g.message_id.clone());
        versions_of_id
            .entry(g.message_id.clone())
            .or_default()
            .insert(version);
    }
    for (v, ids) in &ids_of_version {
        if ids.len() > 1 {
            out.push(format!(
                "{v:?} arrived under {} message ids: {ids:?}",
                ids.len()
            ));
        }
    }
    for (id, vs) in &versions_of_id {
        if vs.len() > 1 {
            out.push(format!(
                "message id {id} names {} record versions: {vs:?}",
                vs.len()
            ));
        }
    }
    out.sort();
    out
}

fn first<T: std::fmt::Debug>(items: &[T], n: usize) -> String {
    let shown: Vec<&T> = items.iter().take(n).collect();
    if items.len() > n {
        format!("{shown:#?} … and {} more", items.len() - n)
    } else {
        format!("{shown:#?}")
    }
}

// ---------------------------------------------------------------- state

/// A child job that has run and waits for its parent: idle, at least one
/// page committed, not due on any schedule.
fn settled(cp: &Checkpoint, now: u64) -> bool {
    cp.phase == Phase::Idle && cp.pages > 0 && cp.next_due_ms > now + NOT_DUE_MS
}

fn brief(cp: &Checkpoint, now: u64) -> String {
    format!(
        "phase {}, pages {}, records {}, due in {:.1} s, last error {:?}",
        cp.phase.as_str(),
        cp.pages,
        cp.records,
        (cp.next_due_ms as f64 - now as f64) / 1000.0,
        cp.last_error
    )
}

/// The child jobs of `scope`, by ticket id.
async fn child_jobs(c: &Cluster, scope: &Scope) -> BTreeMap<String, Checkpoint> {
    c.jobs()
        .await
        .into_iter()
        .filter(|(j, _)| j.feed == CHILD && scope.owns(&j.partition))
        .map(|(j, cp)| {
            let id = j
                .partition
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_string();
            (id, cp)
        })
        .collect()
}

/// What keeps the deployment from having settled, per scope: the parent
/// behind its newest ticket, a ticket without a child job, a child job not
/// settled (deleted tickets' too), a comment of the truth not arrived.
/// Empty: settled.
async fn outstanding(c: &Cluster, down: &Downstream, scopes: &[Scope]) -> Vec<String> {
    let jobs: HashMap<JobId, Checkpoint> = c.jobs().await.into_iter().collect();
    let arrived = down.comment_versions();
    let now = now_ms();
    let mut out = Vec::new();
    for s in scopes {
        let tickets = s.tickets(c).await;
        if let Some(newest) = tickets
            .iter()
            .map(|t| t.updated_at.as_str())
            .max_by(|a, b| compare_versions(a, b))
        {
            let hw = jobs
                .get(&s.parent_job())
                .and_then(|cp| cp.high_water.clone());
            if hw
                .as_deref()
                .is_none_or(|hw| compare_versions(hw, newest).is_lt())
            {
                out.push(format!(
                    "{}: high-water {hw:?}, the newest ticket is of {newest}",
                    s.parent_job()
                ));
            }
        }
        for t in &tickets {
            if !jobs.contains_key(&s.job(&t.id)) {
                out.push(format!("{}: no child job", s.job(&t.id)));
            }
        }
        for (j, cp) in jobs
            .iter()
            .filter(|(j, _)| j.feed == CHILD && s.owns(&j.partition))
        {
            if !settled(cp, now) {
                out.push(format!("{j}: not settled: {}", brief(cp, now)));
            }
        }
        let missing = s
            .comments(c)
            .await
            .into_iter()
            .filter(|m| {
                !arrived.contains(&(
                    s.routing_key(&m.ticket_id),
                    m.id.clone(),
                    m.updated_at.clone(),
                ))
            })
            .map(|m| format!("{}@{}", m.id, m.updated_at))
            .collect::<Vec<_>>();
        if !missing.is_empty() {
            out.push(format!(
                "{:?}: {} comments not arrived, e.g. {:?}",
                s.0,
                missing.len(),
                &missing[..missing.len().min(5)]
            ));
        }
    }
    out.sort();
    out
}

/// Wait until nothing is [`outstanding`]; panics with what is left after `timeout`.
async fn wait_settled(
    c: &Cluster,
    down: &Downstream,
    scopes: &[Scope],
    timeout: Duration,
    what: &str,
) {
    let began = Instant::now();
    let ok = eventually(timeout, async || {
        outstanding(c, down, scopes).await.is_empty()
    })
    .await;
    if !ok {
        let left = outstanding(c, down, scopes).await;
        panic!(
            "{what}: not settled after {timeout:?}: {}{}",
            first(&left, 15),
            c.logs()
        );
    }
    eprintln!("children: {what}: settled in {:?}", began.elapsed());
}

/// `tidemark status --json <extra>` against the deployment.
fn status_json(c: &Cluster, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["status", "--json"];
    args.extend_from_slice(extra);
    let (code, out, err) = tidemark(&args, &c.role_env());
    assert_eq!(code, 0, "tidemark {args:?}: exit {code}\n{out}\n{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json: not JSON ({e}):\n{out}"))
}

/// One feed's summary in a status report.
fn feed_summary(st: &serde_json::Value, feed: &str) -> serde_json::Value {
    st["feeds"]
        .as_array()
        .expect("feeds")
        .iter()
        .find(|f| f["feed"] == feed)
        .unwrap_or_else(|| panic!("no feed {feed} in the status: {st:#}"))
        .clone()
}

/// A deployment of the tickets feed and its comments: the mock with
/// `mock_args`, a downstream subscriber, a coordinator and two workers.
async fn start_main(feeds: &str, mock_args: &[&str]) -> (Cluster, Downstream) {
    let mut c = Cluster::start(feeds, mock_args);
    let down = Downstream::start(&c.exchange()).await;
    c.coordinator_with("coord", &["--tick", "250ms"]);
    c.worker("w1", &[]);
    c.worker("w2", &[]);
    (c, down)
}

/// Each ticket's comment requests since `before`, against what is expected:
/// the mismatches, as (ticket, requested, expected).
fn request_mismatches(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
    expected: &BTreeMap<String, u64>,
) -> Vec<(String, u64, u64)> {
    after
        .iter()
        .map(|(id, n)| {
            let delta = n - before.get(id).copied().unwrap_or(0);
            (id.clone(), delta, expected.get(id).copied().unwrap_or(0))
        })
        .filter(|(_, got, want)| got != want)
        .collect()
}

// ---------------------------------------------------------------- tests

/// 60 tickets with 0, one, two and five pages of comments: one child job
/// per ticket runs once (every page requested once, no more), and
/// downstream has exactly the comments of the truth, each under its
/// ticket's routing key with x-parent-feed / x-parent-key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_first_walk_delivers_every_comment_of_every_ticket() {
    let started = Instant::now();
    let (c, down) = start_main(&main_feeds(), &["--records", "60"]).await;
    let main = Scope::main();
    let tickets = main.tickets(&c).await;
    let comments = main.comments(&c).await;
    let n = counts(&tickets, &comments);
    // The dataset has every shape: no comments, one page, two, many.
    for (what, k) in [
        ("no comments", n.values().filter(|&&k| k == 0).count()),
        (
            "one page",
            n.values().filter(|&&k| pages(k) == 1 && k > 0).count(),
        ),
        ("two pages", n.values().filter(|&&k| pages(k) == 2).count()),
        ("many pages", n.values().filter(|&&k| pages(k) >= 4).count()),
    ] {
        assert!(k >= 4, "only {k} tickets with {what}: {n:?}");
    }

    wait_settled(
        &c,
        &down,
        std::slice::from_ref(&main),
        Duration::from_secs(60),
        "the first walk",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // One child job per ticket, idle, its records counted.
    let jobs = child_jobs(&c, &main).await;
    assert_eq!(
        jobs.keys().cloned().collect::<BTreeSet<_>>(),
        n.keys().cloned().collect::<BTreeSet<_>>(),
        "one child job per ticket"
    );
    let now = now_ms();
    for (id, cp) in &jobs {
        assert!(settled(cp, now), "{id}: {}", brief(cp, now));
        assert_eq!(cp.last_error, None, "{id}: {}", brief(cp, now));
        assert_eq!(cp.records, n[id] as u64, "{id}: records counted");
    }
    // Each ticket's comments were walked once: all of its pages, no more.
    let want: BTreeMap<String, u64> = n.iter().map(|(id, k)| (id.clone(), pages(*k))).collect();
    let got = main.requests(&c).await;
    let wrong = request_mismatches(&BTreeMap::new(), &got, &want);
    assert!(
        wrong.is_empty(),
        "comment requests per ticket (ticket, requested, pages): {wrong:?}"
    );
    assert_eq!(
        requests_by_ticket(&c).await.len(),
        tickets.len(),
        "requests for tickets that do not exist"
    );

    // Downstream: exactly the truth's comments, each under its ticket.
    let arrived = down.comments();
    let got_versions: BTreeSet<(String, String, String)> = arrived
        .iter()
        .map(|g| (g.ticket_id.clone(), g.id.clone(), g.updated_at.clone()))
        .collect();
    let want_versions = versions_of(&comments);
    let missing: Vec<_> = want_versions.difference(&got_versions).collect();
    let extra: Vec<_> = got_versions.difference(&want_versions).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {}: {}\nnot in the truth {}: {}",
        missing.len(),
        first(&missing, 5),
        extra.len(),
        first(&extra, 5)
    );
    let problems = delivery_problems(&arrived);
    assert!(problems.is_empty(), "{}", first(&problems, 10));
    // The parent's own records arrive as ever.
    let parent_ids: HashSet<String> = down
        .all()
        .into_iter()
        .filter(|g| g.routing_key == format!("{PARENT}.all"))
        .map(|g| g.id)
        .collect();
    assert_eq!(parent_ids.len(), tickets.len(), "the tickets themselves");
    // Nothing under any other routing key.
    let strays: BTreeSet<String> = down
        .all()
        .into_iter()
        .map(|g| g.routing_key)
        .filter(|k| !k.starts_with(&format!("{CHILD}.")) && *k != format!("{PARENT}.all"))
        .collect();
    assert!(strays.is_empty(), "unexpected routing keys: {strays:?}");

    // status: the child feed, its parent named, its jobs and records.
    let st = status_json(&c, &[]);
    let f = feed_summary(&st, CHILD);
    assert_eq!(f["parent"], PARENT, "{f:#}");
    assert_eq!(f["jobs"], tickets.len() as u64, "{f:#}");
    assert_eq!(f["failed"], 0, "{f:#}");
    assert_eq!(f["records"], comments.len() as u64, "{f:#}");
    let p = feed_summary(&st, PARENT);
    assert!(p["parent"].is_null(), "the parent has no parent: {p:#}");
    eprintln!(
        "children: first walk: {} tickets, {} comments, {} messages, {} duplicates, {:?}",
        tickets.len(),
        comments.len(),
        arrived.len(),
        arrived.len() - got_versions.len(),
        started.elapsed()
    );
}

/// After the first walk, 10 tickets are updated: at the parent's next poll
/// exactly those 10 children run again, each walking all of its pages; no
/// other ticket's comments are asked for or published again, and the new
/// comments arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_the_children_of_changed_tickets_run_again() {
    let started = Instant::now();
    let (c, down) = start_main(&main_feeds(), &["--records", "60"]).await;
    let main = Scope::main();
    wait_settled(
        &c,
        &down,
        std::slice::from_ref(&main),
        Duration::from_secs(60),
        "the first walk",
    )
    .await;
    // Two polls of the parent with nothing new: nothing runs.
    let quiet = main.requests(&c).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        main.requests(&c).await,
        quiet,
        "comments requested while no ticket changed"
    );

    let before = main.tickets(&c).await;
    let comments_before = main.comments(&c).await;
    let requests_before = main.requests(&c).await;
    let messages_before = down.messages_by_key();
    c.admin("/_admin/update?n=10", None).await;
    let after = main.tickets(&c).await;
    let changed: BTreeSet<String> = after
        .iter()
        .filter(|t| !before.contains(t))
        .map(|t| t.id.clone())
        .collect();
    assert_eq!(changed.len(), 10, "the mock updated 10 tickets");

    wait_settled(
        &c,
        &down,
        std::slice::from_ref(&main),
        Duration::from_secs(45),
        "after the update",
    )
    .await;
    // Two more polls of the parent: nothing else runs.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let comments_after = main.comments(&c).await;
    let n = counts(&after, &comments_after);
    let want: BTreeMap<String, u64> = n
        .iter()
        .filter(|(id, _)| changed.contains(*id))
        .map(|(id, k)| (id.clone(), pages(*k)))
        .collect();
    let wrong = request_mismatches(&requests_before, &main.requests(&c).await, &want);
    assert!(
        wrong.is_empty(),
        "comment requests per ticket since the update (ticket, requested, expected: all pages of \
         the 10 changed, none of the others): {wrong:?}\nchanged: {changed:?}"
    );

    // One new comment per changed ticket, arrived under its ticket.
    let old = versions_of(&comments_before);
    let new: Vec<(String, String, String)> = versions_of(&comments_after)
        .into_iter()
        .filter(|v| !old.contains(v))
        .collect();
    assert_eq!(new.len(), 10, "{new:?}");
    assert_eq!(
        new.iter().map(|v| v.0.clone()).collect::<BTreeSet<_>>(),
        changed,
        "the new comments are the changed tickets'"
    );
    let arrived = down.comment_versions();
    for (ticket, id, at) in &new {
        assert!(
            arrived.contains(&(main.routing_key(ticket), id.clone(), at.clone())),
            "the new comment {id}@{at} did not arrive"
        );
    }
    // The unchanged tickets published nothing more.
    let messages_after = down.messages_by_key();
    let republished: Vec<(String, usize, usize)> = messages_after
        .iter()
        .filter(|(k, _)| !changed.iter().any(|id| **k == main.routing_key(id)))
        .map(|(k, m)| (k.clone(), messages_before.get(k).copied().unwrap_or(0), *m))
        .filter(|(_, b, a)| a != b)
        .collect();
    assert!(
        republished.is_empty(),
        "unchanged tickets published again (key, before, after): {republished:?}"
    );
    let problems = delivery_problems(&down.comments());
    assert!(problems.is_empty(), "{}", first(&problems, 10));
    let jobs = child_jobs(&c, &main).await;
    for id in &changed {
        assert_eq!(jobs[id].last_error, None, "{id}");
    }
    eprintln!(
        "children: update of 10 tickets: {} comment requests for them, none for the other {}, {:?}",
        want.values().sum::<u64>(),
        after.len() - changed.len(),
        started.elapsed()
    );
}

/// Tickets inserted after the first walk get child jobs at the parent's
/// next poll, which walk all of their comments; the others are not asked again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inserted_tickets_run_their_children() {
    let started = Instant::now();
    let (c, down) = start_main(&main_feeds(), &["--records", "40"]).await;
    let main = Scope::main();
    wait_settled(
        &c,
        &down,
        std::slice::from_ref(&main),
        Duration::from_secs(60),
        "the first walk",
    )
    .await;
    let before: HashSet<String> = main.tickets(&c).await.into_iter().map(|t| t.id).collect();
    let requests_before = main.requests(&c).await;

    c.admin("/_admin/insert?n=5", None).await;
    let after = main.tickets(&c).await;
    let inserted: BTreeSet<String> = after
        .iter()
        .filter(|t| !before.contains(&t.id))
        .map(|t| t.id.clone())
        .collect();
    assert_eq!(inserted.len(), 5);

    wait_settled(
        &c,
        &down,
        std::slice::from_ref(&main),
        Duration::from_secs(45),
        "after the insert",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let comments = main.comments(&c).await;
    let n = counts(&after, &comments);
    let jobs = child_jobs(&c, &main).await;
    for id in &inserted {
        let cp = jobs
            .get(id)
            .unwrap_or_else(|| panic!("no child job for the inserted ticket {id}"));
        assert_eq!(cp.records, n[id] as u64, "{id}: {}", brief(cp, now_ms()));
    }
    let want: BTreeMap<String, u64> = inserted
        .iter()
        .map(|id| (id.clone(), pages(n[id])))
        .collect();
    let wrong = request_mismatches(&requests_before, &main.requests(&c).await, &want);
    assert!(
        wrong.is_empty(),
        "comment requests since the insert (ticket, requested, expected): {wrong:?}"
    );
    let arrived = down.comment_versions();
    let of_inserted: Vec<&CommentTruth> = comments
        .iter()
        .filter(|m| inserted.contains(&m.ticket_id))
        .collect();
    for m in &of_inserted {
        assert!(
            arrived.contains(&(
                main.routing_key(&m.ticket_id),
                m.id.clone(),
                m.updated_at.clone()
            )),
            "{}@{} of an inserted ticket did not arrive",
            m.id,
            m.updated_at
        );
    }
    let problems = delivery_problems(&down.comments());
    assert!(problems.is_empty(), "{}", first(&problems, 10));
    eprintln!(
        "children: 5 inserted tickets, {} comments of theirs arrived, {:?}",
        of_inserted.len(),
        started.elapsed()
    );
}

/// A ticket deleted after its update was read: its child is triggered and
/// gets 404. With the default `on_missing: skip` the child job ends idle
/// (never due again, not asked again) with last_error "parent gone: …";
/// the feed has no failed job; every other child ran.
///
/// The child feed reads the API through a proxy (its own source) that is
/// stalled from before the update until after the delete, so the child's
/// request reaches the mock only once the ticket is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_parent_leaves_its_child_idle_not_failed() {
    let started = Instant::now();
    const TICKETS: usize = 20;
    let feeds = format!(
        "{}{}",
        parent_feed("mock", 20, "2s"),
        child_feed(CHILD, "comments_api", Paging::NextUrl, "snapshot", "")
    );
    let mut c = Cluster::start(&feeds, &["--records", &TICKETS.to_string()]);
    let proxy = FaultProxy::start(host_port(&c.mock_url)).await.unwrap();
    add_source(
        &c,
        "comments_api",
        &format!(
            "    base_url: {}\n    timeout: 20s\n",
            proxy.url_for(&c.mock_url)
        ),
    );
    let down = Downstream::start(&c.exchange()).await;
    c.coordinator_with("coord", &["--tick", "250ms"]);
    c.worker("w1", &[]);
    c.worker("w2", &[]);
    let main = Scope::main();
    wait_settled(
        &c,
        &down,
        std::slice::from_ref(&main),
        Duration::from_secs(60),
        "the first walk",
    )
    .await;

    // Every ticket updated; the parent reads the updates while the
    // children's requests are held; then the two oldest tickets go.
    proxy.stall(Duration::from_secs(60));
    c.admin(&format!("/_admin/update?n={TICKETS}"), None).await;
    let updated = main.tickets(&c).await;
    let newest = updated
        .iter()
        .map(|t| t.updated_at.clone())
        .max_by(|a, b| compare_versions(a, b))
        .unwrap();
    let parent_read = eventually(Duration::from_secs(20), async || {
        c.store()
            .await
            .get(&main.parent_job())
            .await
            .unwrap()
            .and_then(|cp| cp.high_water)
            .is_some_and(|hw: String| !compare_versions(&hw, &newest).is_lt())
    })
    .await;
    assert!(
        parent_read,
        "the parent did not read the updates{}",
        c.logs()
    );
    let r: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/_admin/delete?n=2", c.mock_url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let deleted: Vec<String> = serde_json::from_value(r["ids"].clone()).unwrap();
    assert_eq!(deleted.len(), 2, "{r}");
    let requests_at_delete = requests_by_ticket(&c).await;
    proxy.stall(Duration::ZERO);

    // The deleted tickets' children: settled too (idle, not due).
    wait_settled(
        &c,
        &down,
        std::slice::from_ref(&main),
        Duration::from_secs(45),
        "after the delete",
    )
    .await;
    let jobs = child_jobs(&c, &main).await;
    assert_eq!(
        jobs.len(),
        TICKETS,
        "the deleted tickets' child jobs are kept"
    );
    let now = now_ms();
    for id in &deleted {
        let cp = &jobs[id];
        let error = cp.last_error.clone().unwrap_or_default();
        assert_eq!(cp.phase, Phase::Idle, "{id}: {}", brief(cp, now));
        assert!(
            error.contains("parent gone"),
            "{id}: last_error does not say the parent is gone: {}",
            brief(cp, now)
        );
        assert!(
            error.contains("404"),
            "{id}: last_error does not name the 404: {}",
            brief(cp, now)
        );
    }
    let failed: Vec<String> = jobs
        .iter()
        .filter(|(_, cp)| cp.phase == Phase::Failed)
        .map(|(id, cp)| format!("{id}: {}", brief(cp, now)))
        .collect();
    assert!(failed.is_empty(), "failed child jobs: {failed:?}");
    // The children of the others ran on the update: their new comments arrived
    // (checked by wait_settled), each of them walked once more.
    let requests = requests_by_ticket(&c).await;
    for id in &deleted {
        let asked = requests[id] - requests_at_delete.get(id).copied().unwrap_or(0);
        assert!(
            asked >= 1,
            "{id}: its child never asked for the deleted ticket's comments"
        );
    }
    // Not asked again: a deleted parent's child waits for its parent.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let later = requests_by_ticket(&c).await;
    for id in &deleted {
        assert_eq!(
            later[id], requests[id],
            "{id}: the deleted ticket's comments asked again"
        );
    }

    // status --json: the child feed, no failed jobs; the jobs say why.
    let st = status_json(&c, &[]);
    let f = feed_summary(&st, CHILD);
    assert_eq!(f["failed"], 0, "{f:#}");
    assert_eq!(f["jobs"], TICKETS as u64, "{f:#}");
    assert_eq!(f["parent"], PARENT, "{f:#}");
    assert!(f["failures"].as_array().is_none_or(Vec::is_empty), "{f:#}");
    let st = status_json(&c, &["--feed", CHILD, "--limit", "1000"]);
    for id in &deleted {
        let j = st["jobs"]
            .as_array()
            .expect("jobs")
            .iter()
            .find(|j| j["partition"] == id.as_str())
            .unwrap_or_else(|| panic!("{id} not in the status: {st:#}"));
        assert_eq!(j["phase"], "idle", "{j:#}");
        assert!(
            j["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("parent gone")),
            "{j:#}"
        );
    }
    let problems = delivery_problems(&down.comments());
    assert!(problems.is_empty(), "{}", first(&problems, 10));
    eprintln!(
        "children: deleted parents {deleted:?}: children idle with {:?}, {:?}",
        jobs[&deleted[0]].last_error,
        started.elapsed()
    );
}

/// While the children fan out: a worker crashes after publishing a page and
/// before committing it (failpoint), two workers are SIGKILLed, the links to
/// RabbitMQ and Redis are reset, and tickets are updated and inserted.
/// Every comment of the truth arrives, a repeat only with the same message
/// id; no job failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_workers_and_reset_links_during_the_fan_out_lose_nothing() {
    let started = Instant::now();
    const TICKETS: usize = 120;
    let mut c = Cluster::start(
        &main_feeds(),
        &["--records", &TICKETS.to_string(), "--latency-ms", "60"],
    );
    c.set_retry("{ max_attempts: 30, base_delay: 200ms }");
    let amqp_proxy = FaultProxy::start(host_port(&amqp_url())).await.unwrap();
    let redis_proxy = FaultProxy::start(host_port(&redis_url())).await.unwrap();
    c.env.extend([
        ("AMQP_URL".into(), amqp_proxy.url_for(&amqp_url())),
        ("REDIS_URL".into(), redis_proxy.url_for(&redis_url())),
        ("TIDEMARK_LEASE".into(), "4s".into()),
        ("TIDEMARK_QUEUE_LEASE".into(), "8s".into()),
    ]);
    let down = Downstream::start(&c.exchange()).await;
    c.coordinator_with("coord", &["--tick", "250ms"]);
    let w1 = c.worker("w1", &["--concurrency", "2"]);
    let w2 = c.worker("w2", &["--concurrency", "2"]);
    // Crashes at its 5th page, between the publish and the commit.
    let armed = c.worker_with_env(
        "w-after-publish",
        &["--concurrency", "2"],
        &[("FAILPOINTS", "worker::after_publish=4*off->return")],
    );
    let main = Scope::main();
    let first_truth = main.comments(&c).await;

    let fifth = first_truth.len() / 5;
    assert!(
        eventually(Duration::from_secs(60), async || down
            .comment_versions()
            .len()
            >= fifth)
        .await,
        "a fifth of the comments did not arrive ({}){}",
        down.comment_versions().len(),
        c.logs()
    );
    let at_fault = down.comment_versions().len();
    let crashed = tokio::task::block_in_place(|| c.procs[armed].wait(Duration::from_secs(30)));
    assert_eq!(
        crashed.and_then(|s| s.code()),
        Some(86),
        "the armed worker did not crash after a publish (is the binary built with the worker's \
         failpoints, by cargo test --workspace?){}",
        c.logs()
    );
    c.procs[w1].kill9();
    amqp_proxy.reset_all();
    c.worker("w3", &["--concurrency", "2"]);
    c.admin("/_admin/update?n=15", None).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    redis_proxy.reset_all();
    tokio::time::sleep(Duration::from_millis(700)).await;
    c.procs[w2].kill9();
    amqp_proxy.reset_all();
    redis_proxy.reset_all();
    c.worker("w4", &["--concurrency", "2"]);
    c.admin("/_admin/insert?n=5", None).await;
    let mid_fan_out = down.comment_versions().len();
    eprintln!(
        "children under faults: a worker crashed after a publish, w1 and w2 SIGKILLed, links reset, after {at_fault} of {} comments ({mid_fan_out} when done)",
        first_truth.len()
    );
    assert!(
        at_fault < first_truth.len(),
        "the fan-out was over before the faults: the test proves little"
    );

    wait_settled(
        &c,
        &down,
        std::slice::from_ref(&main),
        Duration::from_secs(90),
        "after the faults",
    )
    .await;
    let arrived = down.comments();
    let problems = delivery_problems(&arrived);
    assert!(problems.is_empty(), "{}", first(&problems, 10));
    let truth_versions = versions_of(&main.comments(&c).await);
    let jobs = child_jobs(&c, &main).await;
    assert_eq!(jobs.len(), TICKETS + 5, "one child job per ticket");
    let failed: Vec<(JobId, Checkpoint)> = c
        .jobs()
        .await
        .into_iter()
        .filter(|(_, cp)| cp.phase == Phase::Failed)
        .collect();
    assert!(failed.is_empty(), "failed jobs: {failed:?}");
    let resets = (amqp_proxy.counters().resets, redis_proxy.counters().resets);
    assert!(
        resets.0 > 0 && resets.1 > 0,
        "links reset (AMQP, Redis): {resets:?}"
    );
    for i in [0, 4, 5] {
        c.procs[i].check_alive().unwrap_or_else(|e| panic!("{e}"));
    }
    eprintln!(
        "children under faults: all {} comments arrived, {} messages ({} repeats, same message ids), \
         {resets:?} links reset, {:?}",
        truth_versions.len(),
        arrived.len(),
        arrived.len() - down.comment_versions().len(),
        started.elapsed()
    );
}

/// A child of a tenanted feed runs per tenant: its jobs are `T/<ticket>`,
/// its comments come from the tenant's API with its token, under
/// `ticket_comments.T.<ticket>` with x-tenant; an update of one tenant's
/// tickets runs only that tenant's children. (Cursor pagination, `page[after]`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn children_of_a_tenanted_feed_run_per_tenant() {
    let started = Instant::now();
    let tenants = ["ta".to_string(), "tb".to_string()];
    let feeds = format!(
        "{}{}",
        tidemark_tests::TENANT_FEED,
        child_feed(CHILD, "mock", Paging::Cursor, "snapshot", "")
    );
    let mut c = Cluster::start_tenanted(&feeds, &["--tenant-records", "25"], &tenants, "");
    let down = Downstream::start(&c.exchange()).await;
    c.coordinator_with("coord", &["--tick", "250ms"]);
    c.worker("w1", &[]);
    c.worker("w2", &[]);
    let scopes: Vec<Scope> = tenants.iter().map(|t| Scope::tenant(t)).collect();
    wait_settled(
        &c,
        &down,
        &scopes,
        Duration::from_secs(60),
        "both tenants' first walks",
    )
    .await;

    let all_jobs = c.jobs().await;
    for s in &scopes {
        let tickets = s.tickets(&c).await;
        let comments = s.comments(&c).await;
        assert!(
            comments
                .iter()
                .all(|m| tickets.iter().any(|t| t.id == m.ticket_id)),
            "{s:?}"
        );
        let want_jobs: BTreeSet<JobId> = tickets.iter().map(|t| s.job(&t.id)).collect();
        let got_jobs: BTreeSet<JobId> = all_jobs
            .iter()
            .filter(|(j, _)| j.feed == CHILD && s.owns(&j.partition))
            .map(|(j, _)| j.clone())
            .collect();
        assert_eq!(got_jobs, want_jobs, "{s:?}: one child job per ticket");
        let n = counts(&tickets, &comments);
        let want: BTreeMap<String, u64> = n.iter().map(|(id, k)| (id.clone(), pages(*k))).collect();
        let wrong = request_mismatches(&BTreeMap::new(), &s.requests(&c).await, &want);
        assert!(wrong.is_empty(), "{s:?}: comment requests: {wrong:?}");
        let got: BTreeSet<(String, String, String)> = down
            .comments()
            .into_iter()
            .filter(|g| g.record_tenant == s.0)
            .map(|g| (g.ticket_id, g.id, g.updated_at))
            .collect();
        assert_eq!(got, versions_of(&comments), "{s:?}: the tenant's comments");
    }
    let child_keys = all_jobs.iter().filter(|(j, _)| j.feed == CHILD).count();
    assert_eq!(child_keys, 50, "no child jobs outside the two tenants");
    // Every comment under its own tenant's key with x-tenant (and never untenanted).
    let arrived = down.comments();
    assert!(
        arrived.iter().all(|g| g.record_tenant.is_some()),
        "a comment without a tenant"
    );
    let problems = delivery_problems(&arrived);
    assert!(problems.is_empty(), "{}", first(&problems, 10));

    // One tenant's tickets change: only its children run.
    let requests_before: Vec<BTreeMap<String, u64>> = {
        let mut v = Vec::new();
        for s in &scopes {
            v.push(s.requests(&c).await);
        }
        v
    };
    let before = scopes[0].tickets(&c).await;
    c.admin_tenant(&tenants[0], "update?n=3").await;
    let after = scopes[0].tickets(&c).await;
    let changed: BTreeSet<String> = after
        .iter()
        .filter(|t| !before.contains(t))
        .map(|t| t.id.clone())
        .collect();
    assert_eq!(changed.len(), 3);
    wait_settled(
        &c,
        &down,
        &scopes,
        Duration::from_secs(45),
        "after ta's update",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let n = counts(&after, &scopes[0].comments(&c).await);
    let want: BTreeMap<String, u64> = changed
        .iter()
        .map(|id| (id.clone(), pages(n[id])))
        .collect();
    let wrong = request_mismatches(&requests_before[0], &scopes[0].requests(&c).await, &want);
    assert!(
        wrong.is_empty(),
        "ta's comment requests since its update: {wrong:?}"
    );
    let wrong = request_mismatches(
        &requests_before[1],
        &scopes[1].requests(&c).await,
        &BTreeMap::new(),
    );
    assert!(
        wrong.is_empty(),
        "tb's comments requested on ta's update: {wrong:?}"
    );
    let problems = delivery_problems(&down.comments());
    assert!(problems.is_empty(), "{}", first(&problems, 10));
    eprintln!(
        "children: two tenants, {} comments, {:?}",
        down.comment_versions().len(),
        started.elapsed()
    );
}

// ---------------------------------------------------------------- embedded

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// The comments written to a JSON Lines file: (ticket, id, updated_at) per
/// line; every line must be whole JSON.
fn file_comments(path: &Path) -> Vec<(String, String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .enumerate()
        .map(|(i, l)| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| {
                panic!(
                    "{}:{}: not whole JSON ({e}): {l:.80}",
                    path.display(),
                    i + 1
                )
            });
            let text = |k: &str| v[k].as_str().unwrap_or_default().to_string();
            (text("ticket_id"), text("id"), text("updated_at"))
        })
        .collect()
}

/// `tidemark status --json --state-dir D <extra>`, or nothing while the run
/// has not written its state yet.
fn embedded_status(state: &Path, extra: &[&str]) -> Option<serde_json::Value> {
    let dir = s(state);
    let mut args = vec!["status", "--json", "--state-dir", &dir];
    args.extend_from_slice(extra);
    let (code, out, _) = tidemark(&args, &[]);
    if code != 0 {
        return None;
    }
    serde_json::from_str(&out).ok()
}

/// Of an embedded run: what keeps `feed` (a child feed) from having settled
/// with `tickets` child jobs and every comment of `want` in `file`.
fn embedded_outstanding(
    state: &Path,
    feed: &str,
    tickets: usize,
    file: &Path,
    want: &BTreeSet<(String, String, String)>,
) -> Vec<String> {
    let mut out = Vec::new();
    let written: HashSet<(String, String, String)> = file_comments(file).into_iter().collect();
    let missing = want.iter().filter(|v| !written.contains(*v)).count();
    if missing > 0 {
        out.push(format!(
            "{missing} comments not written to {}",
            file.display()
        ));
    }
    match embedded_status(state, &["--feed", feed, "--limit", "1000"]) {
        None => out.push("no status yet".into()),
        Some(st) => {
            let jobs = st["jobs"].as_array().cloned().unwrap_or_default();
            if jobs.len() != tickets {
                out.push(format!("{} child jobs, {tickets} tickets", jobs.len()));
            }
            for j in jobs {
                let ok = j["phase"] == "idle"
                    && j["pages"].as_u64() > Some(0)
                    // Never due: no next due time (or one beyond a day).
                    && (j["next_due_in_secs"].is_null()
                        || j["next_due_in_secs"]
                            .as_f64()
                            .is_some_and(|d| d * 1000.0 > NOT_DUE_MS as f64));
                if !ok {
                    out.push(format!("not settled: {j}"));
                }
            }
        }
    }
    out
}

/// Start `tidemark run` over the config of `c` (the mock's tickets and
/// their comments); wait until its first walk has settled.
async fn embedded_first_walk(
    c: &Cluster,
    feed: &str,
    tickets: usize,
) -> (tidemark_tests::Proc, std::path::PathBuf, std::path::PathBuf) {
    let state = c.dir.path().join("state");
    let out = c.dir.path().join("out");
    let args = [
        "run",
        "--config",
        &s(&c.config),
        "--state-dir",
        &s(&state),
        "--out",
        &s(&out),
        "--tick",
        "200ms",
    ];
    let run = spawn("run", &args, &[], c.dir.path(), "tidemark run:");
    let file = out.join(format!("{feed}.jsonl"));
    let want = versions_of(&Scope::main().comments(c).await);
    let ok = eventually(Duration::from_secs(60), async || {
        embedded_outstanding(&state, feed, tickets, &file, &want).is_empty()
    })
    .await;
    assert!(
        ok,
        "the embedded first walk did not settle: {}\n{}",
        first(
            &embedded_outstanding(&state, feed, tickets, &file, &want),
            10
        ),
        run.log_tail(30)
    );
    (run, state, file)
}

/// `tidemark run` with a parent and a child feed writes every comment to
/// `<out>/ticket_comments.jsonl`; after an update, the changed tickets'
/// children walk again (every page) and the others are not asked again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_run_writes_every_comment_to_the_child_feeds_file() {
    let started = Instant::now();
    const TICKETS: usize = 40;
    let feeds = format!(
        "{}{}",
        parent_feed("mock", 20, "1s"),
        child_feed(CHILD, "mock", Paging::NextUrl, "snapshot", "")
    );
    let c = Cluster::start(&feeds, &["--records", &TICKETS.to_string()]);
    let main = Scope::main();
    let (mut run, state, file) = embedded_first_walk(&c, CHILD, TICKETS).await;

    let tickets = main.tickets(&c).await;
    let comments = main.comments(&c).await;
    let written = file_comments(&file);
    let distinct: BTreeSet<(String, String, String)> = written.iter().cloned().collect();
    assert_eq!(
        distinct,
        versions_of(&comments),
        "the file holds exactly the truth's comments"
    );
    assert_eq!(
        written.len(),
        distinct.len(),
        "comments written twice in the first walk"
    );
    let n = counts(&tickets, &comments);
    let want: BTreeMap<String, u64> = n.iter().map(|(id, k)| (id.clone(), pages(*k))).collect();
    let wrong = request_mismatches(&BTreeMap::new(), &main.requests(&c).await, &want);
    assert!(
        wrong.is_empty(),
        "comment requests (ticket, requested, pages): {wrong:?}"
    );
    let st = embedded_status(&state, &[]).expect("status");
    let f = feed_summary(&st, CHILD);
    assert_eq!(f["parent"], PARENT, "{f:#}");
    assert_eq!(f["jobs"], TICKETS as u64, "{f:#}");
    assert_eq!(f["failed"], 0, "{f:#}");
    let tickets_file = file.with_file_name(format!("{PARENT}.jsonl"));
    assert!(tickets_file.exists(), "the parent's own file");

    // An update: the changed tickets' children run again, no other.
    let requests_before = main.requests(&c).await;
    c.admin("/_admin/update?n=4", None).await;
    let after = main.tickets(&c).await;
    let changed: BTreeSet<String> = after
        .iter()
        .filter(|t| !tickets.contains(t))
        .map(|t| t.id.clone())
        .collect();
    assert_eq!(changed.len(), 4);
    let comments_after = main.comments(&c).await;
    let want_after = versions_of(&comments_after);
    let ok = eventually(Duration::from_secs(30), async || {
        embedded_outstanding(&state, CHILD, TICKETS, &file, &want_after).is_empty()
    })
    .await;
    assert!(
        ok,
        "the update was not synced: {}\n{}",
        first(
            &embedded_outstanding(&state, CHILD, TICKETS, &file, &want_after),
            10
        ),
        run.log_tail(30)
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let n = counts(&after, &comments_after);
    let want: BTreeMap<String, u64> = changed
        .iter()
        .map(|id| (id.clone(), pages(n[id])))
        .collect();
    let wrong = request_mismatches(&requests_before, &main.requests(&c).await, &want);
    assert!(
        wrong.is_empty(),
        "comment requests since the update: {wrong:?}"
    );
    // The unchanged tickets' comments were written once.
    let mut times: HashMap<(String, String, String), usize> = HashMap::new();
    for v in file_comments(&file) {
        *times.entry(v).or_insert(0) += 1;
    }
    let twice: Vec<_> = times
        .iter()
        .filter(|(v, k)| **k > 1 && !changed.contains(&v.0))
        .collect();
    assert!(
        twice.is_empty(),
        "unchanged tickets' comments written again: {twice:?}"
    );

    let st = tokio::task::block_in_place(|| run.term(Duration::from_secs(30)));
    assert!(
        st.is_some_and(|s| s.success()),
        "{st:?}: {}",
        run.log_tail(20)
    );
    eprintln!(
        "children: embedded: {} comments written, {:?}",
        times.len(),
        started.elapsed()
    );
}

/// An incremental child keeps its own cursor: when its ticket changes it
/// asks only for what follows (one request for the one new comment), and
/// writes each comment once. (Embedded, cursor pagination.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incremental_child_continues_from_its_cursor() {
    let started = Instant::now();
    const TICKETS: usize = 30;
    let feeds = format!(
        "{}{}",
        parent_feed("mock", 20, "1s"),
        child_feed(CHILD, "mock", Paging::Cursor, "incremental", "")
    );
    let c = Cluster::start(&feeds, &["--records", &TICKETS.to_string()]);
    let main = Scope::main();
    let (mut run, state, file) = embedded_first_walk(&c, CHILD, TICKETS).await;
    let tickets = main.tickets(&c).await;
    let n = counts(&tickets, &main.comments(&c).await);
    let want: BTreeMap<String, u64> = n.iter().map(|(id, k)| (id.clone(), pages(*k))).collect();
    let wrong = request_mismatches(&BTreeMap::new(), &main.requests(&c).await, &want);
    assert!(wrong.is_empty(), "first walk: comment requests: {wrong:?}");

    let requests_before = main.requests(&c).await;
    c.admin("/_admin/update?n=4", None).await;
    let after = main.tickets(&c).await;
    let changed: BTreeSet<String> = after
        .iter()
        .filter(|t| !tickets.contains(t))
        .map(|t| t.id.clone())
        .collect();
    let want_after = versions_of(&main.comments(&c).await);
    let ok = eventually(Duration::from_secs(30), async || {
        embedded_outstanding(&state, CHILD, TICKETS, &file, &want_after).is_empty()
    })
    .await;
    assert!(
        ok,
        "the update was not synced: {}\n{}",
        first(
            &embedded_outstanding(&state, CHILD, TICKETS, &file, &want_after),
            10
        ),
        run.log_tail(30)
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let want: BTreeMap<String, u64> = changed.iter().map(|id| (id.clone(), 1)).collect();
    let wrong = request_mismatches(&requests_before, &main.requests(&c).await, &want);
    assert!(
        wrong.is_empty(),
        "comment requests since the update (one each for the changed, from their cursors): {wrong:?}"
    );
    let written = file_comments(&file);
    let distinct: BTreeSet<(String, String, String)> = written.iter().cloned().collect();
    assert_eq!(
        distinct, want_after,
        "the file holds exactly the truth's comments"
    );
    assert_eq!(
        written.len(),
        distinct.len(),
        "an incremental child wrote comments again"
    );
    let st = tokio::task::block_in_place(|| run.term(Duration::from_secs(30)));
    assert!(
        st.is_some_and(|s| s.success()),
        "{st:?}: {}",
        run.log_tail(20)
    );
    eprintln!(
        "children: incremental child: {} comments, {:?}",
        written.len(),
        started.elapsed()
    );
}

// ---------------------------------------------------------------- batches

/// A batched child feed of `tickets`: the mock's batch endpoint, `{ids}` the
/// keys of up to `size` changed tickets, two batches at a time.
fn batched_child_feed(size: usize) -> String {
    format!(
        r#"  - name: {CHILD}
    source: mock
    parent: {{ feed: {PARENT}, batch: {{ size: {size}, parent_key: /ticket_id, parallel: 2 }} }}
    path: /api/v2/comments
    params: {{ ticket_ids: "{{ids}}", "page[size]": "{PAGE}" }}
    records: /comments
    pagination: {{ next_url: /links/next }}
    key: /id
    version: /updated_at
    mode: snapshot
"#
    )
}

/// Per ticket, the batch requests that named it.
async fn batch_requests(c: &Cluster) -> BTreeMap<String, u64> {
    serde_json::from_value(c.stats().await["batch_comment_requests_by_ticket"].clone())
        .expect("batch_comment_requests_by_ticket")
}

/// Comment messages that arrived, per ticket (by the record's ticket_id).
fn messages_per_ticket(down: &Downstream) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for g in down.comments() {
        *m.entry(g.ticket_id).or_insert(0) += 1;
    }
    m
}

/// Wait until every comment of the truth has arrived (ticket, id, version).
async fn wait_for_truth(c: &Cluster, down: &Downstream, what: &str) -> Vec<CommentTruth> {
    let main = Scope::main();
    let mut truth = Vec::new();
    let done = eventually(Duration::from_secs(60), async || {
        truth = main.comments(c).await;
        let got: HashSet<(String, String, String)> = down
            .comments()
            .into_iter()
            .map(|g| (g.ticket_id, g.id, g.updated_at))
            .collect();
        versions_of(&truth).iter().all(|v| got.contains(v))
    })
    .await;
    assert!(done, "{what}: not every comment arrived");
    truth
}

/// Tickets in batches of 7 through the batch endpoint: every comment
/// arrives once per version with x-parent-key its own ticket (read from the
/// record) and an id per ticket; after 10 tickets change, only batches
/// naming those 10 are asked for, and only their comments are published
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batched_child_feed_asks_for_many_parents_at_once() {
    let started = Instant::now();
    let feeds = format!("{}{}", parent_feed("mock", 20, "2s"), batched_child_feed(7));
    let (c, down) = start_main(&feeds, &["--records", "60"]).await;
    let main = Scope::main();
    let tickets = main.tickets(&c).await;
    let truth = wait_for_truth(&c, &down, "the first walk").await;

    // Every ticket was named by a batch request; far fewer requests than tickets.
    let named = batch_requests(&c).await;
    assert_eq!(
        named.keys().cloned().collect::<BTreeSet<_>>(),
        tickets
            .iter()
            .map(|t| t.id.clone())
            .collect::<BTreeSet<_>>(),
        "every ticket asked for in some batch"
    );
    assert!(
        requests_by_ticket(&c).await.is_empty(),
        "no ticket asked for alone"
    );
    // Headers name each record's own parent; one message id per version.
    let arrived = down.comments();
    let mut ids: HashMap<(String, String, String), BTreeSet<String>> = HashMap::new();
    for g in &arrived {
        assert_eq!(
            g.headers.get("x-parent-feed").map(String::as_str),
            Some(PARENT),
            "{g:?}"
        );
        assert_eq!(g.headers.get("x-parent-key"), Some(&g.ticket_id), "{g:?}");
        ids.entry((g.ticket_id.clone(), g.id.clone(), g.updated_at.clone()))
            .or_default()
            .insert(g.message_id.clone());
    }
    let split: Vec<_> = ids.iter().filter(|(_, m)| m.len() > 1).collect();
    assert!(
        split.is_empty(),
        "versions under two message ids: {split:?}"
    );
    assert_eq!(ids.len(), truth.len(), "exactly the truth's comments");

    // The slots wait for the next changed tickets.
    let st = status_json(&c, &["--feed", CHILD]);
    let f = feed_summary(&st, CHILD);
    assert_eq!(
        (f["failed"].as_u64(), f["running"].as_u64()),
        (Some(0), Some(0)),
        "{f:#}"
    );

    // 10 tickets change: only batches naming them are asked for.
    let before = main.tickets(&c).await;
    let named_before = batch_requests(&c).await;
    let messages_before = messages_per_ticket(&down);
    c.admin("/_admin/update?n=10", None).await;
    let after = main.tickets(&c).await;
    let changed: BTreeSet<String> = after
        .iter()
        .filter(|t| !before.contains(t))
        .map(|t| t.id.clone())
        .collect();
    assert_eq!(changed.len(), 10);
    wait_for_truth(&c, &down, "after the update").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let named_again: BTreeSet<String> = batch_requests(&c)
        .await
        .into_iter()
        .filter(|(id, n)| *n > named_before.get(id).copied().unwrap_or(0))
        .map(|(id, _)| id)
        .collect();
    assert_eq!(
        named_again, changed,
        "batches named exactly the changed tickets"
    );
    let republished: Vec<_> = messages_per_ticket(&down)
        .into_iter()
        .filter(|(id, n)| !changed.contains(id) && messages_before.get(id) != Some(n))
        .collect();
    assert!(
        republished.is_empty(),
        "unchanged tickets published again: {republished:?}"
    );
    eprintln!(
        "children: batches of 7: {} tickets, {} comments, then 10 changed re-read, {:?}",
        tickets.len(),
        truth.len(),
        started.elapsed()
    );
}

/// `tidemark run --once` with a parent and a child feed ends once every
/// child has run, with every comment written; a second `--once` after 5
/// tickets changed asks only for those 5 tickets' comments (a child that
/// waits for its parent is not walked again just because the run is new).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_once_walks_the_children_that_changed_and_ends() {
    const TICKETS: usize = 30;
    let feeds = format!(
        "{}{}",
        parent_feed("mock", 20, "1h"),
        child_feed(CHILD, "mock", Paging::NextUrl, "snapshot", "")
    );
    let c = Cluster::start(&feeds, &["--records", &TICKETS.to_string()]);
    let main = Scope::main();
    let state = c.dir.path().join("state");
    let out = c.dir.path().join("out");
    // One `run --once`, killed (and the test failed) if it does not end.
    let once = |what: &str| {
        let args = [
            "run",
            "--config",
            &s(&c.config),
            "--state-dir",
            &s(&state),
            "--out",
            &s(&out),
            "--tick",
            "200ms",
            "--once",
        ];
        let mut run = spawn("run", &args, &[], c.dir.path(), "tidemark run:");
        let ended = tokio::task::block_in_place(|| run.wait(Duration::from_secs(60)));
        assert!(
            ended.is_some_and(|st| st.success()),
            "{what}: `run --once` did not end well ({ended:?})\n{}",
            run.log_tail(30)
        );
    };
    once("the first run");
    let file = out.join(format!("{CHILD}.jsonl"));
    let written: BTreeSet<_> = file_comments(&file).into_iter().collect();
    assert_eq!(
        written,
        versions_of(&main.comments(&c).await),
        "every comment written"
    );

    let before = main.tickets(&c).await;
    let requests_before = main.requests(&c).await;
    c.admin("/_admin/update?n=5", None).await;
    let after = main.tickets(&c).await;
    let changed: BTreeSet<String> = after
        .iter()
        .filter(|t| !before.contains(t))
        .map(|t| t.id.clone())
        .collect();
    once("the run after the update");
    let comments = main.comments(&c).await;
    let n = counts(&after, &comments);
    let want: BTreeMap<String, u64> = n
        .iter()
        .filter(|(id, _)| changed.contains(*id))
        .map(|(id, k)| (id.clone(), pages(*k)))
        .collect();
    let wrong = request_mismatches(&requests_before, &main.requests(&c).await, &want);
    assert!(
        wrong.is_empty(),
        "requests since the update (ticket, got, want): {wrong:?}"
    );
    let written: BTreeSet<_> = file_comments(&file).into_iter().collect();
    assert_eq!(
        written,
        versions_of(&comments),
        "the new comments written too"
    );
}
