//! `tidemark mock-api`: serve the mock cursor API until SIGTERM or Ctrl-C.

use std::io::Write;
use std::net::SocketAddr;

use tidemark_mock::{MockArgs, MockServer};

use crate::exit::Failure;

pub async fn run(
    host: &str,
    port: u16,
    args: &MockArgs,
    shutdown: impl std::future::Future<Output = ()>,
    err: &mut dyn Write,
) -> Result<(), Failure> {
    let addr: SocketAddr = format!("{host}:{port}")
        .parse()
        .map_err(|e| Failure::usage(format!("--host/--port: {e}")))?;
    let server = MockServer::start(args.to_config(), addr)
        .await
        .map_err(|e| Failure::runtime(format!("cannot listen on {addr}: {e}")))?;
    let _ = writeln!(
        err,
        "mock API listening on {} ({} records); GET / lists the endpoints",
        server.base_url(),
        server.state().len()
    );
    shutdown.await;
    server.shutdown().await;
    Ok(())
}
