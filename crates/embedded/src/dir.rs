//! A state directory: `state.json` (the embedded store), `lock` (held by the
//! one process that owns the directory, with its pid for messages) and
//! `requests/`, where operator commands leave their actions for the run
//! that holds the lock, and read its answers.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidemark_coordinator::ops::{self, Action, ActionReport, OpError, Selection, TenantRemoval};
use tidemark_core::tenant::Tenant;
use tidemark_state::EmbeddedStore;

use crate::EmbeddedError;

/// The files of a state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub dir: PathBuf,
}

impl StateDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    pub fn state_file(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    fn lock_file(&self) -> PathBuf {
        self.dir.join("lock")
    }
    fn requests(&self) -> PathBuf {
        self.dir.join("requests")
    }

    fn no_state(&self) -> EmbeddedError {
        EmbeddedError::NoState {
            dir: self.dir.clone(),
            file: self.state_file(),
        }
    }

    /// Read the state as it was last written (consistent: the file is replaced atomically).
    pub fn read(&self) -> Result<EmbeddedStore, EmbeddedError> {
        if !self.state_file().exists() {
            return Err(self.no_state());
        }
        Ok(EmbeddedStore::open(&self.state_file())?)
    }

    /// Take the directory for this process: create it, lock it, open the
    /// store. `None` when another process holds it.
    pub fn try_take(&self) -> Result<Option<Owned>, EmbeddedError> {
        std::fs::create_dir_all(self.requests())
            .map_err(EmbeddedError::io("cannot create", &self.dir))?;
        let mut lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(self.lock_file())
            .map_err(EmbeddedError::io(
                "cannot open the lock file",
                self.lock_file(),
            ))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(EmbeddedError::io(
                    "cannot lock the state directory",
                    &self.dir,
                )(e));
            }
        }
        // The pid is for the messages of other processes only.
        let _ = lock.set_len(0);
        let _ = write!(lock, "{}", std::process::id());
        let store = EmbeddedStore::open(&self.state_file())?;
        Ok(Some(Owned {
            dir: self.clone(),
            store: Arc::new(store),
            _lock: lock,
        }))
    }

    /// This process's hold on the directory, or [`EmbeddedError::Held`].
    pub fn take(&self) -> Result<Owned, EmbeddedError> {
        self.try_take()?
            .ok_or_else(|| EmbeddedError::Held(self.dir.clone()))
    }

    /// The pid written by the process that holds the lock (for messages).
    fn holder(&self) -> String {
        std::fs::read_to_string(self.lock_file())
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    }

    /// Apply an operator action: directly when no run holds the directory,
    /// else through the running process.
    pub async fn apply(
        &self,
        selection: &Selection,
        action: &Action,
    ) -> Result<ActionReport, EmbeddedError> {
        self.run(Request::Act {
            selection: selection.clone(),
            action: action.clone(),
        })
        .await
    }

    /// Add a tenant (`tidemark tenants add --state-dir`); true when new.
    pub async fn add_tenant(&self, source: &str, tenant: &Tenant) -> Result<bool, EmbeddedError> {
        self.run(Request::AddTenant {
            source: source.into(),
            tenant: tenant.clone(),
        })
        .await
    }

    /// Remove a tenant (`tidemark tenants remove --state-dir`).
    pub async fn remove_tenant(
        &self,
        source: &str,
        name: &str,
        purge: bool,
    ) -> Result<TenantRemoval, EmbeddedError> {
        self.run(Request::RemoveTenant {
            source: source.into(),
            name: name.into(),
            purge,
        })
        .await
    }

    /// Carry `req` out here, or have the run that holds the directory do it.
    async fn run<T: serde::de::DeserializeOwned>(&self, req: Request) -> Result<T, EmbeddedError> {
        if !self.state_file().exists() {
            return Err(self.no_state());
        }
        let value = match self.try_take()? {
            Some(owned) => req.carry_out(&owned.store).await?,
            None => self.ask_runner(&req).await?,
        };
        serde_json::from_value(value).map_err(EmbeddedError::BadReply)
    }

    async fn ask_runner(&self, req: &Request) -> Result<serde_json::Value, EmbeddedError> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let dir = self.requests();
        let body = serde_json::to_vec(req).map_err(EmbeddedError::Encode)?;
        let request = dir.join(format!("{id}.json"));
        let reply = dir.join(format!("{id}.reply"));
        write_atomic(&request, &body)?;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            // The holder may have been another command, now done: then apply it here.
            if request.exists()
                && let Some(owned) = self.try_take()?
            {
                let _ = std::fs::remove_file(&request);
                return Ok(req.carry_out(&owned.store).await?);
            }
            let Ok(bytes) = std::fs::read(&reply) else {
                continue;
            };
            let _ = std::fs::remove_file(&reply);
            return match serde_json::from_slice(&bytes).map_err(EmbeddedError::BadReply)? {
                Reply::Ok(report) => Ok(report),
                Reply::Usage(e) => Err(EmbeddedError::Refused(e)),
                Reply::Error(e) => Err(EmbeddedError::Failed(e)),
            };
        }
        let _ = std::fs::remove_file(&request);
        Err(EmbeddedError::NoAnswer {
            dir: self.dir.clone(),
            pid: self.holder(),
        })
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), EmbeddedError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(EmbeddedError::io("cannot write", path))
}

