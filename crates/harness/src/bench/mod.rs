//! `tidemark bench`: reproducible performance figures (docs/BENCHMARKS.md).
//!
//! - `bench e2e`: the distributed system on loopback (mock API, coordinator,
//!   W worker processes, Redis, RabbitMQ, a counting sink), scenario by
//!   scenario, with the broker's ceiling and, with `--compare`, dlt and a
//!   Singer SDK tap over the same pages;
//! - `bench pull`: `tidemark pull` over static pages, optionally against dlt.
//!
//! Both start the `tidemark` binary they are given (the CLI passes itself)
//! as separate processes, through [`crate::proc`].

mod children;
mod e2e;
mod one_chain;
mod prom;
mod pull;
mod scale;
mod sink;
mod tenants;

use std::io::Write;
use std::path::{Path, PathBuf};

pub use children::{ChildrenRun, RedisCost};
pub use e2e::{E2eBench, Report, RunResult, Scenario, ToolResult, render};
pub use one_chain::OneChain;
pub use pull::{PullBench, RunResult as PullResult};
pub use tenants::TenantAdd;

use crate::HarnessError;

#[derive(clap::Subcommand, Debug, Clone)]
pub enum BenchCommand {
    /// The distributed system end to end: throughput, scale-out, many jobs.
    E2e(Box<E2eBench>),
    /// `tidemark pull` over static pages on loopback, optionally against dlt.
    Pull(PullBench),
}

/// Run the benchmark `cmd` with the `tidemark` binary at `tidemark`,
/// printing its report on `out`.
pub async fn run(
    cmd: BenchCommand,
    tidemark: &Path,
    out: &mut dyn Write,
) -> Result<(), HarnessError> {
    match cmd {
        BenchCommand::E2e(b) => e2e::run(&b, tidemark, out).await,
        BenchCommand::Pull(b) => pull::pull_bench(&b, tidemark, out).await,
    }
}

/// The Python for the comparison scripts: `explicit`, else the venv that
/// bench/setup-python.sh makes, else `python3`.
fn python(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    let venv = PathBuf::from("target/bench-venv/bin/python");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}
