//! CLI dispatch: the only place that prints errors and picks exit codes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use portcullis::config::{Config, DEFAULT_PATH};

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
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
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

/// `portcullis import`: exit 1 when an input is unreadable or not YAML, or
/// when no ServiceEntry was converted; warnings on stderr.
fn import(files: &[PathBuf], namespace: Option<String>) -> ExitCode {
    use portcullis::import;
    let opts = import::Options { namespace };
    let mut out = import::Outcome::default();
    let mut sources = Vec::new();
    for f in files {
        let (shown, text) = if f.as_os_str() == "-" {
            let mut s = String::new();
            if let Err(e) = std::io::Read::read_to_string(&mut std::io::stdin(), &mut s) {
                eprintln!("portcullis import: -: cannot read stdin: {e}");
                return ExitCode::from(1);
            }
            ("-".to_string(), s)
        } else {
            match std::fs::read_to_string(f) {
                Ok(s) => (f.display().to_string(), s),
                Err(e) => {
                    eprintln!("portcullis import: {}: cannot read: {e}", f.display());
                    return ExitCode::from(1);
                }
            }
        };
        if let Err(e) = import::convert_file(&shown, &text, &opts, &mut out) {
            eprintln!("portcullis import: {e}");
            return ExitCode::from(1);
        }
        sources.push(shown);
    }
    out.dedupe();
    for w in import::warnings(&out) {
        eprintln!("portcullis import: warning: {w}");
    }
    let converted = out.entries.iter().filter(|e| e.refused.is_none()).count();
    if converted == 0 {
        let first = sources.first().map(String::as_str).unwrap_or("-");
        eprintln!(
            "portcullis import: {first}:1: no ServiceEntry converted ({} found, {} refused)",
            out.entries.len(),
            out.entries.len() - converted
        );
        return ExitCode::from(1);
    }
    print!("{}", import::render_config(&sources, &out));
    ExitCode::SUCCESS
}

fn load(path: &std::path::Path) -> Result<Arc<Config>, ExitCode> {
    Config::load(path).map(Arc::new).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(1)
    })
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    portcullis::config::parse_duration(s)
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

fn run_proxy(config: &std::path::Path) -> ExitCode {
    init_tracing();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("portcullis: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(portcullis::server::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            config,
            redirect: false,
        } => run_proxy(&config),
        Command::Run {
            config,
            redirect: true,
        } => match portcullis::host_mode::run(&config) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(1)
            }
        },
        Command::Wait { url, timeout } => match portcullis::wait::wait(&url, timeout) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(1)
            }
        },
        Command::Init {
            config,
            dry_run,
            cleanup,
            backend,
        } => {
            let opts = portcullis::init::Options {
                config,
                dry_run,
                cleanup,
                backend,
            };
            match portcullis::init::run(&opts) {
                Ok(out) => {
                    for note in &out.notes {
                        eprintln!("portcullis init: {note}");
                    }
                    print!("{}", out.stdout);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("portcullis init: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Import { files, namespace } => import(&files, namespace),
        Command::Check { config } => match load(&config) {
            Ok(cfg) => {
                print!("{}", portcullis::explain::summary(&cfg));
                if let Some(w) = portcullis::upstream::resolve::loopback_warning(&cfg.proxy) {
                    println!("warning: {w}");
                }
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Status { url, top, all } => {
            match portcullis::page::status::status(&url, top, all) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Explain {
            config,
            dst,
            connect,
            url,
            sni,
            host,
        } => match load(&config) {
            Ok(cfg) => {
                let text = match (dst, connect, url) {
                    (Some(dst), _, _) => {
                        portcullis::explain::explain(cfg, dst, sni.as_deref(), host.as_deref())
                    }
                    (None, connect, url) => match portcullis::proxy::explicit::explain(
                        cfg,
                        connect.as_deref(),
                        url.as_deref(),
                        sni.as_deref(),
                        host.as_deref(),
                    ) {
                        Ok(t) => t,
                        Err(e) => {
                            eprintln!("{e}");
                            return ExitCode::from(2);
                        }
                    },
                };
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
    }
}
