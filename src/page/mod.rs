//! The traffic page (docs/DESIGN.md §4): what the workload reaches, served
//! by the admin listener at `/`, with the JSON API under `/api/` it reads.
//!
//! Every number comes from the same counters as `/metrics`
//! (`portcullis_connections_total`, `portcullis_bytes_total`,
//! `portcullis_upstream_connect_errors_total`, keyed by entry, so bounded by
//! the registry) and from the denied-names store behind `/denied`. A
//! background task samples those counters every [`INTERVAL`] into a short
//! time series (flows per entry over the last 15 minutes): nothing is added
//! to the data path.
//!
//! Safe to open: the admin router only answers a Host that is a loopback
//! literal or `localhost` (so a page elsewhere cannot read it through DNS
//! rebinding), sends no CORS headers and a `Content-Security-Policy` of
//! `default-src 'self'`; the page is static HTML, CSS and JavaScript
//! embedded in the binary, and inserts every name as text.

pub mod status;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::{Deserialize, Serialize};

use crate::access_log::timestamp;
use crate::denied::denied_toml_blocks;
use crate::denied::{DeniedRecord, DENIED_MAX};
use crate::metrics::{BytesLabels, ConnLabels, EntryLabel};
use crate::state::Shared;
use crate::vocab::{Decision, Protocol, Reason};

/// How often the sampler reads the counters.
pub const INTERVAL: Duration = Duration::from_secs(5);
/// Samples kept: 15 minutes.
pub const SLOTS: usize = 180;
/// Samples summed into one point of an entry's trend in `/api/summary`.
const TREND_GROUP: usize = 6;

const DECISIONS: [Decision; 4] = [
    Decision::Allow,
    Decision::Deny,
    Decision::Audit,
    Decision::Passthrough,
];
const PROTOCOLS: [Protocol; 3] = [Protocol::Tls, Protocol::Http, Protocol::Tcp];
/// Every reason a transparent flow is counted with (none for allowed flows).
const REASONS: [Option<Reason>; 9] = [
    None,
    Some(Reason::NotInRegistry),
    Some(Reason::AddressMismatch),
    Some(Reason::Malformed),
    Some(Reason::TooLarge),
    Some(Reason::Timeout),
    Some(Reason::Dns),
    Some(Reason::Loop),
    Some(Reason::Overload),
];

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// What the counters say about one entry (or BlackHole / Passthrough).
#[derive(Clone, Debug, Default)]
struct Counts {
    /// by decision, in [`DECISIONS`] order
    flows: [u64; 4],
    by_protocol: [u64; 3],
    denials: BTreeMap<&'static str, u64>,
    bytes_up: u64,
    bytes_down: u64,
    connect_errors: u64,
}

impl Counts {
    fn total(&self) -> u64 {
        self.flows.iter().sum()
    }
}

/// Reads one entry's counters from the metric families, which cannot be
/// iterated: label sets are looked up (a hash and a read lock each, never a
/// write). `full` tries every decision, protocol and reason (108 lookups);
/// otherwise only the labels an entry's flows carry today (allow, no
/// reason: 3 lookups). Also returns how many label sets exist.
fn read_counts(shared: &Shared, name: &str, full: bool) -> (Counts, usize) {
    let m = &shared.metrics;
    let mut c = Counts::default();
    let mut found = 0;
    let mut labels = ConnLabels {
        decision: Decision::Allow,
        protocol: Protocol::Tcp,
        entry: name.to_string(),
        reason: None,
    };
    for (di, d) in DECISIONS.into_iter().enumerate() {
        if !full && d != Decision::Allow {
            continue;
        }
        labels.decision = d;
        for (pi, p) in PROTOCOLS.into_iter().enumerate() {
            labels.protocol = p;
            for r in REASONS {
                if !full && r.is_some() {
                    continue;
                }
                labels.reason = r;
                if let Some(n) = m.connections.get(&labels).map(|c| c.get()) {
                    found += 1;
                    c.flows[di] += n;
                    c.by_protocol[pi] += n;
                    if let (Some(r), true, Decision::Deny) = (r, n > 0, d) {
                        *c.denials.entry(r.as_str()).or_default() += n;
                    }
                }
            }
        }
    }
    let mut b = BytesLabels {
        direction: "upstream",
        entry: labels.entry,
    };
    c.bytes_up = m.bytes.get(&b).map(|c| c.get()).unwrap_or(0);
    b.direction = "downstream";
    c.bytes_down = m.bytes.get(&b).map(|c| c.get()).unwrap_or(0);
    c.connect_errors = m
        .connect_errors
        .get(&EntryLabel { entry: b.entry })
        .map(|c| c.get())
        .unwrap_or(0);
    (c, found)
}

