//! portcullis: a transparent egress proxy.
//!
//! The data path, the life of a flow stage by stage (`proxy::flow` strings
//! the stages together for one connection):
//! - accept: `proxy` (listeners, accept loop), reading `state` (the shared
//!   state: config generation, limits, dialer, pipes, revocations);
//! - detect: `sys::original_dst`, then `detect` (ClientHello SNI, HTTP Host,
//!   opaque);
//! - decide: `registry` (the pure decision);
//! - connect: `upstream` (resolve, connect, the loop guard; held by
//!   `state`, so beside it rather than inside `proxy`) or `proxy::deny`;
//! - relay: `relay` (splice), until the flow ends or `drain::closed` (a
//!   revocation, the end of a drain) cuts it;
//! - log: `proxy::record` (the flow's record, written once by a guard when
//!   dropped) into `access_log`, `metrics` and `denied` (the recently
//!   denied flows).
//!
//! `name` and `net` are names and addresses as every stage sees them,
//! `vocab` the typed outcomes (protocol, decision, reason, mode);
//! `config` turns the TOML file into a validated [`config::Config`].
//!
//! The control side, apart from the data path (it reads and sets `state`
//! and the revocations `drain` waits on; the data path never calls it):
//! `reload` swaps the config in at run time; `admin` serves health,
//! metrics, config and the recently denied flows, `endpoint` bounds and
//! serves its listeners; `page` the traffic page and `/api/`; `server` is
//! `portcullis run`.
//!
//! The CLI commands: `init` (the redirect rules), `explain` (the decision
//! rendered for an operator), `import` (Istio ServiceEntry YAML to entries,
//! also `include`), `page::status`, `wait`, `host_mode` (`run --redirect`).

#![forbid(unsafe_code)]

// The data path (its order is in the overview above).
pub mod access_log;
pub mod config;
pub mod denied;
pub mod detect;
pub mod drain;
pub mod metrics;
pub mod name;
pub mod net;
pub mod proxy;
pub mod registry;
pub mod relay;
pub mod state;
pub mod sys;
pub mod upstream;
pub mod vocab;

// The control side.
pub mod admin;
pub mod endpoint;
pub mod page;
pub mod reload;
pub mod server;

// The CLI commands.
pub mod explain;
pub mod host_mode;
pub mod import;
pub mod init;
pub mod wait;
