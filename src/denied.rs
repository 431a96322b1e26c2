//! The recently denied and audited flows, for `/denied` and the traffic
//! page: fed from the log path (`Shared::log`, one call per finished flow),
//! read by the control side (`admin`, `page`).

use std::sync::Mutex;
use std::time::SystemTime;

use serde::Serialize;

use crate::access_log::{timestamp, FlowRecord};
use crate::vocab::{Decision, Protocol, Reason};

/// Most denied/audit records kept for `/denied` and the traffic page.
pub const DENIED_MAX: usize = 4096;

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
enum DeniedKey {
    Name {
        name: String,
        port: u16,
        protocol: Protocol,
    },
    Addr {
        ip: std::net::IpAddr,
        port: u16,
        protocol: Protocol,
    },
}

#[derive(Clone, Debug, Serialize)]
pub struct DeniedRecord {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<std::net::IpAddr>,
    pub port: u16,
    pub protocol: Protocol,
    pub decision: Decision,
    pub reason: Option<Reason>,
    pub count: u64,
    /// Of `count`, the flows denied and those audited (a reload may switch
    /// audit on or off: one name can be both).
    pub denied: u64,
    pub audited: u64,
    pub last_seen: String,
    /// Insertion clock of the last flow: orders records by recency.
    #[serde(skip)]
    pub(crate) seen: u64,
}

/// The recent denied and audit flows: a least-recently-seen map, bounded
/// at [`DENIED_MAX`] records. An insert is O(1) however many names clients
/// invent (a hash lookup, then the least recent record evicted when full);
/// the hasher is SipHash with a per-process random key, so chosen names
/// cannot collide on purpose.
pub struct Denied {
    inner: Mutex<DeniedInner>,
}

struct DeniedInner {
    map: lru::LruCache<DeniedKey, DeniedRecord, std::collections::hash_map::RandomState>,
    clock: u64,
}

impl Default for Denied {
    fn default() -> Self {
        Denied::with_capacity(DENIED_MAX)
    }
}

/// An explicit request for a name has no original destination: its port
/// comes from the authority the client asked for (the address part is not
/// used for records with a name).
fn explicit_dst(rec: &FlowRecord) -> Option<std::net::SocketAddr> {
    let (_, port) = rec.authority.as_deref()?.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    rec.name.as_ref()?;
    Some(std::net::SocketAddr::from(([0, 0, 0, 0], port)))
}

impl Denied {
    pub fn with_capacity(max: usize) -> Denied {
        let cap = std::num::NonZeroUsize::new(max.max(1)).unwrap_or(std::num::NonZeroUsize::MIN);
        Denied {
            inner: Mutex::new(DeniedInner {
                map: lru::LruCache::with_hasher(cap, Default::default()),
                clock: 0,
            }),
        }
    }

    /// Records a flow if it was denied or audited (loops and overload are
    /// the proxy's own business, not the registry's).
    pub fn record(&self, rec: &FlowRecord) {
        // Mismatches, forbidden addresses and refused clients of the
        // explicit proxy are not names to allow either.
        if !matches!(rec.decision, Decision::Deny | Decision::Audit)
            || matches!(
                rec.reason,
                Some(
                    Reason::Loop
                        | Reason::Overload
                        | Reason::SniMismatch
                        | Reason::HostMismatch
                        | Reason::ForbiddenAddress
                        | Reason::ClientNotAllowed
                )
            )
        {
            return;
        }
        let Some(dst) = rec.dst.or_else(|| explicit_dst(rec)) else {
            return;
        };
        let key = match &rec.name {
            Some(n) => DeniedKey::Name {
                name: n.clone(),
                port: dst.port(),
                protocol: rec.protocol,
            },
            None => DeniedKey::Addr {
                ip: dst.ip(),
                port: dst.port(),
                protocol: rec.protocol,
            },
        };
        let now = timestamp(SystemTime::now());
        let Ok(mut g) = self.inner.lock() else { return };
        let g = &mut *g;
        g.clock += 1;
        let seen = g.clock;
        // get_mut also marks the record most recent
        if let Some(e) = g.map.get_mut(&key) {
            e.count += 1;
            if rec.decision == Decision::Audit {
                e.audited += 1;
            } else {
                e.denied += 1;
            }
            e.seen = seen;
            e.decision = rec.decision;
            e.reason = rec.reason;
            e.last_seen = now;
            return;
        }
        // push evicts the least recently seen record when full
        g.map.push(
            key,
            DeniedRecord {
                name: rec.name.clone(),
                ip: if rec.name.is_none() {
                    Some(dst.ip())
                } else {
                    None
                },
                port: dst.port(),
                protocol: rec.protocol,
                decision: rec.decision,
                reason: rec.reason,
                count: 1,
                denied: u64::from(rec.decision != Decision::Audit),
                audited: u64::from(rec.decision == Decision::Audit),
                last_seen: now,
                seen,
            },
        );
    }

    /// Every record, most recent first.
    pub fn snapshot(&self) -> Vec<DeniedRecord> {
        match self.inner.lock() {
            Ok(g) => g.map.iter().map(|(_, r)| r.clone()).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Records held now.
    pub fn len(&self) -> usize {
        self.inner.lock().map(|g| g.map.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
