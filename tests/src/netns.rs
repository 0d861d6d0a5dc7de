//! Network namespaces for tests: test hosts with their own interfaces,
//! addresses and MTUs, made with `ip netns` and veth pairs and removed
//! when the value is dropped, also when the test fails.
//!
//! Addresses come from 198.18.0.0/15 and 2001:db8::/32 (benchmarking and
//! documentation ranges), never from private ones.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Runs `ip ARGS`; an error carries its stderr.
pub fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// `program` to be run inside the namespace called `name` (`ip netns
/// exec`, which execs it: the child's pid is the program's).
pub fn exec(name: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", name]).arg(program);
    c
}

/// A network namespace, deleted on drop (with the veth ends inside it,
/// which takes their peers outside with them).
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// A new namespace named after `tag`, this process and a counter, with
    /// its loopback up.
    pub fn create(tag: &str) -> io::Result<Netns> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("sph-{tag}-{}-{n}", std::process::id());
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs `ip ARGS` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> io::Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// A veth pair between the caller's namespace (`outside`, with
    /// `outside_addr`) and this one (`inside`, with `inside_addr`), both up
    /// with `mtu`. Addresses are CIDRs such as `198.18.0.1/24`.
    pub fn veth(
        &self,
        outside: &str,
        outside_addr: &str,
        inside: &str,
        inside_addr: &str,
        mtu: u32,
    ) -> io::Result<()> {
        let mtu = mtu.to_string();
        ip(&[
            "link", "add", outside, "mtu", &mtu, "type", "veth", "peer", "name", inside, "mtu",
            &mtu, "netns", &self.name,
        ])?;
        ip(&["addr", "add", outside_addr, "dev", outside])?;
        ip(&["link", "set", outside, "up"])?;
        self.ip(&["addr", "add", inside_addr, "dev", inside])?;
        self.ip(&["link", "set", inside, "up"])
    }

    /// A bridge called `name` in this namespace, up: a switch the hosts
    /// of [`Netns::plug`] share.
    pub fn bridge(&self, name: &str) -> io::Result<()> {
        self.ip(&["link", "add", name, "type", "bridge"])?;
        self.ip(&["link", "set", name, "up"])
    }

    /// Plugs a host into `bridge` (of this namespace) through a veth
    /// pair: `port` on the bridge, `host_if` in `host` (another
    /// namespace; `None`: this process's), up there with `addrs` (CIDRs,
    /// IPv6 ones without duplicate address detection). `host_if` must be
    /// unique where it goes; the pair goes when this namespace does.
    pub fn plug(
        &self,
        bridge: &str,
        port: &str,
        host: Option<&Netns>,
        host_if: &str,
        addrs: &[&str],
    ) -> io::Result<()> {
        let pid = std::process::id().to_string();
        let to = host.map_or(pid.as_str(), |h| h.name.as_str());
        self.ip(&[
            "link", "add", port, "type", "veth", "peer", "name", host_if, "netns", to,
        ])?;
        self.ip(&["link", "set", port, "master", bridge, "up"])?;
        let on_host = |args: &[&str]| match host {
            Some(h) => h.ip(args),
            None => ip(args),
        };
        for a in addrs {
            if a.contains(':') {
                on_host(&["addr", "add", a, "dev", host_if, "nodad"])?;
            } else {
                on_host(&["addr", "add", a, "dev", host_if])?;
            }
        }
        on_host(&["link", "set", host_if, "up"])
    }

    /// `program` to be run inside the namespace: [`exec`].
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        exec(&self.name, program)
    }

    /// Runs `f` on a thread inside the namespace: sockets it opens belong
    /// to the namespace and stay there wherever they are used later.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        let file = File::open(format!("/run/netns/{}", self.name))?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on an open namespace file; it changes only
                // this (scoped, short-lived) thread's network namespace.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .map_err(|_| io::Error::other("thread in the namespace panicked"))?
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("cannot remove network namespace {}: {e}", self.name);
        }
    }
}
