//! Child processes of a test: the workspace's binaries found where
//! `cargo test --workspace` built them (never built from a test), and a
//! guard that kills its process however the test ends.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::eventually;

/// `target/<profile>/` of this build: the test executable lives in its
/// `deps/`.
pub fn target_profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    exe.parent()
        .and_then(Path::parent)
        .unwrap_or_else(|| panic!("{} has no target directory", exe.display()))
        .to_owned()
}

/// `target/`: what lives beside the profiles (e.g. a venv kept between
/// runs).
pub fn target_dir() -> PathBuf {
    let profile = target_profile_dir();
    profile.parent().unwrap_or(&profile).to_owned()
}

/// A binary of the workspace (`siphon-dataplane`, `siphon-agent`,
/// `siphon-control`, `siphon`), built by the README's test command. A
/// test run of one package alone does not build the others: that is an
/// error naming the command, not a build started from inside a test.
pub fn binary(name: &str) -> PathBuf {
    let bin = target_profile_dir().join(name);
    assert!(
        bin.exists(),
        "{} missing: run the tests with `cargo test --workspace --release` (it builds every binary)",
        bin.display()
    );
    bin
}

/// A child process with its stdout and stderr in a log file; killed
/// (SIGKILL) and reaped on drop or [`Proc::kill`].
#[derive(Debug)]
pub struct Proc {
    child: Option<Child>,
    pub log: PathBuf,
    /// Leads a process group of its own, killed whole.
    group: bool,
}

impl Proc {
    /// Runs `cmd`, appending its output to `log`.
    pub fn spawn(cmd: Command, log: &Path) -> Proc {
        Proc::spawn_with(cmd, log, false)
    }

    /// Runs `cmd` as the leader of a new process group, so that what it
    /// forks (a Python service's worker processes, say) is killed with it.
    pub fn spawn_group(mut cmd: Command, log: &Path) -> Proc {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        Proc::spawn_with(cmd, log, true)
    }

    fn spawn_with(mut cmd: Command, log: &Path, group: bool) -> Proc {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let err = out.try_clone().unwrap_or_else(|e| panic!("{e}"));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        Proc {
            child: Some(child),
            log: log.to_owned(),
            group,
        }
    }

    /// The process id (of a process not killed yet).
    pub fn id(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .unwrap_or_else(|| panic!("the process was killed"))
    }

    /// Its exit status if it has exited.
    pub fn try_wait(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => c.try_wait(),
            None => Ok(None),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log holds `needle` `count` times.
    pub fn wait_log(&self, needle: &str, count: usize, timeout: Duration) -> bool {
        eventually(timeout, || self.log_text().matches(needle).count() >= count)
    }

    /// Sends `signal`.
    pub fn signal(&self, signal: Signal) {
        // The guard has not reaped it: the pid cannot have been reused.
        let pid = Pid::from_raw(self.id() as i32);
        nix::sys::signal::kill(pid, signal).unwrap_or_else(|e| panic!("kill {pid}: {e}"));
    }

    /// Waits for the process to exit up to `timeout`; its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let child = self.child.as_mut()?;
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(st)) = child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// SIGKILL: no shutdown of any kind.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            if self.group {
                // Not reaped yet: the group id is still this process's.
                let _ = nix::sys::signal::killpg(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}
