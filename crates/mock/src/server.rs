//! The HTTP server: routing, tenants, fault injection, admin and ground truth.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;

use crate::comments::{self, CommentsTruth};
use crate::dataset::{Dataset, Truth};
use crate::dialects;
use crate::endpoints::{self, Ctx};
use crate::tenants::{self, Refusal, Route, Tenant};
use crate::{Faults, MockConfig, RateLimitStyle};

// Declared here rather than in lib.rs; the file is src/hostile.rs.
#[path = "hostile.rs"]
mod hostile;

struct Shared {
    config: MockConfig,
    data: Mutex<Dataset>,
    faults: RwLock<Faults>,
    requests: AtomicU64,
    /// Unix ms of the first data request (0: none yet).
    first_request_ms: AtomicI64,
    by_path: Mutex<BTreeMap<String, u64>>,
    /// Access tokens issued by `POST /oauth/token`, newest last.
    tokens: Mutex<Vec<String>>,
    /// Every tenant seen so far, created on first use.
    tenants: Mutex<HashMap<String, Arc<Tenant>>>,
    by_tenant: Mutex<BTreeMap<String, u64>>,
    refused_by_tenant: Mutex<BTreeMap<String, u64>>,
    /// Requests to either comments endpoint.
    comment_requests: AtomicU64,
    /// Requests to a ticket's comments endpoint, by ticket key.
    comments_by_ticket: Mutex<HashMap<String, u64>>,
    batch_comments_by_ticket: Mutex<HashMap<String, u64>>,
    /// Errors inside a 200 injected by `error_200_every`.
    errors_200: AtomicU64,
    /// Data requests refused with 429 because the rate-limit budget was used up.
    rate_limited_429: AtomicU64,
    /// The rate-limit window of each budget: `""` for the main dataset,
    /// else the tenant's name.
    windows: Mutex<HashMap<String, Window>>,
}

/// One budget's current fixed window.
struct Window {
    start_ms: i64,
    used: u64,
}

/// Where a request stands against its rate-limit budget.
struct Budget {
    limit: u64,
    remaining: u64,
    /// Unix ms when the window ends.
    reset_ms: i64,
    style: RateLimitStyle,
}

/// A handle on the mock's state, for tests in the same process.
#[derive(Clone)]
pub struct MockState(Arc<Shared>);

