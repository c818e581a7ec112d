//! The tenants the coordinator runs, per tenanted source: its config's
//! `tenants.list`, its `tenants.file` (re-read when the file changes) and
//! the tenants operators added at run time (re-read when the store's
//! tenants version moves, which every pass reads in its survey). A pass
//! asks [`Tenants::refresh`] what came and went; the coordinator creates
//! the jobs of a tenant that came and retires those of one that went.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::SystemTime;

use tidemark_core::Config;
use tidemark_core::config::{load_tenants_file, tenant_vars_used};
use tidemark_core::tenant::Tenant;
use tidemark_state::{ActiveTenant, StateError, TenantOrigin, TenantRegistry};
use tidemark_telemetry::Metrics;

/// The tenants of one source.
struct SourceTenants {
    file: Option<PathBuf>,
    /// The file's modification time and length when it was last read.
    stamp: Option<(SystemTime, u64)>,
    /// The file could not be read last time (said once, not every pass).
    missing: bool,
    /// A read of the file that removes tenants, applied once the file has
    /// kept the same stamp for a pass (a file caught half-written must not
    /// retire tenants); its additions are applied at once.
    pending: Option<((SystemTime, u64), Vec<Tenant>)>,
    from_file: Vec<Tenant>,
    from_list: Vec<Tenant>,
    added: Vec<Tenant>,
    /// The vars every tenant must set.
    used: BTreeMap<String, String>,
    active: BTreeMap<String, ActiveTenant>,
    /// The set a refresh computed, until the coordinator has applied it
    /// ([`Tenants::applied`]): a pass that fails before then computes the
    /// same change again, so no change is lost to an error.
    next: Option<BTreeMap<String, ActiveTenant>>,
}

/// What a look at a tenants file found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    /// Its tenants changed.
    Changed,
    /// Nothing new (or no file configured).
    Same,
    /// It cannot be read or has errors.
    Failed,
}

/// Tenants that came and went in one source.
#[derive(Debug, Default)]
pub(crate) struct Change {
    pub source: String,
    pub came: Vec<String>,
    pub went: Vec<String>,
}

pub(crate) struct Tenants {
    sources: BTreeMap<String, SourceTenants>,
    /// The store's tenants version last applied.
    version: Option<u64>,
}

impl Tenants {
    pub fn new(config: &Config) -> Self {
        let sources = config
            .sources
            .iter()
            .filter_map(|(name, s)| {
                let t = s.tenants.as_ref()?;
                Some((
                    name.clone(),
                    SourceTenants {
                        file: t.file.as_ref().map(PathBuf::from),
                        stamp: None,
                        missing: false,
                        pending: None,
                        from_file: Vec::new(),
                        from_list: t.list.clone(),
                        added: Vec::new(),
                        used: tenant_vars_used(config, name),
                        active: BTreeMap::new(),
                        next: None,
                    },
                ))
            })
            .collect();
        Tenants {
            sources,
            version: None,
        }
    }

    /// True when some source has tenants.
    pub fn any(&self) -> bool {
        !self.sources.is_empty()
    }

    /// True when `source` has tenants.
    pub fn is_tenanted(&self, source: &str) -> bool {
        self.sources.contains_key(source)
    }

    /// The tenants running for `source`.
    pub fn active(&self, source: &str) -> impl Iterator<Item = &str> {
        self.sources
            .get(source)
            .into_iter()
            .flat_map(|s| s.active.keys().map(String::as_str))
    }

    /// A running tenant of `source`.
    pub fn get(&self, source: &str, tenant: &str) -> Option<&ActiveTenant> {
        self.sources.get(source)?.active.get(tenant)
    }

    /// Forget what was read: the next refresh reads everything (a new
    /// leadership term; another leader may have seen other files).
    pub fn reset(&mut self) {
        self.version = None;
        for s in self.sources.values_mut() {
            s.stamp = None;
            s.missing = false;
            s.pending = None;
            s.from_file.clear();
            s.active.clear();
            s.next = None;
        }
    }

    /// The coordinator applied what the last refresh computed (or is about
    /// to register every job from it): it becomes the running set.
    pub fn applied(&mut self) {
        for s in self.sources.values_mut() {
            if let Some(next) = s.next.take() {
                s.active = next;
            }
        }
    }

