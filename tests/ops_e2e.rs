//! Operating portcullis end to end (docs/DESIGN.md §1 `wait`, §4): metrics after a
//! known mix of flows, the health and admin endpoints, readiness, the
//! access-log writer under a blocked reader, reload (SIGHUP, file change,
//! Kubernetes ConfigMap symlink swap, invalid files, restart-required keys,
//! revoke_on_reload), the SIGTERM drain, connection and fd limits, `portcullis
//! wait`, and the `/denied?format=toml` round trip. Every test builds its own
//! world (tests/common) and runs the proxy as its unprivileged uid.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const LISTEN: &str = "127.0.0.1:15001";
const HEALTH: &str = "127.0.0.1:15021";
const ADMIN: &str = "127.0.0.1:15000";

const API: &str = api_entry!();

const BACKEND: &str = r#"
[[service_entry]]
name = "backend"
addresses = ["198.51.100.7/32"]
ports = [{ number = 7000, protocol = "TCP" }, { number = 9, protocol = "TCP" }]
"#;

/// A world with the proxy running in the pod.
struct Ops {
    world: World,
    proxy: Proc,
    cfg: PathBuf,
}

impl Ops {
    /// Writes `config.toml` and starts the proxy on it.
    fn start(text: &str) -> Ops {
        let world = World::start();
        let cfg = world.write_file("config.toml", text);
        Ops::start_with(world, cfg, &[])
    }

    /// Starts the proxy on `cfg`, the command prefixed by `wrap` (e.g. prlimit).
    fn start_with(world: World, cfg: PathBuf, wrap: &[&str]) -> Ops {
        world.init(&cfg);
        let proxy = spawn_proxy_wrapped(&world, &cfg, wrap);
        world.wait_tcp(&world.pod, LISTEN.parse().unwrap());
        world.wait_tcp(&world.pod, ADMIN.parse().unwrap());
        let ops = Ops { world, proxy, cfg };
        ops.wait_ready();
        ops
    }

    fn pod(&self) -> &str {
        &self.world.pod
    }

    #[track_caller]
    fn wait_ready(&self) {
        let ok = poll_until(Duration::from_secs(10), || {
            http_get(self.pod(), HEALTH, "/ready").is_ok_and(|(c, _)| c == 200)
        });
        assert!(ok, "never ready\n{}", self.proxy.logs(4000));
    }

    #[track_caller]
    fn metrics(&self) -> Exposition {
        let (code, body) = http_get(self.pod(), ADMIN, "/metrics").expect("GET /metrics");
        assert_eq!(code, 200, "{body}");
        parse_exposition(&body)
    }

    /// Polls the metrics until `f` holds; returns them. Panics after 10 s.
    #[track_caller]
    fn metrics_until(&self, what: &str, f: impl Fn(&Exposition) -> bool) -> Exposition {
        let mut last = None;
        let ok = poll_until(Duration::from_secs(10), || {
            let m = self.metrics();
            let ok = f(&m);
            last = Some(m);
            ok
        });
        let m = last.unwrap();
        assert!(
            ok,
            "{what}: never happened; metrics:\n{}\n{}",
            m.text,
            self.proxy.logs(4000)
        );
        m
    }

    /// Waits until the reload counter of `result` reaches `n`.
    #[track_caller]
    fn wait_reloads(&self, result: &str, n: u64) -> Exposition {
        self.metrics_until(&format!("{n} reloads with result {result}"), |m| {
            m.get("portcullis_config_reloads_total", &[("result", result)]) == Some(n as f64)
        })
    }

    /// Replaces the config file atomically (write + rename), as editors and
    /// config management do: a reader never sees half a file.
    fn rewrite(&self, text: &str) {
        let tmp = self.cfg.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        set_mode(&tmp, 0o644);
        std::fs::rename(&tmp, &self.cfg).unwrap();
    }

    /// The access log (the proxy's stdout) once it has at least `n` lines.
    #[track_caller]
    fn log(&mut self, n: usize) -> Vec<Value> {
        access_log(&mut self.proxy, n, Duration::from_secs(10))
    }

    /// The first access-log line for which `f` holds (waits up to 10 s).
    #[track_caller]
    fn log_find(&mut self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let mut found = None;
        poll_until(Duration::from_secs(10), || {
            found = self
                .proxy
                .stdout()
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|v| f(v));
            found.is_some()
        });
        found.unwrap_or_else(|| panic!("no access-log line {what}\n{}", self.proxy.logs(6000)))
    }

    fn admin_json(&self, path: &str) -> Value {
        let (code, body) = http_get(self.pod(), ADMIN, path).unwrap();
        assert_eq!(code, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    }
}

fn spawn_proxy_wrapped(world: &World, cfg: &Path, wrap: &[&str]) -> Proc {
    let cfg = cfg.to_str().unwrap();
    if wrap.is_empty() {
        return world.spawn_proxy(&["run", "-c", cfg]);
    }
    let mut args: Vec<&str> = wrap[1..].to_vec();
    args.extend([portcullis_bin(), "run", "-c", cfg]);
    world.spawn_pod(
        Cmd::new(wrap[0])
            .label("portcullis")
            .args(args)
            .user(PROXY_UID, PROXY_UID),
    )
}

/// A flow through the echo upstream: `n` pattern bytes there and back.
#[track_caller]
fn echo(s: &mut TcpStream, n: usize) {
    let data = pattern(0, n);
    s.write_all(&data).unwrap();
    let mut got = vec![0u8; n];
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.read_exact(&mut got).unwrap();
    assert!(got == data, "echo mismatch");
}

/// How `s` ends within `t`: None if still open, `Ok(())` for a FIN, else the error kind.
fn end_within(s: &mut TcpStream, t: Duration) -> Option<Result<(), io::ErrorKind>> {
    let deadline = Instant::now() + t;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return Some(Ok(())),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return None
            }
            Err(e) => return Some(Err(e.kind())),
        }
    }
}

/// Reads until EOF or reset (true), or false if the peer stays open for `t`.
fn closed_within(s: &mut TcpStream, t: Duration) -> bool {
    end_within(s, t).is_some()
}

/// A flow to `dst` that the proxy resets or closes (maybe already while the
/// client finishes connecting).
fn reset_or_closed(w: &World, dst: SocketAddr) -> bool {
    match w.pod_connect(dst) {
        Ok(mut s) => closed_within(&mut s, Duration::from_secs(10)),
        Err(e) => e.kind() == io::ErrorKind::ConnectionReset,
    }
}

/// User + system CPU seconds of a process, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit_once(')').unwrap().1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = 100.0; // USER_HZ, 100 on Linux
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / ticks
}

// ------------------------------------------------------------ exposition

type Labels = BTreeMap<String, String>;
type Series = Vec<(Labels, f64)>;

/// A parsed, validated OpenMetrics / Prometheus text exposition.
struct Exposition {
    text: String,
    /// family name -> type
    types: HashMap<String, String>,
    /// sample name -> [(labels, value)]
    samples: BTreeMap<String, Series>,
}

impl Exposition {
    /// The value of the sample `name` whose labels are exactly `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .get(name)?
            .iter()
            .find(|(l, _)| *l == want)
            .map(|(_, v)| *v)
    }

    #[track_caller]
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no {name}{labels:?} in\n{}", self.text))
    }

    fn series(&self, name: &str) -> &[(BTreeMap<String, String>, f64)] {
        self.samples.get(name).map(Vec::as_slice).unwrap_or(&[])
    }
}

fn valid_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
}

/// Parses `name{a="x",b="y"} value [timestamp]`; panics on anything malformed.
fn parse_sample(line: &str) -> (String, BTreeMap<String, String>, f64) {
    let fail = |why: &str| -> ! { panic!("{why} in {line:?}") };
    let b = line.as_bytes();
    let name_end = line
        .find(['{', ' '])
        .unwrap_or_else(|| fail("sample without value"));
    let name = &line[..name_end];
    if !valid_name(name) {
        fail("bad metric name");
    }
    let mut labels = BTreeMap::new();
    let mut i = name_end;
    if b[i] == b'{' {
        i += 1;
        loop {
            if b.get(i) == Some(&b'}') {
                i += 1;
                break;
            }
            let eq = line[i..]
                .find('=')
                .unwrap_or_else(|| fail("label without ="))
                + i;
            let lname = &line[i..eq];
            if !valid_name(lname) || lname.contains(':') {
                fail("bad label name");
            }
            if b.get(eq + 1) != Some(&b'"') {
                fail("unquoted label value");
            }
            i = eq + 2;
            let mut value = String::new();
            loop {
                match b.get(i) {
                    Some(b'\\') => {
                        value.push(match b.get(i + 1) {
                            Some(b'"') => '"',
                            Some(b'\\') => '\\',
                            Some(b'n') => '\n',
                            _ => fail("bad escape"),
                        });
                        i += 2;
                    }
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(_) => {
                        let ch = line[i..].chars().next().unwrap();
                        value.push(ch);
                        i += ch.len_utf8();
                    }
                    None => fail("unterminated label value"),
                }
            }
            if labels.insert(lname.to_string(), value).is_some() {
                fail("duplicate label");
            }
            match b.get(i) {
                Some(b',') => i += 1,
                Some(b'}') => {}
                _ => fail("bad label list"),
            }
        }
    }
    if b.get(i) != Some(&b' ') {
        fail("no space before the value");
    }
    let mut parts = line[i + 1..].split(' ');
    let v = parts.next().unwrap_or_else(|| fail("no value"));
    let value = match v {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        _ => v.parse().unwrap_or_else(|_| fail("bad value")),
    };
    if let Some(ts) = parts.next() {
        ts.parse::<f64>().unwrap_or_else(|_| fail("bad timestamp"));
    }
    if parts.next().is_some() {
        fail("trailing garbage");
    }
    (name.to_string(), labels, value)
}