/// Data requests served, in total, per path and per tenant.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub requests: u64,
    /// Unix ms of the first data request, if any (the benchmark's start).
    pub first_request_ms: Option<i64>,
    /// Per request path; a tenant's requests count under their full
    /// `/t/{tenant}/...` path.
    pub by_path: BTreeMap<String, u64>,
    /// Data requests per tenant, refused ones included.
    pub by_tenant: BTreeMap<String, u64>,
    /// A tenant's data requests answered 401 or 429 (for whatever reason:
    /// token, revocation, throttle or an injected fault).
    pub refused_by_tenant: BTreeMap<String, u64>,
    /// Requests to the comments endpoints (per ticket and batch, main and
    /// tenants'), whatever their answer: faults, 401, 429 and 404 count.
    pub comment_requests: u64,
    /// Requests to `/api/v2/tickets/{id}/comments` (the batch endpoint is
    /// not counted here), by ticket: the id for the main dataset,
    /// `{tenant}/{id}` for a tenant's.
    pub comment_requests_by_ticket: BTreeMap<String, u64>,
    /// Per ticket (`[tenant/]id`): the batch requests
    /// (`/api/v2/comments?ticket_ids=…`) that named it.
    #[serde(default)]
    pub batch_comment_requests_by_ticket: BTreeMap<String, u64>,
    /// Errors inside a 200 injected by the `error_200_every` fault.
    pub errors_200: u64,
    /// Data requests answered 429 because the `ratelimit_limit` budget of
    /// their window was used up.
    pub rate_limited_429: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves the data usable; keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MockState {
    pub fn new(config: MockConfig) -> Self {
        let data = Dataset::new(config.records, config.seed, config.record_bytes);
        MockState(Arc::new(Shared {
            faults: RwLock::new(config.faults.clone()),
            config,
            data: Mutex::new(data),
            requests: AtomicU64::new(0),
            first_request_ms: AtomicI64::new(0),
            by_path: Mutex::new(BTreeMap::new()),
            tokens: Mutex::new(Vec::new()),
            tenants: Mutex::new(HashMap::new()),
            by_tenant: Mutex::new(BTreeMap::new()),
            refused_by_tenant: Mutex::new(BTreeMap::new()),
            comment_requests: AtomicU64::new(0),
            comments_by_ticket: Mutex::new(HashMap::new()),
            batch_comments_by_ticket: Mutex::new(HashMap::new()),
            errors_200: AtomicU64::new(0),
            rate_limited_429: AtomicU64::new(0),
            windows: Mutex::new(HashMap::new()),
        }))
    }
    pub fn insert(&self, n: usize) {
        lock(&self.0.data).insert(n);
    }
    pub fn update(&self, n: usize) {
        lock(&self.0.data).update(n);
    }
    pub fn truth(&self) -> Truth {
        lock(&self.0.data).truth()
    }
    /// Delete the `n` oldest tickets (lowest ids) of the main dataset:
    /// they leave every endpoint and `records`, their comments answer 404;
    /// their versions stay in the truth's `versions` and their ids are
    /// listed in its `deleted`. Returns the ids deleted.
    pub fn delete(&self, n: usize) -> Vec<String> {
        lock(&self.0.data).delete(n)
    }
    /// Every comment of every current ticket of the main dataset (what
    /// `GET /_truth/comments` answers).
    pub fn comments_truth(&self) -> CommentsTruth {
        comments::truth(&lock(&self.0.data), &self.0.config.comments)
    }
    pub fn len(&self) -> usize {
        lock(&self.0.data).len()
    }
    pub fn is_empty(&self) -> bool {
        lock(&self.0.data).is_empty()
    }
    /// `name`'s state, creating its dataset on first use.
    fn tenant(&self, name: &str) -> Arc<Tenant> {
        if let Some(t) = lock(&self.0.tenants).get(name) {
            return t.clone();
        }
        // Build outside the lock; if another request won the race, use its.
        let c = &self.0.config;
        let fresh = Arc::new(Tenant::new(name, c.tenant_records, c.seed, c.record_bytes));
        lock(&self.0.tenants)
            .entry(name.to_string())
            .or_insert(fresh)
            .clone()
    }
    /// From now on `tenant`'s data requests answer 401, even with its token.
    pub fn revoke_tenant(&self, tenant: &str) {
        self.tenant(tenant).set_revoked(true);
    }
    /// Undo [`MockState::revoke_tenant`].
    pub fn restore_tenant(&self, tenant: &str) {
        self.tenant(tenant).set_revoked(false);
    }
    /// For the next `d`, `tenant`'s data requests answer 429 with
    /// `Retry-After` (the whole seconds left, at least 1); zero lifts it.
    pub fn throttle_tenant(&self, tenant: &str, d: Duration) {
        self.tenant(tenant).throttle(d);
    }
    /// Add `n` records to `tenant`'s dataset.
    pub fn insert_tenant(&self, tenant: &str, n: usize) {
        lock(&self.tenant(tenant).data).insert(n);
    }
    /// Update `n` of `tenant`'s records.
    pub fn update_tenant(&self, tenant: &str, n: usize) {
        lock(&self.tenant(tenant).data).update(n);
    }
    /// Delete `tenant`'s `n` oldest tickets, like [`MockState::delete`].
    pub fn delete_tenant(&self, tenant: &str, n: usize) -> Vec<String> {
        lock(&self.tenant(tenant).data).delete(n)
    }
    /// `tenant`'s comments truth (what `GET /_truth/comments?tenant=` answers).
    pub fn tenant_comments_truth(&self, tenant: &str) -> CommentsTruth {
        comments::truth(&lock(&self.tenant(tenant).data), &self.0.config.comments)
    }
    /// `tenant`'s ground truth (what `GET /_truth?tenant=` answers).
    pub fn tenant_truth(&self, tenant: &str) -> Truth {
        lock(&self.tenant(tenant).data).truth()
    }
    /// The tenants created so far, sorted.
    pub fn tenants(&self) -> Vec<String> {
        let mut names: Vec<String> = lock(&self.0.tenants).keys().cloned().collect();
        names.sort();
        names
    }
    /// Count one data request to `path`; returns the running total.
    fn count(&self, path: &str) -> u64 {
        let n = self.0.requests.fetch_add(1, Ordering::SeqCst) + 1;
        if n == 1 {
            let _ = self.0.first_request_ms.compare_exchange(
                0,
                crate::cursor::now_ms(),
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
        }
        *lock(&self.0.by_path).entry(path.to_string()).or_insert(0) += 1;
        n
    }
    /// Count a request to `path` (without its tenant prefix) if it is a
    /// comments endpoint.
    fn count_comments(&self, tenant: Option<&str>, path: &str, query: Option<&str>) {
        if !comments::is_comments_path(path) {
            return;
        }
        self.0.comment_requests.fetch_add(1, Ordering::SeqCst);
        let key = |id: &str| match tenant {
            Some(t) => format!("{t}/{id}"),
            None => id.to_string(),
        };
        if let Some(id) = comments::ticket_of_path(path) {
            *lock(&self.0.comments_by_ticket).entry(key(id)).or_insert(0) += 1;
            return;
        }
        let ids = url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
            .filter(|(k, _)| k == "ticket_ids")
            .flat_map(|(_, v)| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect::<std::collections::BTreeSet<String>>();
        let mut counts = lock(&self.0.batch_comments_by_ticket);
        for id in ids {
            *counts.entry(key(&id)).or_insert(0) += 1;
        }
    }
    fn count_tenant(&self, tenant: &str) {
        *lock(&self.0.by_tenant)
            .entry(tenant.to_string())
            .or_insert(0) += 1;
    }
    fn count_refused(&self, tenant: &str) {
        *lock(&self.0.refused_by_tenant)
            .entry(tenant.to_string())
            .or_insert(0) += 1;
    }
    pub fn stats(&self) -> Stats {
        Stats {
            requests: self.0.requests.load(Ordering::SeqCst),
            first_request_ms: Some(self.0.first_request_ms.load(Ordering::SeqCst))
                .filter(|&t| t > 0),
            by_path: lock(&self.0.by_path).clone(),
            by_tenant: lock(&self.0.by_tenant).clone(),
            refused_by_tenant: lock(&self.0.refused_by_tenant).clone(),
            comment_requests: self.0.comment_requests.load(Ordering::SeqCst),
            comment_requests_by_ticket: lock(&self.0.comments_by_ticket)
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            batch_comment_requests_by_ticket: lock(&self.0.batch_comments_by_ticket)
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            errors_200: self.0.errors_200.load(Ordering::SeqCst),
            rate_limited_429: self.0.rate_limited_429.load(Ordering::SeqCst),
        }
    }
    /// Take one request from budget `key`'s window: None when no budget is
    /// set, Ok while the window has room (now counted), Err when it is used
    /// up (not counted).
    fn take_budget(&self, key: &str, faults: &Faults) -> Option<Result<Budget, Budget>> {
        let limit = faults.ratelimit_limit?;
        let window = i64::try_from(faults.ratelimit_window_ms.max(1)).unwrap_or(i64::MAX);
        let now = crate::cursor::now_ms();
        let mut windows = lock(&self.0.windows);
        let w = windows.entry(key.to_string()).or_insert(Window {
            start_ms: now,
            used: 0,
        });
        if now >= w.start_ms.saturating_add(window) {
            *w = Window {
                start_ms: now,
                used: 0,
            };
        }
        let mut budget = Budget {
            limit,
            remaining: 0,
            reset_ms: w.start_ms.saturating_add(window),
            style: faults.ratelimit_style,
        };
        if w.used >= limit {
            return Some(Err(budget));
        }
        w.used += 1;
        budget.remaining = limit - w.used;
        Some(Ok(budget))
    }
    pub fn faults(&self) -> Faults {
        self.0.faults.read().map(|f| f.clone()).unwrap_or_default()
    }
    pub fn set_faults(&self, f: Faults) {
        if let Ok(mut w) = self.0.faults.write() {
            *w = f;
        }
    }
}

/// The mock API's routes.
pub fn router(state: MockState) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/_truth", get(truth))
        .route("/_truth/comments", get(comments_truth))
        .route(
            "/_stats",
            get(|State(s): State<MockState>| async move { axum::Json(s.stats()) }),
        )
        .route("/_admin/insert", post(admin_insert))
        .route("/_admin/update", post(admin_update))
        .route("/_admin/delete", post(admin_delete))
        .route("/_admin/faults", post(admin_faults))
        .route("/_admin/tenants/{tenant}/{action}", post(admin_tenant))
        .route("/hostile/{kind}", get(hostile_page))
        .route("/oauth/token", post(oauth_token))
        .route(
            "/_oauth/tokens",
            get(|State(s): State<MockState>| async move { axum::Json(lock(&s.0.tokens).clone()) }),
        )
        .fallback(data)
        .with_state(state)
}

/// An OAuth2 token endpoint (client credentials): any client with a
/// non-empty id and secret, by HTTP Basic or in the form, gets a new bearer
/// token living an hour. A data request that presents a bearer token of
/// this mock that it did not issue is answered 401.
async fn oauth_token(State(s): State<MockState>, headers: HeaderMap, body: String) -> Response {
    let form: HashMap<String, String> = url::form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.decode(b).ok()
        })
        .and_then(|b| String::from_utf8(b).ok())
        .is_some_and(|pair| {
            pair.split_once(':')
                .is_some_and(|(id, secret)| !id.is_empty() && !secret.is_empty())
        });
    let in_form = form.get("client_id").is_some_and(|v| !v.is_empty())
        && form.get("client_secret").is_some_and(|v| !v.is_empty());
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return json_error(400, "unsupported_grant_type", "only client_credentials");
    }
    if !basic && !in_form {
        return json_error(401, "invalid_client", "no client credentials");
    }
    let token = format!("mock-{:032x}", rand::random::<u128>());
    lock(&s.0.tokens).push(token.clone());
    axum::Json(serde_json::json!({
        "access_token": token, "token_type": "Bearer", "expires_in": 3600,
    }))
    .into_response()
}

