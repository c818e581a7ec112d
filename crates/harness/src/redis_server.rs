//! A private `redis-server` for the suites that must kill or restart Redis,
//! which a shared Redis (or a container other tests use) cannot allow.
//!
//! It runs with AOF (`appendfsync everysec`) in its own temp dir, so data
//! written more than about a second before a SIGKILL survives a
//! [`RedisServer::restart`], as it would in production.
//!
//! [`RedisServer::start_tls`] starts one that speaks only TLS (`rediss://`),
//! with a CA and server certificate from files (tidemark-tests' `TestCa`
//! makes them).
//!
//! [`RedisServer::start_with`] starts a node with a password or as a
//! replica of another (the Sentinel suites: [`crate::sentinel`]).
//!
//! The one private Redis of the workspace: the end-to-end suites and the
//! state crate's crash tests start it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

const READY_WITHIN: Duration = Duration::from_secs(15);
const STOP_WITHIN: Duration = Duration::from_secs(10);

/// The PEM files of a TLS server: the CA, and the server's certificate and key.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// How to start a [`RedisServer`] beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    /// `requirepass` (and `masterauth`, for when it replicates).
    pub password: Option<String>,
    /// Start as a replica of the node on this loopback port.
    pub replica_of: Option<u16>,
    /// Speak only TLS, as [`RedisServer::start_tls`] (and replicate over TLS).
    pub tls: Option<TlsFiles>,
}

/// A `redis-server` child process on 127.0.0.1. Dropping it SIGKILLs the
/// server and removes its directory.
pub struct RedisServer {
    port: u16,
    options: NodeOptions,
    // Kept alive for the AOF across restarts; deleted on drop.
    dir: TempDir,
    // None while killed or stopped.
    child: Option<Child>,
    // The CA's PEM when the server speaks only TLS; its files are copied to `dir`.
    tls_ca: Option<String>,
}

impl RedisServer {
    /// Starts an AOF-backed server on a free port in a fresh temp dir and
    /// waits until it answers `PING`. Panics (with the server's log) if it
    /// does not within 15 s.
    pub fn start_aof() -> RedisServer {
        Self::start_in(None, NodeOptions::default())
    }

    /// [`RedisServer::start_aof`] with `options`: a password, or as a
    /// replica of another node (it is ready once it answers, not once it
    /// has synced).
    pub fn start_with(options: NodeOptions) -> RedisServer {
        let tls = options.tls.clone();
        Self::start_in(tls.as_ref(), options)
    }

    /// [`RedisServer::start_aof`], speaking only TLS on its port, with the
    /// server certificate of `ca` (copied, so `ca` may be dropped). It does
    /// not ask clients for certificates. [`RedisServer::url`] is `rediss://`.
    pub fn start_tls(tls: &TlsFiles) -> RedisServer {
        Self::start_in(Some(tls), NodeOptions::default())
    }

