//! The `tidemark` command line: each subcommand is a library function here
//! so tests can call it; `main.rs` only parses flags. The engines live in
//! libraries: embedded mode in tidemark-embedded, the roles in
//! tidemark-coordinator and tidemark-worker, `bench` in tidemark-harness.

pub mod ctl;
pub mod demo;
pub mod exit;
pub mod mockapi;
pub mod roles;
pub mod run;
pub mod services;
pub mod tail;
pub mod tls;
pub mod validate;
