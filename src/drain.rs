//! Revocation and drain: flows closed from outside their relay, those of
//! entries a reload removed (`revoke_on_reload`) at their deadline and, at
//! the end of a drain, every flow. `reload` and `server` set the
//! revocations; the relay of every flow waits on [`closed`].

use tokio::time::Instant;

use crate::state::{Revocation, Shared};

/// Closes every flow at `at` (the end of a drain).
pub fn close_all(shared: &Shared, at: Instant) {
    let prev = shared.revocations().borrow().clone();
    shared.revoke(Revocation {
        deadlines: prev.deadlines,
        all: Some(at),
    });
}

/// Resolves when an established flow of `entry` must be closed from outside
/// its relay; says why. Never resolves for a flow nobody revokes.
pub async fn closed(shared: &Shared, entry: &str) -> &'static str {
    let mut rx = shared.revocations();
    loop {
        let r = rx.borrow_and_update().clone();
        let deadline = match (r.all, r.deadlines.get(entry)) {
            (Some(a), Some(d)) => Some((a.min(*d), a <= *d)),
            (Some(a), None) => Some((a, true)),
            (None, Some(d)) => Some((*d, false)),
            (None, None) => None,
        };
        match deadline {
            Some((at, all)) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {
                        if all {
                            return "closed: drain_timeout passed at shutdown";
                        }
                        // Defensive: a newer generation may have the entry again.
                        let back = shared
                            .generation()
                            .config()
                            .entries
                            .iter()
                            .any(|e| e.name == entry);
                        if !back {
                            return "revoked: a reload removed the entry";
                        }
                        if rx.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                    ch = rx.changed() => {
                        if ch.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                }
            }
            None => {
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}
