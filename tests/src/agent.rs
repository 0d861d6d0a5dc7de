//! The config file of a `siphon-agent` process a test starts, in the
//! agent's TOML: one writer for every test that runs the agent binary.

use std::net::SocketAddr;
use std::path::Path;

/// Where an agent under test listens and finds its files.
#[derive(Debug)]
pub struct AgentToml<'a> {
    pub id: &'a str,
    /// `host:port` of its mutual-TLS API.
    pub listen: String,
    /// Holds `agent.crt`, `agent.key` and the local `agent.sock`.
    pub dir: &'a Path,
    pub dataplane_socket: &'a Path,
    pub state_dir: &'a Path,
    /// The CA the controller's client certificate chains to.
    pub client_ca: &'a Path,
    /// Heartbeat destinations and the bootstrap key file (one every
    /// 200 ms); `None`: no heartbeats.
    pub heartbeat: Option<(&'a [SocketAddr], &'a Path)>,
    /// Lines of its `[limits]` table.
    pub limits: &'a str,
}

impl AgentToml<'_> {
    pub fn render(&self) -> String {
        let dir = self.dir.display();
        let mut t = format!(
            "amphora_id = \"{id}\"\nlisten = \"{listen}\"\nlocal_socket = \"{dir}/agent.sock\"\n\
             dataplane_socket = \"{socket}\"\nstate_dir = \"{state}\"\n\
             [tls]\ncert = \"{dir}/agent.crt\"\nkey = \"{dir}/agent.key\"\nclient_ca = \"{ca}\"\n",
            id = self.id,
            listen = self.listen,
            socket = self.dataplane_socket.display(),
            state = self.state_dir.display(),
            ca = self.client_ca.display(),
        );
        if let Some((to, key)) = self.heartbeat {
            let to: Vec<String> = to.iter().map(|a| format!("\"{a}\"")).collect();
            t += &format!(
                "[heartbeat]\ndestinations = [{}]\ninterval_ms = 200\nkey_file = \"{}\"\n",
                to.join(", "),
                key.display()
            );
        }
        if !self.limits.is_empty() {
            t += &format!("[limits]\n{}\n", self.limits);
        }
        t
    }
}
