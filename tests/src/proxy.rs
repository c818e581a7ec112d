//! A TCP fault proxy for the fault-injection suites.
//!
//! Put a [`FaultProxy`] between a tidemark process and Redis, RabbitMQ or
//! the mock API (hand the process [`FaultProxy::url_for`] instead of the
//! real URL) to break the network under it on demand: reset every live
//! connection, hold all bytes for a while, throttle throughput, or refuse
//! new connections. The process under test sees what a real network fault
//! looks like (RSTs, silent stalls, slow links), not a clean shutdown.
//!
//! The proxy's tasks run on the tokio runtime that called
//! [`FaultProxy::start`], so that runtime must keep running (and must not be
//! blocked by synchronous clients on a current-thread runtime) for bytes to
//! flow. The fault controls themselves are plain synchronous calls, usable
//! from any thread.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Largest piece forwarded at once; also the unit the throttle sleeps for.
const CHUNK: usize = 16 * 1024;

/// What the proxy has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyCounters {
    /// Connections accepted, including ones refused right after accepting.
    pub connections: u64,
    /// Connections the proxy closed abruptly: by [`FaultProxy::reset_all`],
    /// by turning [`FaultProxy::refuse`] on, or refused on arrival.
    pub resets: u64,
    /// Bytes written to the upstream.
    pub bytes_up: u64,
    /// Bytes written back to clients.
    pub bytes_down: u64,
}

#[derive(Default)]
struct Shared {
    /// Bytes per second per direction per connection; 0 means unthrottled.
    rate: AtomicU64,
    refuse: AtomicBool,
    connections: AtomicU64,
    resets: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
}

