//! The last good dataplane config, on disk. Written atomically: a temp file
//! in the same directory, fsynced, renamed over the old one, then the
//! directory fsynced, so a crash leaves either the old or the new file,
//! never a torn one.

use std::io::Write;
use std::path::{Path, PathBuf};

use siphon_dataplane::Config;
use thiserror::Error;

const FILE: &str = "config.json";

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("state directory {dir}: {source}")]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a config: {message}")]
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

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// The persisted config, if any.
    pub fn load(&self) -> Result<Option<Config>, StoreError> {
        let path = self.path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StoreError::Io {
                    dir: self.dir.clone(),
                    source,
                })
            }
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                path,
                message: e.to_string(),
            })
    }

    /// Replaces the persisted config.
    pub fn save(&self, config: &Config) -> Result<(), StoreError> {
        let io = |source| StoreError::Io {
            dir: self.dir.clone(),
            source,
        };
        let bytes = serde_json::to_vec_pretty(config).map_err(|e| io(std::io::Error::other(e)))?;
        let tmp = self.dir.join(format!(".{FILE}.{}.tmp", std::process::id()));
        let result = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, self.path())?;
            std::fs::File::open(&self.dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map_err(io)
    }
}
