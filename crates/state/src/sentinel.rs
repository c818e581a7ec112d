//! Redis Sentinel: the `redis+sentinel://` URL, finding the master through
//! the sentinels, and a connection that follows the master through failovers.
//!
//! ```text
//! redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/MASTER_NAME[?PARAMS]
//! rediss+sentinel://...                  TLS to the sentinels and to the data nodes
//! PARAMS: db=N                           the database on the data nodes (default 0)
//!         sentinel_username=U            the sentinels' credentials (default: none)
//!         sentinel_password=P
//! ```
//!
//! The user info is the data nodes' credentials; a port left out is 26379.
//! Reserved characters in names and passwords are percent-encoded (`%40`
//! for `@`, `%2F` for `/`, ...). IPv6 addresses go in brackets.
//!
//! How the master is found: the sentinels are asked in the URL's order
//! (`SENTINEL get-master-addr-by-name`); the first address that answers
//! `ROLE` with `master` is used. A node that says it is a replica is never
//! used, whatever a sentinel says. The connection to it is kept until it
//! fails (a dropped connection, a timeout) or a command answers `READONLY`
//! (the node was demoted): then the next command asks the sentinels again.
//! Every few seconds ([`RECHECK_EVERY`]) a command also asks one sentinel
//! whether the master moved while the connection kept working.
//! A command that met `READONLY` wrote nothing, so it is sent once more to
//! the new master; any other failure is returned, as a direct connection
//! returns it (the caller retries, and the scripts' answers to a retry
//! are already idempotent: `ALREADY_APPLIED`).

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use percent_encoding::percent_decode_str;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, ConnectionInfo, ErrorKind, Pipeline,
    RedisConnectionInfo, RedisError, RedisFuture, RedisResult, Role, TlsCertificates, Value,
};

/// The port of a sentinel address that names none.
pub const DEFAULT_SENTINEL_PORT: u16 = 26379;

/// How often the sentinels are asked whether the master moved, while the
/// connection to it works.
pub const RECHECK_EVERY: Duration = Duration::from_secs(5);
/// A search that found no master is answered from memory this long.
pub const FAILURE_REMEMBERED: Duration = Duration::from_millis(250);
/// Asking one sentinel: connecting, and then its answer.
const SENTINEL_TIMEOUT: Duration = Duration::from_secs(2);
/// Connecting to a data node.
pub(crate) const NODE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A data node's answer (the main connection; waited writes allow for the wait).
pub(crate) const NODE_RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether `url` is a Sentinel URL (`redis+sentinel://`, `rediss+sentinel://`).
pub fn is_sentinel_url(url: &str) -> bool {
    url.split_once("://").is_some_and(|(scheme, _)| {
        scheme.eq_ignore_ascii_case("redis+sentinel")
            || scheme.eq_ignore_ascii_case("rediss+sentinel")
    })
}

/// A parsed Sentinel URL. Its `Debug` hides both passwords.
#[derive(Clone, PartialEq, Eq)]
pub struct SentinelUrl {
    /// `rediss+sentinel`: TLS to the sentinels and to the data nodes.
    pub tls: bool,
    /// The sentinels, in the order they are asked.
    pub sentinels: Vec<(String, u16)>,
    /// The name the sentinels monitor the master under.
    pub master_name: String,
    pub db: i64,
    /// The data nodes' credentials.
    pub username: Option<String>,
    pub password: Option<String>,
    /// The sentinels' credentials.
    pub sentinel_username: Option<String>,
    pub sentinel_password: Option<String>,
}

impl fmt::Debug for SentinelUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hide = |p: &Option<String>| p.as_ref().map(|_| "***");
        f.debug_struct("SentinelUrl")
            .field("tls", &self.tls)
            .field("sentinels", &self.sentinels)
            .field("master_name", &self.master_name)
            .field("db", &self.db)
            .field("username", &self.username)
            .field("password", &hide(&self.password))
            .field("sentinel_username", &self.sentinel_username)
            .field("sentinel_password", &hide(&self.sentinel_password))
            .finish()
    }
}

const FORM: &str =
    "redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/MASTER_NAME[?db=N]";

