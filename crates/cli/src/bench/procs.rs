//! The benchmark's child processes (`tidemark` roles started from this
//! binary) and what Linux reports about them: CPU time and peak RSS.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::exit::Failure;

/// A `tidemark` child whose stderr goes to a log file; killed when dropped.
pub struct Role {
    pub name: String,
    child: tokio::process::Child,
    pub log: PathBuf,
    /// The `http://host:port` it announced on its ready line.
    pub addr: String,
}

impl Role {
    /// Start `tidemark args...` and wait (up to 60 s) for a stderr line
    /// containing `ready`; the first `http://` address on it becomes `addr`.
    pub async fn spawn(
        name: &str,
        args: &[String],
        env: &[(String, String)],
        dir: &Path,
        ready: &str,
    ) -> Result<Role, Failure> {
        Self::spawn_wrapped(name, &[], args, env, dir, ready).await
    }

    /// [`Role::spawn`] under `wrapper` (a profiler's command line, e.g.
    /// `perf record -g --`), which must run the binary as its child. CPU and
    /// RSS readings are then the wrapper's.
    pub async fn spawn_wrapped(
        name: &str,
        wrapper: &[String],
        args: &[String],
        env: &[(String, String)],
        dir: &Path,
        ready: &str,
    ) -> Result<Role, Failure> {
        let exe = std::env::current_exe().map_err(|e| Failure::runtime(e.to_string()))?;
        let log = dir.join(format!("{name}.log"));
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = tokio::process::Command::new(program);
                c.args(rest).arg(&exe);
                c
            }
            None => tokio::process::Command::new(&exe),
        };
        // Its own process group, so that a stop reaches a wrapper's child too.
        #[cfg(unix)]
        cmd.process_group(0);
        let mut child = cmd
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Failure::runtime(format!("cannot start {name}: {e}")))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| Failure::runtime(format!("{name}: no stderr")))?;
        let mut file = tokio::fs::File::create(&log)
            .await
            .map_err(|e| Failure::runtime(format!("{}: {e}", log.display())))?;
        let (tx, rx) = tokio::sync::oneshot::channel::<String>();
        let marker = ready.to_string();
        tokio::spawn(async move {
            let mut tx = Some(tx);
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = file.write_all(line.as_bytes()).await;
                let _ = file.write_all(b"\n").await;
                if line.contains(&marker)
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(line);
                }
            }
            let _ = file.flush().await;
        });
        let line = match tokio::time::timeout(Duration::from_secs(60), rx).await {
            Ok(Ok(line)) => line,
            _ => {
                let _ = child.kill().await;
                return Err(Failure::runtime(format!(
                    "{name} did not start:\n{}",
                    tail(&log, 20)
                )));
            }
        };
        let addr = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .map(|w| {
                let w = w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
                w.split("/metrics").next().unwrap_or(w).to_string()
            })
            .ok_or_else(|| Failure::runtime(format!("{name} announced no address: {line}")))?;
        Ok(Role {
            name: name.into(),
            child,
            log,
            addr,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Ok while the process runs; its exit status and log tail once it died.
    pub fn check_alive(&mut self) -> Result<(), Failure> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(Failure::runtime(format!(
                "{} exited ({status}) during the run:\n{}",
                self.name,
                tail(&self.log, 20)
            ))),
            Err(e) => Err(Failure::runtime(format!("{}: {e}", self.name))),
        }
    }

    /// CPU time (user + system) the process has used so far.
    pub fn cpu(&self) -> Option<Duration> {
        cpu_time(self.pid()?)
    }

    /// The process's peak resident set size so far.
    pub fn peak_rss_bytes(&self) -> Option<u64> {
        peak_rss_bytes(&format!("/proc/{}/status", self.pid()?))
    }

    /// SIGTERM to its process group, then wait up to `within`; SIGKILL to
    /// the group after that.
    pub async fn stop(mut self, within: Duration) {
        let Some(pid) = self.pid() else {
            return;
        };
        let group = format!("-{pid}");
        let signal = async |sig: &str| {
            let _ = tokio::process::Command::new("kill")
                .args([sig, "--", &group])
                .status()
                .await;
        };
        signal("-TERM").await;
        if tokio::time::timeout(within, self.child.wait())
            .await
            .is_err()
        {
            signal("-KILL").await;
            let _ = self.child.kill().await;
        }
    }
}

impl Drop for Role {
    /// A role not stopped (a failed run) dies with its whole process group,
    /// so that no wrapper's child outlives the benchmark.
    fn drop(&mut self) {
        if let (Some(pid), Ok(None)) = (self.pid(), self.child.try_wait()) {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
        }
    }
}

/// The last `lines` lines of a log file.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `VmHWM` of a `/proc/<pid>/status` file (Linux; None elsewhere).
pub fn peak_rss_bytes(status_file: &str) -> Option<u64> {
    let status = std::fs::read_to_string(status_file).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// User plus system CPU time of a process, all threads, from
/// `/proc/<pid>/stat` (fields 14 and 15, in USER_HZ ticks: 1/100 s on Linux).
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_ticks(&stat).map(|t| Duration::from_millis(t * 10))
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
}
