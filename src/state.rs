//! Shared state: what every flow reads (the current config generation, the
//! metrics, the access log and the denied store, the dialer, the pipe pool,
//! the connection limit, the revocations) and what the control side sets
//! (reload status, draining, revocations). The data path (`proxy`, `drain`)
//! and the control side (`admin`, `endpoint`, `reload`, `page`, `server`)
//! both depend on this module, and it depends on neither: the dialer it
//! holds is `upstream`'s (a module beside this one, not part of `proxy`),
//! and the file descriptors the health and admin listeners reserve come in
//! as a number from the caller (`server` asks `endpoint::reserved_fds`), so
//! no path leads from here back to a module that reads `Shared`. The
//! background resolution of DNS TCP entries lives here too, since it writes
//! the generation's addresses.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::access_log::{AccessLogger, FlowRecord};
use crate::config::{Config, MaxConnections};
use crate::denied::Denied;
use crate::metrics::Metrics;
use crate::registry::{Registry, ResolvedAddrs};
use crate::relay::{PipePool, RelayMode};
use crate::upstream::{Dialer, Resolved, Resolver};

/// Addresses of DNS-resolved TCP entries, refreshed in the background.
pub struct TcpResolved {
    /// entry index -> (address, last time an answer held it)
    map: RwLock<HashMap<usize, Vec<(IpAddr, Instant)>>>,
    /// Entries whose hosts have had one resolution attempt (pass or fail).
    attempted: AtomicUsize,
    /// Set when a reload replaced this generation: its resolver tasks stop
    /// at once, also in the middle of a lookup or a sleep.
    retired: tokio::sync::watch::Sender<bool>,
}

impl Default for TcpResolved {
    fn default() -> TcpResolved {
        TcpResolved {
            map: RwLock::default(),
            attempted: AtomicUsize::new(0),
            retired: tokio::sync::watch::Sender::new(false),
        }
    }
}

impl TcpResolved {
    /// Test seam: what a resolution of `entry` found now.
    #[cfg(test)]
    pub(crate) fn set(&self, entry: usize, ips: &[IpAddr]) {
        let now = Instant::now();
        if let Ok(mut m) = self.map.write() {
            m.insert(entry, ips.iter().map(|ip| (*ip, now)).collect());
        }
    }
}

/// An address that vanished from the answers is kept this long.
const KEEP_VANISHED: Duration = Duration::from_secs(300);

impl ResolvedAddrs for TcpResolved {
    fn contains(&self, entry: usize, ip: IpAddr) -> bool {
        self.map
            .read()
            .map(|m| {
                m.get(&entry)
                    .is_some_and(|v| v.iter().any(|(a, _)| *a == ip))
            })
            .unwrap_or(false)
    }
}

/// One config generation: a reload builds a new one and swaps it in; flows
/// keep the generation they started with.
pub struct Generation {
    pub registry: Registry,
    pub resolved: Arc<TcpResolved>,
    dns_entries: usize,
}

impl Generation {
    pub fn new(config: Arc<Config>) -> Generation {
        let registry = Registry::new(config);
        let dns_entries = registry.dns_tcp_entries().len();
        Generation {
            registry,
            resolved: Arc::new(TcpResolved::default()),
            dns_entries,
        }
    }

    /// The generation a reload installs: what `prev` knows of the
    /// addresses of DNS TCP entries whose hosts did not change (resolved
    /// ones and those vanished within KEEP_VANISHED) carries over, so a
    /// reload opens no window in which their flows are denied
    /// (docs/DESIGN.md §4 "Reload").
    pub fn after(config: Arc<Config>, prev: &Generation) -> Generation {
        let gen = Generation::new(config);
        let hosts_key = |mut h: Vec<String>| {
            h.sort();
            h.dedup();
            h
        };
        let before: HashMap<Vec<String>, usize> = prev
            .registry
            .dns_tcp_entries()
            .into_iter()
            .map(|(i, h)| (hosts_key(h), i))
            .collect();
        let old = match prev.resolved.map.read() {
            Ok(m) => m.clone(),
            Err(p) => p.into_inner().clone(),
        };
        if let Ok(mut m) = gen.resolved.map.write() {
            for (i, h) in gen.registry.dns_tcp_entries() {
                if let Some(known) = before.get(&hosts_key(h)).and_then(|j| old.get(j)) {
                    m.insert(i, known.clone());
                }
            }
        }
        gen
    }

    pub fn config(&self) -> &Config {
        &self.registry.config
    }
    /// Every DNS TCP entry's hosts have had one resolution attempt.
    pub fn resolution_attempted(&self) -> bool {
        self.resolved.attempted.load(Ordering::Acquire) >= self.dns_entries
    }
}

