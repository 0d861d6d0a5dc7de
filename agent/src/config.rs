//! The agent's own config file (TOML): who it is, where it listens, its TLS
//! material, where the dataplane and its state live, and where heartbeats
//! go.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

/// The controller-facing port (Octavia's amphora agent uses 9443 too).
pub const DEFAULT_PORT: u16 = 9443;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This amphora's id, as the controller knows it.
    pub amphora_id: String,
    /// The mutual-TLS API for the controller.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The same API without TLS, for operators on the node.
    #[serde(default = "default_local_socket")]
    pub local_socket: PathBuf,
    /// The dataplane's control socket.
    #[serde(default = "default_dataplane_socket")]
    pub dataplane_socket: PathBuf,
    /// Where the last good config is kept.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    pub tls: TlsFiles,
    #[serde(default)]
    pub heartbeat: Option<Heartbeat>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// PEM certificate chain the agent presents.
    pub cert: PathBuf,
    /// PEM private key of that certificate.
    pub key: PathBuf,
    /// PEM CA certificate(s) that controller client certificates must
    /// chain to.
    pub client_ca: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// Health-manager addresses, each sent every heartbeat.
    pub destinations: Vec<SocketAddr>,
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    /// File holding the shared HMAC key.
    pub key_file: PathBuf,
}

impl Heartbeat {
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms.max(10))
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0u16; 8], DEFAULT_PORT))
}
fn default_local_socket() -> PathBuf {
    PathBuf::from("/run/siphon/agent.sock")
}
fn default_dataplane_socket() -> PathBuf {
    PathBuf::from(siphon_dataplane::api::DEFAULT_SOCKET)
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/siphon-agent")
}
fn default_interval_ms() -> u64 {
    1000
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {field}: {problem}")]
    Invalid {
        path: PathBuf,
        field: &'static str,
        problem: String,
    },
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: AgentConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let invalid = |field, problem: &str| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            problem: problem.to_owned(),
        };
        if config.amphora_id.trim().is_empty() {
            return Err(invalid("amphora_id", "must not be empty"));
        }
        if let Some(hb) = &config.heartbeat {
            if hb.destinations.is_empty() {
                return Err(invalid(
                    "heartbeat.destinations",
                    "list at least one address",
                ));
            }
            if hb.interval_ms < 10 {
                return Err(invalid("heartbeat.interval_ms", "must be at least 10"));
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packaged_example_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/agent.toml.example");
        let c = AgentConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.listen.port(), DEFAULT_PORT);
        assert_eq!(c.heartbeat.map(|h| h.destinations.len()), Some(2));
    }

    #[test]
    fn problems_name_the_field() {
        let dir = std::env::temp_dir().join(format!("siphon-agent-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let path = dir.join("a.toml");
        let text = "amphora_id = \"\"\n[tls]\ncert = \"c\"\nkey = \"k\"\nclient_ca = \"ca\"\n";
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
        let e = AgentConfig::load(&path)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("amphora_id"), "{e}");
        std::fs::write(
            &path,
            text.replace("amphora_id = \"\"", "amphora_id = \"a\"\nlisten = \"nope\""),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let e = AgentConfig::load(&path)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("listen"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