/// `GET /_truth`: the main dataset's truth, or `?tenant=T`'s.
async fn truth(State(s): State<MockState>, Query(q): Query<HashMap<String, String>>) -> Response {
    match q.get("tenant") {
        None => axum::Json(s.truth()).into_response(),
        Some(t) if tenants::is_tenant_name(t) => axum::Json(s.tenant_truth(t)).into_response(),
        Some(t) => bad_tenant(t),
    }
}

/// `GET /_truth/comments`: the main dataset's comments, or `?tenant=T`'s.
async fn comments_truth(
    State(s): State<MockState>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    match q.get("tenant") {
        None => axum::Json(s.comments_truth()).into_response(),
        Some(t) if tenants::is_tenant_name(t) => {
            axum::Json(s.tenant_comments_truth(t)).into_response()
        }
        Some(t) => bad_tenant(t),
    }
}

fn bad_tenant(name: &str) -> Response {
    json_error(
        400,
        "invalid_request",
        &format!("{name:?} is not a tenant name ([a-z0-9_-]{{1,63}})"),
    )
}

/// `POST /_admin/tenants/{tenant}/{revoke|restore|throttle?secs=|insert?n=|update?n=|delete?n=}`.
async fn admin_tenant(
    State(s): State<MockState>,
    Path((tenant, action)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if !tenants::is_tenant_name(&tenant) {
        return bad_tenant(&tenant);
    }
    let number = |name: &str, default: u64| -> Result<u64, String> {
        match q.get(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("{name} must be a whole number, got {v:?}")),
        }
    };
    let count = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
    let reply = match action.as_str() {
        "revoke" => {
            s.revoke_tenant(&tenant);
            Ok(serde_json::json!({ "tenant": tenant, "revoked": true }))
        }
        "restore" => {
            s.restore_tenant(&tenant);
            Ok(serde_json::json!({ "tenant": tenant, "revoked": false }))
        }
        "throttle" => number("secs", 60).map(|secs| {
            s.throttle_tenant(&tenant, Duration::from_secs(secs));
            serde_json::json!({ "tenant": tenant, "throttled_secs": secs })
        }),
        "insert" => number("n", 1).map(|n| {
            s.insert_tenant(&tenant, count(n));
            serde_json::json!({ "tenant": tenant, "inserted": n })
        }),
        "update" => number("n", 1).map(|n| {
            s.update_tenant(&tenant, count(n));
            serde_json::json!({ "tenant": tenant, "updated": n })
        }),
        "delete" => number("n", 1).map(|n| {
            let ids = s.delete_tenant(&tenant, count(n));
            serde_json::json!({ "tenant": tenant, "deleted": ids.len(), "ids": ids })
        }),
        other => {
            return json_error(
                404,
                "not_found",
                &format!(
                    "no tenant action {other:?}: revoke, restore, throttle, insert, update, delete"
                ),
            );
        }
    };
    match reply {
        Ok(v) => axum::Json(v).into_response(),
        Err(why) => json_error(400, "invalid_request", &why),
    }
}

