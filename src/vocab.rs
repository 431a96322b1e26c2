//! The vocabulary every stage of a flow shares: what the flow speaks
//! ([`Protocol`]), what was decided ([`Decision`]) and why ([`Reason`]), how
//! the client reached the proxy ([`Mode`]). Config, detection, the decision,
//! the access log and the metrics all use these types; each is turned into
//! its text only where it leaves the process (a log line, a metric label, a
//! message).

use std::fmt;

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};

/// What a flow speaks: what a port of an entry declares (`protocol = "TLS"`)
/// and what detection made of the client's first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tls,
    Http,
    /// Opaque TCP: no name is looked for.
    Tcp,
}

impl Protocol {
    /// The name in the access log, metrics and the API: `tls`, `http`, `tcp`.
    pub fn log_name(self) -> &'static str {
        match self {
            Protocol::Tls => "tls",
            Protocol::Http => "http",
            Protocol::Tcp => "tcp",
        }
    }

    /// The name a config (and Istio's ServiceEntry) writes: `TLS`, `HTTP`, `TCP`.
    pub fn config_name(self) -> &'static str {
        match self {
            Protocol::Tls => "TLS",
            Protocol::Http => "HTTP",
            Protocol::Tcp => "TCP",
        }
    }

    /// Serializes as the config writes it (for the config's JSON form).
    pub fn serialize_config_name<S: serde::Serializer>(
        p: &Protocol,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(p.config_name())
    }
}

/// Serialized as the log writes it.
impl serde::Serialize for Protocol {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.log_name())
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.log_name())
    }
}

/// What became of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Allow,
    Deny,
    Passthrough,
    Audit,
}

impl Decision {
    pub fn as_str(&self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
            Decision::Passthrough => "passthrough",
            Decision::Audit => "audit",
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a flow was not allowed by an entry (or would not have been).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Loop,
    NotInRegistry,
    AddressMismatch,
    Malformed,
    TooLarge,
    Timeout,
    Dns,
    Overload,
    /// Explicit proxy: the ClientHello inside a CONNECT tunnel names another host.
    SniMismatch,
    /// Explicit proxy: the Host inside a CONNECT tunnel, or of an
    /// absolute-form request, names another host.
    HostMismatch,
    /// Explicit proxy: the name resolves only to loopback, link-local,
    /// unspecified, multicast or the proxy's own addresses.
    ForbiddenAddress,
    /// Explicit proxy: the client is outside `explicit_clients`.
    ClientNotAllowed,
}

impl Reason {
    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::Loop => "loop",
            Reason::NotInRegistry => "not_in_registry",
            Reason::AddressMismatch => "address_mismatch",
            Reason::Malformed => "malformed",
            Reason::TooLarge => "too_large",
            Reason::Timeout => "timeout",
            Reason::Dns => "dns",
            Reason::Overload => "overload",
            Reason::SniMismatch => "sni_mismatch",
            Reason::HostMismatch => "host_mismatch",
            Reason::ForbiddenAddress => "forbidden_address",
            Reason::ClientNotAllowed => "client_not_allowed",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the client reached the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Redirected by the `init` rules.
    Transparent,
    /// Asked the proxy (CONNECT or an absolute-form request).
    Explicit,
}

impl Mode {
    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::Transparent => "transparent",
            Mode::Explicit => "explicit",
        }
    }
}

// Metric labels: the same text as the access log.
macro_rules! label_value {
    ($($t:ty => $f:ident),*) => {$(
        impl EncodeLabelValue for $t {
            fn encode(&self, e: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
                fmt::Write::write_str(e, self.$f())
            }
        }
    )*};
}
label_value!(Protocol => log_name, Decision => as_str, Reason => as_str, Mode => as_str);
