//! The records' way out of an embedded run: JSON Lines, one file per feed
//! (or stdout), each page written and fsynced before its cursor is
//! committed. It is the run's [`Downstream`], as RabbitMQ is a worker's.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;
use tidemark_bus::{BusError, Downstream, OutPage};
use tidemark_core::config::DeliveryPer;
use tidemark_core::jsonbytes::compact_json;

use crate::EmbeddedError;

/// Where records go.
#[derive(Debug, Clone)]
pub enum Out {
    /// One `<feed>.jsonl` file per feed in this directory.
    Dir(PathBuf),
    Stdout,
}

impl Out {
    /// `-` is stdout; anything else a directory.
    pub fn parse(s: &str) -> Out {
        if s == "-" {
            Out::Stdout
        } else {
            Out::Dir(PathBuf::from(s))
        }
    }
}

/// The files a sink has open, each with when it was last written.
#[derive(Default)]
struct OpenFiles {
    open: HashMap<String, (File, u64)>,
    clock: u64,
}

/// Files a sink keeps open at once.
const MAX_OPEN_FILES: usize = 256;

/// Writes confirmed pages as JSON Lines: one record per line (per-record
/// delivery) or one `{"records": [...]}` line per page (per-page delivery).
pub struct JsonlSink {
    out: Out,
    files: Mutex<OpenFiles>,
}

impl JsonlSink {
    pub fn new(out: Out) -> Result<Self, EmbeddedError> {
        if let Out::Dir(d) = &out {
            std::fs::create_dir_all(d).map_err(EmbeddedError::io("cannot create", d))?;
        }
        Ok(Self {
            out,
            files: Mutex::new(OpenFiles::default()),
        })
    }

    pub fn path(&self, feed: &str) -> Option<PathBuf> {
        self.file_of(feed, None)
    }

    /// `<feed>.jsonl`, or for a tenanted feed `<feed>.<tenant>.jsonl`.
    pub fn file_of(&self, feed: &str, tenant: Option<&str>) -> Option<PathBuf> {
        match (&self.out, tenant) {
            (Out::Dir(d), None) => Some(d.join(format!("{feed}.jsonl"))),
            (Out::Dir(d), Some(t)) => Some(d.join(format!("{feed}.{t}.jsonl"))),
            (Out::Stdout, _) => None,
        }
    }

    /// Write a page and make it durable before the caller commits its cursor.
    pub fn write_page(&self, page: &OutPage) -> Result<(), EmbeddedError> {
        let mut buf = Vec::with_capacity(page.records.iter().map(|r| r.body.len() + 1).sum());
        match page.per {
            DeliveryPer::Record => {
                for r in &page.records {
                    compact_json(&r.body, &mut buf);
                    buf.push(b'\n');
                }
            }
            DeliveryPer::Page => {
                compact_json(&page.page_body(), &mut buf);
                buf.push(b'\n');
            }
        }
        match &self.out {
            Out::Stdout => {
                let mut o = std::io::stdout().lock();
                o.write_all(&buf)
                    .and_then(|_| o.flush())
                    .map_err(EmbeddedError::io("cannot write", "stdout"))
            }
            Out::Dir(_) => {
                let path = self
                    .file_of(&page.feed, page.tenant.as_deref())
                    .unwrap_or_default();
                let key = path.display().to_string();
                let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
                let files = &mut *files;
                files.clock += 1;
                let clock = files.clock;
                // A thousand tenants are thousands of files: keep the most
                // recently written open (closing one loses nothing, each
                // page is synced).
                if files.open.len() >= MAX_OPEN_FILES && !files.open.contains_key(&key) {
                    let oldest = files
                        .open
                        .iter()
                        .min_by_key(|(_, (_, used))| *used)
                        .map(|(k, _)| k.clone());
                    if let Some(k) = oldest {
                        files.open.remove(&k);
                    }
                }
                let (f, used) = match files.open.entry(key.clone()) {
                    std::collections::hash_map::Entry::Occupied(f) => f.into_mut(),
                    std::collections::hash_map::Entry::Vacant(v) => v.insert((
                        open_repaired(&path).map_err(EmbeddedError::io("cannot open", &path))?,
                        clock,
                    )),
                };
                *used = clock;
                let written = f.write_all(&buf).and_then(|_| f.sync_data());
                if let Err(e) = written {
                    // Part of the page may be in the file: reopen (and so
                    // repair) it before the retry appends the page again.
                    files.open.remove(&key);
                    return Err(EmbeddedError::io("cannot write", path)(e));
                }
                Ok(())
            }
        }
    }
}