async fn admin_insert(
    State(s): State<MockState>,
    Query(q): Query<HashMap<String, usize>>,
) -> impl IntoResponse {
    let n = q.get("n").copied().unwrap_or(1);
    s.insert(n);
    axum::Json(serde_json::json!({ "inserted": n }))
}

async fn admin_update(
    State(s): State<MockState>,
    Query(q): Query<HashMap<String, usize>>,
) -> impl IntoResponse {
    let n = q.get("n").copied().unwrap_or(1);
    s.update(n);
    axum::Json(serde_json::json!({ "updated": n }))
}

/// `POST /_admin/delete?n=`: delete the `n` oldest tickets (default 1).
async fn admin_delete(
    State(s): State<MockState>,
    Query(q): Query<HashMap<String, usize>>,
) -> impl IntoResponse {
    let ids = s.delete(q.get("n").copied().unwrap_or(1));
    axum::Json(serde_json::json!({ "deleted": ids.len(), "ids": ids }))
}

async fn admin_faults(
    State(s): State<MockState>,
    axum::Json(f): axum::Json<Faults>,
) -> impl IntoResponse {
    s.set_faults(f.clone());
    axum::Json(f)
}

/// A hostile API (see `hostile`): counted like a data request, never faulted.
async fn hostile_page(
    State(s): State<MockState>,
    Path(kind): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    s.count(&format!("/hostile/{kind}"));
    hostile::serve(&kind, q.get("cursor").map(String::as_str))
}

