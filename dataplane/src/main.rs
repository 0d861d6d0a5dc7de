//! `siphon-dataplane`: parse arguments, load the config, start the server
//! and its control API, then turn signals into actions (SIGHUP reload,
//! SIGTERM/SIGINT drain and exit, SIGUSR1 log counters); `ctl` talks to a
//! running one. Everything else is library code.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::SignalFd;
use siphon_dataplane::api::{self, Api, ApiLimits, ApiOptions};
use siphon_dataplane::config::load::Format;
use siphon_dataplane::{demo, Applied, Config, Options, Server};
use siphon_proto::http::{self, Request, Target};

#[derive(Parser)]
#[command(
    name = "siphon-dataplane",
    version,
    about = "Siphon's L4 load balancer dataplane"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy on a config file (TOML, or JSON if the name ends in
    /// .json), or with no config until one is pushed over the control API.
    Run {
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[command(flatten)]
        control: Control,
        #[command(flatten)]
        tuning: Tuning,
    },
    /// Talk to a running dataplane over its control socket.
    Ctl {
        /// The control socket of the dataplane.
        #[arg(long, default_value = api::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[command(subcommand)]
        action: CtlAction,
    },
    /// Validate a config file without running it; exits 1 with the problems.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run a demo: two local backends behind the proxy on an embedded config.
    Demo {
        /// Port the demo listener binds on 127.0.0.1 (backends use the next two).
        #[arg(long, default_value_t = 19080)]
        port: u16,
        /// Show the balancing, then exit instead of serving until Ctrl-C.
        #[arg(long)]
        once: bool,
        #[command(flatten)]
        tuning: Tuning,
    },
}

#[derive(Subcommand)]
enum CtlAction {
    /// Generation, listeners, pools and each member's health state.
    Status,
    /// Counters of every listener and member (JSON).
    Stats,
    /// The running config (JSON).
    Config,
    /// The Prometheus page.
    Metrics,
    /// Validate and apply a config file (TOML, or JSON if it ends in .json).
    Apply { file: PathBuf },
}

#[derive(Args)]
struct Control {
    /// Control API socket (HTTP/1.1 over a Unix socket).
    #[arg(long, default_value = api::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Permission bits of the control socket, in octal.
    #[arg(long, default_value = "600", value_parser = parse_mode)]
    socket_mode: u32,
    /// No control API (SIGHUP and the config file only).
    #[arg(long, conflicts_with = "socket")]
    no_api: bool,
    /// Also serve GET /metrics on this TCP address (e.g. 127.0.0.1:9100).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Control API connections served at once (per listener); at the cap
    /// the oldest is closed to let a new one in.
    #[arg(long, default_value_t = ApiLimits::default().max_connections)]
    api_max_connections: usize,
    /// Largest config body the control API takes, in bytes (413 beyond).
    #[arg(long, default_value_t = ApiLimits::default().max_body)]
    api_max_body: usize,
    /// Seconds a control API client has to send a request's line and
    /// headers, however slowly they trickle.
    #[arg(long, default_value_t = ApiLimits::default().header_read_timeout.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    api_header_timeout: u64,
    /// Seconds a config body has to arrive whole (408 beyond).
    #[arg(long, default_value_t = ApiLimits::default().body_read_timeout.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    api_body_timeout: u64,
    /// Seconds a control API connection may stay silent while no request
    /// is being handled.
    #[arg(long, default_value_t = ApiLimits::default().idle_timeout.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    api_idle_timeout: u64,
}

impl Control {
    fn limits(&self) -> ApiLimits {
        ApiLimits {
            max_connections: self.api_max_connections.max(1),
            header_read_timeout: Duration::from_secs(self.api_header_timeout),
            idle_timeout: Duration::from_secs(self.api_idle_timeout),
            body_read_timeout: Duration::from_secs(self.api_body_timeout),
            max_body: self.api_max_body,
            // Two bodies of the largest size at once.
            body_budget: self.api_max_body.saturating_mul(2),
        }
    }
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?} is not an octal mode like 600"))
}

