//! A private RabbitMQ cluster on loopback, for the suites that kill broker
//! nodes (which the shared broker on 5672, or a container other tests use,
//! cannot allow).
//!
//! Every node is the RabbitMQ package's own `rabbitmq-server` script (from
//! its library `sbin` directory, not the wrapper on `PATH`, which switches
//! to the `rabbitmq` user and its cookie), started `-detached` as root with
//! everything of its own under one temp dir:
//!
//! - a unique node name `tidemark-<random>-<i>@localhost` (`i` from 0, as
//!   in every method here), its own AMQP and distribution ports (free ones,
//!   picked in 20000..32000 like [`crate::redis_server`]'s), data, log, pid,
//!   config and enabled-plugins files (no plugins: a faster boot);
//! - a `HOME` holding the cluster's own `.erlang.cookie` (mode 0400), which
//!   `rabbitmqctl` is run under too;
//! - its own `rabbitmq-env.conf`, so that `/etc/rabbitmq` (the shared
//!   broker's configuration) is never read.
//!
//! The nodes share the machine's Erlang port mapper (epmd, port 4369), as
//! every Erlang node does: the shared broker's when it runs; otherwise the
//! first node starts one (on 127.0.0.1), which outlives the cluster, as
//! epmd always does. Nothing here ever stops epmd or signals a process that
//! is not one of the cluster's own `beam.smp`s (found by the node name in
//! its environment).
//!
//! Alarms are kept from firing on a small test machine
//! (`disk_free_limit.absolute = 50MB`, `vm_memory_high_watermark.relative =
//! 0.8`); `guest`/`guest` works over loopback, as by default.
//!
//! [`RabbitCluster::start`] boots the nodes in parallel, joins nodes 1.. to
//! node 0 and checks that every node sees all of them running.
//! [`RabbitCluster::kill`] SIGKILLs a node's `beam.smp`,
//! [`RabbitCluster::restart`] boots it again with the same name and data
//! (it rejoins the cluster by itself), [`RabbitCluster::stop`] stops them
//! all. Dropping the cluster SIGKILLs whatever still runs and removes the
//! temp dir (when the thread is panicking, it first prints the tail of each
//! node's log).
//!
//! It needs root and Debian's `rabbitmq-server` package;
//! [`RabbitCluster::unavailable`] says why it cannot run, and
//! [`RabbitCluster::start`] then fails with an error [`skip_reason`]
//! recognises, so a test can skip with that reason. Setting
//! `TIDEMARK_SKIP_RABBIT_CLUSTER` to a reason makes it unavailable too, and
//! `TIDEMARK_RABBITMQ_SBIN` points at another `sbin` directory.
//!
//! A node boots in seconds on an idle machine and can take two minutes on
//! two busy cores; the waits here allow [`BOOT_WITHIN`].
//!
//! Which node a client is on: [`RabbitCluster::node_of_connection`] (by
//! the `connection_name` client property), [`RabbitCluster::connections_on`]
//! or [`RabbitCluster::node_of_client_port`] (`rabbitmqctl
//! list_connections`). [`RabbitCluster::quorum_members`] shows a quorum
//! queue's leader and followers.
//!
//! Seen on RabbitMQ 3.10.8 (this crate's `tests/rabbit_cluster.rs` shows
//! it): after the node of a quorum queue's leader is SIGKILLed, a new
//! leader is elected in well under a second, but a confirm-mode channel
//! whose *first* publish to that queue falls in the election is nacked,
//! and keeps being nacked on that queue while it stays open. A publisher
//! must answer a nack with a new channel, not only a new publish.
//!
//! Not handled: restarting a cluster whose nodes are all down. RabbitMQ
//! then wants the node that stopped last to boot first, and a restarted
//! node waits for its peers; [`RabbitCluster::restart`] restarts one node
//! at a time, so it serves while a majority of the cluster runs.

use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::process::Command;

use crate::HarnessError;

/// The longest a node may take to boot (and the cluster to form).
pub const BOOT_WITHIN: Duration = Duration::from_secs(300);
/// The longest one `rabbitmqctl` command may take (other than the waits).
const CTL_WITHIN: Duration = Duration::from_secs(120);
/// The longest a graceful stop may take before the node is SIGKILLed.
const STOP_WITHIN: Duration = Duration::from_secs(60);
/// How long a node's `beam.smp` may take to show up after the start script
/// returned before the node counts as failed.
const APPEAR_WITHIN: Duration = Duration::from_secs(20);

/// Set to a reason: [`RabbitCluster::unavailable`] returns it.
pub const SKIP_VAR: &str = "TIDEMARK_SKIP_RABBIT_CLUSTER";
/// Set to a directory holding `rabbitmq-server` and `rabbitmqctl`: used
/// instead of the one `dpkg -L rabbitmq-server` lists.
pub const SBIN_VAR: &str = "TIDEMARK_RABBITMQ_SBIN";

/// What names the cluster in [`HarnessError`]s; also how [`skip_reason`]
/// recognises "cannot run here".
const WHAT: &str = "a private RabbitMQ cluster";