async fn index() -> &'static str {
    "tidemark mock API\n\
     GET /api/v2/incremental/tickets/cursor.json?start_time=&cursor=&per_page=&end_time=   zendesk_cursor (seed 003)\n\
     GET /v2/clients/{uuid}/inspections?paginationMode=CURSOR&startAfter=&limit=          start_after (seed 002)\n\
     GET /v2/clients/{uuid}/inspections?updatedSince=&page=&limit=                        page-based incremental (seed 002)\n\
     GET /v1/events?cursor=&limit=&updated_since=&updated_before=&omit_next=1             self_next (seed 001)\n\
     GET /items?starting_at=&limit=&updated_since=&updated_before=                        cursor, base64 keyset (seed 004)\n\
     GET /sync/records?cursor=&limit=&updated_since=                                       cursor, opaque (seed 000)\n\
     GET /jsonapi/records?after=&limit=&updated_since=&updated_before=                    next_url\n\
     GET /github/records?after=&per_page=&since_ms=&until_ms=                             link_header\n\
     GET /paged/records?page=&per_page=                                                   page numbers\n\
     GET /offset/records?offset=&limit=                                                   offsets\n\
     GET /broken/records                                                                  always 500\n\
     GET /hostile/{loop|huge|utf8|types|empty_more}?cursor=                               a good page, then a bad one\n\
     GET /api/v2/tickets/{id}/comments?page[size]=&page[after]=                           a ticket's comments (404: no such ticket)\n\
     GET /api/v2/comments?ticket_ids=id1,id2,...&page[size]=&page[after]=                comments of up to 100 tickets\n\
     \n\
     Request dialects (the same records in change order):\n\
     POST /graphql {\"query\":\"...records...\",\"variables\":{\"first\":N,\"after\":c,\"since\":rfc3339}}\n\
          -> {\"data\":{\"records\":{\"edges\":[{\"cursor\",\"node\"}],\"pageInfo\":{\"endCursor\",\"hasNextPage\"}}}}   GraphQL, Relay edges\n\
     POST /notion/v1/databases/{id}/query {\"page_size\":N,\"start_cursor\":c}                     cursor in the body (null refused)\n\
          -> {\"object\":\"list\",\"results\",\"next_cursor\",\"has_more\",\"type\":\"page_or_database\"}\n\
     POST /es/records/_search {\"size\":N,\"search_after\":[t,id],\"query\":{\"range\":{\"updated_at\":{\"gte\":t}}}}\n\
          -> {\"hits\":{\"total\":{\"value\"},\"hits\":[{\"_id\",\"_source\",\"sort\":[t,id]}]}}     Elasticsearch search_after\n\
     GET /kinto/records?_limit=&_since=&_token=                                          next URL in a Next-Page header\n\
     GET /slack/conversations.history?channel=&limit=&cursor=&oldest=                    Slack: errors inside a 200 (ok:false)\n\
     (a GET endpoint answers POST with 405 and vice versa; POST bodies are JSON, at most 1 MiB)\n\
     GET /_truth  GET /_truth/comments  GET /_stats  POST /_admin/faults\n\
     POST /_admin/insert?n=  POST /_admin/update?n=  POST /_admin/delete?n= (the n oldest tickets)\n\
     \n\
     Tenants: /t/{tenant}/<any endpoint above>, e.g. /t/acme/api/v2/incremental/tickets/cursor.json,\n\
     serves that tenant's own dataset (created on first use; --tenant-records); tenant names match\n\
     [a-z0-9_-]{1,63}; every request needs Authorization: Bearer tok-{tenant} (else 401 invalid_token).\n\
     GET /_truth?tenant=   GET /_truth/comments?tenant=\n\
     POST /_admin/tenants/{tenant}/revoke   POST /_admin/tenants/{tenant}/restore\n\
     POST /_admin/tenants/{tenant}/throttle?secs=   POST /_admin/tenants/{tenant}/insert?n=\n\
     POST /_admin/tenants/{tenant}/update?n=   POST /_admin/tenants/{tenant}/delete?n=\n\
     (/_stats: by_tenant, refused_by_tenant, comment_requests, comment_requests_by_ticket,\n\
      errors_200, rate_limited_429)\n\
     \n\
     Faults (POST /_admin/faults, or flags): fail_429_every, fail_429_first, fail_500_every, slow_every,\n\
     truncate_every, corrupt_every, cursor_ttl_secs, mutate_every, error_200_every (errors inside a 200\n\
     on /graphql and /slack/), ratelimit_limit + ratelimit_window_ms + ratelimit_style x|ietf (a fixed-window\n\
     budget per tenant, else global: X-RateLimit-* or RateLimit-* headers, 429 + Retry-After when used up)\n"
}