#[async_trait]
impl Downstream for JsonlSink {
    /// The page is on disk (fsynced) when this returns, as a broker's
    /// confirm says it is stored: only then does the worker commit.
    async fn publish_page(&self, page: &OutPage) -> Result<(), BusError> {
        self.write_page(page)
            .map_err(|e| BusError::Encode(e.to_string()))
    }
}

/// Open `path` for appending, first cutting off a last line that a crash
/// left without its newline (its page was never committed).
fn open_repaired(path: &Path) -> std::io::Result<File> {
    let existed = path.exists();
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)?;
    if !existed && let Some(dir) = path.parent() {
        // A new file's name must survive a power loss as its lines do.
        File::open(dir)?.sync_all()?;
    }
    let len = f.metadata()?.len();
    if len > 0 {
        // Find the last newline, reading backwards in blocks.
        let mut end = len;
        let mut keep = 0;
        let mut block = vec![0u8; 64 * 1024];
        'scan: while end > 0 {
            let start = end.saturating_sub(block.len() as u64);
            let n = (end - start) as usize;
            f.seek(SeekFrom::Start(start))?;
            f.read_exact(&mut block[..n])?;
            for i in (0..n).rev() {
                if block[i] == b'\n' {
                    keep = start + i as u64 + 1;
                    break 'scan;
                }
            }
            end = start;
        }
        if keep < len {
            tracing::warn!(file = %path.display(), bytes = len - keep, "removing a partial last line left by a crash");
            f.set_len(keep)?;
            f.sync_data()?;
        }
    }
    f.seek(SeekFrom::End(0))?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each tenant's records go to its own file; past the open-file bound
    /// the least recently written is closed, and nothing is lost.
    #[test]
    fn tenants_write_their_own_files_within_the_open_file_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sink = JsonlSink::new(Out::Dir(dir.path().to_path_buf())).expect("sink");
        let page = |tenant: &str, n: u64| OutPage {
            feed: "tickets".into(),
            tenant: Some(tenant.into()),
            partition: "all".into(),
            seq: n,
            per: DeliveryPer::Record,
            page_message_id: format!("{tenant}-{n}"),
            parent: None,
            records: vec![tidemark_bus::OutRecord {
                parent_key: None,
                key: n.to_string(),
                message_id: format!("{tenant}-{n}"),
                body: bytes::Bytes::from(format!("{{\"tenant\":\"{tenant}\",\"n\":{n}}}")),
            }],
        };
        let count = MAX_OPEN_FILES + 44;
        for round in 0..2 {
            for t in 0..count {
                sink.write_page(&page(&format!("t{t:03}"), round))
                    .expect("write");
            }
        }
        let open = sink.files.lock().expect("lock").open.len();
        assert!(open <= MAX_OPEN_FILES, "{open} files open");
        for t in [0, 1, count - 1] {
            let text = std::fs::read_to_string(dir.path().join(format!("tickets.t{t:03}.jsonl")))
                .expect("read");
            assert_eq!(text.lines().count(), 2, "t{t:03}: {text}");
            assert!(text.lines().all(|l| l.contains(&format!("t{t:03}"))));
        }
    }

    #[test]
    fn a_cut_off_last_line_is_removed_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f.jsonl");
        std::fs::write(&p, b"{\"a\":1}\n{\"a\":2}\n{\"a\":").expect("write");
        let mut f = open_repaired(&p).expect("open");
        f.write_all(b"{\"a\":3}\n").expect("append");
        drop(f);
        assert_eq!(
            std::fs::read_to_string(&p).expect("read"),
            "{\"a\":1}\n{\"a\":2}\n{\"a\":3}\n"
        );
        // A file of one partial line is emptied; a whole file is kept.
        std::fs::write(&p, b"{\"a\"").expect("write");
        drop(open_repaired(&p).expect("open"));
        assert_eq!(std::fs::read(&p).expect("read").len(), 0);
        std::fs::write(&p, b"{}\n").expect("write");
        drop(open_repaired(&p).expect("open"));
        assert_eq!(std::fs::read_to_string(&p).expect("read"), "{}\n");
    }
}