/// Every name's counters: the cheap lookups for entries, the full set for
/// the catch-alls; if that found fewer label sets than the family holds
/// (flows labelled in a way this code does not expect), the full set for
/// every name.
fn read_all(shared: &Shared, names: &[(String, Kind)]) -> Vec<Counts> {
    let mut found = 0;
    let quick: Vec<Counts> = names
        .iter()
        .map(|(n, k)| {
            let (c, f) = read_counts(shared, n, *k != Kind::Entry);
            found += f;
            c
        })
        .collect();
    if found >= shared.metrics.connections.len() {
        return quick;
    }
    names
        .iter()
        .map(|(n, _)| read_counts(shared, n, true).0)
        .collect()
}

#[derive(Default)]
struct EntryTrack {
    /// total flows at the last sample (for the series)
    sampled: u64,
    /// total flows when last looked at (for last_seen)
    looked: u64,
    last_seen: Option<String>,
    /// flows per sample interval, oldest first
    series: VecDeque<u32>,
}

#[derive(Default)]
struct Track {
    entries: HashMap<String, EntryTrack>,
    /// by decision: flows per sample interval, oldest first
    decisions: [VecDeque<u32>; 4],
    decisions_sampled: [u64; 4],
    samples: u64,
}

fn push(ring: &mut VecDeque<u32>, v: u64) {
    if ring.len() >= SLOTS {
        ring.pop_front();
    }
    ring.push_back(v.min(u32::MAX as u64) as u32);
}

/// The page's state: the shared proxy state and the sampled series.
pub struct Page {
    shared: Arc<Shared>,
    track: Mutex<Track>,
    started: Instant,
}

