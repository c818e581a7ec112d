//! A private Redis Sentinel deployment on loopback, for the suites that
//! kill a Redis master and watch the sentinels promote a replica: a master,
//! its replicas ([`RedisServer`]s, each with its own port and temp dir) and
//! sentinels (`redis-server FILE.conf --sentinel`, likewise). It never
//! touches another Redis (the shared one on 6379 included).
//!
//! [`SentinelSet::start`] returns once every replica is in sync and every
//! sentinel sees the master, every replica and every other sentinel (so a
//! failover can be authorised). [`SentinelSet::url`] is the
//! `redis+sentinel://` URL tidemark takes. Dropping the set SIGKILLs every
//! process and removes their directories.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::redis_server::{NodeOptions, RedisServer, TlsFiles, port_to_try};

const READY_WITHIN: Duration = Duration::from_secs(15);
/// Sentinels find each other through hello messages every 2 s.
const QUORUM_WITHIN: Duration = Duration::from_secs(20);

/// What to start.
#[derive(Debug, Clone)]
pub struct SentinelSetup {
    pub master_name: String,
    pub replicas: usize,
    pub sentinels: usize,
    /// Sentinels that must agree the master is down.
    pub quorum: usize,
    /// The data nodes' password (`requirepass`, `masterauth`, the sentinels'
    /// `auth-pass`). Letters and digits only: it goes into URLs as it is.
    pub password: Option<String>,
    /// The sentinels' own password (`requirepass`, `sentinel sentinel-pass`).
    pub sentinel_password: Option<String>,
    /// `sentinel down-after-milliseconds`.
    pub down_after: Duration,
    /// `sentinel failover-timeout`.
    pub failover_timeout: Duration,
    /// Every node and sentinel speaks only TLS with these files (replication
    /// and the sentinels' own connections too); the URL is `rediss+sentinel`.
    pub tls: Option<TlsFiles>,
}

impl Default for SentinelSetup {
    /// One replica, three sentinels with a quorum of two, no passwords, a
    /// master declared down after 1 s.
    fn default() -> Self {
        SentinelSetup {
            master_name: "tidemark".into(),
            replicas: 1,
            sentinels: 3,
            quorum: 2,
            password: None,
            sentinel_password: None,
            down_after: Duration::from_millis(1000),
            failover_timeout: Duration::from_millis(5000),
            tls: None,
        }
    }
}

/// A sentinel process.
struct SentinelProcess {
    port: u16,
    dir: TempDir,
    child: Option<Child>,
}