impl SentinelUrl {
    /// Parse a Sentinel URL. The error says what is wrong without quoting
    /// a password (it may quote a host address, a parameter name or a db).
    pub fn parse(url: &str) -> Result<SentinelUrl, String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| format!("not a URL; expected {FORM}"))?;
        let tls = if scheme.eq_ignore_ascii_case("redis+sentinel") {
            false
        } else if scheme.eq_ignore_ascii_case("rediss+sentinel") {
            true
        } else {
            return Err(format!(
                "scheme {scheme:?} is not redis+sentinel or rediss+sentinel"
            ));
        };
        // The authority ends at the first '/', '?' or '#' (RFC 3986): a
        // password holding one of them must be percent-encoded.
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let (userinfo, hosts) = match authority.rfind('@') {
            Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
            None => (None, authority),
        };
        if userinfo.is_none() && tail.contains('@') {
            // Most likely a password with a raw '/', '?' or '#': quoting
            // any of it could print the password.
            return Err(
                "an '@' after the host list: percent-encode '/', '?', '#' and '@' \
                 in passwords (%2F, %3F, %23, %40)"
                    .into(),
            );
        }
        let (username, password) = match userinfo {
            None => (None, None),
            Some(u) => {
                let (user, pass) = match u.split_once(':') {
                    Some((user, pass)) => (user, Some(pass)),
                    None => (u, None),
                };
                let user = decode(user, "the user name")?;
                let pass = pass.map(|p| decode(p, "the password")).transpose()?;
                (
                    Some(user).filter(|u| !u.is_empty()),
                    pass.filter(|p| !p.is_empty()),
                )
            }
        };
        if hosts.is_empty() {
            return Err(format!("no sentinel addresses; expected {FORM}"));
        }
        let sentinels = hosts
            .split(',')
            .enumerate()
            .map(|(i, h)| host_port(i, h))
            .collect::<Result<Vec<_>, _>>()?;

        if tail.contains('#') {
            return Err("a fragment ('#...') is not allowed in a Sentinel URL".into());
        }
        let (path, query) = match tail.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (tail, None),
        };
        let name = path.strip_prefix('/').unwrap_or(path);
        if name.is_empty() {
            return Err(format!(
                "no master name: the path names the master the sentinels monitor, as in {FORM}"
            ));
        }
        if name.contains('/') {
            return Err(format!(
                "the path is the master name alone (the database is ?db=N): {FORM}"
            ));
        }
        let master_name = decode(name, "the master name")?;

        let mut out = SentinelUrl {
            tls,
            sentinels,
            master_name,
            db: 0,
            username,
            password,
            sentinel_username: None,
            sentinel_password: None,
        };
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "db" => {
                    out.db = value
                        .parse::<i64>()
                        .ok()
                        .filter(|d| *d >= 0)
                        .ok_or_else(|| format!("db={value:?} is not a database number"))?;
                }
                "sentinel_username" => {
                    out.sentinel_username =
                        Some(decode(value, "sentinel_username")?).filter(|v| !v.is_empty());
                }
                "sentinel_password" => {
                    out.sentinel_password =
                        Some(decode(value, "sentinel_password")?).filter(|v| !v.is_empty());
                }
                other => {
                    return Err(format!(
                        "unknown parameter {:?} (known: db, sentinel_username, sentinel_password)",
                        // A key that is not one of ours might be a pasted secret: show its start.
                        other.chars().take(24).collect::<String>()
                    ));
                }
            }
        }
        Ok(out)
    }

    fn node_info(&self, host: &str, port: u16) -> ConnectionInfo {
        ConnectionInfo {
            addr: addr(self.tls, host, port),
            redis: RedisConnectionInfo {
                db: self.db,
                username: self.username.clone(),
                password: self.password.clone(),
                ..Default::default()
            },
        }
    }

    fn sentinel_info(&self, host: &str, port: u16) -> ConnectionInfo {
        ConnectionInfo {
            addr: addr(self.tls, host, port),
            redis: RedisConnectionInfo {
                username: self.sentinel_username.clone(),
                password: self.sentinel_password.clone(),
                ..Default::default()
            },
        }
    }
}

