//! The `wsgate` command: parses the command line, sets up logging and the runtime, and hands over to the
//! library. `run` serves a config file, `check` validates one, `demo` runs the built-in demo.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use wsgate::{Config, Gateway};

mod demo;

/// An idle tunnel is a few long-lived allocations of wsgate's and tokio's, some of them cache-line aligned;
/// jemalloc's size classes hold them with less waste than glibc's malloc (BENCHMARKS.md has the figures).
/// `--no-default-features` builds with the system allocator.
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "wsgate",
    version,
    about = "A WebSocket-aware reverse proxy and load balancer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Worker threads of the runtime (default: the config's `workers`, else one per core).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log filter, e.g. `info` or `wsgate=debug` (default: RUST_LOG, else `info`).
    #[arg(long, global = true)]
    log_level: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway with a config file.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a config file: print every problem and exit non-zero, or exit 0.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run a demo: wsgate in front of two built-in WebSocket backends, with a page to open in a browser.
    Demo {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: SocketAddr,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format, cli.log_level.as_deref());
    match cli.command {
        Command::Check { config: path } => match Config::from_file(&path) {
            Ok(config) => {
                // Certificates are part of a config: a missing or mismatched one is an error here too,
                // a listener's or one of a backend `tls` table.
                let mut tls_errors: Vec<String> = wsgate::check_certificates(&config)
                    .iter()
                    .map(|e| e.to_string())
                    .collect();
                tls_errors.extend(
                    wsgate::check_backend_tls(&config)
                        .iter()
                        .map(|e| e.to_string()),
                );
                if tls_errors.is_empty() {
                    println!("{}: ok", path.display());
                    ExitCode::SUCCESS
                } else {
                    eprintln!("{}", tls_errors.join("\n"));
                    ExitCode::FAILURE
                }
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::FAILURE
            }
        },
        Command::Run { config: path } => {
            let config = match Config::from_file(&path) {
                Ok(config) => config,
                Err(errors) => {
                    eprintln!("{errors}");
                    return ExitCode::FAILURE;
                }
            };
            let threads = cli.threads.or(config.workers);
            block_on(threads, serve(config))
        }
        Command::Demo { listen, admin } => block_on(cli.threads, demo(listen, admin)),
    }
}

fn init_logging(format: LogFormat, level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(level) => EnvFilter::new(level),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Runs `main` on a runtime with `threads` workers (one per core by default). One thread means a
/// current-thread runtime: all the work really runs on that one thread.
fn block_on(threads: Option<usize>, main: impl Future<Output = ExitCode>) -> ExitCode {
    let threads = threads
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    match runtime {
        Ok(runtime) => runtime.block_on(main),
        Err(error) => {
            eprintln!("cannot start the runtime: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> ExitCode {
    let gateway = match Gateway::start(config).await {
        Ok(gateway) => gateway,
        Err(error) => {
            tracing::error!(%error, "cannot start");
            return ExitCode::FAILURE;
        }
    };
    let ending = wait_for_signals(&gateway).await;
    gateway.shutdown().await;
    ending
}

async fn demo(listen: SocketAddr, admin: SocketAddr) -> ExitCode {
    let mut backends = Vec::new();
    for name in ["demo-1", "demo-2"] {
        match demo::start_backend(name).await {
            Ok(backend) => backends.push(backend),
            Err(error) => {
                eprintln!("cannot start demo backend {name}: {error}");
                return ExitCode::FAILURE;
            }
        }
    }
    // A token for the admin API of this run only, so that the operator's page can drain a demo backend.
    let token: String = (0..32)
        .map(|_| char::from_digit(fastrand::u32(..16), 16).unwrap_or('0'))
        .collect();
    let token_file =
        std::env::temp_dir().join(format!("wsgate-demo-{}.tokens", std::process::id()));
    let written = std::fs::write(&token_file, format!("demo:{token}\n"));
    let tokens = written.is_ok().then_some(token_file.as_path());
    let config = match demo::config(listen, Some((admin, tokens)), &backends) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{errors}");
            let _ = std::fs::remove_file(&token_file);
            return ExitCode::FAILURE;
        }
    };
    let gateway = match Gateway::start(config).await {
        Ok(gateway) => gateway,
        Err(error) => {
            eprintln!("cannot start: {error}");
            let _ = std::fs::remove_file(&token_file);
            return ExitCode::FAILURE;
        }
    };
    let addr = gateway.listener_addr("demo").unwrap_or(listen);
    for backend in &backends {
        println!("demo backend {} on {}", backend.name, backend.addr);
    }
    println!("metrics on http://{admin}/metrics");
    if tokens.is_some() {
        println!("operator's page on http://{admin}/ (admin token for this run: {token})");
    } else {
        println!("operator's page on http://{admin}/ (read-only: no token file could be written)");
    }
    println!("wsgate demo: open http://{addr}/ in a browser (Ctrl-C to stop)");
    let ending = wait_for_signals(&gateway).await;
    gateway.shutdown().await;
    let _ = std::fs::remove_file(&token_file);
    ending
}

/// Serves until SIGTERM or SIGINT (success) or until a part of the gateway dies (failure); reloads the
/// config file on every SIGHUP.
async fn wait_for_signals(gateway: &Gateway) -> ExitCode {
    let failed = || async {
        gateway.failed().await;
        tracing::error!("the gateway cannot go on; shutting down");
        ExitCode::FAILURE
    };
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return ExitCode::FAILURE;
        };
        loop {
            tokio::select! {
                _ = term.recv() => {
                    tracing::info!("SIGTERM: draining");
                    return ExitCode::SUCCESS;
                }
                _ = int.recv() => {
                    tracing::info!("SIGINT: draining");
                    return ExitCode::SUCCESS;
                }
                code = failed() => return code,
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading the config");
                    // Errors are logged and counted by the gateway; the running config stays.
                    let _ = gateway.reload_from_file().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => ExitCode::SUCCESS,
            code = failed() => code,
        }
    }
}
