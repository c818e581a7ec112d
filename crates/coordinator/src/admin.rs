//! The admin HTTP API and the status page.
//!
//! - `GET /` the status page (plain HTML and a little JavaScript; it holds
//!   no data, it fetches `api/status` with the token).
//! - `GET /api/status[?feed=F&partition_prefix=P&after=A&limit=N]` every
//!   feed's summary and a page of jobs as JSON ([`ops::StatusReport`]).
//!   With `tenant=T`: that tenant's summary and jobs; `tenants=true`: every
//!   tenant's summary.
//! - `POST /api/feeds/{feed}/pause|resume|retry[?tenant=T&partition=P]`
//! - `POST /api/feeds/{feed}/rewind[?tenant=T&partition=P]` with a JSON body
//!   `{"start": true}`, `{"cursor": "C"}` or `{"time": "2024-01-01T00:00:00Z"}`.
//! - `POST /api/tenants/{tenant}/pause|resume|retry|rewind`: the same on a
//!   tenant's jobs of every feed.
//! - `GET /api/sources/{source}/tenants`, `POST /api/sources/{source}/tenants`
//!   with `{"name": "acme", "vars": {...}}`, and
//!   `DELETE /api/sources/{source}/tenants/{name}[?purge=true]`.
//!
//! Every `/api` request needs `Authorization: Bearer <token>`, the token
//! taken from the environment of the serving process. Tokens are compared
//! as SHA-256 digests in constant time, so neither their content nor their
//! length leaks through timing. Without a configured token every `/api`
//! request is refused: an admin API is never open by accident.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tidemark_core::tenant::Tenant;
use tidemark_state::Operate;

use crate::ops::{self, Action, OpError, RewindTo, Selection};

/// The environment variable that holds the admin token.
pub const TOKEN_ENV: &str = "TIDEMARK_ADMIN_TOKEN";

const STATUS_PAGE: &str = include_str!("status.html");

/// The token an admin request must present, kept only as its digest.
#[derive(Clone)]
pub struct AdminToken(Option<[u8; 32]>);

impl AdminToken {
    /// From `TIDEMARK_ADMIN_TOKEN`; unset or empty: every API request is refused.
    pub fn from_env() -> Self {
        Self::new(std::env::var(TOKEN_ENV).ok().as_deref())
    }

    pub fn new(token: Option<&str>) -> Self {
        AdminToken(
            token
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(|t| Sha256::digest(t.as_bytes()).into()),
        )
    }

    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }

    /// True when `headers` carry the token.
    fn admits(&self, headers: &HeaderMap) -> bool {
        let Some(want) = &self.0 else {
            return false;
        };
        let Some(given) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return false;
        };
        let given: [u8; 32] = Sha256::digest(given.trim().as_bytes()).into();
        given.ct_eq(want).into()
    }
}

#[derive(Clone)]
struct AdminState {
    store: Arc<dyn Operate>,
    token: AdminToken,
}

/// The admin router: the status page and the API over `store`.
pub fn router(store: Arc<dyn Operate>, token: AdminToken) -> Router {
    let state = AdminState { store, token };
    let api = Router::new()
        .route("/api/status", get(status))
        .route("/api/feeds/{feed}/{action}", post(act))
        .route("/api/tenants/{tenant}/{action}", post(act_tenant))
        .route(
            "/api/sources/{source}/tenants",
            get(list_tenants).post(add_tenant),
        )
        .route(
            "/api/sources/{source}/tenants/{name}",
            delete(remove_tenant),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .route("/", get(|| async { Html(STATUS_PAGE) }))
        .merge(api)
        .with_state(state)
}

async fn authorize(State(s): State<AdminState>, req: Request, next: Next) -> Response {
    if s.token.admits(req.headers()) {
        return next.run(req).await;
    }
    let why = if s.token.is_set() {
        "a valid admin token is required (Authorization: Bearer …)"
    } else {
        "the admin API is disabled: set TIDEMARK_ADMIN_TOKEN in the coordinator's environment"
    };
    tracing::warn!(path = %req.uri().path(), "admin request refused: missing or wrong token");
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        axum::Json(serde_json::json!({ "error": why })),
    )
        .into_response()
}

