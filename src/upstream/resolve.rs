//! Connect stage, resolution (docs/DESIGN.md §3 step 7): the names of
//! `resolution = "DNS"` entries are resolved here, A and AAAA asked apart
//! and at once, with a cache of our own that keeps answers past their TTL
//! (served when the resolver fails), caches failures per family for a few
//! seconds, coalesces concurrent lookups of a name and bounds the names a
//! wildcard entry can make it hold.
//!
//! resolv.conf and the hosts file are read once, at start: a workload that
//! can write them later (a pod's /etc/hosts is shared by every container)
//! must not steer the proxy's answers (SECURITY.md).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_resolver::config::{ResolveHosts, ResolverOpts};
use hickory_resolver::net::runtime::iocompat::AsyncIoTokioAsStd;
use hickory_resolver::net::runtime::{
    RuntimeProvider, TokioHandle, TokioRuntimeProvider, TokioTime,
};
use hickory_resolver::net::{DnsError, NetError, NoRecords};
use hickory_resolver::proto::rr::{Name, RecordType};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::config::ProxySettings;
use crate::net::canonical_ip;

/// How long an answer is kept for serving stale when the resolver fails.
const STALE_FOR: Duration = Duration::from_secs(3600);
/// A timeout, SERVFAIL or unreachable resolver is remembered this long: an
/// outage costs one timeout per name and family, not one per flow.
const FAIL_FOR: Duration = Duration::from_secs(5);
/// NXDOMAIN/NODATA are remembered for the SOA minimum, clamped to this.
const NEGATIVE_MIN: Duration = Duration::from_secs(5);
const NEGATIVE_MAX: Duration = Duration::from_secs(60);
/// Names cached per wildcard entry (client-chosen names): least recently
/// used beyond this are forgotten, and only within that entry's share.
pub const WILDCARD_NAMES: usize = 1024;
/// Lookups in flight at once; more wait for a slot (inside their flow's
/// `connect_timeout`).
const MAX_IN_FLIGHT: usize = 256;
/// resolv.conf's defaults (glibc's): `timeout:5 attempts:2`.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_ATTEMPTS: u32 = 2;

pub enum Resolved {
    /// The answers of both families (or D.ip alone, once an answer held it)
    /// and how long they stay fresh.
    Addrs(Vec<IpAddr>, Duration),
    /// No address: NXDOMAIN/NODATA, or no answer and nothing stale.
    NoAnswer,
}

/// Where a name's cache entry lives: exact hosts of the registry are never
/// evicted; names under a wildcard entry share that entry's bounded LRU.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    Exact,
    /// The wildcard entry's name.
    Wildcard(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn record_type(self) -> RecordType {
        match self {
            Family::V4 => RecordType::A,
            Family::V6 => RecordType::AAAA,
        }
    }
    fn idx(self) -> usize {
        match self {
            Family::V4 => 0,
            Family::V6 => 1,
        }
    }
    fn holds(self, ip: &IpAddr) -> bool {
        match self {
            Family::V4 => ip.is_ipv4(),
            Family::V6 => ip.is_ipv6(),
        }
    }
}

/// What one family's query came back with.
#[derive(Clone, Debug)]
enum Outcome {
    Addrs(Vec<IpAddr>, Duration),
    /// NXDOMAIN or NODATA, with the negative TTL (SOA minimum) if given.
    Negative(Option<u32>),
    /// Timeout, SERVFAIL, refused, unreachable.
    Failed(String),
}

#[derive(Clone, Debug)]
struct Good {
    addrs: Vec<IpAddr>,
    expires: Instant,
    at: Instant,
}

#[derive(Clone, Debug)]
struct Fail {
    until: Instant,
    /// NXDOMAIN/NODATA: the family has no address (nothing stale is served).
    negative: bool,
}

#[derive(Clone, Debug, Default)]
struct FamilyState {
    good: Option<Good>,
    fail: Option<Fail>,
}

#[derive(Clone, Debug, Default)]
struct NameState {
    fam: [FamilyState; 2],
    used: u64,
}

