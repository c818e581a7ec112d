//! The mock's endpoints that the pull suites do not walk: seed 002's
//! page-based incremental endpoint, seed 001's last page without `Next`,
//! hidden newest records, admin mutations and Host-based absolute URLs.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tidemark_mock::{Faults, MockConfig, MockServer};

async fn start(records: usize, hide_newest: Duration) -> MockServer {
    let cfg = MockConfig {
        records,
        hide_newest,
        ..MockConfig::default()
    };
    MockServer::start(cfg, SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap()
}

async fn get(url: &str) -> (u16, Value, reqwest::header::HeaderMap) {
    let r = reqwest::get(url).await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (
        status,
        serde_json::from_slice(&r.bytes().await.unwrap()).unwrap_or(Value::Null),
        headers,
    )
}

fn ids(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn seed_002_page_based_incremental_after_updates() {
    let m = start(10, Duration::ZERO).await;
    let base = m.base_url();
    let path = format!("{base}/v2/clients/abc/inspections");
    let (_, all, _) = get(&format!("{path}?page=1&limit=4")).await;
    assert_eq!(all["meta"]["total"], 10);
    assert_eq!(all["meta"]["totalPages"], 3);
    m.state().update(2);
    m.state().insert(1);
    let since = chrono::Utc::now() - chrono::Duration::seconds(5);
    let since = since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let (_, changed, _) = get(&format!("{path}?updatedSince={since}&page=1&limit=2")).await;
    assert_eq!(
        changed["meta"]["total"], 3,
        "two updates and one insert since T0"
    );
    let (_, p2, _) = get(&format!("{path}?updatedSince={since}&page=2&limit=2")).await;
    assert_eq!(ids(&p2["data"]), [tidemark_mock_id(11)]);
    let (_, p3, _) = get(&format!("{path}?updatedSince={since}&page=3&limit=2")).await;
    assert!(p3["data"].as_array().unwrap().is_empty());
    let (status, err, _) = get(&format!("{path}?paginationMode=SIDEWAYS")).await;
    assert_eq!(
        (status, err["error"].as_str()),
        (400, Some("invalid_request"))
    );
    m.shutdown().await;
}

fn tidemark_mock_id(seq: u64) -> String {
    format!("00000000-0000-0000-0000-{seq:012}")
}

#[tokio::test]
async fn seed_001_last_page_has_an_empty_or_no_next() {
    let m = start(5, Duration::ZERO).await;
    let base = m.base_url();
    let (_, p, _) = get(&format!("{base}/v1/events?limit=5")).await;
    assert_eq!(p["Cursors"]["Next"], "");
    assert!(
        p["Links"]["Self"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{base}/v1/events?"))
    );
    let (_, p, _) = get(&format!("{base}/v1/events?limit=5&omit_next=1")).await;
    assert!(p["Cursors"].get("Next").is_none());
    // Polling from the last page's Self serves that page again plus anything new.
    let this = p["Cursors"]["Self"].as_str().unwrap().to_string();
    m.state().insert(1);
    let (_, again, _) = get(&format!("{base}/v1/events?limit=10&cursor={this}")).await;
    assert_eq!(ids(&again["Data"]).len(), 6);
    m.shutdown().await;
}

#[tokio::test]
async fn the_newest_records_are_hidden_like_zendesk_does() {
    let m = start(3, Duration::from_secs(60)).await;
    m.state().insert(2);
    let (_, p, _) = get(&format!(
        "{}/api/v2/incremental/tickets/cursor.json?start_time=0&per_page=10",
        m.base_url()
    ))
    .await;
    assert_eq!(
        ids(&p["tickets"]).len(),
        3,
        "records changed in the last minute are not served yet"
    );
    assert_eq!(p["end_of_stream"], true);
    m.shutdown().await;
}

#[tokio::test]
async fn admin_truth_stats_and_faults_over_http() {
    let m = start(4, Duration::ZERO).await;
    let base = m.base_url();
    let c = reqwest::Client::new();
    c.post(format!("{base}/_admin/insert?n=2"))
        .send()
        .await
        .unwrap();
    c.post(format!("{base}/_admin/update?n=1"))
        .send()
        .await
        .unwrap();
    let (_, truth, _) = get(&format!("{base}/_truth")).await;
    assert_eq!(truth["records"].as_array().unwrap().len(), 6);
    assert_eq!(truth["versions"].as_array().unwrap().len(), 7);
    let faults = Faults {
        fail_500_every: Some(1),
        ..Faults::default()
    };
    c.post(format!("{base}/_admin/faults"))
        .json(&faults)
        .send()
        .await
        .unwrap();
    let (status, _, _) = get(&format!("{base}/paged/records")).await;
    assert_eq!(status, 500);
    let (status, _, headers) = get(&format!("{base}/github/records?per_page=2")).await;
    assert_eq!(status, 500);
    assert!(headers.get("link").is_none());
    let (_, stats, _) = get(&format!("{base}/_stats")).await;
    assert_eq!(stats["requests"], 2, "/_ endpoints are not data requests");
    assert_eq!(stats["by_path"]["/paged/records"], 1);
    m.shutdown().await;
}

/// `/hostile/{kind}`: a good first page that hands out `p2`, then the bad
/// page of each kind.
#[tokio::test]
async fn hostile_apis_serve_a_good_page_then_a_bad_one() {
    let m = start(0, Duration::ZERO).await;
    let base = m.base_url();
    for kind in ["loop", "huge", "utf8", "types", "empty_more"] {
        let (status, first, headers) = get(&format!("{base}/hostile/{kind}")).await;
        assert_eq!(status, 200, "{kind}");
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(ids(&first["records"]), ["h1", "h2", "h3"], "{kind}");
        assert_eq!(first["records"][0]["updated_at"], "2024-01-01T00:00:00Z");
        assert_eq!(first["next"], "p2", "{kind}");
    }

    // loop: records, more claimed, and the cursor it was given.
    // empty_forever: a new cursor every time, never a record.
    let (_, p, _) = get(&format!("{base}/hostile/empty_forever?cursor=p41")).await;
    assert_eq!(p["records"].as_array().map(Vec::len), Some(0));
    assert_eq!(p["next"], "p42");
    assert_eq!(p["has_more"], true);
    let (_, p, _) = get(&format!("{base}/hostile/loop?cursor=p2")).await;
    assert_eq!(ids(&p["records"]), ["h4"]);
    assert_eq!((&p["next"], &p["has_more"]), (&"p2".into(), &true.into()));

    // utf8: a 200 that is JSON except for invalid UTF-8 inside a string.
    let r = reqwest::get(format!("{base}/hostile/utf8?cursor=p2"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = r.bytes().await.unwrap();
    assert!(std::str::from_utf8(&body).is_err());
    assert!(serde_json::from_slice::<Value>(&body).is_err());
    let lossy: Value = serde_json::from_str(&String::from_utf8_lossy(&body)).unwrap();
    assert_eq!(
        ids(&lossy["records"]),
        ["h4"],
        "only the string's bytes are bad"
    );

    // types: records is an object.
    let (_, p, _) = get(&format!("{base}/hostile/types?cursor=p2")).await;
    assert!(p["records"].is_object(), "{p}");
    assert_eq!(p["next"], "p3");

    // empty_more: an empty page that claims more; from p3 on it pages to itself.
    for cursor in ["p2", "p3"] {
        let (_, p, _) = get(&format!("{base}/hostile/empty_more?cursor={cursor}")).await;
        assert_eq!(p["records"], serde_json::json!([]));
        assert_eq!((&p["has_more"], &p["next"]), (&true.into(), &"p3".into()));
    }

    // huge: valid JSON records, streamed without a Content-Length; read 1 MiB+ and hang up.
    let mut r = reqwest::get(format!("{base}/hostile/huge?cursor=p2"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.content_length().is_none());
    let mut head = Vec::new();
    while head.len() <= 1 << 20 {
        head.extend_from_slice(&r.chunk().await.unwrap().expect("more than 1 MiB"));
    }
    assert!(head.starts_with(br#"{"records":[{"id":"hx","updated_at":"#));
    drop(r);

    let (status, err, _) = get(&format!("{base}/hostile/nope")).await;
    assert_eq!((status, err["error"].as_str()), (404, Some("not_found")));
    let (_, stats, _) = get(&format!("{base}/_stats")).await;
    assert_eq!(stats["by_path"]["/hostile/empty_more"], 3);
    m.shutdown().await;
}

/// The whole `huge` body is about 100 MiB of valid JSON.
#[tokio::test]
async fn hostile_huge_streams_100_mib_of_valid_json() {
    let m = start(0, Duration::ZERO).await;
    let mut r = reqwest::get(format!("{}/hostile/huge?cursor=p2", m.base_url()))
        .await
        .unwrap();
    let (mut total, mut last) = (0usize, Vec::new());
    while let Some(chunk) = r.chunk().await.unwrap() {
        total += chunk.len();
        last = chunk.to_vec();
    }
    assert!(total >= 100 * 1024 * 1024, "{total} bytes");
    assert!(last.ends_with(br#"],"has_more":true,"next":"p3"}"#));
    m.shutdown().await;
}