/// Validates an OpenMetrics text exposition (what `/metrics` serves): HELP
/// and TYPE before a family's samples, samples named by their family and
/// type, families contiguous, no duplicate series, histograms cumulative
/// with +Inf = count, one `# EOF` at the end. Panics with the text if not.
#[track_caller]
fn parse_exposition(text: &str) -> Exposition {
    let fail = |why: String| -> ! { panic!("invalid exposition: {why}\n{text}") };
    if !text.ends_with("# EOF\n") || text.matches("# EOF").count() != 1 {
        fail("must end with exactly one `# EOF`".into());
    }
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples: BTreeMap<String, Series> = BTreeMap::new();
    let mut done_families: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    let mut seen = std::collections::HashSet::new();
    for line in text.lines() {
        if line == "# EOF" {
            break;
        }
        if let Some(meta) = line.strip_prefix("# ") {
            let mut it = meta.splitn(3, ' ');
            let kind = it.next().unwrap();
            let fam = it
                .next()
                .unwrap_or_else(|| fail(format!("bad line {line:?}")));
            if !valid_name(fam) {
                fail(format!("bad family name in {line:?}"));
            }
            if current.as_deref() != Some(fam) {
                if done_families.iter().any(|f| f == fam) {
                    fail(format!("family {fam} is not contiguous"));
                }
                if let Some(c) = current.take() {
                    done_families.push(c);
                }
                current = Some(fam.to_string());
            }
            match kind {
                "TYPE" => {
                    let t = it.next().unwrap_or_default();
                    let known = [
                        "counter",
                        "gauge",
                        "histogram",
                        "summary",
                        "unknown",
                        "info",
                        "stateset",
                        "gaugehistogram",
                    ];
                    if !known.contains(&t) {
                        fail(format!("unknown type in {line:?}"));
                    }
                    if types.insert(fam.to_string(), t.to_string()).is_some() {
                        fail(format!("second TYPE for {fam}"));
                    }
                }
                "HELP" | "UNIT" => {}
                _ => fail(format!("unknown comment {line:?}")),
            }
            continue;
        }
        if line.is_empty() || line.starts_with('#') {
            fail(format!("stray line {line:?}"));
        }
        let (name, labels, value) = parse_sample(line);
        let fam = current
            .clone()
            .unwrap_or_else(|| fail(format!("sample before any TYPE: {line:?}")));
        let ty = types
            .get(&fam)
            .unwrap_or_else(|| fail(format!("no TYPE for {fam}")));
        let suffix = name
            .strip_prefix(fam.as_str())
            .unwrap_or_else(|| fail(format!("{name} outside family {fam}")));
        let allowed: &[&str] = match ty.as_str() {
            "counter" => &["_total", "_created"],
            "gauge" => &[""],
            "histogram" => &["_bucket", "_sum", "_count", "_created"],
            _ => &[
                "", "_total", "_bucket", "_sum", "_count", "_created", "_info",
            ],
        };
        if !allowed.contains(&suffix) {
            fail(format!("{name} is not a sample name of {ty} {fam}"));
        }
        if ty == "counter" && suffix == "_total" && (value.is_nan() || value < 0.0) {
            fail(format!("negative counter {line:?}"));
        }
        if !seen.insert((name.clone(), labels.clone())) {
            fail(format!("duplicate series {line:?}"));
        }
        samples.entry(name).or_default().push((labels, value));
    }
    // histograms: cumulative buckets ending in +Inf = _count
    for (fam, ty) in &types {
        if ty != "histogram" {
            continue;
        }
        let buckets = samples
            .get(&format!("{fam}_bucket"))
            .cloned()
            .unwrap_or_default();
        let count = samples
            .get(&format!("{fam}_count"))
            .and_then(|v| v.first())
            .map(|(_, v)| *v)
            .unwrap_or_else(|| fail(format!("{fam} without _count")));
        let mut prev = 0.0;
        let mut last_le = f64::NEG_INFINITY;
        for (l, v) in &buckets {
            let le: f64 = match l.get("le").map(String::as_str) {
                Some("+Inf") => f64::INFINITY,
                Some(x) => x.parse().unwrap_or_else(|_| fail(format!("bad le {x}"))),
                None => fail(format!("{fam} bucket without le")),
            };
            if le <= last_le || *v < prev {
                fail(format!("{fam} buckets not cumulative"));
            }
            last_le = le;
            prev = *v;
        }
        if last_le != f64::INFINITY || prev != count {
            fail(format!("{fam}: +Inf bucket must equal _count"));
        }
    }
    Exposition {
        text: text.to_string(),
        types,
        samples,
    }
}

#[test]
fn exposition_validator_rejects_what_prometheus_would() {
    let ok = "# HELP a_total x\n# TYPE a counter\na_total{x=\"1\",y=\"q\\\"\"} 3\n# TYPE g gauge\ng 1.5\n# EOF\n";
    let m = parse_exposition(ok);
    assert_eq!(m.get("a_total", &[("x", "1"), ("y", "q\"")]), Some(3.0));
    assert_eq!(m.get("g", &[]), Some(1.5));
    for bad in [
        "# TYPE a counter\na_total 1\n",                   // no EOF
        "# TYPE a counter\na 1\n# EOF\n",                  // counter sample without _total
        "a_total 1\n# EOF\n",                              // no TYPE
        "# TYPE a counter\na_total{x=1} 1\n# EOF\n",       // unquoted
        "# TYPE a counter\na_total 1\na_total 2\n# EOF\n", // duplicate
        "# TYPE a gauge\na 1\n# TYPE b gauge\nb 1\n# TYPE a gauge\n# EOF\n", // not contiguous
        "# TYPE a gauge\na one\n# EOF\n",                  // bad value
    ] {
        let r = std::panic::catch_unwind(|| parse_exposition(bad));
        assert!(r.is_err(), "accepted {bad:?}");
    }
}

// ------------------------------------------------------------ metrics

/// A raw HTTP/1.1 request with Host `host` to `dst` (redirected); the reply.
fn raw_http(ops: &Ops, dst: SocketAddr, host: &str) -> String {
    let mut s = ops.world.pod_connect(dst).unwrap();
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let (got, _) = read_to_end_timeout(&mut s, Duration::from_secs(10));
    String::from_utf8_lossy(&got).into_owned()
}

/// curl `url` from the pod over IPv4; the body must contain `want`.
#[track_caller]
fn served(w: &World, url: &str, want: &str) {
    assert!(w.curl(&["-4", url]).ok().contains(want), "{url}");
}

/// A connection from the pod to the backend's echo port that has echoed `n` bytes.
fn echoed(w: &World, n: usize) -> TcpStream {
    let mut s = w.pod_connect(sa(addr::OTHER_V4, port::ECHO)).unwrap();
    echo(&mut s, n);
    s
}