fn every(n: u64, k: Option<u64>) -> bool {
    k.is_some_and(|k| k > 0 && n.is_multiple_of(k))
}

fn json_error(status: u16, error: &str, description: &str) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    (
        code,
        axum::Json(serde_json::json!({ "error": error, "description": description })),
    )
        .into_response()
}

/// A JSON body answered as is.
fn json_body(status: u16, body: String) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The largest request body a data endpoint reads.
const MAX_BODY_BYTES: usize = 1 << 20;

/// A data request's body: None when empty, else its JSON.
type ParsedBody = Result<Option<serde_json::Value>, BodyError>;

/// Why a data request's body was refused.
enum BodyError {
    /// Over [`MAX_BODY_BYTES`] (or unreadable): 413.
    TooLarge,
    /// Not JSON: 400, with the parser's complaint.
    NotJson(String),
}

impl BodyError {
    fn response(&self) -> Response {
        match self {
            BodyError::TooLarge => json_error(
                413,
                "payload_too_large",
                &format!("the request body is over {MAX_BODY_BYTES} bytes"),
            ),
            BodyError::NotJson(why) => (
                StatusCode::BAD_REQUEST,
                axum::Json(serde_json::json!({
                    "error": "invalid_request",
                    "error_description": format!("the request body is not JSON: {why}"),
                })),
            )
                .into_response(),
        }
    }
}

async fn read_body(body: Body) -> ParsedBody {
    let bytes = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| BodyError::TooLarge)?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| BodyError::NotJson(e.to_string()))
}

/// Whole seconds from now until unix ms `t`, rounded up (0 once past).
fn secs_until(t: i64) -> i64 {
    let left = t.saturating_sub(crate::cursor::now_ms()).max(0);
    left.saturating_add(999) / 1000
}

