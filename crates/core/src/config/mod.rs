//! The feed config: the user-facing contract of DESIGN.md ("Feed config").
//!
//! Types here mirror the YAML one to one and reject unknown fields. Loading
//! ([`load`]) parses, then validates everything that serde cannot check
//! (references between sections, pointers, presets, mixed pagination
//! styles), and reports each problem as `file:line:col: field.path: reason`.
//! [`json_schema`] describes the same contract for editors and other tools.

mod feed;
mod load;
mod preset;
mod schema;

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};
use url::Url;

use crate::duration::Duration;
use crate::pointer::JsonPointer;
use crate::secret::Secret;
use crate::tenant::Tenant;
use crate::timefmt::TimeFormat;

pub(crate) use feed::map_strings;
pub use feed::{DEFAULT_PARTITION, MAX_PARTITIONS, Partition};
pub use load::{
    ConfigError, ConfigErrors, load_file, load_str, load_tenants, load_tenants_file,
    load_tenants_str, tenant_vars_used, validate,
};
pub use preset::{CursorFrom, NextUrlFrom, PageStyle, PaginationSpec, Preset, Strategy};
pub use schema::json_schema;

/// Default maximum size of one response body.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 64 * 1024 * 1024;
/// Default request timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A whole config file.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The API hosts, by name; a feed names its source.
    #[serde(default)]
    pub sources: BTreeMap<String, SourceConfig>,
    /// The streams of records to sync.
    #[serde(default)]
    pub feeds: Vec<FeedConfig>,
}

impl Config {
    pub fn feed(&self, name: &str) -> Option<&FeedConfig> {
        self.feeds.iter().find(|f| f.name == name)
    }
    /// The child feeds of `parent`, in config order.
    pub fn children_of<'a>(&'a self, parent: &'a str) -> impl Iterator<Item = &'a FeedConfig> + 'a {
        self.feeds
            .iter()
            .filter(move |f| f.parent.as_ref().is_some_and(|p| p.feed == parent))
    }
    pub fn source_of(&self, feed: &FeedConfig) -> Option<&SourceConfig> {
        self.sources.get(&feed.source)
    }
}

/// One API host.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// `http(s)://host[:port][/prefix]`; a feed's `path` is appended to the
    /// prefix. A tenanted source may use `{tenant}` and `{vars.NAME}` here.
    pub base_url: BaseUrl,
    #[serde(default)]
    pub auth: Option<AuthConfig>,
    /// A limit on the requests to this source across every worker (`pull` does not apply it).
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
    /// Timeout of one request, connect to last body byte. Default 30s.
    #[serde(default)]
    pub timeout: Option<Duration>,
    /// Extra headers sent with every request (values may hold `${VAR}`).
    #[serde(default)]
    pub headers: BTreeMap<String, Secret>,
    #[serde(default)]
    pub retry: Option<RetryConfig>,
    /// Largest response body accepted, in bytes. Default 64 MiB.
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub max_body_bytes: Option<u64>,
    /// Most records one page may hold. Default 100,000.
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub max_records_per_page: Option<usize>,
    /// Longest cursor (or next URL) accepted, in bytes. Default 8 KiB.
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub max_cursor_bytes: Option<usize>,
    /// Largest total size of a response's headers, in bytes. Default 64 KiB.
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub max_header_bytes: Option<usize>,
    /// Origins (`https://cdn.example.com`) that a redirect may lead to. Such
    /// a redirect is followed without any credential or configured header;
    /// a redirect to any other origin is an error.
    #[serde(default)]
    pub redirects_allowed_to: Vec<Url>,
    /// Run every feed of this source once per tenant (account): from a
    /// file, a list, or `tidemark tenants add`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenants: Option<TenantsConfig>,
    /// Slow down before a 429: when a response says the remaining requests
    /// are at `floor` or below, pause the source (or tenant) until the
    /// reset, across every worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_headers: Option<RateLimitHeaders>,
}