/// The reason in `err`, when `err` is [`RabbitCluster::start`] saying the
/// cluster cannot run on this machine (not root, no `rabbitmq-server`
/// package, or [`SKIP_VAR`] set): a test turns that into a skip.
pub fn skip_reason(err: &HarnessError) -> Option<String> {
    match err {
        HarnessError::Spawn { name, source }
            if name == WHAT && source.kind() == io::ErrorKind::Unsupported =>
        {
            Some(source.to_string())
        }
        _ => None,
    }
}

/// One client connection, as `rabbitmqctl list_connections` reports it.
#[derive(Debug, Clone)]
pub struct NodeConnection {
    /// Index of the node the client is connected to.
    pub node: usize,
    /// The broker's name for it: `127.0.0.1:<client port> -> 127.0.0.1:<amqp port>`.
    pub name: String,
    /// The client's port: its socket's local port.
    pub peer_port: u16,
    pub user: String,
    /// The `connection_name` client property (lapin:
    /// `ConnectionProperties::with_connection_name`), if the client set one.
    pub connection_name: Option<String>,
    /// Every client property, as `rabbitmqctl`'s JSON has them.
    pub client_properties: serde_json::Value,
}

/// One member of a quorum queue, as `rabbitmq-queues quorum_status` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuorumMember {
    /// Index of the member's node.
    pub node: usize,
    /// `leader`, `follower`, `candidate`, `noproc` (its node is down), ...
    pub raft_state: String,
}

struct Node {
    name: String,
    amqp_port: u16,
    dist_port: u16,
    dir: PathBuf,
}

impl Node {
    fn pid_file(&self) -> PathBuf {
        self.dir.join("rabbitmq.pid")
    }
    fn log_file(&self) -> PathBuf {
        self.dir.join("log").join(format!("{}.log", self.name))
    }
    fn start_log(&self) -> PathBuf {
        self.dir.join("start.log")
    }
    fn crash_dump(&self) -> PathBuf {
        self.dir.join("erl_crash.dump")
    }
    fn short_name(&self) -> &str {
        self.name.split('@').next().unwrap_or(&self.name)
    }
}

/// A private cluster of RabbitMQ nodes on 127.0.0.1; see the module docs.
pub struct RabbitCluster {
    dir: TempDir,
    sbin: PathBuf,
    nodes: Vec<Node>,
    boot_time: Duration,
}

impl RabbitCluster {
    /// Why no private cluster can run here (not root, no `rabbitmq-server`
    /// package, [`SKIP_VAR`] set), or None when it can.
    pub fn unavailable() -> Option<String> {
        probe().err()
    }

    /// Boots `n` nodes in parallel, waits until each has started
    /// (`rabbitmqctl await_startup`), joins nodes 1.. to node 0 (`stop_app`,
    /// `join_cluster`, `start_app`) and waits until every node lists all `n`
    /// as running. [`RabbitCluster::boot_time`] is how long that took.
    ///
    /// When the cluster cannot run here, fails with an error
    /// [`skip_reason`] recognises. Any other failure carries the logs of
    /// the node at fault; nodes already started are SIGKILLed.
    pub async fn start(n: usize) -> Result<RabbitCluster, HarnessError> {
        let sbin = probe().map_err(|why| HarnessError::Spawn {
            name: WHAT.into(),
            source: io::Error::new(io::ErrorKind::Unsupported, why),
        })?;
        if n == 0 {
            return Err(not_ready(WHAT, "a cluster needs at least one node".into()));
        }
        let t0 = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("tidemark-rabbit-")
            .tempdir()
            .map_err(|source| HarnessError::Io {
                what: "create a temp dir in",
                path: std::env::temp_dir(),
                source,
            })?;
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let suffix = &suffix[..10];
        let mut cluster = RabbitCluster {
            sbin,
            nodes: Vec::with_capacity(n),
            dir,
            boot_time: Duration::ZERO,
        };
        cluster.write_shared_files()?;
        let mut taken = BTreeSet::new();
        for i in 0..n {
            let (amqp_port, dist_port) = free_port_pair(&mut taken);
            let node = Node {
                name: format!("tidemark-{suffix}-{i}@localhost"),
                amqp_port,
                dist_port,
                dir: cluster.dir.path().join(format!("node-{i}")),
            };
            for d in [
                node.dir.clone(),
                node.dir.join("mnesia"),
                node.dir.join("log"),
            ] {
                fs::create_dir_all(&d).map_err(|source| HarnessError::Io {
                    what: "create",
                    path: d.clone(),
                    source,
                })?;
            }
            cluster.nodes.push(node);
            cluster.write_node_config(i)?;
        }

        // Boot every node at once. A node that lost its port to another
        // process between the pick and the boot gets new ports and another go.
        let mut pending: Vec<usize> = (0..n).collect();
        for round in 0..3 {
            let results = futures::future::join_all(pending.iter().map(|&i| cluster.boot(i))).await;
            let mut retry = Vec::new();
            let mut first_error = None;
            for (&i, result) in pending.iter().zip(results) {
                let Err(e) = result else { continue };
                if round < 2 && cluster.lost_port(i) {
                    retry.push(i);
                } else if first_error.is_none() {
                    first_error = Some(e);
                }
            }
            if let Some(e) = first_error {
                return Err(e);
            }
            for &i in &retry {
                kill_node_now(&cluster.nodes[i]);
                let (amqp_port, dist_port) = free_port_pair(&mut taken);
                cluster.nodes[i].amqp_port = amqp_port;
                cluster.nodes[i].dist_port = dist_port;
                cluster.write_node_config(i)?;
                tracing::warn!(node = %cluster.nodes[i].name, "port taken; booting again on others");
            }
            pending = retry;
            if pending.is_empty() {
                break;
            }
        }

        let booted = t0.elapsed();
        let seed = cluster.nodes[0].name.clone();
        for i in 1..n {
            cluster.ctl(i, &["stop_app"]).await?;
            cluster.ctl(i, &["join_cluster", &seed]).await?;
            cluster.ctl(i, &["start_app"]).await?;
        }
        let all: Vec<usize> = (0..n).collect();
        cluster.wait_running(&all, BOOT_WITHIN).await?;
        cluster.boot_time = t0.elapsed();
        tracing::info!(
            nodes = n,
            ?booted,
            boot_time = ?cluster.boot_time,
            "private RabbitMQ cluster up (nodes booted, then joined)"
        );
        Ok(cluster)
    }

