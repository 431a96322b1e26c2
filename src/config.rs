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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum PortProtocol {
    Http,
    Tls,
    Tcp,
}

impl PortProtocol {
    pub fn as_str(&self) -> &'static str {
        match self {
            PortProtocol::Http => "HTTP",
            PortProtocol::Tls => "TLS",
            PortProtocol::Tcp => "TCP",
        }
    }
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
    pub protocol: PortProtocol,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Endpoint {
    pub address: IpAddr,
    pub port: Option<u16>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ServiceEntry {
    pub name: String,
    /// 1-based line of the entry's `[[service_entry]]` table in the file.
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
    pub ipv6: bool,
}

/// A validated configuration.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Config {
    pub path: PathBuf,
    pub outbound_traffic_policy: Policy,
    pub audit: bool,
    pub proxy: ProxySettings,
    pub redirect: Redirect,
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

/// Parses "250ms", "5s", "1.5s", "2m", "1h". A bare number is refused: the
/// unit is what makes a timeout readable at 3 a.m.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("`{s}` has no unit (write e.g. \"250ms\", \"5s\", \"1h\")"))?;
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (write e.g. \"250ms\", \"5s\", \"1h\")"))?;
    let scale = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => {
            return Err(format!(
                "`{s}` has an unknown unit `{unit}` (use ms, s, m or h)"
            ))
        }
    };
    let secs = value * scale;
    if !secs.is_finite() || secs > 1.0e9 {
        return Err(format!("`{s}` is out of range"));
    }
    // Millisecond resolution: what the timers honour and /config shows.
    let ms = (secs * 1000.0).round();
    if secs > 0.0 && ms < 1.0 {
        return Err(format!("`{s}` is below 1ms"));
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
    ipv6: Option<bool>,
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
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_string(),
            line: self.line_of(offset),
            context: context.to_string(),
            key: key.to_string(),
            message: message.into(),
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
        let raw: RawConfig = toml::from_str(src).map_err(|e| ConfigError::Syntax {
            path: shown.clone(),
            message: syntax_message(src, &e),
        })?;
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
        if !proxy.listen.iter().any(|a| a.port() == redirect.proxy_port) {
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
        if entries.is_empty() && policy == Policy::RegistryOnly && !audit {
            warnings.push("the registry is empty: under REGISTRY_ONLY every flow is denied".into());
        }

        Ok(Config {
            path: path.to_path_buf(),
            outbound_traffic_policy: policy,
            audit,
            proxy,
            redirect,
            entries,
            warnings,
        })
    }

    /// Audit applies only under REGISTRY_ONLY.
    pub fn audit_mode(&self) -> bool {
        self.audit && self.outbound_traffic_policy == Policy::RegistryOnly
    }
}

fn syntax_message(src: &str, e: &toml::de::Error) -> String {
    // toml's own rendering has line, column and a caret; put the line first
    // so every error reads "file:line: ...".
    match e.span() {
        Some(span) => {
            let line = src.as_bytes()[..span.start.min(src.len())]
                .iter()
                .filter(|b| **b == b'\n')
                .count()
                + 1;
            let msg = e.message().trim_end();
            format!("{line}: {msg}\n{}", e.to_string().trim_end())
        }
        None => format!(" {e}"),
    }
}

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
            if out.is_empty() {
                return Err(ctx.err(
                    l.span().start,
                    "[proxy] ",
                    "listen",
                    "at least one address is needed",
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
        ipv6: raw.ipv6.unwrap_or(true),
    })
}

