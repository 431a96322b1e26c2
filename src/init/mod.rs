//! Redirect stage, set-up side (`portcullis init`): renders the iptables rules
//! of `[redirect]` and the policy (docs/DESIGN.md §5) and applies them atomically
//! with `iptables-restore --noflush` / `ip6tables-restore --noflush`.
//!
//! - [`render`] is pure: config + resolver list -> rules (the golden files in
//!   `iptables/` are its output);
//! - [`apply`] reads `*-save` output, plans the restore input against what is
//!   installed (jumps only where missing, stale chains removed), picks the
//!   backend and runs the tools;
//! - [`run`] is the command: `--dry-run`, `--cleanup`, `--backend`.
//!
//! The resolvers whose TCP port 53 is never redirected come from the file
//! named by `PORTCULLIS_RESOLV_CONF` (default `/etc/resolv.conf`).

pub mod apply;
pub mod render;

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::config::{Config, ConfigError};
use crate::net::canonical_ip;

pub use apply::{Backend, BackendChoice};
pub use render::{render, Family, Rules};

/// Names the resolv.conf that `init` reads (tests pin it; so can operators
/// whose resolver lives elsewhere).
pub const RESOLV_CONF_ENV: &str = "PORTCULLIS_RESOLV_CONF";
pub const DEFAULT_RESOLV_CONF: &str = "/etc/resolv.conf";

/// Why `init` failed: one sentence each, saying what to check.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{path}: cannot read the resolvers: {source}")]
    ResolvConf {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{tool} not found: install iptables (the nft or legacy variant) in this image or host"
    )]
    ToolMissing { tool: String },
    #[error("{tool}: permission denied: portcullis init must run as root (or with CAP_NET_ADMIN and CAP_NET_RAW) in the workload's network namespace")]
    Permission { tool: String },
    #[error("cannot run {tool}: {source}")]
    Spawn {
        tool: String,
        source: std::io::Error,
    },
    #[error("{tool} failed (exit status {status}): {stderr}")]
    ToolFailed {
        tool: String,
        status: i32,
        stderr: String,
    },
    #[error("no iptables backend found: install iptables (iptables-nft-restore or iptables-legacy-restore)")]
    NoBackend,
}

/// What the command line asked for.
#[derive(Debug, Clone)]
pub struct Options {
    pub config: PathBuf,
    pub dry_run: bool,
    pub cleanup: bool,
    pub backend: BackendChoice,
}

/// What `init` has to say: `stdout` for the operator (or the dry-run text),
/// `notes` for stderr (warnings, skipped families).
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub stdout: String,
    pub notes: Vec<String>,
}

/// `portcullis init`.
pub fn run(opts: &Options) -> Result<Outcome, InitError> {
    if opts.cleanup {
        return cleanup(opts.backend, opts.dry_run);
    }
    let cfg = Config::load(&opts.config)?;
    if opts.dry_run {
        let rules = render::render(&cfg, &resolvers_from_env()?);
        return Ok(Outcome {
            stdout: rules.dry_run_text(),
            notes: render::warnings(&cfg),
        });
    }
    install(&cfg, opts.backend)
}

/// Installs the rules of `cfg` in the current network namespace (what
/// `init` does, and what `run --redirect` needs before it starts the proxy).
pub fn install(cfg: &Config, choice: BackendChoice) -> Result<Outcome, InitError> {
    let rules = render::render(cfg, &resolvers_from_env()?);
    let mut notes = render::warnings(cfg);
    let tools = apply::Tools::default();
    let backend = pick_backend(&tools, choice)?;
    let mut summary = Vec::new();
    for rs in rules.families() {
        if rs.family == Family::V6 && !ipv6_in_kernel() {
            notes.push("IPv6 is not available in this kernel: IPv6 rules skipped".into());
            continue;
        }
        let saved = apply::parse_save(&tools.save(backend, rs.family)?);
        let plan = apply::plan(Some(rs), &saved);
        if !plan.is_empty() {
            tools.restore(backend, rs.family, &plan.input)?;
        }
        let tables: Vec<&str> = rs.tables.iter().map(|t| t.name).collect();
        summary.push(format!(
            "{}: {} ({} jumps inserted, {} already present{})",
            rs.family.name(),
            if tables.is_empty() {
                "no rules".to_string()
            } else {
                tables.join(" and ")
            },
            plan.stats.jumps_inserted,
            plan.stats.jumps_kept,
            if plan.stats.chains_removed > 0 {
                format!(", {} stale chains removed", plan.stats.chains_removed)
            } else {
                String::new()
            }
        ));
    }
    Ok(Outcome {
        stdout: format!(
            "portcullis init: rules installed with iptables-{}: {}\n",
            backend.name(),
            summary.join("; ")
        ),
        notes,
    })
}

