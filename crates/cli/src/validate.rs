//! `tidemark validate --config F`: check a config file without running anything.

use std::io::Write;
use std::path::Path;

use tidemark_core::config::{Config, load_file};

use crate::exit::Failure;

/// Load and validate `path`; on success print a summary (and warnings for
/// `${VAR}` references unset in this environment, by name only).
pub fn run(path: &Path, out: &mut dyn Write) -> Result<Config, Failure> {
    let config = load_file(path).map_err(|e| Failure::usage(e.to_string()))?;
    let now = chrono::Utc::now();
    let jobs: usize = config
        .feeds
        .iter()
        .map(|f| f.partitions(now).map(|p| p.len()).unwrap_or(0))
        .sum();
    let _ = writeln!(
        out,
        "{}: ok: {} source(s), {} feed(s), {} job(s)",
        path.display(),
        config.sources.len(),
        config.feeds.len(),
        jobs
    );
    for var in unset_variables(&config) {
        let _ = writeln!(
            out,
            "warning: ${{{var}}} is not set in this environment; processes that send requests need it"
        );
    }
    Ok(config)
}

/// Names of the `${VAR}` references of every source that are unset here.
pub fn unset_variables(config: &Config) -> Vec<String> {
    let mut vars: Vec<String> = Vec::new();
    for source in config.sources.values() {
        let mut secrets: Vec<&tidemark_core::Secret> = source.headers.values().collect();
        if let Some(auth) = &source.auth {
            secrets.extend(auth.secrets());
        }
        for s in secrets {
            for v in s.variables().unwrap_or_default() {
                if std::env::var_os(v).is_none() && !vars.iter().any(|x| x == v) {
                    vars.push(v.to_string());
                }
            }
        }
    }
    vars
}