/// What the cache says about one family of a name.
enum Cached {
    /// An answer to use now (fresh, or stale while a failure is cached).
    Use(Vec<IpAddr>, Duration),
    /// A cached NXDOMAIN/NODATA, or a failure with nothing stale.
    Nothing,
    /// Ask the resolver; serve `stale` if it fails.
    Ask(Option<Vec<IpAddr>>),
}

impl FamilyState {
    fn look(&self, now: Instant) -> Cached {
        let stale = self
            .good
            .as_ref()
            .filter(|g| now.duration_since(g.at) < STALE_FOR)
            .map(|g| g.addrs.clone());
        if let Some(g) = &self.good {
            if now < g.expires {
                return Cached::Use(g.addrs.clone(), g.expires - now);
            }
        }
        match &self.fail {
            Some(f) if now < f.until => {
                if f.negative {
                    Cached::Nothing
                } else {
                    // A cached failure never hides what we knew.
                    match stale {
                        Some(a) => Cached::Use(a, FAIL_FOR),
                        None => Cached::Nothing,
                    }
                }
            }
            _ => Cached::Ask(stale),
        }
    }

    fn record(&mut self, o: &Outcome, now: Instant) {
        match o {
            Outcome::Addrs(a, ttl) => {
                self.good = Some(Good {
                    addrs: a.clone(),
                    expires: now + *ttl,
                    at: now,
                });
                self.fail = None;
            }
            Outcome::Negative(ttl) => {
                let t = ttl
                    .map(|s| Duration::from_secs(u64::from(s)))
                    .unwrap_or(NEGATIVE_MIN)
                    .clamp(NEGATIVE_MIN, NEGATIVE_MAX);
                // The name's owner says there is none: nothing to serve stale.
                self.good = None;
                self.fail = Some(Fail {
                    until: now + t,
                    negative: true,
                });
            }
            Outcome::Failed(_) => {
                self.fail = Some(Fail {
                    until: now + FAIL_FOR,
                    negative: false,
                });
            }
        }
    }
}

/// The cache: exact hosts in one map, never evicted (bounded by the
/// registry); names under wildcard entries in one LRU per entry.
#[derive(Default)]
struct Cache {
    exact: HashMap<String, NameState>,
    wild: HashMap<String, HashMap<String, NameState>>,
    tick: u64,
}

impl Cache {
    fn get(&mut self, scope: &Scope, name: &str) -> Option<&mut NameState> {
        self.tick += 1;
        let tick = self.tick;
        let s = match scope {
            Scope::Exact => self.exact.get_mut(name),
            Scope::Wildcard(e) => self.wild.get_mut(e).and_then(|m| m.get_mut(name)),
        }?;
        s.used = tick;
        Some(s)
    }

    fn entry(&mut self, scope: &Scope, name: &str) -> &mut NameState {
        self.tick += 1;
        let tick = self.tick;
        let map = match scope {
            Scope::Exact => &mut self.exact,
            Scope::Wildcard(e) => {
                let m = self.wild.entry(e.clone()).or_default();
                if m.len() >= WILDCARD_NAMES && !m.contains_key(name) {
                    // O(n) over at most WILDCARD_NAMES, only when a new
                    // name arrives at a full entry.
                    if let Some(old) = m.iter().min_by_key(|(_, s)| s.used).map(|(k, _)| k.clone())
                    {
                        m.remove(&old);
                    }
                }
                m
            }
        };
        let s = map.entry(name.to_string()).or_default();
        s.used = tick;
        s
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.exact.len() + self.wild.values().map(|m| m.len()).sum::<usize>()
    }
}

/// hickory's tokio runtime, except that every DNS socket carries `mark`
/// (docs/DESIGN.md §2: with mark-based exclusion, every socket of the
/// proxy, the resolver's included, is marked).
#[derive(Clone)]
pub struct MarkedRuntime {
    inner: TokioRuntimeProvider,
    mark: Option<u32>,
}