/// The rate-limit headers a source sends, and when to stop for them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitHeaders {
    /// The header with the requests left. Default: `RateLimit-Remaining`,
    /// else `X-RateLimit-Remaining`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remaining: Option<String>,
    /// The header with when the budget resets: seconds from now, or a unix
    /// time in seconds (a value above 1,000,000,000). Default:
    /// `RateLimit-Reset`, else `X-RateLimit-Reset`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reset: Option<String>,
    /// Pause when the remaining count is at or below this. Default 0.
    pub floor: u64,
}

/// The tenants of a source. Those of `file` and `list` and those added with
/// `tidemark tenants add` (or the admin API) together are its tenants.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantsConfig {
    /// A YAML file listing tenants (`- acme` or `- { name: acme, vars: {...} }`),
    /// re-read when it changes. A relative path is taken from the config
    /// file's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Tenants written in the config.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub list: Vec<Tenant>,
    /// Also count pages, records and fetch errors per tenant
    /// (`tidemark_tenant_*` series: one set per feed and tenant).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub metrics: bool,
}

/// A source's base URL: a URL, or for a tenanted source a template of one.
#[derive(Debug, Clone, PartialEq)]
pub struct BaseUrl {
    text: String,
    /// Parsed when the text holds no template.
    url: Option<Url>,
}

impl BaseUrl {
    /// The URL; an error for a template not yet filled for a tenant.
    pub fn url(&self) -> Result<&Url, String> {
        self.url
            .as_ref()
            .ok_or_else(|| format!("base_url {:?} is a template: it needs a tenant", self.text))
    }
    pub fn as_str(&self) -> &str {
        &self.text
    }
    /// True when it holds `{tenant}` or `{vars.NAME}`.
    pub fn is_template(&self) -> bool {
        self.url.is_none()
    }
    /// The URL of `tenant`.
    pub fn fill(&self, tenant: &Tenant) -> Result<BaseUrl, String> {
        if self.url.is_some() {
            return Ok(self.clone());
        }
        let text = crate::tenant::substitute_at(&self.text, tenant, crate::tenant::Place::BaseUrl)?;
        let url = Url::parse(&text)
            .map_err(|e| format!("base_url of tenant {} ({text:?}): {e}", tenant.name))?;
        Ok(BaseUrl {
            text,
            url: Some(url),
        })
    }
}

impl From<Url> for BaseUrl {
    fn from(url: Url) -> Self {
        BaseUrl {
            text: url.as_str().to_string(),
            url: Some(url),
        }
    }
}

impl std::str::FromStr for BaseUrl {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        if !crate::tenant::refs(text).is_empty() {
            return Ok(BaseUrl {
                text: text.to_string(),
                url: None,
            });
        }
        Url::parse(text)
            .map(BaseUrl::from)
            .map_err(|e| format!("{e}: {text:?}"))
    }
}

impl Serialize for BaseUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for BaseUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for BaseUrl {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "BaseUrl".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "An http(s) URL; a tenanted source may use {tenant} and {vars.NAME}."
        })
    }
}