    /// How long [`RabbitCluster::start`] took, from nothing to a formed cluster.
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// The number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Every node's Erlang name, `tidemark-<random>-<i>@localhost`, by index.
    pub fn node_names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }

    pub fn node_name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// The index of the node named `name`.
    pub fn node_index(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    pub fn amqp_port(&self, i: usize) -> u16 {
        self.nodes[i].amqp_port
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f` of node `i`.
    pub fn amqp_url(&self, i: usize) -> String {
        format!(
            "amqp://guest:guest@127.0.0.1:{}/%2f",
            self.nodes[i].amqp_port
        )
    }

    /// Every node's [`RabbitCluster::amqp_url`], by index.
    pub fn amqp_urls(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.amqp_url(i)).collect()
    }

    /// The URLs of [`RabbitCluster::amqp_urls`], comma-separated.
    pub fn amqp_url_list(&self) -> String {
        self.amqp_urls().join(",")
    }

    /// The cluster's temp dir: `node-<i>/` holds each node's data
    /// (`mnesia/`), `log/` and `start.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Node `i`'s main log file.
    pub fn log_path(&self, i: usize) -> PathBuf {
        self.nodes[i].log_file()
    }

    /// The OS pid of node `i`'s `beam.smp`, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        beam_pid(&self.nodes[i])
    }

    /// Whether node `i`'s `beam.smp` runs (it may still be booting).
    pub fn is_running(&self, i: usize) -> bool {
        self.pid(i).is_some()
    }

    /// SIGKILLs node `i`'s `beam.smp` (no shutdown, no goodbye to its
    /// peers: they see its connections drop) and waits until the process
    /// is gone and no longer registered with epmd. Fails when the node is
    /// not running.
    pub async fn kill(&mut self, i: usize) -> Result<(), HarnessError> {
        let node = &self.nodes[i];
        let Some(pid) = beam_pid(node) else {
            return Err(HarnessError::Io {
                what: "no running beam.smp for the node in",
                path: node.dir.clone(),
                source: io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{} is not running", node.name),
                ),
            });
        };
        signal(pid, "KILL");
        let deadline = Instant::now() + Duration::from_secs(10);
        while process_alive(pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if process_alive(pid) {
            return Err(not_ready(
                &format!("SIGKILL of {} (pid {pid})", node.name),
                "the process is still there after 10 s".into(),
            ));
        }
        self.wait_unregistered(i, Duration::from_secs(10)).await;
        Ok(())
    }

    /// Stops node `i` gracefully (`rabbitmqctl stop`) and waits until its
    /// process is gone; SIGKILLs it if that takes more than a minute. A node
    /// not running is left as it is.
    pub async fn stop_node(&mut self, i: usize) -> Result<(), HarnessError> {
        self.stop_node_ref(i).await
    }

    async fn stop_node_ref(&self, i: usize) -> Result<(), HarnessError> {
        let node = &self.nodes[i];
        let Some(pid) = beam_pid(node) else {
            return Ok(());
        };
        let asked = self
            .tool_with("rabbitmqctl", i, &["stop"], STOP_WITHIN)
            .await;
        let deadline = Instant::now() + STOP_WITHIN;
        while process_alive(pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if process_alive(pid) {
            signal(pid, "KILL");
            let deadline = Instant::now() + Duration::from_secs(10);
            while process_alive(pid) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        self.wait_unregistered(i, Duration::from_secs(10)).await;
        asked.map(|_| ())
    }

    /// Starts node `i` again with the same name, ports and data (SIGKILLing
    /// it first if it runs), waits until it has booted and until every
    /// running node sees every running node, itself included: back in the
    /// cluster. Returns how long that took.
    pub async fn restart(&mut self, i: usize) -> Result<Duration, HarnessError> {
        let t0 = Instant::now();
        if self.is_running(i) {
            self.kill(i).await?;
        }
        self.boot(i).await?;
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&j| j == i || self.is_running(j))
            .collect();
        self.wait_running(&running, BOOT_WITHIN).await?;
        let took = t0.elapsed();
        tracing::info!(node = %self.nodes[i].name, ?took, "RabbitMQ node restarted");
        Ok(took)
    }

    /// Stops every node gracefully and in parallel
    /// ([`RabbitCluster::stop_node`]), then removes the temp dir. The first
    /// error, if any, after all were stopped.
    pub async fn stop(self) -> Result<(), HarnessError> {
        let results =
            futures::future::join_all((0..self.nodes.len()).map(|i| self.stop_node_ref(i))).await;
        // Drop SIGKILLs whatever is left and removes the dir.
        drop(self);
        results.into_iter().collect()
    }

    /// Runs `rabbitmqctl -n <node i> ARGS` and returns its stdout; fails
    /// with its output when it exits non-zero or takes over two minutes.
    pub async fn ctl(&self, i: usize, args: &[&str]) -> Result<String, HarnessError> {
        self.tool_with("rabbitmqctl", i, args, CTL_WITHIN).await
    }

    /// Runs `rabbitmq-queues -n <node i> ARGS`, like [`RabbitCluster::ctl`].
    pub async fn queues_ctl(&self, i: usize, args: &[&str]) -> Result<String, HarnessError> {
        self.tool_with("rabbitmq-queues", i, args, CTL_WITHIN).await
    }

    /// The nodes node `i` sees running (`cluster_status`), as indices.
    pub async fn running_nodes(&self, i: usize) -> Result<Vec<usize>, HarnessError> {
        let out = self
            .ctl(i, &["cluster_status", "--formatter", "json"])
            .await?;
        let status = self.parse_json(i, "cluster_status", &out)?;
        let mut running: Vec<usize> = status["running_nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n.as_str().and_then(|n| self.node_index(n)))
            .collect();
        running.sort_unstable();
        Ok(running)
    }

    /// Waits until each node of `expected` sees exactly `expected` running
    /// (as in [`RabbitCluster::running_nodes`]); returns how long it took.
    pub async fn wait_running(
        &self,
        expected: &[usize],
        within: Duration,
    ) -> Result<Duration, HarnessError> {
        let t0 = Instant::now();
        let mut want = expected.to_vec();
        want.sort_unstable();
        let mut last = String::new();
        loop {
            let mut all_agree = true;
            for &i in &want {
                match self.running_nodes(i).await {
                    Ok(seen) if seen == want => {}
                    Ok(seen) => {
                        last = format!("{} sees {seen:?} running", self.nodes[i].name);
                        all_agree = false;
                        break;
                    }
                    Err(e) => {
                        last = e.to_string();
                        all_agree = false;
                        break;
                    }
                }
            }
            if all_agree {
                return Ok(t0.elapsed());
            }
            if t0.elapsed() > within {
                return Err(not_ready(
                    &format!("a cluster of nodes {want:?} (within {within:?})"),
                    last,
                ));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The client connections on node `i`. Asks any running node (the
    /// list is cluster-wide, each entry names its node).
    pub async fn connections_on(&self, i: usize) -> Result<Vec<NodeConnection>, HarnessError> {
        let all = self.connections().await?;
        Ok(all.into_iter().filter(|c| c.node == i).collect())
    }

    /// Every client connection in the cluster, with the node it is on, as
    /// one running node (the first that answers) lists them.
    pub async fn connections(&self) -> Result<Vec<NodeConnection>, HarnessError> {
        let mut last = None;
        for i in (0..self.nodes.len()).filter(|&i| self.is_running(i)) {
            let listed = self
                .ctl(
                    i,
                    &[
                        "list_connections",
                        "name",
                        "port",
                        "peer_port",
                        "user",
                        "client_properties",
                        "--formatter",
                        "json",
                    ],
                )
                .await;
            match listed {
                Ok(out) => return self.parse_connections(i, &out),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| not_ready(WHAT, "no node is running".into())))
    }

    /// The node a client is connected to, found by the `connection_name`
    /// it gave (lapin: `ConnectionProperties::with_connection_name`).
    pub async fn node_of_connection(
        &self,
        connection_name: &str,
    ) -> Result<Option<usize>, HarnessError> {
        Ok(self
            .connections()
            .await?
            .into_iter()
            .find(|c| c.connection_name.as_deref() == Some(connection_name))
            .map(|c| c.node))
    }

    /// The node a client is connected to, found by its socket's local port.
    pub async fn node_of_client_port(&self, port: u16) -> Result<Option<usize>, HarnessError> {
        Ok(self
            .connections()
            .await?
            .into_iter()
            .find(|c| c.peer_port == port)
            .map(|c| c.node))
    }

    /// The members of quorum queue `queue` (in vhost `/`) and their Raft
    /// states, as node `i` sees them (`rabbitmq-queues quorum_status`).
    pub async fn quorum_members(
        &self,
        i: usize,
        queue: &str,
    ) -> Result<Vec<QuorumMember>, HarnessError> {
        let out = self
            .queues_ctl(i, &["quorum_status", queue, "--formatter", "json"])
            .await?;
        let rows = self.parse_json(i, "quorum_status", &out)?;
        let mut members = Vec::new();
        for row in rows.as_array().into_iter().flatten() {
            // A member on a node that is down has `["nodedown", node]`.
            let field = |k: &str| match row.get(k) {
                Some(serde_json::Value::String(v)) => v.clone(),
                Some(serde_json::Value::Array(v)) => v
                    .first()
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_string(),
                _ => String::new(),
            };
            if let Some(node) = self.node_index(&field("Node Name")) {
                members.push(QuorumMember {
                    node,
                    raft_state: field("Raft State"),
                });
            }
        }
        members.sort_by_key(|m| m.node);
        Ok(members)
    }

    // ------------------------------------------------------------------

    /// The cookie (and the `HOME` it is in) and the env file every node and
    /// every `rabbitmqctl` run share.
    fn write_shared_files(&self) -> Result<(), HarnessError> {
        let home = self.home();
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| HarnessError::Io {
                what: "write",
                path,
                source,
            }
        };
        fs::create_dir_all(&home).map_err(io_err(&home))?;
        let cookie_path = home.join(".erlang.cookie");
        let cookie = uuid::Uuid::new_v4().simple().to_string().to_uppercase();
        fs::write(&cookie_path, cookie).map_err(io_err(&cookie_path))?;
        fs::set_permissions(&cookie_path, fs::Permissions::from_mode(0o400))
            .map_err(io_err(&cookie_path))?;
        let env_file = self.env_file();
        fs::write(
            &env_file,
            "# tidemark's private RabbitMQ cluster: instead of /etc/rabbitmq/rabbitmq-env.conf\n\
             ERL_EPMD_ADDRESS=127.0.0.1\n",
        )
        .map_err(io_err(&env_file))?;
        Ok(())
    }

    fn write_node_config(&self, i: usize) -> Result<(), HarnessError> {
        let node = &self.nodes[i];
        let write = |name: &str, text: String| {
            let path = node.dir.join(name);
            fs::write(&path, text).map_err(|source| HarnessError::Io {
                what: "write",
                path,
                source,
            })
        };
        write(
            "rabbitmq.conf",
            format!(
                "listeners.tcp.default = 127.0.0.1:{}\n\
                 loopback_users.guest = true\n\
                 disk_free_limit.absolute = 50MB\n\
                 vm_memory_high_watermark.relative = 0.8\n\
                 log.console = false\n\
                 log.file.level = info\n",
                node.amqp_port
            ),
        )?;
        write("enabled_plugins", "[].\n".into())?;
        Ok(())
    }

    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    fn env_file(&self) -> PathBuf {
        self.dir.path().join("rabbitmq-env.conf")
    }

    /// The environment both the server and the CLI tools get: nothing of
    /// the caller's RABBITMQ_* or ERL_*, our HOME (the cookie), our env file.
    fn base_env(&self, cmd: &mut Command) {
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("RABBITMQ_") || k.starts_with("ERL_") {
                cmd.env_remove(&key);
            }
        }
        cmd.env("HOME", self.home())
            .env("RABBITMQ_CONF_ENV_FILE", self.env_file())
            .env("LC_ALL", "C.UTF-8");
    }

    /// Runs the `rabbitmq-server -detached` script for node `i` and waits
    /// until the node has booted.
    async fn boot(&self, i: usize) -> Result<(), HarnessError> {
        let node = &self.nodes[i];
        // What a previous run left must not pass for this one's.
        let _ = fs::remove_file(node.pid_file());
        if node.crash_dump().exists() {
            let _ = fs::rename(node.crash_dump(), node.dir.join("erl_crash.dump.old"));
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.start_log())
            .map_err(|source| HarnessError::Io {
                what: "open",
                path: node.start_log(),
                source,
            })?;
        let log_err = log.try_clone().map_err(|source| HarnessError::Io {
            what: "open",
            path: node.start_log(),
            source,
        })?;
        let d = |name: &str| node.dir.join(name);
        let mut cmd = Command::new(self.sbin.join("rabbitmq-server"));
        cmd.arg("-detached");
        self.base_env(&mut cmd);
        cmd.env("RABBITMQ_NODENAME", &node.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", node.amqp_port.to_string())
            .env("RABBITMQ_DIST_PORT", node.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d("mnesia"))
            .env("RABBITMQ_LOG_BASE", d("log"))
            .env("RABBITMQ_PID_FILE", node.pid_file())
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", d("rabbitmq.conf"))
            // Neither exists: nothing of /etc/rabbitmq is read.
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", d("advanced.config"))
            .env("RABBITMQ_CONFIG_FILES", d("conf.d"))
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .current_dir(&node.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(true);
        let what = format!("rabbitmq-server -detached ({})", node.name);
        // With -detached, the script returns once the VM has forked off.
        let status = tokio::time::timeout(Duration::from_secs(60), cmd.status())
            .await
            .map_err(|_| not_ready(&what, self.node_report(i)))?
            .map_err(|source| HarnessError::Spawn {
                name: what.clone(),
                source,
            })?;
        if !status.success() {
            return Err(HarnessError::Exited {
                name: what,
                status,
                log: self.node_report(i),
            });
        }
        self.await_boot(i, Instant::now()).await
    }

    /// Waits until node `i` (launched at `launched`) has registered with
    /// epmd (polled cheaply), then until `rabbitmqctl await_startup` says
    /// it has booted. Fails early when the node died.
    async fn await_boot(&self, i: usize, launched: Instant) -> Result<(), HarnessError> {
        let node = &self.nodes[i];
        let deadline = launched + BOOT_WITHIN;
        let failed = |why: String| {
            not_ready(
                &format!("RabbitMQ node {}", node.name),
                format!("{why}\n{}", self.node_report(i)),
            )
        };
        loop {
            if node.crash_dump().exists() {
                return Err(failed("it crashed (erl_crash.dump)".into()));
            }
            if launched.elapsed() > APPEAR_WITHIN && beam_pid(node).is_none() {
                return Err(failed("its beam.smp is gone".into()));
            }
            if epmd_names().is_some_and(|names| registered(&names, node.short_name())) {
                break;
            }
            if Instant::now() > deadline {
                return Err(failed(format!(
                    "not registered with epmd within {BOOT_WITHIN:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let secs = left.as_secs().max(1).to_string();
            let waited = self
                .tool_with(
                    "rabbitmqctl",
                    i,
                    &["await_startup", "--timeout", &secs],
                    left + Duration::from_secs(30),
                )
                .await;
            match waited {
                Ok(_) => return Ok(()),
                Err(e) => {
                    if beam_pid(node).is_none() {
                        return Err(failed(format!("its beam.smp is gone ({e})")));
                    }
                    if Instant::now() > deadline {
                        return Err(failed(format!("not started within {BOOT_WITHIN:?}: {e}")));
                    }
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Waits (at most `within`) until epmd no longer lists node `i`, so
    /// that it can be started again under the same name.
    async fn wait_unregistered(&self, i: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline
            && epmd_names().is_some_and(|n| registered(&n, self.nodes[i].short_name()))
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn tool_with(
        &self,
        tool: &str,
        i: usize,
        args: &[&str],
        within: Duration,
    ) -> Result<String, HarnessError> {
        let node = &self.nodes[i];
        let mut cmd = Command::new(self.sbin.join(tool));
        cmd.arg("-n").arg(&node.name).args(args);
        self.base_env(&mut cmd);
        // The CLI's own Erlang node listens on one port of this range; the
        // default (11 ports) is short when several tests run it at once.
        cmd.env("RABBITMQ_CTL_DIST_PORT_MIN", "35672")
            .env("RABBITMQ_CTL_DIST_PORT_MAX", "35872")
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let what = format!("{tool} -n {} {}", node.name, args.join(" "));
        let out = tokio::time::timeout(within, cmd.output())
            .await
            .map_err(|_| {
                not_ready(
                    &format!("{what} (no answer within {within:?})"),
                    String::new(),
                )
            })?
            .map_err(|source| HarnessError::Spawn {
                name: what.clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(HarnessError::Exited {
                name: what,
                status: out.status,
                log: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn parse_json(
        &self,
        i: usize,
        what: &str,
        out: &str,
    ) -> Result<serde_json::Value, HarnessError> {
        // Some versions print a line or two before the JSON.
        let start = out.find(['{', '[']).unwrap_or(0);
        serde_json::from_str(&out[start..]).map_err(|e| {
            not_ready(
                &format!("{what} of {}", self.nodes[i].name),
                format!("unreadable JSON ({e}):\n{out}"),
            )
        })
    }

    fn parse_connections(&self, i: usize, out: &str) -> Result<Vec<NodeConnection>, HarnessError> {
        let rows = self.parse_json(i, "list_connections", out)?;
        let mut conns = Vec::new();
        for row in rows.as_array().into_iter().flatten() {
            // Each node has its own AMQP port: the server end of the
            // connection names the node.
            let server_port = row["port"].as_u64().or_else(|| {
                let name = row["name"].as_str()?;
                name.rsplit(':').next()?.trim().parse().ok()
            });
            let Some(node) = self
                .nodes
                .iter()
                .position(|n| server_port == Some(u64::from(n.amqp_port)))
            else {
                continue;
            };
            let client_properties = row["client_properties"].clone();
            conns.push(NodeConnection {
                node,
                name: row["name"].as_str().unwrap_or_default().to_string(),
                peer_port: row["peer_port"]
                    .as_u64()
                    .and_then(|p| u16::try_from(p).ok())
                    .unwrap_or(0),
                user: row["user"].as_str().unwrap_or_default().to_string(),
                connection_name: client_property(&client_properties, "connection_name"),
                client_properties,
            });
        }
        Ok(conns)
    }

    /// Whether node `i` failed to boot because a port it was given is taken.
    fn lost_port(&self, i: usize) -> bool {
        let report = self.node_report(i);
        report.contains("eaddrinuse") || report.contains("already in use")
    }

    /// What explains a node's failure: the tail of its log, its start
    /// script's output and a crash dump's slogan.
    fn node_report(&self, i: usize) -> String {
        let node = &self.nodes[i];
        let mut report = format!(
            "node {} (AMQP port {}, dist port {}, dir {})\n",
            node.name,
            node.amqp_port,
            node.dist_port,
            node.dir.display()
        );
        let start = read_text(&node.start_log());
        if !start.trim().is_empty() {
            report.push_str(&format!("--- start.log:\n{}\n", tail(&start, 40)));
        }
        report.push_str(&format!(
            "--- {} (tail):\n{}\n",
            node.log_file().display(),
            tail(&read_text(&node.log_file()), 60)
        ));
        let dump = read_text(&node.crash_dump());
        if let Some(slogan) = dump.lines().find(|l| l.starts_with("Slogan:")) {
            report.push_str(&format!("--- erl_crash.dump: {slogan}\n"));
        }
        report
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for i in 0..self.nodes.len() {
                eprintln!("{}", self.node_report(i));
            }
        }
        let pids: Vec<u32> = self.nodes.iter().filter_map(kill_node_now).collect();
        // Let them go before their directory does.
        let deadline = Instant::now() + Duration::from_secs(10);
        while pids.iter().any(|&p| process_alive(p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// SIGKILLs the node's beam.smp if it runs; its pid if it did.
fn kill_node_now(node: &Node) -> Option<u32> {
    let pid = beam_pid(node)?;
    signal(pid, "KILL");
    Some(pid)
}

/// The `sbin` directory of the RabbitMQ package, when this machine can run
/// a private cluster; else why not.
fn probe() -> Result<PathBuf, String> {
    if let Ok(why) = std::env::var(SKIP_VAR)
        && !why.trim().is_empty()
    {
        return Err(format!("{SKIP_VAR} is set: {why}"));
    }
    let uid = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    if uid != "0" {
        return Err(format!(
            "not root (uid {uid:?}): a private RabbitMQ node runs the package's rabbitmq-server \
             script as root, with its own HOME and Erlang cookie"
        ));
    }
    let sbin = match std::env::var_os(SBIN_VAR) {
        Some(dir) => PathBuf::from(dir),
        None => package_sbin().ok_or_else(|| {
            "the rabbitmq-server package is not installed (`dpkg -L rabbitmq-server` lists no \
             rabbitmq_server-*/sbin/rabbitmq-server); `apt-get install rabbitmq-server` provides it"
                .to_string()
        })?,
    };
    for tool in ["rabbitmq-server", "rabbitmqctl", "rabbitmq-queues"] {
        if !sbin.join(tool).is_file() {
            return Err(format!("no {tool} in {}", sbin.display()));
        }
    }
    Ok(sbin)
}

/// `.../rabbitmq_server-<version>/sbin` from `dpkg -L rabbitmq-server`.
fn package_sbin() -> Option<PathBuf> {
    let out = std::process::Command::new("dpkg")
        .args(["-L", "rabbitmq-server"])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(Path::new)
        .find(|p| {
            p.ends_with("sbin/rabbitmq-server")
                && p.to_string_lossy().contains("/rabbitmq_server-")
                && p.is_file()
        })
        .and_then(|p| p.parent().map(Path::to_path_buf))
}

/// Two free loopback ports (AMQP, distribution) not in `taken`, picked at
/// random in 20000..32000: below the ephemeral range, so that no outgoing
/// connection takes them while a node is down for a restart.
fn free_port_pair(taken: &mut BTreeSet<u16>) -> (u16, u16) {
    let mut pick = || loop {
        let r = uuid::Uuid::new_v4().as_u128();
        let port = 20_000 + (r % 12_000) as u16;
        if !taken.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.insert(port);
            return port;
        }
    };
    (pick(), pick())
}

/// The text of epmd's NAMES reply (`name <n> at port <p>` lines), or None
/// when no epmd answers on 127.0.0.1:4369.
fn epmd_names() -> Option<String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], 4369));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    // NAMES_REQ: a 2-byte length, then 'n' (110).
    s.write_all(&[0, 1, 110]).ok()?;
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).ok()?;
    // A 4-byte epmd port, then the lines.
    reply
        .get(4..)
        .map(|text| String::from_utf8_lossy(text).into_owned())
}

fn registered(names: &str, short_name: &str) -> bool {
    names
        .lines()
        .any(|l| l.strip_prefix("name ").and_then(|r| r.split(' ').next()) == Some(short_name))
}

/// The pid of the node's `beam.smp`: the one in its pid file, else found
/// in /proc. Either way only a live `beam.smp` whose environment names this
/// node (so never the shared broker, nor a `rabbitmqctl`, which is run
/// without RABBITMQ_NODENAME).
fn beam_pid(node: &Node) -> Option<u32> {
    if let Some(pid) = read_text(&node.pid_file()).trim().parse::<u32>().ok()
        && is_beam_of(pid, &node.name)
    {
        return Some(pid);
    }
    fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|&pid| is_beam_of(pid, &node.name))
}

fn is_beam_of(pid: u32, node_name: &str) -> bool {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    if !read_text(&proc.join("comm")).starts_with("beam") || !process_alive(pid) {
        return false;
    }
    let want = format!("RABBITMQ_NODENAME={node_name}");
    fs::read(proc.join("environ"))
        .is_ok_and(|env| env.split(|&b| b == 0).any(|var| var == want.as_bytes()))
}

/// Whether `pid` exists and is not a zombie (a SIGKILLed node is
/// reparented, and its new parent may be slow to reap it).
fn process_alive(pid: u32) -> bool {
    let stat = read_text(Path::new(&format!("/proc/{pid}/stat")));
    // `pid (comm) S ...`: the state follows the last ')'.
    match stat.rfind(')') {
        Some(at) => !matches!(
            stat[at + 1..].trim_start().chars().next(),
            Some('Z' | 'X') | None
        ),
        None => false,
    }
}

/// Sends `SIG<sig>` to `pid` with kill(1): std has no kill(2) for a process
/// that is not our child, and the workspace forbids unsafe (no libc call).
fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A client property from `list_connections`' JSON: an object, or a list
/// of `[key, type, value]` / `{key: value}` entries, depending on the version.
fn client_property(props: &serde_json::Value, key: &str) -> Option<String> {
    if let Some(v) = props.get(key).and_then(|v| v.as_str()) {
        return Some(v.to_string());
    }
    for entry in props.as_array().into_iter().flatten() {
        if let Some(arr) = entry.as_array()
            && arr.first().and_then(|k| k.as_str()) == Some(key)
        {
            return arr.last().and_then(|v| v.as_str()).map(str::to_string);
        }
        if let Some(v) = entry.get(key).and_then(|v| v.as_str()) {
            return Some(v.to_string());
        }
    }
    None
}

fn not_ready(name: &str, log: String) -> HarnessError {
    HarnessError::NotReady {
        name: name.to_string(),
        log,
    }
}

fn read_text(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = fs::File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    text
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_reason_recognises_only_unavailability() {
        let unavailable = HarnessError::Spawn {
            name: WHAT.into(),
            source: io::Error::new(io::ErrorKind::Unsupported, "not root"),
        };
        assert_eq!(skip_reason(&unavailable).as_deref(), Some("not root"));
        let other = HarnessError::Spawn {
            name: WHAT.into(),
            source: io::Error::new(io::ErrorKind::NotFound, "no such file"),
        };
        assert_eq!(skip_reason(&other), None);
        assert_eq!(skip_reason(&not_ready(WHAT, String::new())), None);
    }

    #[test]
    fn epmd_lines_match_whole_names() {
        let names = "name tidemark-ab-1 at port 24102\nname rabbit at port 25672\n";
        assert!(registered(names, "tidemark-ab-1"));
        assert!(registered(names, "rabbit"));
        assert!(!registered(names, "tidemark-ab"));
        assert!(!registered(names, "tidemark-ab-10"));
    }

    #[test]
    fn client_properties_in_either_shape() {
        let object = serde_json::json!({"connection_name": "w1", "product": "lapin"});
        assert_eq!(
            client_property(&object, "connection_name").as_deref(),
            Some("w1")
        );
        let tuples = serde_json::json!([
            ["product", "longstr", "lapin"],
            ["connection_name", "longstr", "w2"]
        ]);
        assert_eq!(
            client_property(&tuples, "connection_name").as_deref(),
            Some("w2")
        );
        assert_eq!(client_property(&tuples, "absent"), None);
    }

    #[test]
    fn free_ports_are_distinct_and_below_the_ephemeral_range() {
        let mut taken = BTreeSet::new();
        let mut all = Vec::new();
        for _ in 0..5 {
            let (a, d) = free_port_pair(&mut taken);
            all.extend([a, d]);
        }
        let distinct: BTreeSet<u16> = all.iter().copied().collect();
        assert_eq!(distinct.len(), all.len());
        assert!(all.iter().all(|p| (20_000..32_000).contains(p)));
    }

    #[test]
    fn process_alive_knows_itself_and_not_a_made_up_pid() {
        assert!(process_alive(std::process::id()));
        assert!(!process_alive(u32::MAX - 1));
    }
}