/// Entry names to report: the registry in force, the two catch-alls, and
/// entries of earlier generations that carried traffic.
fn names(shared: &Shared, track: &Track) -> Vec<(String, Kind)> {
    let gen = shared.generation();
    let mut out: Vec<(String, Kind)> = gen
        .config()
        .entries
        .iter()
        .map(|e| (e.name.clone(), Kind::Entry))
        .collect();
    out.push(("BlackHole".into(), Kind::BlackHole));
    out.push(("Passthrough".into(), Kind::Passthrough));
    let mut old: Vec<&String> = track
        .entries
        .keys()
        .filter(|n| !out.iter().any(|(o, _)| o == *n))
        .collect();
    old.sort();
    out.extend(old.into_iter().map(|n| (n.clone(), Kind::Removed)));
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Kind {
    Entry,
    BlackHole,
    Passthrough,
    /// no longer in the config (a reload removed it); kept while it has counts
    Removed,
}

impl Page {
    pub fn new(shared: Arc<Shared>) -> Arc<Page> {
        Arc::new(Page {
            shared,
            track: Mutex::new(Track::default()),
            started: Instant::now(),
        })
    }

    /// Starts the sampler (needs a tokio runtime).
    pub fn spawn_sampler(self: &Arc<Self>) {
        let page = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                page.sample();
            }
        });
    }

    /// One sample: every entry's flow count since the last one.
    fn sample(&self) {
        let Ok(mut t) = self.track.lock() else { return };
        let names = names(&self.shared, &t);
        let first = t.samples == 0;
        let now = timestamp(SystemTime::now());
        let mut dec = [0u64; 4];
        let counts = read_all(&self.shared, &names);
        for ((name, _), c) in names.into_iter().zip(counts) {
            for (i, f) in c.flows.iter().enumerate() {
                dec[i] += f;
            }
            let total = c.total();
            if total == 0 && !t.entries.contains_key(&name) {
                continue;
            }
            let e = t.entries.entry(name).or_default();
            let delta = if first {
                0
            } else {
                total.saturating_sub(e.sampled)
            };
            e.sampled = total;
            if total > e.looked {
                e.looked = total;
                e.last_seen = Some(now.clone());
            }
            push(&mut e.series, delta);
        }
        // entries of the registry with no flows yet get zeros too
        let len = t.decisions[0].len();
        for e in t.entries.values_mut() {
            while e.series.len() <= len.min(SLOTS - 1) {
                e.series.push_front(0);
            }
        }
        // entries a reload removed are forgotten once idle for 15 minutes
        let gen = self.shared.generation();
        let current: std::collections::HashSet<&str> = gen
            .config()
            .entries
            .iter()
            .map(|e| e.name.as_str())
            .chain(["BlackHole", "Passthrough"])
            .collect();
        t.entries
            .retain(|name, e| current.contains(name.as_str()) || e.series.iter().any(|&v| v > 0));
        for (i, n) in dec.iter().enumerate() {
            let delta = if first {
                0
            } else {
                n.saturating_sub(t.decisions_sampled[i])
            };
            t.decisions_sampled[i] = *n;
            push(&mut t.decisions[i], delta);
        }
        t.samples += 1;
    }

    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/", get(index))
            .route("/app.js", get(app_js))
            .route("/app.css", get(app_css))
            .route("/api/summary", get(summary))
            .route("/api/denied", get(api_denied))
            .route("/api/series", get(series))
            .with_state(self.clone())
    }

    /// `/api/summary` (documented in the README).
    pub fn summary(&self) -> Summary {
        let shared = &self.shared;
        let gen = shared.generation();
        let cfg = gen.config();
        let now = timestamp(SystemTime::now());
        let Ok(mut t) = self.track.lock() else {
            return Summary::default();
        };
        let mut entries = Vec::new();
        let mut totals = Totals::default();
        let names = names(shared, &t);
        let counts = read_all(shared, &names);
        for ((name, kind), c) in names.into_iter().zip(counts) {
            let total = c.total();
            let track = if total > 0 || t.entries.contains_key(&name) {
                let e = t.entries.entry(name.clone()).or_default();
                if total > e.looked {
                    e.looked = total;
                    e.last_seen = Some(now.clone());
                }
                Some(&*e)
            } else {
                None
            };
            let conf = cfg.entries.iter().find(|e| e.name == name);
            for (i, d) in DECISIONS.iter().enumerate() {
                *totals.flows.entry(d.as_str()).or_default() += c.flows[i];
            }
            totals.bytes_up += c.bytes_up;
            totals.bytes_down += c.bytes_down;
            let series: Vec<u32> = track
                .map(|e| e.series.iter().copied().collect())
                .unwrap_or_default();
            let trend: Vec<u32> = {
                // newest group last; groups aligned to the end
                let mut v: Vec<u32> = series
                    .rchunks(TREND_GROUP)
                    .map(|c| c.iter().sum())
                    .collect();
                v.reverse();
                v
            };
            entries.push(EntrySummary {
                name: name.clone(),
                kind,
                hosts: conf
                    .map(|e| e.hosts.iter().map(|h| h.to_string()).collect())
                    .unwrap_or_default(),
                addresses: conf
                    .map(|e| e.addresses.iter().map(|a| a.to_string()).collect())
                    .unwrap_or_default(),
                ports: conf
                    .map(|e| {
                        e.ports
                            .iter()
                            .map(|p| PortSummary {
                                number: p.number,
                                protocol: p.protocol.config_name(),
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                resolution: conf.map(|e| format!("{:?}", e.resolution).to_uppercase()),
                flows: DECISIONS
                    .iter()
                    .zip(c.flows)
                    .map(|(d, n)| (d.as_str(), n))
                    .collect(),
                flows_total: total,
                protocols: PROTOCOLS
                    .iter()
                    .zip(c.by_protocol)
                    .map(|(p, n)| (p.log_name(), n))
                    .collect(),
                denials: c.denials,
                bytes_up: c.bytes_up,
                bytes_down: c.bytes_down,
                connect_errors: c.connect_errors,
                last_seen: track.and_then(|e| e.last_seen.clone()),
                trend,
            });
        }
        let decision_series = DECISIONS
            .iter()
            .zip(t.decisions.iter())
            .map(|(d, r)| (d.as_str(), r.iter().copied().collect()))
            .collect();
        drop(t);
        let reload = shared.reload_status();
        Summary {
            version: env!("CARGO_PKG_VERSION"),
            now,
            uptime_s: self.started.elapsed().as_secs(),
            config_path: cfg.path.display().to_string(),
            policy: match cfg.outbound_traffic_policy {
                crate::config::Policy::RegistryOnly => "REGISTRY_ONLY",
                crate::config::Policy::AllowAny => "ALLOW_ANY",
            },
            audit: cfg.audit,
            draining: shared.draining.load(std::sync::atomic::Ordering::Acquire),
            ready: shared.ready(),
            active: shared.active.load(std::sync::atomic::Ordering::Acquire) as u64,
            max_connections: shared.max_connections as u64,
            reload_ok: shared.metrics.last_reload_ok.get() == 1,
            reload,
            totals,
            entries,
            series: SeriesSummary {
                interval_s: INTERVAL.as_secs(),
                trend_group: TREND_GROUP,
                by_decision: decision_series,
            },
            denied_held: shared.denied.len(),
            denied_max: DENIED_MAX,
        }
    }
}

#[derive(Serialize, Default)]
pub struct Totals {
    pub flows: BTreeMap<&'static str, u64>,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

#[derive(Serialize)]
pub struct PortSummary {
    pub number: u16,
    pub protocol: &'static str,
}

#[derive(Serialize)]
pub struct EntrySummary {
    name: String,
    kind: Kind,
    hosts: Vec<String>,
    addresses: Vec<String>,
    ports: Vec<PortSummary>,
    resolution: Option<String>,
    flows: BTreeMap<&'static str, u64>,
    flows_total: u64,
    protocols: BTreeMap<&'static str, u64>,
    denials: BTreeMap<&'static str, u64>,
    bytes_up: u64,
    bytes_down: u64,
    connect_errors: u64,
    last_seen: Option<String>,
    trend: Vec<u32>,
}

#[derive(Serialize, Default)]
pub struct SeriesSummary {
    pub interval_s: u64,
    pub trend_group: usize,
    pub by_decision: BTreeMap<&'static str, Vec<u32>>,
}

#[derive(Serialize, Default)]
pub struct Summary {
    version: &'static str,
    now: String,
    uptime_s: u64,
    config_path: String,
    policy: &'static str,
    audit: bool,
    draining: bool,
    ready: bool,
    active: u64,
    max_connections: u64,
    reload_ok: bool,
    reload: crate::state::ReloadStatus,
    totals: Totals,
    entries: Vec<EntrySummary>,
    series: SeriesSummary,
    denied_held: usize,
    denied_max: usize,
}

// ------------------------------------------------------------ /api/denied

#[derive(Deserialize, Default)]
pub struct DeniedQuery {
    /// substring of the name or address (case-insensitive)
    q: Option<String>,
    /// names returned, default 50, at most 1000
    limit: Option<usize>,
    /// "count" (default) or "recent"
    sort: Option<String>,
}

#[derive(Serialize)]
pub struct DeniedName {
    /// the name, or the address of flows without one
    name: String,
    named: bool,
    count: u64,
    decisions: BTreeMap<&'static str, u64>,
    reasons: BTreeMap<&'static str, u64>,
    /// "443/tls", ...
    ports: Vec<String>,
    last_seen: String,
    /// the `[[service_entry]]` block that would allow it (as in
    /// `/denied?format=toml`); null when the registry admits it now
    toml: Option<String>,
    #[serde(skip)]
    seen: u64,
}

#[derive(Serialize)]
pub struct DeniedPage {
    held: usize,
    max: usize,
    names_total: usize,
    matched: usize,
    names: Vec<DeniedName>,
}

/// Groups the records by name (or address), filters, sorts, and renders the
/// TOML of the names returned.
fn denied_page(
    records: &[DeniedRecord],
    cfg: &crate::config::Config,
    q: &DeniedQuery,
) -> DeniedPage {
    let mut groups: HashMap<String, (DeniedName, Vec<&DeniedRecord>)> = HashMap::new();
    for r in records {
        let (key, named) = match (&r.name, r.ip) {
            (Some(n), _) => (n.clone(), true),
            (None, Some(ip)) => (ip.to_string(), false),
            _ => continue,
        };
        let g = groups.entry(key.clone()).or_insert_with(|| {
            (
                DeniedName {
                    name: key,
                    named,
                    count: 0,
                    decisions: BTreeMap::new(),
                    reasons: BTreeMap::new(),
                    ports: Vec::new(),
                    last_seen: String::new(),
                    toml: None,
                    seen: 0,
                },
                Vec::new(),
            )
        });
        g.0.count += r.count;
        if r.denied > 0 {
            *g.0.decisions.entry("deny").or_default() += r.denied;
        }
        if r.audited > 0 {
            *g.0.decisions.entry("audit").or_default() += r.audited;
        }
        if let Some(why) = r.reason {
            *g.0.reasons.entry(why.as_str()).or_default() += r.count;
        }
        let p = format!("{}/{}", r.port, r.protocol);
        if !g.0.ports.contains(&p) {
            g.0.ports.push(p);
        }
        if r.seen > g.0.seen {
            g.0.seen = r.seen;
            g.0.last_seen = r.last_seen.clone();
        }
        g.1.push(r);
    }
    let names_total = groups.len();
    let needle =
        q.q.as_deref()
            .map(str::to_ascii_lowercase)
            .unwrap_or_default();
    let mut v: Vec<(DeniedName, Vec<&DeniedRecord>)> = groups
        .into_values()
        .filter(|(n, _)| needle.is_empty() || n.name.to_ascii_lowercase().contains(&needle))
        .collect();
    let matched = v.len();
    match q.sort.as_deref() {
        Some("recent") => v.sort_by_key(|g| std::cmp::Reverse(g.0.seen)),
        _ => v.sort_by(|a, b| b.0.count.cmp(&a.0.count).then(b.0.seen.cmp(&a.0.seen))),
    }
    v.truncate(q.limit.unwrap_or(50).min(1000));
    // one call for the names shown: the registry is scanned once per record
    let shown: Vec<DeniedRecord> = v
        .iter()
        .flat_map(|(_, recs)| recs.iter().map(|r| (*r).clone()))
        .collect();
    let mut blocks: HashMap<String, String> = denied_toml_blocks(&shown, cfg).into_iter().collect();
    let names = v
        .into_iter()
        .map(|(mut n, _)| {
            n.ports.sort();
            n.toml = blocks.remove(&n.name);
            n
        })
        .collect();
    DeniedPage {
        held: records.len(),
        max: DENIED_MAX,
        names_total,
        matched,
        names,
    }
}

// ------------------------------------------------------------ handlers

fn json<T: Serialize>(v: &T) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string(v).unwrap_or_default(),
    )
        .into_response()
}

async fn index() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        INDEX_HTML,
    )
        .into_response()
}

