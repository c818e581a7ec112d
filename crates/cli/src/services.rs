//! Where Redis and RabbitMQ are: the same two options in every command that
//! reaches them. The URLs may carry passwords: `--help` does not show the
//! environment's values, and their `Debug` shows `***` (`ServiceUrl`).

use clap::Args;
use tidemark_core::ServiceUrl;

/// `--redis-url` / `REDIS_URL`.
#[derive(Args, Debug, Clone)]
pub struct RedisArg {
    /// Redis URL (state, leases, the feed registry, the rate limiter); rediss:// for TLS.
    #[arg(
        id = "redis_url",
        long = "redis-url",
        value_name = "URL",
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true
    )]
    pub url: ServiceUrl,
}

/// `--amqp-url` / `AMQP_URL`.
#[derive(Args, Debug, Clone)]
pub struct AmqpArg {
    /// RabbitMQ URL (page tasks, downstream records); amqps:// for TLS.
    #[arg(
        id = "amqp_url",
        long = "amqp-url",
        value_name = "URL",
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    pub url: ServiceUrl,
}