fn marked_socket(
    addr: SocketAddr,
    ty: Type,
    proto: Protocol,
    mark: Option<u32>,
) -> io::Result<Socket> {
    let sock = Socket::new(
        Domain::for_address(addr),
        ty.nonblocking().cloexec(),
        Some(proto),
    )?;
    if let Some(m) = mark {
        sock.set_mark(m)?;
    }
    Ok(sock)
}

impl RuntimeProvider for MarkedRuntime {
    type Handle = TokioHandle;
    type Timer = TokioTime;
    type Udp = tokio::net::UdpSocket;
    type Tcp = AsyncIoTokioAsStd<TcpStream>;

    fn create_handle(&self) -> Self::Handle {
        self.inner.create_handle()
    }

    fn connect_tcp(
        &self,
        server: SocketAddr,
        bind: Option<SocketAddr>,
        wait_for: Option<Duration>,
    ) -> Pin<Box<dyn Send + Future<Output = io::Result<Self::Tcp>>>> {
        let mark = self.mark;
        Box::pin(async move {
            let sock = marked_socket(server, Type::STREAM, Protocol::TCP, mark)?;
            if let Some(b) = bind {
                sock.bind(&b.into())?;
            }
            sock.set_tcp_nodelay(true)?;
            let tsock = TcpSocket::from_std_stream(std::net::TcpStream::from(sock));
            match tokio::time::timeout(
                wait_for.unwrap_or(Duration::from_secs(5)),
                tsock.connect(server),
            )
            .await
            {
                Ok(r) => r.map(AsyncIoTokioAsStd),
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "DNS TCP connect timed out",
                )),
            }
        })
    }

    fn bind_udp(
        &self,
        local: SocketAddr,
        _server: SocketAddr,
    ) -> Pin<Box<dyn Send + Future<Output = io::Result<Self::Udp>>>> {
        let mark = self.mark;
        Box::pin(async move {
            let sock = marked_socket(local, Type::DGRAM, Protocol::UDP, mark)?;
            sock.bind(&local.into())?;
            tokio::net::UdpSocket::from_std(std::net::UdpSocket::from(sock))
        })
    }
}

/// The hosts file as glibc reads it: `address name [aliases...]`, `#`
/// comments; names are case-insensitive.
pub fn parse_hosts(text: &str) -> HashMap<String, Vec<IpAddr>> {
    let mut out: HashMap<String, Vec<IpAddr>> = HashMap::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut words = line.split_whitespace();
        let Some(ip) = words.next().and_then(|w| w.parse::<IpAddr>().ok()) else {
            continue;
        };
        let ip = canonical_ip(ip);
        for n in words {
            let n = n.trim_end_matches('.').to_ascii_lowercase();
            let v = out.entry(n).or_default();
            if !v.contains(&ip) {
                v.push(ip);
            }
        }
    }
    out
}

/// The nameservers of a resolv.conf that are on loopback: a workload that
/// can bind port 53 there answers the proxy's queries (SECURITY.md).
pub fn loopback_nameservers(path: &Path) -> Vec<IpAddr> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver"))
                .then(|| w.next())
                .flatten()
                // a scoped IPv6 address (fe80::1%eth0) is not loopback
                .and_then(|a| a.parse::<IpAddr>().ok())
        })
        .map(canonical_ip)
        .filter(|ip| ip.is_loopback())
        .collect()
}

/// The warning `check` prints and `run` logs, if any.
pub fn loopback_warning(proxy: &ProxySettings) -> Option<String> {
    let path = proxy.resolv_conf.as_ref()?;
    let lo = loopback_nameservers(path);
    if lo.is_empty() {
        return None;
    }
    let lo: Vec<String> = lo.iter().map(|i| i.to_string()).collect();
    Some(format!(
        "{} names a resolver on loopback ({}): any process of this network namespace that can bind port 53 there answers the proxy's queries and so chooses where allowed names go; point [proxy] resolv_conf at a file naming the real resolvers (see SECURITY.md)",
        path.display(),
        lo.join(", ")
    ))
}

type InFlight = watch::Receiver<Option<Outcome>>;
/// One family's addresses and how long they stay fresh; None: no address.
type Answer = Option<(Vec<IpAddr>, Duration)>;

