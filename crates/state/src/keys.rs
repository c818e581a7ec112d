//! Redis key names, all under one configurable prefix (default `tidemark:`).

use tidemark_core::checkpoint::JobId;

#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
        }
    }
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    /// The hash of one job. The partition is percent-encoded: it is any text.
    pub fn job(&self, job: &JobId) -> String {
        let part: String = url::form_urlencoded::byte_serialize(job.partition.as_bytes()).collect();
        format!("{}job:{}:{part}", self.prefix, job.feed)
    }
    /// The set of every job hash key.
    pub fn jobs(&self) -> String {
        format!("{}jobs", self.prefix)
    }
    /// The feed registry: version, digest and document.
    pub fn registry(&self) -> String {
        format!("{}registry", self.prefix)
    }
    pub fn leader(&self) -> String {
        format!("{}leader", self.prefix)
    }
    pub fn rate(&self, source: &str) -> String {
        format!("{}rate:{source}", self.prefix)
    }
    pub fn source_pause(&self, source: &str) -> String {
        format!("{}pause:{source}", self.prefix)
    }
}
