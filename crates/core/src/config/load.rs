//! Loading a config file: parse, then validate, and report every problem as
//! `file:line:col: field.path: reason`.
//!
//! serde (with `deny_unknown_fields`) catches unknown fields, missing fields
//! and wrong types, and serde_yaml_ng tells where. Everything else (unknown
//! sources, duplicate feed names, pointers, presets, durations in context)
//! is checked afterwards on the typed config; to point at the right line for
//! those, a second parse with yaml-rust2 records where every node starts,
//! keyed by the same field paths serde_path_to_error produces.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use chrono::Utc;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

use super::{Config, FeedConfig, Mode, PaginationSpec, Preset, RateScope, TenantsConfig};
use crate::tenant::{self, Tenant};
use crate::timefmt::parse_timestamp;

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub col: usize,
    /// e.g. `feeds[1].pagination.next_cursor`
    pub path: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = if self.path.is_empty() {
            "(top level)"
        } else {
            &self.path
        };
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file, self.line, self.col, path, self.reason
        )
    }
}

/// Every problem found, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The name (for errors) and text of the file at `path`, `what` naming it
/// when it cannot be read.
fn read(path: &Path, what: &str) -> Result<(String, String), ConfigErrors> {
    let name = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => Ok((name, text)),
        Err(e) => Err(ConfigErrors(vec![ConfigError {
            file: name,
            line: 0,
            col: 0,
            path: String::new(),
            reason: format!("cannot read {what}: {e}"),
        }])),
    }
}

/// Read and validate a config file.
pub fn load_file(path: &Path) -> Result<Config, ConfigErrors> {
    let (name, text) = read(path, "the file")?;
    let mut config = load_str(&name, &text)?;
    // A relative tenants file is the config file's neighbour.
    let dir = path.parent().unwrap_or(Path::new("."));
    for s in config.sources.values_mut() {
        if let Some(f) = s.tenants.as_mut().and_then(|t| t.file.as_mut())
            && Path::new(f.as_str()).is_relative()
        {
            *f = dir.join(&*f).display().to_string();
        }
    }
    Ok(config)
}

/// Every tenant the config names, by source: its tenants file's (read
/// now) and then its list's. Errors point into the tenants files.
pub fn load_tenants(
    config: &Config,
) -> Result<std::collections::BTreeMap<String, Vec<Tenant>>, ConfigErrors> {
    let mut out = std::collections::BTreeMap::new();
    let mut errors = Vec::new();
    for (name, s) in &config.sources {
        let Some(t) = &s.tenants else { continue };
        let used = tenant_vars_used(config, name);
        let mut list = Vec::new();
        if let Some(file) = &t.file {
            match load_tenants_file(Path::new(file), &used) {
                Ok(l) => list = l,
                Err(e) => errors.extend(e.0),
            }
        }
        for x in &t.list {
            if !list.iter().any(|y: &Tenant| y.name == x.name) {
                list.push(x.clone());
            }
        }
        out.insert(name.clone(), list);
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Parse and validate config text; `file` names it in errors.
pub fn load_str(file: &str, text: &str) -> Result<Config, ConfigErrors> {
    let index = Locations::build(text);
    let err = |path: String, reason: String, at: Option<(usize, usize)>| {
        index.error(file, path, reason, at)
    };
    let de = serde_yaml_ng::Deserializer::from_str(text);
    let config: Config = match serde_path_to_error::deserialize(de) {
        Ok(c) => c,
        Err(e) => {
            let path = clean_path(&e.path().to_string());
            let inner = e.into_inner();
            let reason = strip_location(&inner.to_string());
            let reason = strip_path_prefix(&reason, &path);
            // serde_yaml_ng puts custom errors (a bad pointer, a bad duration)
            // at the enclosing mapping; the value's own place is more useful.
            let at = match index.at.get(&path) {
                Some(l)
                    if !reason.starts_with("unknown field")
                        && !reason.starts_with("missing field") =>
                {
                    Some(*l)
                }
                _ => inner.location().map(|l| (l.line(), l.column())),
            };
            // A document that is empty or only comments deserialises as an error "EOF".
            if text
                .trim()
                .lines()
                .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
            {
                return Ok(Config {
                    sources: Default::default(),
                    feeds: Vec::new(),
                });
            }
            return Err(ConfigErrors(vec![err(path, reason, at)]));
        }
    };
    let problems = validate(&config);
    index.result(file, config, problems)
}

fn clean_path(p: &str) -> String {
    if p == "." {
        String::new()
    } else {
        p.to_string()
    }
}

/// serde_yaml_ng prefixes messages with the path of the enclosing mapping;
/// the path is printed separately, so drop it.
fn strip_path_prefix(reason: &str, path: &str) -> String {
    if let Some((head, rest)) = reason.split_once(": ")
        && !head.contains(' ')
        && path.starts_with(head)
    {
        return rest.to_string();
    }
    reason.to_string()
}

fn strip_location(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) if msg[i..].contains(" column ") => msg[..i].to_string(),
        _ => msg.to_string(),
    }
}

