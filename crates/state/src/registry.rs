//! The feed registry: the coordinator stores the validated config (sources
//! and feeds, secrets still as `${VAR}` references) so that workers need no
//! config file. It carries a version that changes only when the content does.

use sha2::{Digest, Sha256};
use tidemark_core::Config;

use crate::{FeedRegistry, StateError};

/// Store `config` as the registry; returns its version.
pub async fn publish_config(store: &dyn FeedRegistry, config: &Config) -> Result<u64, StateError> {
    let doc = serde_json::to_string(config).map_err(|e| StateError::Corrupt {
        job: "registry".into(),
        reason: e.to_string(),
    })?;
    let digest = hex::encode(Sha256::digest(doc.as_bytes()));
    store.put_registry(&digest, &doc).await
}

/// The registered config and its version, if a coordinator registered one.
pub async fn load_config(store: &dyn FeedRegistry) -> Result<Option<(u64, Config)>, StateError> {
    let Some((version, doc)) = store.registry().await? else {
        return Ok(None);
    };
    let config: Config = serde_json::from_str(&doc).map_err(|e| StateError::Corrupt {
        job: "registry".into(),
        reason: format!("the stored feed registry does not parse: {e}"),
    })?;
    Ok(Some((version, config)))
}
