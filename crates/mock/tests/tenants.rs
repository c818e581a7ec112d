//! Tenants over HTTP: `/t/{tenant}/<endpoint>` serves that tenant's own
//! dataset to `Bearer tok-{tenant}` only, next URLs keep the prefix, and the
//! per-tenant admin (revoke, restore, throttle, insert), truth and stats.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use reqwest::header::HeaderMap;
use serde_json::Value;
use tidemark_mock::{Faults, MockConfig, MockServer, Truth, TruthRecord, tenant_token};

const ZENDESK: &str = "/api/v2/incremental/tickets/cursor.json";

async fn start(tenant_records: usize) -> MockServer {
    let cfg = MockConfig {
        records: 5,
        tenant_records,
        ..MockConfig::default()
    };
    MockServer::start(cfg, SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap()
}

/// GET `url` with `Authorization: Bearer {token}` if a token is given.
async fn get(url: &str, token: Option<&str>) -> (u16, Value, HeaderMap) {
    let mut req = reqwest::Client::new().get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.bytes().await.unwrap();
    (
        status,
        serde_json::from_slice(&body).unwrap_or(Value::Null),
        headers,
    )
}

/// GET as `tenant`, with its token.
async fn get_as(base: &str, tenant: &str, rest: &str) -> (u16, Value, HeaderMap) {
    get(
        &format!("{base}/t/{tenant}{rest}"),
        Some(&tenant_token(tenant)),
    )
    .await
}

async fn post(url: &str) -> Value {
    let r = reqwest::Client::new().post(url).send().await.unwrap();
    assert_eq!(r.status(), 200, "POST {url}");
    r.json().await.unwrap()
}

fn truth_of(records: &Value) -> Vec<TruthRecord> {
    records
        .as_array()
        .unwrap()
        .iter()
        .map(|r| TruthRecord {
            id: r["id"].as_str().unwrap().to_string(),
            updated_at: r["updated_at"].as_str().unwrap().to_string(),
        })
        .collect()
}

/// Walk `tenant`'s zendesk cursor endpoint from the start to end_of_stream,
/// following `after_url`; every page's URL must keep the tenant prefix.
async fn walk_zendesk(base: &str, tenant: &str) -> Vec<Value> {
    let prefix = format!("{base}/t/{tenant}{ZENDESK}?");
    let mut url = format!("{base}/t/{tenant}{ZENDESK}?start_time=0&per_page=7");
    let mut records = Vec::new();
    for _ in 0..100 {
        let (status, page, _) = get(&url, Some(&tenant_token(tenant))).await;
        assert_eq!(status, 200, "{url}: {page}");
        records.extend(page["tickets"].as_array().unwrap().iter().cloned());
        if page["end_of_stream"] == true {
            return records;
        }
        url = page["after_url"].as_str().unwrap().to_string();
        assert!(url.starts_with(&prefix), "{url} lost the tenant prefix");
    }
    panic!("{tenant}'s walk did not end");
}

#[tokio::test]
async fn a_tenants_pages_need_its_token() {
    let m = start(20).await;
    let base = m.base_url();
    let url = format!("{base}/t/acme/paged/records");
    for token in [None, Some("tok-globex"), Some("tok-acm"), Some("mock-x")] {
        let (status, err, headers) = get(&url, token).await;
        assert_eq!(status, 401, "{token:?}");
        assert_eq!(err["error"], "invalid_token", "{token:?}");
        assert!(err["description"].is_string());
        assert!(headers.get("www-authenticate").is_some());
    }
    // The token must be presented as a bearer token, not bare.
    let r = reqwest::Client::new()
        .get(&url)
        .header("authorization", "tok-acme")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let (status, page, _) = get(&url, Some("tok-acme")).await;
    assert_eq!(status, 200);
    assert_eq!(page["total_count"], 20);
    // The main dataset is still served without a token.
    let (status, page, _) = get(&format!("{base}/paged/records"), None).await;
    assert_eq!((status, &page["total_count"]), (200, &5.into()));
    m.shutdown().await;
}

#[tokio::test]
async fn walking_a_tenants_zendesk_cursor_returns_exactly_its_truth() {
    let m = start(20).await;
    let base = m.base_url();
    let records = walk_zendesk(&base, "acme").await;
    assert_eq!(records.len(), 20);
    assert!(records.iter().all(|r| r["tenant"] == "acme"));
    let (status, truth, _) = get(&format!("{base}/_truth?tenant=acme"), None).await;
    assert_eq!(status, 200);
    let truth: Truth = serde_json::from_value(truth).unwrap();
    assert_eq!(truth_of(&Value::Array(records)), truth.versions);
    assert_eq!(truth.records.len(), 20);
    assert_eq!(
        m.state().tenant_truth("acme").versions,
        truth.versions,
        "in-process and HTTP truth agree"
    );
    // The main dataset's truth is unchanged.
    let (_, main, _) = get(&format!("{base}/_truth"), None).await;
    assert_eq!(main["records"].as_array().unwrap().len(), 5);
    m.shutdown().await;
}

#[tokio::test]
async fn tenants_have_their_own_deterministic_data() {
    let m = start(20).await;
    let base = m.base_url();
    let (_, acme, _) = get_as(&base, "acme", "/offset/records?limit=20").await;
    let (_, globex, _) = get_as(&base, "globex", "/offset/records?limit=20").await;
    let (acme, globex) = (&acme["records"], &globex["records"]);
    assert_eq!(acme.as_array().unwrap().len(), 20);
    assert_ne!(acme, globex);
    assert_ne!(
        acme[0]["payload"], globex[0]["payload"],
        "the seed depends on the name"
    );
    assert_eq!(
        (&acme[0]["tenant"], &globex[0]["tenant"]),
        (&"acme".into(), &"globex".into())
    );

    // Another server with the same config serves the same tenant data.
    let other = start(20).await;
    let (_, again, _) = get_as(&other.base_url(), "acme", "/offset/records?limit=20").await;
    assert_eq!(&again["records"], acme);
    other.shutdown().await;
    m.shutdown().await;
}

#[tokio::test]
async fn next_urls_and_links_keep_the_tenant_prefix() {
    let m = start(5).await;
    let base = m.base_url();
    let tenant_base = format!("{base}/t/acme");

    // next_url in the body (JSON:API): follow it to the end.
    let mut url = format!("{tenant_base}/jsonapi/records?limit=2");
    let mut seen = Vec::new();
    loop {
        let (status, page, _) = get(&url, Some("tok-acme")).await;
        assert_eq!(status, 200, "{url}");
        assert!(
            page["links"]["self"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{tenant_base}/jsonapi/records?"))
        );
        seen.extend(truth_of(&page["data"]));
        match page["links"]["next"].as_str() {
            Some(next) => {
                assert!(
                    next.starts_with(&format!("{tenant_base}/jsonapi/records?")),
                    "{next}"
                );
                url = next.to_string();
            }
            None => break,
        }
    }
    assert_eq!(seen, m.state().tenant_truth("acme").versions);

    // RFC 8288 Link header.
    let (_, _, headers) = get_as(&base, "acme", "/github/records?per_page=2").await;
    let link = headers["link"].to_str().unwrap();
    assert!(
        link.starts_with(&format!("<{tenant_base}/github/records?after=")),
        "{link}"
    );
    assert!(link.contains(&format!(
        "<{tenant_base}/github/records?per_page=2>; rel=\"first\""
    )));

    // Links.Self / Links.Next of seed 001.
    let (_, p, _) = get_as(&base, "acme", "/v1/events?limit=2").await;
    for l in [&p["Links"]["Self"], &p["Links"]["Next"]] {
        assert!(
            l.as_str()
                .unwrap()
                .starts_with(&format!("{tenant_base}/v1/events?")),
            "{l}"
        );
    }
    // The main dataset's URLs have no prefix.
    let (_, p, _) = get(&format!("{base}/jsonapi/records?limit=2"), None).await;
    assert!(
        p["links"]["next"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{base}/jsonapi/records?"))
    );
    m.shutdown().await;
}

#[tokio::test]
async fn revoke_then_restore() {
    let m = start(3).await;
    let base = m.base_url();
    let rest = "/sync/records?limit=10";
    assert_eq!(get_as(&base, "acme", rest).await.0, 200);
    let r = post(&format!("{base}/_admin/tenants/acme/revoke")).await;
    assert_eq!(r["revoked"], true);
    let (status, err, _) = get_as(&base, "acme", rest).await;
    assert_eq!(
        (status, err["error"].as_str()),
        (401, Some("invalid_token"))
    );
    assert_eq!(
        get_as(&base, "globex", rest).await.0,
        200,
        "others are served"
    );
    post(&format!("{base}/_admin/tenants/acme/restore")).await;
    assert_eq!(get_as(&base, "acme", rest).await.0, 200);

    // The same in process.
    m.state().revoke_tenant("globex");
    assert_eq!(get_as(&base, "globex", rest).await.0, 401);
    m.state().restore_tenant("globex");
    assert_eq!(get_as(&base, "globex", rest).await.0, 200);
    m.shutdown().await;
}

#[tokio::test]
async fn throttle_answers_429_with_retry_after_until_it_passes() {
    let m = start(3).await;
    let base = m.base_url();
    let rest = "/items?limit=10";
    post(&format!("{base}/_admin/tenants/acme/throttle?secs=1")).await;
    let since = Instant::now();
    let (status, err, headers) = get_as(&base, "acme", rest).await;
    assert_eq!((status, err["error"].as_str()), (429, Some("rate_limited")));
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(
        get_as(&base, "globex", rest).await.0,
        200,
        "others are served"
    );
    tokio::time::sleep(Duration::from_millis(1200).saturating_sub(since.elapsed())).await;
    let (status, page, _) = get_as(&base, "acme", rest).await;
    assert_eq!(status, 200);
    assert_eq!(page["items"].as_array().unwrap().len(), 3);

    // Retry-After counts down in whole seconds, rounding up.
    m.state()
        .throttle_tenant("acme", Duration::from_millis(2500));
    let (status, _, headers) = get_as(&base, "acme", rest).await;
    assert_eq!(status, 429);
    assert_eq!(headers["retry-after"], "3");
    // A throttled tenant without its token is refused 401: auth comes first.
    let (status, _, _) = get(&format!("{base}/t/acme{rest}"), None).await;
    assert_eq!(status, 401);
    m.state().throttle_tenant("acme", Duration::ZERO);
    assert_eq!(get_as(&base, "acme", rest).await.0, 200);
    m.shutdown().await;
}

#[tokio::test]
async fn insert_adds_records_to_that_tenant_only() {
    let m = start(20).await;
    let base = m.base_url();
    // Touch both first, so the insert is not on a fresh dataset only.
    assert_eq!(walk_zendesk(&base, "acme").await.len(), 20);
    assert_eq!(walk_zendesk(&base, "globex").await.len(), 20);
    let r = post(&format!("{base}/_admin/tenants/acme/insert?n=3")).await;
    assert_eq!(r["inserted"], 3);
    m.state().insert_tenant("acme", 1);
    let acme = walk_zendesk(&base, "acme").await;
    assert_eq!(acme.len(), 24);
    assert_eq!(
        truth_of(&Value::Array(acme)),
        m.state().tenant_truth("acme").versions
    );
    assert_eq!(walk_zendesk(&base, "globex").await.len(), 20);
    assert_eq!(m.state().tenant_truth("globex").records.len(), 20);
    assert_eq!(m.state().len(), 5, "the main dataset is untouched");
    m.shutdown().await;
}

#[tokio::test]
async fn stats_count_requests_per_tenant() {
    let m = start(3).await;
    let base = m.base_url();
    let rest = "/paged/records";
    for _ in 0..3 {
        assert_eq!(get_as(&base, "acme", rest).await.0, 200);
    }
    assert_eq!(get(&format!("{base}/t/acme{rest}"), None).await.0, 401);
    assert_eq!(get_as(&base, "globex", rest).await.0, 200);
    m.state().throttle_tenant("globex", Duration::from_secs(30));
    assert_eq!(get_as(&base, "globex", rest).await.0, 429);
    assert_eq!(get(&format!("{base}{rest}"), None).await.0, 200);
    // Admin and truth requests are not data requests.
    post(&format!("{base}/_admin/tenants/initech/insert?n=1")).await;
    get(&format!("{base}/_truth?tenant=initech"), None).await;

    let (_, stats, _) = get(&format!("{base}/_stats"), None).await;
    assert_eq!(stats["requests"], 7);
    assert_eq!(
        stats["by_tenant"],
        serde_json::json!({ "acme": 4, "globex": 2 })
    );
    assert_eq!(
        stats["refused_by_tenant"],
        serde_json::json!({ "acme": 1, "globex": 1 })
    );
    assert_eq!(stats["by_path"]["/t/acme/paged/records"], 4);
    assert_eq!(stats["by_path"]["/paged/records"], 1);
    let s = m.state().stats();
    assert_eq!(s.by_tenant.get("acme"), Some(&4));
    assert_eq!(s.refused_by_tenant.get("globex"), Some(&1));
    m.shutdown().await;
}

#[tokio::test]
async fn global_faults_apply_to_tenants_after_their_auth() {
    let m = start(3).await;
    let base = m.base_url();
    m.state().set_faults(Faults {
        fail_500_every: Some(1),
        ..Faults::default()
    });
    assert_eq!(
        get(&format!("{base}/t/acme/paged/records"), None).await.0,
        401
    );
    let (status, err, _) = get_as(&base, "acme", "/paged/records").await;
    assert_eq!((status, err["error"].as_str()), (500, Some("internal")));
    m.state().set_faults(Faults {
        fail_429_every: Some(1),
        retry_after_secs: 7,
        ..Faults::default()
    });
    let (status, _, headers) = get_as(&base, "acme", "/paged/records").await;
    assert_eq!(
        (status, &headers["retry-after"]),
        (429, &"7".parse().unwrap())
    );
    let (_, stats, _) = get(&format!("{base}/_stats"), None).await;
    assert_eq!(stats["refused_by_tenant"]["acme"], 2, "the 401 and the 429");
    m.shutdown().await;
}

#[tokio::test]
async fn bad_tenant_names_and_actions_are_refused() {
    let m = start(3).await;
    let base = m.base_url();
    for path in [
        "/t/Acme/paged/records",
        "/t/a.b/paged/records",
        "/t//paged/records",
    ] {
        let (status, err, _) = get(&format!("{base}{path}"), Some("tok-Acme")).await;
        assert_eq!(
            (status, err["error"].as_str()),
            (404, Some("not_found")),
            "{path}"
        );
    }
    let long = "x".repeat(64);
    assert_eq!(
        get(
            &format!("{base}/t/{long}/paged/records"),
            Some(&tenant_token(&long))
        )
        .await
        .0,
        404
    );
    let (status, _, _) = get_as(&base, "acme", "/no/such/endpoint").await;
    assert_eq!(status, 404);
    let (status, _, _) = get(&format!("{base}/_truth?tenant=NOPE"), None).await;
    assert_eq!(status, 400);
    let c = reqwest::Client::new();
    let r = c
        .post(format!("{base}/_admin/tenants/acme/explode"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = c
        .post(format!("{base}/_admin/tenants/acme/throttle?secs=soon"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = c
        .post(format!("{base}/_admin/tenants/A!/revoke"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(
        m.state().tenants().iter().all(|t| t == "acme"),
        "{:?}",
        m.state().tenants()
    );
    m.shutdown().await;
}

#[tokio::test]
async fn a_thousand_tenants_are_cheap() {
    let m = start(20).await;
    let s = m.state();
    let t0 = Instant::now();
    for i in 0..1000 {
        assert_eq!(s.tenant_truth(&format!("tenant-{i}")).records.len(), 20);
    }
    assert_eq!(s.tenants().len(), 1000);
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    let (status, page, _) = get_as(&m.base_url(), "tenant-999", "/paged/records").await;
    assert_eq!((status, &page["total_count"]), (200, &20.into()));
    m.shutdown().await;
}