async fn app_js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        APP_JS,
    )
        .into_response()
}

async fn app_css() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], APP_CSS).into_response()
}

async fn summary(State(p): State<Arc<Page>>) -> Response {
    json(&p.summary())
}

async fn api_denied(State(p): State<Arc<Page>>, Query(q): Query<DeniedQuery>) -> Response {
    let records = p.shared.denied.snapshot();
    let gen = p.shared.generation();
    json(&denied_page(&records, gen.config(), &q))
}

#[derive(Deserialize)]
pub struct SeriesQuery {
    entry: Option<String>,
}

/// `/api/series?entry=NAME`: that entry's flows per interval, oldest first
/// (without `entry`: every entry that carried traffic).
async fn series(State(p): State<Arc<Page>>, Query(q): Query<SeriesQuery>) -> Response {
    let Ok(t) = p.track.lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let mut entries: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for (name, e) in &t.entries {
        if q.entry.as_deref().is_none_or(|w| w == name) {
            entries.insert(name, e.series.iter().copied().collect());
        }
    }
    if q.entry.is_some() && entries.is_empty() {
        return (StatusCode::NOT_FOUND, "no such entry, or no flows yet\n").into_response();
    }
    json(&serde_json::json!({
        "interval_s": INTERVAL.as_secs(),
        "entries": entries,
    }))
}

