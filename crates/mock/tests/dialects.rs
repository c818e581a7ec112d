//! The request dialects: GraphQL (Relay edges), Notion's body cursor,
//! Elasticsearch `search_after`, Kinto's `Next-Page` header and Slack's
//! errors inside a 200 — each walked to the end in pages of 7 — their error
//! shapes, POST bodies through the data fallback, the `error_200_every`
//! fault and the rate-limit budget.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::header::HeaderMap;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tidemark_mock::{Faults, MockConfig, MockServer, RateLimitStyle, TruthRecord, tenant_token};

/// A server with 50 records, 5 of them then updated and 2 inserted (52
/// current records), so change order is not creation order.
async fn start() -> MockServer {
    let cfg = MockConfig {
        records: 50,
        tenant_records: 30,
        ..MockConfig::default()
    };
    let m = MockServer::start(cfg, SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    m.state().update(5);
    m.state().insert(2);
    m
}

/// An answer: status, JSON body (Null if not JSON), headers and raw text.
struct Answer {
    status: u16,
    body: Value,
    headers: HeaderMap,
    text: String,
}

async fn answer(r: reqwest::Response) -> Answer {
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.unwrap();
    Answer {
        status,
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
        headers,
        text,
    }
}

async fn get(url: &str, token: Option<&str>) -> Answer {
    let mut req = reqwest::Client::new().get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    answer(req.send().await.unwrap()).await
}

async fn post(url: &str, body: &Value, token: Option<&str>) -> Answer {
    let mut req = reqwest::Client::new().post(url).json(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    answer(req.send().await.unwrap()).await
}

async fn set_faults(base: &str, f: &Faults) {
    let r = reqwest::Client::new()
        .post(format!("{base}/_admin/faults"))
        .json(f)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

fn truth_of(records: &[Value]) -> Vec<TruthRecord> {
    records
        .iter()
        .map(|r| TruthRecord {
            id: r["id"].as_str().unwrap().to_string(),
            updated_at: r["updated_at"].as_str().unwrap().to_string(),
        })
        .collect()
}

/// The current records in change order, as `/sync/records` serves them:
/// (parsed, exact JSON text).
async fn current(base: &str, token: Option<&str>) -> (Vec<Value>, Vec<String>) {
    let a = get(&format!("{base}/sync/records?limit=1000"), token).await;
    assert_eq!(a.status, 200);
    #[derive(serde::Deserialize)]
    struct Page<'a> {
        #[serde(borrow)]
        records: Vec<&'a RawValue>,
    }
    let page: Page = serde_json::from_str(&a.text).unwrap();
    let texts: Vec<String> = page.records.iter().map(|r| r.get().to_string()).collect();
    let values = texts
        .iter()
        .map(|t| serde_json::from_str(t).unwrap())
        .collect();
    (values, texts)
}

/// A walk delivered exactly the current records once each, in change
/// order, as the exact JSON text `records()` renders.
async fn assert_walk(m: &MockServer, walked: &[Value], bodies: &str) {
    let (values, texts) = current(&m.base_url(), None).await;
    assert_eq!(values.len(), 52);
    let mut truth = m.state().truth().records;
    truth.sort_by(|a, b| (&a.updated_at, &a.id).cmp(&(&b.updated_at, &b.id)));
    assert_eq!(truth_of(walked), truth, "once each, in change order");
    assert_eq!(walked, values.as_slice());
    for t in &texts {
        assert!(bodies.contains(t.as_str()), "not served verbatim: {t}");
    }
}

fn graphql_body(first: u64, after: Option<&str>) -> Value {
    json!({
        "query": "query($first: Int!, $after: String) { records(first: $first, after: $after) { edges { cursor node } pageInfo { endCursor hasNextPage } } }",
        "variables": {"first": first, "after": after},
    })
}

#[tokio::test]
async fn graphql_relay_edges_walk_to_the_end() {
    let m = start().await;
    let url = format!("{}/graphql", m.base_url());
    let (mut walked, mut bodies, mut after, mut pages) = (vec![], String::new(), None, 0);
    loop {
        let a = post(&url, &graphql_body(7, after.as_deref()), None).await;
        assert_eq!(a.status, 200, "{}", a.text);
        assert_eq!(a.headers["content-type"], "application/json");
        let records = &a.body["data"]["records"];
        let edges = records["edges"].as_array().unwrap();
        let info = &records["pageInfo"];
        pages += 1;
        assert!(edges.len() <= 7);
        for e in edges {
            assert!(e["cursor"].is_string());
            walked.push(e["node"].clone());
        }
        bodies.push_str(&a.text);
        if let Some(last) = edges.last() {
            assert_eq!(info["endCursor"], last["cursor"]);
        }
        after = info["endCursor"].as_str().map(str::to_string);
        if info["hasNextPage"] == false {
            break;
        }
        assert!(pages < 20, "the walk did not end");
    }
    assert_eq!(pages, 8, "52 records in pages of 7");
    assert_walk(&m, &walked, &bodies).await;

    // From the end: an empty page that keeps the cursor it was given.
    let end = after.unwrap();
    let a = post(&url, &graphql_body(7, Some(&end)), None).await;
    let records = &a.body["data"]["records"];
    assert_eq!(records["edges"], json!([]));
    assert_eq!(records["pageInfo"]["endCursor"], end.as_str());
    assert_eq!(records["pageInfo"]["hasNextPage"], false);
    // New records follow it.
    m.state().insert(1);
    let a = post(&url, &graphql_body(7, Some(&end)), None).await;
    assert_eq!(
        a.body["data"]["records"]["edges"].as_array().unwrap().len(),
        1
    );

    // An empty dataset at the start: endCursor null. (`since` past everything.)
    let a = post(
        &url,
        &json!({"query": "{ records { edges { node } } }", "variables": {"since": "2999-01-01T00:00:00Z"}}),
        None,
    )
    .await;
    assert_eq!(
        a.body["data"]["records"]["pageInfo"],
        json!({"endCursor": null, "hasNextPage": false})
    );

    // `since` keeps updated_at >= since; `first` defaults to the page size.
    let truth = m.state().truth().records;
    let since = truth[10].updated_at.clone();
    let a = post(
        &url,
        &json!({"query": "{ records }", "variables": {"since": since}}),
        None,
    )
    .await;
    let nodes: Vec<Value> = a.body["data"]["records"]["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["node"].clone())
        .collect();
    let want = truth.iter().filter(|r| r.updated_at >= since).count();
    assert_eq!(nodes.len(), want);
    assert!(truth_of(&nodes).iter().all(|r| r.updated_at >= since));
    m.shutdown().await;
}

#[tokio::test]
async fn graphql_errors_are_200s() {
    let m = start().await;
    let base = m.base_url();
    let url = format!("{base}/graphql");
    let code = |a: &Answer| a.body["errors"][0]["extensions"]["code"].clone();

    for body in [
        json!({"variables": {}}),
        json!({"query": ""}),
        json!({"query": "{ users { id } }"}),
        json!([1, 2]),
    ] {
        let a = post(&url, &body, None).await;
        assert_eq!(a.status, 200, "{body}");
        assert_eq!(code(&a), "GRAPHQL_PARSE_FAILED", "{body}");
        assert!(a.body["errors"][0]["message"].is_string());
        assert!(a.body.get("data").is_none(), "{}", a.text);
    }
    // No body at all.
    let a = answer(reqwest::Client::new().post(&url).send().await.unwrap()).await;
    assert_eq!((a.status, code(&a)), (200, "GRAPHQL_PARSE_FAILED".into()));

    for after in ["not-a-cursor", "", "eyJ4IjoxfQ=="] {
        let a = post(&url, &graphql_body(7, Some(after)), None).await;
        assert_eq!(a.status, 200);
        assert_eq!(
            a.body,
            json!({"data": null, "errors": [{"message": "invalid cursor", "extensions": {"code": "INVALID_CURSOR"}}]}),
            "{after:?}"
        );
    }

    // An expired cursor.
    let a = post(&url, &graphql_body(7, None), None).await;
    let end = a.body["data"]["records"]["pageInfo"]["endCursor"]
        .as_str()
        .unwrap()
        .to_string();
    set_faults(
        &base,
        &Faults {
            cursor_ttl_secs: Some(0),
            ..Faults::default()
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let a = post(&url, &graphql_body(7, Some(&end)), None).await;
    assert_eq!(
        a.body,
        json!({"data": null, "errors": [{"message": "cursor expired", "extensions": {"code": "CURSOR_EXPIRED"}}]})
    );
    m.shutdown().await;
}

#[tokio::test]
async fn methods_bodies_and_stats() {
    let m = start().await;
    let base = m.base_url();
    let a = get(&format!("{base}/graphql"), None).await;
    assert_eq!(
        (a.status, &a.body["error"]),
        (405, &"method_not_allowed".into())
    );
    let a = post(&format!("{base}/items"), &json!({}), None).await;
    assert_eq!(
        (a.status, &a.body["error"]),
        (405, &"method_not_allowed".into())
    );
    let a = answer(
        reqwest::Client::new()
            .put(format!("{base}/notion/v1/databases/db1/query"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, 405);
    let a = post(&format!("{base}/nope"), &json!({}), None).await;
    assert_eq!((a.status, &a.body["error"]), (404, &"not_found".into()));

    // A body that is not JSON.
    let a = answer(
        reqwest::Client::new()
            .post(format!("{base}/graphql"))
            .body("{not json")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, 400);
    assert_eq!(a.body["error"], "invalid_request");
    assert!(a.body["error_description"].is_string(), "{}", a.text);
    // Over 1 MiB.
    let big = format!("{{\"query\":\"{}\"}}", "x".repeat((1 << 20) + 10));
    let a = answer(
        reqwest::Client::new()
            .post(format!("{base}/graphql"))
            .body(big)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, 413);

    // POST bodies reach a tenant's endpoints too.
    let url = format!("{base}/t/acme/graphql");
    let a = post(&url, &graphql_body(100, None), None).await;
    assert_eq!(a.status, 401);
    let a = post(&url, &graphql_body(100, None), Some(&tenant_token("acme"))).await;
    let edges = a.body["data"]["records"]["edges"].as_array().unwrap();
    assert_eq!(edges.len(), 30);
    assert!(edges.iter().all(|e| e["node"]["tenant"] == "acme"));

    let a = get(&format!("{base}/_stats"), None).await;
    assert_eq!(a.body["by_path"]["/t/acme/graphql"], 2);
    assert_eq!(a.body["by_tenant"]["acme"], 2);
    assert_eq!(a.body["by_path"]["/graphql"], 3);
    assert_eq!(a.body["by_path"]["/items"], 1);
    assert_eq!(a.body["by_path"]["/notion/v1/databases/db1/query"], 1);
    assert_eq!(a.body["requests"], 8);
    assert_eq!(a.body["errors_200"], 0);
    assert_eq!(a.body["rate_limited_429"], 0);
    m.shutdown().await;
}

#[tokio::test]
async fn notion_body_cursor_walks_to_the_end() {
    let m = start().await;
    let url = format!(
        "{}/notion/v1/databases/668d797c-76fa-4934-9b05-ad288df2d136/query",
        m.base_url()
    );
    let (mut walked, mut bodies, mut body) = (vec![], String::new(), json!({"page_size": 7}));
    for pages in 1.. {
        let a = post(&url, &body, None).await;
        assert_eq!(a.status, 200, "{}", a.text);
        assert_eq!(a.body["object"], "list");
        assert_eq!(a.body["type"], "page_or_database");
        walked.extend(a.body["results"].as_array().unwrap().iter().cloned());
        bodies.push_str(&a.text);
        if a.body["has_more"] == false {
            assert_eq!(a.body["next_cursor"], Value::Null);
            assert_eq!(pages, 8);
            break;
        }
        let next = a.body["next_cursor"].as_str().unwrap();
        body = json!({"page_size": 7, "start_cursor": next});
        assert!(pages < 20, "the walk did not end");
    }
    assert_walk(&m, &walked, &bodies).await;

    // Notion refuses start_cursor: null.
    let a = post(&url, &json!({"page_size": 7, "start_cursor": null}), None).await;
    assert_eq!(a.status, 400);
    assert_eq!(
        a.body,
        json!({"object": "error", "status": 400, "code": "validation_error", "message": "body.start_cursor should be a string"})
    );
    let a = post(&url, &json!({"start_cursor": "garbage"}), None).await;
    assert_eq!(
        (a.status, &a.body["code"]),
        (400, &"validation_error".into())
    );
    // No body: the first page at the default size.
    let a = answer(reqwest::Client::new().post(&url).send().await.unwrap()).await;
    assert_eq!(a.body["results"].as_array().unwrap().len(), 52);
    m.shutdown().await;
}

#[tokio::test]
async fn elasticsearch_search_after_walks_to_the_end() {
    let m = start().await;
    let url = format!("{}/es/records/_search", m.base_url());
    let sort = json!([{"updated_at": "asc"}, {"id": "asc"}]);
    let (mut walked, mut bodies, mut after): (Vec<Value>, String, Option<Value>) =
        (vec![], String::new(), None);
    let mut pages = 0;
    loop {
        let mut body = json!({"size": 7, "sort": sort});
        if let Some(a) = &after {
            body["search_after"] = a.clone();
        }
        let a = post(&url, &body, None).await;
        assert_eq!(a.status, 200, "{}", a.text);
        assert_eq!(a.body["timed_out"], false);
        assert_eq!(
            a.body["hits"]["total"],
            json!({"value": 52, "relation": "eq"})
        );
        let hits = a.body["hits"]["hits"].as_array().unwrap();
        bodies.push_str(&a.text);
        let Some(last) = hits.last() else { break };
        pages += 1;
        for h in hits {
            let src = &h["_source"];
            assert_eq!(h["_index"], "records");
            assert_eq!(h["_id"], src["id"]);
            assert_eq!(h["_score"], Value::Null);
            let t = chrono::DateTime::parse_from_rfc3339(src["updated_at"].as_str().unwrap())
                .unwrap()
                .timestamp();
            assert_eq!(h["sort"], json!([t, src["id"]]));
            walked.push(src.clone());
        }
        after = Some(last["sort"].clone());
        assert!(pages < 20, "the walk did not end");
    }
    assert_eq!(pages, 8);
    assert_walk(&m, &walked, &bodies).await;

    // A range on updated_at.
    let since = chrono::DateTime::parse_from_rfc3339(walked[40]["updated_at"].as_str().unwrap())
        .unwrap()
        .timestamp();
    let a = post(
        &url,
        &json!({"size": 100, "query": {"range": {"updated_at": {"gte": since}}}}),
        None,
    )
    .await;
    let hits = a.body["hits"]["hits"].as_array().unwrap();
    assert_eq!(hits.len(), 52 - 40);
    assert_eq!(hits[0]["_source"], walked[40]);

    for bad in [
        json!(["x", "y"]),
        json!([1]),
        json!([1, 2]),
        json!([1.5, "id"]),
        json!("1"),
    ] {
        let a = post(&url, &json!({"size": 7, "search_after": bad}), None).await;
        assert_eq!(a.status, 400, "{bad}");
        assert_eq!(a.body["status"], 400);
        assert_eq!(a.body["error"]["type"], "illegal_argument_exception");
        assert!(a.body["error"]["reason"].is_string());
    }
    m.shutdown().await;
}

/// Walk `/kinto/records` by its `Next-Page` header, from `base` (which may
/// carry a tenant prefix).
async fn walk_kinto(base: &str, token: Option<&str>) -> (Vec<Value>, String, usize) {
    let mut url = format!("{base}/kinto/records?_limit=7");
    let (mut walked, mut bodies) = (vec![], String::new());
    for pages in 1..20 {
        let a = get(&url, token).await;
        assert_eq!(a.status, 200, "{url}: {}", a.text);
        walked.extend(a.body["data"].as_array().unwrap().iter().cloned());
        bodies.push_str(&a.text);
        match a.headers.get("next-page") {
            None => return (walked, bodies, pages),
            Some(next) => {
                let next = next.to_str().unwrap();
                assert!(
                    next.starts_with(&format!("{base}/kinto/records?_limit=7&_token=")),
                    "{next}"
                );
                url = next.to_string();
            }
        }
    }
    panic!("the walk did not end");
}

#[tokio::test]
async fn kinto_next_page_header_walks_to_the_end() {
    let m = start().await;
    let base = m.base_url();
    let (walked, bodies, pages) = walk_kinto(&base, None).await;
    assert_eq!(pages, 8);
    assert_walk(&m, &walked, &bodies).await;

    // Under a tenant prefix, the header keeps it.
    let (acme, _, _) = walk_kinto(&format!("{base}/t/acme"), Some(&tenant_token("acme"))).await;
    let mut truth = m.state().tenant_truth("acme").records;
    truth.sort_by(|a, b| (&a.updated_at, &a.id).cmp(&(&b.updated_at, &b.id)));
    assert_eq!(truth_of(&acme), truth);
    assert_eq!(acme.len(), 30);
    assert!(acme.iter().all(|r| r["tenant"] == "acme"));

    // _since keeps updated_at >= since.
    let since = chrono::DateTime::parse_from_rfc3339(walked[20]["updated_at"].as_str().unwrap())
        .unwrap()
        .timestamp();
    let a = get(
        &format!("{base}/kinto/records?_limit=100&_since={since}"),
        None,
    )
    .await;
    assert!(a.headers.get("next-page").is_none());
    assert_eq!(a.body["data"].as_array().unwrap().len(), 52 - 20);

    // An expired _token.
    let a = get(&format!("{base}/kinto/records?_limit=7"), None).await;
    let next = a.headers["next-page"].to_str().unwrap().to_string();
    set_faults(
        &base,
        &Faults {
            cursor_ttl_secs: Some(0),
            ..Faults::default()
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let a = get(&next, None).await;
    assert_eq!(a.status, 400);
    assert!(a.text.contains("cursor expired"), "{}", a.text);
    m.shutdown().await;
}

#[tokio::test]
async fn slack_walks_to_the_end_and_errors_inside_200s() {
    let m = start().await;
    let base = m.base_url();
    let history = format!("{base}/slack/conversations.history");
    let (mut walked, mut bodies) = (vec![], String::new());
    let mut url = format!("{history}?channel=C123&limit=7");
    for pages in 1.. {
        let a = get(&url, None).await;
        assert_eq!(a.status, 200);
        assert_eq!(a.body["ok"], true, "{}", a.text);
        walked.extend(a.body["messages"].as_array().unwrap().iter().cloned());
        bodies.push_str(&a.text);
        let next = a.body["response_metadata"]["next_cursor"].as_str().unwrap();
        if a.body["has_more"] == false {
            assert_eq!(next, "");
            assert_eq!(pages, 8);
            break;
        }
        url = format!("{history}?channel=C123&limit=7&cursor={next}");
        assert!(pages < 20, "the walk did not end");
    }
    assert_walk(&m, &walked, &bodies).await;

    // oldest keeps updated_at >= oldest.
    let oldest = chrono::DateTime::parse_from_rfc3339(walked[50]["updated_at"].as_str().unwrap())
        .unwrap()
        .timestamp();
    let a = get(
        &format!("{history}?channel=C1&limit=100&oldest={oldest}.000000"),
        None,
    )
    .await;
    assert_eq!(a.body["messages"].as_array().unwrap().len(), 2);

    for url in [
        format!("{history}?limit=7"),
        format!("{history}?channel=missing"),
    ] {
        let a = get(&url, None).await;
        assert_eq!(a.status, 200);
        assert_eq!(a.body, json!({"ok": false, "error": "channel_not_found"}));
    }
    let a = get(&format!("{history}?channel=C1&cursor=%21%21"), None).await;
    assert_eq!(a.body, json!({"ok": false, "error": "invalid_cursor"}));
    m.shutdown().await;
}

#[tokio::test]
async fn error_200_every_answers_graphql_and_slack_errors_inside_a_200() {
    let m = start().await;
    let base = m.base_url();
    set_faults(
        &base,
        &Faults {
            error_200_every: Some(2),
            ..Faults::default()
        },
    )
    .await;
    // Requests 1..=6: graphql, graphql, slack, slack, items, items.
    let gql = format!("{base}/graphql");
    let a = post(&gql, &graphql_body(7, None), None).await;
    assert!(a.body["data"]["records"].is_object());
    let a = post(&gql, &graphql_body(7, None), None).await;
    assert_eq!(a.status, 200);
    assert_eq!(
        a.body,
        json!({"data": null, "errors": [{"message": "API rate limit exceeded", "extensions": {"code": "RATE_LIMITED", "retryAfter": 1}}]})
    );
    let slack = format!("{base}/slack/conversations.history?channel=C1&limit=7");
    let a = get(&slack, None).await;
    assert_eq!(a.body["ok"], true);
    let a = get(&slack, None).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body, json!({"ok": false, "error": "ratelimited"}));
    let a = get(&format!("{base}/items?limit=7"), None).await;
    assert_eq!(a.body["items"].as_array().unwrap().len(), 7);
    let a = get(&format!("{base}/items?limit=7"), None).await;
    assert_eq!(
        a.body["items"].as_array().unwrap().len(),
        7,
        "other endpoints ignore it"
    );
    let stats = get(&format!("{base}/_stats"), None).await;
    assert_eq!(stats.body["errors_200"], 2);
    m.shutdown().await;
}

fn header(a: &Answer, name: &str) -> i64 {
    a.headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name} in {:?}", a.headers))
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn rate_limit_x_headers_count_down_then_429() {
    let m = start().await;
    let base = m.base_url();
    set_faults(
        &base,
        &Faults {
            ratelimit_limit: Some(3),
            ratelimit_window_ms: 60_000,
            ..Faults::default()
        },
    )
    .await;
    let now = chrono::Utc::now().timestamp();
    let gql = format!("{base}/graphql");
    let items = format!("{base}/items?limit=7");
    let answers = [
        get(&items, None).await,
        post(&gql, &graphql_body(7, None), None).await,
        get(&format!("{base}/kinto/records"), None).await,
    ];
    for (a, remaining) in answers.iter().zip([2, 1, 0]) {
        assert_eq!(a.status, 200);
        assert_eq!(header(a, "x-ratelimit-limit"), 3);
        assert_eq!(header(a, "x-ratelimit-remaining"), remaining);
        let reset = header(a, "x-ratelimit-reset");
        assert!((now + 59..=now + 62).contains(&reset), "{reset} vs {now}");
        assert!(a.headers.get("ratelimit-limit").is_none());
    }
    // Used up: 429 with Retry-After, twice (a 429 takes no budget).
    for _ in 0..2 {
        let a = get(&items, None).await;
        assert_eq!(a.status, 429);
        let retry = header(&a, "retry-after");
        assert!((58..=60).contains(&retry), "{retry}");
    }
    // A tenant has its own budget.
    let a = get(&format!("{base}/t/acme/items"), Some(&tenant_token("acme"))).await;
    assert_eq!(a.status, 200);
    assert_eq!(header(&a, "x-ratelimit-remaining"), 2);
    let stats = get(&format!("{base}/_stats"), None).await;
    assert_eq!(stats.body["rate_limited_429"], 2);
    m.shutdown().await;
}

#[tokio::test]
async fn rate_limit_ietf_headers_and_the_window_resets() {
    let m = start().await;
    let base = m.base_url();
    // Set at runtime through the admin JSON, naming only these.
    let r = reqwest::Client::new()
        .post(format!("{base}/_admin/faults"))
        .json(
            &json!({"ratelimit_limit": 2, "ratelimit_window_ms": 1500, "ratelimit_style": "ietf"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let f = m.state().faults();
    assert_eq!(
        (f.ratelimit_limit, f.ratelimit_window_ms, f.ratelimit_style),
        (Some(2), 1500, RateLimitStyle::Ietf)
    );
    let url = format!("{base}/slack/conversations.history?channel=C1&limit=7");
    let a = get(&url, None).await;
    assert_eq!(a.status, 200);
    assert_eq!(header(&a, "ratelimit-limit"), 2);
    assert_eq!(header(&a, "ratelimit-remaining"), 1);
    assert_eq!(header(&a, "ratelimit-reset"), 2, "1.5 s, rounded up");
    assert!(a.headers.get("x-ratelimit-limit").is_none());
    let a = get(&url, None).await;
    assert_eq!(header(&a, "ratelimit-remaining"), 0);
    assert!((1..=2).contains(&header(&a, "ratelimit-reset")));
    let a = get(&url, None).await;
    assert_eq!(a.status, 429);
    assert!((1..=2).contains(&header(&a, "retry-after")));
    // A new window.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let a = post(
        &format!("{base}/notion/v1/databases/x/query"),
        &json!({"page_size": 7}),
        None,
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(header(&a, "ratelimit-remaining"), 1);
    assert_eq!(m.state().stats().rate_limited_429, 1);
    m.shutdown().await;
}

#[tokio::test]
async fn the_request_faults_apply_to_the_dialects() {
    let m = start().await;
    let base = m.base_url();
    let search = format!("{base}/es/records/_search");
    set_faults(
        &base,
        &Faults {
            corrupt_every: Some(1),
            ..Faults::default()
        },
    )
    .await;
    let a = post(&search, &json!({"size": 7}), None).await;
    assert_eq!(a.status, 200);
    assert!(
        serde_json::from_str::<Value>(&a.text).is_err(),
        "{}",
        a.text
    );
    set_faults(
        &base,
        &Faults {
            fail_500_every: Some(1),
            ..Faults::default()
        },
    )
    .await;
    let a = post(&format!("{base}/graphql"), &graphql_body(7, None), None).await;
    assert_eq!(a.status, 500);
    set_faults(
        &base,
        &Faults {
            fail_429_every: Some(1),
            ..Faults::default()
        },
    )
    .await;
    let a = get(&format!("{base}/kinto/records"), None).await;
    assert_eq!(a.status, 429);
    assert_eq!(header(&a, "retry-after"), 1);
    m.shutdown().await;
}
