//! Dropped packets for tests, with nftables (`nft`, from Debian's
//! `nftables` package, which `.ci/run` installs): each [`Drop`] is an
//! nftables table of its own, named after the test process, and deleted
//! when the value is dropped, also when the test fails. Other tables (the
//! host's own rules) are never touched.

use std::io::{self, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Incoming packets matching a rule, dropped while this value lives.
#[derive(Debug)]
pub struct Drop {
    table: String,
}

fn nft(script: &str) -> io::Result<String> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("nft (install nftables): {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(io::Error::other(format!(
            "nft: {}\n{script}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

impl Drop {
    /// Drops every UDP datagram arriving for `port` (any address, loopback
    /// too): a receiver cut off from its senders.
    pub fn udp_to(port: u16) -> io::Result<Drop> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let table = format!("siphon_test_{}_{n}", std::process::id());
        nft(&format!(
            "table inet {table} {{\n  chain input {{\n    type filter hook input priority -10; policy accept;\n    udp dport {port} counter drop\n  }}\n}}\n"
        ))?;
        Ok(Drop { table })
    }

    /// How many packets were dropped so far.
    pub fn dropped(&self) -> io::Result<u64> {
        let listing = nft(&format!("list table inet {}", self.table))?;
        Ok(listing
            .split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0))
    }
}

impl std::ops::Drop for Drop {
    fn drop(&mut self) {
        if let Err(e) = nft(&format!("delete table inet {}", self.table)) {
            eprintln!("nftables table {} not deleted: {e}", self.table);
        }
    }
}
