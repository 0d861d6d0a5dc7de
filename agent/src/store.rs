//! The agent's state on disk, in its state directory: the last good
//! dataplane config (`config.json`), the heartbeat key the controller
//! pushed (`heartbeat-key.json`), and the VIPs this agent added
//! (`vips.json`).
//!
//! Every file is written atomically: a temp file in the same directory
//! (mode 0600), fsynced, renamed over the old one, then the directory
//! fsynced, so a crash leaves either the old or the new file, never a torn
//! one. A file that does not parse at start is moved aside as
//! `<name>.corrupt` (bytes kept for a human) and the agent goes on without
//! it: the controller pushes again.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;
use siphon_proto::Config;
use thiserror::Error;

pub const CONFIG_FILE: &str = "config.json";
pub const HEARTBEAT_KEY_FILE: &str = "heartbeat-key.json";
pub const VIPS_FILE: &str = "vips.json";
/// The BGP peering the controller set (`null`: none).
pub const BGP_FILE: &str = "bgp.json";

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("state directory {dir}: {source}")]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} does not parse: {message}")]
    Corrupt { path: PathBuf, message: String },
}

#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Opens (creating) the state directory.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            dir: dir.to_owned(),
            source,
        })?;
        Ok(Store {
            dir: dir.to_owned(),
        })
    }

    /// Where the persisted config is.
    pub fn path(&self) -> PathBuf {
        self.dir.join(CONFIG_FILE)
    }

    /// The file `name` in the state directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The persisted config, if any; a corrupt one is an error.
    pub fn load(&self) -> Result<Option<Config>, StoreError> {
        self.read(CONFIG_FILE)
    }

    /// Replaces the persisted config.
    pub fn save(&self, config: &Config) -> Result<(), StoreError> {
        self.write(CONFIG_FILE, config)
    }

    /// `name` parsed as JSON; `None` when there is no such file.
    pub fn read<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, StoreError> {
        let path = self.file(name);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StoreError::File { path, source }),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                path,
                message: e.to_string(),
            })
    }

    /// Like [`Store::read`], but a file that does not parse is logged,
    /// moved aside as `<name>.corrupt` and reported as absent. Only a file
    /// that cannot be read (or moved) is an error.
    pub fn read_or_set_aside<T: DeserializeOwned>(
        &self,
        name: &str,
    ) -> Result<Option<T>, StoreError> {
        match self.read(name) {
            Err(StoreError::Corrupt { path, message }) => {
                let aside = self.file(&format!("{name}.corrupt"));
                std::fs::rename(&path, &aside).map_err(|source| StoreError::File {
                    path: path.clone(),
                    source,
                })?;
                tracing::error!(
                    file = %path.display(),
                    kept_as = %aside.display(),
                    reason = %message,
                    "state file does not parse: moved aside, starting without it"
                );
                Ok(None)
            }
            other => other,
        }
    }

    /// Replaces `name` with `value` as JSON, atomically, mode 0600.
    pub fn write<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(value).map_err(|e| StoreError::File {
            path: self.file(name),
            source: std::io::Error::other(e),
        })?;
        write_atomic(&self.file(name), &bytes).map_err(|source| StoreError::File {
            path: self.file(name),
            source,
        })
    }
}

/// Temp file beside `path` (mode 0600), fsync, rename, fsync the
/// directory: a crash leaves the old or the new file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_all_atomic(&[(path, bytes)])
}

fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Several files replaced together: every temp file is written and
/// fsynced before the first rename, so a failure to write any of them
/// (a full disk, a read-only directory) leaves all the old files in place.
/// Only a crash between the renames can mix old and new.
pub fn write_all_atomic(files: &[(&Path, &[u8])]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp_of = |path: &Path| {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        dir_of(path).join(format!(".{name}.{}.tmp", std::process::id()))
    };
    let context = |path: &Path, e: std::io::Error| {
        std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
    };
    let mut written = Vec::new();
    let result = (|| {
        for (path, bytes) in files {
            let tmp = tmp_of(path);
            written.push(tmp.clone());
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| context(path, e))?;
            f.write_all(bytes).map_err(|e| context(path, e))?;
            f.sync_all().map_err(|e| context(path, e))?;
        }
        for (path, _) in files {
            std::fs::rename(tmp_of(path), path).map_err(|e| context(path, e))?;
        }
        for (path, _) in files {
            std::fs::File::open(dir_of(path))
                .and_then(|d| d.sync_all())
                .map_err(|e| context(path, e))?;
        }
        Ok(())
    })();
    if result.is_err() {
        for tmp in written {
            let _ = std::fs::remove_file(tmp);
        }
    }
    result
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail by panicking
    use super::*;

    #[test]
    fn corrupt_files_are_set_aside_with_their_bytes() {
        let dir = std::env::temp_dir().join(format!("siphon-agent-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir).unwrap();
        assert!(store.read::<u32>("x.json").unwrap().is_none());
        store.write("x.json", &7u32).unwrap();
        assert_eq!(store.read::<u32>("x.json").unwrap(), Some(7));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(store.file("x.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(store.file("x.json"), b"{garbage").unwrap();
        assert!(matches!(
            store.read::<u32>("x.json"),
            Err(StoreError::Corrupt { .. })
        ));
        assert_eq!(store.read_or_set_aside::<u32>("x.json").unwrap(), None);
        assert!(!store.file("x.json").exists());
        assert_eq!(
            std::fs::read(store.file("x.json.corrupt")).unwrap(),
            b"{garbage"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn files_written_together_are_all_replaced_or_none() {
        let dir = std::env::temp_dir().join(format!("siphon-agent-pair-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a.pem"), dir.join("b.pem"));
        write_all_atomic(&[(&a, b"a1"), (&b, b"b1")]).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), b"a1");
        assert_eq!(std::fs::read(&b).unwrap(), b"b1");
        // The second cannot be written: the first stays old, no temp left.
        let nowhere = dir.join("missing/c.pem");
        let e = write_all_atomic(&[(&a, b"a2"), (&nowhere, b"c2")]).unwrap_err();
        assert!(e.to_string().contains("missing/c.pem"), "{e}");
        assert_eq!(std::fs::read(&a).unwrap(), b"a1");
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(left.len(), 2, "{left:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
