//! `tidemark validate --config F`: check a config file without running anything.

use std::io::Write;
use std::path::Path;

use std::collections::BTreeMap;

use tidemark_core::config::{Config, load_file, load_tenants};
use tidemark_core::tenant::Tenant;

use crate::exit::Failure;

/// Load and validate `path`; on success print a summary (and warnings for
/// `${VAR}` references unset in this environment, by name only).
pub fn run(path: &Path, out: &mut dyn Write) -> Result<Config, Failure> {
    let config = load_file(path).map_err(|e| Failure::usage(e.to_string()))?;
    let tenants = load_tenants(&config).map_err(|e| Failure::usage(e.to_string()))?;
    // Each tenant's view of its source and feeds: its vars must fit where
    // the templates put them (no other host, path or secret file).
    let mut misfits = Vec::new();
    for (name, list) in &tenants {
        let (Some(source), feeds) = (
            config.sources.get(name),
            config.feeds.iter().filter(|f| &f.source == name),
        ) else {
            continue;
        };
        for t in list {
            let feed_errors = feeds.clone().filter_map(|f| f.for_tenant(t).err());
            misfits.extend(source.for_tenant(t).err().into_iter().chain(feed_errors));
        }
    }
    if !misfits.is_empty() {
        misfits.dedup();
        return Err(Failure::usage(format!(
            "{}: {}",
            path.display(),
            misfits.join(&format!("\n{}: ", path.display()))
        )));
    }
    let now = chrono::Utc::now();
    let mut jobs = 0usize;
    for f in config.feeds.iter().filter(|f| f.parent.is_none()) {
        let parts = f
            .partitions(now)
            .map_err(|e| Failure::usage(format!("{}: feed {}: {e}", path.display(), f.name)))?;
        jobs += parts.len() * tenants.get(&f.source).map_or(1, Vec::len);
    }
    let _ = writeln!(
        out,
        "{}: ok: {} source(s), {} feed(s), {} job(s)",
        path.display(),
        config.sources.len(),
        config.feeds.len(),
        jobs
    );
    for f in &config.feeds {
        match f.parent.as_ref().map(|l| (l, &l.batch)) {
            Some((link, None)) => {
                let _ = writeln!(
                    out,
                    "feed {}: a child of {}, one job per {} record (made as they are read)",
                    f.name, link.feed, link.feed
                );
            }
            Some((link, Some(b))) => {
                let _ = writeln!(
                    out,
                    "feed {}: a child of {}, its changed records in batches of {}, {} at a time",
                    f.name, link.feed, b.size, b.parallel
                );
            }
            None => {}
        }
        if f.method.is_some() || f.cursor_is_json() {
            let _ = writeln!(
                out,
                "feed {}: {}{}{}",
                f.name,
                f.method().as_str(),
                match (f.method(), f.read_only()) {
                    (tidemark_core::config::Method::Post, true) =>
                        " (only reads: retried like a GET)",
                    (tidemark_core::config::Method::Post, false) =>
                        " (not only a read: never sent again after it may have been processed)",
                    _ => "",
                },
                if f.cursor_is_json() {
                    ", its cursor kept and sent as JSON in the body"
                } else {
                    ""
                }
            );
        }
    }
    for (name, list) in &tenants {
        let feeds = config.feeds.iter().filter(|f| &f.source == name).count();
        let _ = writeln!(
            out,
            "source {name}: {} tenant(s) from its file and list, {feeds} feed(s) each (tenants added with `tidemark tenants add` come on top)",
            list.len()
        );
    }
    for (name, source) in &config.sources {
        // The secret parts proper (not user names or client ids): written
        // inline, or filled from a tenant's vars, they are stored with the
        // config or the tenants, not read where the request is sent.
        let literal = source.auth.iter().any(|a| {
            let secrets = [
                a.bearer.as_ref(),
                a.basic.as_ref().map(|b| &b.password),
                a.api_key.as_ref().map(|k| &k.value),
                a.oauth2_client_credentials
                    .as_ref()
                    .map(|o| &o.client_secret),
            ];
            secrets.into_iter().flatten().any(|s| s.is_literal())
        });
        if literal {
            let _ = writeln!(
                out,
                "warning: sources.{name}.auth holds a literal secret, which is stored with the config (in Redis, in a distributed deployment); write ${{VAR}} or ${{file:/path}}"
            );
        }
    }
    for var in unset_variables(&config, &tenants) {
        let _ = writeln!(
            out,
            "warning: ${{{var}}} is not {} in this environment; processes that send requests need it",
            if var.starts_with(tidemark_core::secret::FILE_PREFIX) {
                "readable"
            } else {
                "set"
            }
        );
    }
    Ok(config)
}

/// Names of the `${VAR}` references of every source that are unset here,
/// and of the `${file:/path}` references whose file cannot be read here.
/// A tenanted source's references are checked for each of its tenants.
pub fn unset_variables(config: &Config, tenants: &BTreeMap<String, Vec<Tenant>>) -> Vec<String> {
    let mut vars: Vec<String> = Vec::new();
    for (name, source) in &config.sources {
        let views: Vec<tidemark_core::SourceConfig> = match tenants.get(name) {
            Some(list) => list
                .iter()
                .filter_map(|t| source.for_tenant(t).ok())
                .collect(),
            None => vec![source.clone()],
        };
        let mut secrets: Vec<tidemark_core::Secret> = Vec::new();
        for v in &views {
            secrets.extend(v.headers.values().cloned());
            if let Some(auth) = &v.auth {
                secrets.extend(auth.secrets().into_iter().cloned());
            }
        }
        for s in &secrets {
            for v in s.variables().unwrap_or_default() {
                let missing = match v.strip_prefix(tidemark_core::secret::FILE_PREFIX) {
                    Some(path) => std::fs::File::open(path).is_err(),
                    None => std::env::var_os(v).is_none(),
                };
                if missing && !vars.iter().any(|x| x == v) {
                    vars.push(v.to_string());
                }
            }
        }
    }
    vars
}
