//! An agent's workspace on the runner's host, handled as hostile: the agent wrote everything in
//! it. The runner touches exactly two things there, the directory itself (mounted, and owned
//! by the agent's uid) and `env.json` (replaced atomically); it never reads, lists, copies or
//! follows anything the agent made. So symlinks pointing out, huge files and odd names cannot
//! make the runner read or write anything outside the workspace root.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::sandbox::AGENT_UID;

#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    #[error("the workspace {0} does not exist")]
    Missing(PathBuf),
    #[error("the workspace {0} is not a directory of its own (a symlink or a file)")]
    NotADirectory(PathBuf),
    #[error("workspace {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WorkspaceError + '_ {
    move |error| WorkspaceError::Io {
        path: path.to_owned(),
        error,
    }
}

/// `<root>/<agent_id>`, checked to be a real directory (not a symlink) and given to the agent's
/// uid. `agent_id` must already be a validated id (a UUID): it is one path component.
pub fn prepare(root: &Path, agent_id: &str) -> Result<PathBuf, WorkspaceError> {
    debug_assert!(!agent_id.contains('/') && agent_id != ".." && !agent_id.is_empty());
    let root = std::fs::canonicalize(root).map_err(io(root))?;
    let dir = root.join(agent_id);
    let meta = match std::fs::symlink_metadata(&dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(WorkspaceError::Missing(dir));
        }
        Err(e) => return Err(io(&dir)(e)),
    };
    if !meta.file_type().is_dir() {
        return Err(WorkspaceError::NotADirectory(dir));
    }
    if meta.uid() != AGENT_UID || meta.gid() != AGENT_UID {
        // The directory itself only: its contents are the agent's already, or the
        // orchestrator's (readable by the agent).
        std::os::unix::fs::lchown(&dir, Some(AGENT_UID), Some(AGENT_UID)).map_err(io(&dir))?;
    }
    Ok(dir)
}

/// Replaces `<dir>/<name>` with `contents`, owned by the agent and readable by it only. A new
/// file is created under a fresh name (`O_CREAT|O_EXCL` never follows a symlink) and renamed
/// over the old name, which replaces whatever was there (a symlink included) without touching
/// what it pointed at.
pub fn replace_file(dir: &Path, name: &str, contents: &[u8]) -> Result<(), WorkspaceError> {
    debug_assert!(!name.contains('/'));
    let target = dir.join(name);
    let temp = dir.join(format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple()));
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)?;
        file.write_all(contents)?;
        file.sync_data()?;
        std::os::unix::fs::fchown(&file, Some(AGENT_UID), Some(AGENT_UID))?;
        // A directory named like the target cannot be renamed over: remove it (never
        // following links: only an empty directory can go).
        if std::fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
            std::fs::remove_dir(&target)?;
        }
        std::fs::rename(&temp, &target)
    };
    write().map_err(|error| {
        let _ = std::fs::remove_file(&temp);
        io(&target)(error)
    })
}
