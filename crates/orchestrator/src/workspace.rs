//! Agents' workspaces on the host: genesis's from its template, a child's from its parent's
//! code files overlaid with the files the parent supplied, and a dead agent's archived
//! read-only.
//!
//! A parent's workspace is hostile content (the agent wrote it). Copying from it never follows
//! a symlink (`O_NOFOLLOW`, and only regular files are read), reads at most the cap of each
//! file, and skips what does not fit; names are checked one component at a time.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Extensions of the files that count as an agent's code (copied to its children).
const CODE_EXTENSIONS: [&str; 9] = [
    "py", "txt", "md", "json", "toml", "yaml", "yml", "cfg", "ini",
];
/// Files the runtime writes, never copied.
const NOT_CODE: [&str; 1] = ["env.json"];
const MAX_DEPTH: usize = 4;
const MAX_NAME: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    #[error(
        "file name {0:?}: use 1 to 4 components of letters, digits, '.', '_' and '-', none starting with '.'"
    )]
    BadName(String),
    #[error("file {name:?} is {size} bytes; at most {max}")]
    TooBig {
        name: String,
        size: usize,
        max: usize,
    },
    #[error("at most {0} files")]
    TooMany(usize),
    #[error("the files come to {size} bytes; at most {max}")]
    TooMuch { size: u64, max: u64 },
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

/// Caps on what one workspace copy may hold.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub max_files: usize,
    pub max_file_bytes: usize,
    pub max_total_bytes: u64,
}

/// Checks a relative file name; returns it as a path.
pub fn sanitise(name: &str) -> Result<PathBuf, WorkspaceError> {
    let bad = || WorkspaceError::BadName(name.chars().take(200).collect());
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(bad());
    }
    let mut depth = 0;
    for part in name.split('/') {
        if part.is_empty()
            || part.starts_with('.')
            || !part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(bad());
        }
        depth += 1;
    }
    if depth > MAX_DEPTH || NOT_CODE.contains(&name) {
        return Err(bad());
    }
    Ok(PathBuf::from(name))
}

fn is_code(name: &Path) -> bool {
    name.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| CODE_EXTENSIONS.contains(&e))
        && !NOT_CODE.iter().any(|n| name == Path::new(n))
}

/// Reads at most `max` bytes of a regular file, never through a symlink; `None` when it is not
/// a regular file or is bigger than `max`.
fn read_capped(path: &Path, max: usize) -> Option<Vec<u8>> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc_o_nofollow())
        .open(path)
        .ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() || meta.len() > max as u64 {
        return None;
    }
    let mut contents = Vec::new();
    file.take(max as u64 + 1).read_to_end(&mut contents).ok()?;
    (contents.len() <= max).then_some(contents)
}

/// `O_NOFOLLOW` on Linux (the platform the runners need).
const fn libc_o_nofollow() -> i32 {
    0o400000
}

/// The code files under `dir` (relative name → contents), within `caps`: regular files with a
/// code extension, at most `MAX_DEPTH` deep, in name order until the caps are reached.
pub fn code_files(dir: &Path, caps: Caps) -> BTreeMap<String, Vec<u8>> {
    let mut found = BTreeMap::new();
    let mut total = 0u64;
    let mut stack = vec![(dir.to_owned(), PathBuf::new(), 0usize)];
    while let Some((here, relative, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&here) else {
            continue;
        };
        let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let name = relative.join(entry.file_name());
            let Some(name_str) = name.to_str() else {
                continue;
            };
            if sanitise(name_str).is_err() {
                continue;
            }
            // The entry itself, never what a symlink points at.
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() && depth + 1 < MAX_DEPTH {
                stack.push((entry.path(), name, depth + 1));
            } else if kind.is_file() && is_code(&name) {
                if found.len() >= caps.max_files {
                    return found;
                }
                if let Some(contents) = read_capped(&entry.path(), caps.max_file_bytes)
                    && total + contents.len() as u64 <= caps.max_total_bytes
                {
                    total += contents.len() as u64;
                    found.insert(name_str.to_owned(), contents);
                }
            }
        }
    }
    found
}

/// Checks supplied files against the caps and their names.
pub fn check_files(files: &BTreeMap<String, Vec<u8>>, caps: Caps) -> Result<(), WorkspaceError> {
    if files.len() > caps.max_files {
        return Err(WorkspaceError::TooMany(caps.max_files));
    }
    let mut total = 0u64;
    for (name, contents) in files {
        sanitise(name)?;
        if contents.len() > caps.max_file_bytes {
            return Err(WorkspaceError::TooBig {
                name: name.clone(),
                size: contents.len(),
                max: caps.max_file_bytes,
            });
        }
        total += contents.len() as u64;
    }
    if total > caps.max_total_bytes {
        return Err(WorkspaceError::TooMuch {
            size: total,
            max: caps.max_total_bytes,
        });
    }
    Ok(())
}

