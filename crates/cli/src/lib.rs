//! The `tidemark` command line: each subcommand is a library function here
//! so tests and benchmarks can call it; `main.rs` only parses flags.

pub mod bench;
pub mod ctl;
pub mod demo;
pub mod embedded;
pub mod exit;
pub mod mockapi;
pub mod pull;
pub mod roles;
pub mod run;
pub mod services;
pub mod tail;
pub mod tls;
pub mod validate;