impl SourceConfig {
    pub fn timeout(&self) -> std::time::Duration {
        self.timeout.unwrap_or(DEFAULT_TIMEOUT).std()
    }
    pub fn max_body_bytes(&self) -> u64 {
        self.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES)
    }
    pub fn retry(&self) -> RetryConfig {
        self.retry.clone().unwrap_or_default()
    }
    pub fn max_records_per_page(&self) -> usize {
        self.max_records_per_page
            .unwrap_or(DEFAULT_MAX_RECORDS_PER_PAGE)
    }
    pub fn max_cursor_bytes(&self) -> usize {
        self.max_cursor_bytes
            .unwrap_or(crate::pagination::DEFAULT_MAX_CURSOR_LEN)
    }
    pub fn max_header_bytes(&self) -> usize {
        self.max_header_bytes.unwrap_or(DEFAULT_MAX_HEADER_BYTES)
    }
    /// The query parameters that carry a credential (an `api_key` in the
    /// query): never stored in a next URL.
    pub fn secret_query_params(&self) -> Vec<String> {
        self.auth
            .iter()
            .filter_map(|a| a.api_key.as_ref()?.query.clone())
            .collect()
    }

    /// True when every feed of this source runs once per tenant.
    pub fn is_tenanted(&self) -> bool {
        self.tenants.is_some()
    }

    /// Whose budget the rate limit (and a `Retry-After` pause) is.
    pub fn rate_scope(&self) -> RateScope {
        match self.rate_limit.as_ref().and_then(|r| r.per) {
            Some(p) => p,
            None if self.is_tenanted() => RateScope::Tenant,
            None => RateScope::Source,
        }
    }

    /// The key of the shared rate limiter and pause for `tenant`'s requests:
    /// the source's name, or `<source>/<tenant>` when each tenant has its own.
    pub fn limit_key(&self, source: &str, tenant: Option<&str>) -> String {
        match (self.rate_scope(), tenant) {
            (RateScope::Tenant, Some(t)) => crate::tenant::job_partition(source, t),
            _ => source.to_string(),
        }
    }

    /// This source as `tenant` sees it: its templates filled in.
    pub fn for_tenant(&self, tenant: &Tenant) -> Result<SourceConfig, String> {
        let fill = |s: &Secret| -> Result<Secret, String> {
            Ok(Secret::new(crate::tenant::substitute_at(
                s.template(),
                tenant,
                crate::tenant::Place::Secret,
            )?))
        };
        let mut out = self.clone();
        out.base_url = self.base_url.fill(tenant)?;
        for v in out.headers.values_mut() {
            *v = fill(v)?;
        }
        if let Some(a) = out.auth.as_mut() {
            if let Some(b) = a.bearer.as_mut() {
                *b = fill(b)?;
            }
            if let Some(b) = a.basic.as_mut() {
                b.username = fill(&b.username)?;
                b.password = fill(&b.password)?;
            }
            if let Some(k) = a.api_key.as_mut() {
                k.value = fill(&k.value)?;
            }
            if let Some(o) = a.oauth2_client_credentials.as_mut() {
                o.client_id = fill(&o.client_id)?;
                o.client_secret = fill(&o.client_secret)?;
            }
        }
        Ok(out)
    }
}

/// Default of `max_records_per_page`.
pub const DEFAULT_MAX_RECORDS_PER_PAGE: usize = 100_000;
/// Default of `max_header_bytes`.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;

/// How requests authenticate: exactly one of `bearer`, `basic`, `api_key`, `oauth2_client_credentials`.
/// Every secret may be a `${VAR}` reference.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// `Authorization: Bearer <token>`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer: Option<Secret>,
    /// `Authorization: Basic base64(username:password)`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basic: Option<BasicAuth>,
    /// A key in a header (`header: X-Api-Key`) or a query parameter (`query: api_key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<ApiKeyAuth>,
    /// OAuth2 client credentials (RFC 6749 section 4.4): a token from
    /// `token_url`, cached, refreshed before it expires, sent as a bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth2_client_credentials: Option<OAuth2Auth>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OAuth2Auth {
    /// The token endpoint (may be on another origin than the API: only the
    /// client credentials go there, and the token only to the API).
    pub token_url: Url,
    /// The client id (`${VAR}` or `${file:/path}` allowed).
    pub client_id: Secret,
    /// The client secret (`${VAR}` or `${file:/path}` allowed).
    pub client_secret: Secret,
    /// Sent space-separated as `scope`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// Sent as `audience` (Auth0 and others ask for it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// How the client authenticates to the token endpoint.
    #[serde(default)]
    pub client_auth: ClientAuth,
}

/// `basic`: HTTP Basic with the client id and secret (RFC 6749 section
/// 2.3.1, which every server must support); `body`: `client_id` and
/// `client_secret` in the form body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    #[default]
    Basic,
    Body,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BasicAuth {
    /// The user name (`${VAR}` or `${file:/path}` allowed).
    pub username: Secret,
    /// The password (`${VAR}` or `${file:/path}` allowed).
    pub password: Secret,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyAuth {
    /// The header that carries the key (set this or `query`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// The query parameter that carries the key (set this or `header`); it is
    /// never stored in a next URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// The key (`${VAR}` or `${file:/path}` allowed).
    pub value: Secret,
}

impl AuthConfig {
    /// Every secret this auth holds.
    pub fn secrets(&self) -> Vec<&Secret> {
        let mut v = Vec::new();
        if let Some(b) = &self.bearer {
            v.push(b);
        }
        if let Some(b) = &self.basic {
            v.push(&b.username);
            v.push(&b.password);
        }
        if let Some(k) = &self.api_key {
            v.push(&k.value);
        }
        if let Some(o) = &self.oauth2_client_credentials {
            v.push(&o.client_id);
            v.push(&o.client_secret);
        }
        v
    }
}

/// A rate limit shared by every worker that calls the source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Requests per second, above 0.
    #[schemars(extend("exclusiveMinimum" = 0))]
    pub per_second: f64,
    /// Requests allowed at once after a quiet spell. Default: `per_second` rounded up.
    #[serde(default)]
    pub burst: Option<u32>,
    /// Whose budget this is: `tenant` (each tenant its own; the default for
    /// a tenanted source) or `source` (one for all tenants).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per: Option<RateScope>,
}

