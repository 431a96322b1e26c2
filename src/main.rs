//! CLI dispatch: the only place that prints errors and picks exit codes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use portcullis::config::{Config, ConfigError, DEFAULT_PATH};
use portcullis::host_mode::HostModeError;
use portcullis::import;
use portcullis::init::InitError;
use portcullis::server::RunError;
use portcullis::wait::WaitError;

#[derive(Parser)]
#[command(
    name = "portcullis",
    version,
    about = "Transparent egress proxy with an allow-list of external services"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (a sidecar or a host daemon).
    Run {
        #[arg(short, long, default_value = DEFAULT_PATH)]
        config: PathBuf,
        /// Try-out host mode (root): install the [redirect] rules, run the
        /// proxy as proxy_uid in a child, remove the rules when it exits.
        #[arg(long)]
        redirect: bool,
    },
    /// Poll the health endpoint until ready: exit 0 ready, 1 timed out.
    Wait {
        #[arg(long, default_value = "http://127.0.0.1:15021/ready")]
        url: String,
        #[arg(long, default_value = "60s", value_parser = portcullis::config::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Install the iptables rules of [redirect] (IPv4 and IPv6).
    Init {
        #[arg(short, long, default_value = DEFAULT_PATH)]
        config: PathBuf,
        /// Print the exact iptables-restore input (IPv4, then IPv6) and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Remove every rule and chain portcullis owns, whatever the config says.
        #[arg(long)]
        cleanup: bool,
        /// iptables backend: auto picks the one already holding rules, else nft.
        #[arg(long, value_enum, default_value = "auto")]
        backend: portcullis::init::BackendChoice,
    },
    /// Validate a config file: prints a summary and warnings; exit 0 valid, 1 invalid.
    Check {
        #[arg(short, long, default_value = DEFAULT_PATH)]
        config: PathBuf,
    },
    /// The traffic summary of a running proxy as a table (its admin listener's /api/).
    Status {
        /// The admin listener: http://IP:PORT or http://localhost:PORT (no name lookups).
        #[arg(long, default_value = "http://127.0.0.1:15000")]
        url: String,
        /// Denied and audited names listed, most frequent first.
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// List every entry, also those without flows.
        #[arg(long)]
        all: bool,
    },
    /// The decision the proxy would take for a flow, the reason and the entry.
    Explain {
        #[arg(short, long, default_value = DEFAULT_PATH)]
        config: PathBuf,
        /// The original destination, IP:PORT.
        #[arg(long, required_unless_present_any = ["connect", "url"], conflicts_with_all = ["connect", "url"])]
        dst: Option<SocketAddr>,
        /// Explicit proxy: a `CONNECT HOST:PORT` request (with --sni or
        /// --host: what the tunnel's first bytes present).
        #[arg(long, conflicts_with = "url")]
        connect: Option<String>,
        /// Explicit proxy: an absolute-form request for this http:// URL.
        #[arg(long, conflicts_with_all = ["sni", "host"])]
        url: Option<String>,
        /// The TLS SNI the client presents.
        #[arg(long, conflicts_with = "host")]
        sni: Option<String>,
        /// The HTTP Host the client presents.
        #[arg(long)]
        host: Option<String>,
    },
    /// Istio ServiceEntry YAML to a complete config on stdout (`-` reads stdin).
    Import {
        /// YAML files (several documents, `kind: List`, other kinds skipped).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Keep only the ServiceEntries visible in this namespace (exportTo).
        #[arg(long)]
        namespace: Option<String>,
    },
}