pub struct Shared {
    current: RwLock<Arc<Generation>>,
    pub metrics: Metrics,
    pub access_log: AccessLogger,
    pub dialer: Dialer,
    pub pipes: Arc<PipePool>,
    pub relay_mode: RelayMode,
    pub active: AtomicUsize,
    pub max_connections: usize,
    /// One owned permit per open flow, `max_connections` in all: exact
    /// however many accept loops (IPv4, IPv6 listeners) take from it.
    slots: Arc<tokio::sync::Semaphore>,
    /// SIGTERM received: /ready says 503, flows are still served.
    pub draining: AtomicBool,
    /// Listeners are bound.
    pub listening: AtomicBool,
    /// The first generation's DNS TCP entries had their resolution attempt:
    /// readiness is a start-up condition, a reload does not take it back.
    resolved_once: AtomicBool,
    pub denied: Denied,
    /// The config the process started with (what `init` installed, what
    /// the listeners were bound from).
    started: Arc<Config>,
    reload_status: Mutex<ReloadStatus>,
    revocation: tokio::sync::watch::Sender<Revocation>,
}

impl Shared {
    pub fn generation(&self) -> Arc<Generation> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Swaps in a new generation for new flows; retires the old one's
    /// background resolution.
    pub fn install(self: &Arc<Self>, gen: Arc<Generation>) {
        let old = match self.current.write() {
            Ok(mut g) => std::mem::replace(&mut *g, gen.clone()),
            Err(p) => std::mem::replace(&mut *p.into_inner(), gen.clone()),
        };
        old.resolved.retired.send_replace(true);
        spawn_tcp_resolution(self.clone(), gen);
    }

    /// The access-log line of a finished flow, and its `/denied` record.
    pub fn log(&self, rec: &FlowRecord) {
        self.access_log.log(rec);
        self.denied.record(rec);
    }

    pub fn started_config(&self) -> Arc<Config> {
        self.started.clone()
    }

