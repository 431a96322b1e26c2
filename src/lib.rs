//! portcullis: a transparent egress proxy.
//!
//! The life of a flow, stage by stage, and where each lives:
//! - `config`: the TOML file becomes a validated [`config::Config`];
//! - `registry`: entries compiled into per-port indexes; the pure decision;
//! - `name`, `net`: names and addresses as every stage sees them;
//! - `explain`: the decision rendered for an operator (`portcullis explain`).

pub mod config;
pub mod explain;
pub mod name;
pub mod net;
pub mod registry;
