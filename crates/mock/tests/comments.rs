//! Child records over HTTP: each ticket's comments at
//! `/api/v2/tickets/{id}/comments` and in batches at `/api/v2/comments`,
//! walked to the end against `/_truth/comments`; updates add exactly one
//! comment, deleted tickets answer 404, tenants keep their prefix, the
//! fixed-count knob and the per-ticket request counts.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde_json::Value;
use tidemark_mock::{
    CommentTruth, CommentsConfig, CommentsTruth, MockConfig, MockServer, tenant_token,
};

async fn start(cfg: MockConfig) -> MockServer {
    MockServer::start(cfg, SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap()
}

fn config(records: usize) -> MockConfig {
    MockConfig {
        records,
        tenant_records: records,
        record_bytes: 120,
        ..MockConfig::default()
    }
}

fn id_of(seq: u64) -> String {
    format!("00000000-0000-0000-0000-{seq:012}")
}

async fn get(url: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = reqwest::Client::new().get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let body = r.bytes().await.unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// Follow `links.next` from `url` to the end; every next URL must start
/// with `prefix`. Returns the comments and the number of pages.
async fn walk(url: &str, prefix: &str, token: Option<&str>) -> (Vec<Value>, usize) {
    let mut url = url.to_string();
    let mut comments = Vec::new();
    for pages in 1..=100 {
        let (status, page) = get(&url, token).await;
        assert_eq!(status, 200, "{url}: {page}");
        let got = page["comments"].as_array().unwrap();
        comments.extend(got.iter().cloned());
        let more = page["meta"]["has_more"].as_bool().unwrap();
        assert!(page["meta"]["after_cursor"].is_string(), "{page}");
        match page["links"]["next"].as_str() {
            Some(next) => {
                assert!(more, "a next link without has_more: {page}");
                assert!(!got.is_empty(), "an empty page that claims more");
                assert!(
                    next.starts_with(prefix),
                    "{next} does not start with {prefix}"
                );
                url = next.to_string();
            }
            None => {
                assert!(!more, "has_more without a next link: {page}");
                return (comments, pages);
            }
        }
    }
    panic!("{url}: the walk did not end");
}

/// A ticket's comments, walked from the first page.
async fn ticket_comments(base: &str, id: &str) -> (Vec<Value>, usize) {
    let path = format!("{base}/api/v2/tickets/{id}/comments");
    walk(&path, &format!("{path}?"), None).await
}

fn truth_of(comments: &[Value]) -> Vec<CommentTruth> {
    comments
        .iter()
        .map(|c| CommentTruth {
            ticket_id: c["ticket_id"].as_str().unwrap().to_string(),
            id: c["id"].as_str().unwrap().to_string(),
            updated_at: c["updated_at"].as_str().unwrap().to_string(),
        })
        .collect()
}

fn of_ticket(truth: &CommentsTruth, id: &str) -> Vec<CommentTruth> {
    truth
        .comments
        .iter()
        .filter(|c| c.ticket_id == id)
        .cloned()
        .collect()
}

#[tokio::test]
async fn walking_each_tickets_comments_returns_exactly_its_truth() {
    let m = start(config(40)).await;
    let base = m.base_url();
    let (status, truth) = get(&format!("{base}/_truth/comments"), None).await;
    assert_eq!(status, 200);
    let truth: CommentsTruth = serde_json::from_value(truth).unwrap();
    let tickets = m.state().truth();
    let mut by_pages: BTreeMap<usize, usize> = BTreeMap::new();
    let mut walked = Vec::new();
    for t in &tickets.records {
        let (comments, pages) = ticket_comments(&base, &t.id).await;
        assert_eq!(truth_of(&comments), of_ticket(&truth, &t.id), "{}", t.id);
        for (n, c) in comments.iter().enumerate() {
            assert_eq!(c["id"], format!("{}-c{}", t.id, n + 1));
            assert_eq!(c["ticket_id"], t.id.as_str());
            assert_eq!(c["created_at"], c["updated_at"]);
            assert!(c["updated_at"].as_str().unwrap() <= t.updated_at.as_str());
            assert!(c["body"].as_str().is_some_and(|b| !b.is_empty()));
            assert!(c.get("tenant").is_none());
        }
        let full_pages = comments.len().div_ceil(5);
        assert_eq!(pages, full_pages.max(1), "{}: default page size 5", t.id);
        *by_pages.entry(full_pages).or_default() += 1;
        walked.extend(comments);
    }
    assert_eq!(truth_of(&walked), truth.comments, "tickets in id order");
    assert_eq!(truth.comments, m.state().comments_truth().comments);
    for (pages, what) in [
        (0, "none"),
        (1, "one page"),
        (2, "two pages"),
        (5, "five pages"),
    ] {
        assert!(
            by_pages.get(&pages).is_some_and(|&k| k >= 4),
            "tickets with {what} of comments: {by_pages:?}"
        );
    }
    // The same config serves the same comments.
    let other = start(config(40)).await;
    let id = &tickets.records[6].id;
    assert_eq!(
        ticket_comments(&other.base_url(), id).await.0,
        ticket_comments(&base, id).await.0
    );
    other.shutdown().await;
    m.shutdown().await;
}

#[tokio::test]
async fn an_update_adds_exactly_one_comment_to_that_ticket() {
    let m = start(config(12)).await;
    let base = m.base_url();
    let before_tickets = m.state().truth();
    let mut before = BTreeMap::new();
    for t in &before_tickets.records {
        before.insert(t.id.clone(), ticket_comments(&base, &t.id).await.0);
    }
    // A poller's cursor at the end of one ticket's comments.
    let watched = &before_tickets.records[3].id;
    let (_, last) = get(
        &format!("{base}/api/v2/tickets/{watched}/comments?page[size]=100"),
        None,
    )
    .await;
    let poll_cursor = last["meta"]["after_cursor"].as_str().unwrap().to_string();

    let r = reqwest::Client::new()
        .post(format!("{base}/_admin/update?n=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let after_tickets = m.state().truth();
    let changed: Vec<_> = after_tickets
        .records
        .iter()
        .filter(|t| !before_tickets.records.contains(t))
        .collect();
    assert_eq!(changed.len(), 1, "{changed:?}");
    let changed = changed[0];
    for t in &after_tickets.records {
        let now = ticket_comments(&base, &t.id).await.0;
        let old = &before[&t.id];
        if t.id == changed.id {
            assert_eq!(now.len(), old.len() + 1, "{}", t.id);
            assert_eq!(&now[..old.len()], &old[..], "old comments are unchanged");
            let new = &now[old.len()];
            assert_eq!(new["id"], format!("{}-c{}", t.id, old.len() + 1));
            assert_eq!(new["updated_at"], t.updated_at.as_str());
        } else {
            assert_eq!(&now, old, "{} was not updated", t.id);
        }
    }
    // In process too: update the watched ticket until it changes.
    let s = m.state();
    let mut updates = 0;
    while s.truth().records[3] == after_tickets.records[3] {
        s.update(1);
        updates += 1;
        assert!(updates <= 24, "every ticket is updated once per 12 updates");
    }
    let (_, polled) = get(
        &format!("{base}/api/v2/tickets/{watched}/comments?page[after]={poll_cursor}"),
        None,
    )
    .await;
    let polled = polled["comments"].as_array().unwrap();
    let expected = if changed.id == *watched { 2 } else { 1 };
    assert_eq!(polled.len(), expected, "polling the old cursor: {polled:?}");
    assert_eq!(
        of_ticket(&s.comments_truth(), watched).len(),
        before[watched].len() + expected
    );
    m.shutdown().await;
}

#[tokio::test]
async fn deleted_tickets_answer_404_and_leave_the_truth() {
    let m = start(config(10)).await;
    let base = m.base_url();
    let r: Value = reqwest::Client::new()
        .post(format!("{base}/_admin/delete?n=2"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["deleted"], 2);
    assert_eq!(r["ids"], serde_json::json!([id_of(1), id_of(2)]));
    let gone = m.state().delete(1);
    assert_eq!(gone, [id_of(3)]);
    for id in [id_of(1), id_of(2), id_of(3), id_of(99), "nope".to_string()] {
        let (status, err) = get(&format!("{base}/api/v2/tickets/{id}/comments"), None).await;
        assert_eq!(status, 404, "{id}");
        assert_eq!(err["error"], "not_found");
        assert_eq!(err["description"], format!("no ticket {id}"));
    }
    let (status, _) = get(
        &format!("{base}/api/v2/tickets/{}/comments", id_of(4)),
        None,
    )
    .await;
    assert_eq!(status, 200, "the next ticket is still there");
    let truth = m.state().truth();
    assert_eq!(truth.records.len(), 7);
    assert!(truth.records.iter().all(|r| r.id > id_of(3)));
    assert_eq!(truth.deleted, [id_of(1), id_of(2), id_of(3)]);
    assert_eq!(
        truth.versions.len(),
        10,
        "versions keep the deleted history"
    );
    let (_, paged) = get(&format!("{base}/paged/records"), None).await;
    assert_eq!(paged["total_count"], 7);
    let comments = m.state().comments_truth();
    assert!(comments.comments.iter().all(|c| c.ticket_id > id_of(3)));
    // Updates never bring a deleted ticket back.
    m.state().update(20);
    assert_eq!(m.state().len(), 7);
    let (status, _) = get(
        &format!("{base}/api/v2/tickets/{}/comments", id_of(1)),
        None,
    )
    .await;
    assert_eq!(status, 404);
    // Per tenant.
    let r = reqwest::Client::new()
        .post(format!("{base}/_admin/tenants/acme/delete?n=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (status, _) = get(
        &format!("{base}/t/acme/api/v2/tickets/{}/comments", id_of(1)),
        Some(&tenant_token("acme")),
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(m.state().delete_tenant("acme", 1), [id_of(2)]);
    assert_eq!(m.state().tenant_truth("acme").records.len(), 8);
    m.shutdown().await;
}

#[tokio::test]
async fn the_batch_endpoint_returns_the_union_in_ticket_order() {
    let m = start(config(40)).await;
    let base = m.base_url();
    let truth = m.state().comments_truth();
    let order = [7, 2, 19, 7, 999, 1, 13, 40, 33];
    let ids: Vec<String> = order.iter().map(|&i| id_of(i)).collect();
    let url = format!(
        "{base}/api/v2/comments?ticket_ids={}&page[size]=7",
        ids.join(",")
    );
    let (comments, pages) = walk(&url, &format!("{base}/api/v2/comments?"), None).await;
    let mut expected = Vec::new();
    for i in [7, 2, 19, 1, 13, 40, 33] {
        expected.extend(of_ticket(&truth, &id_of(i)));
    }
    assert!(
        expected.len() > 14,
        "the walk spans pages: {}",
        expected.len()
    );
    assert_eq!(truth_of(&comments), expected);
    assert_eq!(pages, expected.len().div_ceil(7));

    // Errors: no ids, more than 100, a bad size or cursor.
    let many: Vec<String> = (1..=101).map(id_of).collect();
    for bad in [
        "/api/v2/comments".to_string(),
        "/api/v2/comments?ticket_ids=,".to_string(),
        format!("/api/v2/comments?ticket_ids={}", many.join(",")),
        format!("/api/v2/comments?ticket_ids={}&page[size]=0", id_of(1)),
        format!("/api/v2/comments?ticket_ids={}&page[size]=x", id_of(1)),
        format!("/api/v2/comments?ticket_ids={}&page[after]=!!", id_of(1)),
        format!("/api/v2/tickets/{}/comments?page[after]=!!", id_of(1)),
    ] {
        let (status, err) = get(&format!("{base}{bad}"), None).await;
        assert_eq!(
            (status, err["error"].as_str()),
            (400, Some("invalid_request")),
            "{bad}"
        );
    }
    let (status, _) = get(
        &format!(
            "{base}/api/v2/comments?ticket_ids={}",
            many[..100].join(",")
        ),
        None,
    )
    .await;
    assert_eq!(status, 200, "100 ids are fine");
    m.shutdown().await;
}

#[tokio::test]
async fn a_tenants_comments_and_next_urls_keep_its_prefix() {
    let m = start(config(40)).await;
    let base = m.base_url();
    let token = tenant_token("acme");
    let (status, truth) = get(&format!("{base}/_truth/comments?tenant=acme"), None).await;
    assert_eq!(status, 200);
    let truth: CommentsTruth = serde_json::from_value(truth).unwrap();
    assert_eq!(
        truth.comments,
        m.state().tenant_comments_truth("acme").comments
    );
    // A ticket with many pages of comments.
    let many = m
        .state()
        .tenant_truth("acme")
        .records
        .iter()
        .map(|r| r.id.clone())
        .find(|id| of_ticket(&truth, id).len() > 20)
        .expect("a ticket with five pages");
    let path = format!("{base}/t/acme/api/v2/tickets/{many}/comments");
    let (comments, pages) = walk(&path, &format!("{path}?"), Some(&token)).await;
    assert_eq!(pages, 5);
    assert_eq!(truth_of(&comments), of_ticket(&truth, &many));
    assert!(comments.iter().all(|c| c["tenant"] == "acme"));
    // The batch endpoint too.
    let url = format!(
        "{base}/t/acme/api/v2/comments?ticket_ids={many},{}&page[size]=4",
        id_of(1)
    );
    let (batch, pages) = walk(
        &url,
        &format!("{base}/t/acme/api/v2/comments?"),
        Some(&token),
    )
    .await;
    assert!(pages > 1);
    let mut expected = of_ticket(&truth, &many);
    expected.extend(of_ticket(&truth, &id_of(1)));
    assert_eq!(truth_of(&batch), expected);
    // Without the token: 401, like every tenant endpoint.
    assert_eq!(get(&path, None).await.0, 401);
    let (status, _) = get(&format!("{base}/_truth/comments?tenant=NO"), None).await;
    assert_eq!(status, 400);
    m.shutdown().await;
}

#[tokio::test]
async fn the_fixed_count_gives_exactly_n_per_ticket() {
    let cfg = MockConfig {
        comments: CommentsConfig {
            fixed_per_ticket: Some(10),
            ..CommentsConfig::default()
        },
        ..config(30)
    };
    let m = start(cfg).await;
    let base = m.base_url();
    for t in m.state().truth().records {
        let (comments, pages) = ticket_comments(&base, &t.id).await;
        assert_eq!((comments.len(), pages), (10, 2), "{}", t.id);
    }
    assert_eq!(m.state().comments_truth().comments.len(), 300);
    m.shutdown().await;

    // 100,000 parents with two pages each stay cheap: nothing is stored.
    let m = start(MockConfig {
        records: 100_000,
        record_bytes: 60,
        comments: CommentsConfig {
            page_size: 5,
            max_per_ticket: 25,
            fixed_per_ticket: Some(10),
        },
        ..MockConfig::default()
    })
    .await;
    let base = m.base_url();
    for seq in [1, 54_321, 100_000] {
        let (comments, pages) = ticket_comments(&base, &id_of(seq)).await;
        assert_eq!((comments.len(), pages), (10, 2), "{seq}");
        assert_eq!(comments[9]["id"], format!("{}-c10", id_of(seq)));
    }
    let (status, _) = get(
        &format!("{base}/api/v2/tickets/{}/comments", id_of(100_001)),
        None,
    )
    .await;
    assert_eq!(status, 404);
    m.shutdown().await;
}

#[tokio::test]
async fn stats_count_child_requests_per_ticket() {
    let m = start(config(40)).await;
    let base = m.base_url();
    let truth = m.state().comments_truth();
    let two_pages = (1..=40)
        .map(id_of)
        .find(|id| (6..=10).contains(&of_ticket(&truth, id).len()))
        .unwrap();
    assert_eq!(ticket_comments(&base, &two_pages).await.1, 2);
    assert_eq!(ticket_comments(&base, &id_of(1)).await.1, 1);
    assert_eq!(
        get(
            &format!("{base}/api/v2/tickets/{}/comments", id_of(77)),
            None
        )
        .await
        .0,
        404
    );
    get(
        &format!("{base}/api/v2/comments?ticket_ids={}", id_of(1)),
        None,
    )
    .await;
    get(&format!("{base}/paged/records"), None).await;
    get(
        &format!("{base}/t/acme/api/v2/tickets/{}/comments", id_of(1)),
        Some(&tenant_token("acme")),
    )
    .await;
    let (_, stats) = get(&format!("{base}/_stats"), None).await;
    assert_eq!(stats["requests"], 7);
    assert_eq!(stats["comment_requests"], 6, "all but /paged/records");
    let mut want = serde_json::Map::new();
    want.insert(two_pages.clone(), 2.into());
    want.insert(id_of(1), 1.into());
    want.insert(id_of(77), 1.into());
    want.insert(format!("acme/{}", id_of(1)), 1.into());
    assert_eq!(stats["comment_requests_by_ticket"], Value::Object(want));
    let s = m.state().stats();
    assert_eq!(s.comment_requests, 6);
    assert_eq!(s.comment_requests_by_ticket.get(&two_pages), Some(&2));
    m.shutdown().await;
}