/// `--cleanup`: every chain and jump portcullis owns goes, whatever the
/// config says now (it is not even read). Under `auto` every backend present
/// is cleaned (rules may have been installed under another one). With
/// `dry_run` the restore input is printed instead of applied.
pub fn cleanup(choice: BackendChoice, dry_run: bool) -> Result<Outcome, InitError> {
    let tools = apply::Tools::default();
    let backends = match choice {
        BackendChoice::Nft => vec![Backend::Nft],
        BackendChoice::Legacy => vec![Backend::Legacy],
        BackendChoice::Auto => {
            let mut found: Vec<Backend> = [Backend::Nft, Backend::Legacy]
                .into_iter()
                .filter(|b| tools.has(&b.tool(Family::V4, true)))
                .collect();
            if found.is_empty() && tools.has(&Backend::Plain.tool(Family::V4, true)) {
                found.push(Backend::Plain);
            }
            if found.is_empty() {
                return Err(InitError::NoBackend);
            }
            found
        }
    };
    let mut out = String::new();
    let mut removed = Vec::new();
    let mut notes = Vec::new();
    for backend in backends {
        for fam in [Family::V4, Family::V6] {
            if fam == Family::V6 && !ipv6_in_kernel() {
                continue;
            }
            let saved = match tools.save(backend, fam) {
                Ok(s) => s,
                // Under auto, a backend that cannot even list (no kernel
                // support) holds nothing; a permission problem is fatal.
                Err(InitError::ToolFailed { tool, .. }) if choice == BackendChoice::Auto => {
                    notes.push(format!("{tool} failed: nothing cleaned there"));
                    continue;
                }
                Err(e) => return Err(e),
            };
            let plan = apply::plan(None, &apply::parse_save(&saved));
            if plan.is_empty() {
                continue;
            }
            if dry_run {
                out.push_str(&format!("# {}\n", backend.tool(fam, false)));
                out.push_str(&plan.input);
            } else {
                tools.restore(backend, fam, &plan.input)?;
            }
            removed.push(format!(
                "{} {}: {} chains, {} jumps",
                backend.name(),
                fam.name(),
                plan.stats.chains_removed,
                plan.stats.rules_deleted
            ));
        }
    }
    if !dry_run {
        out = if removed.is_empty() {
            "portcullis init --cleanup: no portcullis rules found\n".to_string()
        } else {
            format!(
                "portcullis init --cleanup: removed {}\n",
                removed.join("; ")
            )
        };
    }
    Ok(Outcome { stdout: out, notes })
}

fn pick_backend(tools: &apply::Tools, choice: BackendChoice) -> Result<Backend, InitError> {
    let present = |b: Backend| tools.has(&b.tool(Family::V4, false));
    match choice {
        BackendChoice::Nft => Ok(Backend::Nft),
        BackendChoice::Legacy => Ok(Backend::Legacy),
        BackendChoice::Auto => {
            // Read the rules of both (saving never creates tables, listing
            // with iptables-legacy can); a backend that fails to list counts
            // as missing, unless it is a permission problem.
            let mut counts = [None, None];
            for (i, b) in [Backend::Nft, Backend::Legacy].into_iter().enumerate() {
                if !present(b) {
                    continue;
                }
                let mut n = 0;
                let mut ok = true;
                for fam in [Family::V4, Family::V6] {
                    if fam == Family::V6 && !ipv6_in_kernel() {
                        continue;
                    }
                    match tools.save(b, fam) {
                        Ok(text) => n += apply::count_rules(&text),
                        Err(e @ InitError::Permission { .. }) => return Err(e),
                        Err(_) => ok = false,
                    }
                }
                if ok {
                    counts[i] = Some(n);
                }
            }
            match apply::choose_backend(counts[0], counts[1]) {
                Some(b) => Ok(b),
                None if present(Backend::Plain) => Ok(Backend::Plain),
                None if present(Backend::Nft) => Ok(Backend::Nft),
                None if present(Backend::Legacy) => Ok(Backend::Legacy),
                None => Err(InitError::ToolMissing {
                    tool: "iptables-restore".into(),
                }),
            }
        }
    }
}

fn ipv6_in_kernel() -> bool {
    Path::new("/proc/net/if_inet6").exists()
}

/// The resolvers of the resolv.conf named by `PORTCULLIS_RESOLV_CONF`
/// (default /etc/resolv.conf). A missing file means no resolvers.
pub fn resolvers_from_env() -> Result<Vec<IpAddr>, InitError> {
    let path = std::env::var_os(RESOLV_CONF_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_RESOLV_CONF));
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(parse_resolv_conf(&text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(InitError::ResolvConf {
            path: path.display().to_string(),
            source,
        }),
    }
}

/// The `nameserver` addresses of a resolv.conf, in order, without duplicates
/// and without loopback ones (loopback is never redirected anyway). A zone
/// (`fe80::1%eth0`) is dropped; lines that do not parse are ignored, as the
/// C library does.
pub fn parse_resolv_conf(text: &str) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(addr) = words.next() else { continue };
        let addr = addr.split('%').next().unwrap_or(addr);
        if let Ok(ip) = addr.parse::<IpAddr>() {
            let ip = canonical_ip(ip);
            if !ip.is_loopback() && !out.contains(&ip) {
                out.push(ip);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf() {
        let text = "# comment\nsearch example.com\nnameserver 192.0.2.53\nnameserver 127.0.0.53\nnameserver fe80::1%eth0\nnameserver 192.0.2.53\n; nameserver 198.51.100.1\nnameserver bogus\nnameserver ::ffff:198.51.100.9\noptions ndots:5\n";
        let got: Vec<String> = parse_resolv_conf(text)
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert_eq!(got, vec!["192.0.2.53", "fe80::1", "198.51.100.9"]);
    }
}