/// Who shares one rate budget (and one `Retry-After` pause).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RateScope {
    /// Every request to the source, whatever its tenant.
    Source,
    /// Each tenant's requests on their own.
    Tenant,
}

/// Retries of one request inside the HTTP client (timeouts, 5xx, 429).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts in total, the first included. 1 disables retries.
    #[schemars(range(min = 1))]
    pub max_attempts: u32,
    /// First backoff; doubles each attempt, with full jitter.
    pub base_delay: Duration,
    /// Largest backoff between two attempts.
    pub max_delay: Duration,
    /// Largest Retry-After honoured; a longer one is capped to this.
    pub max_retry_after: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(300),
        }
    }
}

/// One stream of records from a source.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FeedConfig {
    /// Unique; letters, digits, `_` and `-` (it becomes part of routing keys).
    #[schemars(regex(pattern = r"^[A-Za-z0-9_-]+$"))]
    pub name: String,
    /// A key of `sources`.
    pub source: String,
    /// Appended to the source's `base_url`; may carry a query string.
    pub path: String,
    /// Fixed query parameters sent with every request (not added to followed
    /// next URLs, which carry their own).
    #[serde(default, deserialize_with = "scalar_map")]
    #[schemars(schema_with = "schema::scalar_map")]
    pub params: BTreeMap<String, String>,
    /// JSON pointer to the array of records; `""` means the body is the array.
    /// Presets supply one where their seed fixes it.
    #[serde(default)]
    pub records: Option<JsonPointer>,
    /// How one page leads to the next: a preset, or the fields of one style.
    #[serde(default)]
    pub pagination: PaginationConfig,
    /// JSON pointer to the record's identity (e.g. `/id`).
    pub key: JsonPointer,
    /// JSON pointer to the record's version (e.g. `/updated_at`).
    #[serde(default)]
    pub version: Option<JsonPointer>,
    #[serde(default)]
    pub start: Option<StartConfig>,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub incremental: Option<IncrementalConfig>,
    /// Time between the end of one walk and the next poll. Default 5m.
    #[serde(default)]
    pub every: Option<Duration>,
    /// How far behind the high-water mark (or T0) a restart begins. Default 0s.
    #[serde(default)]
    pub lag: Option<Duration>,
    #[serde(default)]
    pub partitions: Option<PartitionsConfig>,
    #[serde(default)]
    pub delivery: DeliveryConfig,
    /// Which error responses to a request that carried a cursor mean "this
    /// cursor expired or is no longer accepted": the job then restarts from
    /// its high-water mark minus `lag`.
    #[serde(default)]
    pub cursor_expired: CursorExpiredConfig,
    /// Makes this a child feed: one job per record of the parent feed, run
    /// when that record is new or changed, its `{name}` templates filled
    /// from the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentConfig>,
    /// The HTTP method of every request: `GET` (the default), `POST` or
    /// `QUERY`. A body (`body:`, or a value placed with `body:/pointer`)
    /// needs the method written out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<Method>,
    /// A JSON body sent with every request (a GraphQL query and its
    /// variables, a search). Values the chain places with `body:/pointer`
    /// (cursor, page size, start time, partition) are written into a copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<serde_json::Value>,
    /// This request only reads (a GraphQL query, a search): it may be
    /// retried after a response may have been produced. `GET` and `QUERY`
    /// always are; a `POST` is retried only when this is `true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
    /// JSON pointer applied to each element of the records array to choose
    /// what is delivered (`/node` of a GraphQL edge, `/_source` of a search
    /// hit). `key` and `version` read the record as delivered;
    /// `last_record:` reads the element as the API sent it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<JsonPointer>,
    /// Conditions on the body of a 2xx answer that make it an error (Slack's
    /// `ok: false`, GraphQL's `errors`); the first that holds decides.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub error_when: Vec<ErrorWhen>,
}

