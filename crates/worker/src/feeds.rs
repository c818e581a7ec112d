//! The worker's view of the feed registry: the config a coordinator stored,
//! re-read when its version changes, with one HTTP client per source; for
//! a tenanted source one client per tenant over the source's connections,
//! and each tenant's view of its feeds (templates filled), built on first use.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidemark_core::tenant::Tenant;
use tidemark_core::{Config, FeedConfig, SourceConfig};
use tidemark_source::{HttpSource, Pool};
use tidemark_state::FeedRegistry;
use tidemark_state::registry::load_config;
use tokio::sync::Mutex;

/// One version of the registry, ready to use.
pub struct Snapshot {
    pub version: u64,
    pub config: Config,
    /// The client of each source without tenants, or why it cannot be built.
    pub sources: HashMap<String, Result<HttpSource, String>>,
    /// The connections of each tenanted source.
    pools: HashMap<String, Result<Pool, String>>,
    /// Tenants' views, by (feed, tenant), and clients, by (source, tenant).
    tenants: std::sync::Mutex<TenantCache>,
}

#[derive(Default)]
struct TenantCache {
    views: HashMap<(String, String), Arc<TenantView>>,
    clients: HashMap<(String, String), (BTreeMap<String, String>, HttpSource)>,
}

/// Past this many cached views the cache starts over (tenants come and go).
const MAX_CACHED_VIEWS: usize = 200_000;

/// A feed and its source as one tenant sees them.
pub struct TenantView {
    pub vars: BTreeMap<String, String>,
    pub feed: FeedConfig,
    pub source: SourceConfig,
    pub http: HttpSource,
}

impl Snapshot {
    /// `feed` (of a tenanted source) as `tenant` sees it, with the tenant's
    /// client (one per tenant and source: its OAuth2 token is its own).
    pub fn tenant_view(
        &self,
        feed: &FeedConfig,
        tenant: &Tenant,
    ) -> Result<Arc<TenantView>, String> {
        let key = (feed.name.clone(), tenant.name.clone());
        let mut cache = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = cache.views.get(&key)
            && v.vars == tenant.vars
        {
            return Ok(v.clone());
        }
        let source_cfg =
            self.config.sources.get(&feed.source).ok_or_else(|| {
                format!("feed {} names an unknown source {}", feed.name, feed.source)
            })?;
        let source = source_cfg.for_tenant(tenant)?;
        let feed_view = feed.for_tenant(tenant)?;
        let client_key = (feed.source.clone(), tenant.name.clone());
        let http = match cache.clients.get(&client_key) {
            Some((vars, http)) if *vars == tenant.vars => http.clone(),
            _ => {
                let pool = self
                    .pools
                    .get(&feed.source)
                    .ok_or_else(|| format!("source {} has no tenants", feed.source))?
                    .clone()?;
                let http = pool
                    .source(&feed.source, &source)
                    .map_err(|e| format!("tenant {}: {e}", tenant.name))?;
                cache
                    .clients
                    .insert(client_key, (tenant.vars.clone(), http.clone()));
                http
            }
        };
        let view = Arc::new(TenantView {
            vars: tenant.vars.clone(),
            feed: feed_view,
            source,
            http,
        });
        if cache.views.len() >= MAX_CACHED_VIEWS {
            cache.views.clear();
            cache.clients.clear();
        }
        cache.views.insert(key, view.clone());
        Ok(view)
    }
}

pub struct Feeds {
    store: Arc<dyn FeedRegistry>,
    refresh: Duration,
    state: Mutex<(Option<Arc<Snapshot>>, Option<Instant>)>,
}

impl Feeds {
    pub fn new(store: Arc<dyn FeedRegistry>, refresh: Duration) -> Self {
        Self {
            store,
            refresh,
            state: Mutex::new((None, None)),
        }
    }

    /// The current snapshot. The version is checked at most once per
    /// `refresh`, or at once with `force` (a task named a feed we do not know).
    pub async fn current(&self, force: bool) -> Result<Option<Arc<Snapshot>>, String> {
        let mut st = self.state.lock().await;
        let fresh = st.1.is_some_and(|t| t.elapsed() < self.refresh);
        if fresh && !force {
            return Ok(st.0.clone());
        }
        let version = self
            .store
            .registry_version()
            .await
            .map_err(|e| e.to_string())?;
        st.1 = Some(Instant::now());
        if version.is_none() {
            st.0 = None;
            return Ok(None);
        }
        if st.0.as_ref().map(|s| s.version) == version {
            return Ok(st.0.clone());
        }
        let Some((version, config)) = load_config(&*self.store).await.map_err(|e| e.to_string())?
        else {
            return Ok(None);
        };
        let sources = config
            .sources
            .iter()
            .filter(|(_, cfg)| !cfg.is_tenanted())
            .map(|(name, cfg)| {
                (
                    name.clone(),
                    HttpSource::new(name, cfg).map_err(|e| e.to_string()),
                )
            })
            .collect();
        let pools = config
            .sources
            .iter()
            .filter(|(_, cfg)| cfg.is_tenanted())
            .map(|(name, cfg)| (name.clone(), Pool::new(cfg).map_err(|e| e.to_string())))
            .collect();
        tracing::info!(version, feeds = config.feeds.len(), "feed registry loaded");
        let snap = Arc::new(Snapshot {
            version,
            config,
            sources,
            pools,
            tenants: Default::default(),
        });
        st.0 = Some(snap.clone());
        Ok(Some(snap))
    }
}