fn addr(tls: bool, host: &str, port: u16) -> ConnectionAddr {
    if tls {
        ConnectionAddr::TcpTls {
            host: host.to_string(),
            port,
            insecure: false,
            tls_params: None,
        }
    } else {
        ConnectionAddr::Tcp(host.to_string(), port)
    }
}

fn decode(s: &str, what: &str) -> Result<String, String> {
    percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| format!("{what} is not UTF-8 once percent-decoded"))
}

/// One `host[:port]` of the sentinel list (the `i`th, from 0).
fn host_port(i: usize, entry: &str) -> Result<(String, u16), String> {
    let n = i + 1;
    if entry.is_empty() {
        return Err(format!(
            "sentinel address {n} is empty (two commas, or one at an end)"
        ));
    }
    let (host, port) = if let Some(v6) = entry.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("sentinel address {entry:?}: no ']' after an IPv6 address"))?;
        match after {
            "" => (host, None),
            _ => match after.strip_prefix(':') {
                Some(p) => (host, Some(p)),
                None => {
                    return Err(format!(
                        "sentinel address {entry:?}: ':' expected after ']'"
                    ));
                }
            },
        }
    } else {
        match entry.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (entry, None),
        }
    };
    if host.is_empty() {
        return Err(format!("sentinel address {n} ({entry:?}) has no host"));
    }
    let port = match port {
        None => DEFAULT_SENTINEL_PORT,
        Some(p) => p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
            format!("sentinel address {entry:?}: port {p:?} is not a number from 1 to 65535")
        })?,
    };
    Ok((host.to_string(), port))
}

/// `url` with its passwords replaced by `***`: the user info's password
/// and every query parameter whose name holds `password`. Works on any
/// URL (a Redis, Sentinel or AMQP URL); `<not a URL>` when there is no
/// `scheme://`, or when a password may have been misplaced.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<not a URL>".into();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = match authority.rfind('@') {
        Some(i) => {
            let (userinfo, hosts) = (&authority[..i], &authority[i + 1..]);
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:***@{hosts}"),
                None => format!("{userinfo}@{hosts}"),
            }
        }
        // '@' later on: probably a password holding a raw '/', '?' or '#'.
        None if tail.contains('@') => return "<not a URL>".into(),
        None => authority.to_string(),
    };
    // Nothing after '#' is shown (nothing of ours goes there).
    let tail = tail.split('#').next().unwrap_or("");
    let tail = match tail.split_once('?') {
        None => tail.to_string(),
        Some((path, query)) => {
            let pairs: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, _)) if k.to_ascii_lowercase().contains("password") => {
                        format!("{k}=***")
                    }
                    _ => pair.to_string(),
                })
                .collect();
            format!("{path}?{}", pairs.join("&"))
        }
    };
    format!("{scheme}://{authority}{tail}")
}

/// The connection to the master, and the generation it belongs to: each
/// new master connection (after a failure) is a new generation, so that a
/// failure seen on an old connection does not drop a newer one.
#[derive(Clone)]
pub(crate) struct Master {
    pub generation: u64,
    /// `host:port`, for logs.
    pub addr: String,
    /// A client of this node, for further connections (waited writes).
    pub client: Arc<Client>,
    pub conn: MultiplexedConnection,
}

/// The sentinels of one master name, and the connection to its master.
pub(crate) struct Sentinels {
    url: SentinelUrl,
    /// `host:port` and a client of each sentinel.
    sentinels: Vec<(String, Client)>,
    certs: Option<TlsCertificates>,
    state: tokio::sync::Mutex<State>,
}

#[derive(Default)]
struct State {
    generation: u64,
    master: Option<Master>,
    /// The last master's address, to log a change.
    last_addr: Option<String>,
    /// When the sentinels last named the master connected to.
    checked: Option<Instant>,
    /// The last search that found no master: when, and what it said.
    failed: Option<(Instant, ErrorKind, String)>,
}

