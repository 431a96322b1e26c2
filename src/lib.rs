//! portcullis: a transparent egress proxy.
//!
//! The life of a flow, stage by stage, and where each lives:
//! - `proxy` (accept loop, limits) -> `sys::original_dst` and the loop guard
//!   -> `detect` (ClientHello SNI, HTTP Host, opaque) -> `registry` (the pure
//!   decision) -> `proxy::upstream` (resolve, connect) -> `relay` (splice)
//!   or `proxy::deny` -> `access_log` and `metrics`; `proxy::flow` strings
//!   the stages together for one connection.
//! - `config`: the TOML file becomes a validated [`config::Config`];
//!   `reload` swaps it at run time; `admin` serves health, metrics, config
//!   and the recently denied flows, `endpoint` bounds and serves its
//!   listeners; `page` the traffic page and `/api/` (and `portcullis
//!   status`); `server` is `portcullis run`.
//! - `name`, `net`: names and addresses as every stage sees them;
//! - `explain`: the decision rendered for an operator;
//! - `import`: Istio ServiceEntry YAML to entries (`portcullis import`, `include`).

// Denied, not forbidden: `sys::reset_on_close` holds the one allowed block.
#![deny(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod config;
pub mod detect;
pub mod endpoint;
pub mod explain;
pub mod host_mode;
pub mod import;
pub mod init;
pub mod metrics;
pub mod name;
pub mod net;
pub mod page;
pub mod proxy;
pub mod registry;
pub mod relay;
pub mod reload;
pub mod server;
pub mod sys;
pub mod wait;
