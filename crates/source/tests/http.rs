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
    PageRequest::get(url.parse().unwrap())
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

/// A secret file that is not there yet (a new tenant's token still on its
/// way to the pod) is worth a retry; once it appears, the request goes out.
#[tokio::test]
async fn a_missing_secret_file_is_retried_until_it_appears() {
    let (url, hits) = server(|_, h, _| {
        let auth = h
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        if auth == "Bearer late-token" {
            ok("[]")
        } else {
            StatusCode::UNAUTHORIZED.into_response()
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    let s = HttpSource::new(
        "s",
        &source(
            &url,
            &format!(
                "    auth: {{ bearer: \"${{file:{}}}\" }}\n",
                token.display()
            ),
        ),
    )
    .unwrap();
    let e = s.fetch_once(&req(&format!("{url}/x"))).await.unwrap_err();
    assert!(e.is_transient(), "{e}");
    assert!(e.to_string().contains("cannot read the secret file"), "{e}");
    assert_eq!(hits.load(Ordering::SeqCst), 0, "nothing is sent without it");
    std::fs::write(&token, "late-token\n").unwrap();
    s.fetch_once(&req(&format!("{url}/x"))).await.unwrap();
    // A relative path never mends itself.
    let rel = HttpSource::new(
        "s",
        &source(&url, "    auth: { bearer: \"${file:relative/token}\" }\n"),
    )
    .unwrap();
    let e = rel.fetch_once(&req(&format!("{url}/x"))).await.unwrap_err();
    assert!(!e.is_transient(), "{e}");
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

#[tokio::test]
async fn an_allowed_redirect_is_followed_without_any_credential_and_others_are_refused() {
    let seen: Arc<std::sync::Mutex<Vec<(HeaderMap, String)>>> = Arc::default();
    let log = seen.clone();
    let (cdn, cdn_hits) = server(move |_, h, uri| {
        log.lock()
            .unwrap()
            .push((h.clone(), uri.query().unwrap_or_default().to_string()));
        ok("[\"from the cdn\"]")
    })
    .await;
    let (elsewhere, elsewhere_hits) = server(|_, _, _| ok("[]")).await;
    let (to_cdn, to_elsewhere) = (format!("{cdn}/blob"), format!("{elsewhere}/blob"));
    let (url, _) = server(move |_, h, uri| {
        assert_eq!(
            h.get("x-api-key").unwrap(),
            "k3y-value",
            "the source gets its key"
        );
        match uri.path() {
            "/cdn" => (StatusCode::FOUND, [("location", to_cdn.clone())]).into_response(),
            _ => (
                StatusCode::TEMPORARY_REDIRECT,
                [("location", to_elsewhere.clone())],
            )
                .into_response(),
        }
    })
    .await;
    let extra = format!(
        "    auth: {{ api_key: {{ header: X-Api-Key, value: k3y-value }} }}\n    headers: {{ X-Tenant: tenant-secret }}\n    redirects_allowed_to: [\"{cdn}\"]\n"
    );
    let s = HttpSource::new("s", &source(&url, &extra)).unwrap();
    let page = s.fetch(&req(&format!("{url}/cdn"))).await.unwrap();
    assert_eq!(&page.body[..], b"[\"from the cdn\"]");
    assert_eq!(cdn_hits.load(Ordering::SeqCst), 1);
    let (headers, query) = seen.lock().unwrap()[0].clone();
    for (name, value) in &headers {
        let v = value.to_str().unwrap_or_default();
        assert!(
            !v.contains("k3y-value") && !v.contains("tenant-secret"),
            "the other origin saw {name}: {v}"
        );
    }
    assert!(headers.get("authorization").is_none() && query.is_empty());

    let e = s.fetch(&req(&format!("{url}/other"))).await.unwrap_err();
    assert!(
        matches!(e, FetchError::Redirect { .. }) && !e.is_transient(),
        "{e}"
    );
    assert!(e.to_string().contains("redirects_allowed_to"), "{e}");
    assert_eq!(elsewhere_hits.load(Ordering::SeqCst), 0);

    // A key in the query string stays on the source's origin too.
    let (url, _) = {
        let to_cdn = format!("{cdn}/blob");
        server(move |_, _, _| (StatusCode::FOUND, [("location", to_cdn.clone())]).into_response())
            .await
    };
    let extra = format!(
        "    auth: {{ api_key: {{ query: key, value: q-secret }} }}\n    redirects_allowed_to: [\"{cdn}\"]\n"
    );
    let s = HttpSource::new("s", &source(&url, &extra)).unwrap();
    s.fetch(&req(&format!("{url}/x"))).await.unwrap();
    let (_, query) = seen.lock().unwrap()[1].clone();
    assert!(!query.contains("q-secret"), "{query}");
}

#[tokio::test]
async fn header_limits_and_echoed_secrets() {
    let (url, _) = server(|_, h, uri| match uri.path() {
        "/fat" => ([("x-padding", "p".repeat(3000))], "[]").into_response(),
        _ => {
            // An API that echoes the credential in its error body.
            let auth = h
                .get("authorization")
                .unwrap()
                .to_str()
                .unwrap()
                .to_string();
            (StatusCode::BAD_REQUEST, format!("bad token: {auth}")).into_response()
        }
    })
    .await;
    let s = HttpSource::new(
        "s",
        &source(
            &url,
            "    auth: { bearer: echo-me-not }\n    max_header_bytes: 2048\n",
        ),
    )
    .unwrap();
    let e = s.fetch(&req(&format!("{url}/fat"))).await.unwrap_err();
    assert!(
        matches!(e, FetchError::HeadersTooLarge { limit: 2048, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("max_header_bytes"), "{e}");
    let e = s.fetch(&req(&format!("{url}/echo"))).await.unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("bad token: Bearer ***"), "{msg}");
    assert!(!msg.contains("echo-me-not"), "{msg}");
}

/// A token endpoint: checks the client's credentials, issues `tok-N`
/// living `ttl` seconds, counts its requests.
async fn token_server(ttl: u64, body_auth: bool) -> (String, Arc<AtomicUsize>) {
    let issued = Arc::new(AtomicUsize::new(0));
    let n = issued.clone();
    let app = axum::Router::new().route(
        "/oauth/token",
        axum::routing::post(move |h: HeaderMap, body: String| {
            let n = n.clone();
            async move {
                let form: std::collections::HashMap<String, String> =
                    url::form_urlencoded::parse(body.as_bytes()).into_owned().collect();
                let good = if body_auth {
                    form.get("client_id").map(String::as_str) == Some("the-client")
                        && form.get("client_secret").map(String::as_str) == Some("client-s3cret")
                } else {
                    use base64::Engine;
                    let want = format!(
                        "Basic {}",
                        base64::engine::general_purpose::STANDARD.encode("the-client:client-s3cret")
                    );
                    h.get("authorization").and_then(|v| v.to_str().ok()) == Some(want.as_str())
                };
                if form.get("grant_type").map(String::as_str) != Some("client_credentials") || !good {
                    return (
                        StatusCode::UNAUTHORIZED,
                        "{\"error\": \"invalid_client\", \"error_description\": \"client-s3cret is wrong\"}",
                    )
                        .into_response();
                }
                assert_eq!(form.get("scope").map(String::as_str), Some("read:tickets read:users"));
                let i = n.fetch_add(1, Ordering::SeqCst) + 1;
                ok_json(format!(
                    "{{\"access_token\": \"tok-{i}\", \"token_type\": \"Bearer\", \"expires_in\": {ttl}}}"
                ))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/oauth/token", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, issued)
}

fn ok_json(body: String) -> Response {
    ([("content-type", "application/json")], body).into_response()
}

fn oauth_source(api: &str, token_url: &str, client_auth: &str) -> SourceConfig {
    source(
        api,
        &format!(
            "    auth: {{ oauth2_client_credentials: {{ token_url: \"{token_url}\", client_id: the-client, client_secret: client-s3cret, scopes: [\"read:tickets\", \"read:users\"], client_auth: {client_auth} }} }}\n"
        ),
    )
}

#[tokio::test]
async fn oauth2_tokens_are_cached_renewed_before_expiry_and_replaced_once_on_401() {
    let (token_url, issued) = token_server(3600, false).await;
    // The API accepts only the newest token, so a refused one must be replaced.
    let accepted = Arc::new(AtomicUsize::new(1));
    let acc = accepted.clone();
    let (api, hits) = server(move |_, h, _| {
        let want = format!("Bearer tok-{}", acc.load(Ordering::SeqCst));
        if h.get("authorization").and_then(|v| v.to_str().ok()) == Some(want.as_str()) {
            ok("[]")
        } else {
            (StatusCode::UNAUTHORIZED, "expired").into_response()
        }
    })
    .await;
    let s = HttpSource::new("s", &oauth_source(&api, &token_url, "basic")).unwrap();
    for _ in 0..3 {
        s.fetch(&req(&format!("{api}/x"))).await.unwrap();
    }
    assert_eq!(
        issued.load(Ordering::SeqCst),
        1,
        "one token for three requests"
    );

    // The API revokes the token: one 401, a new token, the same request again.
    accepted.store(2, Ordering::SeqCst);
    s.fetch(&req(&format!("{api}/x"))).await.unwrap();
    assert_eq!(issued.load(Ordering::SeqCst), 2);
    assert_eq!(hits.load(Ordering::SeqCst), 5);

    // A token the API keeps refusing: one retry, then the 401 is the error.
    accepted.store(99, Ordering::SeqCst);
    let e = s.fetch(&req(&format!("{api}/x"))).await.unwrap_err();
    assert_eq!(e.status(), Some(401), "{e}");
    assert_eq!(issued.load(Ordering::SeqCst), 3);
    let shown = format!("{e} {e:?} {s:?}");
    assert!(
        !shown.contains("tok-") && !shown.contains("client-s3cret"),
        "{shown}"
    );

    // Short-lived tokens are renewed before they expire.
    let (token_url, issued) = token_server(1, true).await;
    let (api, _) = server(|_, h, _| {
        if h.get("authorization").is_some() {
            ok("[]")
        } else {
            (StatusCode::UNAUTHORIZED, "").into_response()
        }
    })
    .await;
    let s = HttpSource::new("s", &oauth_source(&api, &token_url, "body")).unwrap();
    s.fetch(&req(&format!("{api}/x"))).await.unwrap();
    s.fetch(&req(&format!("{api}/x"))).await.unwrap();
    assert_eq!(issued.load(Ordering::SeqCst), 1);
    tokio::time::sleep(Duration::from_millis(600)).await;
    s.fetch(&req(&format!("{api}/x"))).await.unwrap();
    assert_eq!(
        issued.load(Ordering::SeqCst),
        2,
        "renewed at half its one-second life"
    );
}

#[tokio::test]
async fn oauth2_endpoint_errors_are_clear_and_never_show_the_secret() {
    let (token_url, _) = token_server(3600, false).await;
    let (api, hits) = server(|_, _, _| ok("[]")).await;
    // The endpoint expects Basic; sending the secret in the body fails.
    let s = HttpSource::new("s", &oauth_source(&api, &token_url, "body")).unwrap();
    let e = s.fetch(&req(&format!("{api}/x"))).await.unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(
            e,
            FetchError::Token {
                transient: false,
                ..
            }
        ) && e.is_config(),
        "{msg}"
    );
    assert!(
        msg.contains("invalid_client") && msg.contains("HTTP 401"),
        "{msg}"
    );
    assert!(!msg.contains("client-s3cret"), "{msg}");
    assert_eq!(hits.load(Ordering::SeqCst), 0, "no request without a token");
}

/// A server that answers every request with `f(n, method, body)`.
async fn echo_server(
    f: impl Fn(usize, &str, &[u8]) -> Response + Send + Sync + 'static,
) -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let f = Arc::new(f);
    let app = axum::Router::new().fallback(
        move |method: axum::http::Method, headers: HeaderMap, body: axum::body::Bytes| {
            let n = h.fetch_add(1, Ordering::SeqCst);
            let f = f.clone();
            async move {
                if !body.is_empty() {
                    assert_eq!(
                        headers.get("content-type").and_then(|v| v.to_str().ok()),
                        Some("application/json")
                    );
                }
                f(n, method.as_str(), &body)
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, hits)
}

fn post(url: &str, body: &str, read_only: bool) -> PageRequest {
    PageRequest {
        method: tidemark_core::pagination::Method::Post,
        url: url.parse().unwrap(),
        body: Some(body.as_bytes().to_vec()),
        read_only,
    }
}

#[tokio::test]
async fn a_post_sends_its_body_and_is_retried_only_when_it_only_reads() {
    let (url, hits) = echo_server(|n, method, body| {
        if n % 2 == 0 {
            return StatusCode::BAD_GATEWAY.into_response();
        }
        let echoed = format!(
            r#"{{"method":"{method}","body":{}}}"#,
            std::str::from_utf8(body).unwrap()
        );
        ([("content-type", "application/json")], echoed).into_response()
    })
    .await;
    let s = HttpSource::new("s", &source(&url, "")).unwrap();
    // A read (a GraphQL query, a search): retried after the 502.
    let page = s
        .fetch(&post(&format!("{url}/graphql"), r#"{"query":"q"}"#, true))
        .await
        .unwrap();
    assert_eq!(page.attempts, 2);
    assert_eq!(&page.body[..], br#"{"method":"POST","body":{"query":"q"}}"#);
    // Not marked as a read: the 502 came after the request was received,
    // which may have acted on it. Never sent again.
    hits.store(0, Ordering::SeqCst);
    let e = s
        .fetch(&post(&format!("{url}/orders"), r#"{"a":1}"#, false))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(502));
    assert!(!e.surely_unprocessed());
    assert_eq!(hits.load(Ordering::SeqCst), 1, "sent once");
}

#[tokio::test]
async fn a_post_refused_with_429_is_sent_again_even_when_not_a_read() {
    let (url, hits) = echo_server(|n, _, _| {
        if n == 0 {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", "0")],
                "slow down",
            )
                .into_response();
        }
        ok("[]")
    })
    .await;
    let s = HttpSource::new("s", &source(&url, "")).unwrap();
    let page = s
        .fetch(&post(&format!("{url}/x"), "{}", false))
        .await
        .unwrap();
    assert_eq!(page.attempts, 2);
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

#[test]
fn rate_limit_headers_say_when_to_stop() {
    use tidemark_core::config::RateLimitHeaders;
    use tidemark_source::rate_pause;
    let now = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let h = |pairs: &[(&'static str, &str)]| {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.insert(*k, v.parse().unwrap());
        }
        m
    };
    let default = RateLimitHeaders::default();
    // Some left: no pause.
    assert_eq!(
        rate_pause(
            &default,
            &h(&[
                ("x-ratelimit-remaining", "3"),
                ("x-ratelimit-reset", "1800000010")
            ]),
            now
        ),
        None
    );
    // None left, the reset as a unix time: until then.
    assert_eq!(
        rate_pause(
            &default,
            &h(&[
                ("x-ratelimit-remaining", "0"),
                ("x-ratelimit-reset", "1800000010")
            ]),
            now
        ),
        Some(Duration::from_secs(10))
    );
    // The IETF draft's headers, the reset in seconds from now; they win over X-.
    assert_eq!(
        rate_pause(
            &default,
            &h(&[
                ("ratelimit-remaining", "0"),
                ("ratelimit-reset", "7"),
                ("x-ratelimit-remaining", "50")
            ]),
            now
        ),
        Some(Duration::from_secs(7))
    );
    // A floor leaves room for requests in flight.
    let floor = RateLimitHeaders {
        floor: 5,
        ..Default::default()
    };
    assert_eq!(
        rate_pause(
            &floor,
            &h(&[("x-ratelimit-remaining", "4"), ("x-ratelimit-reset", "2")]),
            now
        ),
        Some(Duration::from_secs(2))
    );
    // Named headers (HubSpot's, GitHub's): only those are read.
    let named = RateLimitHeaders {
        remaining: Some("X-HubSpot-RateLimit-Remaining".into()),
        reset: Some("X-HubSpot-RateLimit-Reset".into()),
        floor: 0,
    };
    assert_eq!(
        rate_pause(
            &named,
            &h(&[("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", "9")]),
            now
        ),
        None
    );
    assert_eq!(
        rate_pause(
            &named,
            &h(&[
                ("x-hubspot-ratelimit-remaining", "0"),
                ("x-hubspot-ratelimit-reset", "3")
            ]),
            now
        ),
        Some(Duration::from_secs(3))
    );
    // No reset given: a second. A reset in the past: a moment.
    assert_eq!(
        rate_pause(&default, &h(&[("x-ratelimit-remaining", "0")]), now),
        Some(Duration::from_secs(1))
    );
    assert_eq!(
        rate_pause(
            &default,
            &h(&[
                ("x-ratelimit-remaining", "0"),
                ("x-ratelimit-reset", "1700000000")
            ]),
            now
        ),
        Some(Duration::from_millis(50))
    );
    // Garbage is no pause.
    assert_eq!(
        rate_pause(&default, &h(&[("x-ratelimit-remaining", "lots")]), now),
        None
    );
}

#[tokio::test]
async fn fetch_waits_for_the_reset_the_headers_announce() {
    let (url, _) = server(|_, _, _| {
        (
            [
                ("content-type", "application/json"),
                ("x-ratelimit-remaining", "0"),
                ("x-ratelimit-reset", "1"),
            ],
            "[]",
        )
            .into_response()
    })
    .await;
    let s = HttpSource::new("s", &source(&url, "    rate_limit_headers: {}\n")).unwrap();
    let first = s.fetch(&req(&format!("{url}/x"))).await.unwrap();
    assert_eq!(first.pause, Some(Duration::from_secs(1)));
    let started = Instant::now();
    s.fetch(&req(&format!("{url}/x"))).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "the second request waited for the reset"
    );
}

#[tokio::test]
async fn a_reset_far_away_pauses_no_longer_than_max_retry_after() {
    // An hour away, as a unix time and as seconds, with custom header names:
    // the source's `max_retry_after` (3 s here) is the longest pause.
    let far = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600)
        .to_string();
    let (url, _) = server(move |_, _, uri| {
        let reset = match uri.path() {
            "/unix" => far.clone(),
            _ => "3600".to_string(),
        };
        (
            [
                ("content-type", "application/json".to_string()),
                ("budget-left", "2".to_string()),
                ("budget-reset", reset),
            ],
            "[]",
        )
            .into_response()
    })
    .await;
    let s = HttpSource::new(
        "s",
        &source(
            &url,
            "    rate_limit_headers: { remaining: Budget-Left, reset: Budget-Reset, floor: 2 }\n",
        ),
    )
    .unwrap();
    for path in ["/unix", "/seconds"] {
        let page = s.fetch_once(&req(&format!("{url}{path}"))).await.unwrap();
        assert_eq!(page.pause, Some(Duration::from_secs(3)), "{path}");
    }
}

#[tokio::test]
async fn an_error_inside_a_200_that_echoes_the_token_is_scrubbed() {
    // Some APIs put the credential they were sent into their error text
    // (an `error_when` message is taken from the body): the job's error
    // must never carry it.
    let (url, _) = server(|_, h, _| {
        let auth = h
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        (
            [("content-type", "application/json")],
            format!(r#"{{"ok": false, "error": "invalid_auth for {auth}"}}"#),
        )
            .into_response()
    })
    .await;
    token_is_set();
    for auth in [
        "    auth: { bearer: \"${TM_SRC_TOKEN}\" }\n",
        "    auth: { basic: { username: user, password: \"${TM_SRC_TOKEN}\" } }\n",
    ] {
        let s = HttpSource::new("s", &source(&url, auth)).unwrap();
        let page = s.fetch_once(&req(&format!("{url}/x"))).await.unwrap();
        let body = std::str::from_utf8(&page.body).unwrap();
        assert!(body.contains("invalid_auth for "), "{body}");
        let message = page.scrub(&format!("page 3: the API answered an error: {body}"));
        assert!(message.contains("invalid_auth for "), "{message}");
        assert!(
            !message.contains("tok-1") && !message.contains("dXNlcjp0b2stMQ=="),
            "a secret in the job's error: {message}"
        );
    }
}