#[derive(Deserialize)]
struct StatusFilter {
    feed: Option<String>,
    tenant: Option<String>,
    #[serde(default)]
    tenants: bool,
    partition_prefix: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

async fn status(State(s): State<AdminState>, Query(q): Query<StatusFilter>) -> Response {
    let q = ops::StatusQuery {
        feed: q.feed,
        tenant: q.tenant,
        tenants: q.tenants,
        partition_prefix: q.partition_prefix,
        after: q.after,
        limit: q.limit.unwrap_or(ops::STATUS_LIMIT).clamp(1, 10_000),
    };
    match ops::status(&*s.store, &q).await {
        Ok(report) => axum::Json(report).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

#[derive(Deserialize)]
struct PartitionFilter {
    tenant: Option<String>,
    partition: Option<String>,
}

/// The body of a rewind: exactly one of the three.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RewindBody {
    #[serde(default)]
    start: bool,
    cursor: Option<String>,
    time: Option<String>,
}

impl RewindBody {
    fn target(self) -> Result<RewindTo, String> {
        match (self.start, self.cursor, self.time) {
            (true, None, None) => Ok(RewindTo::Start),
            (false, Some(c), None) => Ok(RewindTo::Cursor(c)),
            (false, None, Some(t)) => Ok(RewindTo::Time(t)),
            _ => Err(
                r#"a rewind needs exactly one of {"start": true}, {"cursor": "…"}, {"time": "…"}"#
                    .into(),
            ),
        }
    }
}

async fn act(
    State(s): State<AdminState>,
    Path((feed, action)): Path<(String, String)>,
    Query(q): Query<PartitionFilter>,
    body: axum::body::Bytes,
) -> Response {
    let sel = Selection {
        feed: Some(feed),
        tenant: q.tenant,
        partition: q.partition,
    };
    act_on(&s, &sel, &action, &body).await
}

async fn act_tenant(
    State(s): State<AdminState>,
    Path((tenant, action)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    let sel = Selection {
        feed: None,
        tenant: Some(tenant),
        partition: None,
    };
    act_on(&s, &sel, &action, &body).await
}

async fn act_on(s: &AdminState, sel: &Selection, action: &str, body: &[u8]) -> Response {
    let action = match action {
        "pause" => Action::Pause,
        "resume" => Action::Resume,
        "retry" => Action::Retry,
        "rewind" => {
            let parsed: Result<RewindBody, String> = if body.is_empty() {
                Ok(RewindBody::default())
            } else {
                serde_json::from_slice(body).map_err(|e| format!("the body is not valid: {e}"))
            };
            match parsed.and_then(RewindBody::target) {
                Ok(to) => Action::Rewind { to },
                Err(e) => return error(StatusCode::BAD_REQUEST, e),
            }
        }
        other => {
            return error(
                StatusCode::NOT_FOUND,
                format!("unknown action {other:?}: pause, resume, retry or rewind"),
            );
        }
    };
    match ops::apply(&*s.store, sel, &action).await {
        Ok(report) => axum::Json(report).into_response(),
        Err(e) => op_error(e),
    }
}

/// An operation's error as an HTTP answer.
fn op_error(e: OpError) -> Response {
    match e {
        e @ (OpError::UnknownFeed { .. }
        | OpError::UnknownPartition { .. }
        | OpError::UnknownTenant { .. }) => error(StatusCode::NOT_FOUND, e.to_string()),
        e @ OpError::Invalid(_) => error(StatusCode::BAD_REQUEST, e.to_string()),
        e @ OpError::State(_) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn list_tenants(State(s): State<AdminState>, Path(source): Path<String>) -> Response {
    match ops::tenants(&*s.store, &source).await {
        Ok(report) => axum::Json(report).into_response(),
        Err(e) => op_error(e),
    }
}

async fn add_tenant(
    State(s): State<AdminState>,
    Path(source): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let tenant: Tenant = match serde_json::from_slice(&body) {
        Ok(t) => t,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(r#"the body must be {{"name": "...", "vars": {{...}}}}: {e}"#),
            );
        }
    };
    match ops::add_tenant(&*s.store, &source, &tenant).await {
        Ok(new) => {
            axum::Json(serde_json::json!({ "source": source, "tenant": tenant.name, "new": new }))
                .into_response()
        }
        Err(e) => op_error(e),
    }
}

#[derive(Deserialize)]
struct PurgeFilter {
    #[serde(default)]
    purge: bool,
}

async fn remove_tenant(
    State(s): State<AdminState>,
    Path((source, name)): Path<(String, String)>,
    Query(q): Query<PurgeFilter>,
) -> Response {
    match ops::remove_tenant(&*s.store, &source, &name, q.purge).await {
        Ok(report) => axum::Json(report).into_response(),
        Err(e) => op_error(e),
    }
}

fn error(code: StatusCode, message: String) -> Response {
    (code, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_core::checkpoint::{Checkpoint, JobId, Phase};
    use tidemark_state::{EmbeddedStore, Jobs, Leases};

    async fn serve(token: Option<&str>) -> (String, Arc<EmbeddedStore>) {
        let store = Arc::new(EmbeddedStore::in_memory());
        store
            .ensure(&JobId::new("tickets", "all"), &Checkpoint::default())
            .await
            .expect("ensure");
        let app = router(store.clone(), AdminToken::new(token));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (format!("http://{addr}"), store)
    }

    #[tokio::test]
    async fn the_api_refuses_a_missing_or_wrong_token() {
        let (base, store) = serve(Some("s3cret-token")).await;
        let c = reqwest::Client::new();
        let url = format!("{base}/api/status");
        let none = c.get(&url).send().await.expect("send");
        assert_eq!(none.status(), 401);
        assert_eq!(
            none.headers().get("www-authenticate").map(|v| v.as_bytes()),
            Some(&b"Bearer"[..])
        );
        for wrong in ["s3cret-toke", "s3cret-token2", "", "S3CRET-TOKEN"] {
            let r = c.get(&url).bearer_auth(wrong).send().await.expect("send");
            assert_eq!(r.status(), 401, "token {wrong:?}");
        }
        // A wrong token cannot pause either, and nothing changed.
        let r = c
            .post(format!("{base}/api/feeds/tickets/pause"))
            .bearer_auth("nope")
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 401);
        let cp = store.get(&JobId::new("tickets", "all")).await.expect("get");
        assert_eq!(cp.expect("job").phase, Phase::Idle);

        let ok = c
            .get(&url)
            .bearer_auth("s3cret-token")
            .send()
            .await
            .expect("send");
        assert_eq!(ok.status(), 200);
        let report: ops::StatusReport = ok.json().await.expect("json");
        assert_eq!(report.jobs[0].feed, "tickets");

        let paused = c
            .post(format!("{base}/api/feeds/tickets/pause"))
            .bearer_auth("s3cret-token")
            .send()
            .await
            .expect("send");
        assert_eq!(paused.status(), 200);
        let cp = store.get(&JobId::new("tickets", "all")).await.expect("get");
        assert_eq!(cp.expect("job").phase, Phase::Paused);

        let unknown = c
            .post(format!("{base}/api/feeds/nope/pause"))
            .bearer_auth("s3cret-token")
            .send()
            .await
            .expect("send");
        assert_eq!(unknown.status(), 404);
        let bad = c
            .post(format!("{base}/api/feeds/tickets/rewind"))
            .bearer_auth("s3cret-token")
            .body(r#"{"start": true, "cursor": "x"}"#)
            .send()
            .await
            .expect("send");
        assert_eq!(bad.status(), 400);
        // The page itself needs no token: it holds no data.
        let page = c.get(&base).send().await.expect("send");
        assert_eq!(page.status(), 200);
        assert!(page.text().await.expect("body").contains("api/status"));
    }

    /// The tenants of a source are listed, added and removed over the API,
    /// and a tenant's jobs are steered across every feed.
    #[tokio::test]
    async fn tenants_are_managed_and_steered_over_the_api() {
        let (base, store) = serve(Some("tok")).await;
        let config = tidemark_core::config::load_str(
            "t.yaml",
            "sources:\n  helpdesk:\n    base_url: \"https://{tenant}.example/{vars.region}\"\n    tenants: {}\n\
             feeds:\n  - { name: tickets, source: helpdesk, path: /t, records: /t, pagination: { preset: zendesk_cursor }, key: /id }\n",
        )
        .expect("config");
        tidemark_state::registry::publish_config(&*store, &config)
            .await
            .expect("registry");
        store
            .ensure(&JobId::new("tickets", "acme/all"), &Checkpoint::default())
            .await
            .expect("ensure");
        let c = reqwest::Client::new();
        let tenants = format!("{base}/api/sources/helpdesk/tenants");
        let lacking = c
            .post(&tenants)
            .bearer_auth("tok")
            .json(&serde_json::json!({ "name": "acme" }))
            .send()
            .await
            .expect("send");
        assert_eq!(lacking.status(), 400, "vars.region is needed");
        let added = c
            .post(&tenants)
            .bearer_auth("tok")
            .json(&serde_json::json!({ "name": "acme", "vars": { "region": "eu" } }))
            .send()
            .await
            .expect("send");
        assert_eq!(added.status(), 200);
        let list: ops::TenantsReport = c
            .get(&tenants)
            .bearer_auth("tok")
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        assert_eq!(
            list.pending[0].name, "acme",
            "no coordinator applied it yet"
        );
        let paused = c
            .post(format!("{base}/api/tenants/acme/pause"))
            .bearer_auth("tok")
            .send()
            .await
            .expect("send");
        assert_eq!(paused.status(), 200);
        let cp = store
            .get(&JobId::new("tickets", "acme/all"))
            .await
            .expect("get");
        assert_eq!(cp.expect("job").phase, Phase::Paused);
        let st: ops::StatusReport = c
            .get(format!("{base}/api/status?tenant=acme"))
            .bearer_auth("tok")
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        assert_eq!(st.tenants[0].paused, 1);
        let removed = c
            .delete(format!("{tenants}/acme?purge=true"))
            .bearer_auth("tok")
            .send()
            .await
            .expect("send");
        assert_eq!(removed.status(), 200);
        let r: ops::TenantRemoval = removed.json().await.expect("json");
        assert_eq!((r.removed, r.purged), (true, 1));
        let gone = c
            .delete(format!("{tenants}/acme"))
            .bearer_auth("tok")
            .send()
            .await
            .expect("send");
        assert_eq!(gone.status(), 404);
        let plain = c
            .get(format!("{base}/api/sources/nope/tenants"))
            .bearer_auth("tok")
            .send()
            .await
            .expect("send");
        assert_eq!(plain.status(), 400);
    }

    #[test]
    fn a_token_read_from_a_file_with_a_newline_still_matches() {
        let t = AdminToken::new(Some("s3cret\n"));
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            "Bearer s3cret".parse().expect("header"),
        );
        assert!(t.admits(&h));
        h.insert(
            header::AUTHORIZATION,
            "Bearer s3cre".parse().expect("header"),
        );
        assert!(!t.admits(&h));
        assert!(!AdminToken::new(Some(" \n")).is_set());
    }

    #[tokio::test]
    async fn without_a_configured_token_the_api_is_closed() {
        let (base, _) = serve(None).await;
        let r = reqwest::Client::new()
            .get(format!("{base}/api/status"))
            .bearer_auth("")
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 401);
        let body = r.text().await.expect("body");
        assert!(body.contains("TIDEMARK_ADMIN_TOKEN"), "{body}");
    }
}