#[derive(Args)]
struct Tuning {
    /// Worker threads (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Copy through user-space buffers instead of splice(2).
    #[arg(long)]
    no_splice: bool,
    /// Pipe size per direction for splice, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pipe_size: usize,
    /// No UDP segmentation offload (GRO/GSO): every datagram crosses the
    /// stack on its own.
    #[arg(long)]
    no_udp_offload: bool,
    /// Leave accepted connections on the worker SO_REUSEPORT gave them to,
    /// even when another worker holds far fewer.
    #[arg(long)]
    no_spread: bool,
    /// Seconds established connections get to finish after SIGTERM.
    #[arg(long, default_value_t = 30)]
    drain_timeout: u64,
    /// Milliseconds after SIGTERM during which the TCP listeners stay open
    /// but drop new connection attempts unanswered (clients send their SYN
    /// again after 1 s), before the drain closes them: time for the
    /// routers to move the VIP elsewhere (the agent withdraws it as soon
    /// as the control API is gone), so no client is refused. 0: close
    /// them at once (attempts are refused).
    #[arg(long, default_value_t = 0)]
    drain_delay_ms: u64,
    /// Take a member out after this many refused (or reset, unreachable)
    /// connects in a row (0: never). Failures on the proxy's own side
    /// (descriptors, memory, local ports) never count.
    #[arg(long, default_value_t = 5)]
    eject_after: u32,
    /// Take a member out after this many timed-out connects in a row
    /// (0: never); more than refusals, since a slow member may be only busy.
    #[arg(long, default_value_t = 15)]
    eject_after_timeouts: u32,
    /// Never have more than this percentage of a pool's members ejected at
    /// once (0-100); the last member that is up is never ejected.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=100))]
    max_ejection_percent: u32,
    /// Seconds an ejected member without a health monitor stays out (doubling
    /// on repeated ejections, up to 32 times).
    #[arg(long, default_value_t = 10)]
    eject_backoff: u64,
    /// Log filter (tracing's EnvFilter syntax); RUST_LOG wins if set.
    #[arg(long, default_value = "info")]
    log: String,
}

impl Tuning {
    fn options(&self) -> Options {
        let mut o = Options::default();
        if let Some(w) = self.workers {
            o.workers = w.max(1);
        }
        o.splice = !self.no_splice;
        o.pipe_size = self.pipe_size;
        o.udp_offload = !self.no_udp_offload;
        o.spread = !self.no_spread;
        o.eject_after = self.eject_after;
        o.eject_after_timeouts = self.eject_after_timeouts;
        o.max_ejection_percent = self.max_ejection_percent;
        o.eject_backoff = Duration::from_secs(self.eject_backoff.max(1));
        o
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { config } => check(&config),
        Command::Run {
            config,
            control,
            tuning,
        } => run(config.as_deref(), &control, &tuning),
        Command::Ctl { socket, action } => ctl(&socket, action),
        Command::Demo { port, once, tuning } => run_demo(port, once, &tuning),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("siphon-dataplane: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(filter))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn check(path: &Path) -> Result<()> {
    let config = Config::load(path)?;
    println!(
        "{}: valid (generation {}, {} listeners, {} pools)",
        path.display(),
        config.generation,
        config.listeners.len(),
        config.pools.len()
    );
    Ok(())
}

/// Raises the soft open-files limit to the hard one: every proxied
/// connection costs two sockets and, with splice, four pipe ends.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_err() {
            tracing::warn!(soft, hard, "cannot raise the open-files limit");
        }
    }
}

/// Blocks the signals we handle in every thread (workers inherit the mask)
/// and returns a descriptor to read them from on the main thread.
fn signals() -> Result<SignalFd> {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGHUP,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGUSR1,
    ] {
        set.add(s);
    }
    set.thread_block().context("blocking signals")?;
    SignalFd::new(&set).context("signalfd")
}