#[test]
fn metrics_after_a_known_mix_of_flows() {
    let strict = proxy_config("", "", &format!("{API}{BACKEND}"));
    let mut ops = Ops::start(&strict);
    let w = &ops.world;

    // REGISTRY_ONLY: allowed TLS, HTTP, TCP (by address), a refused upstream,
    // denied TLS and HTTP, a loop.
    served(w, "https://api.example.com/", "tls ok");
    served(w, "http://api.example.com/", "http ok");
    let mut s = echoed(w, 1000);
    s.shutdown(Shutdown::Write).unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(10)));
    drop(s);
    assert!(
        reset_or_closed(w, sa(addr::OTHER_V4, port::CLOSED)),
        "refused upstream: RST"
    );
    let out = w.s_client("192.0.2.10:443", &["-servername", "evil.example.net"], b"");
    assert!(out.stderr.contains("alert access denied"), "{out:?}");
    let out = w.curl(&["-4", "-i", "http://other.example.net/"]);
    assert!(out.ok().starts_with("HTTP/1.1 403"), "{out:?}");
    // a loop: reset at once (maybe already while connecting)
    if let Ok(mut s) = w.pod_connect(LISTEN.parse().unwrap()) {
        assert!(closed_within(&mut s, Duration::from_secs(10)), "loop: RST");
    }
    // Cardinality: 20 different names clients made up are one series.
    let mut head_bytes = 0;
    for i in 0..20 {
        let host = format!("n{i}.made-up.example.net");
        head_bytes += format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").len();
        let reply = raw_http(&ops, sa(addr::API_V4, port::HTTP), &host);
        assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
    }

    // audit: would-be denials pass, labelled Passthrough
    ops.rewrite(&proxy_config(
        "audit = true",
        "",
        &format!("{API}{BACKEND}"),
    ));
    ops.wait_reloads("success", 1);
    let w = &ops.world;
    let out = w.curl(&[
        "-4",
        "--connect-to",
        "evil.example.org:443:192.0.2.10:443",
        "https://evil.example.org/",
    ]);
    assert!(out.ok().contains("tls ok sni=evil.example.org"), "{out:?}");
    let mut s = w.pod_connect(sa(addr::API_V4, port::ECHO)).unwrap();
    echo(&mut s, 500);
    drop(s);

    // ALLOW_ANY: everything passes, registry matches still labelled
    ops.rewrite(&proxy_config(
        "outbound_traffic_policy = \"ALLOW_ANY\"",
        "",
        &format!("{API}{BACKEND}"),
    ));
    ops.wait_reloads("success", 2);
    let w = &ops.world;
    served(w, "http://other.example.net/", "http ok");
    served(w, "https://api.example.com/", "tls ok");

    let m = ops.metrics_until("all flows ended", |m| {
        m.get("portcullis_active_connections", &[]) == Some(0.0)
            && m.series("portcullis_connections_total")
                .iter()
                .map(|(_, v)| v)
                .sum::<f64>()
                == 31.0
    });
    let conn = |d: &str, p: &str, e: &str, r: &str| {
        m.get(
            "portcullis_connections_total",
            &[
                ("decision", d),
                ("protocol", p),
                ("entry", e),
                ("reason", r),
            ],
        )
    };
    let want = [
        (("allow", "tls", "api", ""), 2.0),
        (("allow", "http", "api", ""), 1.0),
        (("allow", "tcp", "backend", ""), 2.0),
        (("deny", "tls", "BlackHole", "not_in_registry"), 1.0),
        (("deny", "http", "BlackHole", "not_in_registry"), 21.0),
        (("deny", "tcp", "BlackHole", "loop"), 1.0),
        (("audit", "tls", "Passthrough", "not_in_registry"), 1.0),
        (("audit", "tcp", "Passthrough", "not_in_registry"), 1.0),
        (
            ("passthrough", "http", "Passthrough", "not_in_registry"),
            1.0,
        ),
    ];
    for ((d, p, e, r), n) in want {
        assert_eq!(conn(d, p, e, r), Some(n), "{d} {p} {e} {r}\n{}", m.text);
    }
    assert_eq!(
        m.series("portcullis_connections_total").len(),
        want.len(),
        "no other series: {}",
        m.text
    );
    assert!(
        !m.text.contains("made-up"),
        "client-chosen names never become labels"
    );
    assert_eq!(
        m.value(
            "portcullis_upstream_connect_errors_total",
            &[("entry", "backend")]
        ),
        1.0
    );
    assert_eq!(
        m.series("portcullis_upstream_connect_errors_total").len(),
        1
    );

    // Bytes: exact for the echo flows, and equal to the access log's sums
    // for every entry (counted as they move; the log line is written at the end).
    let log = ops.log(31);
    let mut sums: HashMap<(String, &str), f64> = HashMap::new();
    for l in &log {
        let label = match (l["entry"].as_str(), l["decision"].as_str()) {
            (Some(e), _) => e.to_string(),
            (None, Some("deny")) => "BlackHole".to_string(),
            (None, _) => "Passthrough".to_string(),
        };
        *sums.entry((label.clone(), "upstream")).or_default() += l["bytes_up"].as_f64().unwrap();
        *sums.entry((label, "downstream")).or_default() += l["bytes_down"].as_f64().unwrap();
    }
    let bytes = |dir: &str, e: &str| {
        m.value(
            "portcullis_bytes_total",
            &[("direction", dir), ("entry", e)],
        )
    };
    assert_eq!(bytes("upstream", "backend"), 1000.0);
    assert_eq!(bytes("downstream", "backend"), 1000.0);
    for (labels, v) in m.series("portcullis_bytes_total") {
        let key = (labels["entry"].clone(), labels["direction"].as_str());
        assert_eq!(Some(v), sums.get(&key), "{labels:?}: metric vs access log");
    }
    assert!(bytes("upstream", "Passthrough") >= 500.0 && bytes("upstream", "api") > 0.0);
    assert!(m
        .get(
            "portcullis_bytes_total",
            &[("direction", "upstream"), ("entry", "BlackHole")]
        )
        .is_none());

    // Detection: every flow not decided by address nor a loop was examined.
    assert_eq!(m.types["portcullis_detect_seconds"], "histogram");
    assert_eq!(m.value("portcullis_detect_seconds_count", &[]), 28.0);
    let examined = m.value("portcullis_detect_bytes_examined_total", &[]);
    assert!(examined >= head_bytes as f64, "{examined} < {head_bytes}");

    // Reloads and the rules gauge (ALLOW_ANY: init's REGISTRY_ONLY filter is stale).
    assert_eq!(
        m.value("portcullis_config_reloads_total", &[("result", "success")]),
        2.0
    );
    assert_eq!(
        m.value("portcullis_config_reloads_total", &[("result", "failure")]),
        0.0
    );
    assert_eq!(
        m.value("portcullis_config_last_reload_successful", &[]),
        1.0
    );
    assert_eq!(m.value("portcullis_rules_match_config", &[]), 0.0);
    assert_eq!(m.value("portcullis_access_log_dropped_total", &[]), 0.0);
    assert_eq!(m.value("portcullis_active_connections", &[]), 0.0);

    // Process metrics, as the Prometheus client libraries name them.
    for (name, ty) in [
        ("process_open_fds", "gauge"),
        ("process_max_fds", "gauge"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_cpu_seconds", "counter"),
    ] {
        assert_eq!(m.types.get(name).map(String::as_str), Some(ty), "{name}");
    }
    let fds = m.value("process_open_fds", &[]);
    assert!(fds > 5.0 && fds < 1000.0, "{fds}");
    assert_eq!(
        m.value("process_max_fds", &[]),
        20000.0,
        "the soft limit raised to the hard one"
    );
    assert!(m.value("process_resident_memory_bytes", &[]) > 1e6);
    assert!(m.value("process_cpu_seconds_total", &[]) >= 0.0);
    for fam in [
        "portcullis_connections",
        "portcullis_active_connections",
        "portcullis_bytes",
        "portcullis_upstream_connect_errors",
        "portcullis_config_reloads",
        "portcullis_config_last_reload_successful",
        "portcullis_access_log_dropped",
        "portcullis_detect_seconds",
        "portcullis_detect_bytes_examined",
        "portcullis_rules_match_config",
    ] {
        assert!(m.types.contains_key(fam), "{fam} missing");
    }

    // The health listener serves the same metrics, and nothing but /ready and /metrics.
    let (code, body) = http_get(ops.pod(), HEALTH, "/metrics").unwrap();
    assert_eq!(code, 200);
    let h = parse_exposition(&body);
    assert_eq!(h.series("portcullis_connections_total").len(), want.len());
}

// ------------------------------------------------------------ endpoints, readiness, wait

/// Drops (or with `on = false`, stops dropping) DNS queries reaching the
/// world's resolver: lookups hang until hickory's timeout instead of failing.
fn drop_dns(w: &World, on: bool) {
    let op = if on { "-I" } else { "-D" };
    for tool in ["iptables", "ip6tables"] {
        for proto in ["udp", "tcp"] {
            let out = w.run_in(
                &w.inet,
                Cmd::new(tool).args([
                    "-w", op, "INPUT", "-p", proto, "--dport", "53", "-j", "DROP",
                ]),
            );
            assert!(out.success(), "{out:?}");
        }
    }
}

