//! Where the agent keeps its [`AgentState`]: a file replaced atomically (write, fsync, rename,
//! fsync the directory), or memory for large simulated fleets.
//!
//! The state holds the device secret: on Unix the file is readable by its owner only (0600)
//! and a state directory the store creates is private (0700).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use schemas::agent::AgentState;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid agent state: {detail}")]
    Corrupt { path: PathBuf, detail: String },
}

/// Durable storage of the agent's state.
pub trait StateStore: Send + Sync + 'static {
    fn load(&mut self) -> Result<Option<AgentState>, StateError>;
    fn save(&mut self, state: &AgentState) -> Result<(), StateError>;
}

/// One file, `agent-state.msgpack`, in a directory of its own.
#[derive(Debug)]
pub struct FileStateStore {
    dir: PathBuf,
}

impl FileStateStore {
    pub fn new(dir: impl Into<PathBuf>) -> FileStateStore {
        FileStateStore { dir: dir.into() }
    }

    fn path(&self) -> PathBuf {
        self.dir.join("agent-state.msgpack")
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_owned(),
        source,
    }
}

impl StateStore for FileStateStore {
    fn load(&mut self) -> Result<Option<AgentState>, StateError> {
        let path = self.path();
        match std::fs::read(&path) {
            Ok(bytes) => schemas::codec::decode_limited(&bytes, 64 * 1024 * 1024)
                .map(Some)
                .map_err(|e| StateError::Corrupt {
                    path,
                    detail: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    fn save(&mut self, state: &AgentState) -> Result<(), StateError> {
        let path = self.path();
        tls::create_private_dir(&self.dir).map_err(io_err(&self.dir))?;
        let bytes = schemas::encode(state).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        let tmp = path.with_extension("tmp");
        let mut file = tls::create_private_file(&tmp).map_err(io_err(&tmp))?;
        file.write_all(&bytes).map_err(io_err(&tmp))?;
        file.sync_data().map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir))?;
        Ok(())
    }
}

/// State in memory, shared between clones: a test or the simulator can "restart" an agent by
/// starting a new one on a clone.
#[derive(Debug, Clone, Default)]
pub struct MemoryStateStore {
    state: Arc<Mutex<Option<AgentState>>>,
}

impl MemoryStateStore {
    /// A store holding `state`, as a device whose disk holds it would start.
    pub fn from_state(state: AgentState) -> MemoryStateStore {
        MemoryStateStore {
            state: Arc::new(Mutex::new(Some(state))),
        }
    }

    /// The state as last saved.
    pub fn snapshot(&self) -> Option<AgentState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl StateStore for MemoryStateStore {
    fn load(&mut self) -> Result<Option<AgentState>, StateError> {
        Ok(self.state.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }

    fn save(&mut self, state: &AgentState) -> Result<(), StateError> {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = Some(state.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::FeedSeq;

    #[test]
    fn file_store_round_trips_and_reports_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = FileStateStore::new(dir.path());
        assert!(store.load().unwrap().is_none());
        let state = AgentState {
            cursor: FeedSeq(42),
            ..AgentState::default()
        };
        store.save(&state).unwrap();
        assert_eq!(store.load().unwrap(), Some(state));
        std::fs::write(dir.path().join("agent-state.msgpack"), b"\xc1garbage").unwrap();
        assert!(matches!(store.load(), Err(StateError::Corrupt { .. })));
    }

    #[cfg(unix)]
    #[test]
    fn the_state_file_and_a_new_state_dir_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("printer-1");
        // A file an older version left readable by everyone.
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(dir.join("agent-state.tmp"), b"old").unwrap();
        std::fs::set_permissions(
            dir.join("agent-state.tmp"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        FileStateStore::new(&dir)
            .save(&AgentState::default())
            .unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.join("agent-state.msgpack")), 0o600);

        let fresh = parent.path().join("a/b");
        FileStateStore::new(&fresh)
            .save(&AgentState::default())
            .unwrap();
        assert_eq!(mode(&fresh), 0o700);
        assert_eq!(mode(&parent.path().join("a")), 0o700);
        assert_eq!(mode(&fresh.join("agent-state.msgpack")), 0o600);
    }
}