impl Sentinels {
    /// `certs`: the roots for `rediss+sentinel` (unused otherwise).
    pub(crate) fn new(url: SentinelUrl, certs: Option<TlsCertificates>) -> RedisResult<Self> {
        let certs = if url.tls { certs } else { None };
        let sentinels = url
            .sentinels
            .iter()
            .map(|(h, p)| {
                let info = url.sentinel_info(h, *p);
                let client = match &certs {
                    Some(c) => Client::build_with_tls(info, c.clone())?,
                    None => Client::open(info)?,
                };
                Ok((format!("{h}:{p}"), client))
            })
            .collect::<RedisResult<Vec<_>>>()?;
        Ok(Sentinels {
            url,
            sentinels,
            certs,
            state: tokio::sync::Mutex::new(State::default()),
        })
    }

    pub(crate) fn db(&self) -> i64 {
        self.url.db
    }

    /// The master connection: the current one, or a new one to the master
    /// the sentinels name now. One caller asks the sentinels at a time;
    /// the others wait for its answer (a search that failed is answered
    /// from memory for a moment, so that they do not each search again).
    /// Every [`RECHECK_EVERY`], one caller also asks a sentinel whether the
    /// master moved while its connection kept working (a master cut off
    /// from the sentinels but not from us): then it moves too.
    pub(crate) async fn master(&self) -> RedisResult<Master> {
        loop {
            let mut state = self.state.lock().await;
            if let Some(m) = state.master.clone() {
                if state.checked.is_some_and(|t| t.elapsed() < RECHECK_EVERY) {
                    return Ok(m);
                }
                state.checked = Some(Instant::now());
                drop(state);
                match self.named_now().await {
                    Some(named) if named != m.addr => {
                        let why = RedisError::from((
                            ErrorKind::MasterDown,
                            "the sentinels name another master",
                            named,
                        ));
                        self.forget(m.generation, &why).await;
                        continue;
                    }
                    _ => return Ok(m),
                }
            }
            if let Some((at, kind, text)) = &state.failed
                && at.elapsed() < FAILURE_REMEMBERED
            {
                return Err(RedisError::from((
                    *kind,
                    "no master found through the sentinels",
                    text.clone(),
                )));
            }
            let (addr, client, conn) = match self.find_master().await {
                Ok(found) => found,
                Err(e) => {
                    if !crate::client::is_tls_failure(&e) {
                        let text = e.detail().map_or_else(|| e.to_string(), str::to_string);
                        state.failed = Some((Instant::now(), e.kind(), text));
                    }
                    return Err(e);
                }
            };
            state.generation += 1;
            match state.last_addr.as_deref() {
                Some(last) if last != addr => tracing::warn!(
                    master_name = %self.url.master_name, from = %last, to = %addr,
                    "Redis master moved (failover): connected to the new master"
                ),
                Some(_) => tracing::info!(
                    master_name = %self.url.master_name, master = %addr,
                    "reconnected to the Redis master"
                ),
                None => tracing::info!(
                    master_name = %self.url.master_name, master = %addr,
                    "Redis master found through the sentinels"
                ),
            }
            state.last_addr = Some(addr.clone());
            state.failed = None;
            state.checked = Some(Instant::now());
            let m = Master {
                generation: state.generation,
                addr,
                client: Arc::new(client),
                conn,
            };
            state.master = Some(m.clone());
            return Ok(m);
        }
    }

    /// `host:port` of the master as the first sentinel that answers names it.
    async fn named_now(&self) -> Option<String> {
        for (_, sentinel) in &self.sentinels {
            if let Ok(Some((host, port))) = self.ask(sentinel).await {
                return Some(format!("{host}:{port}"));
            }
        }
        None
    }

    /// Drop the master connection of `generation` (it failed, or its node
    /// was demoted): the next command asks the sentinels again.
    pub(crate) async fn forget(&self, generation: u64, why: &RedisError) {
        let mut state = self.state.lock().await;
        if let Some(m) = &state.master
            && m.generation == generation
        {
            tracing::warn!(
                master_name = %self.url.master_name, master = %m.addr, error = %why,
                "lost the Redis master; asking the sentinels again"
            );
            state.master = None;
        }
    }

