//! A real BIRD 2 daemon for the tests (Debian's `bird2`, which `.ci/run`
//! installs): run in the foreground inside a network namespace, with its
//! config file and control socket in a temp dir; killed on drop.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::netns::Netns;
use crate::process::Proc;
use crate::{eventually, TempDir};

#[derive(Debug)]
pub struct Bird {
    pub socket: PathBuf,
    /// The config file it was started with (`-c`).
    pub config: PathBuf,
    proc: Proc,
    _dir: TempDir,
}

impl Bird {
    /// Starts BIRD in `ns` on `config` (the text of its file), or says
    /// why it cannot and returns `None`: it needs root and the `bird2`
    /// package. Under `SIPHON_REQUIRE_ROOT_TESTS=1` (CI) a missing one is
    /// a failure, not a skip.
    pub fn start_or_skip(test: &str, ns: &Netns, name: &str, config: &str) -> Option<Bird> {
        if !crate::root_or_skip(test) {
            return None;
        }
        if Command::new("bird").arg("--version").output().is_err() {
            crate::skip_or_fail(test, "BIRD was not found (install Debian's bird2)");
            return None;
        }
        let dir = TempDir::new(&format!("bird-{name}"));
        let (socket, file) = (dir.path("bird.ctl"), dir.path("bird.conf"));
        std::fs::write(&file, config).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let proc = Bird::spawn(ns, &dir, "bird.log");
        let bird = Bird {
            socket,
            config: file,
            proc,
            _dir: dir,
        };
        bird.wait_up();
        Some(bird)
    }

    fn spawn(ns: &Netns, dir: &TempDir, log: &str) -> Proc {
        let mut cmd = ns.command("bird");
        cmd.arg("-f")
            .arg("-c")
            .arg(dir.path("bird.conf"))
            .arg("-s")
            .arg(dir.path("bird.ctl"))
            .arg("-P")
            .arg(dir.path("bird.pid"));
        Proc::spawn(cmd, &dir.path(log))
    }

    fn wait_up(&self) {
        assert!(
            eventually(Duration::from_secs(10), || self
                .try_birdc("show status")
                .is_some_and(|s| s.contains("Daemon is up"))),
            "BIRD did not start: {}",
            self.proc.log_text()
        );
    }

    /// Kills BIRD (SIGKILL) and starts it again on the same config file
    /// and socket, as its unit's `Restart=` would.
    pub fn restart(&mut self, ns: &Netns) {
        self.proc.kill();
        let _ = std::fs::remove_file(&self.socket);
        self.proc = Bird::spawn(ns, &self._dir, "bird-restarted.log");
        self.wait_up();
    }

    fn try_birdc(&self, command: &str) -> Option<String> {
        let out = Command::new("birdc")
            .arg("-s")
            .arg(&self.socket)
            .args(command.split_whitespace())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `birdc COMMAND`'s output.
    pub fn birdc(&self, command: &str) -> String {
        self.try_birdc(command)
            .unwrap_or_else(|| panic!("birdc {command} failed: {}", self.log_text()))
    }

    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }
}
