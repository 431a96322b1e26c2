//! Observability stage: the Prometheus metrics of docs/DESIGN.md §4. Label values
//! come from the registry (entry names) and fixed enums only, so cardinality
//! is bounded by the config, never by what clients send.

use nix::unistd::SysconfVar;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::vocab::{Decision, Protocol, Reason};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    pub decision: Decision,
    pub protocol: Protocol,
    pub entry: String,
    /// Empty for an allowed flow.
    pub reason: Option<Reason>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub direction: &'static str,
    pub entry: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EntryLabel {
    pub entry: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// The `health` or `admin` listener, and why one of its connections was
/// refused or closed (`peer_limit`, `total_limit`, `header_timeout`,
/// `idle_timeout`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub listener: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    pub listener: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub connections: Family<ConnLabels, Counter>,
    pub active: Gauge,
    pub bytes: Family<BytesLabels, Counter>,
    pub connect_errors: Family<EntryLabel, Counter>,
    pub reloads: Family<ResultLabel, Counter>,
    pub last_reload_ok: Gauge,
    pub log_dropped: Counter,
    pub detect_seconds: Histogram,
    pub detect_examined: Counter,
    pub rules_match: Gauge,
    pub accept_errors: Counter,
    pub endpoint_refused: Family<EndpointLabels, Counter>,
    pub endpoint_closed: Family<EndpointLabels, Counter>,
    pub endpoint_connections: Family<ListenerLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("portcullis");
        let connections = Family::<ConnLabels, Counter>::default();
        let active = Gauge::default();
        let bytes = Family::<BytesLabels, Counter>::default();
        let connect_errors = Family::<EntryLabel, Counter>::default();
        let reloads = Family::<ResultLabel, Counter>::default();
        let last_reload_ok = Gauge::default();
        let log_dropped = Counter::default();
        let detect_seconds = Histogram::new([
            0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ]);
        let detect_examined = Counter::default();
        let rules_match = Gauge::default();
        let accept_errors = Counter::default();
        let endpoint_refused = Family::<EndpointLabels, Counter>::default();
        let endpoint_closed = Family::<EndpointLabels, Counter>::default();
        let endpoint_connections = Family::<ListenerLabel, Gauge>::default();
        registry.register(
            "connections",
            "Flows by decision, detected protocol, entry and reason",
            connections.clone(),
        );
        registry.register("active_connections", "Flows open now", active.clone());
        registry.register(
            "bytes",
            "Bytes relayed, counted as they move",
            bytes.clone(),
        );
        registry.register(
            "upstream_connect_errors",
            "Allowed flows whose upstream could not be reached",
            connect_errors.clone(),
        );
        registry.register(
            "config_reloads",
            "Config reloads by result",
            reloads.clone(),
        );
        registry.register(
            "config_last_reload_successful",
            "1 if the last reload (or the start) loaded a valid config",
            last_reload_ok.clone(),
        );
        registry.register(
            "access_log_dropped",
            "Access log lines dropped because the writer could not keep up",
            log_dropped.clone(),
        );
        registry.register(
            "detect_seconds",
            "Time from accept to a classified first flight (ClientHello, request head or opaque)",
            detect_seconds.clone(),
        );
        registry.register(
            "detect_bytes_examined",
            "Bytes the protocol detector looked at",
            detect_examined.clone(),
        );
        registry.register(
            "rules_match_config",
            "1 if the installed non-TCP filter matches the policy in force (0: re-run init)",
            rules_match.clone(),
        );
        registry.register(
            "accept_errors",
            "accept(2) failures (EMFILE and the like), each followed by a back-off",
            accept_errors.clone(),
        );
        registry.register(
            "endpoint_refused",
            "Connections to the health or admin listener refused at its per-peer or total cap",
            endpoint_refused.clone(),
        );
        registry.register(
            "endpoint_closed",
            "Connections to the health or admin listener closed by its header or idle timeout",
            endpoint_closed.clone(),
        );
        registry.register(
            "endpoint_connections",
            "Connections the health or admin listener holds now",
            endpoint_connections.clone(),
        );
        last_reload_ok.set(1);
        rules_match.set(1);
        // Both results exist from the start, so rate() and alerts see a 0.
        for result in ["success", "failure"] {
            let _ = reloads.get_or_create(&ResultLabel { result });
        }
        Metrics {
            registry,
            connections,
            active,
            bytes,
            connect_errors,
            reloads,
            last_reload_ok,
            log_dropped,
            detect_seconds,
            detect_examined,
            rules_match,
            accept_errors,
            endpoint_refused,
            endpoint_closed,
            endpoint_connections,
        }
    }

    /// The counters a flow bumps as its bytes move, looked up once per flow.
    pub fn byte_counters(&self, entry: &str) -> (Counter<u64, AtomicU64>, Counter<u64, AtomicU64>) {
        let up = self
            .bytes
            .get_or_create(&BytesLabels {
                direction: "upstream",
                entry: entry.to_string(),
            })
            .clone();
        let down = self
            .bytes
            .get_or_create(&BytesLabels {
                direction: "downstream",
                entry: entry.to_string(),
            })
            .clone();
        (up, down)
    }

    /// Prometheus text exposition, process metrics included.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        let process = process_metrics();
        match out.rfind("# EOF") {
            Some(pos) => out.insert_str(pos, &process),
            None => out.push_str(&process),
        }
        out
    }
}