    /// Ask the sentinels in turn for the master's address, and connect to
    /// the first address that says it is the master.
    async fn find_master(&self) -> RedisResult<(String, Client, MultiplexedConnection)> {
        let mut tried: Vec<(String, u16)> = Vec::new();
        let mut failures: Vec<String> = Vec::new();
        // A certificate refused is returned as it is (it is not retried,
        // and the CLI explains it).
        let mut tls_failure = None;
        for (label, sentinel) in &self.sentinels {
            let (host, port) = match self.ask(sentinel).await {
                Ok(Some(a)) => a,
                Ok(None) => {
                    failures.push(format!(
                        "sentinel {label} does not know a master named {:?}",
                        self.url.master_name
                    ));
                    continue;
                }
                Err(e) => {
                    failures.push(format!("sentinel {label}: {e}"));
                    if crate::client::is_tls_failure(&e) {
                        tls_failure = Some(e);
                    }
                    continue;
                }
            };
            if tried.contains(&(host.clone(), port)) {
                continue;
            }
            tried.push((host.clone(), port));
            let addr = format!("{host}:{port}");
            match self.connect_node(&host, port).await {
                Ok((client, conn)) => return Ok((addr, client, conn)),
                Err(e) => {
                    failures.push(format!("master {addr} (named by sentinel {label}): {e}"));
                    if crate::client::is_tls_failure(&e) {
                        tls_failure = Some(e);
                    }
                }
            }
        }
        let detail = failures.join("; ");
        if let Some(e) = tls_failure {
            tracing::warn!(master_name = %self.url.master_name, failures = %detail, "no Redis master found");
            return Err(e);
        }
        Err(RedisError::from((
            ErrorKind::MasterNameNotFoundBySentinel,
            "no master found through the sentinels",
            detail,
        )))
    }

    async fn ask(&self, sentinel: &Client) -> RedisResult<Option<(String, u16)>> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(SENTINEL_TIMEOUT)
            .set_response_timeout(SENTINEL_TIMEOUT);
        let mut c = sentinel
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.url.master_name)
            .query_async(&mut c)
            .await
    }

    /// A client of the data node `host:port` and a connection to it, once
    /// the node said it is the master.
    async fn connect_node(
        &self,
        host: &str,
        port: u16,
    ) -> RedisResult<(Client, MultiplexedConnection)> {
        let info = self.url.node_info(host, port);
        let client = match &self.certs {
            Some(c) => Client::build_with_tls(info, c.clone())?,
            None => Client::open(info)?,
        };
        let conn = connect_master(&client, NODE_RESPONSE_TIMEOUT).await?;
        Ok((client, conn))
    }
}

/// A connection to `client`'s node, refused unless `ROLE` says `master`.
pub(crate) async fn connect_master(
    client: &Client,
    response_timeout: Duration,
) -> RedisResult<MultiplexedConnection> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(NODE_CONNECT_TIMEOUT)
        .set_response_timeout(response_timeout);
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    match redis::cmd("ROLE").query_async::<Role>(&mut conn).await? {
        Role::Primary { .. } => Ok(conn),
        Role::Replica {
            primary_ip,
            primary_port,
            ..
        } => Err(RedisError::from((
            ErrorKind::ReadOnly,
            "not the master",
            format!("the node is a replica of {primary_ip}:{primary_port}"),
        ))),
        Role::Sentinel { .. } => Err(RedisError::from((
            ErrorKind::InvalidClientConfig,
            "not the master",
            "the node is a sentinel".to_string(),
        ))),
    }
}

/// The node no longer takes writes: it was demoted (or is a replica).
pub(crate) fn is_demoted(e: &RedisError) -> bool {
    matches!(e.kind(), ErrorKind::ReadOnly | ErrorKind::MasterDown)
        || e.code().is_some_and(|c| c == "READONLY" || c == "MASTERDOWN")
        // A script's write refused: the error text carries READONLY.
        || e.to_string().contains("READONLY")
}

/// The error in a reply (or in a transaction's replies) that says the node
/// no longer takes writes.
fn demoted_reply(v: &Value) -> Option<RedisError> {
    match v {
        Value::ServerError(se) => {
            let e: RedisError = se.clone().into();
            is_demoted(&e).then_some(e)
        }
        Value::Array(items) => items.iter().find_map(demoted_reply),
        _ => None,
    }
}

