//! Where the tests and the benchmark find Redis and RabbitMQ: a URL given
//! by a flag, else `REDIS_URL` / `AMQP_URL` (else the local default) when
//! something answers there; else, with the `containers` feature and Docker,
//! a container started once per process, which lives as long as it.

use std::sync::OnceLock;
use std::time::Duration;

use crate::HarnessError;

/// A service the tests and the benchmark need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Redis,
    RabbitMq,
}

impl Service {
    fn name(self) -> &'static str {
        match self {
            Self::Redis => "Redis",
            Self::RabbitMq => "RabbitMQ",
        }
    }
    /// The environment variable that names its URL.
    pub fn var(self) -> &'static str {
        match self {
            Self::Redis => "REDIS_URL",
            Self::RabbitMq => "AMQP_URL",
        }
    }
    fn default_url(self) -> &'static str {
        match self {
            Self::Redis => "redis://127.0.0.1:6379",
            Self::RabbitMq => "amqp://guest:guest@127.0.0.1:5672/%2f",
        }
    }
}

/// The URL of `service`: `given` (a flag) when something answers there,
/// else an error; without one, its variable or its default, else a
/// container (see the module doc), found once per process.
pub fn url(service: Service, given: Option<&str>) -> Result<String, HarnessError> {
    match given {
        Some(url) if answers(host_port(url)) => Ok(url.to_string()),
        Some(url) => Err(HarnessError::NoService {
            what: service.name(),
            url: url.to_string(),
            var: service.var(),
            no_docker: false,
        }),
        None => {
            static REDIS: OnceLock<Result<String, String>> = OnceLock::new();
            static RABBITMQ: OnceLock<Result<String, String>> = OnceLock::new();
            let cell = match service {
                Service::Redis => &REDIS,
                Service::RabbitMq => &RABBITMQ,
            };
            cell.get_or_init(|| find(service).map_err(|e| e.to_string()))
                .clone()
                .map_err(HarnessError::bench)
        }
    }
}

/// [`url`] of Redis: `REDIS_URL`, the local server, or a container.
pub fn redis_url() -> Result<String, HarnessError> {
    url(Service::Redis, None)
}

/// [`url`] of RabbitMQ: `AMQP_URL`, the local broker, or a container.
pub fn amqp_url() -> Result<String, HarnessError> {
    url(Service::RabbitMq, None)
}

fn find(service: Service) -> Result<String, HarnessError> {
    let url = std::env::var(service.var()).unwrap_or_else(|_| service.default_url().into());
    if answers(host_port(&url)) {
        return Ok(url);
    }
    container(service, url)
}

/// `host:port` of a `scheme://[user:pass@]host:port/...` URL.
pub fn host_port(url: &str) -> &str {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let rest = rest.rsplit('@').next().unwrap_or(rest);
    let rest = rest.split('/').next().unwrap_or(rest);
    // A list (Sentinel's hosts, a cluster's nodes): its first entry.
    rest.split(',').next().unwrap_or(rest)
}

/// True when a TCP connection to `hostport` succeeds within 2 s.
pub fn answers(hostport: &str) -> bool {
    use std::net::ToSocketAddrs;
    hostport
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
}

#[cfg(not(feature = "containers"))]
fn container(service: Service, url: String) -> Result<String, HarnessError> {
    Err(HarnessError::NoService {
        what: service.name(),
        url,
        var: service.var(),
        no_docker: false,
    })
}

#[cfg(feature = "containers")]
fn container(service: Service, url: String) -> Result<String, HarnessError> {
    use testcontainers_modules::testcontainers::runners::SyncRunner;
    let docker = std::process::Command::new("docker")
        .arg("info")
        .output()
        .is_ok_and(|o| o.status.success());
    if !docker {
        return Err(HarnessError::NoService {
            what: service.name(),
            url,
            var: service.var(),
            no_docker: true,
        });
    }
    let failed =
        |e: testcontainers_modules::testcontainers::TestcontainersError| HarnessError::Container {
            what: service.name(),
            reason: e.to_string(),
        };
    let (container, url): (Box<dyn std::any::Any + Send + Sync>, String) = match service {
        Service::Redis => {
            let c = testcontainers_modules::redis::Redis::default()
                .start()
                .map_err(failed)?;
            let port = c.get_host_port_ipv4(6379).map_err(failed)?;
            (Box::new(c), format!("redis://127.0.0.1:{port}"))
        }
        Service::RabbitMq => {
            let c = testcontainers_modules::rabbitmq::RabbitMq::default()
                .start()
                .map_err(failed)?;
            let port = c.get_host_port_ipv4(5672).map_err(failed)?;
            (
                Box::new(c),
                format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
            )
        }
    };
    // Leaked on purpose: the container lives as long as this process.
    Box::leak(container);
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_drops_the_scheme_the_credentials_and_the_path() {
        assert_eq!(
            host_port("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "127.0.0.1:5672"
        );
        assert_eq!(host_port("redis://127.0.0.1:6379"), "127.0.0.1:6379");
        assert_eq!(
            host_port("redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2:26379/mymaster"),
            "10.0.0.1:26379"
        );
        assert_eq!(host_port("127.0.0.1:1"), "127.0.0.1:1");
    }

    #[cfg(not(feature = "containers"))]
    #[test]
    fn a_url_where_nothing_answers_is_an_error_naming_it() {
        // Port 1 on loopback: nothing listens there.
        let e = url(Service::Redis, Some("redis://127.0.0.1:1"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("no Redis at redis://127.0.0.1:1"), "{e}");
        assert!(e.contains("REDIS_URL"), "{e}");
    }
}
