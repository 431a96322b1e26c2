//! Configuration stage: the TOML file (raw serde structs that refuse unknown
//! keys) becomes a validated [`Config`]. Nothing downstream sees raw input.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::name::HostPattern;
use crate::net::Cidr;
pub use crate::vocab::Protocol;

pub const DEFAULT_PATH: &str = "/etc/portcullis/config.toml";

/// A config error: one sentence naming the file, the line and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{message}")]
    Syntax { path: String, message: String },
    /// An included file (`include`) that cannot be read as entries.
    #[error("{path}:{line}: {message}")]
    Include {
        path: String,
        line: usize,
        message: String,
    },
    #[error("{path}:{line}: {context}key `{key}`: {message}")]
    Invalid {
        path: String,
        line: usize,
        context: String,
        key: String,
        message: String,
    },
}

impl ConfigError {
    /// The key at fault, for tests and metrics.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Policy {
    #[serde(rename = "REGISTRY_ONLY")]
    RegistryOnly,
    #[serde(rename = "ALLOW_ANY")]
    AllowAny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Resolution {
    Dns,
    None,
    Static,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Port {
    pub number: u16,
    pub name: Option<String>,
    #[serde(serialize_with = "Protocol::serialize_config_name")]
    pub protocol: Protocol,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Endpoint {
    pub address: IpAddr,
    pub port: Option<u16>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ServiceEntry {
    pub name: String,
    /// The file the entry comes from: the config file, or an included one.
    pub source: PathBuf,
    /// 1-based line of the entry in `source`: its `[[service_entry]]` table,
    /// or its ServiceEntry in included YAML.
    pub line: usize,
    #[serde(serialize_with = "ser_display_vec")]
    pub hosts: Vec<HostPattern>,
    pub ports: Vec<Port>,
    pub resolution: Resolution,
    #[serde(serialize_with = "ser_display_vec")]
    pub addresses: Vec<Cidr>,
    pub endpoints: Vec<Endpoint>,
    pub location: String,
}

impl ServiceEntry {
    pub fn port(&self, number: u16) -> Option<&Port> {
        self.ports.iter().find(|p| p.number == number)
    }
    /// Where the entry is written, for an operator: "line N" in the config
    /// file `main`, "FILE:N" in an included file.
    pub fn origin(&self, main: &Path) -> String {
        if self.source == main {
            format!("line {}", self.line)
        } else {
            format!("{}:{}", self.source.display(), self.line)
        }
    }
    /// Whether `addresses` (if any) admit `ip`.
    pub fn admits_ip(&self, ip: IpAddr) -> bool {
        self.addresses.is_empty() || self.addresses.iter().any(|c| c.contains(ip))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum MaxConnections {
    Auto,
    Fixed(usize),
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum AccessLog {
    Stdout,
    Off,
    File(PathBuf),
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ProxySettings {
    pub listen: Vec<SocketAddr>,
    /// Empty: off. IPv6 addresses are bound IPV6_V6ONLY; one that cannot be
    /// bound because IPv6 is off is a warning, as for `listen`.
    pub health: Vec<SocketAddr>,
    pub admin: Option<SocketAddr>,
    #[serde(serialize_with = "ser_duration")]
    pub first_byte_timeout: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub hello_timeout: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub idle_timeout: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub drain_min: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub drain_timeout: Duration,
    pub max_connections: MaxConnections,
    pub access_log: AccessLog,
    pub revoke_on_reload: bool,
    /// Explicit proxy listeners (CONNECT, absolute-form); empty: off.
    pub explicit_listen: Vec<SocketAddr>,
    /// Who may use a non-loopback explicit listener.
    #[serde(serialize_with = "ser_display_vec")]
    pub explicit_clients: Vec<Cidr>,
    /// Read once at start (docs/DESIGN.md §3 step 7); `None` = "none".
    pub resolv_conf: Option<PathBuf>,
    /// Read once at start; `None` = "none".
    pub hosts_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UdpAllow {
    pub ports: Vec<u16>,
    #[serde(serialize_with = "ser_display_vec")]
    pub cidrs: Vec<Cidr>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Redirect {
    pub proxy_port: u16,
    pub proxy_uid: u32,
    pub proxy_gid: Option<u32>,
    pub mark: Option<u32>,
    #[serde(serialize_with = "ser_display_vec")]
    pub include_cidrs: Vec<Cidr>,
    #[serde(serialize_with = "ser_display_vec")]
    pub exclude_cidrs: Vec<Cidr>,
    pub exclude_ports: Vec<u16>,
    pub capture_interfaces: Vec<String>,
    pub allow_udp: Vec<UdpAllow>,
    /// The host's DHCP clients: only their DHCP requests pass the filter.
    pub dhcp_client_uids: Vec<UserRef>,
    pub ipv6: bool,
}

/// A user as `[redirect] dhcp_client_uids` names it: a number, or a name that
/// `init` looks up in the target host's /etc/passwd (read as a file: no NSS,
/// so the static binary resolves it the same way).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(untagged)]
pub enum UserRef {
    Id(u32),
    Name(String),
}

impl fmt::Display for UserRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UserRef::Id(n) => write!(f, "{n}"),
            UserRef::Name(s) => write!(f, "{s}"),
        }
    }
}

/// A validated configuration.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Config {
    pub path: PathBuf,
    pub outbound_traffic_policy: Policy,
    pub audit: bool,
    pub proxy: ProxySettings,
    pub redirect: Redirect,
    /// `include` patterns as written (relative to the config file).
    pub include: Vec<String>,
    pub entries: Vec<ServiceEntry>,
    /// Things `check` reports that do not make the file invalid.
    pub warnings: Vec<String>,
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_duration(*d))
}

fn ser_display_vec<S: serde::Serializer, T: fmt::Display>(
    v: &[T],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|x| x.to_string()))
}

pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(3_600_000) && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Why a string is not a duration; the string as written (trimmed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("`{0}` has no unit (write e.g. \"250ms\", \"5s\", \"1h\")")]
    NoUnit(String),
    #[error("`{0}` is not a duration (write e.g. \"250ms\", \"5s\", \"1h\")")]
    NotANumber(String),
    #[error("`{input}` has an unknown unit `{unit}` (use ms, s, m or h)")]
    UnknownUnit { input: String, unit: String },
    #[error("`{0}` is out of range")]
    OutOfRange(String),
    #[error("`{0}` is below 1ms")]
    BelowResolution(String),
}

/// Parses "250ms", "5s", "1.5s", "2m", "1h". A bare number is refused: the
/// unit is what makes a timeout readable at 3 a.m.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| DurationError::NoUnit(s.to_string()))?;
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| DurationError::NotANumber(s.to_string()))?;
    let scale = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => {
            return Err(DurationError::UnknownUnit {
                input: s.to_string(),
                unit: unit.to_string(),
            })
        }
    };
    let secs = value * scale;
    if !secs.is_finite() || secs > 1.0e9 {
        return Err(DurationError::OutOfRange(s.to_string()));
    }
    // Millisecond resolution: what the timers honour and /config shows.
    let ms = (secs * 1000.0).round();
    if secs > 0.0 && ms < 1.0 {
        return Err(DurationError::BelowResolution(s.to_string()));
    }
    Ok(Duration::from_millis(ms as u64))
}

// ---------------------------------------------------------------- raw input

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    outbound_traffic_policy: Option<Spanned<String>>,
    audit: Option<bool>,
    proxy: Option<Spanned<RawProxy>>,
    redirect: Option<Spanned<RawRedirect>>,
    include: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    service_entry: Vec<Spanned<RawEntry>>,
}

