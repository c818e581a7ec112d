//! Peak resident set size as Linux reports it, for `pull --stats-json`.
//! (The benchmark reads its children's the same way, in tidemark-harness,
//! which the release binary does not link.)

/// `VmHWM` of a `/proc/<pid>/status` file (Linux; None elsewhere).
pub fn peak_rss_bytes(status_file: &str) -> Option<u64> {
    let status = std::fs::read_to_string(status_file).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
