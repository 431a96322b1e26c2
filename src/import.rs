//! Import stage: Istio ServiceEntry YAML (as `kubectl get -o yaml` and git
//! repositories hold it) becomes portcullis `[[service_entry]]` tables.
//! `portcullis import` prints a whole config; `include` (config.rs) reads the
//! same conversion of each included YAML file. See docs/DESIGN.md §1, §2.
//!
//! The mapping keeps Istio's meaning where portcullis has it and says so in a
//! comment where it differs; where Istio would trust the client's choice of
//! IP (resolution NONE on a TLS/HTTP port without addresses) the import
//! resolves the presented name instead; an entry that cannot be expressed
//! without trusting the client (an opaque TCP port with no addresses captures
//! the whole port in Istio) is refused: commented out by `import`, a load
//! error for `include`.
//!
//! YAML is read with saphyr (maintained, pure Rust): its `MarkedYaml` carries
//! the line of every node, which the `file:line` of messages, comments and
//! `explain` needs (serde_norway's `Value` has no positions). The document is
//! reduced to a small tree of its own before conversion; nesting is bounded
//! on the event stream first, as building and dropping a tree recurse.

use std::collections::HashSet;
use std::fmt::Write as _;

use saphyr::{LoadableYamlNode, MarkedYaml, Scalar, YamlData};

use crate::name::HostPattern;
use crate::net::Cidr;

/// Inputs larger than this are refused: manifests are kilobytes, and the
/// YAML tree of a hostile file costs many times its size.
pub const MAX_INPUT: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{file}:{line}: not YAML: {message}")]
    NotYaml {
        file: String,
        line: usize,
        message: String,
    },
    #[error("{file}: {message}")]
    Input { file: String, message: String },
}

// ---------------------------------------------------------------- the tree

/// A YAML node reduced to what Kubernetes objects use, with its line.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    line: usize,
    v: Val,
}

#[derive(Debug, Clone)]
enum Val {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(String, Node)>),
}