/// An included TOML file: `[[service_entry]]` tables and nothing else.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFragment {
    #[serde(default)]
    service_entry: Vec<Spanned<RawEntry>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    listen: Option<Spanned<Vec<String>>>,
    health: Option<Spanned<RawAddrs>>,
    admin: Option<Spanned<String>>,
    first_byte_timeout: Option<Spanned<String>>,
    hello_timeout: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    drain_min: Option<Spanned<String>>,
    drain_timeout: Option<Spanned<String>>,
    max_connections: Option<Spanned<RawMax>>,
    access_log: Option<Spanned<String>>,
    revoke_on_reload: Option<bool>,
    explicit_listen: Option<Spanned<Vec<String>>>,
    explicit_clients: Option<Spanned<Vec<String>>>,
    resolv_conf: Option<Spanned<String>>,
    hosts_file: Option<Spanned<String>>,
}

/// `"IP:PORT"`, `"off"` or a list of `"IP:PORT"`.
enum RawAddrs {
    One(String),
    Many(Vec<String>),
}

impl<'de> Deserialize<'de> for RawAddrs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawAddrs;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"IP:PORT\", \"off\" or a list of \"IP:PORT\"")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<RawAddrs, E> {
                Ok(RawAddrs::One(s.to_string()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<RawAddrs, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    out.push(s);
                }
                Ok(RawAddrs::Many(out))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawMax {
    Num(i64),
    Word(String),
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRedirect {
    proxy_port: Option<Spanned<i64>>,
    proxy_uid: Option<Spanned<i64>>,
    proxy_gid: Option<Spanned<i64>>,
    mark: Option<Spanned<i64>>,
    include_cidrs: Option<Spanned<Vec<String>>>,
    exclude_cidrs: Option<Spanned<Vec<String>>>,
    exclude_ports: Option<Spanned<Vec<i64>>>,
    capture_interfaces: Option<Spanned<Vec<String>>>,
    allow_udp: Option<Spanned<Vec<RawUdp>>>,
    dhcp_client_uids: Option<Spanned<Vec<RawUser>>>,
    ipv6: Option<bool>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawUser {
    Num(i64),
    Name(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUdp {
    ports: Vec<i64>,
    #[serde(default)]
    cidrs: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    name: Option<Spanned<String>>,
    hosts: Option<Spanned<Vec<String>>>,
    ports: Option<Spanned<Vec<RawPort>>>,
    resolution: Option<Spanned<String>>,
    addresses: Option<Spanned<Vec<String>>>,
    endpoints: Option<Spanned<Vec<RawEndpoint>>>,
    location: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPort {
    number: i64,
    name: Option<String>,
    protocol: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    address: String,
    port: Option<i64>,
}

// ---------------------------------------------------------------- validation

struct Ctx<'a> {
    path: &'a str,
    src: &'a str,
    entry_headers: Vec<usize>,
}

impl Ctx<'_> {
    fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.src.len());
        self.src.as_bytes()[..end]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1
    }
    fn err(
        &self,
        offset: usize,
        context: &str,
        key: &str,
        message: impl fmt::Display,
    ) -> ConfigError {
        // A typed parse error becomes the message of the one-line
        // `file:line: [section] key: ...` form.
        ConfigError::Invalid {
            path: self.path.to_string(),
            line: self.line_of(offset),
            context: context.to_string(),
            key: key.to_string(),
            message: message.to_string(),
        }
    }
    /// The line of the `index`-th `[[service_entry]]` header (toml's spans
    /// of an array-of-tables element do not cover its header).
    fn entry_line(&self, index: usize, fallback: usize) -> usize {
        self.entry_headers
            .get(index)
            .copied()
            .unwrap_or_else(|| self.line_of(fallback))
    }
}

fn entry_headers(src: &str) -> Vec<usize> {
    src.lines()
        .enumerate()
        .filter(|(_, l)| {
            let compact: String = l.chars().filter(|c| !c.is_whitespace()).take(17).collect();
            compact == "[[service_entry]]"
        })
        .map(|(n, _)| n + 1)
        .collect()
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let src = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(path, &src)
    }

    /// Validates config text; `path` is used in messages only.
    pub fn parse(path: &Path, src: &str) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let raw: RawConfig = toml::from_str(src).map_err(|e| toml_error(&shown, src, &e))?;
        let ctx = Ctx {
            path: &shown,
            src,
            entry_headers: entry_headers(src),
        };
        let mut warnings = Vec::new();

        let policy = match &raw.outbound_traffic_policy {
            None => Policy::RegistryOnly,
            Some(s) => match s.get_ref().as_str() {
                "REGISTRY_ONLY" => Policy::RegistryOnly,
                "ALLOW_ANY" => Policy::AllowAny,
                other => {
                    return Err(ctx.err(
                        s.span().start,
                        "",
                        "outbound_traffic_policy",
                        format!(
                            "`{other}` is not a policy: use \"REGISTRY_ONLY\" or \"ALLOW_ANY\""
                        ),
                    ))
                }
            },
        };
        let audit = raw.audit.unwrap_or(false);
        if audit && policy == Policy::AllowAny {
            warnings.push(
                "audit = true has no effect under ALLOW_ANY (every flow already passes)".into(),
            );
        }

        let proxy = validate_proxy(&ctx, raw.proxy.as_ref().map(|p| p.get_ref()))?;
        let redirect = validate_redirect(&ctx, raw.redirect.as_ref().map(|r| r.get_ref()))?;
        if !proxy.listen.is_empty() && !proxy.listen.iter().any(|a| a.port() == redirect.proxy_port)
        {
            warnings.push(format!(
                "no [proxy] listen address uses [redirect] proxy_port {}: redirected flows will not reach the proxy",
                redirect.proxy_port
            ));
        }

        let mut entries = Vec::new();
        let mut names = HashSet::new();
        for (i, raw_entry) in raw.service_entry.iter().enumerate() {
            let e = validate_entry(&ctx, i, raw_entry, &mut warnings)?;
            if !names.insert(e.name.clone()) {
                let off = raw_entry
                    .get_ref()
                    .name
                    .as_ref()
                    .map(|n| n.span().start)
                    .unwrap_or(raw_entry.span().start);
                return Err(ctx.err(
                    off,
                    &format!("service_entry \"{}\": ", e.name),
                    "name",
                    "entry names must be unique (a name defaults to the first host)",
                ));
            }
            entries.push(e);
        }
        let include = match &raw.include {
            None => vec![],
            Some(v) => {
                load_includes(&ctx, path, v, &mut entries, &mut warnings)?;
                v.get_ref().clone()
            }
        };
        if entries.is_empty() && policy == Policy::RegistryOnly && !audit {
            warnings.push("the registry is empty: under REGISTRY_ONLY every flow is denied".into());
        }

        Ok(Config {
            path: path.to_path_buf(),
            outbound_traffic_policy: policy,
            audit,
            proxy,
            redirect,
            include,
            entries,
            warnings,
        })
    }

    /// Audit applies only under REGISTRY_ONLY.
    pub fn audit_mode(&self) -> bool {
        self.audit && self.outbound_traffic_policy == Policy::RegistryOnly
    }
}

/// Turns an error of the TOML layer into one line an operator can act on:
/// `file:line: [section] key `k`: what is wrong, and the form expected`.
/// serde's own wording names our internal types (`expected struct RawPort`,
/// `expected i64`) and toml's rendering spans five lines with the message
/// twice, so type errors are re-worded here from the span: the section is the
/// last table header before it, the key the last `key =` before it (or the
/// unknown field itself).
fn toml_error(path: &str, src: &str, e: &toml::de::Error) -> ConfigError {
    let msg = e.message().trim_end();
    let Some(span) = e.span() else {
        return ConfigError::Syntax {
            path: path.to_string(),
            message: format!(" {}", msg.replace('\n', " ")),
        };
    };
    let at = span.start.min(src.len());
    let line = src.as_bytes()[..at].iter().filter(|b| **b == b'\n').count() + 1;
    let is_type_error = [
        "invalid type:",
        "unknown field",
        "missing field",
        "invalid value:",
    ]
    .iter()
    .any(|p| msg.starts_with(p));
    if !is_type_error {
        let line_start = src[..at].rfind('\n').map_or(0, |i| i + 1);
        let column = src[line_start..at].chars().count() + 1;
        return ConfigError::Syntax {
            path: path.to_string(),
            message: format!("{line}: {} (column {column})", msg.replace('\n', " ")),
        };
    }
    let section = section_before(src, at);
    let unknown = msg
        .strip_prefix("unknown field `")
        .and_then(|r| r.split_once('`'));
    let (key, message) = match unknown {
        Some((field, rest)) => {
            let known: Vec<&str> = rest
                .split('`')
                .skip(1)
                .step_by(2)
                .filter(|k| !k.is_empty())
                .collect();
            (field.to_string(), unknown_key_message(field, &known))
        }
        None => {
            let key = key_before(src, at).unwrap_or_default();
            let message = type_message(&key, msg);
            (key, message)
        }
    };
    ConfigError::Invalid {
        path: path.to_string(),
        line,
        context: section.map(|s| format!("{s} ")).unwrap_or_default(),
        key,
        message,
    }
}

/// The last table header (`[proxy]`, `[[service_entry]]`) at or before byte `at`.
fn section_before(src: &str, at: usize) -> Option<String> {
    src[..at].lines().rev().find_map(|l| {
        let t = l.trim();
        let t = t.split('#').next().unwrap_or("").trim_end();
        (t.starts_with('[') && t.ends_with(']') && !t.contains('=')).then(|| {
            let inner: String = t.chars().filter(|c| !c.is_whitespace()).collect();
            inner
        })
    })
}

/// The key whose value holds byte `at`: the last `name =` before it.
fn key_before(src: &str, at: usize) -> Option<String> {
    let head = &src[..at];
    let mut best: Option<String> = None;
    for (i, _) in head.match_indices('=') {
        let before = head[..i].trim_end();
        let key: String = before
            .chars()
            .rev()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        if !key.is_empty() {
            best = Some(key);
        }
    }
    best
}

fn unknown_key_message(field: &str, known: &[&str]) -> String {
    let close = known
        .iter()
        .filter(|k| edit_distance(field, k) <= 2)
        .min_by_key(|k| edit_distance(field, k));
    let list = known.join(", ");
    match close {
        Some(k) => format!("unknown key; did you mean `{k}`? (keys here: {list})"),
        None => format!("unknown key (keys here: {list})"),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// serde's "invalid type: X, expected Y" in the config's own terms.
fn type_message(key: &str, msg: &str) -> String {
    let (got, expected) = match msg
        .strip_prefix("invalid type: ")
        .and_then(|r| r.rsplit_once(", expected "))
    {
        Some((g, e)) => (format!("got {}", g.replace('`', "")), e.to_string()),
        None => return msg.replace('\n', " "),
    };
    let form = match expected.as_str() {
        "struct RawPort" => {
            "each port is a table like { number = 443, protocol = \"TLS\" }".to_string()
        }
        "struct RawEndpoint" => {
            "each endpoint is a table like { address = \"198.51.100.7\", port = 8443 }".to_string()
        }
        "struct RawUdp" => {
            "each rule is a table like { ports = [53], cidrs = [\"10.0.0.0/8\"] }".to_string()
        }
        e if e.starts_with("struct ") => "expected a table".to_string(),
        "a boolean" => "expected true or false, without quotes".to_string(),
        "a sequence" => "expected a list in brackets, e.g. [\"...\"]".to_string(),
        "a string" if DURATION_KEYS.contains(&key) => {
            "expected a duration in quotes with a unit, e.g. \"5s\" or \"250ms\"".to_string()
        }
        "a string" => "expected a string in quotes".to_string(),
        e if e.starts_with('i') || e.starts_with('u') => {
            format!("expected a number without quotes, e.g. {key} = 1337")
        }
        e => format!("expected {e}"),
    };
    format!("{got}; {form}")
}

const DURATION_KEYS: &[&str] = &[
    "first_byte_timeout",
    "hello_timeout",
    "connect_timeout",
    "idle_timeout",
    "drain_min",
    "drain_timeout",
];

fn dur(
    ctx: &Ctx,
    v: &Option<Spanned<String>>,
    key: &str,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) => {
            parse_duration(s.get_ref()).map_err(|m| ctx.err(s.span().start, "[proxy] ", key, m))
        }
    }
}

fn sockaddr(ctx: &Ctx, v: &Spanned<String>, key: &str) -> Result<Option<SocketAddr>, ConfigError> {
    let s = v.get_ref().trim();
    if s == "off" || s.is_empty() {
        return Ok(None);
    }
    s.parse::<SocketAddr>().map(Some).map_err(|_| {
        ctx.err(
            v.span().start,
            "[proxy] ",
            key,
            format!("`{s}` is not IP:PORT (e.g. \"127.0.0.1:15000\", \"[::1]:15001\") or \"off\""),
        )
    })
}

fn validate_proxy(ctx: &Ctx, raw: Option<&RawProxy>) -> Result<ProxySettings, ConfigError> {
    let default = RawProxy::default();
    let raw = raw.unwrap_or(&default);
    let (explicit_listen, explicit_clients) = validate_explicit(ctx, raw)?;
    let listen = match &raw.listen {
        None => vec![
            "127.0.0.1:15001".parse().expect("literal"),
            "[::1]:15001".parse().expect("literal"),
        ],
        Some(l) => {
            let mut out = Vec::new();
            for s in l.get_ref() {
                let a = s.parse::<SocketAddr>().map_err(|_| {
                    ctx.err(
                        l.span().start,
                        "[proxy] ",
                        "listen",
                        format!("`{s}` is not IP:PORT"),
                    )
                })?;
                out.push(a);
            }
            if out.is_empty() && explicit_listen.is_empty() {
                return Err(ctx.err(
                    l.span().start,
                    "[proxy] ",
                    "listen",
                    "at least one address is needed (or set explicit_listen for explicit proxy mode only)",
                ));
            }
            out
        }
    };
    // Both families by default: kubelet probes the pod IP of its own family,
    // which in an IPv6-only cluster is an IPv6 address.
    let health = match &raw.health {
        None => vec![
            "0.0.0.0:15021".parse().expect("literal"),
            "[::]:15021".parse().expect("literal"),
        ],
        Some(h) => match h.get_ref() {
            RawAddrs::One(s) => {
                let one = Spanned::new(h.span(), s.clone());
                sockaddr(ctx, &one, "health")?.into_iter().collect()
            }
            RawAddrs::Many(list) => {
                let mut out = Vec::new();
                for s in list {
                    let a = s.trim().parse::<SocketAddr>().map_err(|_| {
                        ctx.err(
                            h.span().start,
                            "[proxy] ",
                            "health",
                            format!(
                                "`{s}` is not IP:PORT (e.g. \"0.0.0.0:15021\", \"[::]:15021\")"
                            ),
                        )
                    })?;
                    out.push(a);
                }
                out
            }
        },
    };
    let admin = match &raw.admin {
        None => Some("127.0.0.1:15000".parse().expect("literal")),
        Some(a) => sockaddr(ctx, a, "admin")?,
    };
    let max_connections = match &raw.max_connections {
        None => MaxConnections::Auto,
        Some(m) => match m.get_ref() {
            RawMax::Word(w) if w == "auto" => MaxConnections::Auto,
            RawMax::Num(n) if *n > 0 => MaxConnections::Fixed(*n as usize),
            _ => {
                return Err(ctx.err(
                    m.span().start,
                    "[proxy] ",
                    "max_connections",
                    "must be \"auto\" or a positive number",
                ))
            }
        },
    };
    let access_log = match raw.access_log.as_ref().map(|s| s.get_ref().as_str()) {
        None | Some("stdout") => AccessLog::Stdout,
        Some("off") => AccessLog::Off,
        Some("") => {
            let s = raw.access_log.as_ref().expect("some");
            return Err(ctx.err(
                s.span().start,
                "[proxy] ",
                "access_log",
                "use \"stdout\", \"off\" or a file path",
            ));
        }
        Some(p) => AccessLog::File(PathBuf::from(p)),
    };
    // "none" turns the file off; anything else is a path, read once at start.
    let file_or_none = |v: &Option<Spanned<String>>, key: &str, default: &str| match v {
        None => Ok(Some(PathBuf::from(default))),
        Some(s) if s.get_ref() == "none" => Ok(None),
        Some(s) if s.get_ref().is_empty() => Err(ctx.err(
            s.span().start,
            "[proxy] ",
            key,
            "use a file path or \"none\"",
        )),
        Some(s) => Ok(Some(PathBuf::from(s.get_ref()))),
    };
    let resolv_conf = file_or_none(&raw.resolv_conf, "resolv_conf", "/etc/resolv.conf")?;
    let hosts_file = file_or_none(&raw.hosts_file, "hosts_file", "/etc/hosts")?;
    let settings = ProxySettings {
        listen,
        health,
        admin,
        first_byte_timeout: dur(
            ctx,
            &raw.first_byte_timeout,
            "first_byte_timeout",
            Duration::from_millis(200),
        )?,
        hello_timeout: dur(
            ctx,
            &raw.hello_timeout,
            "hello_timeout",
            Duration::from_secs(5),
        )?,
        connect_timeout: dur(
            ctx,
            &raw.connect_timeout,
            "connect_timeout",
            Duration::from_secs(5),
        )?,
        idle_timeout: dur(
            ctx,
            &raw.idle_timeout,
            "idle_timeout",
            Duration::from_secs(3600),
        )?,
        drain_min: dur(ctx, &raw.drain_min, "drain_min", Duration::from_secs(5))?,
        drain_timeout: dur(
            ctx,
            &raw.drain_timeout,
            "drain_timeout",
            Duration::from_secs(30),
        )?,
        max_connections,
        access_log,
        revoke_on_reload: raw.revoke_on_reload.unwrap_or(false),
        explicit_listen,
        explicit_clients,
        resolv_conf,
        hosts_file,
    };
    for (key, v, span) in [
        ("hello_timeout", settings.hello_timeout, &raw.hello_timeout),
        (
            "connect_timeout",
            settings.connect_timeout,
            &raw.connect_timeout,
        ),
        ("idle_timeout", settings.idle_timeout, &raw.idle_timeout),
        (
            "first_byte_timeout",
            settings.first_byte_timeout,
            &raw.first_byte_timeout,
        ),
    ] {
        if v.is_zero() {
            let off = span.as_ref().map(|s| s.span().start).unwrap_or(0);
            return Err(ctx.err(off, "[proxy] ", key, "must be greater than zero"));
        }
    }
    Ok(settings)
}

/// `explicit_listen` and `explicit_clients` (docs/DESIGN.md §2): a listener
/// that is not loopback needs `explicit_clients`, so it is never an open proxy.
fn validate_explicit(
    ctx: &Ctx,
    raw: &RawProxy,
) -> Result<(Vec<SocketAddr>, Vec<Cidr>), ConfigError> {
    let mut listen = Vec::new();
    if let Some(l) = &raw.explicit_listen {
        for s in l.get_ref() {
            let a = s.parse::<SocketAddr>().map_err(|_| {
                ctx.err(
                    l.span().start,
                    "[proxy] ",
                    "explicit_listen",
                    format!("`{s}` is not IP:PORT (e.g. \"127.0.0.1:3128\")"),
                )
            })?;
            listen.push(a);
        }
    }
    let clients = match &raw.explicit_clients {
        Some(c) => cidrs(ctx, c, "[proxy] ", "explicit_clients")?,
        None => Vec::new(),
    };
    if clients.is_empty() {
        if let Some(a) = listen.iter().find(|a| !a.ip().is_loopback()) {
            let off = raw
                .explicit_listen
                .as_ref()
                .map(|l| l.span().start)
                .unwrap_or(0);
            return Err(ctx.err(
                off,
                "[proxy] ",
                "explicit_clients",
                format!("explicit_listen {a} is not loopback, so explicit_clients (the CIDRs allowed to use it) is required: an explicit proxy is never open to everyone"),
            ));
        }
    }
    Ok((listen, clients))
}

fn port_num(ctx: &Ctx, n: i64, off: usize, context: &str, key: &str) -> Result<u16, ConfigError> {
    u16::try_from(n).ok().filter(|p| *p != 0).ok_or_else(|| {
        ctx.err(
            off,
            context,
            key,
            format!("{n} is not a port number (1-65535)"),
        )
    })
}

fn cidrs(
    ctx: &Ctx,
    v: &Spanned<Vec<String>>,
    context: &str,
    key: &str,
) -> Result<Vec<Cidr>, ConfigError> {
    v.get_ref()
        .iter()
        .map(|s| {
            s.parse::<Cidr>()
                .map_err(|m| ctx.err(v.span().start, context, key, m))
        })
        .collect()
}

fn validate_redirect(ctx: &Ctx, raw: Option<&RawRedirect>) -> Result<Redirect, ConfigError> {
    let default = RawRedirect::default();
    let raw = raw.unwrap_or(&default);
    let c = "[redirect] ";
    let proxy_port = match &raw.proxy_port {
        None => 15001,
        Some(p) => port_num(ctx, *p.get_ref(), p.span().start, c, "proxy_port")?,
    };
    let id = |v: &Option<Spanned<i64>>, key: &str| -> Result<Option<u32>, ConfigError> {
        match v {
            None => Ok(None),
            Some(n) => u32::try_from(*n.get_ref()).map(Some).map_err(|_| {
                ctx.err(
                    n.span().start,
                    c,
                    key,
                    format!("{} is out of range", n.get_ref()),
                )
            }),
        }
    };
    let proxy_uid = id(&raw.proxy_uid, "proxy_uid")?.unwrap_or(1337);
    let proxy_gid = id(&raw.proxy_gid, "proxy_gid")?;
    let mark = id(&raw.mark, "mark")?;
    if let (Some(0), Some(m)) = (mark, &raw.mark) {
        return Err(ctx.err(
            m.span().start,
            c,
            "mark",
            "0 is no mark: leave `mark` out instead",
        ));
    }
    if proxy_uid == 0 {
        let off = raw.proxy_uid.as_ref().map(|s| s.span().start).unwrap_or(0);
        return Err(ctx.err(
            off,
            c,
            "proxy_uid",
            "the proxy must not run as root (uid 0): its exclusion would exempt every root process",
        ));
    }
    let include_cidrs = match &raw.include_cidrs {
        None => vec![
            "0.0.0.0/0".parse().expect("literal"),
            "::/0".parse().expect("literal"),
        ],
        Some(v) => cidrs(ctx, v, c, "include_cidrs")?,
    };
    let exclude_cidrs = match &raw.exclude_cidrs {
        None => vec![],
        Some(v) => cidrs(ctx, v, c, "exclude_cidrs")?,
    };
    let exclude_ports = match &raw.exclude_ports {
        None => vec![],
        Some(v) => v
            .get_ref()
            .iter()
            .map(|n| port_num(ctx, *n, v.span().start, c, "exclude_ports"))
            .collect::<Result<_, _>>()?,
    };
    let capture_interfaces = match &raw.capture_interfaces {
        None => vec![],
        Some(v) => {
            for i in v.get_ref() {
                let ok = !i.is_empty()
                    && i.len() < 16
                    && i.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.@+".contains(&b));
                if !ok {
                    return Err(ctx.err(
                        v.span().start,
                        c,
                        "capture_interfaces",
                        format!("`{i}` is not an interface name"),
                    ));
                }
            }
            v.get_ref().clone()
        }
    };
    let allow_udp = match &raw.allow_udp {
        None => vec![UdpAllow {
            ports: vec![53],
            cidrs: vec![],
        }],
        Some(v) => {
            let mut out = Vec::new();
            for u in v.get_ref() {
                let ports = u
                    .ports
                    .iter()
                    .map(|n| port_num(ctx, *n, v.span().start, c, "allow_udp"))
                    .collect::<Result<Vec<_>, _>>()?;
                if ports.is_empty() {
                    return Err(ctx.err(
                        v.span().start,
                        c,
                        "allow_udp",
                        "each rule needs at least one port",
                    ));
                }
                let mut cs = Vec::new();
                for s in &u.cidrs {
                    cs.push(
                        s.parse::<Cidr>()
                            .map_err(|m| ctx.err(v.span().start, c, "allow_udp", m))?,
                    );
                }
                out.push(UdpAllow { ports, cidrs: cs });
            }
            out
        }
    };
    let mut dhcp_client_uids = Vec::new();
    if let Some(v) = &raw.dhcp_client_uids {
        for u in v.get_ref() {
            let user = match u {
                RawUser::Num(n) => UserRef::Id(u32::try_from(*n).map_err(|_| {
                    ctx.err(
                        v.span().start,
                        c,
                        "dhcp_client_uids",
                        format!("{n} is not a uid"),
                    )
                })?),
                RawUser::Name(s) => {
                    // useradd's rule (NAME_REGEX of Debian, plus the dots and
                    // a trailing $ that Samba's machine accounts use)
                    let ok = !s.is_empty()
                        && s.len() <= 32
                        && s.bytes().enumerate().all(|(i, b)| {
                            b.is_ascii_lowercase()
                                || b == b'_'
                                || (i > 0 && (b.is_ascii_digit() || b"-.".contains(&b)))
                                || (i > 0 && i == s.len() - 1 && b == b'$')
                        });
                    if !ok {
                        return Err(ctx.err(
                            v.span().start,
                            c,
                            "dhcp_client_uids",
                            format!("`{s}` is not a user name (write a uid or a name such as \"systemd-network\")"),
                        ));
                    }
                    UserRef::Name(s.clone())
                }
            };
            if !dhcp_client_uids.contains(&user) {
                dhcp_client_uids.push(user);
            }
        }
    }
    Ok(Redirect {
        proxy_port,
        proxy_uid,
        proxy_gid,
        mark,
        include_cidrs,
        exclude_cidrs,
        exclude_ports,
        capture_interfaces,
        allow_udp,
        dhcp_client_uids,
        ipv6: raw.ipv6.unwrap_or(true),
    })
}

fn protocol(raw: &str) -> Result<Protocol, String> {
    match raw.to_ascii_uppercase().as_str() {
        "HTTP" => Ok(Protocol::Http),
        "HTTPS" | "TLS" => Ok(Protocol::Tls),
        "TCP" => Ok(Protocol::Tcp),
        "HTTP2" | "GRPC" | "GRPC-WEB" | "H2C" => Err(format!(
            "protocol `{raw}` is not supported: use TLS for anything inside TLS, TCP for cleartext HTTP/2 (it is opaque to portcullis)"
        )),
        "MONGO" | "MYSQL" | "REDIS" | "POSTGRES" | "POSTGRESQL" | "UDP" => Err(format!(
            "protocol `{raw}` is not supported: use TCP for opaque protocols (including STARTTLS ones), TLS for anything inside TLS"
        )),
        _ => Err(format!("protocol `{raw}` is unknown: use HTTP, HTTPS, TLS or TCP")),
    }
}

fn validate_entry(
    ctx: &Ctx,
    index: usize,
    raw: &Spanned<RawEntry>,
    warnings: &mut Vec<String>,
) -> Result<ServiceEntry, ConfigError> {
    let en = EntryCheck::new(ctx, index, raw);
    let hosts = en.hosts()?;
    let ports = en.ports()?;
    let resolution = en.resolution(&ports)?;
    let addresses = en.addresses()?;
    let endpoints = en.endpoints()?;
    en.endpoints_fit(resolution, &endpoints)?;
    en.without_hosts(&hosts, &ports, resolution, &addresses)?;
    en.tcp_by_address(&hosts, &ports, resolution, &addresses)?;
    en.named_by_address(&ports, resolution, &addresses)?;
    let name = en.name(&hosts)?;
    warnings.extend(en.trust_warning(&name, &addresses));
    let location = en.location()?;
    Ok(ServiceEntry {
        name,
        source: PathBuf::from(ctx.path),
        line: ctx.entry_line(index, en.start),
        hosts,
        ports,
        resolution,
        addresses,
        endpoints,
        location,
    })
}

/// Whether any port is matched by name (TLS, HTTP) / by address (TCP).
fn has_named_port(ports: &[Port]) -> bool {
    ports.iter().any(|p| p.protocol != Protocol::Tcp)
}

fn has_tcp_port(ports: &[Port]) -> bool {
    ports.iter().any(|p| p.protocol == Protocol::Tcp)
}

/// One `[[service_entry]]` under validation: its raw keys, where it starts,
/// and the `service_entry "NAME": ` context its errors carry. Each method
/// checks one key or one rule between keys, in the order `validate_entry`
/// calls them (the first failure is the one reported).
struct EntryCheck<'a> {
    ctx: &'a Ctx<'a>,
    e: &'a RawEntry,
    start: usize,
    context: String,
}