#[test]
fn ready_waits_for_dns_tcp_resolution_and_endpoints_are_split() {
    let world = World::start();
    world.redirect(15001, Some(PROXY_UID));
    // `portcullis wait` started before the proxy, as an app container would.
    let url = format!("http://{HEALTH}/ready");
    let mut waiter = world.spawn_pod(
        Cmd::new(portcullis_bin())
            .label("wait")
            .args(["wait", "--url", &url, "--timeout", "60s"])
            .user(APP_UID, APP_UID),
    );
    drop_dns(&world, true);
    let db = r#"
[[service_entry]]
name = "db"
hosts = ["api.example.com"]
ports = [{ number = 7000, protocol = "TCP" }]
resolution = "DNS"
"#;
    let cfg = world.write_file("config.toml", &proxy_config("", "drain_min = \"1s\"", db));
    let mut proxy = world.spawn_proxy(&["run", "-c", cfg.to_str().unwrap()]);
    world.wait_tcp(&world.pod, HEALTH.parse().unwrap());
    world.wait_tcp(&world.pod, ADMIN.parse().unwrap());
    let pod = world.pod.clone();

    // Listening, but the DNS TCP entry's hosts have had no answer yet.
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(700) {
        let (code, body) = http_get(&pod, HEALTH, "/ready").unwrap();
        assert_eq!(
            (code, body.as_str()),
            (503, "starting\n"),
            "{}",
            proxy.logs(3000)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        waiter.is_running(),
        "wait returned before ready: {waiter:?}"
    );
    // /metrics answers meanwhile (Prometheus sees a starting proxy).
    assert_eq!(http_get(&pod, HEALTH, "/metrics").unwrap().0, 200);

    // health: /ready and /metrics only; admin: everything.
    for path in ["/config", "/denied", "/denied?format=toml", "/"] {
        assert_eq!(
            http_get(&pod, HEALTH, path).unwrap().0,
            404,
            "health {path}"
        );
    }
    for path in [
        "/ready",
        "/metrics",
        "/config",
        "/denied",
        "/denied?format=toml",
    ] {
        let code = http_get(&pod, ADMIN, path).unwrap().0;
        let want = if path == "/ready" { 503 } else { 200 };
        assert_eq!(code, want, "admin {path}");
    }
    let (_, body) = http_get(&pod, ADMIN, "/config").unwrap();
    let c: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(c["config"]["entries"][0]["name"], "db", "{c}");
    assert_eq!(c["config"]["proxy"]["drain_min"], "1s", "{c}");
    assert_eq!(c["rerun_init"], false);

    // The resolver answers again: one attempt made, ready; wait exits 0.
    drop_dns(&world, false);
    let ready = poll_until(Duration::from_secs(20), || {
        http_get(&pod, HEALTH, "/ready").is_ok_and(|(c, _)| c == 200)
    });
    assert!(ready, "{}", proxy.logs(4000));
    let st = waiter.wait_timeout(Duration::from_secs(10));
    assert_eq!(st.and_then(|s| s.code()), Some(0), "{waiter:?}");
    // and the entry admits what api.example.com resolves to
    let mut s = world.pod_connect(sa(addr::API_V4, port::ECHO)).unwrap();
    echo(&mut s, 100);
    drop(s);

    // wait: exit 1 after its timeout when nothing is ready; 2 for bad usage.
    let t = Instant::now();
    let out = world.run_pod(Cmd::new(portcullis_bin()).args([
        "wait",
        "--url",
        "http://127.0.0.1:15999/ready",
        "--timeout",
        "1s",
    ]));
    assert_eq!(out.status, Some(1), "{out:?}");
    assert!(t.elapsed() >= Duration::from_secs(1));
    assert!(out.stderr.contains("not ready after 1s"), "{out:?}");
    let out = world.run_pod(Cmd::new(portcullis_bin()).args(["wait", "--timeout", "soon"]));
    assert_eq!(out.status, Some(2), "{out:?}");

    // Draining: /ready 503, so wait times out (exit 1) while flows still pass.
    proxy.signal(libc::SIGTERM);
    let draining = poll_until(Duration::from_secs(5), || {
        http_get(&pod, HEALTH, "/ready").is_ok_and(|(c, b)| c == 503 && b == "draining\n")
    });
    assert!(draining, "{}", proxy.logs(3000));
    let st = proxy.wait_timeout(Duration::from_secs(10));
    assert_eq!(st.and_then(|s| s.code()), Some(0), "{}", proxy.logs(3000));
}

// ------------------------------------------------------------ access log

/// `portcullis_connections_total` of TCP flows denied for `reason` (entry BlackHole).
fn tcp_denied(m: &Exposition, reason: &str) -> Option<f64> {
    m.get(
        "portcullis_connections_total",
        &[
            ("decision", "deny"),
            ("protocol", "tcp"),
            ("entry", "BlackHole"),
            ("reason", reason),
        ],
    )
}

/// `n` loop flows (straight to the listener: denied and logged at once),
/// from `threads` threads in the pod.
fn flood_loops(pod: &str, n: usize, threads: usize) {
    std::thread::scope(|sc| {
        for _ in 0..threads {
            sc.spawn(|| {
                in_ns(pod, || {
                    for _ in 0..n / threads {
                        let _ = TcpStream::connect(LISTEN);
                    }
                })
            });
        }
    });
}

/// Makes a FIFO the proxy's uid may open.
fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) with a valid NUL-terminated path.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o666) };
    assert_eq!(rc, 0, "mkfifo: {}", io::Error::last_os_error());
    set_mode(path, 0o666);
}

fn set_nonblocking(f: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl(2) on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
}