struct Inner {
    dns: Option<hickory_resolver::Resolver<MarkedRuntime>>,
    hosts: HashMap<String, Vec<IpAddr>>,
    /// A family is given up after this (resolv.conf's timeout x attempts).
    budget: Duration,
    cache: Mutex<Cache>,
    in_flight: Mutex<HashMap<(String, Family), InFlight>>,
    slots: Semaphore,
    /// The runtime the resolver was made on (the control runtime of `portcullis run`): every
    /// lookup runs there, whichever worker's flow asked, so hickory's sockets and background
    /// tasks all belong to one runtime (docs/DESIGN.md, "Threads").
    home: Option<tokio::runtime::Handle>,
}

/// The proxy's resolver (docs/DESIGN.md §3 step 7).
#[derive(Clone)]
pub struct Resolver {
    inner: Arc<Inner>,
}

impl Resolver {
    /// Reads `resolv_conf` and `hosts_file` (once: never again, not on
    /// reload); `mark` goes on every DNS socket.
    pub fn new(proxy: &ProxySettings, mark: Option<u32>) -> Resolver {
        let hosts = match &proxy.hosts_file {
            None => HashMap::new(),
            Some(p) => match std::fs::read_to_string(p) {
                Ok(t) => parse_hosts(&t),
                Err(e) => {
                    tracing::warn!(path = %p.display(), error = %e, "cannot read the hosts file: names are resolved by DNS only");
                    HashMap::new()
                }
            },
        };
        let mut budget = DEFAULT_TIMEOUT * DEFAULT_ATTEMPTS;
        let dns = match &proxy.resolv_conf {
            None => {
                tracing::info!("resolv_conf = \"none\": names not in the hosts file do not resolve (reason dns)");
                None
            }
            Some(p) => match std::fs::read(p)
                .map_err(NetError::from)
                .and_then(hickory_resolver::system_conf::parse_resolv_conf)
            {
                Ok((config, opts)) => {
                    if let Some(w) = loopback_warning(proxy) {
                        tracing::warn!("{w}");
                    }
                    let (b, opts) = resolver_opts(opts);
                    budget = b;
                    let mut builder = hickory_resolver::Resolver::builder_with_config(
                        config,
                        MarkedRuntime {
                            inner: TokioRuntimeProvider::default(),
                            mark,
                        },
                    );
                    *builder.options_mut() = opts;
                    match builder.build() {
                        Ok(r) => Some(r),
                        Err(e) => {
                            tracing::error!(path = %p.display(), error = %e, "cannot configure the DNS resolver: resolution DNS entries will fail with reason dns");
                            None
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(path = %p.display(), error = %e, "cannot read resolv.conf: resolution DNS entries will fail with reason dns");
                    None
                }
            },
        };
        tracing::info!(budget = ?budget, hosts = hosts.len(), "resolver configured (resolv.conf and hosts file read once)");
        Resolver {
            inner: Arc::new(Inner {
                dns,
                hosts,
                budget,
                cache: Mutex::new(Cache::default()),
                in_flight: Mutex::new(HashMap::new()),
                slots: Semaphore::new(MAX_IN_FLIGHT),
                home: tokio::runtime::Handle::try_current().ok(),
            }),
        }
    }

    /// Both families of an exact host (background resolution of DNS TCP
    /// entries): waits for both answers.
    pub async fn lookup(&self, name: &str) -> Resolved {
        self.resolve(name, &Scope::Exact, None, None).await
    }

    /// A and AAAA of `name` (an absolute name: no search domains), asked at
    /// once; returns `[want]` as soon as an answer of either family holds
    /// it, and the answers of want's family as soon as they come without it;
    /// the other family is waited for only when want's has none. Gives up
    /// at `deadline` with what has come.
    pub async fn resolve(
        &self,
        name: &str,
        scope: &Scope,
        want: Option<IpAddr>,
        deadline: Option<tokio::time::Instant>,
    ) -> Resolved {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let want = want.map(canonical_ip);
        // The hosts file answers both families, as glibc does: a name it
        // lists for IPv4 only has no IPv6 address, DNS is not asked.
        if let Some(a) = self.inner.hosts.get(&name) {
            return match want {
                Some(w) if a.contains(&w) => Resolved::Addrs(vec![w], Duration::from_secs(300)),
                _ if a.is_empty() => Resolved::NoAnswer,
                _ => Resolved::Addrs(a.clone(), Duration::from_secs(300)),
            };
        }
        // Each family ends by the deadline (with its stale answer, if any).
        let v4 = self.family(&name, scope, Family::V4, want, deadline);
        let v6 = self.family(&name, scope, Family::V6, want, deadline);
        tokio::pin!(v4, v6);
        let (mut r4, mut r6): (Option<Answer>, Option<Answer>) = (None, None);
        while r4.is_none() || r6.is_none() {
            tokio::select! {
                r = &mut v4, if r4.is_none() => r4 = Some(r),
                r = &mut v6, if r6.is_none() => r6 = Some(r),
            }
            if let Some(w) = want {
                let held = [&r4, &r6]
                    .into_iter()
                    .flatten()
                    .flatten()
                    .find(|(a, _)| a.contains(&w));
                if let Some((_, ttl)) = held {
                    return Resolved::Addrs(vec![w], *ttl);
                }
                // D's family answered without D (a CDN rotating its
                // addresses, another resolver's view): those answers are
                // tried first anyway, so the other family is not waited for.
                let same = if w.is_ipv4() { &r4 } else { &r6 };
                if let Some(Some((a, ttl))) = same {
                    if !a.is_empty() {
                        return Resolved::Addrs(a.clone(), *ttl);
                    }
                }
            }
        }
        let mut addrs = Vec::new();
        let mut ttl = Duration::from_secs(300);
        for (a, t) in [r4, r6].into_iter().flatten().flatten() {
            addrs.extend(a);
            ttl = ttl.min(t);
        }
        if addrs.is_empty() {
            Resolved::NoAnswer
        } else {
            Resolved::Addrs(addrs, ttl)
        }
    }

    /// One family of a name: from the cache, or asked (coalesced with any
    /// lookup of it in flight). At `deadline` (the flow's connect_timeout)
    /// it stops waiting and serves the stale answer, if any; the lookup
    /// itself goes on and its outcome is cached. An expired answer that
    /// holds `want` settles the flow at once while the lookup refreshes it
    /// (RFC 8767's serve-stale, without making the flow wait for a
    /// resolver that may be down).
    async fn family(
        &self,
        name: &str,
        scope: &Scope,
        fam: Family,
        want: Option<IpAddr>,
        deadline: Option<tokio::time::Instant>,
    ) -> Answer {
        let key = (name.to_string(), fam);
        // The cache is looked at under the in-flight lock: a lookup that
        // ends writes the cache before leaving the in-flight map, so a flow
        // finds one or the other, never neither (one query, not two).
        let (stale, mut rx) = {
            let mut m = match self.inner.in_flight.lock() {
                Ok(m) => m,
                Err(p) => p.into_inner(),
            };
            let look = match self.inner.cache.lock() {
                Ok(mut c) => c
                    .get(scope, name)
                    .map(|s| s.fam[fam.idx()].look(Instant::now())),
                Err(_) => None,
            };
            let stale = match look {
                Some(Cached::Use(a, ttl)) => return Some((a, ttl)),
                Some(Cached::Nothing) => return None,
                Some(Cached::Ask(stale)) => stale,
                None => None,
            };
            let rx = match m.get(&key) {
                Some(rx) => rx.clone(),
                None => {
                    let rx = self.start(key.clone(), scope.clone());
                    m.insert(key, rx.clone());
                    rx
                }
            };
            (stale, rx)
        };
        if let (Some(a), Some(w)) = (&stale, want) {
            if a.contains(&w) {
                return Some((a.clone(), FAIL_FOR));
            }
        }
        let wait = async {
            match rx.wait_for(|o| o.is_some()).await {
                Ok(o) => o.clone(),
                Err(_) => None, // the lookup task ended without an answer
            }
        };
        let outcome = match deadline {
            Some(d) => match tokio::time::timeout_at(d, wait).await {
                Ok(o) => o,
                Err(_) => Some(Outcome::Failed(
                    "connect_timeout reached while resolving".into(),
                )),
            },
            None => wait.await,
        };
        match outcome {
            Some(Outcome::Addrs(a, ttl)) => Some((a, ttl)),
            Some(Outcome::Negative(_)) => None,
            Some(Outcome::Failed(_)) | None => stale.map(|a| (a, FAIL_FOR)),
        }
    }

    /// Starts the lookup of (name, family) in its own task: a flow that
    /// gives up does not cancel it, and its outcome is cached for the next
    /// flow. The caller registers the receiver as in flight.
    fn start(&self, key: (String, Family), scope: Scope) -> InFlight {
        let (tx, rx) = watch::channel(None);
        let inner = self.inner.clone();
        let fam = key.1;
        let home = inner.home.clone();
        let lookup = async move {
            let outcome = match inner.slots.acquire().await {
                Ok(_permit) => query(&inner, &key.0, fam).await,
                Err(_) => Outcome::Failed("resolver closed".into()),
            };
            let now = Instant::now();
            let mut stale = false;
            if let Ok(mut c) = inner.cache.lock() {
                let f = &mut c.entry(&scope, &key.0).fam[fam.idx()];
                f.record(&outcome, now);
                stale = matches!(f.look(now), Cached::Use(..));
            }
            // Logged once per lookup (a failure is cached: at most once per
            // name and family every FAIL_FOR), never once per flow.
            if let Outcome::Failed(e) = &outcome {
                let name = key.0.as_str();
                if stale {
                    tracing::warn!(name, family = ?fam, error = %e, "resolver failed: serving the last good answer");
                } else {
                    tracing::warn!(name, family = ?fam, error = %e, "resolver failed");
                }
            }
            // Cache first, then out of the in-flight map (see `family`).
            match inner.in_flight.lock() {
                Ok(mut m) => m.remove(&key),
                Err(p) => p.into_inner().remove(&key),
            };
            tx.send_replace(Some(outcome));
        };
        match home {
            Some(h) => drop(h.spawn(lookup)),
            None => drop(tokio::spawn(lookup)),
        }
        rx
    }
}

/// The options hickory gets, and the time after which a family's lookup is
/// given up: resolv.conf's `timeout` for each try, `attempts` tries.
fn resolver_opts(mut opts: ResolverOpts) -> (Duration, ResolverOpts) {
    let timeout = if opts.timeout.is_zero() {
        Duration::from_secs(1)
    } else {
        opts.timeout
    };
    let attempts = opts.attempts.clamp(1, 5) as u32;
    opts.timeout = timeout;
    opts.attempts = attempts as usize;
    // Our cache is the only one (hickory's would cache failures its own way).
    opts.cache_size = 0;
    opts.use_hosts_file = ResolveHosts::Never;
    opts.ndots = 0;
    (timeout * attempts, opts)
}

/// One query of one family, bounded by the budget.
async fn query(inner: &Inner, name: &str, fam: Family) -> Outcome {
    let Some(dns) = &inner.dns else {
        return Outcome::Negative(None);
    };
    let Ok(abs) = Name::from_ascii(format!("{name}.")) else {
        return Outcome::Negative(None);
    };
    match tokio::time::timeout(inner.budget, dns.lookup(abs, fam.record_type())).await {
        Err(_) => Outcome::Failed(format!("no answer within {:?}", inner.budget)),
        Ok(Ok(l)) => {
            let ttl = l.valid_until().saturating_duration_since(Instant::now());
            let addrs: Vec<IpAddr> = l
                .answers()
                .iter()
                .filter_map(|r| r.data.ip_addr())
                .map(canonical_ip)
                .filter(|ip| fam.holds(ip))
                .collect();
            if addrs.is_empty() {
                Outcome::Negative(None)
            } else {
                Outcome::Addrs(addrs, ttl)
            }
        }
        Ok(Err(NetError::Dns(DnsError::NoRecordsFound(NoRecords { negative_ttl, .. })))) => {
            Outcome::Negative(negative_ttl)
        }
        Ok(Err(e)) => Outcome::Failed(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_file_as_glibc_reads_it() {
        let h = parse_hosts(
            "127.0.0.1 localhost\n# c\n192.0.2.10\tApi.Example.com. api # alias\n::ffff:192.0.2.11 x\nbad line\n",
        );
        assert_eq!(
            h["api.example.com"],
            vec!["192.0.2.10".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(h["api"], h["api.example.com"]);
        assert_eq!(h["x"], vec!["192.0.2.11".parse::<IpAddr>().unwrap()]);
        assert!(!h.contains_key("bad"));
    }

    #[test]
    fn a_cached_failure_never_hides_what_we_knew() {
        let now = Instant::now();
        let mut f = FamilyState::default();
        let a: Vec<IpAddr> = vec!["192.0.2.10".parse().unwrap()];
        f.record(&Outcome::Addrs(a.clone(), Duration::from_secs(1)), now);
        assert!(matches!(f.look(now), Cached::Use(..)));
        // expired: ask, with the stale answer at hand
        let later = now + Duration::from_secs(2);
        assert!(matches!(f.look(later), Cached::Ask(Some(_))));
        // the resolver failed: the stale answer is used for FAIL_FOR
        f.record(&Outcome::Failed("t".into()), later);
        assert!(matches!(f.look(later), Cached::Use(ref x, _) if *x == a));
        // after the failure window: ask again
        assert!(matches!(f.look(later + FAIL_FOR), Cached::Ask(Some(_))));
        // stale answers end after STALE_FOR
        assert!(matches!(f.look(now + STALE_FOR), Cached::Ask(None)));
        // NXDOMAIN: nothing, for the clamped negative TTL
        f.record(&Outcome::Negative(Some(1)), later);
        assert!(matches!(f.look(later), Cached::Nothing));
        assert!(matches!(f.look(later + NEGATIVE_MIN), Cached::Ask(None)));
        f.record(&Outcome::Negative(Some(86_400)), later);
        assert!(matches!(f.look(later + NEGATIVE_MAX), Cached::Ask(None)));
        assert!(matches!(
            f.look(later + NEGATIVE_MAX - Duration::from_secs(1)),
            Cached::Nothing
        ));
    }

    #[test]
    fn wildcard_names_are_bounded_per_entry_and_exact_hosts_never_evicted() {
        let mut c = Cache::default();
        c.entry(&Scope::Exact, "api.example.com");
        let w = Scope::Wildcard("files".into());
        c.entry(&w, "keep.files.example.com");
        for i in 0..5 * WILDCARD_NAMES {
            c.entry(&w, &format!("n{i}.files.example.com"));
            // a name in use stays
            c.get(&w, "keep.files.example.com");
        }
        c.entry(&Scope::Wildcard("other".into()), "x.other.example");
        assert_eq!(c.len(), 1 + WILDCARD_NAMES + 1);
        assert!(c.get(&Scope::Exact, "api.example.com").is_some());
        assert!(c.get(&w, "keep.files.example.com").is_some());
        assert!(c.get(&w, "n0.files.example.com").is_none());
        assert!(c
            .get(
                &w,
                &format!("n{}.files.example.com", 5 * WILDCARD_NAMES - 1)
            )
            .is_some());
    }

    #[test]
    fn loopback_resolvers_are_found() {
        let dir = std::env::temp_dir().join(format!("portcullis-rc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("resolv.conf");
        std::fs::write(
            &p,
            "nameserver 10.0.0.10\nnameserver 127.0.0.53\n# nameserver 127.0.0.1\nnameserver ::1\noptions timeout:1\n",
        )
        .unwrap();
        assert_eq!(
            loopback_nameservers(&p),
            vec![
                "127.0.0.53".parse::<IpAddr>().unwrap(),
                "::1".parse().unwrap()
            ]
        );
        std::fs::write(&p, "nameserver 10.0.0.10\n").unwrap();
        assert!(loopback_nameservers(&p).is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