impl<'a> EntryCheck<'a> {
    fn new(ctx: &'a Ctx<'a>, index: usize, raw: &'a Spanned<RawEntry>) -> Self {
        let e = raw.get_ref();
        // The name errors are reported under, before the name is validated.
        let provisional = e
            .name
            .as_ref()
            .map(|n| n.get_ref().clone())
            .or_else(|| e.hosts.as_ref().and_then(|h| h.get_ref().first().cloned()))
            .unwrap_or_else(|| format!("#{}", index + 1));
        EntryCheck {
            ctx,
            e,
            start: raw.span().start,
            context: format!("service_entry \"{provisional}\": "),
        }
    }

    fn err(&self, off: usize, key: &str, message: impl fmt::Display) -> ConfigError {
        self.ctx.err(off, &self.context, key, message)
    }

    /// Where a key's value starts, or the entry's start when it is absent.
    fn at<T>(&self, v: &Option<Spanned<T>>) -> usize {
        v.as_ref().map(|v| v.span().start).unwrap_or(self.start)
    }

    fn hosts(&self) -> Result<Vec<HostPattern>, ConfigError> {
        let Some(h) = &self.e.hosts else {
            return Ok(Vec::new());
        };
        h.get_ref()
            .iter()
            .map(|s| HostPattern::parse(s).map_err(|m| self.err(h.span().start, "hosts", m)))
            .collect()
    }