/// Semantic checks on a parsed config: `(field path, reason)` pairs.
pub fn validate(config: &Config) -> Vec<(String, String)> {
    let mut out = Vec::new();
    check_templates(config, &mut out);
    for (name, s) in &config.sources {
        let at = format!("sources.{name}");
        // The vars this source's templates use: read once, and only where
        // there can be templates.
        let used = if s.is_tenanted() || s.base_url.is_template() {
            tenant_vars_used(config, name)
        } else {
            Default::default()
        };
        // A template is checked as a sample tenant would fill it.
        let base = match s
            .base_url
            .fill(&tenant::sample(&used.keys().cloned().collect()))
        {
            Ok(b) => b.url().ok().cloned(),
            Err(e) => {
                out.push((format!("{at}.base_url"), e));
                None
            }
        };
        if let Some(base) = base {
            if !matches!(base.scheme(), "http" | "https") {
                out.push((
                    format!("{at}.base_url"),
                    "must be an http:// or https:// URL".into(),
                ));
            }
            if base.cannot_be_a_base() || base.host_str().is_none() {
                out.push((
                    format!("{at}.base_url"),
                    "must be an absolute URL with a host".into(),
                ));
            }
        }
        if let Some(t) = &s.tenants {
            check_tenant_list(&used, t, &at, &mut out);
        } else if s.rate_limit.as_ref().and_then(|r| r.per) == Some(RateScope::Tenant) {
            out.push((
                format!("{at}.rate_limit.per"),
                "per: tenant needs tenants (this source has no tenants block)".into(),
            ));
        }
        if let Some(auth) = &s.auth {
            let n = [
                auth.bearer.is_some(),
                auth.basic.is_some(),
                auth.api_key.is_some(),
                auth.oauth2_client_credentials.is_some(),
            ]
            .iter()
            .filter(|b| **b)
            .count();
            if n != 1 {
                out.push((
                    format!("{at}.auth"),
                    "set exactly one of bearer, basic, api_key or oauth2_client_credentials".into(),
                ));
            }
            if let Some(k) = &auth.api_key
                && k.header.is_some() == k.query.is_some()
            {
                out.push((
                    format!("{at}.auth.api_key"),
                    "set exactly one of header (a header name) or query (a query parameter name)"
                        .into(),
                ));
            }
            if let Some(o) = &auth.oauth2_client_credentials
                && !matches!(o.token_url.scheme(), "http" | "https")
            {
                out.push((
                    format!("{at}.auth.oauth2_client_credentials.token_url"),
                    "must be an http:// or https:// URL".into(),
                ));
            }
            for secret in auth.secrets() {
                if secret.variables().is_err() {
                    out.push((
                        format!("{at}.auth"),
                        "an unclosed ${ in a secret (write ${VAR})".into(),
                    ));
                }
            }
        }
        if let Some(rl) = &s.rate_limit
            && !(rl.per_second.is_finite() && rl.per_second > 0.0)
        {
            out.push((
                format!("{at}.rate_limit.per_second"),
                "must be a number above 0".into(),
            ));
        }
        if let Some(h) = &s.rate_limit_headers {
            for (field, name) in [("remaining", &h.remaining), ("reset", &h.reset)] {
                if let Some(name) = name
                    && !super::preset::is_header_name(name)
                {
                    out.push((
                        format!("{at}.rate_limit_headers.{field}"),
                        format!("{name:?} is not a header name (letters, digits, - and _)"),
                    ));
                }
            }
        }
        if s.max_body_bytes == Some(0) {
            out.push((format!("{at}.max_body_bytes"), "must be above 0".into()));
        }
        for (field, zero) in [
            ("max_records_per_page", s.max_records_per_page == Some(0)),
            ("max_cursor_bytes", s.max_cursor_bytes == Some(0)),
            ("max_header_bytes", s.max_header_bytes == Some(0)),
        ] {
            if zero {
                out.push((format!("{at}.{field}"), "must be above 0".into()));
            }
        }
        for (j, origin) in s.redirects_allowed_to.iter().enumerate() {
            if !matches!(origin.scheme(), "http" | "https")
                || origin.host_str().is_none()
                || !matches!(origin.path(), "" | "/")
                || origin.query().is_some()
            {
                out.push((
                    format!("{at}.redirects_allowed_to[{j}]"),
                    "must be an origin: http(s)://host[:port], no path".into(),
                ));
            }
        }
        if let Some(r) = &s.retry
            && r.max_attempts == 0
        {
            out.push((
                format!("{at}.retry.max_attempts"),
                "must be at least 1 (1 = no retries)".into(),
            ));
        }
        if s.timeout.is_some_and(|t| t.std().is_zero()) {
            out.push((format!("{at}.timeout"), "must be above 0".into()));
        }
        for (h, v) in &s.headers {
            if v.variables().is_err() {
                out.push((
                    format!("{at}.headers.{h}"),
                    "an unclosed ${ (write ${VAR})".into(),
                ));
            }
        }
    }
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, feed) in config.feeds.iter().enumerate() {
        let at = format!("feeds[{i}]");
        if feed.name.trim().is_empty() {
            out.push((format!("{at}.name"), "must not be empty".into()));
        } else if !feed
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
        {
            out.push((
                format!("{at}.name"),
                "may hold only letters, digits, '_' and '-' (it becomes part of routing keys)"
                    .into(),
            ));
        }
        if let Some(first) = seen.insert(&feed.name, i) {
            out.push((
                format!("{at}.name"),
                format!("two feeds are named {:?} (feeds[{first}] and feeds[{i}]); names must be unique", feed.name),
            ));
        }
        if !config.sources.contains_key(&feed.source) {
            let known: Vec<&str> = config.sources.keys().map(String::as_str).collect();
            out.push((
                format!("{at}.source"),
                format!(
                    "unknown source {:?}; defined sources: {}",
                    feed.source,
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
        validate_feed(feed, &at, &mut out);
        if let Some(link) = &feed.parent {
            check_parent(config, feed, link, &at, &mut out);
        }
    }
    out
}

/// A batched child feed: `{ids}` where the parent keys go, and no
/// per-parent vars (one request names many parents).
fn check_batch(
    feed: &FeedConfig,
    link: &super::ParentConfig,
    batch: &super::BatchConfig,
    at: &str,
    out: &mut Vec<(String, String)>,
) {
    if !(1..=1000).contains(&batch.size) {
        out.push((
            format!("{at}.parent.batch.size"),
            "must be 1 to 1000".into(),
        ));
    }
    if !(1..=64).contains(&batch.parallel) {
        out.push((
            format!("{at}.parent.batch.parallel"),
            "must be 1 to 64".into(),
        ));
    }
    if batch.separator.is_empty() {
        out.push((
            format!("{at}.parent.batch.separator"),
            "must not be empty".into(),
        ));
    }
    if !link.vars.is_empty() {
        out.push((
            format!("{at}.parent.vars"),
            "a batched request names many parents at once: put {ids} (their keys) in the path or params instead of vars".into(),
        ));
    }
    let uses_ids = feed.path.contains("{ids}")
        || feed.params.values().any(|v| v.contains("{ids}"))
        || feed
            .incremental
            .as_ref()
            .is_some_and(|i| i.params.values().any(|v| v.contains("{ids}")));
    if !uses_ids {
        out.push((
            format!("{at}.parent.batch"),
            "a batched child feed must put {ids} (the parent keys, joined by the separator) in its path or params".into(),
        ));
    }
    if feed.delivery.per == super::DeliveryPer::Page {
        out.push((
            format!("{at}.delivery.per"),
            "a batched child feed delivers per record (each record names its own parent)".into(),
        ));
    }
    // Each batch is other parents: a cursor of one batch means nothing to the next.
    if feed.mode != super::Mode::Snapshot {
        out.push((
            format!("{at}.mode"),
            "a batched child feed walks each batch from its start: set mode: snapshot".into(),
        ));
    }
}

/// A child feed's `parent` block, and what a child feed cannot have.
fn check_parent(
    config: &Config,
    feed: &FeedConfig,
    link: &super::ParentConfig,
    at: &str,
    out: &mut Vec<(String, String)>,
) {
    let Some(parent) = config.feed(&link.feed) else {
        out.push((
            format!("{at}.parent.feed"),
            format!("unknown feed {:?}", link.feed),
        ));
        return;
    };
    // The chain of parents must end: no feed is its own ancestor.
    let mut up = Some(parent);
    for _ in 0..=config.feeds.len() {
        match up {
            Some(p) if p.name == feed.name => {
                out.push((
                    format!("{at}.parent.feed"),
                    format!(
                        "{:?} is its own ancestor: parents may not form a cycle",
                        feed.name
                    ),
                ));
                break;
            }
            Some(p) => up = p.parent.as_ref().and_then(|l| config.feed(&l.feed)),
            None => break,
        }
    }
    let tenanted = |name: &str| config.sources.get(name).is_some_and(|s| s.is_tenanted());
    if (tenanted(&parent.source) || tenanted(&feed.source)) && parent.source != feed.source {
        out.push((
            format!("{at}.source"),
            format!(
                "a child of a feed with tenants runs per tenant of its parent: it must use the parent's source {:?}",
                parent.source
            ),
        ));
    }
    if let Some(batch) = &link.batch {
        check_batch(feed, link, batch, at, out);
        if parent
            .partitions
            .as_ref()
            .is_some_and(|p| p.values.is_some())
        {
            out.push((
                format!("{at}.parent.batch"),
                format!(
                    "{:?} is partitioned by values, whose keys may repeat across partitions: a batch of keys could not tell them apart",
                    parent.name
                ),
            ));
        }
    } else if link.vars.is_empty() {
        out.push((
            format!("{at}.parent.vars"),
            "name at least one value of the parent record (e.g. { ticket_id: /id }) for the path or params".into(),
        ));
    }
    for name in link.vars.keys() {
        if let Err(e) = tenant::check_var_name(name) {
            out.push((format!("{at}.parent.vars.{name}"), e));
        } else if matches!(name.as_str(), "tenant" | "vars") {
            out.push((
                format!("{at}.parent.vars.{name}"),
                format!("{{{name}}} is a tenant template; choose another name"),
            ));
        }
    }
    if feed.every.is_some() {
        out.push((
            format!("{at}.every"),
            "a child feed runs when its parent record is new or changed, not on a schedule: remove every".into(),
        ));
    }
    if feed.partitions.is_some() {
        out.push((
            format!("{at}.partitions"),
            "a child feed has one job per parent record: it cannot have partitions".into(),
        ));
    }
}

/// True when a template may stand at `rel`, a field path inside a source
/// (`base_url`, `auth.bearer`, ...) or a feed (`path`, `params.x`, ...).
fn template_allowed(in_source: bool, rel: &str) -> bool {
    if in_source {
        rel == "base_url"
            || rel.starts_with("headers.")
            || matches!(
                rel,
                "auth.bearer"
                    | "auth.basic.username"
                    | "auth.basic.password"
                    | "auth.api_key.value"
                    | "auth.oauth2_client_credentials.client_id"
                    | "auth.oauth2_client_credentials.client_secret"
            )
    } else {
        rel == "path"
            || rel.starts_with("params.")
            || rel.starts_with("incremental.params.")
            || rel == "body"
            || rel.starts_with("body.")
            || rel.starts_with("body[")
            || rel.starts_with("incremental.body")
    }
}

/// Every string of `v` with its field path (in the paths errors use).
fn strings<'a>(v: &'a serde_json::Value, at: String, out: &mut Vec<(String, &'a str)>) {
    match v {
        serde_json::Value::String(s) => out.push((at, s)),
        serde_json::Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                strings(item, format!("{at}[{i}]"), out);
            }
        }
        serde_json::Value::Object(m) => {
            for (k, item) in m {
                let p = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                strings(item, p, out);
            }
        }
        _ => {}
    }
}

/// The strings of a source (its `tenants` block aside) and of its feeds,
/// as `(in_source, path, relative path, text)`.
fn source_strings(config: &Config, name: &str) -> Vec<(bool, String, String, String)> {
    let mut out = Vec::new();
    if let Some(s) = config.sources.get(name) {
        let mut v = serde_json::to_value(s).unwrap_or_default();
        if let Some(m) = v.as_object_mut() {
            m.remove("tenants");
        }
        let mut found = Vec::new();
        strings(&v, String::new(), &mut found);
        out.extend(
            found
                .into_iter()
                .map(|(rel, text)| (true, format!("sources.{name}.{rel}"), rel, text.to_string())),
        );
    }
    for (i, f) in config
        .feeds
        .iter()
        .enumerate()
        .filter(|(_, f)| f.source == name)
    {
        let v = serde_json::to_value(f).unwrap_or_default();
        let mut found = Vec::new();
        strings(&v, String::new(), &mut found);
        out.extend(
            found
                .into_iter()
                .map(|(rel, text)| (false, format!("feeds[{i}].{rel}"), rel, text.to_string())),
        );
    }
    out
}

/// The `{vars.NAME}` a source's templates use, each with the first field
/// that uses it: every tenant of the source must set them.
pub fn tenant_vars_used(
    config: &Config,
    source: &str,
) -> std::collections::BTreeMap<String, String> {
    let mut used = std::collections::BTreeMap::new();
    for (in_source, path, rel, text) in source_strings(config, source) {
        if !template_allowed(in_source, &rel) {
            continue;
        }
        for r in tenant::refs(&text) {
            if let tenant::Ref::Var(v) = r {
                used.entry(v.to_string()).or_insert_with(|| path.clone());
            }
        }
    }
    used
}

/// `{tenant}` and `{vars.NAME}` only where a tenant can fill them: in a
/// tenanted source's base URL, auth secrets and headers, and its feeds'
/// path and params. A feed naming an unknown source is reported elsewhere.
fn check_templates(config: &Config, out: &mut Vec<(String, String)>) {
    let mut names: Vec<&str> = config.sources.keys().map(String::as_str).collect();
    let unknown: Vec<&str> = config
        .feeds
        .iter()
        .map(|f| f.source.as_str())
        .filter(|s| !config.sources.contains_key(*s))
        .collect();
    names.extend(unknown);
    names.sort_unstable();
    names.dedup();
    for name in names {
        let tenanted = config.sources.get(name).is_some_and(|s| s.is_tenanted());
        for (in_source, path, rel, text) in source_strings(config, name) {
            let Some(first) = tenant::refs(&text).first().copied() else {
                continue;
            };
            let written = match first {
                tenant::Ref::Tenant => "{tenant}".to_string(),
                tenant::Ref::Var(v) => format!("{{vars.{v}}}"),
            };
            if !tenanted {
                out.push((
                    path,
                    format!(
                        "{written}: source {name:?} has no tenants (add a tenants block to it)"
                    ),
                ));
            } else if !template_allowed(in_source, &rel) {
                out.push((path, format!("{written} cannot stand here: templates may appear in base_url, auth secrets and headers of a source, and in path and params of a feed")));
            }
        }
    }
}

/// The tenants listed inline: valid, distinct names, with every var the
/// templates use.
fn check_tenant_list(
    used: &std::collections::BTreeMap<String, String>,
    t: &TenantsConfig,
    at: &str,
    out: &mut Vec<(String, String)>,
) {
    out.extend(
        check_tenants(&t.list, used)
            .into_iter()
            .map(|(p, r)| (format!("{at}.tenants.list{p}"), r)),
    );
    if t.file.as_deref().is_some_and(|f| f.trim().is_empty()) {
        out.push((format!("{at}.tenants.file"), "must not be empty".into()));
    }
}

/// Problems of a list of tenants, as `([index] or [index].field, reason)`.
pub(crate) fn check_tenants(
    list: &[Tenant],
    used: &std::collections::BTreeMap<String, String>,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (j, t) in list.iter().enumerate() {
        if let Err(e) = tenant::check_name(&t.name) {
            out.push((format!("[{j}]"), e));
        }
        if let Some(first) = seen.insert(&t.name, j) {
            out.push((
                format!("[{j}]"),
                format!(
                    "tenant {:?} is listed twice (entries {first} and {j})",
                    t.name
                ),
            ));
        }
        for (var, path) in used {
            if !t.vars.contains_key(var) {
                out.push((
                    format!("[{j}]"),
                    format!("tenant {:?} has no vars.{var}, which {path} uses", t.name),
                ));
            }
        }
        for (var, value) in &t.vars {
            if let Err(e) =
                tenant::check_var_name(var).and_then(|()| tenant::check_var_value(var, value))
            {
                out.push((format!("[{j}].vars"), e));
            }
        }
    }
    out
}

/// Read and check a tenants file: a YAML list of tenants (`- acme` or
/// `- { name: acme, vars: { region: eu } }`). `used` are the vars every
/// tenant must set ([`tenant_vars_used`]). Problems come as
/// `file:line:col: [index]: reason`.
pub fn load_tenants_str(
    file: &str,
    text: &str,
    used: &std::collections::BTreeMap<String, String>,
) -> Result<Vec<Tenant>, ConfigErrors> {
    let index = Locations::build(text);
    if text
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
    {
        return Ok(Vec::new());
    }
    let de = serde_yaml_ng::Deserializer::from_str(text);
    let list: Vec<Tenant> = match serde_path_to_error::deserialize(de) {
        Ok(l) => l,
        Err(e) => {
            let path = clean_path(&e.path().to_string());
            let inner = e.into_inner();
            let reason = strip_location(&inner.to_string());
            let at = index
                .at
                .get(&path)
                .copied()
                .or_else(|| inner.location().map(|l| (l.line(), l.column())));
            return Err(ConfigErrors(vec![index.error(file, path, reason, at)]));
        }
    };
    let problems = check_tenants(&list, used);
    index.result(file, list, problems)
}

/// Read and check a tenants file ([`load_tenants_str`]).
pub fn load_tenants_file(
    path: &Path,
    used: &std::collections::BTreeMap<String, String>,
) -> Result<Vec<Tenant>, ConfigErrors> {
    let (name, text) = read(path, "the tenants file")?;
    load_tenants_str(&name, &text, used)
}

fn validate_feed(feed: &FeedConfig, at: &str, out: &mut Vec<(String, String)>) {
    let spec = PaginationSpec::resolve(&feed.pagination, feed.records.as_ref());
    if let Err(problems) = &spec {
        out.extend(
            problems
                .iter()
                .map(|(p, r)| (format!("{at}.{p}"), r.clone())),
        );
    }
    check_request(feed, spec.as_ref().ok(), at, out);
    if let Some(start) = &feed.start
        && let Some(from) = &start.from
        && let Err(e) = parse_timestamp(from)
    {
        out.push((format!("{at}.start.from"), e));
    }
    match (&feed.incremental, feed.mode) {
        (Some(_), m) if m != Mode::BulkThenIncremental => out.push((
            format!("{at}.incremental"),
            "an incremental block only applies to mode: bulk_then_incremental".into(),
        )),
        (Some(inc), _) => {
            if let Err(problems) = feed.incremental_spec(inc) {
                out.extend(problems.iter().map(|(p, r)| (format!("{at}.incremental.{p}"), r.clone())));
            }
            if let Some(start) = &inc.start
                && let Some(from) = &start.from
            {
                out.push((
                    format!("{at}.incremental.start.from"),
                    format!("not used: incremental syncs start from T0 - lag (got {from:?}); remove it"),
                ));
            }
            if inc.start.is_none() && feed.start.is_none() {
                out.push((
                    format!("{at}.incremental.start"),
                    "missing: the parameter that carries the updated-since time (e.g. { param: updatedSince, format: iso8601 })".into(),
                ));
            }
        }
        (None, Mode::BulkThenIncremental) => out.push((
            format!("{at}.incremental"),
            "missing: mode bulk_then_incremental needs an incremental block (params, start, pagination) for the syncs after the bulk walk".into(),
        )),
        (None, _) => {}
    }
    if feed.every.is_some_and(|d| d.std().is_zero()) {
        out.push((format!("{at}.every"), "must be above 0".into()));
    }
    if let Some(p) = &feed.partitions {
        match (&p.values, &p.windows) {
            (Some(values), None) => {
                if p.param.is_none() {
                    out.push((
                        format!("{at}.partitions.param"),
                        "missing: the parameter that carries the partition value".into(),
                    ));
                }
                if let Err(why) = super::feed::values_within_limit(values.len()) {
                    out.push((format!("{at}.partitions.values"), why));
                }
                if values.is_empty() {
                    out.push((
                        format!("{at}.partitions.values"),
                        "must list at least one value".into(),
                    ));
                }
                let mut seen = std::collections::HashSet::new();
                for (j, v) in values.iter().enumerate() {
                    if !seen.insert(v) {
                        out.push((
                            format!("{at}.partitions.values[{j}]"),
                            format!("{v:?} is listed twice"),
                        ));
                    }
                }
            }
            (None, Some(w)) => {
                if p.param.is_some() {
                    out.push((
                        format!("{at}.partitions.param"),
                        "not used with windows: the window start goes in start.param and its end in windows.end_param".into(),
                    ));
                }
                if feed.start.is_none()
                    && !matches!(
                        spec.as_ref().ok().and(feed.pagination.preset()),
                        Some(Preset::ZendeskCursor)
                    )
                {
                    out.push((
                        format!("{at}.start"),
                        "missing: time windows need start.param, the parameter that carries each window's start".into(),
                    ));
                }
                if let Err(e) = parse_timestamp(&w.from) {
                    out.push((format!("{at}.partitions.windows.from"), e));
                }
                if let Some(to) = &w.to
                    && let Err(e) = parse_timestamp(to)
                {
                    out.push((format!("{at}.partitions.windows.to"), e));
                }
                if w.every.std().is_zero() {
                    out.push((
                        format!("{at}.partitions.windows.every"),
                        "must be above 0".into(),
                    ));
                } else if let Ok(from) = parse_timestamp(&w.from) {
                    let to = w.to.as_deref().map_or(Ok(Utc::now()), parse_timestamp);
                    if let Ok(to) = to
                        && let Err(why) = super::feed::windows_within_limit(w, from, to)
                    {
                        out.push((format!("{at}.partitions.windows"), why));
                    }
                }
            }
            _ => out.push((
                format!("{at}.partitions"),
                "set exactly one of values (with param) or windows".into(),
            )),
        }
    }
}

/// A feed's request dialect: method and body, where each value goes
/// (`name` or `body:/pointer`), `record` and `error_when`.
fn check_request(
    feed: &FeedConfig,
    spec: Option<&PaginationSpec>,
    at: &str,
    out: &mut Vec<(String, String)>,
) {
    use crate::pagination::Place;
    let mut places: Vec<(String, String)> = Vec::new();
    let mut pagination = |prefix: &str, p: &super::PaginationConfig| {
        for (name, v) in [
            ("cursor_param", &p.cursor_param),
            ("page_param", &p.page_param),
            ("offset_param", &p.offset_param),
            ("page_size_param", &p.page_size_param),
        ] {
            if let Some(v) = v {
                places.push((format!("{prefix}pagination.{name}"), v.clone()));
            }
        }
    };
    pagination("", &feed.pagination);
    if let Some(inc) = &feed.incremental {
        pagination("incremental.", &inc.pagination);
        if let Some(s) = &inc.start {
            places.push(("incremental.start.param".into(), s.param.clone()));
        }
    }
    if let Some(s) = &feed.start {
        places.push(("start.param".into(), s.param.clone()));
    }
    if let Some(p) = &feed.partitions {
        if let Some(param) = &p.param {
            places.push(("partitions.param".into(), param.clone()));
        }
        if let Some(w) = &p.windows {
            places.push(("partitions.windows.end_param".into(), w.end_param.clone()));
        }
    }
    let mut in_body = None;
    let mut body_places: Vec<(&str, crate::pointer::JsonPointer)> = Vec::new();
    for (field, name) in &places {
        match Place::parse(name) {
            Err(e) => out.push((format!("{at}.{field}"), e)),
            Ok(Place::Body(p)) => {
                in_body = in_body.or(Some(field.clone()));
                body_places.push((field.as_str(), p));
            }
            Ok(Place::Query(_)) => {}
        }
    }
    // Two values at one place, or one inside the other, overwrite each
    // other; a template value on the way that is not an object or array
    // (or an array too short) cannot take one.
    for (i, (field, p)) in body_places.iter().enumerate() {
        let incremental = field.starts_with("incremental.");
        if let Some((other, q)) = body_places[..i].iter().find(|(other, q)| {
            other.starts_with("incremental.") == incremental
                && (p.segments().starts_with(q.segments())
                    || q.segments().starts_with(p.segments()))
        }) {
            out.push((
                format!("{at}.{field}"),
                format!(
                    "body:{p} and {other}'s body:{q} overlap: each value needs a place of its own"
                ),
            ));
        }
        let template = match (
            incremental,
            feed.incremental.as_ref().and_then(|i| i.body.as_ref()),
        ) {
            (true, Some(b)) => Some(b),
            _ => feed.body.as_ref(),
        };
        if let Some(t) = template.filter(|t| t.is_object()) {
            let mut probe = t.clone();
            if let Err(e) = crate::pagination::set_at(&mut probe, p, serde_json::Value::Null) {
                out.push((
                    format!("{at}.{field}"),
                    format!("the body template has no place for it: {e}"),
                ));
            }
        }
    }
    for k in feed
        .params
        .keys()
        .chain(feed.incremental.iter().flat_map(|i| i.params.keys()))
    {
        if Place::in_body(k) {
            out.push((
                format!("{at}.params.{k}"),
                "params are query parameters: write fixed body values into body".into(),
            ));
        }
    }
    let bodies = [
        ("body", feed.body.as_ref()),
        (
            "incremental.body",
            feed.incremental.as_ref().and_then(|i| i.body.as_ref()),
        ),
    ];
    for (field, b) in bodies {
        if let Some(b) = b
            && !b.is_object()
        {
            out.push((
                format!("{at}.{field}"),
                "must be a mapping (a JSON object), the template values are written into".into(),
            ));
        }
    }
    let with_body = bodies
        .iter()
        .find(|(_, b)| b.is_some())
        .map(|(f, _)| f.to_string())
        .or(in_body);
    if let Some(field) = &with_body
        && feed.method.is_none()
    {
        out.push((
            format!("{at}.{field}"),
            "sends a body: write the method too (method: POST for most APIs, or GET or QUERY)"
                .into(),
        ));
    }
    match (feed.method, feed.read_only) {
        (Some(super::Method::Post), None) => out.push((
            format!("{at}.method"),
            "say whether this POST only reads with read_only (true: a GraphQL query or a search, retried and prefetched like a GET) or not (false: never sent twice on purpose)".into(),
        )),
        (Some(super::Method::Post), Some(_)) => {}
        (_, Some(_)) => out.push((
            format!("{at}.read_only"),
            "only for method: POST (GET and QUERY always only read)".into(),
        )),
        _ => {}
    }
    if let Some(r) = &feed.record
        && r.is_root()
    {
        out.push((
            format!("{at}.record"),
            "\"\" is the element itself: remove record, or point inside the element (e.g. /node)"
                .into(),
        ));
    }
    let records = spec.map(|s| &s.records);
    for (i, rule) in feed.error_when.iter().enumerate() {
        let here = format!("{at}.error_when[{i}]");
        match (&rule.equals, rule.not_empty) {
            (Some(_), true) => out.push((
                here.clone(),
                "set one of equals and not_empty, not both".into(),
            )),
            (None, false) => out.push((
                here.clone(),
                "set equals (a value) or not_empty: true: the condition on the value at pointer"
                    .into(),
            )),
            _ => {}
        }
        if rule.retry_after.is_some() && !rule.transient {
            out.push((
                format!("{here}.retry_after"),
                "only for transient: true (a permanent error is not retried)".into(),
            ));
        }
        for (name, p) in [
            ("pointer", Some(&rule.pointer)),
            ("message", rule.message.as_ref()),
            ("retry_after", rule.retry_after.as_ref()),
        ] {
            let Some(p) = p else { continue };
            if let Some(records) = records
                && !p.is_root()
                && (records.is_root() || p.segments().starts_with(records.segments()))
            {
                out.push((
                    format!("{here}.{name}"),
                    format!("{p} lies inside the records array at {records}: error_when reads the rest of the body"),
                ));
            } else if p.is_root() {
                out.push((
                    format!("{here}.{name}"),
                    "must point inside the body, not at the whole body (\"\")".into(),
                ));
            }
        }
    }
}

/// Where each node of the document starts, by field path.
struct Locations {
    at: HashMap<String, (usize, usize)>,
}

impl Locations {
    fn build(text: &str) -> Self {
        let mut rec = Recorder {
            at: HashMap::new(),
            stack: Vec::new(),
        };
        let mut parser = Parser::new_from_str(text);
        // A syntax error is reported by serde; partial locations are still useful.
        let _ = parser.load(&mut rec, false);
        Locations { at: rec.at }
    }

    /// One problem at `path` (or at `at`, when known) of `file`.
    fn error(
        &self,
        file: &str,
        path: String,
        reason: String,
        at: Option<(usize, usize)>,
    ) -> ConfigError {
        let (line, col) = at.unwrap_or_else(|| self.find(&path));
        ConfigError {
            file: file.to_string(),
            line,
            col,
            path,
            reason,
        }
    }

    /// `value`, or the `problems` found in it located in `file`, in file order.
    fn result<T>(
        &self,
        file: &str,
        value: T,
        problems: Vec<(String, String)>,
    ) -> Result<T, ConfigErrors> {
        if problems.is_empty() {
            return Ok(value);
        }
        let mut errors: Vec<ConfigError> = problems
            .into_iter()
            .map(|(p, r)| self.error(file, p, r, None))
            .collect();
        errors.sort_by_key(|e| (e.line, e.col));
        Err(ConfigErrors(errors))
    }

    /// The location of `path`, or of its nearest ancestor that exists.
    fn find(&self, path: &str) -> (usize, usize) {
        let mut p = path.to_string();
        loop {
            if let Some(l) = self.at.get(&p) {
                return *l;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p.truncate(i),
                None => return self.at.get("").copied().unwrap_or((1, 1)),
            }
        }
    }
}

enum Frame {
    /// `key` is the pending key and where it was written; `unplaced` is set
    /// while the mapping's own path still needs a location (its first key's).
    Map {
        path: String,
        key: Option<(String, (usize, usize))>,
        unplaced: bool,
    },
    Seq {
        path: String,
        next: usize,
    },
}

struct Recorder {
    at: HashMap<String, (usize, usize)>,
    stack: Vec<Frame>,
}

impl Recorder {
    /// The path of a node that starts now (and, for a mapping value, where
    /// its key was written), advancing the parent's state. `None`: the node
    /// is a key.
    fn child_path(
        &mut self,
        scalar: Option<&str>,
        loc: (usize, usize),
    ) -> Option<(String, Option<(usize, usize)>)> {
        match self.stack.last_mut() {
            None => Some((String::new(), None)),
            Some(Frame::Seq { path, next }) => {
                let p = format!("{path}[{next}]");
                *next += 1;
                Some((p, None))
            }
            Some(Frame::Map {
                path,
                key,
                unplaced,
            }) => match key.take() {
                Some((k, key_loc)) => Some((
                    if path.is_empty() {
                        k
                    } else {
                        format!("{path}.{k}")
                    },
                    Some(key_loc),
                )),
                None => {
                    if *unplaced {
                        *unplaced = false;
                        self.at.entry(path.clone()).or_insert(loc);
                    }
                    *key = Some((scalar.unwrap_or("?").to_string(), loc));
                    None
                }
            },
        }
    }
}

impl MarkedEventReceiver for Recorder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let loc = (mark.line(), mark.col() + 1);
        match ev {
            Event::Scalar(value, ..) => {
                if let Some((p, _)) = self.child_path(Some(&value), loc) {
                    self.at.entry(p).or_insert(loc);
                }
            }
            Event::Alias(_) => {
                self.child_path(None, loc);
            }
            // A collection is located at its key when it has one, else at its first key.
            Event::MappingStart(..) => {
                let (p, key_loc) = self.child_path(None, loc).unwrap_or_default();
                if let Some(l) = key_loc {
                    self.at.entry(p.clone()).or_insert(l);
                }
                self.stack.push(Frame::Map {
                    path: p,
                    key: None,
                    unplaced: key_loc.is_none(),
                });
            }
            Event::SequenceStart(..) => {
                let (p, key_loc) = self.child_path(None, loc).unwrap_or_default();
                self.at.entry(p.clone()).or_insert(key_loc.unwrap_or(loc));
                self.stack.push(Frame::Seq { path: p, next: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}