/// The HTTP method of a feed's requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Method {
    #[default]
    Get,
    Post,
    /// The safe method with a body (draft-ietf-httpbis-safe-method-w-body).
    Query,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Query => "QUERY",
        }
    }
}

/// A condition on the body of a 2xx answer that makes it an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorWhen {
    /// The body value the condition reads.
    pub pointer: JsonPointer,
    /// The condition holds when the value equals this (JSON equality:
    /// `false` is not `"false"`; `null` is a value). Set this or `not_empty`.
    #[serde(
        default,
        deserialize_with = "present_value",
        skip_serializing_if = "Option::is_none"
    )]
    pub equals: Option<serde_json::Value>,
    /// The condition holds when the value is present and not null, `""`,
    /// `[]` or `{}`. Set this or `equals`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub not_empty: bool,
    /// Body pointer to the error's message (shown in the job's error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<JsonPointer>,
    /// `true`: retried with backoff (a rate limit, a timeout); `false` (the
    /// default): the job fails.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub transient: bool,
    /// Body pointer to seconds to wait before retrying (transient only);
    /// the source is paused that long across every worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<JsonPointer>,
}

/// A child feed's link to its parent (DESIGN.md, "Parent and child feeds").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ParentConfig {
    /// The parent feed's name (a feed of this config; it may be a child itself).
    pub feed: String,
    /// Values taken from each parent record, by name: `{name}` in this
    /// feed's `path` and `params` is replaced with the value at the JSON
    /// pointer (percent-encoded in the path). Required unless `batch`.
    #[serde(default)]
    pub vars: BTreeMap<String, JsonPointer>,
    /// When a child runs: `change`, when its parent record is new or its
    /// version changed.
    #[serde(default)]
    pub on: ParentTrigger,
    /// What a 404 answer to a child's request means: `skip` (its parent was
    /// deleted: the child is idle with the error noted, nothing fails) or
    /// `fail` (the child job fails).
    #[serde(default)]
    pub on_missing: OnMissing,
    /// Many parents in one request: `{ids}` in the path or params is the
    /// keys of up to `size` changed parent records, joined by `separator`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchConfig>,
}

/// A batched child feed: one request chain for many parent records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Parent records per request chain, 1 to 1000.
    pub size: u32,
    /// What joins the keys in `{ids}`.
    #[serde(default = "default_separator")]
    pub separator: String,
    /// JSON pointer to the parent's key in each child record: its
    /// `x-parent-key` and part of its message id.
    pub parent_key: JsonPointer,
    /// Batches that run at once (per tenant), 1 to 64.
    #[serde(default = "default_parallel")]
    pub parallel: u32,
}

fn default_separator() -> String {
    ",".into()
}

fn default_parallel() -> u32 {
    4
}

/// When a child job runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ParentTrigger {
    /// When its parent record is new or its version (else its bytes) changed.
    #[default]
    Change,
}

/// What a child's 404 means.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnMissing {
    /// The parent is gone: note it on the child, which waits for its parent again.
    #[default]
    Skip,
    /// Fail the child job.
    Fail,
}

/// Default pause between two polls of a feed.
pub const DEFAULT_EVERY: Duration = Duration::from_secs(300);

/// Error responses that mean a cursor expired or was rejected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CursorExpiredConfig {
    /// HTTP statuses that may mean it.
    pub status: Vec<u16>,
    /// The response body must contain one of these (case-insensitive); empty: any body.
    pub body_contains: Vec<String>,
}

impl Default for CursorExpiredConfig {
    fn default() -> Self {
        Self {
            status: vec![400, 404, 410, 422],
            body_contains: vec!["cursor".into(), "expired".into()],
        }
    }
}

