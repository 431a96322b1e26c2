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
    /// Validate a config file: prints a summary and warnings; exit 0 valid, 1 invalid.
    Check {
        #[arg(short, long, default_value = DEFAULT_PATH)]
        config: PathBuf,
    },
    /// The decision the proxy would take for a flow, the reason and the entry.
    Explain {
        #[arg(short, long, default_value = DEFAULT_PATH)]
        config: PathBuf,
        /// The original destination, IP:PORT.
        #[arg(long)]
        dst: SocketAddr,
        /// The TLS SNI the client presents.
        #[arg(long, conflicts_with = "host")]
        sni: Option<String>,
        /// The HTTP Host the client presents.
        #[arg(long)]
        host: Option<String>,
    },
}

fn load(path: &std::path::Path) -> Result<Arc<Config>, ExitCode> {
    Config::load(path).map(Arc::new).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(1)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match load(&config) {
            Ok(cfg) => {
                print!("{}", portcullis::explain::summary(&cfg));
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Explain {
            config,
            dst,
            sni,
            host,
        } => match load(&config) {
            Ok(cfg) => {
                print!(
                    "{}",
                    portcullis::explain::explain(cfg, dst, sni.as_deref(), host.as_deref())
                );
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
    }
}
