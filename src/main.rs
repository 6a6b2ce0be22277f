//! The `wsgate` command: parses the command line, sets up logging and the runtimes (one shared runtime, or
//! one per worker thread and one for control: `--runtime`), and hands over to the library. `run` serves a
//! config file, `check` validates one, `demo` runs the built-in demo.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use wsgate::{Config, DEFAULT_EVENT_INTERVAL, Gateway, RuntimeModel, Workers};

mod demo;

/// An idle tunnel is a few long-lived allocations of wsgate's and tokio's, some of them cache-line aligned;
/// jemalloc's size classes hold them with less waste than glibc's malloc (BENCHMARKS.md has the figures).
/// `--no-default-features` builds with the system allocator.
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main`. `background_thread`: freed memory goes back to the system
/// after jemalloc's decay time even while nothing else allocates. Without it jemalloc purges only
/// during other allocations, so a gateway whose tunnels have gone quiet (and into the park, which frees
/// their tasks) would keep the freed pages for as long as it stays quiet (BENCHMARKS.md, "Idle tunnels
/// in the park"). `_RJEM_MALLOC_CONF` in the environment still overrides it.
#[cfg(all(feature = "jemalloc", target_os = "linux"))]
// SAFETY: jemalloc declares `malloc_conf` (prefixed `_rjem_` by tikv-jemalloc-sys on Linux) as a weak
// `const char *` for the program to define; this is a pointer to a NUL-terminated string that lives
// for the whole program and is never written.
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: &[u8; 23] = b"background_thread:true\0";

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
    /// How the worker threads share the work (default: the config's `runtime`, else `shared`).
    #[arg(long, global = true, value_enum)]
    runtime: Option<RuntimeArg>,
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

/// `--runtime`: the config's `runtime` values, spelled as command-line values are.
#[derive(Clone, Copy, ValueEnum)]
enum RuntimeArg {
    /// One multi-thread runtime: its threads steal work from each other.
    Shared,
    /// A current-thread runtime per worker thread, each with its own socket of every listener.
    PerWorker,
}

impl From<RuntimeArg> for RuntimeModel {
    fn from(arg: RuntimeArg) -> RuntimeModel {
        match arg {
            RuntimeArg::Shared => RuntimeModel::Shared,
            RuntimeArg::PerWorker => RuntimeModel::PerWorker,
        }
    }
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
            let runtime = Runtime {
                threads: cli.threads.or(config.workers),
                model: cli.runtime.map_or(config.runtime, RuntimeModel::from),
                event_interval: config.event_interval,
            };
            run(runtime, |workers| serve(config, workers))
        }
        Command::Demo { listen, admin } => {
            let runtime = Runtime {
                threads: cli.threads,
                model: cli.runtime.map_or(RuntimeModel::Shared, RuntimeModel::from),
                event_interval: DEFAULT_EVENT_INTERVAL,
            };
            run(runtime, |workers| demo(listen, admin, workers))
        }
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

/// How the client connections are run: the config's `workers`, `runtime` and `event_interval`, or what
/// the command line says instead.
struct Runtime {
    /// Worker threads; `None` (or 0) means one per core.
    threads: Option<usize>,
    model: RuntimeModel,
    /// Tasks run between two looks at the sockets and timers, on each worker.
    event_interval: u32,
}

/// Runs `main` with `runtime.threads` workers (one per core by default) in the runtime model. One thread
/// means one current-thread runtime in either model: all the work really runs on that one thread.
fn run<F>(runtime: Runtime, main: impl FnOnce(Workers) -> F) -> ExitCode
where
    F: Future<Output = ExitCode>,
{
    let threads = runtime
        .threads
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let (model, event_interval) = (runtime.model, runtime.event_interval);
    tracing::info!(runtime = model.name(), threads, event_interval, "starting");
    match model {
        RuntimeModel::PerWorker if threads > 1 => run_per_worker(threads, event_interval, main),
        _ => block_on(threads, event_interval, main(Workers::default())),
    }
}

/// Runs `main` on one runtime with `threads` worker threads (the shared model).
fn block_on(threads: usize, event_interval: u32, main: impl Future<Output = ExitCode>) -> ExitCode {
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .event_interval(event_interval)
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .event_interval(event_interval)
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

/// The per-worker model: `threads` threads, each running a current-thread runtime of its own, serve the
/// client connections (`Gateway::start_on`: each listener has a socket on each, SO_REUSEPORT), and the
/// main thread runs one more current-thread runtime for the control work: signals, reloads, the admin
/// listener, health checks and DNS discovery.
///
/// Control has a thread of its own rather than sharing worker 0's: the kernel spreads connections over
/// the workers' sockets by a hash, blind to how busy each is, so a worker that also loaded certificates
/// on a reload or rendered `/metrics` would hold its share of the clients up while the others did not.
/// The control thread sleeps otherwise; it costs a stack, and nothing on a connection's path waits for it.
///
/// Exit: `main` returns once `Gateway::shutdown` has waited for the connections on every worker; then
/// each worker's `block_on` is told to end, and each thread drops its runtime (dropping the tasks still
/// left, if the drain timed out) outside any async context, before it is joined.
fn run_per_worker<F>(
    threads: usize,
    event_interval: u32,
    main: impl FnOnce(Workers) -> F,
) -> ExitCode
where
    F: Future<Output = ExitCode>,
{
    let control = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let mut handles = Vec::with_capacity(threads);
    let mut running = Vec::with_capacity(threads);
    for worker in 0..threads {
        match start_worker(worker, event_interval) {
            Ok((handle, thread)) => {
                handles.push(handle);
                running.push(thread);
            }
            Err(error) => {
                eprintln!("cannot start worker {worker}: {error}");
                stop_workers(running);
                return ExitCode::FAILURE;
            }
        }
    }
    let code = control.block_on(main(Workers::new(handles)));
    stop_workers(running);
    code
}

/// A worker thread: its runtime's handle, and what ends and joins it.
struct WorkerThread {
    /// Dropped to end the worker's `block_on`.
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

/// Starts worker thread `index` with a current-thread runtime that runs until its `stop` is dropped.
fn start_worker(
    index: usize,
    event_interval: u32,
) -> std::io::Result<(tokio::runtime::Handle, WorkerThread)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .event_interval(event_interval)
        .enable_all()
        .build()?;
    let handle = runtime.handle().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name(format!("wsgate-worker-{index}"))
        .spawn(move || {
            // A current-thread runtime runs its tasks only inside `block_on`: this keeps them running
            // until told to stop, whether by a send or by the sender being dropped.
            let _ = runtime.block_on(stopped);
            drop(runtime);
        })?;
    Ok((handle, WorkerThread { stop, thread }))
}

/// Ends the workers' `block_on`s and joins their threads (each drops its runtime first).
fn stop_workers(workers: Vec<WorkerThread>) {
    let threads: Vec<_> = workers
        .into_iter()
        .map(|WorkerThread { stop, thread }| {
            drop(stop);
            thread
        })
        .collect();
    for thread in threads {
        if thread.join().is_err() {
            tracing::error!("a worker thread panicked");
        }
    }
}

async fn serve(config: Config, workers: Workers) -> ExitCode {
    let gateway = match Gateway::start_on(config, workers).await {
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

async fn demo(listen: SocketAddr, admin: SocketAddr, workers: Workers) -> ExitCode {
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
    let gateway = match Gateway::start_on(config, workers).await {
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