impl CursorExpiredConfig {
    /// True when an error answer (`status`, `body`) to a cursor request means the cursor is gone.
    pub fn matches(&self, status: u16, body: &str) -> bool {
        if !self.status.contains(&status) {
            return false;
        }
        if self.body_contains.is_empty() {
            return true;
        }
        let body = body.to_ascii_lowercase();
        self.body_contains
            .iter()
            .any(|needle| body.contains(&needle.to_ascii_lowercase()))
    }
}

/// The pagination block as written. A preset fills the fields left unset.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PaginationConfig {
    /// A named API style that fills the fields it fixes; fields set by hand win.
    #[serde(default)]
    #[schemars(with = "Option<Preset>")]
    pub preset: Option<String>,
    /// The query parameter that carries the cursor.
    #[serde(default)]
    pub cursor_param: Option<String>,
    /// A body pointer, `link:next`, `header:NAME` or `last_record:/pointer`.
    #[serde(default)]
    #[schemars(schema_with = "schema::next_cursor")]
    pub next_cursor: Option<String>,
    /// A body pointer to the full URL of the next page, or `link:next`.
    #[serde(default)]
    #[schemars(schema_with = "schema::next_url")]
    pub next_url: Option<String>,
    /// Body pointer to the cursor of the page just read (seed 001's `Self`).
    #[serde(default)]
    pub self_cursor: Option<JsonPointer>,
    /// Body pointer to a boolean; `false` ends the stream.
    #[serde(default)]
    pub has_more: Option<JsonPointer>,
    /// Body pointer to a boolean; `true` ends the stream.
    #[serde(default)]
    pub end_of_stream: Option<JsonPointer>,
    /// End the stream at a page with no records even if more is claimed.
    #[serde(default)]
    pub stop_on_empty_page: Option<bool>,
    /// Page numbers `first_page, first_page+1, …` in this parameter; an empty page ends.
    #[serde(default)]
    pub page_param: Option<String>,
    /// The first page number of `page_param`. Default 1.
    #[serde(default)]
    pub first_page: Option<u64>,
    /// Offsets `0, n, …` in this parameter, advancing by the records received.
    #[serde(default)]
    pub offset_param: Option<String>,
    /// The parameter that carries `page_size` (presets name it).
    #[serde(default)]
    pub page_size_param: Option<String>,
    /// Records per page to ask for, sent in `page_size_param`.
    #[serde(default)]
    pub page_size: Option<u64>,
    /// Body pointer to the number of pages; the walk ends there.
    #[serde(default)]
    pub total_pages: Option<JsonPointer>,
    /// Body pointer to the number of records; the walk ends there.
    #[serde(default)]
    pub total_count: Option<JsonPointer>,
}

/// Where a chain starts when it has no cursor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StartConfig {
    /// The query parameter that carries the start time; sent on the first
    /// request of a chain, never with a cursor.
    pub param: String,
    #[serde(default)]
    pub format: TimeFormat,
    /// The first start point (RFC 3339, a date, or unix seconds). Absent: the
    /// API's own beginning (the parameter is not sent).
    #[serde(default, deserialize_with = "opt_scalar")]
    #[schemars(schema_with = "schema::opt_scalar")]
    pub from: Option<String>,
}

/// How a feed walks its stream over time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Walk to the end of the stream, keep the cursor, poll again `every`.
    #[default]
    Incremental,
    /// Record T0, walk the bulk cursor to its end, then sync incrementally from
    /// `T0 - lag` with the `incremental` block.
    BulkThenIncremental,
    /// Walk from the start each time.
    Snapshot,
}

/// The incremental half of a `bulk_then_incremental` feed: replaces the feed's
/// own params, start and pagination after the bulk walk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IncrementalConfig {
    /// Fixed query parameters of the incremental syncs (instead of the feed's).
    #[serde(default, deserialize_with = "scalar_map")]
    #[schemars(schema_with = "schema::scalar_map")]
    pub params: BTreeMap<String, String>,
    #[serde(default)]
    pub start: Option<StartConfig>,
    #[serde(default)]
    pub pagination: PaginationConfig,
    #[serde(default)]
    pub records: Option<JsonPointer>,
    /// The body of the incremental syncs' requests (instead of the feed's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<serde_json::Value>,
}