    /// Re-read the tenants files that changed and, when `version` moved,
    /// the added tenants; store the running set of every source that
    /// changed, and say what came and went.
    pub async fn refresh(
        &mut self,
        store: &dyn TenantRegistry,
        version: u64,
        metrics: &Metrics,
    ) -> Result<Vec<Change>, StateError> {
        let reread_added = self.version != Some(version);
        let first = self.version.is_none();
        let mut changes = Vec::new();
        for (name, s) in &mut self.sources {
            let read = reread_file(name, s, metrics);
            let mut dirty = read == Read::Changed || s.next.is_some();
            if first && read == Read::Failed && s.from_file.is_empty() {
                // A new leader that cannot read the file runs the file's
                // tenants the last leader stored, rather than retiring them.
                s.from_file = store
                    .active_tenants(name)
                    .await?
                    .into_iter()
                    .filter(|t| t.origin == TenantOrigin::File)
                    .map(|t| t.tenant())
                    .collect();
                tracing::warn!(source = %name, tenants = s.from_file.len(), "the tenants file cannot be read at takeover; running the file's tenants as the last leader stored them");
            }
            if reread_added {
                let added = store.added_tenants(name).await?;
                if added != s.added {
                    s.added = added;
                    dirty = true;
                }
            }
            // A first refresh publishes the set even when it is empty.
            if !dirty && self.version.is_some() {
                continue;
            }
            let next = effective(s);
            let change = Change {
                source: name.clone(),
                came: next
                    .keys()
                    .filter(|t| !s.active.contains_key(*t))
                    .cloned()
                    .collect(),
                went: s
                    .active
                    .keys()
                    .filter(|t| !next.contains_key(*t))
                    .cloned()
                    .collect(),
            };
            let vars_changed = next
                .iter()
                .any(|(k, t)| s.active.get(k).is_some_and(|a| a != t));
            if first || vars_changed || !change.came.is_empty() || !change.went.is_empty() {
                let list: Vec<ActiveTenant> = next.values().cloned().collect();
                store.set_active_tenants(name, &list).await?;
                metrics
                    .tenants
                    .get_or_create(&Metrics::source(name))
                    .set(list.len() as i64);
                if !change.came.is_empty() || !change.went.is_empty() {
                    tracing::info!(
                        source = %name,
                        came = change.came.len(),
                        went = change.went.len(),
                        tenants = list.len(),
                        "tenants changed"
                    );
                }
            }
            s.next = Some(next);
            changes.push(change);
        }
        self.version = Some(version);
        Ok(changes)
    }
}

/// Read the source's tenants file again when its modification time or
/// length changed. A file that does not parse is reported and ignored: the
/// tenants stay as they were (a half-written file must not remove them).
fn reread_file(source: &str, s: &mut SourceTenants, metrics: &Metrics) -> Read {
    let Some(path) = &s.file else {
        return Read::Same;
    };
    let stamp = std::fs::metadata(path)
        .ok()
        .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
    if stamp.is_some() && stamp == s.stamp {
        // Unchanged for a pass: a held-back removal is applied now.
        return match s.pending.take() {
            Some((at, list)) if Some(at) == stamp => {
                s.from_file = list;
                Read::Changed
            }
            _ => Read::Same,
        };
    }
    s.pending = None;
    let Some(stamp) = stamp else {
        if !s.missing {
            tracing::error!(source, file = %path.display(), "cannot read the tenants file; keeping its tenants as they were");
            metrics
                .tenants_file_errors
                .get_or_create(&Metrics::source(source))
                .inc();
        }
        s.missing = true;
        s.stamp = None;
        return Read::Failed;
    };
    s.missing = false;
    s.stamp = Some(stamp);
    match load_tenants_file(path, &s.used) {
        Ok(list) => {
            let kept: BTreeSet<&str> = list.iter().map(|t| t.name.as_str()).collect();
            if s.from_file.iter().any(|t| !kept.contains(t.name.as_str())) {
                // Removals wait a pass; new tenants (and new vars) start now.
                let mut now: Vec<Tenant> = list.clone();
                now.extend(
                    s.from_file
                        .iter()
                        .filter(|t| !kept.contains(t.name.as_str()))
                        .cloned(),
                );
                s.pending = Some((stamp, list));
                let changed = now != s.from_file;
                s.from_file = now;
                return if changed { Read::Changed } else { Read::Same };
            }
            let changed = list != s.from_file;
            s.from_file = list;
            if changed { Read::Changed } else { Read::Same }
        }
        Err(e) => {
            tracing::error!(source, errors = %e, "the tenants file has errors; keeping its tenants as they were");
            metrics
                .tenants_file_errors
                .get_or_create(&Metrics::source(source))
                .inc();
            Read::Failed
        }
    }
}