/// What an operator command asks of the state directory's run.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
enum Request {
    Act {
        selection: Selection,
        action: Action,
    },
    AddTenant {
        source: String,
        tenant: Tenant,
    },
    RemoveTenant {
        source: String,
        name: String,
        purge: bool,
    },
}

impl Request {
    /// Carry the request out on `store`; the answer as JSON.
    async fn carry_out(&self, store: &EmbeddedStore) -> Result<serde_json::Value, OpError> {
        let json = |v: Result<serde_json::Value, serde_json::Error>| {
            v.map_err(|e| OpError::Invalid(format!("cannot encode the answer: {e}")))
        };
        match self {
            Request::Act { selection, action } => json(serde_json::to_value(
                ops::apply(store, selection, action).await?,
            )),
            Request::AddTenant { source, tenant } => json(serde_json::to_value(
                ops::add_tenant(store, source, tenant).await?,
            )),
            Request::RemoveTenant {
                source,
                name,
                purge,
            } => json(serde_json::to_value(
                ops::remove_tenant(store, source, name, *purge).await?,
            )),
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Reply {
    Ok(serde_json::Value),
    Usage(String),
    Error(String),
}

/// A state directory held by this process.
pub struct Owned {
    pub dir: StateDir,
    pub store: Arc<EmbeddedStore>,
    _lock: File,
}

impl Owned {
    /// Forget requests nobody answered (their command gave up or was
    /// killed): a run must not apply them, perhaps hours later.
    pub(crate) fn clear_requests(&self) {
        if let Ok(entries) = std::fs::read_dir(self.dir.requests()) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Answer the requests other processes left in `D/requests/`.
    pub(crate) async fn serve_requests(&self) {
        let Ok(entries) = std::fs::read_dir(self.dir.requests()) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let reply = match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Request>(&b).map_err(|e| e.to_string()))
            {
                Err(e) => Reply::Usage(format!("unreadable request: {e}")),
                Ok(req) => match req.carry_out(&self.store).await {
                    Ok(r) => Reply::Ok(r),
                    Err(e) if e.is_usage() => Reply::Usage(e.to_string()),
                    Err(e) => Reply::Error(e.to_string()),
                },
            };
            let _ = std::fs::remove_file(&path);
            if let Ok(bytes) = serde_json::to_vec(&reply)
                && let Err(e) = write_atomic(&path.with_extension("reply"), &bytes)
            {
                tracing::warn!(error = %e, "cannot answer a control request");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn one_process_owns_a_state_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sd = StateDir::new(dir.path());
        let first = sd.try_take().expect("take");
        assert!(first.is_some());
        assert!(sd.try_take().expect("take again").is_none());
        assert!(matches!(sd.take(), Err(EmbeddedError::Held(_))));
        drop(first);
        assert!(sd.try_take().expect("take after release").is_some());
    }
}