/// Creates `<root>/<agent>` (replacing a partial one from an earlier attempt) holding `files`.
/// Names must have passed [`sanitise`].
pub fn create(
    root: &Path,
    agent: &str,
    files: &BTreeMap<String, Vec<u8>>,
) -> Result<PathBuf, WorkspaceError> {
    std::fs::create_dir_all(root).map_err(io(root))?;
    let dir = root.join(agent);
    let staging = root.join(format!(".{agent}.new"));
    if std::fs::symlink_metadata(&staging).is_ok() {
        std::fs::remove_dir_all(&staging).map_err(io(&staging))?;
    }
    std::fs::create_dir(&staging).map_err(io(&staging))?;
    for (name, contents) in files {
        let relative = sanitise(name)?;
        let path = staging.join(&relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        std::fs::write(&path, contents).map_err(io(&path))?;
    }
    if std::fs::symlink_metadata(&dir).is_ok() {
        // Made by an earlier attempt of the same creation: replaced whole.
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
    }
    std::fs::rename(&staging, &dir).map_err(io(&dir))?;
    Ok(dir)
}

/// Moves `<root>/<agent>` to `<archive>/<agent>` and takes every write permission away (links
/// are moved, never followed). A missing workspace is already archived.
pub fn archive(root: &Path, archive: &Path, agent: &str) -> Result<(), WorkspaceError> {
    let dir = root.join(agent);
    if std::fs::symlink_metadata(&dir).is_err() {
        return Ok(());
    }
    std::fs::create_dir_all(archive).map_err(io(archive))?;
    let target = archive.join(agent);
    if std::fs::symlink_metadata(&target).is_ok() {
        std::fs::remove_dir_all(&target).map_err(io(&target))?;
    }
    std::fs::rename(&dir, &target).map_err(io(&target))?;
    let mut stack = vec![target];
    let mut dirs = Vec::new();
    while let Some(here) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&here) else {
            continue;
        };
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&here) {
                stack.extend(entries.filter_map(Result::ok).map(|e| e.path()));
            }
            dirs.push(here);
        } else if meta.is_file() {
            let _ = std::fs::set_permissions(&here, std::fs::Permissions::from_mode(0o444));
        }
    }
    // Directories last, so their contents could still be changed until then.
    for dir in dirs.into_iter().rev() {
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPS: Caps = Caps {
        max_files: 10,
        max_file_bytes: 100,
        max_total_bytes: 150,
    };

    #[test]
    fn names_are_plain_relative_paths() {
        for good in ["main.py", "lib/util.py", "a-b_c.1.txt", "a/b/c/d.py"] {
            assert!(sanitise(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x.py",
            "a/../b.py",
            ".hidden",
            "a/.git/x",
            "a b.py",
            "a/b/c/d/e.py",
            "env.json",
            "x\0.py",
            "a//",
            "./x.py",
        ] {
            assert!(sanitise(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn code_files_skip_links_big_files_and_runtime_files() {
        let parent = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret.py"), "secret").unwrap();
        let p = parent.path();
        std::fs::write(p.join("main.py"), "print(1)").unwrap();
        std::fs::write(p.join("env.json"), "{}").unwrap();
        std::fs::write(p.join("big.py"), vec![b'x'; 101]).unwrap();
        std::fs::write(p.join("data.bin"), "bin").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret.py"), p.join("link.py")).unwrap();
        std::os::unix::fs::symlink(outside.path(), p.join("dir")).unwrap();
        std::fs::create_dir(p.join("lib")).unwrap();
        std::fs::write(p.join("lib/util.py"), "u").unwrap();
        let files = code_files(p, CAPS);
        assert_eq!(
            files.keys().collect::<Vec<_>>(),
            ["lib/util.py", "main.py"],
            "{files:?}"
        );
    }

    #[test]
    fn supplied_files_are_checked_against_the_caps() {
        let files = |list: &[(&str, usize)]| {
            list.iter()
                .map(|(n, s)| ((*n).to_owned(), vec![b'x'; *s]))
                .collect::<BTreeMap<_, _>>()
        };
        assert!(check_files(&files(&[("a.py", 100)]), CAPS).is_ok());
        assert!(matches!(
            check_files(&files(&[("a.py", 101)]), CAPS),
            Err(WorkspaceError::TooBig { .. })
        ));
        assert!(matches!(
            check_files(&files(&[("a.py", 100), ("b.py", 51)]), CAPS),
            Err(WorkspaceError::TooMuch { .. })
        ));
        assert!(matches!(
            check_files(&files(&[("../a.py", 1)]), CAPS),
            Err(WorkspaceError::BadName(_))
        ));
    }

    #[test]
    fn an_archive_is_read_only_and_links_are_not_followed() {
        let root = tempfile::tempdir().unwrap();
        let archive_root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), "x").unwrap();
        let files = BTreeMap::from([("main.py".to_owned(), b"print(1)".to_vec())]);
        let dir = create(root.path(), "agent", &files).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.join("out")).unwrap();
        archive(root.path(), archive_root.path(), "agent").unwrap();
        assert!(!dir.exists());
        let archived = archive_root.path().join("agent");
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&archived.join("main.py")), 0o444);
        assert_eq!(mode(&archived), 0o555);
        // The link's target kept its permissions.
        assert_eq!(mode(outside.path()) & 0o200, 0o200);
        assert_eq!(mode(&outside.path().join("keep")) & 0o200, 0o200);
    }
}