    fn ports(&self) -> Result<Vec<Port>, ConfigError> {
        let raw = self.e.ports.as_ref().ok_or_else(|| {
            self.err(
                self.start,
                "ports",
                "is required (e.g. ports = [{ number = 443, protocol = \"TLS\" }])",
            )
        })?;
        let off = raw.span().start;
        let mut ports = Vec::new();
        let mut seen = HashSet::new();
        for p in raw.get_ref() {
            let number = port_num(self.ctx, p.number, off, &self.context, "ports")?;
            let proto = protocol(&p.protocol).map_err(|m| self.err(off, "ports", m))?;
            if !seen.insert(number) {
                return Err(self.err(off, "ports", format!("port {number} is listed twice")));
            }
            ports.push(Port {
                number,
                name: p.name.clone(),
                protocol: proto,
            });
        }
        if ports.is_empty() {
            return Err(self.err(off, "ports", "at least one port is needed"));
        }
        Ok(ports)
    }

    /// Written, or DNS when a port is matched by name, else NONE.
    fn resolution(&self, ports: &[Port]) -> Result<Resolution, ConfigError> {
        let Some(r) = &self.e.resolution else {
            return Ok(if has_named_port(ports) {
                Resolution::Dns
            } else {
                Resolution::None
            });
        };
        match r.get_ref().to_ascii_uppercase().as_str() {
            "DNS" => Ok(Resolution::Dns),
            "NONE" => Ok(Resolution::None),
            "STATIC" => Ok(Resolution::Static),
            other => Err(self.err(
                r.span().start,
                "resolution",
                format!("`{other}` is not DNS, NONE or STATIC"),
            )),
        }
    }

