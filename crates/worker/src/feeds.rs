//! The worker's view of the feed registry: the config a coordinator stored,
//! re-read when its version changes, with one HTTP client per source.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidemark_core::Config;
use tidemark_source::HttpSource;
use tidemark_state::FeedRegistry;
use tidemark_state::registry::load_config;
use tokio::sync::Mutex;

/// One version of the registry, ready to use.
pub struct Snapshot {
    pub version: u64,
    pub config: Config,
    /// The client of each source, or why it cannot be built.
    pub sources: HashMap<String, Result<HttpSource, String>>,
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
            .map(|(name, cfg)| {
                (
                    name.clone(),
                    HttpSource::new(name, cfg).map_err(|e| e.to_string()),
                )
            })
            .collect();
        tracing::info!(version, feeds = config.feeds.len(), "feed registry loaded");
        let snap = Arc::new(Snapshot {
            version,
            config,
            sources,
        });
        st.0 = Some(snap.clone());
        Ok(Some(snap))
    }
}