/// Open and max fds, RSS and CPU of this process, read from /proc at scrape
/// time (cheap, and always current). Named as the Prometheus client
/// libraries name them, so existing dashboards work.
fn process_metrics() -> String {
    let open = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count().saturating_sub(1)) // the directory handle itself
        .unwrap_or(0);
    let max = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(0);
    let page = sysconf(SysconfVar::PAGE_SIZE).unwrap_or(4096);
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * page;
    let ticks = sysconf(SysconfVar::CLK_TCK).unwrap_or(100) as f64;
    let cpu = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| cpu_seconds(&s, ticks))
        .unwrap_or(0.0);
    format!(
        "# HELP process_open_fds Number of open file descriptors.\n# TYPE process_open_fds gauge\nprocess_open_fds {open}\n\
# HELP process_max_fds Maximum number of open file descriptors (the soft limit).\n# TYPE process_max_fds gauge\nprocess_max_fds {max}\n\
# HELP process_resident_memory_bytes Resident memory size in bytes.\n# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {rss}\n\
# HELP process_cpu_seconds Total user and system CPU time spent in seconds.\n# TYPE process_cpu_seconds counter\nprocess_cpu_seconds_total {cpu}\n"
    )
}

fn sysconf(var: SysconfVar) -> Option<u64> {
    match nix::unistd::sysconf(var) {
        Ok(Some(v)) if v > 0 => Some(v as u64),
        _ => None,
    }
}

/// utime + stime of /proc/PID/stat, in seconds. The command name (field 2)
/// may hold spaces and parentheses: fields are counted after its last ')'.
fn cpu_seconds(stat: &str, ticks: f64) -> Option<f64> {
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[allow(unused_imports)]
    use crate::vocab::{Decision, Mode, Protocol, Reason};

    #[test]
    fn exposition_names_and_eof() {
        let m = Metrics::new();
        m.connections
            .get_or_create(&ConnLabels {
                decision: Decision::Deny,
                protocol: Protocol::Tls,
                entry: "BlackHole".into(),
                reason: Some(Reason::NotInRegistry),
            })
            .inc();
        m.detect_seconds.observe(0.002);
        let (up, _) = m.byte_counters("api");
        up.inc_by(7);
        let text = m.render();
        for line in [
            "# TYPE portcullis_connections counter",
            "portcullis_connections_total{decision=\"deny\",protocol=\"tls\",entry=\"BlackHole\",reason=\"not_in_registry\"} 1",
            "portcullis_active_connections 0",
            "portcullis_bytes_total{direction=\"upstream\",entry=\"api\"} 7",
            "portcullis_bytes_total{direction=\"downstream\",entry=\"api\"} 0",
            "portcullis_config_reloads_total{result=\"success\"} 0",
            "portcullis_config_reloads_total{result=\"failure\"} 0",
            "portcullis_config_last_reload_successful 1",
            "portcullis_access_log_dropped_total 0",
            "# TYPE portcullis_detect_seconds histogram",
            "portcullis_detect_seconds_count 1",
            "portcullis_detect_bytes_examined_total 0",
            "portcullis_rules_match_config 1",
            "# TYPE process_open_fds gauge",
            "# TYPE process_max_fds gauge",
            "# TYPE process_resident_memory_bytes gauge",
            "# TYPE process_cpu_seconds counter",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1);
        let rss: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
            .unwrap()
            .parse()
            .unwrap();
        assert!(rss > 1 << 20, "{rss}");
    }

    #[test]
    fn cpu_from_stat_with_odd_command_names() {
        let stat = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 1 0 0";
        assert_eq!(cpu_seconds(stat, 100.0), Some(3.0));
        assert_eq!(cpu_seconds("garbage", 100.0), None);
    }
}