    fn addresses(&self) -> Result<Vec<Cidr>, ConfigError> {
        match &self.e.addresses {
            None => Ok(Vec::new()),
            Some(v) => cidrs(self.ctx, v, &self.context, "addresses"),
        }
    }

    fn endpoints(&self) -> Result<Vec<Endpoint>, ConfigError> {
        let Some(v) = &self.e.endpoints else {
            return Ok(Vec::new());
        };
        let off = v.span().start;
        let mut endpoints = Vec::new();
        for ep in v.get_ref() {
            let address: IpAddr = ep
                .address
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse()
                .map_err(|_| {
                    self.err(
                        off,
                        "endpoints",
                        format!("`{}` is not an IP address", ep.address),
                    )
                })?;
            let port = match ep.port {
                None => None,
                Some(n) => Some(port_num(self.ctx, n, off, &self.context, "endpoints")?),
            };
            endpoints.push(Endpoint {
                address: crate::net::canonical_ip(address),
                port,
            });
        }
        Ok(endpoints)
    }

    /// Endpoints exactly when resolution is STATIC.
    fn endpoints_fit(
        &self,
        resolution: Resolution,
        endpoints: &[Endpoint],
    ) -> Result<(), ConfigError> {
        match resolution {
            Resolution::Static if endpoints.is_empty() => Err(self.err(
                self.at(&self.e.resolution),
                "endpoints",
                "resolution STATIC needs endpoints = [{ address = \"IP\", port = N }]",
            )),
            Resolution::Dns | Resolution::None if !endpoints.is_empty() => Err(self.err(
                self.at(&self.e.endpoints),
                "endpoints",
                "endpoints are only used with resolution = \"STATIC\"",
            )),
            _ => Ok(()),
        }
    }

