//! The `clearml-edge` command: `run` the proxy or `check` a configuration file.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use clearml_edge::config::NodeSource;
use clearml_edge::{Config, Settings};

/// jemalloc rather than the system allocator: it held less memory per idle keep-alive
/// connection than glibc's, and took fewer instructions per request; mimalloc was measured
/// too and held more (the figures are in git history and the README's Performance section). Built with jemalloc's background threads: they
/// purge freed pages on a timer; without them jemalloc purges only while allocating, and
/// pages freed as connections go idle stayed in RSS while the proxy was quiet.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "clearml-edge",
    version,
    about = "Edge proxy for ClearML Server on Kubernetes: routes app., files. and api.<domain> to the cluster nodes' ports 30080, 30081 and 30008"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy until SIGTERM or SIGINT, then drain in-flight requests and exit 0.
    /// SIGHUP re-reads the configuration file and applies it without dropping connections
    /// (an invalid file is refused and the running configuration stays).
    Run {
        /// Configuration file (TOML).
        #[arg(long, short, default_value = "config/edge.toml")]
        config: PathBuf,
    },
    /// Validate a configuration file and print the effective route table
    /// (host → node port → backends). Exits 1 with the error if the file is invalid.
    Check {
        /// Configuration file (TOML).
        #[arg(long, short, default_value = "config/edge.toml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(settings) => {
                print!("{}{}", route_table(&settings), admin_line(&settings));
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Run { config } => {
            init_logging();
            let settings = match Config::load(&config) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let runtime = match runtime_builder().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(run(config, settings))
        }
    }
}

/// One worker thread per core (tokio's default, or `TOKIO_WORKER_THREADS`). With one worker,
/// the single-threaded scheduler does the same work without the cross-thread machinery
/// (work-stealing queues, a separate driver thread hand-off): the shape of one nginx worker.
fn runtime_builder() -> tokio::runtime::Builder {
    let workers = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()));
    if workers == Some(1) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    }
}

async fn run(config_path: PathBuf, settings: Settings) -> ExitCode {
    let table = route_table(&settings);
    let server = match clearml_edge::start(settings).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    for addr in server.local_addrs() {
        tracing::info!(%addr, "listening");
    }
    if let Some(addr) = server.admin_addr() {
        tracing::info!(%addr, "admin listening (/healthz, /readyz, /metrics, /backends)");
    }
    for line in table.lines() {
        tracing::info!("route {line}");
    }
    serve_until_stopped(&server, &config_path).await;
    tracing::info!("shutdown requested: no new connections");
    server.shutdown().await;
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// Waits for SIGTERM or SIGINT; on SIGHUP re-reads the configuration and applies it, or
/// keeps the old one if the file does not validate.
async fn serve_until_stopped(server: &clearml_edge::RunningServer, config_path: &Path) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut hangup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::warn!("cannot install signal handlers; stopping on Ctrl-C only");
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = tokio::signal::ctrl_c() => return,
            _ = hangup.recv() => match Config::load(config_path) {
                Ok(settings) => {
                    let table = route_table(&settings);
                    let needs_restart = server.reload(settings);
                    tracing::info!(file = %config_path.display(), "configuration reloaded");
                    for line in table.lines() {
                        tracing::info!("route {line}");
                    }
                    if !needs_restart.is_empty() {
                        tracing::warn!(settings = ?needs_restart, "these changes take effect at the next restart");
                    }
                }
                Err(e) => {
                    server.reload_refused();
                    tracing::error!("configuration reload refused; the running configuration stays:\n{e}");
                }
            },
        }
    }
}

fn route_table(settings: &Settings) -> String {
    let mut out = String::new();
    for route in &settings.routes {
        let backends = match &settings.nodes {
            NodeSource::Static(nodes) => nodes
                .iter()
                .map(|n| {
                    if n.contains(':') {
                        format!("[{n}]:{}", route.port)
                    } else {
                        format!("{n}:{}", route.port)
                    }
                })
                .collect::<Vec<_>>()
                .join(", "),
            NodeSource::Kubernetes(k) => format!(
                "Kubernetes nodes matching {:?}:{}",
                k.label_selector, route.port
            ),
        };
        let limit = route
            .max_body_bytes
            .map(|l| format!(" (body limit {l} bytes)"))
            .unwrap_or_default();
        out.push_str(&format!(
            "{} [{}] -> port {} -> {}{}\n",
            route.hosts.join(", "),
            route.name,
            route.port,
            backends,
            limit
        ));
    }
    out
}

fn admin_line(settings: &Settings) -> String {
    settings
        .admin
        .map(|admin| format!("admin: http://{admin}/healthz, /readyz, /metrics, /backends\n"))
        .unwrap_or_default()
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal, not for log collectors.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