/// The connection itself failed (dropped, refused, timed out).
pub(crate) fn is_link_failure(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_unrecoverable_error()
}

/// A connection to whichever node the sentinels name as master. Cheap to
/// clone; every clone shares the one master connection.
#[derive(Clone)]
pub(crate) struct SentinelConn(pub(crate) Arc<Sentinels>);

impl SentinelConn {
    async fn run(&self, what: Request<'_>) -> RedisResult<Req> {
        let mut retried = false;
        loop {
            let mut m = self.0.master().await?;
            let out = match what {
                Request::One(cmd) => m.conn.req_packed_command(cmd).await.map(Req::One),
                Request::Many(p, offset, count) => m
                    .conn
                    .req_packed_commands(p, offset, count)
                    .await
                    .map(Req::Many),
            };
            // A server's error is a reply here (redis turns it into an
            // error later): READONLY comes as one.
            let demoted = match &out {
                Ok(Req::One(v)) => demoted_reply(v),
                Ok(Req::Many(vs)) => vs.iter().find_map(demoted_reply),
                Err(_) => None,
            };
            if let Some(e) = demoted {
                self.0.forget(m.generation, &e).await;
                if !retried {
                    retried = true;
                    continue;
                }
                return out;
            }
            match &out {
                Err(e) if is_demoted(e) => {
                    self.0.forget(m.generation, e).await;
                    // Refused, so not applied: once more, to the master now named.
                    if !retried {
                        retried = true;
                        continue;
                    }
                }
                Err(e) if is_link_failure(e) => self.0.forget(m.generation, e).await,
                _ => {}
            }
            return out;
        }
    }
}

#[derive(Clone, Copy)]
enum Request<'a> {
    One(&'a Cmd),
    Many(&'a Pipeline, usize, usize),
}

enum Req {
    One(Value),
    Many(Vec<Value>),
}

impl ConnectionLike for SentinelConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            match self.run(Request::One(cmd)).await? {
                Req::One(v) => Ok(v),
                Req::Many(_) => unreachable_reply(),
            }
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            match self.run(Request::Many(cmd, offset, count)).await? {
                Req::Many(v) => Ok(v),
                Req::One(_) => unreachable_reply(),
            }
        })
    }

    fn get_db(&self) -> i64 {
        self.0.db()
    }
}

