//! Secret hygiene, end to end: canary credentials (from the environment and
//! from a file) are used by a distributed sync running with trace logging,
//! including a feed that fails, and then every channel tidemark writes to is
//! searched for them: Redis, every queue message (page tasks, dead letters,
//! downstream records and their headers), every process log, every
//! `/metrics`, `tidemark status` (text and JSON), the status page and the
//! admin API's status.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tidemark_core::checkpoint::Phase;
use tidemark_tests::{Checker, Cluster, amqp_url, ctl, eventually};

/// Every value in Redis under `prefix`, as text.
async fn redis_dump(url: &str, prefix: &str) -> String {
    let client = redis::Client::open(url).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(!keys.is_empty(), "no keys under {prefix}");
    let mut out = String::new();
    for k in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&k)
            .query_async(&mut c)
            .await
            .unwrap();
        let cmd = match kind.as_str() {
            "string" => redis::cmd("GET").arg(&k).clone(),
            "hash" => redis::cmd("HGETALL").arg(&k).clone(),
            "list" => redis::cmd("LRANGE").arg(&k).arg(0).arg(-1).clone(),
            "set" => redis::cmd("SMEMBERS").arg(&k).clone(),
            "zset" => redis::cmd("ZRANGE")
                .arg(&k)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .clone(),
            other => panic!("{k}: a {other} key: teach this test to read it"),
        };
        let v: redis::Value = cmd.query_async(&mut c).await.unwrap();
        out.push_str(&format!("{k} {v:?}\n"));
    }
    out
}

/// A message as text: its body, properties and headers (byte strings decoded).
fn message_text(data: &[u8], props: &lapin::BasicProperties) -> String {
    let mut out = format!("{} {props:?}", String::from_utf8_lossy(data));
    for (k, v) in props.headers().iter().flat_map(|h| h.inner().iter()) {
        let v = match v {
            lapin::types::AMQPValue::LongString(s) => {
                String::from_utf8_lossy(s.as_bytes()).into_owned()
            }
            other => format!("{other:?}"),
        };
        out.push_str(&format!(" {k}={v}"));
    }
    out.push('\n');
    out
}

