//! A real `siphon-dataplane` process for the agent's and the controller's
//! tests: one worker, no config, its control API on a socket the test
//! names. Killed (SIGKILL) on drop, as a crashed dataplane would be.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use siphon_proto::http::{self, Reply, Request, Target};

use crate::eventually;
use crate::netns::Netns;
use crate::process::{binary, Proc};

#[derive(Debug)]
pub struct Dataplane {
    pub socket: PathBuf,
    proc: Proc,
}

impl Dataplane {
    /// Starts it on `socket` (its log beside it) and waits until its API
    /// answers.
    pub fn start(socket: &Path) -> Dataplane {
        Dataplane::start_in(None, socket)
    }

    /// The same, inside `netns` when given (its control socket is a file:
    /// reachable from anywhere).
    pub fn start_in(netns: Option<&Netns>, socket: &Path) -> Dataplane {
        let bin = binary("siphon-dataplane");
        let mut cmd = match netns {
            Some(ns) => ns.command(bin),
            None => Command::new(bin),
        };
        cmd.args(["run", "--workers", "1", "--socket"])
            .arg(socket)
            .env("RUST_LOG", "info");
        let proc = Proc::spawn(cmd, &socket.with_extension("log"));
        let dp = Dataplane {
            socket: socket.to_owned(),
            proc,
        };
        assert!(
            eventually(Duration::from_secs(10), || dp
                .try_get("/v1/generation")
                .is_ok()),
            "siphon-dataplane did not start: {}",
            dp.proc.log_text()
        );
        dp
    }

    fn target(&self) -> Target {
        Target::Unix(self.socket.clone())
    }

    fn try_get(&self, path: &str) -> Result<Reply, http::HttpError> {
        http::send_blocking(&self.target(), Request::get(path))
    }

    /// `GET path` on its control API.
    pub fn get(&self, path: &str) -> Reply {
        self.try_get(path)
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// The generation it runs.
    pub fn generation(&self) -> u64 {
        generation_at(&self.socket)
    }

    /// Applies a JSON config directly (not through an agent).
    pub fn apply(&self, config_json: &str) -> Reply {
        let req = Request::new(hyper::Method::PUT, "/v1/config").json(config_json.into());
        http::send_blocking(&self.target(), req).unwrap_or_else(|e| panic!("PUT /v1/config: {e}"))
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }
}

/// The generation the dataplane on control socket `socket` runs (for a
/// thread that cannot borrow its [`Dataplane`]).
pub fn generation_at(socket: &Path) -> u64 {
    let target = Target::Unix(socket.to_owned());
    let r = http::send_blocking(&target, Request::get("/v1/generation"))
        .unwrap_or_else(|e| panic!("GET /v1/generation: {e}"));
    let v: serde_json::Value = serde_json::from_str(&r.body)
        .unwrap_or_else(|e| panic!("/v1/generation {:?}: {e}", r.body));
    v["generation"]
        .as_u64()
        .unwrap_or_else(|| panic!("/v1/generation: {}", r.body))
}
