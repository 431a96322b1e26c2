//! Log stage: the one record of a flow, and the guard that writes it.
//!
//! A [`FlowLog`] is made when a flow (or an explicit proxy's request) starts
//! and every stage writes what it learns into it. Its access-log line, its
//! `portcullis_connections_total` count and its entry in the recently denied
//! flows are written exactly once, when the guard is dropped: at the end of
//! the flow, on every early return, and if the flow's task is cancelled. No
//! path has to remember to finish it (docs/DESIGN.md §4, "one line per flow").

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::access_log::{timestamp, FlowRecord};
use crate::metrics::ConnLabels;
use crate::registry::{Registry, Verdict};
use crate::relay::Counters;
use crate::state::Shared;
use crate::vocab::Mode;

/// The record of one flow, written to the access log and counted when dropped.
pub struct FlowLog {
    shared: Arc<Shared>,
    started: Instant,
    pub rec: FlowRecord,
    /// Counted in `portcullis_connections_total` (at the first verdict).
    counted: bool,
    /// The flow's live byte counters, read into the record at its end.
    pub counters: Arc<Counters>,
}

impl FlowLog {
    /// A flow from `client` arriving in `mode`, with nothing known yet (see
    /// [`FlowRecord::new`]).
    pub fn new(shared: &Arc<Shared>, client: SocketAddr, mode: Mode) -> FlowLog {
        FlowLog {
            shared: shared.clone(),
            started: Instant::now(),
            rec: FlowRecord::new(client, mode),
            counted: false,
            counters: Arc::new(Counters::new()),
        }
    }

    /// Writes a verdict into the record and counts the flow once in
    /// `portcullis_connections_total`: a later verdict (after a failed
    /// connect, say) updates the record but is not counted again.
    pub fn decided(&mut self, reg: &Registry, v: &Verdict) {
        self.rec.decision = v.decision;
        self.rec.reason = v.reason;
        let label = reg.entry_label(v);
        self.rec.entry = v.entry.map(|_| label.to_string());
        if !self.counted {
            self.count(label.to_string());
        }
    }

    /// The same as [`FlowLog::decided`], then the error that ended the flow.
    pub fn refused(&mut self, reg: &Registry, v: &Verdict, error: impl Into<String>) {
        self.decided(reg, v);
        self.rec.error = Some(error.into());
    }

    fn count(&mut self, entry: String) {
        self.counted = true;
        self.shared
            .metrics
            .connections
            .get_or_create(&ConnLabels {
                decision: self.rec.decision,
                protocol: self.rec.protocol,
                entry,
                reason: self.rec.reason,
            })
            .inc();
    }
}

impl Drop for FlowLog {
    fn drop(&mut self) {
        if !self.counted {
            // Only a flow cut before its decision gets here (its task was
            // cancelled): it is logged and counted as it stands, a deny.
            if self.rec.error.is_none() {
                self.rec.error = Some("cancelled before a decision".into());
            }
            let entry = self.rec.entry.clone().unwrap_or_else(|| "BlackHole".into());
            self.count(entry);
        }
        self.rec.bytes_up = self.counters.up();
        self.rec.bytes_down = self.counters.down();
        self.rec.duration_ms = self.started.elapsed().as_millis() as u64;
        if self.shared.access_log.enabled() {
            self.rec.ts = timestamp(SystemTime::now());
        }
        self.shared.log(&self.rec);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::ConnLabels;
    use crate::vocab::{Decision, Protocol, Reason};

    fn shared() -> Arc<Shared> {
        let cfg = crate::config::Config::parse(
            std::path::Path::new("t.toml"),
            "[proxy]\naccess_log = \"off\"\n\n[redirect]\nproxy_uid = 1337\n",
        )
        .unwrap();
        Shared::new(Arc::new(cfg), 0).unwrap()
    }

    fn count(shared: &Shared, reason: Option<Reason>) -> Option<u64> {
        let labels = ConnLabels {
            decision: Decision::Deny,
            protocol: Protocol::Tcp,
            entry: "BlackHole".into(),
            reason,
        };
        shared.metrics.connections.get(&labels).map(|c| c.get())
    }

    #[tokio::test]
    async fn a_flow_dropped_before_its_decision_is_written_once_as_a_deny() {
        let shared = shared();
        let mut log = FlowLog::new(
            &shared,
            "192.0.2.2:40000".parse().unwrap(),
            Mode::Transparent,
        );
        log.rec.dst = Some("192.0.2.10:443".parse().unwrap());
        drop(log);
        assert_eq!(count(&shared, None), Some(1));
        let denied = shared.denied.snapshot();
        assert_eq!(denied.len(), 1, "{denied:?}");
        assert_eq!(denied[0].decision, Decision::Deny);
    }

    #[tokio::test]
    async fn a_second_verdict_updates_the_record_but_counts_nothing() {
        let shared = shared();
        let gen = shared.generation();
        let mut log = FlowLog::new(
            &shared,
            "192.0.2.2:40000".parse().unwrap(),
            Mode::Transparent,
        );
        log.decided(&gen.registry, &Verdict::refused(Reason::Overload));
        log.refused(&gen.registry, &Verdict::refused(Reason::Loop), "again");
        assert_eq!(log.rec.reason, Some(Reason::Loop));
        assert_eq!(log.rec.error.as_deref(), Some("again"));
        drop(log);
        assert_eq!(count(&shared, Some(Reason::Overload)), Some(1));
        assert_eq!(count(&shared, Some(Reason::Loop)), None);
        assert_eq!(count(&shared, None), None, "not counted again when dropped");
    }
}
