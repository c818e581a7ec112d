//! The one way the tests and the benchmark run a child process (a
//! `tidemark` role, usually): its stderr is copied to a log file, start-up
//! waits for a ready line, and the child's own HTTP address is read off
//! that line. Children listen on port 0 and announce the port they got, so
//! no port is ever picked here.
//!
//! A child run under a wrapper (a profiler running the binary) leads its
//! own process group, so that stopping it reaches the wrapper's child too;
//! other children stay in ours, so that a Ctrl-C reaches them as well.
//! Dropping a [`Proc`] kills it. Also here: what Linux reports about a
//! process (CPU time, peak RSS).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::HarnessError;
use tidemark_telemetry::peak_rss_bytes;

/// How long a child may take to print its ready line.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// What to start: a program, its arguments and environment, where its log
/// goes and which stderr line says it is ready.
pub struct Spawn {
    program: PathBuf,
    name: String,
    dir: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    ready: String,
    wrapper: Vec<String>,
    stdout: Option<Stdio>,
}

impl Spawn {
    /// `program`, logging to `dir/<name>.log`; ready on its first stderr line.
    pub fn new(program: impl Into<PathBuf>, name: &str, dir: &Path) -> Self {
        Self {
            program: program.into(),
            name: name.to_string(),
            dir: dir.to_path_buf(),
            args: Vec::new(),
            env: Vec::new(),
            ready: String::new(),
            wrapper: Vec::new(),
            stdout: None,
        }
    }

    pub fn args<S: AsRef<str>>(mut self, args: &[S]) -> Self {
        self.args
            .extend(args.iter().map(|a| a.as_ref().to_string()));
        self
    }

    pub fn envs(mut self, env: &[(String, String)]) -> Self {
        self.env.extend(env.iter().cloned());
        self
    }

    /// Ready once a stderr line contains `marker`; the first `http://`
    /// address on that line becomes [`Proc::addr`].
    pub fn ready(mut self, marker: &str) -> Self {
        self.ready = marker.to_string();
        self
    }

    /// Run under `wrapper` (a profiler's command line, e.g. `perf record
    /// -g --`), which must run the program as its child. CPU and RSS
    /// readings are then the wrapper's.
    pub fn wrapper(mut self, wrapper: Vec<String>) -> Self {
        self.wrapper = wrapper;
        self
    }

    /// Where stdout goes (default: nowhere).
    pub fn stdout(mut self, stdout: impl Into<Stdio>) -> Self {
        self.stdout = Some(stdout.into());
        self
    }

    /// Start it and wait (up to 60 s) for its ready line. Blocks: from
    /// async code, call it on a blocking thread.
    pub fn start(self) -> Result<Proc, HarnessError> {
        let log = self.dir.join(format!("{}.log", self.name));
        let group = !self.wrapper.is_empty();
        let mut cmd = match self.wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(&self.program);
                c
            }
            None => Command::new(&self.program),
        };
        #[cfg(unix)]
        if group {
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        }
        let spawn_error = |source| HarnessError::Spawn {
            name: self.name.clone(),
            source,
        };
        let mut file = std::fs::File::create(&log).map_err(|source| HarnessError::Io {
            what: "cannot create",
            path: log.clone(),
            source,
        })?;
        let mut child = cmd
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(self.stdout.unwrap_or_else(Stdio::null))
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_error)?;
        let Some(stderr) = child.stderr.take() else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(spawn_error(std::io::Error::other("no stderr pipe")));
        };
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let marker = self.ready;
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(file, "{line}");
                if line.contains(&marker)
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(line);
                }
            }
        });
        let mut proc = Proc {
            name: self.name,
            child,
            group,
            log,
            addr: None,
        };
        // A child that exits first closes stderr, which ends the wait early.
        let Ok(line) = rx.recv_timeout(READY_WITHIN) else {
            proc.kill9();
            return Err(HarnessError::NotReady {
                log: tail(&proc.log, 50),
                name: proc.name.clone(),
            });
        };
        proc.addr = address(&line);
        Ok(proc)
    }
}

/// The first `http://host:port` on `line`, without a `/metrics` path or
/// trailing punctuation.
fn address(line: &str) -> Option<String> {
    let w = line.split_whitespace().find(|w| w.starts_with("http://"))?;
    let w = w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    Some(w.split("/metrics").next().unwrap_or(w).to_string())
}

/// A running child; killed (with its process group) when dropped.
pub struct Proc {
    pub name: String,
    child: Child,
    /// It leads its own process group (it runs under a wrapper).
    group: bool,
    pub log: PathBuf,
    /// The address it announced on its ready line (mock API base URL, or
    /// metrics endpoint), if any.
    pub addr: Option<String>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The announced address, which a role must have.
    pub fn url(&self) -> Result<&str, HarnessError> {
        self.addr.as_deref().ok_or_else(|| HarnessError::NoAddress {
            name: self.name.clone(),
            line: tail(&self.log, 1),
        })
    }

