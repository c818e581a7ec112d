//! Tenants from the command line: `validate` checks a tenants file and
//! counts the jobs; an embedded run syncs each tenant to its own file and
//! takes tenants added and removed while it runs; `pull --tenant` walks
//! one tenant's chain.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{BIN, tidemark, write_config};
use tidemark_mock::{MockConfig, MockServer};

async fn tenant_mock(records: usize) -> MockServer {
    let cfg = MockConfig {
        tenant_records: records,
        page_size: 5,
        ..MockConfig::default()
    };
    MockServer::start(cfg, SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("mock starts")
}

/// A source serving each tenant at `/t/{tenant}` with its token from
/// `secrets/{tenant}` beside the config, tenants from `tenants.yaml`.
fn config(base_url: &str, dir: &Path) -> String {
    format!(
        r#"sources:
  mock:
    base_url: "{base_url}/t/{{tenant}}"
    auth: {{ bearer: "${{file:{secrets}/{{tenant}}}}" }}
    tenants: {{ file: tenants.yaml }}
feeds:
  - name: tickets
    source: mock
    path: /api/v2/incremental/tickets/cursor.json
    records: /tickets
    pagination: {{ preset: zendesk_cursor, page_size: 5 }}
    start: {{ param: start_time, format: unix, from: "2024-01-01T00:00:00Z" }}
    key: /id
    version: /updated_at
    every: 1h
"#,
        secrets = dir.join("secrets").display()
    )
}

fn secret(dir: &Path, tenant: &str) {
    std::fs::create_dir_all(dir.join("secrets")).unwrap();
    std::fs::write(dir.join("secrets").join(tenant), format!("tok-{tenant}\n")).unwrap();
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_checks_the_tenants_file_and_counts_the_jobs() {
    let cfg = write_config("");
    std::fs::write(&cfg.path, config("http://127.0.0.1:9", cfg.dir.path())).unwrap();
    let tenants = cfg.dir.path().join("tenants.yaml");
    std::fs::write(&tenants, "- acme\n- globex\n- initech\n").unwrap();
    let run = tidemark(&["validate", "--config", cfg.path.to_str().unwrap()], &[]).await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("3 job(s)"), "{}", run.stdout);
    assert!(
        run.stdout.contains("source mock: 3 tenant(s)"),
        "{}",
        run.stdout
    );
    // Their secrets are not there: one warning per unreadable file.
    assert_eq!(
        run.stdout.matches("is not readable").count(),
        3,
        "{}",
        run.stdout
    );

    // A var that would name another tenant's token file is refused.
    std::fs::write(&tenants, "- acme\n- { name: sneaky, vars: { x: y } }\n").unwrap();
    let sneaky = config("http://127.0.0.1:9", cfg.dir.path()).replace(
        &format!("{}/{{tenant}}", cfg.dir.path().join("secrets").display()),
        &format!("{}/{{vars.x}}", cfg.dir.path().join("secrets").display()),
    );
    std::fs::write(&cfg.path, &sneaky).unwrap();
    std::fs::write(
        &tenants,
        "- { name: acme, vars: { x: acme } }\n- { name: sneaky, vars: { x: ../acme } }\n",
    )
    .unwrap();
    let run = tidemark(&["validate", "--config", cfg.path.to_str().unwrap()], &[]).await;
    assert_eq!(run.code, 2, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains(
            "tenant sneaky: the value of vars.x (\"../acme\") cannot stand in a secret reference"
        ),
        "{}",
        run.stderr
    );
    // A token filled from a var is a secret stored with the tenants: said so.
    let inline = config("http://127.0.0.1:9", cfg.dir.path()).replace(
        &format!(
            "\"${{file:{}/{{tenant}}}}\"",
            cfg.dir.path().join("secrets").display()
        ),
        "\"{vars.x}\"",
    );
    std::fs::write(&cfg.path, &inline).unwrap();
    std::fs::write(&tenants, "- { name: acme, vars: { x: tok } }\n").unwrap();
    let run = tidemark(&["validate", "--config", cfg.path.to_str().unwrap()], &[]).await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("holds a literal secret"),
        "{}",
        run.stdout
    );
    std::fs::write(&cfg.path, config("http://127.0.0.1:9", cfg.dir.path())).unwrap();

    std::fs::write(&tenants, "- acme\n- Globex\n- acme\n").unwrap();
    let run = tidemark(&["validate", "--config", cfg.path.to_str().unwrap()], &[]).await;
    assert_eq!(run.code, 2, "{}{}", run.stdout, run.stderr);
    let at = tenants.display().to_string();
    assert!(
        run.stderr
            .contains(&format!("{at}:2:3: [1]: tenant name \"Globex\"")),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains(&format!("{at}:3:3: [2]: tenant \"acme\" is listed twice")),
        "{}",
        run.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_run_syncs_each_tenant_and_takes_tenants_while_it_runs() {
    let mock = tenant_mock(12).await;
    let cfg = write_config("");
    let dir = cfg.dir.path();
    std::fs::write(&cfg.path, config(&mock.base_url(), dir)).unwrap();
    for t in ["acme", "globex", "newco"] {
        secret(dir, t);
    }
    std::fs::write(dir.join("tenants.yaml"), "- acme\n- globex\n").unwrap();
    let (state, out) = (dir.join("state"), dir.join("out"));
    let mut run = tokio::process::Command::new(BIN)
        .args([
            "run",
            "--config",
            cfg.path.to_str().unwrap(),
            "--tick",
            "100ms",
        ])
        .arg("--state-dir")
        .arg(&state)
        .arg("--out")
        .arg(&out)
        .env("TIDEMARK_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("tidemark run starts");
    let file = |t: &str| out.join(format!("tickets.{t}.jsonl"));
    wait_for("both tenants synced", || {
        lines(&file("acme")).len() == 12 && lines(&file("globex")).len() == 12
    })
    .await;
    // Each file holds its tenant's records only.
    for t in ["acme", "globex"] {
        assert!(lines(&file(t)).iter().all(|r| r["tenant"] == t), "{t}");
    }

    let sd = state.to_str().unwrap();
    let added = tidemark(&["tenants", "add", "mock", "newco", "--state-dir", sd], &[]).await;
    assert_eq!(added.code, 0, "{}{}", added.stdout, added.stderr);
    assert!(
        added.stdout.contains("tenant mock/newco: added"),
        "{}",
        added.stdout
    );
    wait_for("the added tenant synced", || {
        lines(&file("newco")).len() == 12
    })
    .await;

    let list = tidemark(
        &["tenants", "list", "mock", "--state-dir", sd, "--json"],
        &[],
    )
    .await;
    assert_eq!(list.code, 0, "{}", list.stderr);
    let report: serde_json::Value = serde_json::from_str(&list.stdout).expect("json");
    let origins: Vec<(String, String)> = report["active"]
        .as_array()
        .expect("active")
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap().into(),
                t["origin"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        origins,
        vec![
            ("acme".into(), "file".into()),
            ("globex".into(), "file".into()),
            ("newco".into(), "added".into())
        ]
    );
    let st = tidemark(
        &["status", "--state-dir", sd, "--tenant", "newco", "--json"],
        &[],
    )
    .await;
    assert_eq!(st.code, 0, "{}", st.stderr);
    let st: serde_json::Value = serde_json::from_str(&st.stdout).expect("json");
    assert_eq!(st["tenants"][0]["tenant"], "newco");
    assert_eq!(st["tenants"][0]["records"], 12);

    // A tenant of the file is removed in the file, not from here.
    let refused = tidemark(
        &["tenants", "remove", "mock", "acme", "--state-dir", sd],
        &[],
    )
    .await;
    assert_eq!(refused.code, 2, "{}{}", refused.stdout, refused.stderr);
    assert!(
        refused.stderr.contains("remove it there"),
        "{}",
        refused.stderr
    );
    let removed = tidemark(
        &["tenants", "remove", "mock", "newco", "--state-dir", sd],
        &[],
    )
    .await;
    assert_eq!(removed.code, 0, "{}{}", removed.stdout, removed.stderr);
    wait_for("newco's job is retired", || {
        let st = std::process::Command::new(BIN)
            .args(["status", "--state-dir", sd, "--tenant", "newco", "--json"])
            .output()
            .expect("status");
        let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap_or_default();
        // No summary: the tenant has no (registered) jobs left.
        st.status.success() && v["tenants"].as_array().is_none_or(|a| a.is_empty())
    })
    .await;

    // SIGTERM: the run stops cleanly.
    let pid = run.id().expect("pid") as i32;
    assert_eq!(sigterm(pid), 0);
    let status = tokio::time::timeout(Duration::from_secs(30), run.wait())
        .await
        .expect("the run stops")
        .expect("wait");
    assert!(status.success(), "{status:?}");
    mock.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_walks_one_tenants_chain() {
    let mock = tenant_mock(12).await;
    let cfg = write_config("");
    let dir = cfg.dir.path();
    std::fs::write(&cfg.path, config(&mock.base_url(), dir)).unwrap();
    secret(dir, "acme");
    std::fs::write(dir.join("tenants.yaml"), "- acme\n").unwrap();
    let run = common::pull(&cfg, "tickets", &["--tenant", "acme"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let records = run.records();
    assert_eq!(records.len(), 12);
    assert!(records.iter().all(|r| r["tenant"] == "acme"));
    let none = common::pull(&cfg, "tickets", &[]).await;
    assert_eq!(none.code, 2);
    assert!(none.stderr.contains("--tenant"), "{}", none.stderr);
    mock.shutdown().await;
}

/// SIGTERM to `pid`, through `kill(1)` (no libc binding needed).
fn sigterm(pid: i32) -> i32 {
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .map(|s| s.code().unwrap_or(-1))
        .unwrap_or(-1)
}
