//! The dataplane's control socket: where it lives, and binding a Unix
//! socket the way both the dataplane's control API and the agent's local
//! API need it.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Where the dataplane's control socket lives unless `--socket` says
/// otherwise.
pub const DEFAULT_SOCKET: &str = "/run/siphon/dataplane.sock";

#[derive(Debug, Error)]
pub enum SocketError {
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {0} is in use by a running process")]
    InUse(PathBuf),
    #[error("control socket {0} exists and is not a socket; not replacing it")]
    NotASocket(PathBuf),
}

/// Binds a Unix socket with `mode` (inside a tokio runtime): a leftover
/// socket of a process that is gone is replaced; a live one, or a file
/// that is not a socket, is an error.
pub fn bind_unix(path: &Path, mode: u32) -> Result<tokio::net::UnixListener, SocketError> {
    let err = |source| SocketError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(SocketError::NotASocket(path.to_owned()));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(SocketError::InUse(path.to_owned()));
        }
        // A leftover of a process that is gone.
        std::fs::remove_file(path).map_err(err)?;
    }
    // Created with no access for group and others, then given `mode`: no
    // window in which anyone else could connect. The umask is
    // process-wide; this runs at start, before any worker thread exists.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = tokio::net::UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = listener.map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    Ok(listener)
}