/// Announce `b` in `r`'s headers, in its style.
fn budget_headers(r: &mut Response, b: &Budget) {
    let h = r.headers_mut();
    let names = match b.style {
        RateLimitStyle::X => [
            "x-ratelimit-limit",
            "x-ratelimit-remaining",
            "x-ratelimit-reset",
        ],
        RateLimitStyle::Ietf => ["ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"],
    };
    let reset = match b.style {
        RateLimitStyle::X => b.reset_ms.saturating_add(999).div_euclid(1000),
        RateLimitStyle::Ietf if b.remaining == 0 => secs_until(b.reset_ms).max(1),
        RateLimitStyle::Ietf => secs_until(b.reset_ms),
    };
    h.insert(names[0], header::HeaderValue::from(b.limit));
    h.insert(names[1], header::HeaderValue::from(b.remaining));
    h.insert(names[2], header::HeaderValue::from(reset));
}

/// Every request no other route takes: a data endpoint of the main dataset,
/// or of a tenant's under `/t/{tenant}/`, with any method (each endpoint
/// takes GET or POST and answers 405 to the others).
async fn data(
    State(s): State<MockState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let path = uri.path();
    let n = s.count(path);
    match tenants::route(path) {
        Route::Main => s.count_comments(None, path, uri.query()),
        Route::Tenant { name, rest } => s.count_comments(Some(name), rest, uri.query()),
        Route::BadName(_) => {}
    }
    let body = read_body(body).await;
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    match tenants::route(path) {
        Route::Main => {
            if let Some(token) = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer mock-"))
                && !lock(&s.0.tokens)
                    .iter()
                    .any(|t| t.strip_prefix("mock-") == Some(token))
            {
                return json_error(401, "invalid_token", "this token was not issued here");
            }
            let base = format!("http://{host}");
            let req = DataRequest {
                n,
                method: method.as_str(),
                path,
                query: uri.query(),
                body: &body,
                base: &base,
                budget: "",
            };
            serve(&s, &s.0.data, req).await
        }
        Route::BadName(name) => json_error(
            404,
            "not_found",
            &format!("{name:?} is not a tenant name ([a-z0-9_-]{{1,63}})"),
        ),
        Route::Tenant { name, rest } => {
            s.count_tenant(name);
            let tenant = s.tenant(name);
            let auth = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            let reply = match tenant.admit(name, auth) {
                Err(Refusal::Unauthorized(why)) => {
                    let mut r = json_error(401, "invalid_token", &why);
                    r.headers_mut().insert(
                        header::WWW_AUTHENTICATE,
                        header::HeaderValue::from_static("Bearer error=\"invalid_token\""),
                    );
                    r
                }
                Err(Refusal::Throttled(secs)) => {
                    let mut r =
                        json_error(429, "rate_limited", &format!("tenant {name} is throttled"));
                    r.headers_mut()
                        .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
                    r
                }
                Ok(()) => {
                    let base = format!("http://{host}{}{name}", tenants::TENANT_PREFIX);
                    let req = DataRequest {
                        n,
                        method: method.as_str(),
                        path: rest,
                        query: uri.query(),
                        body: &body,
                        base: &base,
                        budget: name,
                    };
                    serve(&s, &tenant.data, req).await
                }
            };
            if matches!(reply.status().as_u16(), 401 | 429) {
                s.count_refused(name);
            }
            reply
        }
    }
}

/// A data request on its way to an endpoint.
struct DataRequest<'a> {
    /// Its number among all data requests (what the faults count).
    n: u64,
    method: &'a str,
    /// The endpoint's path, without a tenant prefix.
    path: &'a str,
    query: Option<&'a str>,
    body: &'a ParsedBody,
    /// Next URLs start with this.
    base: &'a str,
    /// Its rate-limit budget: `""` for the main dataset, else the tenant.
    budget: &'a str,
}

/// Serve `req` from `data`: the rate-limit budget first (429 when used
/// up; 2xx answers carry its headers), then [`answer`].
async fn serve(s: &MockState, data: &Mutex<Dataset>, req: DataRequest<'_>) -> Response {
    let faults = s.faults();
    let budget = match s.take_budget(req.budget, &faults) {
        None => None,
        Some(Ok(b)) => Some(b),
        Some(Err(b)) => {
            s.0.rate_limited_429.fetch_add(1, Ordering::SeqCst);
            let mut r = json_error(
                429,
                "rate_limited",
                "the rate limit of this window is used up",
            );
            r.headers_mut().insert(
                header::RETRY_AFTER,
                header::HeaderValue::from(secs_until(b.reset_ms).max(1)),
            );
            budget_headers(&mut r, &b);
            return r;
        }
    };
    let mut r = answer(s, data, &req, &faults).await;
    if let Some(b) = budget
        && r.status().is_success()
    {
        budget_headers(&mut r, &b);
    }
    r
}