    /// An entry without hosts: TCP ports only, matched by address, named.
    fn without_hosts(
        &self,
        hosts: &[HostPattern],
        ports: &[Port],
        resolution: Resolution,
        addresses: &[Cidr],
    ) -> Result<(), ConfigError> {
        if !hosts.is_empty() {
            return Ok(());
        }
        if has_named_port(ports) {
            return Err(self.err(
                self.start,
                "hosts",
                "TLS and HTTP ports are matched by name: list at least one host",
            ));
        }
        if addresses.is_empty() {
            return Err(self.err(
                self.start,
                "hosts",
                "an entry needs hosts, or addresses for TCP ports",
            ));
        }
        if self.e.name.is_none() {
            return Err(self.err(self.start, "name", "an entry without hosts needs a name"));
        }
        if resolution == Resolution::Dns {
            return Err(self.err(
                self.at(&self.e.resolution),
                "resolution",
                "resolution DNS needs hosts to resolve",
            ));
        }
        Ok(())
    }

    /// A TCP port is matched by address: `addresses`, or the addresses its
    /// exact hosts resolve to.
    fn tcp_by_address(
        &self,
        hosts: &[HostPattern],
        ports: &[Port],
        resolution: Resolution,
        addresses: &[Cidr],
    ) -> Result<(), ConfigError> {
        if !has_tcp_port(ports) || !addresses.is_empty() {
            return Ok(());
        }
        if resolution != Resolution::Dns {
            return Err(self.err(
                self.at(&self.e.resolution),
                "addresses",
                "a TCP port is matched by address only: give `addresses`, or resolution = \"DNS\" with exact hosts (to trust the client's choice of IP deliberately, write addresses = [\"0.0.0.0/0\", \"::/0\"])",
            ));
        }
        if let Some(w) = hosts.iter().find(|h| h.is_wildcard()) {
            return Err(self.err(
                self.at(&self.e.hosts),
                "hosts",
                format!("`{w}` cannot be resolved ahead: a TCP port with resolution DNS needs exact hosts (or give `addresses`)"),
            ));
        }
        Ok(())
    }

    /// A TLS/HTTP entry with resolution NONE connects to the address the
    /// client dialled, so it needs `addresses` to bound it.
    fn named_by_address(
        &self,
        ports: &[Port],
        resolution: Resolution,
        addresses: &[Cidr],
    ) -> Result<(), ConfigError> {
        if has_named_port(ports) && resolution == Resolution::None && addresses.is_empty() {
            return Err(self.err(
                self.at(&self.e.resolution),
                "addresses",
                "a TLS/HTTP entry with resolution NONE would connect wherever the client dialled: give `addresses`, or use resolution DNS (to trust the client's choice deliberately, write addresses = [\"0.0.0.0/0\", \"::/0\"])",
            ));
        }
        Ok(())
    }

