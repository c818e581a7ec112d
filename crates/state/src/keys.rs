//! Redis key names, all under one configurable prefix (default `tidemark:`).
//! The scheduler's index keys are built by the scripts themselves
//! (lua/index.lua lists them); the ones read from Rust are here too.

use tidemark_core::checkpoint::JobId;

#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

/// A partition as it appears in keys and index members: percent-encoded,
/// because a partition is any text.
pub fn member(partition: &str) -> String {
    url::form_urlencoded::byte_serialize(partition.as_bytes()).collect()
}

/// The partition a [`member`] encodes.
pub fn partition(member: &str) -> String {
    url::form_urlencoded::parse(format!("p={member}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// A job of the running index, whose members are `feed:member` (feed names
/// have no colon).
pub fn running_job(entry: &str) -> Option<JobId> {
    let (feed, m) = entry.split_once(':')?;
    Some(JobId::new(feed, partition(m)))
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
    /// The hash of one job.
    pub fn job(&self, job: &JobId) -> String {
        self.job_member(&job.feed, &member(&job.partition))
    }
    pub fn job_member(&self, feed: &str, member: &str) -> String {
        format!("{}job:{feed}:{member}", self.prefix)
    }
    /// Before the indexes: the set of every job hash key (read once, by the
    /// migration, then deleted).
    pub fn legacy_jobs(&self) -> String {
        format!("{}jobs", self.prefix)
    }
    /// The layout version of the keys under this prefix.
    pub fn layout(&self) -> String {
        format!("{}layout", self.prefix)
    }
    /// One of a feed's index zsets: `jobs`, `due`, `failed`, `progress`, `hw`.
    pub fn feed_index(&self, feed: &str, index: &str) -> String {
        format!("{}feed:{feed}:{index}", self.prefix)
    }
    pub fn running(&self) -> String {
        format!("{}running", self.prefix)
    }
    pub fn due_feeds(&self) -> String {
        format!("{}due_feeds", self.prefix)
    }
    pub fn feeds(&self) -> String {
        format!("{}feeds", self.prefix)
    }
    pub fn workers(&self) -> String {
        format!("{}workers", self.prefix)
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
    /// The tenants added to a source at run time: name -> vars (JSON).
    pub fn tenants_added(&self, source: &str) -> String {
        format!("{}tenants:{source}:added", self.prefix)
    }
    /// The tenants the coordinator runs for a source: name -> ActiveTenant (JSON).
    pub fn tenants_active(&self, source: &str) -> String {
        format!("{}tenants:{source}:active", self.prefix)
    }
    pub fn tenants_version(&self) -> String {
        format!("{}tenants_version", self.prefix)
    }
    pub fn source_pause(&self, source: &str) -> String {
        format!("{}pause:{source}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_round_trip_any_partition() {
        for p in ["p/1 ü", "a:b", "", "100%", "x+y"] {
            assert_eq!(partition(&member(p)), p);
            let j = running_job(&format!("feed-1:{}", member(p))).unwrap();
            assert_eq!(j, JobId::new("feed-1", p));
        }
    }
}