fn protocol(raw: &str) -> Result<PortProtocol, String> {
    match raw.to_ascii_uppercase().as_str() {
        "HTTP" => Ok(PortProtocol::Http),
        "HTTPS" | "TLS" => Ok(PortProtocol::Tls),
        "TCP" => Ok(PortProtocol::Tcp),
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
    let start = raw.span().start;
    let line = ctx.entry_line(index, start);
    let e = raw.get_ref();
    let provisional = e
        .name
        .as_ref()
        .map(|n| n.get_ref().clone())
        .or_else(|| e.hosts.as_ref().and_then(|h| h.get_ref().first().cloned()))
        .unwrap_or_else(|| format!("#{}", index + 1));
    let context = format!("service_entry \"{provisional}\": ");
    let c = context.as_str();
    let err = |off: usize, key: &str, m: String| ctx.err(off, c, key, m);

    let mut hosts = Vec::new();
    if let Some(h) = &e.hosts {
        for s in h.get_ref() {
            hosts.push(HostPattern::parse(s).map_err(|m| err(h.span().start, "hosts", m))?);
        }
    }
    let ports_raw = e.ports.as_ref().ok_or_else(|| {
        err(
            start,
            "ports",
            "is required (e.g. ports = [{ number = 443, protocol = \"TLS\" }])".into(),
        )
    })?;
    let mut ports = Vec::new();
    let mut seen = HashSet::new();
    for p in ports_raw.get_ref() {
        let number = port_num(ctx, p.number, ports_raw.span().start, c, "ports")?;
        let proto = protocol(&p.protocol).map_err(|m| err(ports_raw.span().start, "ports", m))?;
        if !seen.insert(number) {
            return Err(err(
                ports_raw.span().start,
                "ports",
                format!("port {number} is listed twice"),
            ));
        }
        ports.push(Port {
            number,
            name: p.name.clone(),
            protocol: proto,
        });
    }
    if ports.is_empty() {
        return Err(err(
            ports_raw.span().start,
            "ports",
            "at least one port is needed".into(),
        ));
    }
    let named_proto = ports.iter().any(|p| p.protocol != PortProtocol::Tcp);
    let has_tcp = ports.iter().any(|p| p.protocol == PortProtocol::Tcp);

    let resolution = match &e.resolution {
        None if named_proto => Resolution::Dns,
        None => Resolution::None,
        Some(r) => match r.get_ref().to_ascii_uppercase().as_str() {
            "DNS" => Resolution::Dns,
            "NONE" => Resolution::None,
            "STATIC" => Resolution::Static,
            other => {
                return Err(err(
                    r.span().start,
                    "resolution",
                    format!("`{other}` is not DNS, NONE or STATIC"),
                ))
            }
        },
    };
    let res_off = e
        .resolution
        .as_ref()
        .map(|r| r.span().start)
        .unwrap_or(start);

    let addresses = match &e.addresses {
        None => vec![],
        Some(v) => cidrs(ctx, v, c, "addresses")?,
    };
    let mut endpoints = Vec::new();
    if let Some(v) = &e.endpoints {
        for ep in v.get_ref() {
            let address: IpAddr = ep
                .address
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse()
                .map_err(|_| {
                    err(
                        v.span().start,
                        "endpoints",
                        format!("`{}` is not an IP address", ep.address),
                    )
                })?;
            let port = match ep.port {
                None => None,
                Some(n) => Some(port_num(ctx, n, v.span().start, c, "endpoints")?),
            };
            endpoints.push(Endpoint {
                address: crate::net::canonical_ip(address),
                port,
            });
        }
    }
    let ep_off = e
        .endpoints
        .as_ref()
        .map(|v| v.span().start)
        .unwrap_or(res_off);
    match resolution {
        Resolution::Static if endpoints.is_empty() => {
            return Err(err(
                res_off,
                "endpoints",
                "resolution STATIC needs endpoints = [{ address = \"IP\", port = N }]".into(),
            ))
        }
        Resolution::Dns | Resolution::None if !endpoints.is_empty() => {
            return Err(err(
                ep_off,
                "endpoints",
                "endpoints are only used with resolution = \"STATIC\"".into(),
            ))
        }
        _ => {}
    }
    let addr_off = e
        .addresses
        .as_ref()
        .map(|v| v.span().start)
        .unwrap_or(start);
    if hosts.is_empty() {
        if named_proto {
            return Err(err(
                start,
                "hosts",
                "TLS and HTTP ports are matched by name: list at least one host".into(),
            ));
        }
        if addresses.is_empty() {
            return Err(err(
                start,
                "hosts",
                "an entry needs hosts, or addresses for TCP ports".into(),
            ));
        }
        if e.name.is_none() {
            return Err(err(
                start,
                "name",
                "an entry without hosts needs a name".into(),
            ));
        }
        if resolution == Resolution::Dns {
            return Err(err(
                res_off,
                "resolution",
                "resolution DNS needs hosts to resolve".into(),
            ));
        }
    }
    if has_tcp && addresses.is_empty() {
        if resolution != Resolution::Dns {
            return Err(err(
                res_off,
                "addresses",
                "a TCP port is matched by address only: give `addresses`, or resolution = \"DNS\" with exact hosts (to trust the client's choice of IP deliberately, write addresses = [\"0.0.0.0/0\", \"::/0\"])".into(),
            ));
        }
        if let Some(w) = hosts.iter().find(|h| h.is_wildcard()) {
            let off = e.hosts.as_ref().map(|h| h.span().start).unwrap_or(start);
            return Err(err(
                off,
                "hosts",
                format!("`{w}` cannot be resolved ahead: a TCP port with resolution DNS needs exact hosts (or give `addresses`)"),
            ));
        }
    }
    if named_proto && resolution == Resolution::None && addresses.is_empty() {
        return Err(err(
            res_off,
            "addresses",
            "a TLS/HTTP entry with resolution NONE would connect wherever the client dialled: give `addresses`, or use resolution DNS (to trust the client's choice deliberately, write addresses = [\"0.0.0.0/0\", \"::/0\"])".into(),
        ));
    }
    let name = e
        .name
        .as_ref()
        .map(|n| n.get_ref().clone())
        .unwrap_or_else(|| hosts.first().map(|h| h.to_string()).unwrap_or_default());
    if name.is_empty() || name.len() > 253 || name.chars().any(|ch| ch.is_control() || ch == '"') {
        let off = e.name.as_ref().map(|n| n.span().start).unwrap_or(start);
        return Err(err(
            off,
            "name",
            "names are 1-253 printable characters without quotes".into(),
        ));
    }
    if matches!(name.as_str(), "BlackHole" | "Passthrough") {
        let off = e.name.as_ref().map(|n| n.span().start).unwrap_or(start);
        return Err(err(
            off,
            "name",
            format!("`{name}` is reserved for flows that match no entry"),
        ));
    }
    if addresses.iter().any(|a| a.is_everything()) {
        warnings.push(format!(
            "{}:{}: service_entry \"{}\": addresses include {} which trusts the client's choice of IP: a client presenting an allowed name can reach any address",
            ctx.path,
            ctx.line_of(addr_off),
            name,
            addresses.iter().filter(|a| a.is_everything()).map(|a| a.to_string()).collect::<Vec<_>>().join(", "),
        ));
    }
    let location = match &e.location {
        None => "MESH_EXTERNAL".to_string(),
        Some(l) => match l.get_ref().to_ascii_uppercase().as_str() {
            v @ ("MESH_EXTERNAL" | "MESH_INTERNAL") => v.to_string(),
            other => {
                return Err(err(
                    l.span().start,
                    "location",
                    format!("`{other}` is not MESH_EXTERNAL or MESH_INTERNAL"),
                ))
            }
        },
    };
    Ok(ServiceEntry {
        name,
        line,
        hosts,
        ports,
        resolution,
        addresses,
        endpoints,
        location,
    })
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
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("0.0001s").is_err());
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
        assert_eq!(c.entries[0].ports[0].protocol, PortProtocol::Tls);
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