    /// `name`, or the first host.
    fn name(&self, hosts: &[HostPattern]) -> Result<String, ConfigError> {
        let name = self
            .e
            .name
            .as_ref()
            .map(|n| n.get_ref().clone())
            .unwrap_or_else(|| hosts.first().map(|h| h.to_string()).unwrap_or_default());
        let off = self.at(&self.e.name);
        // Names become Prometheus label values, which prometheus-client writes
        // unescaped: a quote or backslash would break /metrics for everyone.
        if name.is_empty()
            || name.len() > 253
            || name
                .chars()
                .any(|ch| ch.is_control() || ch == '"' || ch == '\\')
        {
            return Err(self.err(
                off,
                "name",
                "names are 1-253 printable characters without quotes or backslashes (they are metric label values)",
            ));
        }
        if matches!(name.as_str(), "BlackHole" | "Passthrough") {
            return Err(self.err(
                off,
                "name",
                format!("`{name}` is reserved for flows that match no entry"),
            ));
        }
        Ok(name)
    }

    /// `check`'s warning for 0.0.0.0/0 or ::/0 in `addresses`.
    fn trust_warning(&self, name: &str, addresses: &[Cidr]) -> Option<String> {
        let everything: Vec<String> = addresses
            .iter()
            .filter(|a| a.is_everything())
            .map(|a| a.to_string())
            .collect();
        (!everything.is_empty()).then(|| format!(
            "{}:{}: service_entry \"{}\": addresses include {} which trusts the client's choice of IP: a client presenting an allowed name can reach any address",
            self.ctx.path,
            self.ctx.line_of(self.at(&self.e.addresses)),
            name,
            everything.join(", "),
        ))
    }

    fn location(&self) -> Result<String, ConfigError> {
        let Some(l) = &self.e.location else {
            return Ok("MESH_EXTERNAL".to_string());
        };
        match l.get_ref().to_ascii_uppercase().as_str() {
            v @ ("MESH_EXTERNAL" | "MESH_INTERNAL") => Ok(v.to_string()),
            other => Err(self.err(
                l.span().start,
                "location",
                format!("`{other}` is not MESH_EXTERNAL or MESH_INTERNAL"),
            )),
        }
    }
}

/// `run` starts only if its own upstream traffic escapes the redirect: it
/// runs as `proxy_uid` (and `proxy_gid`), or its sockets can carry `mark`.
pub fn check_self_exclusion(
    redirect: &Redirect,
    euid: u32,
    egid: u32,
    mark_works: bool,
) -> Result<(), String> {
    let uid_ok = euid == redirect.proxy_uid && redirect.proxy_gid.is_none_or(|g| g == egid);
    if uid_ok || (redirect.mark.is_some() && mark_works) {
        return Ok(());
    }
    let who = match redirect.proxy_gid {
        Some(g) => format!("uid {} and gid {}", redirect.proxy_uid, g),
        None => format!("uid {}", redirect.proxy_uid),
    };
    let mark = match redirect.mark {
        Some(m) if !mark_works => format!(
            ", and setting SO_MARK {m:#x} was refused (it needs CAP_NET_ADMIN or CAP_NET_RAW)"
        ),
        _ => String::new(),
    };
    Err(format!(
        "refusing to start: the proxy runs as uid {euid} gid {egid} but [redirect] excludes only {who}{mark}; its own upstream connections would be redirected back to itself. Run it as {who} (or use `run --redirect`, which does)"
    ))
}

// ---------------------------------------------------------------- include

/// The files an `include` pattern matches now, sorted. Patterns are relative
/// to the config file's directory; `*`, `?` and `[..]` never match a leading
/// dot, so a ConfigMap volume's `..data/` and `..2026_*/` twins (and editor
/// dot-files) are not read; directories are skipped.
pub fn include_matches(config: &Path, pattern: &str) -> Result<Vec<PathBuf>, String> {
    let base = config.parent().unwrap_or(Path::new(""));
    let full = if Path::new(pattern).is_absolute() {
        pattern.to_string()
    } else {
        let b = base.to_string_lossy();
        if b.is_empty() {
            pattern.to_string()
        } else {
            format!("{}/{pattern}", glob::Pattern::escape(&b))
        }
    };
    let opts = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: true,
    };
    let paths = glob::glob_with(&full, opts).map_err(|e| format!("`{pattern}`: {e}"))?;
    let mut out: Vec<PathBuf> = paths
        .filter_map(Result::ok)
        .filter(|p| !p.is_dir())
        .collect();
    out.sort();
    Ok(out)
}

/// The `include` patterns of the config file at `path`, read leniently (for
/// the reload watcher, which must watch them even while the file is invalid).
pub fn include_patterns(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.parse::<toml::Table>().ok())
        .and_then(|t| t.get("include").cloned())
        .and_then(|v| v.as_array().cloned())
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn is_yaml(p: &Path) -> bool {
    matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
}

/// Reads every included file into `entries`: TOML fragments through the same
/// validation as the config file's own entries, YAML through `import`'s
/// converter. Entry names are unique across all files.
fn load_includes(
    ctx: &Ctx,
    path: &Path,
    patterns: &Spanned<Vec<String>>,
    entries: &mut Vec<ServiceEntry>,
    warnings: &mut Vec<String>,
) -> Result<(), ConfigError> {
    let off = patterns.span().start;
    let mut seen_files = HashSet::new();
    // `include = ["*.toml"]` beside the config file must not read the file itself
    if let Ok(own) = std::fs::canonicalize(path) {
        seen_files.insert(own);
    }
    for pattern in patterns.get_ref() {
        let files = include_matches(path, pattern).map_err(|m| ctx.err(off, "", "include", m))?;
        if files.is_empty() {
            warnings.push(format!(
                "{}:{}: include `{pattern}` matches no file",
                ctx.path,
                ctx.line_of(off)
            ));
        }
        for file in files {
            let real = std::fs::canonicalize(&file).unwrap_or_else(|_| file.clone());
            if !seen_files.insert(real) {
                continue; // the config file itself, or a file two patterns match
            }
            let shown = file.display().to_string();
            let text = std::fs::read_to_string(&file).map_err(|source| ConfigError::Read {
                path: shown.clone(),
                source,
            })?;
            let before = entries.len();
            if is_yaml(&file) {
                include_yaml(&shown, &text, entries, warnings)?;
            } else {
                include_toml(&shown, &text, entries, warnings)?;
            }
            // names unique across the config file and every included file
            for i in before..entries.len() {
                let e = &entries[i];
                if let Some(first) = entries[..i].iter().find(|f| f.name == e.name) {
                    return Err(ConfigError::Include {
                        path: shown,
                        line: e.line,
                        message: format!(
                            "service_entry \"{}\": the name is already used at {}:{} (entry names must be unique)",
                            e.name,
                            first.source.display(),
                            first.line
                        ),
                    });
                }
            }
        }
    }
    Ok(())
}

fn include_toml(
    shown: &str,
    text: &str,
    entries: &mut Vec<ServiceEntry>,
    warnings: &mut Vec<String>,
) -> Result<(), ConfigError> {
    let raw: RawFragment = toml::from_str(text).map_err(|e| match toml_error(shown, text, &e) {
        ConfigError::Invalid {
            path,
            line,
            context,
            key,
            message,
        } if context.is_empty() => ConfigError::Invalid {
            path,
            line,
            context,
            key,
            message: format!(
                "{message}; an included TOML file holds only [[service_entry]] tables"
            ),
        },
        other => other,
    })?;
    let ctx = Ctx {
        path: shown,
        src: text,
        entry_headers: entry_headers(text),
    };
    for (i, r) in raw.service_entry.iter().enumerate() {
        entries.push(validate_entry(&ctx, i, r, warnings)?);
    }
    Ok(())
}