/// A non-blocking read: 0 when nothing is there yet.
fn read_some(f: &mut std::fs::File, buf: &mut [u8]) -> usize {
    match f.read(buf) {
        Ok(k) => k,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn a_fifo_nobody_reads_neither_stalls_start_nor_flows() {
    let world = World::start();
    let fifo = world.path("access.fifo");
    mkfifo(&fifo);
    let text = proxy_config(
        "",
        &format!("access_log = \"{}\"", fifo.display()),
        &format!("{API}{BACKEND}"),
    );
    let cfg = world.write_file("config.toml", &text);
    // Opening a FIFO for writing blocks until a reader comes: the proxy must
    // start all the same.
    let ops = Ops::start_with(world, cfg, &[]);
    let t = Instant::now();
    let n = 10_000;
    flood_loops(ops.pod(), n, 4);
    eprintln!("{n} flows in {:?}", t.elapsed());
    let m = ops.metrics_until("every flood flow counted", |m| {
        tcp_denied(m, "loop") == Some(n as f64)
    });
    // The queue (8192 lines) is full: the rest were dropped and counted.
    let dropped = m.value("portcullis_access_log_dropped_total", &[]);
    assert!(
        dropped >= (n - 8192 - 500) as f64 && dropped <= (n - 8192) as f64,
        "{dropped}"
    );
    // Flows are served all the same.
    let w = &ops.world;
    served(w, "https://api.example.com/", "tls ok");
    drop(echoed(w, 10_000));
    let m = ops.metrics_until("more drops", |m| {
        m.value("portcullis_access_log_dropped_total", &[]) >= dropped + 2.0
    });
    assert_eq!(m.value("portcullis_active_connections", &[]), 0.0);

    // A reader comes: what the queue held comes out, one JSON object a line.
    let mut r = std::fs::File::open(&fifo).unwrap();
    set_nonblocking(&r);
    let mut text = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let got_all = poll_until(Duration::from_secs(10), || {
        let k = read_some(&mut r, &mut buf);
        text.extend_from_slice(&buf[..k]);
        text.iter().filter(|&&b| b == b'\n').count() >= 8192
    });
    assert!(
        got_all,
        "{} lines",
        text.iter().filter(|&&b| b == b'\n').count()
    );
    // complete lines only: a read may end mid-line
    let end = text.iter().rposition(|&b| b == b'\n').unwrap() + 1;
    let complete = String::from_utf8(text[..end].to_vec()).unwrap();
    for line in complete.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(v["reason"], "loop", "{v}");
    }
    // Once the reader keeps up, lines flow again.
    let mut s = ops
        .world
        .pod_connect(sa(addr::OTHER_V4, port::ECHO))
        .unwrap();
    echo(&mut s, 10);
    drop(s);
    let mut rest = String::new();
    let found = poll_until(Duration::from_secs(10), || {
        let k = read_some(&mut r, &mut buf);
        rest.push_str(&String::from_utf8_lossy(&buf[..k]));
        rest.contains("\"entry\":\"backend\"")
    });
    assert!(found, "{rest}");
}

#[test]
fn a_stdout_pipe_nobody_reads_does_not_stall_flows() {
    // The proxy's stdout is a pipe into `sleep`, which never reads it: once
    // the pipe buffer is full, every write blocks.
    let world = World::start();
    world.redirect(15001, Some(PROXY_UID));
    let cfg = world.write_file(
        "config.toml",
        &proxy_config("", "", &format!("{API}{BACKEND}")),
    );
    let script = format!(
        "setpriv --reuid={PROXY_UID} --regid={PROXY_UID} --clear-groups -- {} run -c {} | sleep 600",
        portcullis_bin(),
        cfg.display()
    );
    let proxy = world.spawn_pod(Cmd::new("sh").label("portcullis").args(["-c", &script]));
    world.wait_tcp(&world.pod, ADMIN.parse().unwrap());
    let ops = Ops { world, proxy, cfg };
    ops.wait_ready();
    let n = 10_000;
    flood_loops(ops.pod(), n, 4);
    let m = ops.metrics_until("every flood flow counted", |m| {
        tcp_denied(m, "loop") == Some(n as f64)
    });
    // at most the pipe (64 KiB of lines) and the queue (8192) took lines
    let dropped = m.value("portcullis_access_log_dropped_total", &[]);
    assert!(dropped >= (n - 8192 - 1000) as f64, "{dropped}");
    let w = &ops.world;
    served(w, "https://api.example.com/", "tls ok");
    served(w, "http://api.example.com/", "http ok");
    drop(echoed(w, 100_000));
    let m = ops.metrics_until("the new flows counted and dropped", |m| {
        m.value("portcullis_access_log_dropped_total", &[]) >= dropped + 3.0
            && m.get("portcullis_active_connections", &[]) == Some(0.0)
    });
    assert_eq!(
        m.value(
            "portcullis_bytes_total",
            &[("direction", "upstream"), ("entry", "backend")]
        ),
        100_000.0
    );
}

// ------------------------------------------------------------ reload

/// A Kubernetes ConfigMap volume: `dir/config.toml -> ..data/config.toml`,
/// `..data -> ..<timestamp>`; an update writes a new timestamped directory,
/// renames a new `..data` symlink over the old one, and removes the old
/// directory (what kubelet's AtomicWriter does).
struct ConfigMap {
    dir: PathBuf,
    current: Option<String>,
    n: usize,
}

impl ConfigMap {
    fn new(dir: PathBuf, text: &str) -> ConfigMap {
        std::fs::create_dir_all(&dir).unwrap();
        set_mode(&dir, 0o755);
        let mut cm = ConfigMap {
            dir,
            current: None,
            n: 0,
        };
        cm.update(text);
        std::os::unix::fs::symlink("..data/config.toml", cm.dir.join("config.toml")).unwrap();
        cm
    }

    fn path(&self) -> PathBuf {
        self.dir.join("config.toml")
    }

    fn update(&mut self, text: &str) {
        self.n += 1;
        let ts = format!("..2026_11_30_02_00_{:02}.{:09}", self.n, self.n);
        let d = self.dir.join(&ts);
        std::fs::create_dir(&d).unwrap();
        set_mode(&d, 0o755);
        std::fs::write(d.join("config.toml"), text).unwrap();
        set_mode(&d.join("config.toml"), 0o644);
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&ts, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        if let Some(old) = self.current.replace(ts) {
            std::fs::remove_dir_all(self.dir.join(old)).unwrap();
        }
    }
}

const ORG: &str = r#"
[[service_entry]]
name = "org"
hosts = ["www.example.org"]
ports = [{ number = 443, protocol = "TLS" }]
"#;

#[test]
fn reload_on_configmap_swap_bad_file_restart_keys_and_sighup() {
    let world = World::start();
    let mut cm = ConfigMap::new(
        world.path("cm"),
        &proxy_config("", "", &format!("{API}{BACKEND}")),
    );
    let cfg = cm.path();
    let mut ops = Ops::start_with(world, cfg, &[]);

    // A long flow that must live through every reload.
    let mut long = ops
        .world
        .pod_connect(sa(addr::OTHER_V4, port::ECHO))
        .unwrap();
    echo(&mut long, 1000);
    let org_ok = |ops: &Ops| {
        ops.world
            .curl(&["-4", "https://www.example.org/"])
            .stdout
            .contains("tls ok sni=www.example.org")
    };
    assert!(!org_ok(&ops));

    // 1. The ConfigMap changes: new flows see the new registry at once.
    cm.update(&proxy_config("", "", &format!("{BACKEND}{ORG}")));
    let t = Instant::now();
    assert!(
        poll_until(Duration::from_secs(10), || org_ok(&ops)),
        "{}",
        ops.proxy.logs(4000)
    );
    eprintln!("new registry in force after {:?}", t.elapsed());
    let out = ops.world.curl(&["-4", "https://api.example.com/"]);
    assert!(!out.success(), "api was removed: {out:?}");
    let m = ops.wait_reloads("success", 1);
    assert_eq!(
        m.value("portcullis_config_last_reload_successful", &[]),
        1.0
    );
    assert_eq!(m.value("portcullis_rules_match_config", &[]), 1.0);
    echo(&mut long, 1000);

    // 2. An invalid file: logged with its error, counted; the old config serves.
    cm.update(&proxy_config(
        "",
        "",
        &format!("{BACKEND}{ORG}\n[[service_entry]]\nhosts = [\"x.example.com\"]\nports = [{{ number = 443, protocol = \"HTTP2\" }}]\n"),
    ));
    let m = ops.wait_reloads("failure", 1);
    assert_eq!(
        m.value("portcullis_config_last_reload_successful", &[]),
        0.0
    );
    assert_eq!(
        m.value("portcullis_config_reloads_total", &[("result", "success")]),
        1.0
    );
    let err = ops.proxy.stderr();
    let line = err
        .lines()
        .find(|l| l.contains("reload failed"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        line.contains("config.toml") && line.contains("protocol") && line.contains("HTTP2"),
        "{line}"
    );
    let c = ops.admin_json("/config");
    assert_eq!(c["reload"]["last_result"], "failure", "{c}");
    assert!(
        c["reload"]["last_error"]
            .as_str()
            .unwrap()
            .contains("HTTP2"),
        "{c}"
    );
    assert_eq!(
        c["config"]["entries"][1]["name"], "org",
        "the running config stays: {c}"
    );
    assert!(org_ok(&ops), "still served by the old config");
    echo(&mut long, 1000);

    // 3. Valid again, with audit on and a listener changed: "re-run init"
    //    and "restart required", in the log, /config and the gauge.
    let mut v4 = proxy_config(
        "audit = true",
        r#"listen = ["127.0.0.1:15001", "[::1]:15001", "127.0.0.1:15002"]"#,
        BACKEND,
    );
    v4.push('\n');
    cm.update(&v4);
    let m = ops.wait_reloads("success", 2);
    assert_eq!(
        m.value("portcullis_config_last_reload_successful", &[]),
        1.0
    );
    assert_eq!(m.value("portcullis_rules_match_config", &[]), 0.0);
    let c = ops.admin_json("/config");
    assert_eq!(
        c["restart_required"],
        serde_json::json!(["proxy.listen"]),
        "{c}"
    );
    assert_eq!(c["rerun_init"], true, "{c}");
    assert_eq!(c["reload"]["rerun_init"], true, "{c}");
    assert_eq!(
        c["config"]["proxy"]["listen"],
        serde_json::json!(["127.0.0.1:15001", "[::1]:15001"]),
        "the running listeners are what is in force: {c}"
    );
    assert_eq!(c["config"]["audit"], true, "{c}");
    let err = ops.proxy.stderr();
    assert!(
        err.contains("restart required") && err.contains("proxy.listen"),
        "{err}"
    );
    assert!(err.contains("re-run init"), "{err}");
    // audit applies to TCP flows at once: api passes, logged as audit
    served(&ops.world, "https://api.example.com/", "tls ok");
    echo(&mut long, 1000);

    // 4. SIGHUP reloads (the file is unchanged: only the signal can do it).
    assert!(ops.proxy.signal(libc::SIGHUP));
    ops.wait_reloads("success", 3);
    assert!(ops.proxy.stderr().contains("trigger=\"SIGHUP\""));

    // The long flow streamed through it all and ends cleanly.
    echo(&mut long, 1000);
    long.shutdown(Shutdown::Write).unwrap();
    assert!(closed_within(&mut long, Duration::from_secs(10)));
    drop(long);
    let l = ops.log_find("of the long flow", |l| l["entry"] == "backend");
    assert!(l["error"].is_null(), "{l}");
    assert_eq!(
        (l["bytes_up"].as_u64(), l["bytes_down"].as_u64()),
        (Some(5000), Some(5000)),
        "{l}"
    );
}

const KEEP: &str = r#"
[[service_entry]]
name = "keep"
addresses = ["192.0.2.10/32"]
ports = [{ number = 7000, protocol = "TCP" }]
"#;

impl Ops {
    /// Rewrites the config and sends SIGHUP; waits until the reload is done.
    #[track_caller]
    fn reload_with(&mut self, text: &str) {
        let before = self
            .metrics()
            .value("portcullis_config_reloads_total", &[("result", "success")]);
        self.rewrite(text);
        assert!(self.proxy.signal(libc::SIGHUP));
        self.metrics_until("the reload", |m| {
            m.value("portcullis_config_reloads_total", &[("result", "success")]) > before
        });
    }
}

#[test]
fn revoke_on_reload_closes_flows_of_removed_entries_after_drain_timeout() {
    let proxy = "revoke_on_reload = true\ndrain_timeout = \"1s\"";
    let mut ops = Ops::start(&proxy_config("", proxy, &format!("{BACKEND}{KEEP}")));
    let w = &ops.world;
    let mut a = w.pod_connect(sa(addr::OTHER_V4, port::ECHO)).unwrap(); // backend
    let mut b = w.pod_connect(sa(addr::API_V4, port::ECHO)).unwrap(); // keep
    echo(&mut a, 100);
    echo(&mut b, 100);

    // backend removed: its flows get drain_timeout (1 s), then are closed.
    ops.reload_with(&proxy_config("", proxy, KEEP));
    echo(&mut a, 100); // still served right after the reload
    assert!(
        reset_or_closed(&ops.world, sa(addr::OTHER_V4, port::ECHO)),
        "new flows to backend are denied"
    );
    // Reset, not closed with FIN: a FIN would tell the client the stream ended.
    assert_eq!(
        end_within(&mut a, Duration::from_secs(10)),
        Some(Err(io::ErrorKind::ConnectionReset)),
        "revoked flow still open, or closed with FIN"
    );
    let l = ops.log_find("of the revoked flow", |l| {
        l["entry"] == "backend" && l["decision"] == "allow"
    });
    assert_eq!(l["error"], "revoked: a reload removed the entry", "{l}");
    assert_eq!(l["bytes_up"], 200, "{l}");
    echo(&mut b, 100);

    // keep removed, then back before its deadline: its flow stays.
    ops.reload_with(&proxy_config("", proxy, ""));
    ops.reload_with(&proxy_config("", proxy, KEEP));
    assert!(
        !closed_within(&mut b, Duration::from_millis(1500)),
        "re-added entry's flow was closed"
    );
    echo(&mut b, 100);
    // without revoke_on_reload, removing an entry leaves its flows alone
    ops.reload_with(&proxy_config("", "drain_timeout = \"1s\"", ""));
    assert!(!closed_within(&mut b, Duration::from_millis(1500)));
    echo(&mut b, 100);
}

// ------------------------------------------------------------ shutdown

/// Issue 16 point 4: the signal loop never waits on the reload queue. Reloads are stuck (the
/// config path is a FIFO nobody writes: reading it blocks), SIGHUPs keep coming until the queue
/// is full, and SIGTERM must still start the drain at once.
#[test]
fn sigterm_is_seen_while_reloads_are_stuck_and_their_queue_is_full() {
    use std::os::unix::ffi::OsStrExt;
    let text = proxy_config("", "", "");
    let mut ops = Ops::start(&text);
    let fifo = ops.cfg.with_extension("fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    set_mode(&fifo, 0o644);
    let link = ops.cfg.with_extension("link");
    std::fs::hard_link(&fifo, &link).unwrap();
    std::fs::rename(&link, &ops.cfg).unwrap();
    // The file watcher sees the change within a second or so and blocks reading the FIFO.
    std::thread::sleep(Duration::from_millis(1600));
    for _ in 0..20 {
        assert!(ops.proxy.signal(libc::SIGHUP));
        std::thread::sleep(Duration::from_millis(40));
    }
    assert!(ops.proxy.signal(libc::SIGTERM));
    let seen = ops.proxy.wait_output("draining", Duration::from_secs(3));
    // Unblock the stuck reload (a regular file first, so the queued reloads do not block
    // again), then let the proxy finish.
    let tmp = ops.cfg.with_extension("tmp");
    std::fs::write(&tmp, &text).unwrap();
    set_mode(&tmp, 0o644);
    std::fs::rename(&tmp, &ops.cfg).unwrap();
    std::fs::write(&fifo, &text).unwrap();
    let status = ops.proxy.wait_timeout(Duration::from_secs(10));
    assert!(seen, "SIGTERM not seen\n{}", ops.proxy.logs(3000));
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        ops.proxy.logs(3000)
    );
}

#[test]
fn sigterm_drains_serving_old_and_new_flows_then_exits_zero() {
    let proxy = "drain_min = \"1s\"\ndrain_timeout = \"20s\"";
    let mut ops = Ops::start(&proxy_config("", proxy, &format!("{API}{BACKEND}")));
    let mut long = ops
        .world
        .pod_connect(sa(addr::OTHER_V4, port::ECHO))
        .unwrap();
    echo(&mut long, 1000);

    let t0 = Instant::now();
    assert!(ops.proxy.signal(libc::SIGTERM));
    let pod = ops.pod().to_string();
    let draining = poll_until(Duration::from_secs(5), || {
        http_get(&pod, HEALTH, "/ready").is_ok_and(|(c, b)| c == 503 && b == "draining\n")
    });
    assert!(draining, "{}", ops.proxy.logs(3000));
    // New flows are still accepted and served while the app shuts down too.
    let w = &ops.world;
    served(w, "https://api.example.com/", "tls ok");
    drop(echoed(w, 1000));
    // Past drain_min, a flow remains: the proxy keeps serving (and accepting).
    let past_min = t0 + Duration::from_millis(1500);
    std::thread::sleep(past_min.saturating_duration_since(Instant::now()));
    assert!(ops.proxy.is_running(), "exited with a flow in flight");
    served(&ops.world, "http://api.example.com/", "http ok");
    echo(&mut long, 1000);
    assert_eq!(http_get(&pod, ADMIN, "/metrics").unwrap().0, 200);
    // The last flow ends: the proxy exits 0, its access log complete.
    long.shutdown(Shutdown::Write).unwrap();
    assert!(closed_within(&mut long, Duration::from_secs(10)));
    drop(long);
    let st = ops.proxy.wait_timeout(Duration::from_secs(10));
    assert_eq!(
        st.and_then(|s| s.code()),
        Some(0),
        "{}",
        ops.proxy.logs(3000)
    );
    let log = ops.log(4);
    assert_eq!(log.len(), 4, "{log:?}");
    let l = log
        .iter()
        .find(|l| l["bytes_up"] == 2000)
        .unwrap_or_else(|| panic!("no line of the long flow: {log:?}"));
    assert!(l["error"].is_null() && l["entry"] == "backend", "{l}");
    assert!(ops.proxy.stderr().contains("drained: exiting"));
    // The proxy is gone: redirected TCP is refused, the pod fails closed (SECURITY.md).
    let e = ops
        .world
        .pod_connect(sa(addr::OTHER_V4, port::ECHO))
        .expect_err("a flow got through without the proxy");
    assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
}

#[test]
fn drain_timeout_closes_the_remaining_flows_and_exits_zero() {
    let proxy = "drain_min = \"500ms\"\ndrain_timeout = \"2s\"";
    let mut ops = Ops::start(&proxy_config("", proxy, BACKEND));
    let mut long = ops
        .world
        .pod_connect(sa(addr::OTHER_V4, port::ECHO))
        .unwrap();
    echo(&mut long, 100);
    let t0 = Instant::now();
    assert!(ops.proxy.signal(libc::SIGTERM));
    std::thread::sleep(Duration::from_millis(1000));
    echo(&mut long, 100); // past drain_min, before drain_timeout: still served
    assert!(
        closed_within(&mut long, Duration::from_secs(10)),
        "not closed at drain_timeout"
    );
    let st = ops.proxy.wait_timeout(Duration::from_secs(10));
    assert_eq!(
        st.and_then(|s| s.code()),
        Some(0),
        "{}",
        ops.proxy.logs(3000)
    );
    assert!(
        t0.elapsed() >= Duration::from_secs(2),
        "left before drain_timeout"
    );
    let l = ops.log_find("of the long flow", |l| l["entry"] == "backend");
    assert_eq!(
        l["error"], "closed: drain_timeout passed at shutdown",
        "{l}"
    );
    assert_eq!(l["bytes_up"], 200, "{l}");
}

// ------------------------------------------------------------ limits

#[test]
fn past_max_connections_flows_are_reset_and_counted_as_overload() {
    let mut ops = Ops::start(&proxy_config("", "max_connections = 5", BACKEND));
    let w = &ops.world;
    let mut open: Vec<TcpStream> = (0..5).map(|_| echoed(w, 100)).collect();
    for _ in 0..5 {
        // accepted by the kernel, then reset by the proxy at once
        if let Ok(mut s) = w.pod_connect(sa(addr::OTHER_V4, port::ECHO)) {
            let _ = s.write_all(b"hello");
            assert!(closed_within(&mut s, Duration::from_secs(5)), "not refused");
        }
    }
    let m = ops.metrics_until("5 overloads", |m| tcp_denied(m, "overload") == Some(5.0));
    assert_eq!(m.value("portcullis_active_connections", &[]), 5.0);
    let l = ops.log_find("of an overload", |l| l["reason"] == "overload");
    assert_eq!(l["decision"], "deny", "{l}");
    assert!(
        l["error"].as_str().unwrap().contains("max_connections (5)"),
        "{l}"
    );
    assert!(
        ops.upstream_accepts_to(port::ECHO) == 5,
        "refused flows reached no upstream"
    );
    // The flows in place are untouched; one ends, a new one fits.
    for s in &mut open {
        echo(s, 100);
    }
    drop(open.pop());
    ops.metrics_until("4 active", |m| {
        m.get("portcullis_active_connections", &[]) == Some(4.0)
    });
    let mut s = ops
        .world
        .pod_connect(sa(addr::OTHER_V4, port::ECHO))
        .unwrap();
    echo(&mut s, 100);
}

impl Ops {
    fn upstream_accepts_to(&self, port: u16) -> usize {
        self.world
            .upstream_accepts()
            .iter()
            .filter(|(local, _)| local.port() == port)
            .count()
    }
}

/// `max_connections` is one limit for every listener, exact: clients racing on the IPv4 and the
/// IPv6 listener at once get exactly `max_connections` flows between them, and every other
/// connection is an `overload` (each flow holds a semaphore permit; no check-then-increment).
#[test]
fn max_connections_is_exact_across_the_ipv4_and_ipv6_listeners() {
    const MAX: usize = 30;
    const EACH: usize = 40;
    // Connections that send nothing stay in detection (first_byte_timeout) holding their slot.
    let mut ops = Ops::start(&proxy_config(
        "",
        &format!("max_connections = {MAX}\nfirst_byte_timeout = \"30s\"\nhello_timeout = \"30s\""),
        BACKEND,
    ));
    let w = &ops.world;
    let barrier = std::sync::Barrier::new(2);
    let held: Vec<Vec<io::Result<TcpStream>>> = std::thread::scope(|s| {
        let hs: Vec<_> = [addr::OTHER_V4, addr::API_V6]
            .into_iter()
            .map(|ip| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    (0..EACH)
                        .map(|_| w.pod_connect(sa(ip, port::ECHO)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    ops.metrics_until("every connection taken or refused", |m| {
        tcp_denied(m, "overload") == Some((2 * EACH - MAX) as f64)
    });
    // Still exactly MAX once every overload is counted.
    let m = ops.metrics();
    assert_eq!(m.value("portcullis_active_connections", &[]), MAX as f64);
    let log = ops.log(2 * EACH - MAX);
    assert!(log.iter().all(|l| l["reason"] == "overload"), "{log:?}");
    drop(held);
}

#[test]
fn auto_max_connections_from_the_raised_fd_limit() {
    // Started with a soft limit of 1024 under the machine's hard 20,000: the
    // proxy raises the soft limit and sizes max_connections from it.
    let world = World::start();
    let cfg = world.write_file(
        "config.toml",
        &proxy_config("", "max_connections = \"auto\"", BACKEND),
    );
    let ops = Ops::start_with(world, cfg, &["prlimit", "--nofile=1024:20000", "--"]);
    let m = ops.metrics();
    assert_eq!(m.value("process_max_fds", &[]), 20000.0);
    let err = ops.proxy.stderr();
    // (20000 - 64 reserved - 2 x 256 pipes - 100 for health and admin) / 2 fds a flow
    assert!(
        err.contains("limits max_connections=9662 nofile=20000 endpoint_fds=100"),
        "{err}"
    );
}

#[test]
fn fd_exhaustion_is_backed_off_without_spinning_and_recovers() {
    let world = World::start();
    let cfg = world.write_file(
        "config.toml",
        &proxy_config("", "max_connections = 1000", BACKEND),
    );
    let mut ops = Ops::start_with(world, cfg, &["prlimit", "--nofile=64:64", "--"]);
    let pid = ops.proxy.pid();
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap()
            .trim(),
        "portcullis"
    );
    let m = ops.metrics();
    assert_eq!(m.value("process_max_fds", &[]), 64.0);
    // More flows than 64 fds hold (two sockets each): accept hits EMFILE.
    let w = &ops.world;
    // (a flow whose upstream socket hit EMFILE is reset: maybe while connecting)
    let flows: Vec<TcpStream> = (0..40)
        .filter_map(|_| w.pod_connect(sa(addr::OTHER_V4, port::ECHO)).ok())
        .collect();
    let err_seen = poll_until(Duration::from_secs(10), || {
        ops.proxy.stderr().contains("accept failed")
    });
    assert!(err_seen, "{}", ops.proxy.logs(4000));
    // While exhausted (clients waiting in the backlog), no spinning.
    let c0 = cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_seconds(pid) - c0;
    assert!(
        used < 0.8,
        "the proxy burnt {used:.2} s of CPU in 2 s while out of fds"
    );
    assert!(ops.proxy.is_running());
    // fds come back: the proxy serves again, the waiting clients included.
    drop(flows);
    let m = ops.metrics_until("all flows gone", |m| {
        m.get("portcullis_active_connections", &[]) == Some(0.0)
    });
    assert!(m.value("portcullis_accept_errors_total", &[]) > 0.0);
    for _ in 0..3 {
        let mut s = ops
            .world
            .pod_connect(sa(addr::OTHER_V4, port::ECHO))
            .unwrap();
        echo(&mut s, 1000);
    }
    let l = ops.log_find("of a served flow", |l| l["bytes_up"] == 1000);
    assert_eq!(l["decision"], "allow", "{l}");
}

/// Opens `n` connections to `target` at once from wherever it runs, holds them, and prints
/// `FLOODED` once they are made, then every 250 ms `OPEN <k>`: how many are still open (the
/// peer has neither closed nor reset them). Exits after `hold` seconds.
const FLOOD_PY: &str = r#"
import resource, select, socket, sys, time
n, host, port, hold = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
resource.setrlimit(resource.RLIMIT_NOFILE, (n + 64, n + 64))
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
socks = []
# In batches, each settled (connected or reset) before the next, so the
# listen backlog never overflows into SYN retries on a loaded machine.
for start in range(0, n, 100):
    batch = []
    for _ in range(min(100, n - start)):
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect((host, port))
        except BlockingIOError:
            pass
        batch.append(s)
    poll = select.poll()
    for s in batch:
        poll.register(s, select.POLLOUT)
    pending, deadline = len(batch), time.time() + 30
    while pending and time.time() < deadline:
        for fd, _ in poll.poll(500):
            poll.unregister(fd)
            pending -= 1
    socks.extend(batch)
print("FLOODED", flush=True)

def is_open(s):
    try:
        return s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False

end = time.time() + hold
while time.time() < end:
    print("OPEN", sum(1 for s in socks if is_open(s)), flush=True)
    time.sleep(0.25)
"#;

/// The last `OPEN <k>` a flood script printed.
fn flood_open(p: &Proc) -> Option<usize> {
    p.stdout()
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("OPEN ").and_then(|k| k.trim().parse().ok()))
}

/// Issue 10 point 3: 2,100 idle connections to `health` (reachable from other hosts) with the
/// proxy at 2,048 fds starved every egress flow. Here the proxy runs at 1,024 fds with
/// `max_connections = "auto"`; one host of the LAN opens 1,100 connections to health and holds
/// them. Health keeps at most 8 of them (its cap per peer) and resets the rest, counted and
/// logged; egress flows (up to max_connections exactly, the rest reset as overload) and
/// kubelet-like probes from another address keep getting answers, and no accept fails;
/// the flood's connections are closed once the header timeout passes; a local client that
/// pipelines requests and never reads the answers is closed by the idle timeout.
#[test]
fn a_flood_on_health_from_one_host_costs_no_egress_flow_and_no_probe() {
    const FLOOD: usize = 1100;
    let world = World::builder().lan(true).start();
    let cfg = world.write_file(
        "config.toml",
        &proxy_config("", "health = \"0.0.0.0:15021\"", BACKEND),
    );
    let script = world.write_file("flood.py", FLOOD_PY);
    let mut ops = Ops::start_with(world, cfg, &["prlimit", "--nofile=1024:1024", "--"]);
    let pid = ops.proxy.pid();
    let w = &ops.world;
    let lan = w.lan.clone().unwrap();
    let probe_from_node = || http_get(&w.inet, "192.0.2.2:15021", "/ready");
    assert_eq!(probe_from_node().unwrap().0, 200);

    let mut flood = w.spawn_in(
        &lan,
        Cmd::new("python3").label("flood").args([
            script.to_str().unwrap(),
            &FLOOD.to_string(),
            "198.18.0.1",
            "15021",
            "25",
        ]),
    );
    assert!(
        flood.wait_output("FLOODED", Duration::from_secs(20)),
        "{flood:?}"
    );
    let m = ops.metrics_until("the flood refused", |m| {
        m.get(
            "portcullis_endpoint_refused_total",
            &[("listener", "health"), ("reason", "peer_limit")],
        )
        .unwrap_or(0.0)
            >= (FLOOD - 8) as f64
    });
    assert_eq!(
        m.value("portcullis_endpoint_connections", &[("listener", "health")]),
        8.0,
        "health holds its cap for the flooding host"
    );

    // Meanwhile a local client pipelines requests for /metrics and never reads the answers.
    let mut slow = connect_in(
        &ops.world.pod,
        ADMIN.parse().unwrap(),
        Duration::from_secs(5),
    )
    .unwrap();
    slow.set_write_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    // (far more answer bytes than the socket buffers hold; the write itself may stall)
    let _ = slow.write_all(
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:15000\r\n\r\n"
            .repeat(4000)
            .as_bytes(),
    );
    let slow_since = Instant::now();

    // Egress flows all get through while the flood lasts (each holds its two sockets)...
    let flows: Vec<TcpStream> = (0..40)
        .map(|_| {
            let mut s = ops
                .world
                .pod_connect(sa(addr::OTHER_V4, port::ECHO))
                .unwrap();
            echo(&mut s, 1000);
            s
        })
        .collect();
    // The egress flows fill max_connections ("auto": 1,024 fds less 64, the pipe pool's 512
    // and the endpoints' 100, halved) and 100 more are reset as overload, exactly.
    let max: usize = ops
        .proxy
        .stderr()
        .split("max_connections=")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .expect("the limits line");
    assert_eq!(max, (1024 - 64 - 512 - 100) / 2);
    let hogs: Vec<io::Result<TcpStream>> = (0..max - flows.len() + 100)
        .map(|_| ops.world.pod_connect(sa(addr::OTHER_V4, port::ECHO)))
        .collect();
    ops.metrics_until("max_connections reached, 100 flows past it reset", |m| {
        m.get("portcullis_active_connections", &[]) == Some(max as f64)
            && tcp_denied(m, "overload") == Some(100.0)
    });
    // ... and so do probes from another address, the node's.
    for _ in 0..10 {
        let (code, body) = probe_from_node().unwrap();
        assert_eq!((code, body.as_str()), (200, "ready\n"));
    }
    // A request head past 16 KiB is refused, never served.
    let mut big = connect_in(
        &ops.world.inet,
        "192.0.2.2:15021".parse().unwrap(),
        Duration::from_secs(5),
    )
    .unwrap();
    let pad = "a".repeat(20_000);
    let _ = write!(
        big,
        "GET /ready HTTP/1.1\r\nHost: x\r\nX-Pad: {pad}\r\n\r\n"
    );
    let (raw, _) = read_to_end_timeout(&mut big, Duration::from_secs(10));
    let answer = String::from_utf8_lossy(&raw);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431 "),
        "{answer}"
    );
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    assert!(fds < 1024, "{fds} fds open");
    drop(hogs);
    drop(flows);
    // One line per flow: the 100 overloads, and every flow that had a slot once it ended.
    let log = ops.log(100 + max);
    assert_eq!(
        log.iter()
            .filter(|l| l["decision"] == "allow" && l["bytes_up"] == 1000)
            .count(),
        40,
        "{log:?}"
    );
    assert_eq!(
        log.iter().filter(|l| l["reason"] == "overload").count(),
        100
    );
    let err = ops.proxy.stderr();
    assert!(!err.contains("accept failed"), "{err}");
    assert!(
        err.contains("connection refused: listener at its connection limit")
            && err.contains("listener=\"health\"")
            && err.contains("peer=198.18.0.2"),
        "{err}"
    );

    // The flood's connections that were kept never sent a request head: closed once the
    // header timeout (5 s) passes, and counted.
    let closed = poll_until(Duration::from_secs(15), || flood_open(&flood) == Some(0));
    assert!(closed, "{:?}\n{}", flood_open(&flood), ops.proxy.logs(3000));
    let m = ops.metrics_until("the kept flood connections timed out", |m| {
        m.get(
            "portcullis_endpoint_closed_total",
            &[("listener", "health"), ("reason", "header_timeout")],
        ) == Some(8.0)
            && m.get("portcullis_endpoint_connections", &[("listener", "health")]) == Some(0.0)
    });
    assert_eq!(m.value("portcullis_accept_errors_total", &[]), 0.0);

    // The reader that never reads: nothing moves on its connection once the socket buffers
    // are full, and the idle timeout (15 s) closes it.
    std::thread::sleep(
        (slow_since + Duration::from_secs(16)).saturating_duration_since(Instant::now()),
    );
    ops.metrics_until("the stalled reader closed by the idle timeout", |m| {
        m.get(
            "portcullis_endpoint_closed_total",
            &[("listener", "admin"), ("reason", "idle_timeout")],
        ) == Some(1.0)
    });
    assert!(
        closed_within(&mut slow, Duration::from_secs(10)),
        "the stalled reader is still connected"
    );
    flood.kill();
}

// ------------------------------------------------------------ /denied round trip

/// The flows of the round trip; each must succeed. Returns how many.
fn workload(ops: &Ops) -> usize {
    let w = &ops.world;
    let mut n = 0;
    for url in [
        "https://www.example.org/",
        "https://www.example.org:8443/",
        "http://www.example.org/",
        "http://www.example.org:8080/",
        "http://other.example.net/",
        // an IP literal: no SNI, a flow without a name
        "https://192.0.2.10/",
    ] {
        let out = w.curl(&["-4", url]);
        assert!(
            out.success() && out.stdout.contains(" ok "),
            "{url}: {out:?}\n{}",
            ops.proxy.logs(3000)
        );
        n += 1;
    }
    // nameless opaque TCP
    let mut s = w.pod_connect(sa(addr::API_V4, port::ECHO)).unwrap();
    echo(&mut s, 100);
    n + 1
}

#[test]
fn denied_toml_from_audit_pasted_lets_the_same_flows_pass_registry_only() {
    let mut ops = Ops::start(&proxy_config("audit = true", "", API));
    let n = workload(&ops);
    served(&ops.world, "https://api.example.com/", "tls ok");
    let log = ops.log(n + 1);
    assert_eq!(
        log.iter().filter(|l| l["decision"] == "audit").count(),
        n,
        "{log:?}"
    );

    let denied = ops.admin_json("/denied");
    let recs = denied.as_array().unwrap();
    let has = |name: Option<&str>, ip: Option<&str>, port: u16, proto: &str| {
        recs.iter().any(|r| {
            r["name"].as_str() == name
                && r["ip"].as_str() == ip
                && r["port"] == port
                && r["protocol"] == proto
                && r["decision"] == "audit"
                && r["count"] == 1
                && r["last_seen"].is_string()
        })
    };
    for (port, proto) in [(443, "tls"), (8443, "tls"), (80, "http"), (8080, "http")] {
        assert!(
            has(Some("www.example.org"), None, port, proto),
            "{port}: {denied}"
        );
    }
    assert!(has(Some("other.example.net"), None, 80, "http"), "{denied}");
    assert!(has(None, Some("192.0.2.10"), 443, "tls"), "{denied}");
    assert!(has(None, Some("192.0.2.10"), 7000, "tcp"), "{denied}");
    assert_eq!(recs.len(), 7, "api.example.com was allowed: {denied}");

    let (code, toml) = http_get(ops.pod(), ADMIN, "/denied?format=toml").unwrap();
    assert_eq!(code, 200);
    assert!(toml.contains("review"), "{toml}");
    assert!(!toml.contains("api.example.com"), "{toml}");
    assert_eq!(toml.matches("[[service_entry]]").count(), 3, "{toml}");
    assert_eq!(
        toml.matches("hosts = [\"www.example.org\"]").count(),
        1,
        "one block per name: {toml}"
    );

    // Pasted into the config under REGISTRY_ONLY: the same flows pass.
    let pasted = proxy_config("", "", &format!("{API}\n{toml}"));
    let check = ops.world.portcullis(&[
        "check",
        "-c",
        &ops.world
            .write_file("pasted.toml", &pasted)
            .to_string_lossy(),
    ]);
    assert!(check.success(), "{check:?}\n{pasted}");
    ops.reload_with(&pasted);
    let m = ops.metrics();
    assert_eq!(
        m.value("portcullis_config_reloads_total", &[("result", "failure")]),
        0.0
    );
    let before = ops.log(n + 1).len();
    assert_eq!(workload(&ops), n);
    let log = ops.log(before + n);
    let after = &log[before..];
    assert!(after.iter().all(|l| l["decision"] == "allow"), "{after:?}");
    let entries: std::collections::BTreeSet<&str> =
        after.iter().filter_map(|l| l["entry"].as_str()).collect();
    assert_eq!(
        entries.into_iter().collect::<Vec<_>>(),
        ["other.example.net", "tcp-192.0.2.10", "www.example.org"],
        "{after:?}"
    );
    // Only what was seen: anything else is still denied.
    let out = ops.world.s_client(
        "192.0.2.11:443",
        &["-servername", "a.files.example.com"],
        b"",
    );
    assert!(out.stderr.contains("alert access denied"), "{out:?}");
}

// ------------------------------------------------------------ worker runtimes

/// The proxy's worker threads (one single-threaded runtime each), by their names.
fn worker_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("portcullis-w"))
        .count()
}

/// One worker per CPU the process may use, each with its own listener on the `listen` address:
/// under `taskset -c 0` one, unrestricted as many as this test may use. Flows held open at
/// once, spread by the kernel over the workers' listeners, are all served.
#[test]
fn one_worker_runtime_and_listener_per_usable_cpu() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cases: [(&[&str], usize); 2] = [(&["taskset", "-c", "0"], 1), (&[], cpus)];
    for (wrap, want) in cases {
        let world = World::start();
        let cfg = world.write_file("config.toml", &proxy_config("", "", BACKEND));
        let ops = Ops::start_with(world, cfg, wrap);
        assert_eq!(
            worker_threads(ops.proxy.pid()),
            want,
            "{wrap:?}\n{}",
            ops.proxy.logs(3000)
        );
        let listen: SocketAddr = LISTEN.parse().unwrap();
        let listeners = tcp_listeners(ops.pod())
            .into_iter()
            .filter(|a| *a == listen)
            .count();
        assert_eq!(listeners, want, "{wrap:?}: listeners on {listen}");
        let mut open: Vec<TcpStream> = (0..16)
            .map(|_| {
                ops.world
                    .pod_connect(sa(addr::OTHER_V4, port::ECHO))
                    .unwrap()
            })
            .collect();
        for s in &mut open {
            echo(s, 100);
        }
    }
}