fn run(path: Option<&Path>, control: &Control, tuning: &Tuning) -> Result<()> {
    init_logging(&tuning.log);
    raise_fd_limit();
    let sigs = signals()?;
    let config = match path {
        Some(p) => Config::load(p)?,
        None if control.no_api => {
            anyhow::bail!("nothing to run: give --config, or leave the control API on to push one")
        }
        None => Config {
            generation: 0,
            listeners: Vec::new(),
            pools: Vec::new(),
        },
    };
    let opts = tuning.options();
    // The control socket first: a second dataplane started by mistake must
    // fail before it binds (and with SO_REUSEPORT shares) any listener.
    let bound = if control.no_api {
        None
    } else {
        let opts = ApiOptions {
            socket: control.socket.clone(),
            mode: control.socket_mode,
            metrics: control.metrics_listen,
        };
        Some(
            Api::bind(&opts)
                .context("starting the control API")?
                .with_limits(control.limits()),
        )
    };
    let server = Arc::new(Server::start(config, opts.clone()).context("starting")?);
    let api = match bound {
        Some(b) => Some(
            b.serve(server.clone())
                .context("starting the control API")?,
        ),
        None => None,
    };
    siphon_proto::systemd::notify_ready();
    tracing::info!(
        generation = server.generation(),
        workers = opts.workers,
        splice = opts.splice,
        config = %path.map_or("(none)".into(), |p| p.display().to_string()),
        control = %api.as_ref().map_or("off".into(), |a| a.socket().display().to_string()),
        metrics = ?control.metrics_listen,
        "siphon-dataplane running"
    );
    wait_for_stop(&server, &sigs, path)?;
    // The drain never waits for an API client: the API stops beside it
    // (its open connections get a second), and the drain refuses applies
    // from its first moment.
    if let Some(api) = &api {
        api.stop();
    }
    drain(&server, sigs, tuning);
    drop(api);
    Ok(())
}

/// Drains (after `--drain-delay-ms` of dropping new connection attempts);
/// a second SIGTERM or SIGINT meanwhile closes what is left at once.
fn drain(server: &Arc<Server>, sigs: SignalFd, tuning: &Tuning) {
    // Signals are read on a thread of their own while this one waits; the
    // thread ends with the process.
    let (cut_tx, cut_rx) = crossbeam_channel::bounded::<()>(1);
    let watched = server.clone();
    if let Err(e) = std::thread::Builder::new()
        .name("siphon-signals".into())
        .spawn(move || while_draining(&watched, &sigs, &cut_tx))
    {
        tracing::warn!(error = %e, "cannot watch signals during the drain");
    }
    if tuning.drain_delay_ms > 0 {
        server.quiesce();
        tracing::info!(
            drain_delay_ms = tuning.drain_delay_ms,
            "stopping: new connection attempts dropped (clients retry them) while the VIP is withdrawn; established connections go on"
        );
        // Ended early by a second stop signal.
        let _ = cut_rx.recv_timeout(Duration::from_millis(tuning.drain_delay_ms));
    }
    tracing::info!(
        drain_timeout_s = tuning.drain_timeout,
        "stopping: no new connections, draining established ones (SIGTERM again to stop now)"
    );
    server.shutdown(Duration::from_secs(tuning.drain_timeout));
    tracing::info!("stopped");
}

/// Signals during a drain: SIGTERM/SIGINT cut it short, SIGUSR1 still
/// logs the counters, SIGHUP is ignored (no config is applied any more).
fn while_draining(server: &Server, sigs: &SignalFd, cut: &crossbeam_channel::Sender<()>) {
    loop {
        let info = match sigs.read_signal() {
            Ok(Some(info)) => info,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read signals during the drain");
                return;
            }
        };
        match Signal::try_from(info.ssi_signo as i32) {
            Ok(Signal::SIGTERM | Signal::SIGINT) => {
                tracing::warn!("second stop signal: closing the remaining connections now");
                let _ = cut.try_send(());
                server.cut_drain();
            }
            Ok(Signal::SIGUSR1) => log_counters(server),
            Ok(Signal::SIGHUP) => tracing::info!("SIGHUP ignored: draining"),
            _ => {}
        }
    }
}

fn log_counters(server: &Server) {
    match serde_json::to_string(&server.stats()) {
        Ok(json) => tracing::info!(stats = %json, "counters"),
        Err(e) => tracing::warn!(error = %e, "cannot render counters"),
    }
}