/// A TCP proxy on 127.0.0.1 that forwards to one upstream and injects
/// faults on command. Dropping it stops the listener and ends every
/// connection.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    // The senders live only here: dropping the proxy closes both channels,
    // which is what tells every connection task to stop.
    resets: watch::Sender<u64>,
    stall_until: watch::Sender<Option<Instant>>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1 (a free port) and forwards every connection to
    /// `upstream` (`host:port`), which is resolved per connection so an
    /// upstream that is down at start is fine.
    pub async fn start(upstream: &str) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let (resets, resets_rx) = watch::channel(0u64);
        let (stall_until, stall_rx) = watch::channel(None);
        let accept = tokio::spawn(accept_loop(
            listener,
            Arc::from(upstream),
            Arc::clone(&shared),
            resets_rx,
            stall_rx,
        ));
        Ok(FaultProxy {
            addr,
            shared,
            resets,
            stall_until,
            accept,
        })
    }

    /// Where clients should connect instead of the upstream.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `url` with its `host:port` replaced by the proxy's address, keeping
    /// scheme, credentials, path and query: `amqp://u:p@rabbit:5672/%2f`
    /// becomes `amqp://u:p@127.0.0.1:<proxy port>/%2f`.
    pub fn url_for(&self, url: &str) -> String {
        let (scheme, rest) = match url.find("://") {
            Some(i) => url.split_at(i + 3),
            None => ("", url),
        };
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        let userinfo = match authority.rfind('@') {
            Some(i) => &authority[..=i],
            None => "",
        };
        format!("{scheme}{userinfo}{}{tail}", self.addr)
    }

    /// Closes every live connection now with an RST on both sides, as a
    /// crashed middlebox or a peer reboot would. New connections are still
    /// accepted afterwards.
    pub fn reset_all(&self) {
        self.resets.send_modify(|generation| *generation += 1);
    }

    /// Holds all bytes in both directions on every connection (including
    /// ones accepted meanwhile) for `d` from now, then lets them flow again.
    /// Connections stay open, so only timeouts notice. Replaces any stall
    /// in progress: `stall(Duration::ZERO)` ends one early.
    pub fn stall(&self, d: Duration) {
        self.stall_until.send_replace(Some(Instant::now() + d));
    }

    /// Throttles each direction of each connection to about
    /// `bytes_per_sec`; `None` forwards at full speed again.
    pub fn slow(&self, bytes_per_sec: Option<u64>) {
        self.shared
            .rate
            .store(bytes_per_sec.unwrap_or(0), Ordering::Relaxed);
    }

    /// While on, every new connection is accepted and immediately reset
    /// (what a client sees from a dead or restarting service behind a load
    /// balancer); turning it on also resets the live connections.
    pub fn refuse(&self, on: bool) {
        self.shared.refuse.store(on, Ordering::SeqCst);
        if on {
            self.reset_all();
        }
    }

    pub fn counters(&self) -> ProxyCounters {
        let s = &self.shared;
        ProxyCounters {
            connections: s.connections.load(Ordering::Relaxed),
            resets: s.resets.load(Ordering::Relaxed),
            bytes_up: s.bytes_up.load(Ordering::Relaxed),
            bytes_down: s.bytes_down.load(Ordering::Relaxed),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Connection tasks end on their own once the senders (fields of
        // self) are dropped right after this.
        self.accept.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: Arc<str>,
    shared: Arc<Shared>,
    resets: watch::Receiver<u64>,
    stall_until: watch::Receiver<Option<Instant>>,
) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(_) => {
                // Usually out of file descriptors; back off instead of
                // spinning, the listener itself is still fine.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        shared.connections.fetch_add(1, Ordering::Relaxed);
        if shared.refuse.load(Ordering::SeqCst) {
            let _ = client.set_zero_linger();
            drop(client);
            shared.resets.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        // Small protocol messages (PING, AMQP frames) must not wait on
        // Nagle behind the proxy when they would not without it.
        let _ = client.set_nodelay(true);
        tokio::spawn(serve(
            client,
            Arc::clone(&upstream),
            Arc::clone(&shared),
            resets.clone(),
            stall_until.clone(),
        ));
    }
}

async fn serve(
    mut client: TcpStream,
    upstream: Arc<str>,
    shared: Arc<Shared>,
    mut resets: watch::Receiver<u64>,
    stall_until: watch::Receiver<Option<Instant>>,
) {
    // Only resets from now on concern this connection; the clone this came
    // from may not have seen earlier ones.
    resets.borrow_and_update();
    let connected = tokio::select! {
        r = TcpStream::connect(&*upstream) => r,
        r = resets.changed() => {
            if r.is_ok() {
                shared.resets.fetch_add(1, Ordering::Relaxed);
            }
            let _ = client.set_zero_linger();
            return;
        }
    };
    let Ok(mut server) = connected else {
        // Upstream down: the client sees the connection end, much as it
        // would have seen a refused connect without the proxy.
        let _ = client.set_zero_linger();
        return;
    };
    let _ = server.set_nodelay(true);

    let abortive = {
        let (client_r, client_w) = client.split();
        let (server_r, server_w) = server.split();
        let up = pump(
            client_r,
            server_w,
            &shared,
            &shared.bytes_up,
            stall_until.clone(),
        );
        let down = pump(server_r, client_w, &shared, &shared.bytes_down, stall_until);
        tokio::select! {
            // A failed direction (say the upstream reset) is passed on as a
            // reset of the other side too, as a plain network would.
            r = async { tokio::try_join!(up, down) } => r.is_err(),
            r = resets.changed() => {
                if r.is_ok() {
                    shared.resets.fetch_add(1, Ordering::Relaxed);
                }
                true
            }
        }
    };
    if abortive {
        // SO_LINGER 0 turns the close below into an RST, so both peers see
        // a reset instead of an orderly FIN.
        let _ = client.set_zero_linger();
        let _ = server.set_zero_linger();
    }
}

/// Forwards `from` to `to` until EOF (passed on as a half-close) or an
/// error, honouring stalls and the throttle.
async fn pump<R, W>(
    mut from: R,
    mut to: W,
    shared: &Shared,
    counter: &AtomicU64,
    mut stall_until: watch::Receiver<Option<Instant>>,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; CHUNK];
    loop {
        let rate = shared.rate.load(Ordering::Relaxed);
        // Under a throttle, read at most a tenth of a second's worth so a
        // rate change (or None) takes effect quickly.
        let limit = if rate == 0 {
            CHUNK
        } else {
            usize::try_from(rate / 10).unwrap_or(CHUNK).clamp(1, CHUNK)
        };
        let n = from.read(&mut buf[..limit]).await?;
        if n == 0 {
            to.shutdown().await?;
            return Ok(());
        }
        wait_out_stall(&mut stall_until).await;
        to.write_all(&buf[..n]).await?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
        let rate = shared.rate.load(Ordering::Relaxed);
        if rate > 0 {
            tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate as f64)).await;
        }
    }
}