fn include_yaml(
    shown: &str,
    text: &str,
    entries: &mut Vec<ServiceEntry>,
    warnings: &mut Vec<String>,
) -> Result<(), ConfigError> {
    let mut out = crate::import::Outcome::default();
    crate::import::convert_file(shown, text, &crate::import::Options::default(), &mut out)
        .map_err(|e| match e {
            crate::import::ImportError::NotYaml {
                file,
                line,
                message,
            } => ConfigError::Include {
                path: file,
                line,
                message: format!("not YAML: {message}"),
            },
            crate::import::ImportError::Input { file, message } => ConfigError::Include {
                path: file,
                line: 1,
                message,
            },
        })?;
    warnings.extend(out.skipped.iter().cloned());
    for c in &out.entries {
        if let Some(why) = &c.refused {
            return Err(ConfigError::Include {
                path: shown.to_string(),
                line: c.line,
                message: format!(
                    "ServiceEntry {} cannot be included: {why} (`portcullis import` shows the entry it would write)",
                    c.name
                ),
            });
        }
        for n in &c.notes {
            warnings.push(format!("{shown}:{}: ServiceEntry {}: {n}", c.line, c.name));
        }
        for t in &c.tables {
            let src = format!("[[service_entry]]\n{}", t.body);
            let fail = |message: String| ConfigError::Include {
                path: shown.to_string(),
                line: c.line,
                message: format!("ServiceEntry {}: {message}", c.name),
            };
            let raw: RawFragment = toml::from_str(&src).map_err(|e| fail(e.message().into()))?;
            let ctx = Ctx {
                path: shown,
                src: &src,
                entry_headers: vec![1],
            };
            let Some(r) = raw.service_entry.first() else {
                continue;
            };
            let mut e = validate_entry(&ctx, 0, r, warnings).map_err(|e| match e {
                ConfigError::Invalid {
                    context,
                    key,
                    message,
                    ..
                } => fail(format!("{context}key `{key}`: {message}")),
                other => fail(other.to_string()),
            })?;
            e.line = c.line;
            entries.push(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("5"), Err(DurationError::NoUnit("5".into())));
        assert_eq!(
            parse_duration("5d"),
            Err(DurationError::UnknownUnit {
                input: "5d".into(),
                unit: "d".into()
            })
        );
        assert_eq!(
            parse_duration("s"),
            Err(DurationError::NotANumber("s".into()))
        );
        assert_eq!(
            parse_duration("1.2.3s"),
            Err(DurationError::NotANumber("1.2.3s".into()))
        );
        assert_eq!(
            parse_duration("0.0001s"),
            Err(DurationError::BelowResolution("0.0001s".into()))
        );
        assert_eq!(
            parse_duration("2e9s"),
            Err(DurationError::UnknownUnit {
                input: "2e9s".into(),
                unit: "e9s".into()
            })
        );
        assert_eq!(
            parse_duration("9999999999s"),
            Err(DurationError::OutOfRange("9999999999s".into()))
        );
        assert_eq!(parse_duration("0.0015s").unwrap(), Duration::from_millis(2));
        assert_eq!(format_duration(Duration::from_millis(200)), "200ms");
        assert_eq!(format_duration(Duration::from_secs(3600)), "1h");
    }

    #[test]
    fn defaults() {
        let c = Config::parse(Path::new("t.toml"), "").unwrap();
        assert_eq!(c.outbound_traffic_policy, Policy::RegistryOnly);
        assert_eq!(c.proxy.max_connections, MaxConnections::Auto);
        assert_eq!(c.redirect.proxy_port, 15001);
        assert_eq!(c.redirect.proxy_uid, 1337);
        assert_eq!(c.proxy.first_byte_timeout, Duration::from_millis(200));
        assert_eq!(
            c.redirect.allow_udp,
            vec![UdpAllow {
                ports: vec![53],
                cidrs: vec![]
            }]
        );
    }

    #[test]
    fn resolution_defaults_and_lines() {
        let src = "\n[[service_entry]]\nhosts = [\"a.example.com\"]\nports = [{ number = 443, protocol = \"HTTPS\" }]\n\n[[service_entry]]\nname = \"db\"\naddresses = [\"192.0.2.0/24\"]\nports = [{ number = 5432, protocol = \"TCP\" }]\n";
        let c = Config::parse(Path::new("t.toml"), src).unwrap();
        assert_eq!(c.entries[0].resolution, Resolution::Dns);
        assert_eq!(c.entries[0].ports[0].protocol, Protocol::Tls);
        assert_eq!(c.entries[0].line, 2);
        assert_eq!(c.entries[0].name, "a.example.com");
        assert_eq!(c.entries[1].resolution, Resolution::None);
        assert_eq!(c.entries[1].line, 6);
    }

    #[test]
    fn self_exclusion() {
        let c = Config::parse(
            Path::new("t.toml"),
            "[redirect]\nproxy_uid = 1337\nproxy_gid = 1337\nmark = 0x539\n",
        )
        .unwrap();
        assert!(check_self_exclusion(&c.redirect, 1337, 1337, false).is_ok());
        assert!(check_self_exclusion(&c.redirect, 1337, 1000, false).is_err());
        assert!(check_self_exclusion(&c.redirect, 0, 0, true).is_ok());
        let e = check_self_exclusion(&c.redirect, 1000, 1000, false).unwrap_err();
        assert!(e.contains("uid 1337 and gid 1337"), "{e}");
    }

    #[test]
    fn dhcp_client_uids() {
        let c = Config::parse(Path::new("t.toml"), "").unwrap();
        assert!(
            c.redirect.dhcp_client_uids.is_empty(),
            "pods run no DHCP client"
        );
        let c = Config::parse(
            Path::new("t.toml"),
            "[redirect]\ndhcp_client_uids = [0, \"systemd-network\", 0, \"_dhcp\"]\n",
        )
        .unwrap();
        assert_eq!(
            c.redirect.dhcp_client_uids,
            [
                UserRef::Id(0),
                UserRef::Name("systemd-network".into()),
                UserRef::Name("_dhcp".into())
            ]
        );
        for bad in [
            "-1",
            "\"Root\"",
            "\"a b\"",
            "\"\"",
            "\"1abc\"",
            "4294967296",
        ] {
            let e = Config::parse(
                Path::new("t.toml"),
                &format!("[redirect]\ndhcp_client_uids = [{bad}]\n"),
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("t.toml:2") && e.contains("dhcp_client_uids"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn health_on_both_families_by_default() {
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        let health = |t: &str| Config::parse(Path::new("t.toml"), t).map(|c| c.proxy.health);
        assert_eq!(health("").unwrap(), [sa("0.0.0.0:15021"), sa("[::]:15021")]);
        assert_eq!(
            health("[proxy]\nhealth = \"127.0.0.1:9\"").unwrap(),
            [sa("127.0.0.1:9")]
        );
        assert_eq!(
            health("[proxy]\nhealth = [\"10.0.0.1:9\", \"[fd00::1]:9\"]").unwrap(),
            [sa("10.0.0.1:9"), sa("[fd00::1]:9")]
        );
        assert!(health("[proxy]\nhealth = \"off\"").unwrap().is_empty());
        assert!(health("[proxy]\nhealth = []").unwrap().is_empty());
        let e = health("[proxy]\nhealth = [\"0.0.0.0:15021\", \"off\"]")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("health") && e.contains("`off` is not IP:PORT"),
            "{e}"
        );
    }
}
