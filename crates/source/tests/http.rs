//! The HTTP client against small local servers: auth, retries, Retry-After,
//! timeouts, body limits, compression and the same-origin rule.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use tidemark_core::config::{SourceConfig, load_str};
use tidemark_core::pagination::PageRequest;
use tidemark_source::{FetchError, HttpSource};

type Handler = Arc<dyn Fn(usize, &HeaderMap, &Uri) -> Response + Send + Sync>;

/// A server whose n-th request (0-based) is answered by `f`; counts requests.
async fn server(
    f: impl Fn(usize, &HeaderMap, &Uri) -> Response + Send + Sync + 'static,
) -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let (h, f): (_, Handler) = (hits.clone(), Arc::new(f));
    let app = axum::Router::new().fallback(move |headers: HeaderMap, uri: Uri| {
        let n = h.fetch_add(1, Ordering::SeqCst);
        let f = f.clone();
        async move {
            if uri.path() == "/slow" && n == 0 {
                tokio::time::sleep(Duration::from_millis(800)).await;
            }
            f(n, &headers, &uri)
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, hits)
}

fn source(base: &str, extra: &str) -> SourceConfig {
    let text = format!(
        "sources:\n  s:\n    base_url: {base}\n    timeout: 300ms\n    retry: {{ max_attempts: 4, base_delay: 10ms, max_delay: 50ms, max_retry_after: 3s }}\n{extra}"
    );
    load_str("t.yaml", &text).unwrap().sources["s"].clone()
}

fn req(url: &str) -> PageRequest {
    PageRequest {
        url: url.parse().unwrap(),
    }
}

fn ok(body: &'static str) -> Response {
    ([("content-type", "application/json")], body).into_response()
}

#[tokio::test]
async fn every_auth_style_arrives() {
    let (url, _) = server(|_, h, uri| {
        let auth = h
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let key = h
            .get("x-api-key")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        (
            StatusCode::OK,
            format!("{auth}|{key}|{}", uri.query().unwrap_or("")),
        )
            .into_response()
    })
    .await;
    token_is_set();
    let cases = [
        (
            "    auth: { bearer: \"${TM_SRC_TOKEN}\" }\n",
            "Bearer tok-1||a=1",
        ),
        (
            "    auth: { basic: { username: user, password: \"${TM_SRC_TOKEN}\" } }\n",
            "Basic dXNlcjp0b2stMQ==||a=1",
        ),
        (
            "    auth: { api_key: { header: X-Api-Key, value: \"${TM_SRC_TOKEN}\" } }\n",
            "|tok-1|a=1",
        ),
        (
            "    auth: { api_key: { query: key, value: \"k-${TM_SRC_TOKEN}\" } }\n",
            "||a=1&key=k-tok-1",
        ),
    ];
    for (auth, want) in cases {
        let s = HttpSource::new("s", &source(&url, auth)).unwrap();
        let page = s.fetch(&req(&format!("{url}/x?a=1"))).await.unwrap();
        assert_eq!(std::str::from_utf8(&page.body).unwrap(), want);
        assert!(!format!("{s:?}").contains("tok-1"));
    }
}

/// The auth tests' secret comes from .cargo/config.toml ([env]).
fn token_is_set() {
    assert_eq!(
        std::env::var("TM_SRC_TOKEN").as_deref(),
        Ok("tok-1"),
        "set in .cargo/config.toml"
    );
}

#[tokio::test]
async fn an_unset_variable_is_named_and_nothing_is_sent() {
    let (url, hits) = server(|_, _, _| ok("[]")).await;
    let s = HttpSource::new(
        "s",
        &source(&url, "    auth: { bearer: \"${TM_SRC_NEVER_SET}\" }\n"),
    )
    .unwrap();
    let e = s.fetch(&req(&format!("{url}/x"))).await.unwrap_err();
    assert!(e.to_string().contains("TM_SRC_NEVER_SET"), "{e}");
    assert!(e.is_config() && !e.is_transient());
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn server_errors_are_retried_and_client_errors_are_not() {
    let (url, hits) = server(|n, _, uri| match (uri.path(), n) {
        ("/flaky", 0 | 1) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        ("/flaky", _) => ok("[1]"),
        (_, _) => (StatusCode::NOT_FOUND, "no such thing here").into_response(),
    })
    .await;
    let s = HttpSource::new("s", &source(&url, "")).unwrap();
    let page = s.fetch(&req(&format!("{url}/flaky"))).await.unwrap();
    assert_eq!(page.attempts, 3);
    assert_eq!(&page.body[..], b"[1]");
    hits.store(5, Ordering::SeqCst);
    let e = s
        .fetch(&req(&format!("{url}/missing?key=secret")))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(404));
    assert!(!e.is_transient());
    assert!(e.to_string().contains("no such thing here"), "{e}");
    assert!(
        !e.to_string().contains("secret"),
        "query strings never appear: {e}"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 6, "a 404 is not retried");
}

#[tokio::test]
async fn past_max_attempts_the_last_error_is_returned() {
    let (url, hits) = server(|_, _, _| StatusCode::BAD_GATEWAY.into_response()).await;
    let s = HttpSource::new("s", &source(&url, "")).unwrap();
    let e = s.fetch(&req(&format!("{url}/x"))).await.unwrap_err();
    assert_eq!(e.status(), Some(502));
    assert_eq!(hits.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn retry_after_in_seconds_and_as_a_date_is_honoured_and_capped() {
    let (url, _) = server(|n, _, uri| {
        if n % 2 == 1 {
            return ok("[]");
        }
        let value = match uri.path() {
            "/secs" => "1".to_string(),
            "/date" => {
                httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(2))
            }
            _ => "3600".to_string(),
        };
        (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", value)],
            "slow down",
        )
            .into_response()
    })
    .await;
    let s = HttpSource::new("s", &source(&url, "")).unwrap();
    for (path, min, max) in [
        ("/secs", 0.9, 2.0),
        ("/date", 0.9, 2.5),
        ("/capped", 2.9, 4.0),
    ] {
        let t = Instant::now();
        let page = s.fetch(&req(&format!("{url}{path}"))).await.unwrap();
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(page.attempts, 2);
        assert!(secs >= min && secs < max, "{path}: waited {secs}s");
    }
}

#[tokio::test]
async fn a_timeout_is_transient_and_retried() {
    let (url, hits) = server(|_, _, _| ok("[7]")).await;
    let s = HttpSource::new("s", &source(&url, "")).unwrap();
    let page = s.fetch(&req(&format!("{url}/slow"))).await.unwrap();
    assert_eq!(page.attempts, 2);
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    let once = HttpSource::new("s", &source(&url, "")).unwrap();
    hits.store(0, Ordering::SeqCst);
    let e = once
        .fetch_once(&req(&format!("{url}/slow")))
        .await
        .unwrap_err();
    assert!(
        matches!(e, FetchError::Timeout { .. }) && e.is_transient(),
        "{e}"
    );
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

#[tokio::test]
async fn body_limits_and_compression() {
    let (url, _) = server(|_, _, uri| match uri.path() {
        "/big" => "x".repeat(5000).into_response(),
        "/stream" => {
            let chunks =
                (0..10).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'y'; 1000])));
            axum::body::Body::from_stream(futures::stream::iter(chunks)).into_response()
        }
        "/gzip" => ([("content-encoding", "gzip")], gzip(br#"{"ok":true}"#)).into_response(),
        _ => ([("content-encoding", "gzip")], gzip(&vec![b'0'; 1_000_000])).into_response(),
    })
    .await;
    let s = HttpSource::new("s", &source(&url, "    max_body_bytes: 4096\n")).unwrap();
    for path in ["/big", "/stream", "/bomb"] {
        let e = s.fetch(&req(&format!("{url}{path}"))).await.unwrap_err();
        assert!(
            matches!(e, FetchError::TooLarge { limit: 4096, .. }),
            "{path}: {e}"
        );
        assert!(e.to_string().contains("max_body_bytes"));
    }
    let page = s.fetch(&req(&format!("{url}/gzip"))).await.unwrap();
    assert_eq!(&page.body[..], br#"{"ok":true}"#);
}

#[tokio::test]
async fn other_origins_never_receive_a_request() {
    let (other, other_hits) = server(|_, _, _| ok("[]")).await;
    let target = format!("{other}/steal");
    let (url, _) = server(move |_, _, uri| match uri.path() {
        "/same" => (StatusCode::FOUND, [("location", "/landed")]).into_response(),
        "/landed" => ok("[\"landed\"]"),
        _ => (StatusCode::FOUND, [("location", target.clone())]).into_response(),
    })
    .await;
    let s = HttpSource::new("s", &source(&url, "    auth: { bearer: literal-token }\n")).unwrap();
    let e = s.fetch(&req(&format!("{other}/x?k=1"))).await.unwrap_err();
    assert!(matches!(e, FetchError::CrossOrigin { .. }), "{e}");
    let page = s.fetch(&req(&format!("{url}/same"))).await.unwrap();
    assert_eq!(&page.body[..], b"[\"landed\"]");
    let e = s.fetch(&req(&format!("{url}/away"))).await.unwrap_err();
    assert!(
        matches!(e, FetchError::Redirect { .. }) && !e.is_transient(),
        "{e}"
    );
    assert_eq!(other_hits.load(Ordering::SeqCst), 0);
    assert!(!format!("{e} {e:?} {s:?}").contains("literal-token"));
}
