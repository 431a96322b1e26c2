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
//! What it reads on the target host ([`host`]): the resolvers of the file
//! named by `PORTCULLIS_RESOLV_CONF` (default `/etc/resolv.conf`), the owner
//! of a local DNS stub's socket, the uids of `dhcp_client_uids`.

pub mod apply;
pub mod host;
pub mod render;

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::config::{Config, ConfigError};

pub use apply::{Backend, BackendChoice};
pub use host::{HostFacts, DEFAULT_RESOLV_CONF, RESOLV_CONF_ENV};
pub use render::{render, render_for, Family, Rules};

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
    #[error("Istio's iptables chains ({chains}) are in this network namespace, and portcullis cannot share a pod with the Istio sidecar (same uid 1337 and ports 15001, 15000, 15021), so turn sidecar injection off for this pod (annotation sidecar.istio.io/inject: \"false\") and restart it")]
    BesideIstio { chains: String },
    #[error("{path}: [proxy] listen is empty (an explicit-proxy-only config): there is no listener to redirect to, so there are no rules to install; use HTTPS_PROXY and a NetworkPolicy instead (README \"Explicit proxy mode\")")]
    NothingToRedirect { path: String },
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
    refuse_without_listener(&cfg)?;
    if opts.dry_run {
        let facts = HostFacts::gather(&cfg)?;
        let rules = render::render_for(&cfg, &facts);
        let mut notes = facts.warnings.clone();
        notes.extend(render::warnings(&cfg, &facts));
        return Ok(Outcome {
            stdout: rules.dry_run_text(),
            notes,
        });
    }
    install(&cfg, opts.backend)
}

/// Installs the rules of `cfg` in the current network namespace (what
/// `init` does, and what `run --redirect` needs before it starts the proxy).
pub fn install(cfg: &Config, choice: BackendChoice) -> Result<Outcome, InitError> {
    refuse_without_listener(cfg)?;
    let facts = HostFacts::gather(cfg)?;
    let rules = render::render_for(cfg, &facts);
    let mut notes = facts.warnings.clone();
    notes.extend(render::warnings(cfg, &facts));
    let tools = apply::Tools::default();
    let backend = pick_backend(&tools, choice)?;
    refuse_beside_istio(&tools)?;
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
    let mut stdout = format!(
        "portcullis init: rules installed with iptables-{}: {}\n",
        backend.name(),
        summary.join("; ")
    );
    for line in &rules.chosen {
        stdout.push_str(&format!("portcullis init: {line}\n"));
    }
    Ok(Outcome { stdout, notes })
}

/// Rules that redirect TCP to a port nothing listens on would cut the
/// workload off: an explicit-proxy-only config (`listen = []`) gets none.
fn refuse_without_listener(cfg: &Config) -> Result<(), InitError> {
    if cfg.proxy.listen.is_empty() {
        return Err(InitError::NothingToRedirect {
            path: cfg.path.display().to_string(),
        });
    }
    Ok(())
}

/// Istio's init container (or CNI plugin) leaves chains named `ISTIO_*`
/// (ISTIO_OUTPUT, ISTIO_REDIRECT, ISTIO_INBOUND, ...) in the pod's network
/// namespace. Its sidecar runs as uid 1337 on ports 15001/15000/15021, the
/// defaults portcullis took from it: beside it portcullis either cannot bind,
/// or Envoy's uid matches portcullis's exclusion and egress passes unchecked.
/// Every backend present is read: Istio may have used the other one.
fn refuse_beside_istio(tools: &apply::Tools) -> Result<(), InitError> {
    let mut found: Vec<String> = Vec::new();
    let mut backends: Vec<Backend> = [Backend::Nft, Backend::Legacy]
        .into_iter()
        .filter(|b| tools.has(&b.tool(Family::V4, true)))
        .collect();
    if backends.is_empty() {
        backends.push(Backend::Plain);
    }
    for b in backends {
        for fam in [Family::V4, Family::V6] {
            if fam == Family::V6 && !ipv6_in_kernel() {
                continue;
            }
            let text = match tools.save(b, fam) {
                Ok(t) => t,
                Err(e @ InitError::Permission { .. }) => return Err(e),
                // a backend without kernel support holds nothing
                Err(_) => continue,
            };
            for c in istio_chains(&text) {
                if !found.contains(&c) {
                    found.push(c);
                }
            }
        }
    }
    if found.is_empty() {
        return Ok(());
    }
    let more = found.len().saturating_sub(3);
    found.truncate(3);
    let mut chains = found.join(", ");
    if more > 0 {
        chains.push_str(&format!(" and {more} more"));
    }
    Err(InitError::BesideIstio { chains })
}

/// The chains of an iptables-save text that Istio made (`ISTIO_*`, any
/// table: sidecar mode uses nat, TPROXY interception and ambient mode also
/// mangle).
pub fn istio_chains(save: &str) -> Vec<String> {
    apply::parse_save(save)
        .into_iter()
        .flat_map(|t| t.chains)
        .filter(|c| c.starts_with("ISTIO_"))
        .collect()
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

/// The non-loopback `nameserver` addresses of a resolv.conf, in order,
/// without duplicates (see [`host::parse_nameservers`] for both kinds).
pub fn parse_resolv_conf(text: &str) -> Vec<IpAddr> {
    host::parse_nameservers(text).remote
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

    #[test]
    fn istio_chains_are_found_in_any_table() {
        // abridged from what istio-iptables leaves in a meshed pod
        let save = "*mangle\n:PREROUTING ACCEPT [0:0]\n:ISTIO_DIVERT - [0:0]\nCOMMIT\n*nat\n:OUTPUT ACCEPT [0:0]\n:ISTIO_INBOUND - [0:0]\n:ISTIO_OUTPUT - [0:0]\n:ISTIO_REDIRECT - [0:0]\n:PORTCULLIS_OUTPUT - [0:0]\n-A OUTPUT -p tcp -j ISTIO_OUTPUT\n-A ISTIO_OUTPUT -j ISTIO_REDIRECT\nCOMMIT\n";
        assert_eq!(
            istio_chains(save),
            [
                "ISTIO_DIVERT",
                "ISTIO_INBOUND",
                "ISTIO_OUTPUT",
                "ISTIO_REDIRECT"
            ]
        );
        assert!(
            istio_chains("*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -j ISTIO_GONE\nCOMMIT\n")
                .is_empty()
        );
    }
}