    pub fn reload_status(&self) -> ReloadStatus {
        self.reload_status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    pub fn set_reload_status(&self, f: impl FnOnce(&mut ReloadStatus)) {
        if let Ok(mut s) = self.reload_status.lock() {
            f(&mut s);
        }
    }

    pub fn revoke(&self, r: Revocation) {
        self.revocation.send_replace(r);
    }

    pub fn revocations(&self) -> tokio::sync::watch::Receiver<Revocation> {
        self.revocation.subscribe()
    }

    pub fn ready(&self) -> bool {
        if !self.listening.load(Ordering::Acquire) || self.draining.load(Ordering::Acquire) {
            return false;
        }
        if self.resolved_once.load(Ordering::Acquire) {
            return true;
        }
        let now = self.generation().resolution_attempted();
        if now {
            self.resolved_once.store(true, Ordering::Release);
        }
        now
    }
}

/// Pipes in the pool: enough for the flows that move bytes at once, bounded
/// so fds and the unprivileged pipe-buffer quota (64 MiB) hold.
pub const MAX_PIPES: usize = 256;
pub const PIPE_SIZE: usize = 256 * 1024;

impl Shared {
    /// The state `portcullis run` starts with. `endpoint_fds` is what the
    /// health and admin listeners may hold (`endpoint::reserved_fds`): the
    /// budget of `max_connections = "auto"` leaves it out.
    pub fn new(config: Arc<Config>, endpoint_fds: u64) -> io::Result<Arc<Shared>> {
        let nofile = crate::sys::raise_nofile();
        let max_connections = match config.proxy.max_connections {
            MaxConnections::Fixed(n) => n,
            MaxConnections::Auto => {
                crate::sys::auto_max_connections(nofile, MAX_PIPES, endpoint_fds)
            }
        }
        .min(tokio::sync::Semaphore::MAX_PERMITS);
        let metrics = Metrics::new();
        let access_log = AccessLogger::new(&config.proxy.access_log, metrics.log_dropped.clone())?;
        // PORTCULLIS_RELAY=copy|copy:BYTES|splice: for benchmarks only.
        let relay_mode = std::env::var("PORTCULLIS_RELAY")
            .ok()
            .and_then(|v| v.parse::<RelayMode>().ok())
            .unwrap_or_default();
        let mark = usable_mark(config.redirect.mark);
        let shared = Arc::new(Shared {
            current: RwLock::new(Arc::new(Generation::new(config.clone()))),
            metrics,
            access_log,
            dialer: Dialer {
                resolver: Resolver::new(&config.proxy, mark),
                own: Default::default(),
                mark,
            },
            pipes: PipePool::new(MAX_PIPES, PIPE_SIZE),
            relay_mode,
            active: AtomicUsize::new(0),
            max_connections,
            slots: Arc::new(tokio::sync::Semaphore::new(max_connections)),
            draining: AtomicBool::new(false),
            listening: AtomicBool::new(false),
            resolved_once: AtomicBool::new(false),
            denied: Default::default(),
            started: config,
            reload_status: Mutex::new(ReloadStatus::default()),
            revocation: tokio::sync::watch::Sender::new(Revocation::default()),
        });
        tracing::info!(max_connections, nofile, endpoint_fds, "limits");
        Ok(shared)
    }
}

/// The mark to put on upstream sockets: `mark` when this process may set it
/// (CAP_NET_ADMIN or CAP_NET_RAW). Running as `proxy_uid` without those
/// capabilities, the uid exclusion does the work and marking is skipped.
fn usable_mark(mark: Option<u32>) -> Option<u32> {
    let m = mark?;
    if crate::upstream::mark_works(m) {
        Some(m)
    } else {
        tracing::info!(
            mark = m,
            "cannot set SO_MARK (no CAP_NET_ADMIN/CAP_NET_RAW): relying on the proxy_uid exclusion"
        );
        None
    }
}

/// Holds the flow's slot and decrements the active-flow count however the
/// flow task ends.
pub(crate) struct ActiveGuard(
    Arc<Shared>,
    #[allow(dead_code)] tokio::sync::OwnedSemaphorePermit,
);

impl Shared {
    /// Takes one of the `max_connections` places for a new flow, from the one
    /// semaphore every listener (transparent and explicit) shares, or `None`
    /// when all are taken. The place is given back when the guard drops.
    pub(crate) fn admit(self: &Arc<Self>) -> Option<ActiveGuard> {
        let slot = self.slots.clone().try_acquire_owned().ok()?;
        self.active.fetch_add(1, Ordering::AcqRel);
        self.metrics.active.inc();
        Some(ActiveGuard(self.clone(), slot))
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.active.dec();
    }
}

/// Resolves the hosts of DNS TCP entries now and again at their TTL
/// (clamped to 5 s - 5 min), keeping vanished addresses for 5 minutes.
pub fn spawn_tcp_resolution(shared: Arc<Shared>, gen: Arc<Generation>) {
    for (entry, hosts) in gen.registry.dns_tcp_entries() {
        let shared = shared.clone();
        let resolved = gen.resolved.clone();
        tokio::spawn(async move {
            let mut first = true;
            let mut retired = resolved.retired.subscribe();
            loop {
                let mut ttl = Duration::from_secs(300);
                let mut fresh: Vec<IpAddr> = Vec::new();
                for h in &hosts {
                    let answer = tokio::select! {
                        a = shared.dialer.resolver.lookup(h) => a,
                        _ = retired.wait_for(|r| *r) => return,
                    };
                    match answer {
                        Resolved::Addrs(a, t) => {
                            ttl = ttl.min(t);
                            fresh.extend(a);
                        }
                        Resolved::NoAnswer => {
                            ttl = ttl.min(Duration::from_secs(5));
                            tracing::warn!(host = %h, "no address for a DNS TCP entry's host");
                        }
                    }
                }
                let now = Instant::now();
                if let Ok(mut m) = resolved.map.write() {
                    let v = m.entry(entry).or_default();
                    for ip in fresh {
                        match v.iter_mut().find(|(a, _)| *a == ip) {
                            Some(slot) => slot.1 = now,
                            None => v.push((ip, now)),
                        }
                    }
                    v.retain(|(_, seen)| now.duration_since(*seen) < KEEP_VANISHED);
                }
                if first {
                    first = false;
                    resolved.attempted.fetch_add(1, Ordering::AcqRel);
                }
                let pause = ttl.clamp(Duration::from_secs(5), Duration::from_secs(300));
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    _ = retired.wait_for(|r| *r) => return,
                }
            }
        });
    }
}

/// What `/config` reports about reloads.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReloadStatus {
    pub last_reload: Option<String>,
    pub last_result: Option<&'static str>,
    pub last_error: Option<String>,
    /// Keys changed in the file that take effect only after a restart (the
    /// running values stay in force and are what `/config` shows).
    pub restart_required: Vec<String>,
    /// The rules `portcullis init` installed no longer match the config
    /// (policy or audit changed the non-TCP filter, or `[redirect]` changed).
    pub rerun_init: bool,
}

/// Flows to close from outside the relay: those of entries a reload removed
/// (`revoke_on_reload`), each at its deadline, and, at the end of a drain,
/// every flow.
#[derive(Clone, Debug, Default)]
pub struct Revocation {
    /// entry name -> when its flows are closed
    pub deadlines: Arc<HashMap<String, tokio::time::Instant>>,
    /// the drain is over: every flow is closed at this instant
    pub all: Option<tokio::time::Instant>,
}
