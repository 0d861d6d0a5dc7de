//! `siphon-agent`: load the agent config, start, wait for SIGTERM/SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use siphon_agent::config::AgentConfig;

#[derive(Parser)]
#[command(
    name = "siphon-agent",
    version,
    about = "Siphon's amphora agent: the controller's mutual-TLS API to this node's dataplane"
)]
struct Cli {
    /// Agent config (TOML).
    #[arg(long, short, default_value = "/etc/siphon/agent.toml")]
    config: PathBuf,
    /// Log filter (tracing's EnvFilter syntax); RUST_LOG wins if set.
    #[arg(long, default_value = "info")]
    log: String,
}

const NETLINK_PARSER: &str = "netlink_packet_route";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cli.log))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // The netlink parser warns on every interface dump of a kernel newer
    // than it (a longer IPv6 settings block it skips): noise every 100 ms
    // on any host with IPv6, unless asked for by name.
    let named = |f: &str| f.contains(NETLINK_PARSER);
    if !std::env::var("RUST_LOG").is_ok_and(|f| named(&f)) && !named(&cli.log) {
        if let Ok(d) = format!("{NETLINK_PARSER}=error").parse() {
            filter = filter.add_directive(d);
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("siphon-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block().context("blocking signals")?;
    let cfg = AgentConfig::load(&cli.config)?;
    let handle = siphon_agent::start(&cfg).context("starting")?;
    tracing::info!(
        id = %cfg.amphora_id,
        listen = %handle.addr,
        local = %handle.local_socket.display(),
        dataplane = %cfg.dataplane_socket.display(),
        "siphon-agent running"
    );
    siphon_proto::systemd::notify_ready();
    let sig = set.wait().context("waiting for a signal")?;
    tracing::info!(signal = ?sig, "stopping");
    drop(handle);
    Ok(())
}
