//! Commits per second from one process against Redis (docs/BENCHMARKS.md).
//!
//! `cargo run --release -p tidemark-state --example commit_bench [JOBS] [SECONDS]`
//! runs JOBS concurrent jobs (default 64) on one multiplexed connection, each
//! committing page after page as a worker would, under a throwaway prefix.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tidemark_core::checkpoint::{Checkpoint, Commit, CommitOutcome, JobId};
use tidemark_state::{Acquire, Jobs, Leases, RedisStore};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let jobs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(64);
    let secs: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("tmbench:{}:", std::process::id());
    let store = Arc::new(RedisStore::connect(&url, &prefix).await?);
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for j in 0..jobs {
        let (store, done) = (store.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let job = JobId::new("bench", j.to_string());
            store.ensure(&job, &Checkpoint::default()).await?;
            let Acquire::Granted { epoch } =
                store.acquire(&job, Duration::from_secs(60), true).await?
            else {
                return Err::<(), tidemark_state::StateError>(
                    tidemark_state::StateError::NoSuchJob(job),
                );
            };
            let mut seq = 0;
            while Instant::now() < deadline {
                let c = Commit {
                    epoch,
                    expected_seq: seq,
                    new_cursor: Some(format!("cursor-{}", seq + 1)),
                    new_seq: seq + 1,
                    high_water: Some("2024-01-01T00:00:00Z".into()),
                    count: 1000,
                    end_of_stream: false,
                    next_due_ms: 0,
                    lease_ms: 60_000,
                    restart: None,
                    note: None,
                    triggers: Vec::new(),
                    batches: Vec::new(),
                };
                if store.commit(&job, &c).await? == CommitOutcome::Ok {
                    seq += 1;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(())
        }));
    }
    let started = Instant::now();
    for t in tasks {
        t.await??;
    }
    let n = done.load(Ordering::Relaxed);
    println!(
        "{n} commits in {:.2}s from {jobs} concurrent jobs: {:.0} commits/s",
        started.elapsed().as_secs_f64(),
        n as f64 / started.elapsed().as_secs_f64()
    );
    store.delete_all().await?;
    Ok(())
}
