//! The agent's own config file (TOML): who it is, where it listens, its TLS
//! material, where the dataplane and its state live, where heartbeats go,
//! and the limits of its HTTPS server.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

/// The controller-facing port (Octavia's amphora agent uses 9443 too).
pub const DEFAULT_PORT: u16 = siphon_proto::AGENT_PORT;

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
    #[serde(default)]
    pub limits: Limits,
    /// Announcing VIPs over BGP through a local BIRD (`[bgp]`): where it
    /// is. Without it, `PUT /v1/bgp` is refused.
    #[serde(default)]
    pub bgp: Option<crate::bgp::BgpSettings>,
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
    /// PEM CA certificate(s) the agent's own certificate must chain to (the
    /// CA the controller trusts for agents). A rotation
    /// (`PUT /v1/certificates`) is checked against it and refused without
    /// it.
    #[serde(default)]
    pub server_ca: Option<PathBuf>,
    /// The name the agent's certificate must carry (what the controller
    /// checks); the amphora id when not set.
    #[serde(default)]
    pub server_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// Health-manager addresses, each sent every heartbeat.
    pub destinations: Vec<SocketAddr>,
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    /// File holding the fleet's shared bootstrap HMAC key (key id 0),
    /// used until the controller pushes this amphora its own key. Without
    /// it (and without a pushed key) nothing is sent until a key is pushed.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

impl Heartbeat {
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms.max(10))
    }
}

/// Limits of the controller-facing HTTPS server.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// How long a client has for its TLS handshake, and then for each
    /// request head; with hyper 1.x the clock starts when the server
    /// starts waiting for a request, so it also bounds the idle wait
    /// between requests on a keep-alive connection.
    pub header_read_timeout_ms: u64,
    /// A connection that moves no byte either way for this long, with no
    /// request being handled, is closed (a request body or response that
    /// stalls, a keep-alive connection left open).
    pub idle_timeout_ms: u64,
    /// Connections served at once; when all are taken the agent stops
    /// accepting (clients wait in the listen backlog) until one ends.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            max_connections: 256,
        }
    }
}

impl Limits {
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0u16; 8], DEFAULT_PORT))
}
fn default_local_socket() -> PathBuf {
    PathBuf::from("/run/siphon/agent.sock")
}
fn default_dataplane_socket() -> PathBuf {
    PathBuf::from(siphon_proto::socket::DEFAULT_SOCKET)
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
        if config.amphora_id.len() > 255 {
            return Err(invalid(
                "amphora_id",
                "must be at most 255 bytes (it travels in each heartbeat's header)",
            ));
        }
        if let Some(name) = &config.tls.server_name {
            if rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
                return Err(invalid(
                    "tls.server_name",
                    "must be a DNS name or an IP address",
                ));
            }
        }
        let l = &config.limits;
        if l.header_read_timeout_ms == 0 {
            return Err(invalid("limits.header_read_timeout_ms", "must be above 0"));
        }
        if l.idle_timeout_ms == 0 {
            return Err(invalid("limits.idle_timeout_ms", "must be above 0"));
        }
        if l.max_connections == 0 {
            return Err(invalid("limits.max_connections", "must be above 0"));
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
        assert_eq!(c.limits, Limits::default());
        assert_eq!(c.tls.server_name.as_deref(), Some("amphora-0001"));
        assert!(c.tls.server_ca.is_some());
        let hb = c.heartbeat.unwrap_or_else(|| panic!("no [heartbeat]"));
        assert_eq!(hb.destinations.len(), 2);
        assert!(hb.key_file.is_some());
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
        std::fs::write(
            &path,
            text.replace(
                "amphora_id = \"\"",
                "amphora_id = \"a\"\n[limits]\nmax_connections = 0",
            ),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let e = AgentConfig::load(&path)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("limits.max_connections"), "{e}");
        // The bootstrap key is optional.
        std::fs::write(
            &path,
            text.replace(
                "amphora_id = \"\"",
                "amphora_id = \"a\"\n[heartbeat]\ndestinations = [\"198.18.0.1:5555\"]",
            ),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let c = AgentConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.heartbeat.and_then(|h| h.key_file), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