/// Why a command failed. Every command's error goes through [`report`]:
/// one line on stderr and the exit code, both decided here and only here.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("portcullis: cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    HostMode(#[from] HostModeError),
    #[error(transparent)]
    Wait(#[from] WaitError),
    #[error("portcullis init: {0}")]
    Init(#[from] InitError),
    #[error("portcullis import: {0}")]
    Import(#[from] ImportFailure),
    #[error("{0}")]
    Status(String),
    /// A request `explain` cannot take apart: a usage error, like clap's.
    #[error("{0}")]
    ExplainUsage(String),
}

impl Failure {
    fn exit_code(&self) -> ExitCode {
        match self {
            Failure::ExplainUsage(_) => ExitCode::from(2),
            _ => ExitCode::from(1),
        }
    }
}

/// `portcullis import`'s own failures (the input, not a config).
#[derive(Debug, thiserror::Error)]
enum ImportFailure {
    #[error("-: cannot read stdin: {0}")]
    Stdin(std::io::Error),
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Convert(#[from] import::ImportError),
    #[error("{first}:1: no ServiceEntry converted ({found} found, {refused} refused)")]
    NothingConverted {
        first: String,
        found: usize,
        refused: usize,
    },
}

/// The one place a command's outcome becomes stderr text and an exit code.
fn report(outcome: Result<ExitCode, Failure>) -> ExitCode {
    outcome.unwrap_or_else(|e| {
        eprintln!("{e}");
        e.exit_code()
    })
}

/// `portcullis import`: exit 1 when an input is unreadable or not YAML, or
/// when no ServiceEntry was converted; warnings on stderr.
fn import(files: &[PathBuf], namespace: Option<String>) -> Result<(), ImportFailure> {
    let opts = import::Options { namespace };
    let mut out = import::Outcome::default();
    let mut sources = Vec::new();
    for f in files {
        let (shown, text) = if f.as_os_str() == "-" {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                .map_err(ImportFailure::Stdin)?;
            ("-".to_string(), s)
        } else {
            let text = std::fs::read_to_string(f).map_err(|source| ImportFailure::Read {
                file: f.display().to_string(),
                source,
            })?;
            (f.display().to_string(), text)
        };
        import::convert_file(&shown, &text, &opts, &mut out)?;
        sources.push(shown);
    }
    out.dedupe();
    for w in import::warnings(&out) {
        eprintln!("portcullis import: warning: {w}");
    }
    let converted = out.entries.iter().filter(|e| e.refused.is_none()).count();
    if converted == 0 {
        return Err(ImportFailure::NothingConverted {
            first: sources.first().cloned().unwrap_or_else(|| "-".into()),
            found: out.entries.len(),
            refused: out.entries.len() - converted,
        });
    }
    print!("{}", import::render_config(&sources, &out));
    Ok(())
}

fn load(path: &std::path::Path) -> Result<Arc<Config>, ConfigError> {
    Config::load(path).map(Arc::new)
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PORTCULLIS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // colours only for a terminal, never into log files and collectors
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

fn run_proxy(config: &std::path::Path) -> Result<(), Failure> {
    init_tracing();
    portcullis::server::start(config).map_err(|e| match e {
        RunError::Runtime(e) => Failure::Runtime(e),
        e => Failure::Run(e),
    })
}

fn init(opts: &portcullis::init::Options) -> Result<(), InitError> {
    let out = portcullis::init::run(opts)?;
    for note in &out.notes {
        eprintln!("portcullis init: {note}");
    }
    print!("{}", out.stdout);
    Ok(())
}

fn check(config: &std::path::Path) -> Result<(), ConfigError> {
    let cfg = load(config)?;
    print!("{}", portcullis::explain::summary(&cfg));
    if let Some(w) = portcullis::upstream::resolve::loopback_warning(&cfg.proxy) {
        println!("warning: {w}");
    }
    Ok(())
}

/// What `explain` was asked about: an original destination (transparent
/// mode) or an explicit-proxy request.
struct Question {
    dst: Option<SocketAddr>,
    connect: Option<String>,
    url: Option<String>,
    sni: Option<String>,
    host: Option<String>,
}

fn explain(config: &std::path::Path, q: Question) -> Result<(), Failure> {
    let cfg = load(config)?;
    let (sni, host) = (q.sni.as_deref(), q.host.as_deref());
    let text = match q.dst {
        Some(dst) => portcullis::explain::explain(cfg, dst, sni, host),
        None => portcullis::proxy::explicit::explain(
            cfg,
            q.connect.as_deref(),
            q.url.as_deref(),
            sni,
            host,
        )
        .map_err(Failure::ExplainUsage)?,
    };
    print!("{text}");
    Ok(())
}

/// Runs one command; `Ok` carries the exit code of a success (host mode
/// passes on the proxy's own).
fn dispatch(command: Command) -> Result<ExitCode, Failure> {
    match command {
        Command::Run {
            config,
            redirect: false,
        } => run_proxy(&config)?,
        Command::Run {
            config,
            redirect: true,
        } => return Ok(ExitCode::from(portcullis::host_mode::run(&config)?)),
        Command::Wait { url, timeout } => portcullis::wait::wait(&url, timeout)?,
        Command::Init {
            config,
            dry_run,
            cleanup,
            backend,
        } => init(&portcullis::init::Options {
            config,
            dry_run,
            cleanup,
            backend,
        })?,
        Command::Import { files, namespace } => import(&files, namespace)?,
        Command::Check { config } => check(&config)?,
        Command::Status { url, top, all } => {
            let text = portcullis::page::status::status(&url, top, all).map_err(Failure::Status)?;
            print!("{text}");
        }
        Command::Explain {
            config,
            dst,
            connect,
            url,
            sni,
            host,
        } => explain(
            &config,
            Question {
                dst,
                connect,
                url,
                sni,
                host,
            },
        )?,
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    report(dispatch(Cli::parse().command))
}