/// The tenants of a source: its file, then its list, then the added ones
/// (a name in more than one keeps the first).
fn effective(s: &SourceTenants) -> BTreeMap<String, ActiveTenant> {
    let mut out = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for (list, origin) in [
        (&s.from_file, TenantOrigin::File),
        (&s.from_list, TenantOrigin::List),
        (&s.added, TenantOrigin::Added),
    ] {
        for t in list {
            if seen.insert(t.name.clone()) {
                out.insert(
                    t.name.clone(),
                    ActiveTenant {
                        name: t.name.clone(),
                        vars: t.vars.clone(),
                        origin,
                    },
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[Tenant]) -> Vec<&str> {
        list.iter().map(|t| t.name.as_str()).collect()
    }

    fn config(file: &std::path::Path) -> Config {
        tidemark_core::config::load_str(
            "t.yaml",
            &format!(
                "sources:\n  api:\n    base_url: \"http://127.0.0.1:9/{{tenant}}\"\n    tenants: {{ file: {} }}\nfeeds: []\n",
                file.display()
            ),
        )
        .expect("config")
    }

    fn came(changes: &[Change]) -> Vec<&str> {
        changes
            .iter()
            .flat_map(|c| c.came.iter().map(String::as_str))
            .collect()
    }

    /// A change the coordinator could not apply (the store failed) comes
    /// again at the next pass; a new leader that cannot read the file runs
    /// the file's tenants the last leader stored instead of retiring them.
    #[tokio::test]
    async fn no_change_is_lost_and_a_broken_file_at_takeover_retires_nobody() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tenants.yaml");
        let store = tidemark_state::EmbeddedStore::in_memory();
        let metrics = Metrics::new();
        let mut t = Tenants::new(&config(&path));
        std::fs::write(&path, "- a\n- b\n").expect("write");
        let c = t.refresh(&store, 0, &metrics).await.expect("refresh");
        assert_eq!(came(&c), vec!["a", "b"]);
        t.applied();

        std::thread::sleep(std::time::Duration::from_millis(5));
        std::fs::write(&path, "- a\n- b\n- c\n").expect("write");
        let c = t.refresh(&store, 0, &metrics).await.expect("refresh");
        assert_eq!(came(&c), vec!["c"]);
        // Not applied (say ensure_many failed): the next pass offers it again.
        let c = t.refresh(&store, 0, &metrics).await.expect("refresh");
        assert_eq!(came(&c), vec!["c"]);
        t.applied();
        let c = t.refresh(&store, 0, &metrics).await.expect("refresh");
        assert!(came(&c).is_empty());
        assert_eq!(t.active("api").collect::<Vec<_>>(), vec!["a", "b", "c"]);

        // A new term, and the file is gone: the stored running set stands in.
        std::fs::remove_file(&path).expect("remove");
        t.reset();
        let c = t.refresh(&store, 0, &metrics).await.expect("refresh");
        assert_eq!(came(&c), vec!["a", "b", "c"]);
        assert!(c.iter().all(|c| c.went.is_empty()));
        t.applied();
        assert_eq!(t.active("api").collect::<Vec<_>>(), vec!["a", "b", "c"]);
    }

    /// New tenants in the file start at once; tenants gone from it go only
    /// once the file has stayed the same for a pass, so a file caught
    /// half-written (or truncated before it is written) retires nobody.
    #[test]
    fn removals_wait_for_a_file_that_holds_still() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tenants.yaml");
        let metrics = Metrics::new();
        let mut s = SourceTenants {
            file: Some(path.clone()),
            stamp: None,
            missing: false,
            pending: None,
            from_file: Vec::new(),
            from_list: Vec::new(),
            added: Vec::new(),
            used: BTreeMap::new(),
            active: BTreeMap::new(),
            next: None,
        };
        let changed = |s: &mut SourceTenants| reread_file("src", s, &metrics) == Read::Changed;
        let write = |text: &str| {
            // A new length or a later mtime: the stamp moves.
            std::thread::sleep(std::time::Duration::from_millis(5));
            std::fs::write(&path, text).expect("write");
        };
        write("- a\n- b\n");
        assert!(changed(&mut s));
        assert_eq!(names(&s.from_file), vec!["a", "b"]);
        assert!(!changed(&mut s), "unchanged");

        // Truncated: nobody is retired yet ...
        write("");
        assert!(!changed(&mut s));
        assert_eq!(names(&s.from_file), vec!["a", "b"]);
        // ... and the whole file is back before the next pass: nothing happened.
        write("- a\n- b\n- c\n");
        assert!(changed(&mut s), "c starts at once");
        assert_eq!(names(&s.from_file), vec!["a", "b", "c"]);

        // A real removal: applied once the file held still for a pass.
        write("- c\n");
        changed(&mut s);
        assert_eq!(names(&s.from_file), vec!["c", "a", "b"]);
        assert!(changed(&mut s), "applied on the next pass");
        assert_eq!(names(&s.from_file), vec!["c"]);
        assert!(!changed(&mut s));
    }
}