    /// The first `http://…` address on a log line containing `marker`.
    pub fn announced(&self, marker: &str) -> Option<String> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let line = text.lines().find(|l| l.contains(marker))?;
        let w = line.split_whitespace().find(|w| w.starts_with("http://"))?;
        Some(w.trim_end_matches('/').to_string())
    }

    /// Send `sig` (`TERM`, `STOP`, ...) to the process itself.
    pub fn signal(&self, sig: &str) {
        // std has no kill(2) and the workspace forbids unsafe: ask kill(1).
        let _ = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status();
    }

    /// Send `sig` to the process's own group (a wrapper and its child),
    /// or to the process when it has none.
    fn signal_group(&self, sig: &str) {
        if !self.group {
            return self.signal(sig);
        }
        let _ = Command::new("kill")
            .args([&format!("-{sig}"), "--", &format!("-{}", self.pid())])
            .stderr(Stdio::null())
            .status();
    }

    /// SIGKILL (to its group, if it leads one), and reap it.
    pub fn kill9(&mut self) {
        if self.group && matches!(self.child.try_wait(), Ok(None)) {
            self.signal_group("KILL");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait up to `within` for the exit status.
    pub fn term(&mut self, within: Duration) -> Option<ExitStatus> {
        self.signal("TERM");
        self.wait(within)
    }

    /// Wait up to `within` for the process to exit by itself.
    pub fn wait(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM (to its group, if it leads one), then wait up to `within`;
    /// SIGKILL after that.
    pub fn stop(mut self, within: Duration) {
        self.signal_group("TERM");
        if self.wait(within).is_none() {
            self.kill9();
        }
    }

    /// Ok while the process runs; its exit status and log tail once it died.
    pub fn check_alive(&mut self) -> Result<(), HarnessError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(HarnessError::Exited {
                name: self.name.clone(),
                status,
                log: tail(&self.log, 20),
            }),
            Err(source) => Err(HarnessError::Spawn {
                name: self.name.clone(),
                source,
            }),
        }
    }

    /// CPU time (user + system) the process has used so far.
    pub fn cpu(&self) -> Option<Duration> {
        cpu_time(self.pid())
    }

    /// CPU time its live threads have used, to the nanosecond (see
    /// [`thread_cpu_time`]): for short windows, where [`Proc::cpu`]'s
    /// 10 ms ticks round a quiet process down to nothing.
    pub fn thread_cpu(&self) -> Option<Duration> {
        thread_cpu_time(self.pid())
    }

    /// The process's peak resident set size so far.
    pub fn peak_rss_bytes(&self) -> Option<u64> {
        peak_rss_bytes(&format!("/proc/{}/status", self.pid()))
    }

    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }
}

impl Drop for Proc {
    /// A child not stopped (a failed test or run) dies, with its whole
    /// process group if it leads one, so that no wrapper's child outlives it.
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The last `lines` lines of a log file.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// User plus system CPU time of a process, all threads, from
/// `/proc/<pid>/stat` (fields 14 and 15, in USER_HZ ticks: 1/100 s on Linux).
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_ticks(&stat).map(|t| Duration::from_millis(t * 10))
}

/// CPU time of a process's live threads, summed from
/// `/proc/<pid>/task/*/schedstat` (its first field: nanoseconds on a CPU).
/// Threads that have exited are not counted, so over a window use it only
/// where threads live on (a role at rest).
pub fn thread_cpu_time(pid: u32) -> Option<Duration> {
    let mut ns: u64 = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
        ns += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(Duration::from_nanos(ns))
}

fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn cpu_ticks_are_read_after_a_command_name_with_spaces_and_parentheses() {
        let stat =
            "4242 (tokio (rt) w) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 37 0 0 20 0 9 0 100 0 0";
        assert_eq!(parse_cpu_ticks(stat), Some(287));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn this_process_has_a_cpu_time_and_a_peak_rss() {
        let me = std::process::id();
        assert!(cpu_time(me).is_some());
        assert!(peak_rss_bytes("/proc/self/status").is_some_and(|b| b > 1024 * 1024));
    }

    #[test]
    fn the_address_is_read_off_the_ready_line() {
        assert_eq!(
            address(
                "tidemark worker: metrics on http://127.0.0.1:4711/metrics, health on /healthz"
            )
            .as_deref(),
            Some("http://127.0.0.1:4711")
        );
        assert_eq!(
            address("mock API listening on http://127.0.0.1:99 (5 records)").as_deref(),
            Some("http://127.0.0.1:99")
        );
        assert_eq!(address("ready"), None);
    }

    #[test]
    fn a_child_that_never_gets_ready_is_reported_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let e = Spawn::new("sh", "quitter", dir.path())
            .args(&["-c", "echo starting >&2; exit 3"])
            .ready("never")
            .start()
            .err()
            .unwrap();
        let text = e.to_string();
        assert!(text.contains("quitter did not start"), "{text}");
        assert!(text.contains("starting"), "{text}");
    }

    #[test]
    fn a_ready_child_announces_its_address_and_stops_on_term() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Spawn::new("sh", "announcer", dir.path())
            .args(&[
                "-c",
                "echo 'listening on http://127.0.0.1:5/ now' >&2; exec sleep 30",
            ])
            .ready("listening on")
            .start()
            .unwrap();
        assert_eq!(p.url().unwrap(), "http://127.0.0.1:5");
        p.check_alive().unwrap();
        let status = p.term(Duration::from_secs(5)).expect("exits on SIGTERM");
        assert!(!status.success());
        assert!(matches!(p.check_alive(), Err(HarnessError::Exited { .. })));
    }
}