/// Independent chains (jobs) of one feed: `values` with `param`, or
/// `windows`; at most 100,000 per feed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PartitionsConfig {
    /// The query parameter that carries the partition value (with `values`).
    #[serde(default)]
    pub param: Option<String>,
    /// One independent chain per value, sent in `param`.
    #[serde(default, deserialize_with = "opt_scalar_vec")]
    #[schemars(schema_with = "schema::opt_scalar_vec")]
    pub values: Option<Vec<String>>,
    #[serde(default)]
    pub windows: Option<WindowsConfig>,
    /// `values` as a set, built on first use: a worker finds a page's
    /// partition among 100,000 values without walking them.
    #[serde(skip)]
    #[schemars(skip)]
    pub(crate) value_set: ValueSet,
}

/// A lazily built set of a feed's partition values (not part of the config:
/// equal whatever it holds).
#[derive(Debug, Clone, Default)]
pub(crate) struct ValueSet(std::sync::OnceLock<std::collections::HashSet<String>>);

impl ValueSet {
    pub(crate) fn contains(&self, values: &[String], v: &str) -> bool {
        self.0
            .get_or_init(|| values.iter().cloned().collect())
            .contains(v)
    }
}

impl PartialEq for ValueSet {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// Time windows of a backfill: one job per window `[from + k*every, +every)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WindowsConfig {
    /// Start of the first window (RFC 3339, a date, or unix seconds).
    #[serde(deserialize_with = "scalar")]
    #[schemars(schema_with = "schema::scalar")]
    pub from: String,
    /// End of the last window; default: now when the feed is split.
    #[serde(default, deserialize_with = "opt_scalar")]
    #[schemars(schema_with = "schema::opt_scalar")]
    pub to: Option<String>,
    /// The length of each window.
    pub every: Duration,
    /// The parameter that carries the window's end (the start goes in `start.param`).
    pub end_param: String,
}

/// How a feed's records go downstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    #[serde(default)]
    pub per: DeliveryPer,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryPer {
    /// One message per record.
    #[default]
    Record,
    /// One `{"records": [...]}` message per page.
    Page,
}

/// A field that is written is `Some`, even when it is written `null`.
fn present_value<'de, D: Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(d).map(Some)
}

fn scalar_to_string<E: serde::de::Error>(v: serde_json::Value) -> Result<String, E> {
    match v {
        serde_json::Value::String(s) => Ok(s),
        serde_json::Value::Number(n) => Ok(n.to_string()),
        serde_json::Value::Bool(b) => Ok(b.to_string()),
        other => Err(E::custom(format!(
            "expected a string, number or boolean, found {}",
            kind(&other)
        ))),
    }
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "a mapping",
    }
}

fn scalar<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    scalar_to_string(serde_json::Value::deserialize(d)?)
}

fn opt_scalar<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    match Option::<serde_json::Value>::deserialize(d)? {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => scalar_to_string(v).map(Some),
    }
}

fn opt_scalar_vec<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    match Option::<Vec<serde_json::Value>>::deserialize(d)? {
        None => Ok(None),
        Some(vs) => vs
            .into_iter()
            .map(scalar_to_string)
            .collect::<Result<_, _>>()
            .map(Some),
    }
}

fn scalar_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let m = BTreeMap::<String, serde_json::Value>::deserialize(d)?;
    m.into_iter()
        .map(|(k, v)| scalar_to_string(v).map(|v| (k, v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::CursorExpiredConfig;

    #[test]
    fn the_default_cursor_expired_rule_needs_status_and_wording() {
        let d = CursorExpiredConfig::default();
        assert!(d.matches(400, r#"{"error":"cursor_expired"}"#));
        assert!(d.matches(422, "Invalid CURSOR"));
        assert!(!d.matches(400, r#"{"error":"per_page must be a number"}"#));
        assert!(!d.matches(500, "cursor expired"));
        let any_body = CursorExpiredConfig {
            status: vec![410],
            body_contains: vec![],
        };
        assert!(any_body.matches(410, ""));
        assert!(!any_body.matches(400, "expired"));
    }
}
