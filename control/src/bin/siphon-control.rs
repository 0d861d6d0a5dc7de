//! `siphon-control`: the controller (REST API, store, provisioner, health
//! manager). `siphon-control --config /etc/siphon/control.toml`; `check`
//! validates the file and exits.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use siphon_control::ControlConfig;

#[derive(Debug, Parser)]
#[command(
    name = "siphon-control",
    version,
    about = "Siphon's control plane: Octavia-v2-shaped API, store, config push, health manager"
)]
struct Cli {
    /// Controller config (TOML).
    #[arg(long, global = true, default_value = "/etc/siphon/control.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve (the default).
    Run,
    /// Check the config file and exit (1 with the problem).
    Check,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let config = ControlConfig::load(&cli.config)?;
    if matches!(cli.command, Some(Command::Check)) {
        config.check_secrets()?;
        println!("{}: OK", cli.config.display());
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(async move {
        let handle = siphon_control::start(config).await?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("SIGTERM handler")?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("stopping");
        handle.stop().await;
        anyhow::Ok(())
    })
}