/// The signal loop shared by `run` and `demo`; returns on SIGTERM/SIGINT.
fn wait_for_stop(server: &Server, sigs: &SignalFd, path: Option<&Path>) -> Result<()> {
    loop {
        let Some(info) = sigs.read_signal().context("reading signals")? else {
            continue;
        };
        match Signal::try_from(info.ssi_signo as i32) {
            Ok(Signal::SIGHUP) => match path {
                Some(p) => reload(server, p),
                None => tracing::info!("SIGHUP ignored: no config file"),
            },
            Ok(Signal::SIGUSR1) => log_counters(server),
            Ok(Signal::SIGTERM | Signal::SIGINT) => return Ok(()),
            _ => {}
        }
    }
}

/// `ctl`: one request to a running dataplane; the reply goes to stdout,
/// or to stderr with exit status 1 when the dataplane refused it.
fn ctl(socket: &Path, action: CtlAction) -> Result<()> {
    let req = match action {
        CtlAction::Status => Request::get("/v1/status"),
        CtlAction::Stats => Request::get("/v1/stats"),
        CtlAction::Config => Request::get("/v1/config"),
        CtlAction::Metrics => Request::get("/metrics"),
        CtlAction::Apply { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            // The dataplane validates; only the syntax is checked here, so
            // that a TOML file travels as JSON.
            let config = Config::parse(&text, Format::for_path(&file))
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            Request::new(hyper::Method::PUT, "/v1/config").json(serde_json::to_vec(&config)?)
        }
    };
    let reply = match http::send_blocking(&Target::Unix(socket.to_owned()), req) {
        Ok(r) => r,
        Err(e) if e.is_connect() => {
            anyhow::bail!("{e} (is siphon-dataplane running with this --socket?)")
        }
        Err(e) => return Err(e.into()),
    };
    let text = pretty(&reply.body);
    if reply.is_success() {
        println!("{text}");
        Ok(())
    } else {
        anyhow::bail!("the dataplane answered {}:\n{text}", reply.status)
    }
}

/// JSON bodies indented for people; anything else as it came.
fn pretty(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| body.trim_end().to_owned())
}

/// SIGHUP: re-read the file and apply it; on any error the running config stays.
fn reload(server: &Server, path: &Path) {
    let rejected = |server: &Server, e: &dyn std::fmt::Display| {
        tracing::error!(
            "reload rejected, running generation {} stays: {e}",
            server.generation()
        )
    };
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => return rejected(server, &e),
    };
    match server.apply(config) {
        Ok(Applied::Unchanged { generation }) => {
            tracing::info!(generation, "reload: config unchanged")
        }
        Ok(Applied::Changed {
            generation,
            added,
            removed,
        }) => tracing::info!(
            generation,
            listening_added = ?added,
            listening_removed = ?removed,
            "reload applied"
        ),
        Err(e) => rejected(server, &e),
    }
}

fn run_demo(port: u16, once: bool, tuning: &Tuning) -> Result<()> {
    init_logging(&tuning.log);
    let sigs = signals()?;
    let ports = [port.wrapping_add(1), port.wrapping_add(2)];
    let backends = demo::bind_backends(ports).with_context(|| {
        format!(
            "binding demo backends on 127.0.0.1:{} and :{}",
            ports[0], ports[1]
        )
    })?;
    for (name, l) in ["backend-1", "backend-2"].into_iter().zip(backends) {
        demo::spawn_backend(name, l);
    }
    let config = demo::config(port, ports).map_err(anyhow::Error::msg)?;
    let server =
        Arc::new(Server::start(config, tuning.options()).context("starting the demo proxy")?);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    println!(
        "siphon demo: proxy on {addr}, backends on 127.0.0.1:{} and 127.0.0.1:{}",
        ports[0], ports[1]
    );
    println!("six connections through the proxy (ROUND_ROBIN):");
    for (i, greeting) in demo::probe(addr, 6)?.iter().enumerate() {
        println!("  connection {} -> {greeting}", i + 1);
    }
    let stats = server.stats();
    for m in &stats.members {
        println!(
            "  member {} served {} connections",
            m.id, m.total_connections
        );
    }
    if once {
        server.shutdown(Duration::from_secs(1));
        return Ok(());
    }
    println!(
        "try it: nc {} {}   (type a line, it echoes; Ctrl-C stops the demo)",
        addr.ip(),
        addr.port()
    );
    wait_for_stop(&server, &sigs, None)?;
    drain(&server, sigs, tuning);
    Ok(())
}