    fn start_in(tls: Option<&TlsFiles>, options: NodeOptions) -> RedisServer {
        let dir = tempfile::tempdir().expect("a temp dir for redis-server");
        let mut tls_ca = None;
        if let Some(tls) = tls {
            for (from, to) in [
                (&tls.ca, "tls-ca.pem"),
                (&tls.cert, "tls-server.pem"),
                (&tls.key, "tls-server.key"),
            ] {
                std::fs::copy(from, dir.path().join(to)).expect("copy a TLS file");
            }
            tls_ca = Some(std::fs::read_to_string(&tls.ca).expect("read the CA file"));
        }
        let mut server = RedisServer {
            port: 0,
            options,
            dir,
            child: None,
            tls_ca,
        };
        // redis-server cannot be handed a listener or announce a port it
        // picked, so pick one; when it is taken, redis-server says so and
        // exits, and the next try takes another.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let mut failure = String::new();
        for i in 0..20 {
            server.port = port_to_try(seed, i);
            match server.spawn() {
                Ok(()) => return server,
                Err(e) if e.contains("Address already in use") => failure = e,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("no free port after 20 tries: {failure}");
    }

    /// `redis://127.0.0.1:<port>`, or `rediss://` for a TLS server; with
    /// the password, if it has one.
    pub fn url(&self) -> String {
        let scheme = if self.tls_ca.is_some() {
            "rediss"
        } else {
            "redis"
        };
        let auth = match &self.options.password {
            Some(p) => format!(":{p}@"),
            None => String::new(),
        };
        format!("{scheme}://{auth}127.0.0.1:{}", self.port)
    }

    /// The CA's PEM, for a TLS server.
    pub fn tls_ca_pem(&self) -> Option<&str> {
        self.tls_ca.as_deref()
    }

    /// Whether the process is running (not killed or stopped).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's working dir: the AOF and `redis.log` live here.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// SIGKILLs the server and reaps it: no shutdown, no final fsync.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL on unix
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and dir (it reloads its
    /// AOF) and waits until it answers. A server still running is SIGKILLed
    /// first.
    pub fn restart(&mut self) {
        self.kill9();
        if let Err(e) = self.spawn() {
            panic!("{e}");
        }
    }

    /// SIGSTOP: the process stays, its connections stay open, and it
    /// answers nothing (a stalled node) until [`RedisServer::thaw`].
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`RedisServer::freeze`].
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn signal(&self, signal: &str) {
        let Some(pid) = self.pid() else {
            return;
        };
        // No unsafe in the workspace (no libc call): ask kill(1).
        let sent = Command::new("kill")
            .args([signal, &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(sent, "kill {signal} {pid} failed");
    }

    /// SIGTERM (Redis fsyncs the AOF and exits), then waits for the exit;
    /// SIGKILL if it takes more than 10 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // std has no SIGTERM and the workspace forbids unsafe (no libc
        // call), so ask kill(1).
        let termed = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if termed {
            let deadline = Instant::now() + STOP_WITHIN;
            while Instant::now() < deadline {
                if !matches!(child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// Spawns redis-server and waits for `PING`; on failure the child is
    /// reaped and the error carries the log.
    fn spawn(&mut self) -> Result<(), String> {
        // Appending keeps the log of earlier runs, which is what explains a
        // failed restart.
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("redis.log in the temp dir");
        let log_err = log.try_clone().expect("a second handle on redis.log");
        let port = self.port.to_string();
        let listen: Vec<String> = if self.tls_ca.is_some() {
            let file = |name: &str| self.dir.path().join(name).display().to_string();
            vec![
                "--port".into(),
                "0".into(),
                "--tls-port".into(),
                port,
                "--tls-cert-file".into(),
                file("tls-server.pem"),
                "--tls-key-file".into(),
                file("tls-server.key"),
                "--tls-ca-cert-file".into(),
                file("tls-ca.pem"),
                "--tls-auth-clients".into(),
                "no".into(),
                "--tls-replication".into(),
                "yes".into(),
            ]
        } else {
            vec!["--port".into(), port]
        };
        let mut node: Vec<String> = Vec::new();
        if let Some(p) = &self.options.password {
            node.extend([
                "--requirepass".into(),
                p.clone(),
                "--masterauth".into(),
                p.clone(),
            ]);
        }
        if let Some(port) = self.options.replica_of {
            node.extend(["--replicaof".into(), "127.0.0.1".into(), port.to_string()]);
        }
        let child = Command::new("redis-server")
            .args(&listen)
            .args(&node)
            .args(["--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(self.dir.path())
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
                "--daemonize",
                "no",
                // A replica's first sync starts at once (the default waits
                // 5 s for more replicas to share a diskless transfer).
                "--repl-diskless-sync-delay",
                "0",
            ])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .expect("redis-server is installed (./scripts/test installs it)");
        self.child = Some(child);
        match self.wait_ready() {
            Ok(()) => Ok(()),
            Err(why) => {
                self.kill9();
                Err(format!(
                    "redis-server on port {} {why}; its log:\n{}",
                    self.port,
                    self.read_log()
                ))
            }
        }
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!("exited ({status}) before answering PING"));
            }
            // Connecting is not enough: while it loads the AOF Redis
            // accepts but answers -LOADING.
            let answers = match &self.tls_ca {
                None => pong_auth(addr, self.options.password.as_deref()),
                Some(ca) => tls_pong(&self.url(), ca),
            };
            if answers {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("did not answer PING within {READY_WITHIN:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn read_log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(self.log_path()) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The `i`th port to try, spread from `seed` over 20000..32000: below the
/// ephemeral range (32768+), so that while the server is down for a restart
/// no outgoing connection is given its port.
pub(crate) fn port_to_try(seed: u32, i: u32) -> u16 {
    20_000 + (seed.wrapping_add(i.wrapping_mul(7919)) % 12_000) as u16
}

/// PING (after AUTH with `password`, when given) answered with PONG.
pub(crate) fn pong_auth(addr: SocketAddr, password: Option<&str>) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = [0u8; 64];
    if let Some(p) = password {
        let auth = format!("*2\r\n$4\r\nAUTH\r\n${}\r\n{p}\r\n", p.len());
        if s.write_all(auth.as_bytes()).is_err() {
            return false;
        }
        if !matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+OK")) {
            return false;
        }
    }
    if s.write_all(b"*1\r\n$4\r\nPING\r\n").is_err() {
        return false;
    }
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}

/// PING over TLS, trusting `ca_pem`, through tidemark's own Redis client.
fn tls_pong(url: &str, ca_pem: &str) -> bool {
    let Ok(client) = tidemark_state::redis_client(url, Some(ca_pem)) else {
        return false;
    };
    let Ok(mut con) = client.get_connection_with_timeout(Duration::from_millis(500)) else {
        return false;
    };
    let _ = con.set_read_timeout(Some(Duration::from_secs(1)));
    redis::cmd("PING")
        .query::<String>(&mut con)
        .is_ok_and(|p| p == "PONG")
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::Commands;

    #[test]
    fn data_survives_kill9_and_restart() -> redis::RedisResult<()> {
        let mut server = RedisServer::start_aof();
        let mut con = redis::Client::open(server.url())?.get_connection()?;
        let () = con.set("tidemark:test:key", "survives")?;
        drop(con);
        // appendfsync everysec: give the AOF its fsync before the kill.
        std::thread::sleep(Duration::from_millis(1200));
        server.kill9();
        assert!(!pong_auth(
            SocketAddr::from(([127, 0, 0, 1], server.port())),
            None
        ));
        server.restart();
        let mut con = redis::Client::open(server.url())?.get_connection()?;
        let got: Option<String> = con.get("tidemark:test:key")?;
        assert_eq!(got.as_deref(), Some("survives"));

        server.stop();
        assert!(server.child.is_none());
        server.restart();
        let mut con = redis::Client::open(server.url())?.get_connection()?;
        let got: Option<String> = con.get("tidemark:test:key")?;
        assert_eq!(got.as_deref(), Some("survives"));
        Ok(())
    }
}
