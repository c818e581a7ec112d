//! Where Redis and RabbitMQ are: the same two options in every command that
//! reaches them. The URLs may carry passwords: `--help` does not show the
//! environment's values, and their `Debug` shows `***` (`ServiceUrl`,
//! `AmqpUrl` for every entry of a list).

use clap::Args;
use tidemark_bus::endpoints::AmqpUrl;
use tidemark_core::ServiceUrl;

/// `--redis-url` / `REDIS_URL`, and the replicas a write waits for. Its
/// `Debug` shows `***` for the passwords, `sentinel_password` included.
#[derive(Args, Clone)]
pub struct RedisArg {
    /// Redis URL (state, leases, the feed registry, the rate limiter); rediss:// for TLS;
    /// redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/MASTER[?sentinel_password=P]
    /// for a master found through Sentinel (rediss+sentinel:// for TLS).
    #[arg(
        id = "redis_url",
        long = "redis-url",
        value_name = "URL",
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true
    )]
    pub url: ServiceUrl,
    /// Replicas that must acknowledge each commit, new epoch and lease change (Redis WAIT)
    /// before it counts as done; 0: no waiting.
    #[arg(
        long,
        env = "TIDEMARK_REDIS_WAIT_REPLICAS",
        value_name = "N",
        default_value_t = 0
    )]
    pub redis_wait_replicas: u32,
    /// How long a write waits for those replicas; past it the write counts as done, with a warning.
    #[arg(long, env = "TIDEMARK_REDIS_WAIT_TIMEOUT", value_name = "DURATION",
          default_value = "1s", value_parser = wait_timeout)]
    pub redis_wait_timeout: std::time::Duration,
}

impl RedisArg {
    /// The store's `WAIT`, when replicas were asked for.
    pub fn wait(&self) -> Option<tidemark_state::WaitReplicas> {
        (self.redis_wait_replicas > 0).then_some(tidemark_state::WaitReplicas {
            replicas: self.redis_wait_replicas,
            timeout: self.redis_wait_timeout,
        })
    }
}

impl std::fmt::Debug for RedisArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisArg")
            .field("url", &tidemark_state::redacted_url(&self.url))
            .field("redis_wait_replicas", &self.redis_wait_replicas)
            .field("redis_wait_timeout", &self.redis_wait_timeout)
            .finish()
    }
}

/// A duration above zero (`WAIT` with 0 would wait forever).
fn wait_timeout(s: &str) -> Result<std::time::Duration, String> {
    let d = tidemark_core::options::parse_duration(s)?;
    if d.is_zero() {
        return Err("must be more than 0 (Redis WAIT 0 waits forever)".into());
    }
    Ok(d)
}

/// `--amqp-url` / `AMQP_URL`: one URL, or a cluster's nodes as a
/// comma-separated list (`tidemark_bus::endpoints`); its `Debug` shows
/// `***` for the password of every entry.
#[derive(Args, Debug, Clone)]
pub struct AmqpArg {
    /// RabbitMQ URL (page tasks, downstream records); amqps:// for TLS. For a
    /// cluster, a comma-separated list of its nodes, tried in a random order
    /// on every (re)connection; entries after the first may be just host:port
    /// (scheme, credentials and vhost then come from the first).
    #[arg(
        id = "amqp_url",
        long = "amqp-url",
        value_name = "URL",
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    pub url: AmqpUrl,
}

#[cfg(test)]
mod redis_arg_tests {
    use super::RedisArg;
    use clap::Parser;

    #[derive(Parser)]
    struct Args {
        #[command(flatten)]
        redis: RedisArg,
    }

    #[test]
    fn sentinel_passwords_are_hidden_and_wait_is_off_unless_asked() {
        let args = Args::try_parse_from([
            "role",
            "--redis-url",
            "redis+sentinel://:data-canary@s1:26379,s2:26379/mymaster?sentinel_password=sentinel-canary",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let shown = format!("{:?}", args.redis);
        assert!(!shown.contains("canary"), "{shown}");
        assert!(
            shown
                .contains("redis+sentinel://:***@s1:26379,s2:26379/mymaster?sentinel_password=***"),
            "{shown}"
        );
        assert_eq!(args.redis.wait(), None);
    }

    #[test]
    fn wait_flags_parse_and_a_zero_timeout_is_refused() {
        let args = Args::try_parse_from([
            "role",
            "--redis-wait-replicas",
            "2",
            "--redis-wait-timeout",
            "250ms",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            args.redis.wait(),
            Some(tidemark_state::WaitReplicas {
                replicas: 2,
                timeout: std::time::Duration::from_millis(250)
            })
        );
        let e = Args::try_parse_from(["role", "--redis-wait-timeout", "0s"])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("more than 0"), "{e}");
    }
}