impl Node {
    fn get(&self, key: &str) -> Option<&Node> {
        match &self.v {
            Val::Map(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
    fn path(&self, keys: &[&str]) -> Option<&Node> {
        keys.iter().try_fold(self, |n, k| n.get(k))
    }
    fn str(&self) -> Option<&str> {
        match &self.v {
            Val::Str(s) => Some(s),
            _ => None,
        }
    }
    fn str_at(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Node::str)
    }
    fn seq(&self) -> &[Node] {
        match &self.v {
            Val::Seq(s) => s,
            _ => &[],
        }
    }
    fn map(&self) -> &[(String, Node)] {
        match &self.v {
            Val::Map(m) => m,
            _ => &[],
        }
    }
    fn is_null(&self) -> bool {
        matches!(self.v, Val::Null)
    }
    /// A scalar as text, for comments.
    fn text(&self) -> String {
        match &self.v {
            Val::Null => "null".into(),
            Val::Bool(b) => b.to_string(),
            Val::Int(i) => i.to_string(),
            Val::Float(f) => f.to_string(),
            Val::Str(s) => s.clone(),
            Val::Seq(s) => format!(
                "[{}]",
                s.iter().map(Node::text).collect::<Vec<_>>().join(", ")
            ),
            Val::Map(m) => format!(
                "{{{}}}",
                m.iter()
                    .map(|(k, v)| format!("{k}: {}", v.text()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

fn scalar(s: &Scalar) -> Val {
    match s {
        Scalar::Null => Val::Null,
        Scalar::Boolean(b) => Val::Bool(*b),
        Scalar::Integer(i) => Val::Int(*i),
        Scalar::FloatingPoint(f) => Val::Float(f.into_inner()),
        Scalar::String(s) => Val::Str(s.to_string()),
    }
}

fn reduce(y: &MarkedYaml, depth: usize) -> Node {
    let line = y.span.start.line();
    let v = if depth > 64 {
        // Kubernetes objects nest a dozen levels; deeper is not a manifest.
        Val::Null
    } else {
        match &y.data {
            YamlData::Value(s) => scalar(s),
            YamlData::Representation(raw, _, _) => Val::Str(raw.to_string()),
            YamlData::Sequence(s) => Val::Seq(s.iter().map(|n| reduce(n, depth + 1)).collect()),
            YamlData::Mapping(m) => Val::Map(
                m.iter()
                    .map(|(k, v)| {
                        let key = match &k.data {
                            YamlData::Value(s) => match scalar(s) {
                                Val::Str(s) => s,
                                other => Node { line, v: other }.text(),
                            },
                            _ => String::new(),
                        };
                        (key, reduce(v, depth + 1))
                    })
                    .collect(),
            ),
            YamlData::Tagged(_, inner) => return reduce(inner, depth + 1),
            _ => Val::Null,
        }
    };
    Node { line, v }
}

/// The documents of one file, each a node with its line.
pub(crate) fn parse_yaml(file: &str, text: &str) -> Result<Vec<Node>, ImportError> {
    if text.len() > MAX_INPUT {
        return Err(ImportError::Input {
            file: file.into(),
            message: format!("larger than {} MiB", MAX_INPUT >> 20),
        });
    }
    check_depth(file, text)?;
    let docs = MarkedYaml::load_from_str(text).map_err(|e| ImportError::NotYaml {
        file: file.into(),
        line: e.marker().line().max(1),
        message: e.info().to_string(),
    })?;
    Ok(docs.iter().map(|d| reduce(d, 0)).collect())
}

/// Kubernetes objects nest about a dozen levels; a tree deeper than this is
/// refused before it is built (building, and dropping, a tree recurses).
const MAX_DEPTH: usize = 64;

/// Walks the event stream (no tree) and refuses nesting deeper than
/// `MAX_DEPTH`, counting what an alias would expand to.
fn check_depth(file: &str, text: &str) -> Result<(), ImportError> {
    use saphyr_parser::{Event, Parser};
    let mut stack: Vec<(usize, usize)> = Vec::new(); // (anchor, deepest child)
    let mut heights: std::collections::HashMap<usize, usize> = Default::default();
    let too_deep = |line: usize| ImportError::NotYaml {
        file: file.into(),
        line: line.max(1),
        message: format!("nested deeper than {MAX_DEPTH} levels (not a Kubernetes manifest)"),
    };
    for ev in Parser::new_from_str(text) {
        let (ev, span) = ev.map_err(|e| ImportError::NotYaml {
            file: file.into(),
            line: e.marker().line().max(1),
            message: e.info().to_string(),
        })?;
        match ev {
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                stack.push((anchor, 0));
                if stack.len() > MAX_DEPTH {
                    return Err(too_deep(span.start.line()));
                }
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some((anchor, h)) = stack.pop() {
                    let h = h + 1;
                    if anchor > 0 {
                        heights.insert(anchor, h);
                    }
                    if let Some(top) = stack.last_mut() {
                        top.1 = top.1.max(h);
                    }
                }
            }
            Event::Alias(id) => {
                let h = heights.get(&id).copied().unwrap_or(0);
                if stack.len() + h > MAX_DEPTH {
                    return Err(too_deep(span.start.line()));
                }
                if let Some(top) = stack.last_mut() {
                    top.1 = top.1.max(h);
                }
            }
            _ => {}
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- objects

/// One Kubernetes object found in the input.
struct Object<'a> {
    file: &'a str,
    node: &'a Node,
}

impl Object<'_> {
    fn api_version(&self) -> &str {
        self.node.str_at("apiVersion").unwrap_or("")
    }
    fn kind(&self) -> &str {
        self.node.str_at("kind").unwrap_or("")
    }
    fn name(&self) -> &str {
        self.node
            .path(&["metadata", "name"])
            .and_then(Node::str)
            .unwrap_or("")
    }
    fn namespace(&self) -> Option<&str> {
        self.node
            .path(&["metadata", "namespace"])
            .and_then(Node::str)
    }
    fn at(&self) -> String {
        format!("{}:{}", self.file, self.node.line)
    }
}

/// Flattens `kind: List` (and `...List` of the API) into its items; a document
/// that is not a mapping is skipped with a note.
fn objects<'a>(file: &'a str, docs: &'a [Node], notes: &mut Vec<String>) -> Vec<Object<'a>> {
    let mut out = Vec::new();
    for d in docs {
        match &d.v {
            Val::Null => {} // an empty document (`---` at the end)
            Val::Map(_) => {
                let kind = d.str_at("kind").unwrap_or("");
                if kind.ends_with("List") && d.get("items").is_some() {
                    for item in d.get("items").map(Node::seq).unwrap_or(&[]) {
                        if matches!(item.v, Val::Map(_)) {
                            out.push(Object { file, node: item });
                        }
                    }
                } else {
                    out.push(Object { file, node: d });
                }
            }
            _ => notes.push(format!(
                "{file}:{}: skipped: a document that is not a Kubernetes object",
                d.line
            )),
        }
    }
    out
}

fn is_istio_networking(api: &str) -> bool {
    matches!(
        api,
        "networking.istio.io/v1" | "networking.istio.io/v1beta1" | "networking.istio.io/v1alpha3"
    )
}

// ---------------------------------------------------------------- conversion

/// Options of `portcullis import`.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Keep only the ServiceEntries visible in this namespace (`exportTo`).
    pub namespace: Option<String>,
}

/// One portcullis table made from a ServiceEntry.
#[derive(Debug, Clone)]
pub struct Table {
    pub name: String,
    /// TOML `key = value` lines, without the `[[service_entry]]` header.
    pub body: String,
}

/// A ServiceEntry and what became of it.
#[derive(Debug, Clone)]
pub struct Converted {
    pub file: String,
    /// The line of the ServiceEntry in `file`.
    pub line: usize,
    /// `namespace/name`.
    pub name: String,
    pub api_version: String,
    /// Differences in meaning and fields without an equivalent.
    pub notes: Vec<String>,
    /// Usually one; a STATIC entry whose endpoints use another port per
    /// service port becomes one table per port.
    pub tables: Vec<Table>,
    /// Why the entry cannot be expressed safely, and what to add.
    pub refused: Option<String>,
    /// A refused entry as it would read, to complete (may be empty).
    pub draft: String,
}

/// The outcome of converting one or more files.
#[derive(Debug, Default)]
pub struct Outcome {
    pub entries: Vec<Converted>,
    /// Skipped objects and other remarks, each "file:line: ...".
    pub skipped: Vec<String>,
    /// The `outbound_traffic_policy` the input implies, and where from.
    pub modes: Vec<(String, String)>,
}

impl Outcome {
    /// Kubernetes holds one object per namespace/name: where the input has
    /// several (the same manifest in two files), the last one read is kept,
    /// as `kubectl apply -f a -f b` would leave it; the others are commented out.
    pub fn dedupe(&mut self) {
        let n = self.entries.len();
        for i in 0..n {
            let later = (i + 1..n).find(|&j| self.entries[j].name == self.entries[i].name);
            if let Some(j) = later {
                let at = format!("{}:{}", self.entries[j].file, self.entries[j].line);
                let e = &mut self.entries[i];
                if e.refused.is_none() {
                    e.draft = e.tables.iter().map(|t| t.body.clone()).collect();
                    e.tables.clear();
                }
                e.refused = Some(format!(
                    "ServiceEntry {} appears again at {at}, which is kept (as `kubectl apply` keeps the last)",
                    e.name
                ));
            }
        }
    }

    pub fn policy(&self) -> &'static str {
        // Fail closed: absent, or any source saying REGISTRY_ONLY.
        if !self.modes.is_empty() && self.modes.iter().all(|(m, _)| m == "ALLOW_ANY") {
            "ALLOW_ANY"
        } else {
            "REGISTRY_ONLY"
        }
    }
}

/// Converts the objects of one file, appending to `out`.
pub fn convert_file(
    file: &str,
    text: &str,
    opts: &Options,
    out: &mut Outcome,
) -> Result<(), ImportError> {
    let docs = parse_yaml(file, text)?;
    let mut notes = Vec::new();
    let objs = objects(file, &docs, &mut notes);
    out.skipped.extend(notes);
    for o in objs {
        let (api, kind) = (o.api_version(), o.kind());
        match kind {
            "ServiceEntry" if is_istio_networking(api) => {
                if let Some(why) = hidden(&o, opts) {
                    out.skipped.push(format!(
                        "{}: skipped: ServiceEntry {}/{} is not visible in namespace {} ({why})",
                        o.at(),
                        o.namespace().unwrap_or("?"),
                        o.name(),
                        opts.namespace.as_deref().unwrap_or("")
                    ));
                    continue;
                }
                out.entries.push(convert_entry(&o, opts));
            }
            "ServiceEntry" => out.skipped.push(format!(
                "{}: skipped: ServiceEntry {} of apiVersion `{api}` (read: networking.istio.io v1, v1beta1, v1alpha3)",
                o.at(),
                o.name()
            )),
            "ConfigMap" if o.node.path(&["data", "mesh"]).is_some() => {
                let mesh = o.node.path(&["data", "mesh"]).and_then(Node::str).unwrap_or("");
                match parse_yaml(file, mesh) {
                    Ok(m) => {
                        let mode = m
                            .first()
                            .and_then(|m| m.path(&["outboundTrafficPolicy", "mode"]))
                            .and_then(Node::str);
                        note_mode(out, &o, mode, "ConfigMap mesh key");
                    }
                    Err(e) => out.skipped.push(format!(
                        "{}: the mesh key of ConfigMap {} is not YAML ({e}); its outboundTrafficPolicy is ignored",
                        o.at(),
                        o.name()
                    )),
                }
            }
            "IstioOperator" if api.starts_with("install.istio.io/") => {
                let mode = o
                    .node
                    .path(&["spec", "meshConfig", "outboundTrafficPolicy", "mode"])
                    .and_then(Node::str);
                note_mode(out, &o, mode, "IstioOperator spec.meshConfig");
            }
            "Sidecar" if is_istio_networking(api) => {
                let selector = o.node.path(&["spec", "workloadSelector"]);
                let applies = match (&opts.namespace, o.namespace()) {
                    (Some(ns), Some(own)) => ns == own || own == "istio-system",
                    _ => true,
                };
                if selector.is_some_and(|s| !s.is_null()) {
                    out.skipped.push(format!(
                        "{}: skipped: Sidecar {} has a workloadSelector (it applies to some workloads only)",
                        o.at(),
                        o.name()
                    ));
                } else if !applies {
                    out.skipped.push(format!(
                        "{}: skipped: Sidecar {} is for namespace {}",
                        o.at(),
                        o.name(),
                        o.namespace().unwrap_or("")
                    ));
                } else {
                    let mode = o
                        .node
                        .path(&["spec", "outboundTrafficPolicy", "mode"])
                        .and_then(Node::str);
                    note_mode(out, &o, mode, "Sidecar");
                }
            }
            "" => out.skipped.push(format!(
                "{}: skipped: a document without `kind`",
                o.at()
            )),
            _ => out.skipped.push(format!(
                "{}: skipped: {kind} {}{}",
                o.at(),
                o.namespace().map(|n| format!("{n}/")).unwrap_or_default(),
                o.name()
            )),
        }
    }
    Ok(())
}

fn note_mode(out: &mut Outcome, o: &Object, mode: Option<&str>, what: &str) {
    match mode {
        None => {}
        Some(m @ ("ALLOW_ANY" | "REGISTRY_ONLY")) => out
            .modes
            .push((m.to_string(), format!("{what} {} ({})", o.name(), o.at()))),
        Some(other) => out.skipped.push(format!(
            "{}: {what} {}: outboundTrafficPolicy mode `{}` is unknown; ignored",
            o.at(),
            o.name(),
            clean(other)
        )),
    }
}

/// Why the entry is not visible in `opts.namespace` (exportTo), if it is not.
fn hidden(o: &Object, opts: &Options) -> Option<String> {
    let ns = opts.namespace.as_deref()?;
    let own = o.namespace().unwrap_or(ns);
    let export: Vec<&str> = o
        .node
        .path(&["spec", "exportTo"])
        .map(|n| n.seq().iter().filter_map(Node::str).collect())
        .unwrap_or_default();
    if export.is_empty() {
        return None; // absent: exported to every namespace
    }
    let visible = export
        .iter()
        .any(|e| *e == "*" || *e == ns || (*e == "." && own == ns));
    (!visible).then(|| format!("exportTo: [{}]", export.join(", ")))
}

/// Input text made safe for a one-line comment or message.
fn clean(s: &str) -> String {
    let s: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect();
    s
}

fn quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Proto {
    Http,
    Tls,
    Tcp,
}

impl Proto {
    fn as_str(self) -> &'static str {
        match self {
            Proto::Http => "HTTP",
            Proto::Tls => "TLS",
            Proto::Tcp => "TCP",
        }
    }
}

struct PortIn {
    number: u16,
    name: Option<String>,
    proto: Proto,
    target: Option<u16>,
}

fn port_number(n: &Node) -> Option<u16> {
    match n.v {
        Val::Int(i) if (1..=65535).contains(&i) => Some(i as u16),
        _ => None,
    }
}

/// Istio's protocol for a port: the `protocol` field (case-insensitive), or
/// the name's prefix (`<protocol>[-<suffix>]`), as Istio reads them.
fn istio_protocol(p: &Node) -> Option<String> {
    if let Some(s) = p.str_at("protocol").filter(|s| !s.is_empty()) {
        return Some(s.to_ascii_uppercase());
    }
    let name = p.str_at("name")?.to_ascii_lowercase();
    let prefix = name.split('-').next().unwrap_or("");
    let known = [
        "http", "https", "tls", "tcp", "http2", "grpc", "grpc-web", "mongo", "mysql", "redis",
        "udp",
    ];
    known.contains(&prefix).then(|| prefix.to_ascii_uppercase())
}

fn convert_entry(o: &Object, opts: &Options) -> Converted {
    let mut notes = Vec::new();
    let ns = match o.namespace() {
        Some(n) => n.to_string(),
        None => {
            let ns = opts.namespace.clone().unwrap_or_else(|| "default".into());
            notes.push(format!(
                "metadata.namespace is absent: taken as {ns} (where `kubectl apply` without -n puts it)"
            ));
            ns
        }
    };
    let name = format!("{ns}/{}", clean(o.name()));
    let mut c = Converted {
        file: o.file.to_string(),
        line: o.node.line,
        name: name.clone(),
        api_version: o.api_version().to_string(),
        notes,
        tables: Vec::new(),
        refused: None,
        draft: String::new(),
    };
    if o.name().is_empty() {
        c.refused = Some("metadata.name is missing".into());
        return c;
    }
    let Some(spec) = o.node.get("spec").filter(|s| matches!(s.v, Val::Map(_))) else {
        c.refused = Some("spec is missing".into());
        return c;
    };
    match convert_spec(spec, &name, &mut c.notes) {
        Ok(tables) => c.tables = tables,
        Err(why) => {
            let (why, draft) = why.split_once('\n').unwrap_or((why.as_str(), ""));
            c.draft = draft.to_string();
            c.refused = Some(why.to_string());
        }
    }
    c
}

fn convert_spec(spec: &Node, name: &str, notes: &mut Vec<String>) -> Result<Vec<Table>, String> {
    // Fields portcullis has no equivalent for: said, never lost silently.
    for (k, v) in spec.map() {
        match k.as_str() {
            "hosts" | "addresses" | "ports" | "location" | "resolution" | "endpoints"
            | "exportTo" => {}
            "workloadSelector" => notes.push(format!(
                "workloadSelector {} has no equivalent: portcullis does not see Kubernetes workloads (list the endpoints)",
                clean(&v.text())
            )),
            "subjectAltNames" => notes.push(format!(
                "subjectAltNames {} has no equivalent: portcullis does not terminate or originate TLS; the client verifies the server",
                clean(&v.text())
            )),
            other => notes.push(format!(
                "spec.{} = {} has no equivalent",
                clean(other),
                clean(&v.text())
            )),
        }
    }
    if let Some(e) = spec.get("exportTo") {
        notes.push(format!(
            "exportTo {} (visibility between namespaces; `import --namespace` applies it)",
            clean(&e.text())
        ));
    }

    // hosts
    let mut hosts = Vec::new();
    for h in spec.get("hosts").map(Node::seq).unwrap_or(&[]) {
        let raw = h.str().unwrap_or("");
        if raw == "*" {
            return Err("host `*` matches every name: that is outbound_traffic_policy = \"ALLOW_ANY\", not an entry; list the hosts the workload needs".into());
        }
        let p = HostPattern::parse(raw).map_err(|m| clean(&m.to_string()))?;
        hosts.push(p);
    }
    if hosts.is_empty() {
        return Err("spec.hosts is empty (Istio requires hosts)".into());
    }

    // ports
    let mut ports = Vec::new();
    let mut seen = HashSet::new();
    for p in spec.get("ports").map(Node::seq).unwrap_or(&[]) {
        let Some(number) = p.get("number").and_then(port_number) else {
            return Err(format!(
                "port number `{}` is not a port (1-65535)",
                clean(&p.get("number").map(Node::text).unwrap_or_default())
            ));
        };
        if !seen.insert(number) {
            return Err(format!("port {number} is listed twice"));
        }
        let pname = p.str_at("name").map(clean);
        let proto = match istio_protocol(p).as_deref() {
            Some("HTTP") => Proto::Http,
            Some("HTTPS" | "TLS") => Proto::Tls,
            Some("TCP") => Proto::Tcp,
            Some(h2 @ ("HTTP2" | "GRPC" | "GRPC-WEB" | "H2C")) => {
                notes.push(format!(
                    "port {number} is {h2}: cleartext HTTP/2 is opaque to portcullis, imported as TCP; if the client speaks TLS on this port, change it to TLS (docs/DESIGN.md §2)"
                ));
                Proto::Tcp
            }
            Some("UDP") => {
                notes.push(format!(
                    "port {number} is UDP: portcullis relays TCP only; UDP egress is [redirect] allow_udp's"
                ));
                continue;
            }
            Some(other) => {
                notes.push(format!(
                    "port {number} is {}: an opaque protocol, imported as TCP (matched by address)",
                    clean(other)
                ));
                Proto::Tcp
            }
            None => {
                notes.push(format!(
                    "port {number} has no protocol (Istio sniffs it): imported as opaque TCP; if clients speak TLS or HTTP/1 here, say so"
                ));
                Proto::Tcp
            }
        };
        let target = p.get("targetPort").and_then(port_number);
        ports.push(PortIn {
            number,
            name: pname,
            proto,
            target,
        });
    }
    if ports.is_empty() {
        return Err("no TCP port to import (spec.ports is empty or UDP only)".into());
    }

    // resolution
    let res_raw = spec
        .str_at("resolution")
        .unwrap_or("NONE")
        .to_ascii_uppercase();
    let mut resolution = match res_raw.as_str() {
        "NONE" => "NONE",
        "DNS" => "DNS",
        "DNS_ROUND_ROBIN" => {
            notes.push("resolution DNS_ROUND_ROBIN: imported as DNS (portcullis connects to the client's IP if it is among the answers, else to the answers in turn)".into());
            "DNS"
        }
        "STATIC" => "STATIC",
        other => return Err(format!("resolution `{}` is unknown", clean(other))),
    };

    // addresses
    let mut addresses = Vec::new();
    for a in spec.get("addresses").map(Node::seq).unwrap_or(&[]) {
        let raw = a.str().unwrap_or("");
        let c = raw.parse::<Cidr>().map_err(|m| clean(&m.to_string()))?;
        addresses.push(c.to_string());
    }

    // endpoints
    struct Ep {
        ip: std::net::IpAddr,
        ports: Vec<(String, u16)>,
    }
    let mut endpoints = Vec::new();
    let mut named_endpoints = Vec::new();
    for e in spec.get("endpoints").map(Node::seq).unwrap_or(&[]) {
        let addr = e.str_at("address").unwrap_or("");
        for (k, v) in e.map() {
            if !matches!(k.as_str(), "address" | "ports") {
                notes.push(format!(
                    "endpoint {}: {} = {} has no equivalent",
                    clean(addr),
                    clean(k),
                    clean(&v.text())
                ));
            }
        }
        if addr.starts_with("unix://") {
            notes.push(format!(
                "endpoint {} is a unix socket: portcullis connects over TCP only; dropped",
                clean(addr)
            ));
            continue;
        }
        let ports: Vec<(String, u16)> = e
            .get("ports")
            .map(Node::map)
            .unwrap_or(&[])
            .iter()
            .filter_map(|(k, v)| port_number(v).map(|n| (k.clone(), n)))
            .collect();
        match addr
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
        {
            Ok(ip) => endpoints.push(Ep {
                ip: crate::net::canonical_ip(ip),
                ports,
            }),
            Err(_) if addr.is_empty() => return Err("an endpoint has no address".into()),
            Err(_) => named_endpoints.push(clean(addr)),
        }
    }
    if !named_endpoints.is_empty() {
        return Err(format!(
            "endpoints by name ({}): Istio resolves those names and sends the traffic there, portcullis connects to the presented name or to IP endpoints only. List the endpoints' IPs with resolution STATIC, or, if the hosts themselves resolve to the service, drop the endpoints",
            named_endpoints.join(", ")
        ));
    }
    match resolution {
        "NONE" if !endpoints.is_empty() => {
            notes.push("endpoints with resolution NONE are ignored by Istio; not imported".into());
            endpoints.clear();
        }
        "DNS" if !endpoints.is_empty() => {
            notes.push(
                "resolution DNS with IP endpoints: Istio connects to those IPs; imported as STATIC"
                    .into(),
            );
            resolution = "STATIC";
        }
        _ => {}
    }

    let named = ports.iter().any(|p| p.proto != Proto::Tcp);
    if named && resolution == "NONE" && addresses.is_empty() {
        notes.push("Istio's resolution NONE (its default) sends the flow to whatever IP the client dialled; imported as resolution DNS: the proxy resolves the presented name and connects there, never trusting the client's choice of IP".into());
        resolution = "DNS";
    }
    if !addresses.is_empty() && ports.iter().any(|p| p.proto == Proto::Http) && resolution != "NONE"
    {
        notes.push("addresses on an HTTP port: Istio matches HTTP by Host alone, portcullis also requires the destination IP in `addresses`".into());
    }
    if resolution == "DNS" {
        for p in ports
            .iter()
            .filter(|p| p.target.is_some_and(|t| t != p.number))
        {
            notes.push(format!(
                "port {} has targetPort {}: portcullis connects to the port the client dialled ({}); point the client at {} or use STATIC endpoints",
                p.number,
                p.target.unwrap_or(0),
                p.number,
                p.target.unwrap_or(0)
            ));
        }
    }
    let location = match spec
        .str_at("location")
        .unwrap_or("MESH_EXTERNAL")
        .to_ascii_uppercase()
        .as_str()
    {
        "MESH_INTERNAL" => "MESH_INTERNAL",
        "MESH_EXTERNAL" => "MESH_EXTERNAL",
        other => {
            notes.push(format!(
                "location `{}` is unknown: imported as MESH_EXTERNAL",
                clean(other)
            ));
            "MESH_EXTERNAL"
        }
    };

    // An endpoint's port for a service port: its `ports` map by the port's
    // name, else the port's targetPort, else the number the client dialled.
    let ep_port = |ep: &Ep, p: &PortIn| -> Option<u16> {
        let mapped = p
            .name
            .as_ref()
            .and_then(|n| ep.ports.iter().find(|(k, _)| k == n).map(|(_, v)| *v));
        match mapped.or(p.target) {
            Some(n) if n != p.number => Some(n),
            _ => None,
        }
    };
    let hosts_line = format!(
        "hosts = [{}]",
        hosts
            .iter()
            .map(|h| quote(&h.to_string()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let render = |name: &str, ports: &[&PortIn], eps: &[(std::net::IpAddr, Option<u16>)]| {
        let mut b = String::new();
        let _ = writeln!(b, "name = {}", quote(name));
        let _ = writeln!(b, "{hosts_line}");
        let ps: Vec<String> = ports
            .iter()
            .map(|p| match &p.name {
                Some(n) => format!(
                    "{{ number = {}, name = {}, protocol = \"{}\" }}",
                    p.number,
                    quote(n),
                    p.proto.as_str()
                ),
                None => format!(
                    "{{ number = {}, protocol = \"{}\" }}",
                    p.number,
                    p.proto.as_str()
                ),
            })
            .collect();
        let _ = writeln!(b, "ports = [{}]", ps.join(", "));
        let _ = writeln!(b, "resolution = \"{resolution}\"");
        if !addresses.is_empty() {
            let a: Vec<String> = addresses.iter().map(|a| quote(a)).collect();
            let _ = writeln!(b, "addresses = [{}]", a.join(", "));
        }
        if !eps.is_empty() {
            let e: Vec<String> = eps
                .iter()
                .map(|(ip, port)| match port {
                    Some(p) => format!("{{ address = {}, port = {p} }}", quote(&ip.to_string())),
                    None => format!("{{ address = {} }}", quote(&ip.to_string())),
                })
                .collect();
            let _ = writeln!(b, "endpoints = [{}]", e.join(", "));
        }
        let _ = writeln!(b, "location = \"{location}\"");
        b
    };

    let all: Vec<&PortIn> = ports.iter().collect();
    // Refused with the entry as it would read, for the operator to complete.
    let draft = render(
        name,
        &all,
        &endpoints.iter().map(|e| (e.ip, None)).collect::<Vec<_>>(),
    );
    let refuse = |why: String| format!("{why}\n{draft}");
    if resolution == "STATIC" && endpoints.is_empty() {
        return Err(refuse("resolution STATIC without endpoints (a workloadSelector picks Kubernetes workloads, which portcullis does not see): add endpoints = [{ address = \"IP\" }]".into()));
    }
    let tcp: Vec<u16> = ports
        .iter()
        .filter(|p| p.proto == Proto::Tcp)
        .map(|p| p.number)
        .collect();
    if !tcp.is_empty() && addresses.is_empty() {
        let list = tcp
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        match resolution {
            "DNS" => {
                if let Some(w) = hosts.iter().find(|h| h.is_wildcard()) {
                    return Err(refuse(format!(
                        "opaque TCP port {list} with wildcard host {w} and no addresses: a wildcard cannot be resolved ahead, so no address could be matched. Add `addresses` (the IPs or CIDRs the client dials)"
                    )));
                }
            }
            _ => {
                return Err(refuse(format!(
                    "opaque TCP port {list} with no addresses: in Istio it captures every connection to that port, whatever the IP; portcullis matches TCP by address. Add `addresses` (the IPs or CIDRs the client dials), or, if the hosts resolve to the service, resolution = \"DNS\" with exact hosts"
                )));
            }
        }
    }
    if resolution != "STATIC" {
        return Ok(vec![Table {
            name: name.to_string(),
            body: render(name, &all, &[]),
        }]);
    }
    // STATIC: one endpoint port per (endpoint, service port). Where every
    // service port maps each endpoint alike, one table; else one per port.
    let per_port: Vec<Vec<(std::net::IpAddr, Option<u16>)>> = ports
        .iter()
        .map(|p| endpoints.iter().map(|e| (e.ip, ep_port(e, p))).collect())
        .collect();
    let uniform = per_port
        .iter()
        .all(|v| v.iter().all(|(_, port)| port.is_none()))
        || (ports.len() == 1);
    if uniform {
        return Ok(vec![Table {
            name: name.to_string(),
            body: render(name, &all, &per_port[0]),
        }]);
    }
    notes.push("endpoints listen on other ports per service port (their `ports` map or targetPort): a portcullis endpoint has one port, so this entry becomes one table per port".into());
    Ok(ports
        .iter()
        .zip(per_port)
        .map(|(p, eps)| {
            let n = format!("{name}:{}", p.number);
            Table {
                body: render(&n, &[p], &eps),
                name: n,
            }
        })
        .collect())
}

// ---------------------------------------------------------------- output

/// A whole portcullis config from `Outcome`: what `portcullis import` prints.
pub fn render_config(sources: &[String], out: &Outcome) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# portcullis config generated by `portcullis import` from:"
    );
    for src in sources {
        let _ = writeln!(s, "#   {}", clean(src));
    }
    let _ = writeln!(
        s,
        "# Review it: comments mark where Istio's meaning differs and fields that have\n# no equivalent; entries that cannot be expressed safely are commented out.\n# `portcullis check -c FILE` validates it."
    );
    let _ = writeln!(s);
    let policy = out.policy();
    if out.modes.is_empty() {
        let _ = writeln!(
            s,
            "# No mesh config in the input (istio ConfigMap, IstioOperator, Sidecar): REGISTRY_ONLY."
        );
    } else {
        for (m, from) in &out.modes {
            let _ = writeln!(s, "# outboundTrafficPolicy {m} from {}", clean(from));
        }
        if out.modes.iter().any(|(m, _)| m != policy) {
            let _ = writeln!(s, "# The sources disagree: REGISTRY_ONLY wins.");
        }
    }
    let _ = writeln!(s, "outbound_traffic_policy = \"{policy}\"");
    let _ = writeln!(
        s,
        "\n# Every key not written here has its default (see the README's configuration).\n[proxy]\nlisten = [\"127.0.0.1:15001\", \"[::1]:15001\"]\nadmin = \"127.0.0.1:15000\"\n\n[redirect]\nproxy_port = 15001\nproxy_uid = 1337\ninclude_cidrs = [\"0.0.0.0/0\", \"::/0\"]\nallow_udp = [{{ ports = [53] }}]"
    );
    if !out.skipped.is_empty() {
        let _ = writeln!(s);
        for k in &out.skipped {
            let _ = writeln!(s, "# {}", clean(k));
        }
    }
    for e in &out.entries {
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "# ServiceEntry {} ({}:{}, {})",
            e.name,
            clean(&e.file),
            e.line,
            clean(&e.api_version)
        );
        for n in &e.notes {
            let _ = writeln!(s, "# note: {n}");
        }
        match &e.refused {
            Some(why) => {
                let then = if e.draft.is_empty() {
                    ""
                } else {
                    "; then uncomment"
                };
                let _ = writeln!(s, "# NOT IMPORTED: {why}{then}.");
                let _ = writeln!(s, "# [[service_entry]]");
                if e.draft.is_empty() {
                    let _ = writeln!(s, "# name = {}", quote(&e.name));
                }
                for l in e.draft.lines() {
                    let _ = writeln!(s, "# {l}");
                }
            }
            None => {
                for t in &e.tables {
                    let _ = writeln!(s, "[[service_entry]]");
                    s.push_str(&t.body);
                }
            }
        }
    }
    s
}

/// Warnings for stderr: refused entries and skipped objects.
pub fn warnings(out: &Outcome) -> Vec<String> {
    let mut w: Vec<String> = out.skipped.clone();
    for e in &out.entries {
        if let Some(why) = &e.refused {
            w.push(format!(
                "{}:{}: ServiceEntry {} not imported (commented out): {why}",
                e.file, e.line, e.name
            ));
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(yaml: &str) -> Converted {
        let mut out = Outcome::default();
        convert_file("t.yaml", yaml, &Options::default(), &mut out).unwrap();
        assert_eq!(out.entries.len(), 1, "{out:?}");
        out.entries.remove(0)
    }

    #[test]
    fn none_on_tls_without_addresses_becomes_dns() {
        let c = one("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: a, namespace: n}\nspec:\n  hosts: [api.example.com]\n  ports: [{number: 443, name: https, protocol: https}]\n");
        assert!(c.refused.is_none());
        assert!(c.tables[0].body.contains("resolution = \"DNS\""), "{c:?}");
        assert!(c.notes.iter().any(|n| n.contains("resolution NONE")));
        assert_eq!(c.line, 1);
    }

    #[test]
    fn opaque_tcp_without_addresses_is_refused() {
        let c = one("apiVersion: networking.istio.io/v1beta1\nkind: ServiceEntry\nmetadata: {name: m, namespace: n}\nspec:\n  hosts: [db.example.com]\n  ports: [{number: 27017, name: mongo, protocol: MONGO}]\n  resolution: NONE\n");
        assert!(c.refused.as_deref().unwrap().contains("addresses"), "{c:?}");
    }

    #[test]
    fn not_yaml_has_a_line() {
        let mut out = Outcome::default();
        let e = convert_file("x.yaml", "a: b\nc: [d\n", &Options::default(), &mut out)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("x.yaml:"), "{e}");
    }

    #[test]
    fn deep_nesting_is_refused_not_a_crash() {
        let mut inputs = vec![
            "[".repeat(100_000),
            format!("{}{}", "[".repeat(5000), "]".repeat(5000)),
            (0..3000)
                .map(|i| format!("{}a:", "  ".repeat(i)))
                .collect::<Vec<_>>()
                .join("\n"),
        ];
        // aliases nesting deeper than their events show
        let mut chain = String::from("a0: &a0 [x]\n");
        for i in 1..200 {
            chain.push_str(&format!("a{i}: &a{i} [*a{}]\n", i - 1));
        }
        inputs.push(chain);
        for text in inputs {
            let mut out = Outcome::default();
            let e = convert_file("x.yaml", &text, &Options::default(), &mut out).unwrap_err();
            assert!(e.to_string().starts_with("x.yaml:"), "{e}");
        }
    }
}