impl SentinelProcess {
    fn log_path(&self) -> PathBuf {
        self.dir.path().join("sentinel.log")
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for SentinelProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A master, its replicas and its sentinels; see the module's comment.
pub struct SentinelSet {
    setup: SentinelSetup,
    nodes: Vec<RedisServer>,
    sentinels: Vec<SentinelProcess>,
    /// The CA's PEM with TLS.
    tls_ca: Option<String>,
    /// A client per port, made once (a TLS client reads its roots).
    clients: std::sync::Mutex<HashMap<u16, redis::Client>>,
}

impl SentinelSet {
    /// Start the set and wait until it can fail over (see the module's
    /// comment). Panics, with the logs, when it cannot.
    pub fn start(setup: SentinelSetup) -> SentinelSet {
        for p in [&setup.password, &setup.sentinel_password]
            .into_iter()
            .flatten()
        {
            assert!(
                p.chars().all(|c| c.is_ascii_alphanumeric()),
                "test passwords are letters and digits"
            );
        }
        let options = NodeOptions {
            password: setup.password.clone(),
            replica_of: None,
            tls: setup.tls.clone(),
        };
        let master = RedisServer::start_with(options.clone());
        let master_port = master.port();
        let mut nodes = vec![master];
        for _ in 0..setup.replicas {
            nodes.push(RedisServer::start_with(NodeOptions {
                replica_of: Some(master_port),
                ..options.clone()
            }));
        }
        let tls_ca = set_tls_ca(&nodes);
        let mut set = SentinelSet {
            setup,
            nodes,
            sentinels: Vec::new(),
            tls_ca,
            clients: std::sync::Mutex::new(HashMap::new()),
        };
        for replica in &set.nodes[1..] {
            let port = replica.port();
            let synced = wait_until(READY_WITHIN, || {
                set.info_replication(port)
                    .is_some_and(|i| i.get("master_link_status").map(String::as_str) == Some("up"))
            });
            assert!(synced, "replica {port} did not sync with {master_port}");
        }
        // In sync as the master sees it too: a write WAIT says every
        // replica acknowledged (a replica that just synced may not yet).
        let acked = wait_until(READY_WITHIN, || set.all_acknowledge(master_port));
        assert!(
            acked,
            "the replicas of {master_port} did not acknowledge a write"
        );
        for _ in 0..set.setup.sentinels {
            let s = set.spawn_sentinel(master_port);
            set.sentinels.push(s);
        }
        let ready = wait_until(QUORUM_WITHIN, || set.sentinels_agree());
        assert!(
            ready,
            "the sentinels did not see each other and every replica within {QUORUM_WITHIN:?}; \
             their logs:\n{}",
            set.sentinel_logs()
        );
        set
    }

    /// `redis+sentinel://[:PASSWORD@]127.0.0.1:P1,.../NAME[?sentinel_password=P]`
    /// (`rediss+sentinel://` with TLS).
    pub fn url(&self) -> String {
        let auth = match &self.setup.password {
            Some(p) => format!(":{p}@"),
            None => String::new(),
        };
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        let query = match &self.setup.sentinel_password {
            Some(p) => format!("?sentinel_password={p}"),
            None => String::new(),
        };
        let scheme = if self.tls_ca.is_some() {
            "rediss+sentinel"
        } else {
            "redis+sentinel"
        };
        format!(
            "{scheme}://{auth}{}/{}{query}",
            hosts.join(","),
            self.setup.master_name
        )
    }

    pub fn master_name(&self) -> &str {
        &self.setup.master_name
    }

    /// The data nodes' ports, the first master first.
    pub fn node_ports(&self) -> Vec<u16> {
        self.nodes.iter().map(RedisServer::port).collect()
    }

    pub fn sentinel_ports(&self) -> Vec<u16> {
        self.sentinels.iter().map(|s| s.port).collect()
    }

    /// The data node on `port`.
    pub fn node(&self, port: u16) -> Option<&RedisServer> {
        self.nodes.iter().find(|n| n.port() == port)
    }

    pub fn node_mut(&mut self, port: u16) -> Option<&mut RedisServer> {
        self.nodes.iter_mut().find(|n| n.port() == port)
    }

    /// The master's port as the first sentinel that answers names it.
    pub fn master_port(&self) -> Option<u16> {
        self.sentinels
            .iter()
            .find_map(|s| self.named_master(s.port))
    }

    /// What the node on `port` says it is (`master`, `slave`), if it answers.
    pub fn role(&self, port: u16) -> Option<String> {
        let role: Vec<redis::Value> = self.query(port, &redis::cmd("ROLE")).ok()?;
        role.first()
            .and_then(|v| redis::from_redis_value::<String>(v).ok())
    }

    /// SIGKILL the node the sentinels name as master; its port.
    pub fn kill_master(&mut self) -> u16 {
        let port = self.master_port().expect("a sentinel names the master");
        self.node_mut(port)
            .expect("the master is one of the set's nodes")
            .kill9();
        port
    }

    /// Wait until a majority of the sentinels name a master other than
    /// `old` and that node says it is the master; its port.
    pub fn wait_for_promotion(&self, old: u16, within: Duration) -> Option<u16> {
        let mut found = None;
        let majority = self.sentinels.len() / 2 + 1;
        let promoted = wait_until(within, || {
            let named: Vec<u16> = self
                .sentinels
                .iter()
                .filter_map(|s| self.named_master(s.port))
                .filter(|p| *p != old)
                .collect();
            let Some(&new) = named.first() else {
                return false;
            };
            if named.iter().filter(|p| **p == new).count() < majority {
                return false;
            }
            if self.role(new).as_deref() == Some("master") {
                found = Some(new);
                return true;
            }
            false
        });
        if !promoted {
            return None;
        }
        found
    }

    /// The sentinels' logs, for a failure report.
    pub fn sentinel_logs(&self) -> String {
        let mut out = String::new();
        for s in &self.sentinels {
            let mut text = String::new();
            if let Ok(mut f) = File::open(s.log_path()) {
                let _ = f.read_to_string(&mut text);
            }
            out.push_str(&format!("--- sentinel {}\n{text}\n", s.port));
        }
        out
    }

    fn named_master(&self, sentinel: u16) -> Option<u16> {
        let addr: Option<(String, u16)> = self
            .query(
                sentinel,
                redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(&self.setup.master_name),
            )
            .ok()?;
        addr.map(|(_, p)| p)
    }

    fn info_replication(&self, port: u16) -> Option<HashMap<String, String>> {
        let text: String = self
            .query(port, redis::cmd("INFO").arg("replication"))
            .ok()?;
        Some(
            text.lines()
                .filter_map(|l| l.trim().split_once(':'))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    /// A write on `master` that every replica acknowledges within 100 ms.
    fn all_acknowledge(&self, master: u16) -> bool {
        let acked: redis::RedisResult<((), usize)> = self.query(
            master,
            redis::pipe()
                .cmd("SET")
                .arg("tidemark-harness:sync-probe")
                .arg(1)
                .cmd("WAIT")
                .arg(self.setup.replicas)
                .arg(100),
        );
        acked.is_ok_and(|(_, n)| n >= self.setup.replicas)
    }

    /// Every sentinel sees every replica and every other sentinel, and
    /// the quorum can authorise a failover.
    fn sentinels_agree(&self) -> bool {
        let name = &self.setup.master_name;
        self.sentinels.iter().all(|s| {
            let quorum: Option<String> = self
                .query(s.port, redis::cmd("SENTINEL").arg("ckquorum").arg(name))
                .ok();
            let replicas: Vec<HashMap<String, String>> = self
                .query(s.port, redis::cmd("SENTINEL").arg("replicas").arg(name))
                .unwrap_or_default();
            let others: Vec<HashMap<String, String>> = self
                .query(s.port, redis::cmd("SENTINEL").arg("sentinels").arg(name))
                .unwrap_or_default();
            quorum.is_some_and(|q| q.starts_with("OK"))
                && replicas
                    .iter()
                    .filter(|r| {
                        r.get("flags").is_some_and(|f| {
                            f.contains("slave")
                                && !f.contains("down")
                                && !f.contains("disconnected")
                        })
                    })
                    .count()
                    == self.setup.replicas
                && others.len() + 1 == self.sentinels.len()
        })
    }

    fn spawn_sentinel(&self, master_port: u16) -> SentinelProcess {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let mut failure = String::new();
        for i in 0..20 {
            let mut s = SentinelProcess {
                port: port_to_try(seed, i),
                dir: tempfile::tempdir().expect("a temp dir for a sentinel"),
                child: None,
            };
            match self.try_sentinel(&mut s, master_port) {
                Ok(()) => return s,
                Err(e) if e.contains("Address already in use") => failure = e,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("no free port for a sentinel after 20 tries: {failure}");
    }

    fn try_sentinel(&self, s: &mut SentinelProcess, master_port: u16) -> Result<(), String> {
        let st = &self.setup;
        let name = &st.master_name;
        let listen = match &st.tls {
            None => format!("port {}\n", s.port),
            Some(tls) => {
                let mut files = Vec::new();
                for (from, to) in [
                    (&tls.ca, "tls-ca.pem"),
                    (&tls.cert, "tls-server.pem"),
                    (&tls.key, "tls-server.key"),
                ] {
                    let path = s.dir.path().join(to);
                    std::fs::copy(from, &path).expect("copy a TLS file");
                    files.push(path.display().to_string());
                }
                format!(
                    "port 0\ntls-port {}\ntls-ca-cert-file {}\ntls-cert-file {}\n\
                     tls-key-file {}\ntls-auth-clients no\ntls-replication yes\n",
                    s.port, files[0], files[1], files[2]
                )
            }
        };
        let mut conf = format!(
            "{listen}bind 127.0.0.1\nprotected-mode no\ndaemonize no\ndir {dir}\n\
             sentinel monitor {name} 127.0.0.1 {master_port} {quorum}\n\
             sentinel down-after-milliseconds {name} {down}\n\
             sentinel failover-timeout {name} {failover}\n",
            dir = s.dir.path().display(),
            quorum = st.quorum,
            down = st.down_after.as_millis(),
            failover = st.failover_timeout.as_millis(),
        );
        if let Some(p) = &st.password {
            conf.push_str(&format!("sentinel auth-pass {name} {p}\n"));
        }
        if let Some(p) = &st.sentinel_password {
            conf.push_str(&format!("requirepass {p}\nsentinel sentinel-pass {p}\n"));
        }
        let conf_path = s.dir.path().join("sentinel.conf");
        std::fs::write(&conf_path, conf).expect("write sentinel.conf");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(s.log_path())
            .expect("sentinel.log in the temp dir");
        let log_err = log.try_clone().expect("a second handle on sentinel.log");
        let child = Command::new("redis-server")
            .arg(&conf_path)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .expect("redis-server is installed (./scripts/test installs it)");
        s.child = Some(child);
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Some(child) = s.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                s.child = None;
                let mut text = String::new();
                if let Ok(mut f) = File::open(s.log_path()) {
                    let _ = f.read_to_string(&mut text);
                }
                return Err(format!(
                    "sentinel on port {} exited ({status}); its log:\n{text}",
                    s.port
                ));
            }
            if self
                .query_as::<String>(s.port, true, &redis::cmd("PING"))
                .is_ok_and(|p| p == "PONG")
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                s.kill9();
                return Err(format!(
                    "sentinel on port {} did not answer PING within {READY_WITHIN:?}",
                    s.port
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Poll `check` every 50 ms until it holds (true) or `within` passes (false).
fn wait_until(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A command or a pipeline.
trait Query {
    fn run<T: redis::FromRedisValue>(&self, con: &mut redis::Connection) -> redis::RedisResult<T>;
}

impl Query for redis::Cmd {
    fn run<T: redis::FromRedisValue>(&self, con: &mut redis::Connection) -> redis::RedisResult<T> {
        self.query(con)
    }
}

impl Query for redis::Pipeline {
    fn run<T: redis::FromRedisValue>(&self, con: &mut redis::Connection) -> redis::RedisResult<T> {
        self.query(con)
    }
}

/// The CA of a TLS set (its nodes all have the same).
fn set_tls_ca(nodes: &[RedisServer]) -> Option<String> {
    nodes
        .first()
        .and_then(RedisServer::tls_ca_pem)
        .map(str::to_string)
}

impl SentinelSet {
    /// One command (or pipeline) to the set's process on `port`, with the
    /// password of a sentinel or of a data node, on a connection of its own.
    fn query<T: redis::FromRedisValue>(
        &self,
        port: u16,
        cmd: &impl Query,
    ) -> redis::RedisResult<T> {
        let sentinel = self.sentinels.iter().any(|s| s.port == port);
        self.query_as(port, sentinel, cmd)
    }

    fn query_as<T: redis::FromRedisValue>(
        &self,
        port: u16,
        sentinel: bool,
        cmd: &impl Query,
    ) -> redis::RedisResult<T> {
        let client = self.client(port, sentinel)?;
        let mut con = client.get_connection_with_timeout(Duration::from_millis(500))?;
        con.set_read_timeout(Some(Duration::from_secs(2)))?;
        cmd.run(&mut con)
    }

    fn client(&self, port: u16, sentinel: bool) -> redis::RedisResult<redis::Client> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&port) {
            return Ok(c.clone());
        }
        let password = if sentinel {
            &self.setup.sentinel_password
        } else {
            &self.setup.password
        };
        let client = match &self.tls_ca {
            None => redis::Client::open(redis::ConnectionInfo {
                addr: redis::ConnectionAddr::Tcp("127.0.0.1".into(), port),
                redis: redis::RedisConnectionInfo {
                    password: password.clone(),
                    ..Default::default()
                },
            })?,
            // tidemark's own client: the CA trusted, the crypto provider set.
            Some(ca) => {
                let auth = password
                    .as_ref()
                    .map(|p| format!(":{p}@"))
                    .unwrap_or_default();
                tidemark_state::redis_client(&format!("rediss://{auth}127.0.0.1:{port}"), Some(ca))
                    .map_err(|e| {
                        redis::RedisError::from((
                            redis::ErrorKind::InvalidClientConfig,
                            "a TLS client",
                            e.to_string(),
                        ))
                    })?
            }
        };
        clients.insert(port, client.clone());
        Ok(client)
    }
}