/// Answer `req` from `data`, after the latency, the body check and the
/// faults.
async fn answer(
    s: &MockState,
    data: &Mutex<Dataset>,
    req: &DataRequest<'_>,
    faults: &Faults,
) -> Response {
    let n = req.n;
    let cfg = &s.0.config;
    if !cfg.latency.is_zero() {
        tokio::time::sleep(cfg.latency).await;
    }
    if every(n, faults.mutate_every) {
        let mut d = lock(data);
        d.insert(faults.mutate_count);
        d.update(faults.mutate_count);
    }
    if n <= faults.fail_429_first || every(n, faults.fail_429_every) {
        let mut r = json_error(429, "rate_limited", "too many requests");
        r.headers_mut().insert(
            header::RETRY_AFTER,
            header::HeaderValue::from(faults.retry_after_secs),
        );
        return r;
    }
    if every(n, faults.fail_500_every) {
        return json_error(500, "internal", "injected server error");
    }
    if every(n, faults.error_200_every)
        && let Some(body) = dialects::error_200_body(req.path, faults.retry_after_secs)
    {
        s.0.errors_200.fetch_add(1, Ordering::SeqCst);
        return json_body(200, body);
    }
    let body = match req.body {
        Ok(b) => b.as_ref(),
        Err(e) => return e.response(),
    };
    if every(n, faults.slow_every) {
        tokio::time::sleep(Duration::from_millis(faults.slow_ms)).await;
    }
    let q: HashMap<String, String> =
        url::form_urlencoded::parse(req.query.unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let ctx = Ctx {
        base: req.base,
        default_page_size: cfg.page_size.max(1),
        max_page_size: cfg.max_page_size.max(1),
        visible_until: (!cfg.hide_newest.is_zero())
            .then(|| chrono::Utc::now().timestamp() - cfg.hide_newest.as_secs() as i64),
        cursor_ttl_ms: faults.cursor_ttl_secs.map(|t| t as i64 * 1000),
        comments: &cfg.comments,
        method: req.method,
        body,
    };
    let reply = {
        let d = lock(data);
        endpoints::serve(&d, req.path, &q, &ctx)
    };
    let reply = match reply {
        Ok(r) => r,
        Err(e) => {
            return match e.body {
                Some(body) => json_body(e.status, body),
                None => json_error(e.status, e.error, &e.description),
            };
        }
    };
    if every(n, faults.corrupt_every) {
        return (
            [(header::CONTENT_TYPE, "application/json")],
            "{\"broken\": [1, 2,",
        )
            .into_response();
    }
    let mut builder = Response::builder()
        .status(200)
        .header(header::CONTENT_TYPE, "application/json");
    for (k, v) in &reply.headers {
        builder = builder.header(*k, v);
    }
    let body = if every(n, faults.truncate_every) {
        let full = reply.body.into_bytes();
        builder = builder.header(header::CONTENT_LENGTH, full.len());
        let half = bytes::Bytes::copy_from_slice(&full[..full.len() / 2]);
        let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = vec![
            Ok(half),
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "injected truncation",
            )),
        ];
        Body::from_stream(futures::stream::iter(chunks))
    } else {
        Body::from(reply.body)
    };
    builder
        .body(body)
        .unwrap_or_else(|_| json_error(500, "internal", "cannot build the response"))
}

/// A running mock server.
pub struct MockServer {
    addr: SocketAddr,
    state: MockState,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl MockServer {
    /// Listen on `addr` (port 0 picks a free port) and serve until shut down.
    pub async fn start(config: MockConfig, addr: SocketAddr) -> std::io::Result<MockServer> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = MockState::new(config);
        let app = router(state.clone());
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async {
                let _ = rx.await;
            });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "mock API server failed");
            }
        });
        Ok(MockServer {
            addr,
            state,
            stop,
            task,
        })
    }
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub fn state(&self) -> MockState {
        self.state.clone()
    }
    pub async fn shutdown(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}
