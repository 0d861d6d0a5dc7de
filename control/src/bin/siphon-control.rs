//! `siphon-control`: the controller (REST API, store, provisioner, health
//! manager). `siphon-control --config /etc/siphon/control.toml`; `check`
//! validates the file and exits; `migrate` creates or upgrades the
//! database's schema and exits.

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
    /// Create or upgrade the database's schema to this version's, print
    /// the schema version, and exit (`run` does the same at start).
    Migrate,
    /// Copy an SQLite store (a single-node install's) into the database
    /// this config names (PostgreSQL, empty), then exit: run it before the
    /// controllers start on PostgreSQL. Both are migrated first.
    CopyStore {
        /// The SQLite file to copy from.
        #[arg(long)]
        from: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    // Logs on stderr: stdout carries only what a subcommand answers
    // (`check`, `migrate`), for scripts; journald takes both.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
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
    if matches!(cli.command, Some(Command::Migrate)) {
        let db = &config.database;
        if let Some(dir) = db.dir() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let version = rt.block_on(async {
            siphon_control::store::Store::open(db)
                .await?
                .schema_version()
                .await
        })?;
        println!("{}: schema version {version}", db.name());
        return Ok(());
    }
    if let Some(Command::CopyStore { from }) = &cli.command {
        let to = &config.database;
        let copied = rt.block_on(siphon_control::store::copy(
            &siphon_control::store::Database::Sqlite(from.clone()),
            to,
        ))?;
        println!(
            "{} -> {}: {} objects, {} counter rows, {} heartbeat records",
            from.display(),
            to.name(),
            copied.objects,
            copied.stats,
            copied.heard
        );
        return Ok(());
    }
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