// ------------------------------------------------------------ Host check

/// Whether a Host header (or URI authority) names this machine's loopback:
/// `localhost`, 127.0.0.0/8 or `[::1]`, with any port.
pub fn loopback_host(host: &str) -> bool {
    let (h, port) = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((inner, after)) => (
                inner,
                after
                    .strip_prefix(':')
                    .or(if after.is_empty() { Some("") } else { None }),
            ),
            None => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host, Some("")),
        }
    };
    let Some(port) = port else { return false };
    if !port.chars().all(|c| c.is_ascii_digit()) || port.len() > 5 {
        return false;
    }
    if h.eq_ignore_ascii_case("localhost") || h.eq_ignore_ascii_case("localhost.") {
        return true;
    }
    if host.starts_with('[') {
        return h.parse::<Ipv6Addr>().is_ok_and(|a| {
            a.is_loopback() || a.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        });
    }
    // only the dotted-quad form (no "127.1" shorthands a resolver expands)
    h.parse::<Ipv4Addr>()
        .is_ok_and(|a| IpAddr::V4(a).is_loopback())
}

/// Admin middleware: refuses (421) requests whose Host is not loopback, and
/// adds the page's security headers to every answer.
pub async fn host_guard(req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok());
    let authority = req.uri().authority().map(|a| a.as_str());
    let ok = match (host, authority) {
        (Some(h), Some(a)) => loopback_host(h) && loopback_host(a),
        (Some(h), None) => loopback_host(h),
        (None, Some(a)) => loopback_host(a),
        (None, None) => false,
    };
    let mut resp = if ok {
        next.run(req).await
    } else {
        (
            StatusCode::MISDIRECTED_REQUEST,
            "the admin listener answers only Host: localhost or a loopback address\n",
        )
            .into_response()
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access_log::FlowRecord;
    use crate::denied::Denied;
    #[allow(unused_imports)]
    use crate::vocab::{Decision, Mode, Protocol, Reason};

    fn flow(
        name: Option<&str>,
        ip: &str,
        port: u16,
        protocol: Protocol,
        decision: Decision,
    ) -> FlowRecord {
        FlowRecord {
            dst: Some(std::net::SocketAddr::new(ip.parse().unwrap(), port)),
            protocol,
            name: name.map(str::to_string),
            decision,
            reason: Some(Reason::NotInRegistry),
            ..FlowRecord::new("192.0.2.2:40000".parse().unwrap(), Mode::Transparent)
        }
    }

    #[test]
    fn denied_names_grouped_searched_sorted_with_their_toml() {
        let cfg = crate::config::Config::parse(
            std::path::Path::new("t.toml"),
            "[redirect]\nproxy_uid = 1337\n\n[[service_entry]]\nname = \"api\"\nhosts = [\"api.example.com\"]\nports = [{ number = 443, protocol = \"TLS\" }]\n",
        )
        .unwrap();
        let d = Denied::default();
        for _ in 0..3 {
            d.record(&flow(
                Some("www.example.org"),
                "203.0.113.5",
                443,
                Protocol::Tls,
                Decision::Deny,
            ));
        }
        d.record(&flow(
            Some("www.example.org"),
            "203.0.113.5",
            80,
            Protocol::Http,
            Decision::Audit,
        ));
        d.record(&flow(
            Some("<b>x</b>.example"),
            "203.0.113.5",
            80,
            Protocol::Http,
            Decision::Deny,
        ));
        d.record(&flow(
            None,
            "192.0.2.10",
            7000,
            Protocol::Tcp,
            Decision::Deny,
        ));
        // admitted now (e.g. after a reload): listed, without a block
        d.record(&flow(
            Some("api.example.com"),
            "192.0.2.10",
            443,
            Protocol::Tls,
            Decision::Deny,
        ));
        let recs = d.snapshot();
        let all_toml = crate::denied::denied_toml(&recs, &cfg);

        let page = denied_page(&recs, &cfg, &DeniedQuery::default());
        assert_eq!((page.held, page.names_total, page.matched), (5, 4, 4));
        let org = &page.names[0];
        assert_eq!(org.name, "www.example.org");
        assert_eq!(org.count, 4);
        assert_eq!(org.decisions.get("deny"), Some(&3));
        assert_eq!(org.decisions.get("audit"), Some(&1));
        assert_eq!(org.ports, ["443/tls", "80/http"]);
        let toml = org.toml.as_deref().unwrap();
        assert!(toml.starts_with("[[service_entry]]\n"), "{toml}");
        assert!(toml.contains("ports = [{ number = 80, protocol = \"HTTP\" }, { number = 443, protocol = \"TLS\" }]"), "{toml}");
        for n in &page.names {
            if let Some(t) = &n.toml {
                assert!(all_toml.contains(t.as_str()), "{t}\nnot in\n{all_toml}");
            }
        }
        let api = page
            .names
            .iter()
            .find(|n| n.name == "api.example.com")
            .unwrap();
        assert!(api.toml.is_none());
        let ip = page.names.iter().find(|n| n.name == "192.0.2.10").unwrap();
        assert!(!ip.named);
        assert!(ip
            .toml
            .as_deref()
            .unwrap()
            .contains("addresses = [\"192.0.2.10/32\"]"));

        // search: case-insensitive substring; limit; most recent first
        let q = |q: &str, sort: &str, limit: usize| DeniedQuery {
            q: Some(q.into()),
            sort: Some(sort.into()),
            limit: Some(limit),
        };
        let p = denied_page(&recs, &cfg, &q("EXAMPLE.ORG", "count", 50));
        assert_eq!(p.matched, 1);
        assert_eq!(p.names[0].name, "www.example.org");
        let p = denied_page(&recs, &cfg, &q("", "recent", 2));
        assert_eq!(p.matched, 4);
        assert_eq!(p.names.len(), 2);
        assert_eq!(p.names[0].name, "api.example.com");
        assert_eq!(p.names[1].name, "192.0.2.10");
    }

    #[test]
    fn loopback_hosts() {
        for h in [
            "localhost",
            "localhost:15000",
            "LOCALHOST:1",
            "127.0.0.1",
            "127.0.0.1:15000",
            "127.3.4.5:80",
            "[::1]",
            "[::1]:15000",
            "[::ffff:127.0.0.1]:15000",
        ] {
            assert!(loopback_host(h), "{h}");
        }
        for h in [
            "",
            "evil.example",
            "evil.example:15000",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "127.1",
            "0x7f000001",
            "10.0.0.1:15000",
            "[::2]:15000",
            "[::1]x",
            "127.0.0.1:abc",
            "192.0.2.2:15000",
            "[::1",
            "::1",
        ] {
            assert!(!loopback_host(h), "{h}");
        }
    }
}