fn unreachable_reply<T>() -> RedisResult<T> {
    Err(RedisError::from((
        ErrorKind::ClientError,
        "a reply of the wrong shape",
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<SentinelUrl, String> {
        SentinelUrl::parse(url)
    }

    #[test]
    fn the_full_form_parses() {
        let u = parse(
            "rediss+sentinel://app:p%40ss%2Fw@s1.example:26380,10.0.0.2,[::1]:26381/my%20master\
             ?db=3&sentinel_username=sen&sentinel_password=s%26cret",
        )
        .unwrap();
        assert_eq!(
            u,
            SentinelUrl {
                tls: true,
                sentinels: vec![
                    ("s1.example".into(), 26380),
                    ("10.0.0.2".into(), 26379),
                    ("::1".into(), 26381),
                ],
                master_name: "my master".into(),
                db: 3,
                username: Some("app".into()),
                password: Some("p@ss/w".into()),
                sentinel_username: Some("sen".into()),
                sentinel_password: Some("s&cret".into()),
            }
        );
        let shown = format!("{u:?}");
        assert!(
            !shown.contains("p@ss") && !shown.contains("cret"),
            "{shown}"
        );
    }

    #[test]
    fn the_short_forms_parse() {
        let u = parse("redis+sentinel://127.0.0.1:26379/mymaster").unwrap();
        assert!(!u.tls);
        assert_eq!(u.sentinels, vec![("127.0.0.1".into(), 26379)]);
        assert_eq!((u.master_name.as_str(), u.db), ("mymaster", 0));
        assert_eq!((u.username, u.password), (None, None));
        let u = parse("REDIS+SENTINEL://:pw@h/m?").unwrap();
        assert_eq!((u.username, u.password.as_deref()), (None, Some("pw")));
        let u = parse("redis+sentinel://user@h/m").unwrap();
        assert_eq!((u.username.as_deref(), u.password), (Some("user"), None));
        // A raw '@' in a password: the last '@' ends the user info.
        let u = parse("redis+sentinel://:p@ss@h/m").unwrap();
        assert_eq!(u.password.as_deref(), Some("p@ss"));
        assert!(is_sentinel_url("rediss+sentinel://h/m"));
        assert!(!is_sentinel_url("redis://h:6379"));
    }

    #[test]
    fn mistakes_are_named_without_the_passwords() {
        let cases = [
            (
                "redis+sentinel://:hunter2@/mymaster",
                "no sentinel addresses",
            ),
            (
                "redis+sentinel://:hunter2@h1:26379,h2:26379",
                "no master name",
            ),
            ("redis+sentinel://:hunter2@h1:26379/", "no master name"),
            (
                "redis+sentinel://:hunter2@h1:26379/m/0",
                "the master name alone",
            ),
            (
                "redis+sentinel://:hunter2@h1:26379,h2:x/m",
                "port \"x\" is not a number",
            ),
            ("redis+sentinel://:hunter2@h1:0/m", "port \"0\""),
            ("redis+sentinel://:hunter2@h1:70000/m", "from 1 to 65535"),
            (
                "redis+sentinel://:hunter2@h1,,h2/m",
                "sentinel address 2 is empty",
            ),
            (
                "redis+sentinel://:hunter2@h1,/m",
                "sentinel address 2 is empty",
            ),
            ("redis+sentinel://:hunter2@:26379/m", "has no host"),
            ("redis+sentinel://:hunter2@[::1/m", "no ']'"),
            (
                "redis+sentinel://:hunter2@h/m?db=x",
                "db=\"x\" is not a database number",
            ),
            (
                "redis+sentinel://:hunter2@h/m?db=-1",
                "not a database number",
            ),
            (
                "redis+sentinel://:hunter2@h/m?sentinel_pasword=hunter2",
                "unknown parameter \"sentinel_pasword\"",
            ),
            ("redis+sentinel://:hunter2@h/m#x", "fragment"),
            ("redis://:hunter2@h/m", "is not redis+sentinel"),
            ("hunter2", "not a URL"),
            // A raw '/' in the password: refused without quoting any of it.
            ("redis+sentinel://:hunt/er2@h/m", "percent-encode"),
            ("redis+sentinel://:%ff@h/m", "the password is not UTF-8"),
        ];
        for (url, want) in cases {
            let e = parse(url).unwrap_err();
            assert!(e.contains(want), "{url}: {e}");
            assert!(!e.contains("hunter2") && !e.contains("er2"), "{url}: {e}");
        }
    }

    #[test]
    fn redaction_hides_both_passwords() {
        assert_eq!(
            redacted(
                "redis+sentinel://app:pw1@h1:26379,h2:26379/m?db=1&sentinel_password=pw2&sentinel_username=s"
            ),
            "redis+sentinel://app:***@h1:26379,h2:26379/m?db=1&sentinel_password=***&sentinel_username=s"
        );
        assert_eq!(
            redacted("rediss://:redis-canary@redis:6380/0"),
            "rediss://:***@redis:6380/0"
        );
        assert_eq!(redacted("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(redacted("redis://user@h/0"), "redis://user@h/0");
        assert_eq!(redacted("redis+sentinel://:hunt/er2@h/m"), "<not a URL>");
        assert_eq!(redacted("hunter2"), "<not a URL>");
        assert_eq!(redacted("redis://h/0#hunter2"), "redis://h/0");
    }

    #[test]
    fn errors_are_classified() {
        let ro = RedisError::from((ErrorKind::ReadOnly, "x"));
        assert!(is_demoted(&ro) && !is_link_failure(&ro));
        let script = RedisError::from((
            ErrorKind::ResponseError,
            "An error was signalled by the server",
            "READONLY You can't write against a read only replica. script: abc".to_string(),
        ));
        assert!(is_demoted(&script));
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(is_link_failure(&io) && !is_demoted(&io));
        let plain = RedisError::from((ErrorKind::ResponseError, "ERR wrong"));
        assert!(!is_link_failure(&plain) && !is_demoted(&plain));
    }
}