/// Each message in `queue`, body and headers, as text (taken off the queue).
async fn drain_queue(ch: &lapin::Channel, queue: &str) -> String {
    use lapin::options::BasicGetOptions;
    let mut out = String::new();
    while let Ok(Some(m)) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
    {
        out.push_str(&message_text(&m.delivery.data, &m.delivery.properties));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn canary_secrets_never_leave_the_request() {
    let bearer = format!("tmcanary-bearer-{}", uuid::Uuid::new_v4().simple());
    let key = format!("tmcanary-key-{}", uuid::Uuid::new_v4().simple());
    let from_file = format!("tmcanary-file-{}", uuid::Uuid::new_v4().simple());
    let client_secret = format!("tmcanary-client-{}", uuid::Uuid::new_v4().simple());
    let mut canaries = vec![
        bearer.clone(),
        key.clone(),
        from_file.clone(),
        client_secret.clone(),
    ];

    let mut c = Cluster::start("", &["--records", "400"]);
    let secret_file = c.dir.path().join("tenant-secret");
    std::fs::write(&secret_file, format!("{from_file}\n")).unwrap();
    let mock = c.mock_url.clone();
    std::fs::write(
        &c.config,
        format!(
            "sources:
  bearer_api:
    base_url: {mock}
    auth: {{ bearer: \"${{TM_CANARY_TOKEN}}\" }}
    headers: {{ X-Tenant: \"${{file:{}}}\" }}
  key_api:
    base_url: {mock}
    auth: {{ api_key: {{ query: api_key, value: \"${{TM_CANARY_KEY}}\" }} }}
  oauth_api:
    base_url: {mock}
    auth:
      oauth2_client_credentials:
        token_url: {mock}/oauth/token
        client_id: tidemark-test
        client_secret: \"${{TM_CANARY_CLIENT_SECRET}}\"
        scopes: [records.read]
feeds:
  - name: items
    source: bearer_api
    path: /items
    pagination: {{ preset: cursor, page_size: 100 }}
    key: /id
    version: /updated_at
    every: 1h
  - name: events
    source: key_api
    path: /v1/events
    pagination: {{ preset: self_next, page_size: 100 }}
    key: /id
    version: /updated_at
    every: 1h
  - name: jsonapi
    source: oauth_api
    path: /jsonapi/records
    pagination: {{ preset: next_url, page_size: 100 }}
    key: /id
    version: /updated_at
    every: 1h
  - name: broken
    source: key_api
    path: /hostile/types
    records: /records
    pagination: {{ cursor_param: cursor, next_cursor: /next, has_more: /has_more }}
    key: /id
    every: 1h
",
            secret_file.display()
        ),
    )
    .unwrap();
    let admin_token = format!("admin-{}", uuid::Uuid::new_v4().simple());
    c.env.extend([
        ("TM_CANARY_TOKEN".to_string(), bearer.clone()),
        ("TM_CANARY_KEY".to_string(), key.clone()),
        ("TM_CANARY_CLIENT_SECRET".to_string(), client_secret.clone()),
        ("TIDEMARK_LOG".to_string(), "trace".to_string()),
        ("TIDEMARK_ADMIN_TOKEN".to_string(), admin_token.clone()),
    ]);

    // Every downstream message, body and headers.
    let (conn, mut consumer, _) =
        tidemark_bus::amqp::subscribe(&amqp_url(), &c.exchange(), "#", "canary")
            .await
            .unwrap();
    let downstream = Arc::new(Mutex::new(String::new()));
    let sink = downstream.clone();
    tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            sink.lock()
                .unwrap()
                .push_str(&message_text(&d.data, &d.properties));
            let _ = d.ack(lapin::options::BasicAckOptions::default()).await;
        }
    });
    let checker = Checker::start(&c.exchange()).await;
    c.set_retry("{ max_attempts: 2, base_delay: 100ms }");
    let coord = c.coordinator("coord");
    let worker = c.worker("w1", &[]);

    assert!(
        checker.wait_for(1200, Duration::from_secs(60)).await,
        "{}",
        c.logs()
    );
    // The OAuth2 access tokens the mock issued are secrets too.
    let tokens: Vec<String> = reqwest::get(format!("{mock}/_oauth/tokens"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(!tokens.is_empty(), "the oauth2 source fetched a token");
    canaries.extend(tokens);
    assert!(
        eventually(Duration::from_secs(60), async || c
            .jobs()
            .await
            .iter()
            .any(|(j, cp)| j.feed == "broken" && cp.phase == Phase::Failed))
        .await,
        "{}",
        c.logs()
    );

    let mut channels: Vec<(String, String)> = Vec::new();
    channels.push((
        "redis".into(),
        redis_dump(&c.redis, &c.redis_prefix()).await,
    ));
    channels.push(("downstream".into(), downstream.lock().unwrap().clone()));
    let ch = conn.create_channel().await.unwrap();
    for q in ["tasks", "dead"] {
        let name = format!("{}.{q}", c.prefix);
        channels.push((format!("queue {name}"), drain_queue(&ch, &name).await));
    }
    assert!(
        channels
            .iter()
            .any(|(n, t)| n.ends_with(".dead") && t.contains("records at /records")),
        "the failed page is in the dead-letter queue"
    );
    let http = reqwest::Client::new();
    for i in [coord, worker] {
        let addr = c.procs[i].addr.clone().expect("metrics address");
        let text = get_text(&http, &format!("{addr}/metrics")).await;
        channels.push((format!("{} /metrics", c.procs[i].name), text));
    }
    let admin = c.procs[coord]
        .announced("status page on")
        .expect("status page address");
    let page = get_text(&http, &format!("{admin}/")).await;
    channels.push(("status page".into(), page));
    let api = http
        .get(format!("{admin}/api/status"))
        .bearer_auth(&admin_token)
        .send()
        .await
        .unwrap();
    assert!(api.status().is_success());
    let api = api.text().await.unwrap();
    assert!(api.contains("broken"), "{api}");
    channels.push(("admin API status".into(), api));
    for args in [&["status"][..], &["status", "--json"][..]] {
        channels.push((format!("tidemark {args:?}"), ctl(&c, args, 0)));
    }
    // The logs last: everything above ran with trace logging too.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Not the mock's: the API itself received the credentials, by design.
    for p in &c.procs {
        channels.push((
            format!("log of {}", p.name),
            std::fs::read_to_string(&p.log).unwrap(),
        ));
    }
    let traced: usize = channels
        .iter()
        .filter(|(n, _)| n.starts_with("log of"))
        .map(|(_, t)| t.lines().filter(|l| l.contains("TRACE")).count())
        .sum();
    assert!(traced > 0, "the roles logged at trace level");

    for (name, text) in &channels {
        for canary in &canaries {
            assert!(
                !text.contains(canary),
                "{name} holds a secret ({canary}):\n{}",
                text.lines()
                    .filter(|l| l.contains(canary))
                    .take(3)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
    eprintln!(
        "searched {} channels ({} bytes) for {} canaries: none found",
        channels.len(),
        channels.iter().map(|(_, t)| t.len()).sum::<usize>(),
        canaries.len()
    );
    let _ = conn.close(200, "bye".into()).await;
}

async fn get_text(http: &reqwest::Client, url: &str) -> String {
    http.get(url).send().await.unwrap().text().await.unwrap()
}