async fn wait_out_stall(stall_until: &mut watch::Receiver<Option<Instant>>) {
    loop {
        let until = *stall_until.borrow_and_update();
        match until {
            Some(t) if t > Instant::now() => {
                tokio::select! {
                    _ = tokio::time::sleep_until(t.into()) => {}
                    // The stall was replaced (maybe ended early): re-read it.
                    r = stall_until.changed() => {
                        if r.is_err() {
                            return;
                        }
                    }
                }
            }
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on 127.0.0.1:0 that lives as long as the test runtime.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = sock.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn proxied_echo() -> FaultProxy {
        let upstream = echo_server().await;
        FaultProxy::start(&upstream.to_string()).await.unwrap()
    }

    async fn round_trip(stream: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
        stream.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut back))
            .await
            .expect("echo within 5 s")
            .unwrap();
        back
    }

    /// True when the peer ended the connection (EOF or an error such as a
    /// reset) within a couple of seconds.
    async fn sees_end(stream: &mut TcpStream) -> bool {
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => true,
            Ok(Ok(_)) | Err(_) => false,
        }
    }

    #[test]
    fn url_for_replaces_only_host_and_port() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let proxy = rt.block_on(FaultProxy::start("127.0.0.1:1")).unwrap();
        let a = proxy.addr();
        assert_eq!(
            proxy.url_for("redis://127.0.0.1:6379"),
            format!("redis://{a}")
        );
        assert_eq!(
            proxy.url_for("amqp://guest:guest@rabbit:5672/%2f?heartbeat=5"),
            format!("amqp://guest:guest@{a}/%2f?heartbeat=5")
        );
        assert_eq!(
            proxy.url_for("http://localhost:8080/items?cursor=x"),
            format!("http://{a}/items?cursor=x")
        );
        assert_eq!(
            proxy.url_for("redis://[::1]:6379/0"),
            format!("redis://{a}/0")
        );
    }

    #[tokio::test]
    async fn bytes_pass_through_both_ways() {
        let proxy = proxied_echo().await;
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut c, b"hello").await, b"hello");
        let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let (mut r, mut w) = c.split();
        let (_, back) = tokio::join!(async { w.write_all(&big).await.unwrap() }, async {
            let mut back = vec![0u8; big.len()];
            r.read_exact(&mut back).await.unwrap();
            back
        });
        assert!(back == big, "200 KB came back intact");
        // The counters move after the write that delivered the echo.
        let want = 5 + big.len() as u64;
        let deadline = Instant::now() + Duration::from_secs(2);
        while proxy.counters().bytes_down < want && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let n = proxy.counters();
        assert_eq!((n.connections, n.resets), (1, 0));
        assert_eq!((n.bytes_up, n.bytes_down), (want, want));
    }

    #[tokio::test]
    async fn reset_all_ends_live_connections_and_new_ones_work() {
        let proxy = proxied_echo().await;
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut c, b"before").await, b"before");
        proxy.reset_all();
        // SO_LINGER 0: an RST, not an orderly FIN.
        let mut buf = [0u8; 8];
        let r = tokio::time::timeout(Duration::from_secs(2), c.read(&mut buf))
            .await
            .expect("the reset arrives within 2 s");
        assert_eq!(
            r.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionReset)
        );
        let mut c2 = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut c2, b"after").await, b"after");
        assert_eq!(proxy.counters().resets, 1);
    }

    #[tokio::test]
    async fn stall_holds_bytes_then_lets_them_through() {
        let proxy = proxied_echo().await;
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut c, b"warm").await, b"warm");
        proxy.stall(Duration::from_millis(300));
        let t = Instant::now();
        assert_eq!(round_trip(&mut c, b"held").await, b"held");
        let held = t.elapsed();
        assert!(
            held >= Duration::from_millis(250),
            "echo took only {held:?}"
        );

        // A connection opened during a stall stalls too.
        proxy.stall(Duration::from_millis(300));
        let t = Instant::now();
        let mut c2 = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut c2, b"new").await, b"new");
        let held = t.elapsed();
        assert!(
            held >= Duration::from_millis(250),
            "echo took only {held:?}"
        );
    }

    #[tokio::test]
    async fn slow_throttles_throughput() {
        let proxy = proxied_echo().await;
        proxy.slow(Some(50_000));
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        let data = vec![7u8; 100_000];
        let t = Instant::now();
        let (mut r, mut w) = c.split();
        let (_, back) = tokio::join!(async { w.write_all(&data).await.unwrap() }, async {
            let mut back = vec![0u8; data.len()];
            tokio::time::timeout(Duration::from_secs(20), r.read_exact(&mut back))
                .await
                .expect("100 KB within 20 s")
                .unwrap();
            back
        });
        let took = t.elapsed();
        assert!(back == data);
        assert!(took >= Duration::from_millis(1500), "100 KB took {took:?}");

        proxy.slow(None);
        let t = Instant::now();
        assert_eq!(round_trip(&mut c, &data[..20_000]).await, &data[..20_000]);
        assert!(t.elapsed() < Duration::from_secs(1), "full speed again");
    }

    #[tokio::test]
    async fn refuse_ends_new_connections_until_turned_off() {
        let proxy = proxied_echo().await;
        let mut live = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut live, b"live").await, b"live");
        proxy.refuse(true);
        assert!(sees_end(&mut live).await, "the live connection was reset");
        // The handshake completes in the kernel before the proxy can refuse,
        // so the client may connect and only then see the end.
        if let Ok(mut c) = TcpStream::connect(proxy.addr()).await {
            assert!(sees_end(&mut c).await, "a refused connection ended");
        }
        proxy.refuse(false);
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut c, b"back").await, b"back");
        assert!(proxy.counters().resets >= 2);
    }

    #[tokio::test]
    async fn drop_ends_connections() {
        let proxy = proxied_echo().await;
        let addr = proxy.addr();
        let mut c = TcpStream::connect(addr).await.unwrap();
        assert_eq!(round_trip(&mut c, b"x").await, b"x");
        drop(proxy);
        assert!(
            sees_end(&mut c).await,
            "the connection ended with the proxy"
        );
        // Give the aborted accept task a moment to release the listener.
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Ok(mut c2) = TcpStream::connect(addr).await {
            assert!(sees_end(&mut c2).await);
        }
    }
}
