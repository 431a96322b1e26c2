//! Explicit proxy mode end to end (docs/DESIGN.md §3 "Explicit proxy"): the
//! proxy runs in the pod namespace with `listen = []` and NO redirect rules at
//! all (`portcullis init` is never run), serving `explicit_listen`; real
//! clients (curl with `-x` and with `HTTPS_PROXY`, Python's urllib with a
//! ProxyHandler, openssl s_client -proxy, raw sockets) use it by CONNECT and
//! by absolute-form requests.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const CONFIG: &str = r#"
[proxy]
listen = []
explicit_listen = ["127.0.0.1:3128", "192.0.2.2:3128"]
explicit_clients = ["127.0.0.0/8", "192.0.2.2/32"]
health = "127.0.0.1:15021"
admin = "127.0.0.1:15000"
hello_timeout = "2s"
connect_timeout = "2s"
drain_min = "0s"
drain_timeout = "2s"

[[service_entry]]
name = "api"
hosts = ["api.example.com"]
resolution = "DNS"
ports = [
  { number = 443, protocol = "TLS" },
  { number = 80, protocol = "HTTP" },
  { number = 8081, protocol = "HTTP" },
  { number = 7000, protocol = "TCP" },
  { number = 9000, protocol = "TCP" },
  { number = 9, protocol = "TCP" },
]

[[service_entry]]
name = "files"
hosts = ["*.files.example.com"]
ports = [{ number = 443, protocol = "TLS" }, { number = 80, protocol = "HTTP" }]

[[service_entry]]
name = "inside"
hosts = ["loop.example.com", "metadata.example.com", "nx.example.com"]
ports = [{ number = 443, protocol = "TLS" }, { number = 80, protocol = "HTTP" }, { number = 7000, protocol = "TCP" }]

[[service_entry]]
name = "other-ip"
hosts = ["other.example.net"]
addresses = ["198.51.100.7/32"]
resolution = "NONE"
ports = [{ number = 7000, protocol = "TCP" }]
"#;

/// Echoes the request's headers as the body (to see what the proxy forwarded).
const HEADER_ECHO_PY: &str = r#"
import http.server, socketserver
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = "".join("%s: %s\n" % (k.lower(), v) for k, v in self.headers.items()).encode()
        body = ("path: %s\n" % self.path).encode() + body
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    allow_reuse_address = True
    daemon_threads = True
S(("0.0.0.0", 8081), H).serve_forever()
"#;

struct Px {
    world: World,
    proxy: Proc,
}

impl Px {
    fn start() -> Px {
        let world = World::builder()
            .add_dns(&[
                ("loop.example.com", "127.0.0.1"),
                ("metadata.example.com", "169.254.169.254"),
            ])
            .start();
        let cfg = world.write_file("config.toml", CONFIG);
        let check = world.portcullis(&["check", "-c", cfg.to_str().unwrap()]);
        assert!(check.success(), "check: {check:?}");
        let proxy = world.spawn_proxy(&["run", "-c", cfg.to_str().unwrap()]);
        world.wait_tcp(&world.pod, "127.0.0.1:3128".parse().unwrap());
        world.wait_tcp(&world.pod, "192.0.2.2:3128".parse().unwrap());
        Px { world, proxy }
    }

    fn lines(&self) -> Vec<Value> {
        self.proxy
            .stdout()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The first access-log line (after `skip` of them) for which `f` holds.
    #[track_caller]
    fn wait_log(&self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(v) = self.lines().into_iter().find(|v| f(v)) {
                return v;
            }
            if Instant::now() > deadline {
                panic!(
                    "no access-log line for {what}; lines:\n{:#?}\n{}",
                    self.lines(),
                    self.proxy.logs(4000)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn curl(&self, args: &[&str]) -> Output {
        self.world.curl(args)
    }

    /// A raw connection to the proxy from the pod.
    fn raw(&self) -> TcpStream {
        let s = self
            .world
            .pod_connect("127.0.0.1:3128".parse().unwrap())
            .expect("connect to the explicit proxy");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    /// Like [`Px::connect`], but a refused or reset connection is `None`.
    fn try_connect(&self, authority: &str) -> Option<(TcpStream, String)> {
        let mut s = self
            .world
            .pod_connect("127.0.0.1:3128".parse().unwrap())
            .ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(
            s,
            "CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"
        )
        .ok()?;
        let head = read_head(&mut s);
        (!head.is_empty()).then_some((s, head))
    }

    /// Sends a CONNECT and returns the stream and the status line + headers.
    fn connect(&self, authority: &str) -> (TcpStream, String) {
        let mut s = self.raw();
        write!(
            s,
            "CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"
        )
        .unwrap();
        let head = read_head(&mut s);
        (s, head)
    }
}

/// Reads a response head byte by byte (nothing after it is consumed).
fn read_head(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while !out.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => out.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads one HTTP/1.1 response with a Content-Length body; returns head and body.
fn read_response(s: &mut TcpStream) -> (String, String) {
    let head = read_head(s);
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).expect("response body");
    (head, String::from_utf8_lossy(&body).into_owned())
}

fn authority_is(v: &Value, a: &str) -> bool {
    v["authority"] == a
}

#[test]
fn explicit_proxy_without_redirect_rules() {
    let px = Px::start();
    let w = &px.world;
    let proxy = "http://127.0.0.1:3128";

    // No redirect rules exist in the pod: this is explicit mode only.
    let rules = w.iptables_save(&w.pod);
    assert!(!rules.contains("PORTCULLIS"), "rules: {rules}");
    let header_echo = w.spawn_in(
        &w.inet,
        Cmd::new("python3")
            .label("header-echo")
            .args(["-c", HEADER_ECHO_PY]),
    );
    w.wait_tcp(&w.inet, "0.0.0.0:8081".parse().unwrap());

    // --- CONNECT, allowed, curl -x: the tunnel reaches the real upstream.
    let out = px.curl(&["-x", proxy, "https://api.example.com/"]);
    assert!(
        out.ok().starts_with("tls ok sni=api.example.com"),
        "{out:?}"
    );
    let l = px.wait_log("CONNECT api", |v| {
        authority_is(v, "api.example.com:443") && v["decision"] == "allow"
    });
    assert_eq!(l["mode"], "explicit");
    assert_eq!(l["protocol"], "tls");
    assert_eq!(l["name"], "api.example.com");
    assert_eq!(l["entry"], "api");
    assert!(l["bytes_down"].as_u64().unwrap() > 0, "{l}");
    let up = l["upstream"].as_str().unwrap();
    assert!(
        up == "192.0.2.10:443" || up == "[2001:db8::10]:443",
        "upstream {up}"
    );

    // --- CONNECT through HTTPS_PROXY (no -x), a wildcard entry.
    let out = w.run_pod(
        w.curl_cmd(&["https://a.files.example.com/"])
            .env("HTTPS_PROXY", proxy),
    );
    assert!(
        out.ok().starts_with("tls ok sni=a.files.example.com"),
        "{out:?}"
    );
    px.wait_log("HTTPS_PROXY files", |v| {
        authority_is(v, "a.files.example.com:443") && v["entry"] == "files"
    });

    // --- CONNECT, denied before 200: 403 with the reason; no upstream touched.
    let accepts_before = w.upstream_accepts().len();
    let (mut s, head) = px.connect("www.example.org:443");
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("x-portcullis-reason: not_in_registry"),
        "{head}"
    );
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    assert!(body.contains("not_in_registry"), "{body}");
    let l = px.wait_log("denied CONNECT", |v| authority_is(v, "www.example.org:443"));
    assert_eq!(l["decision"], "deny");
    assert_eq!(l["reason"], "not_in_registry");
    assert_eq!(l["upstream"], Value::Null);
    // curl shows the same 403 as a failed tunnel.
    let out = px.curl(&[
        "-x",
        proxy,
        "-o",
        "/dev/null",
        "-w",
        "%{http_connect}",
        "https://www.example.org/",
    ]);
    assert_eq!(out.stdout.trim(), "403", "{out:?}");

    // --- CONNECT whose ClientHello names another host: 200, then a TLS
    // access_denied alert, reason sni_mismatch, no upstream connection.
    let out = w.run_pod(
        Cmd::new("openssl")
            .args([
                "s_client",
                "-proxy",
                "127.0.0.1:3128",
                "-connect",
                "api.example.com:443",
                "-servername",
                "www.example.org",
                "-brief",
            ])
            .stdin(Vec::new())
            .env("OPENSSL_CONF", "/dev/null")
            .timeout(Duration::from_secs(20)),
    );
    assert!(!out.success(), "{out:?}");
    assert!(
        out.stderr.contains("access denied") || out.stderr.contains("alert"),
        "{out:?}"
    );
    let l = px.wait_log("sni mismatch", |v| v["reason"] == "sni_mismatch");
    assert_eq!(l["decision"], "deny");
    assert_eq!(l["authority"], "api.example.com:443");
    assert_eq!(l["upstream"], Value::Null);

    // --- CONNECT to a TLS port, Host inside the tunnel names another host.
    let (mut s, head) = px.connect("api.example.com:80");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(b"GET / HTTP/1.1\r\nHost: www.example.org\r\n\r\n")
        .unwrap();
    let (head, body) = read_response(&mut s);
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(body.contains("host_mismatch"), "{body}");
    px.wait_log("host mismatch", |v| v["reason"] == "host_mismatch");

    // --- CONNECT to an HTTP port with the right Host: relayed.
    let (mut s, head) = px.connect("api.example.com:80");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(b"GET / HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n")
        .unwrap();
    let (head, body) = read_response(&mut s);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body.starts_with("http ok host=api.example.com"), "{body}");

    // None of the denied tunnels reached an upstream.
    let accepts: Vec<_> = w.upstream_accepts()[accepts_before..].to_vec();
    assert!(
        accepts.iter().all(|(local, _)| local.port() == 80),
        "denied flows reached upstreams: {accepts:?}"
    );

    // --- CONNECT to a TCP port: decided on the name, connect, then 200.
    let (mut s, head) = px.connect("api.example.com:7000");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(b"ping\n").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut echoed = String::new();
    s.read_to_string(&mut echoed).unwrap();
    assert_eq!(echoed, "ping\n");
    let l = px.wait_log("tcp tunnel", |v| authority_is(v, "api.example.com:7000"));
    assert_eq!(l["protocol"], "tcp");
    assert_eq!(l["decision"], "allow");
    assert_eq!(l["bytes_up"], 5);

    // --- IP-literal CONNECT: only entries whose addresses contain it.
    let (mut s, head) = px.connect("198.51.100.7:7000");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(b"ip\n").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut echoed = String::new();
    s.read_to_string(&mut echoed).unwrap();
    assert_eq!(echoed, "ip\n");
    let l = px.wait_log("ip literal", |v| authority_is(v, "198.51.100.7:7000"));
    assert_eq!(l["entry"], "other-ip");
    assert_eq!(l["dst"], "198.51.100.7:7000");
    assert_eq!(l["name"], Value::Null);
    // api.example.com's own address is not in any entry's addresses.
    let (_s, head) = px.connect("192.0.2.10:7000");
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    let (_s, head) = px.connect("[2001:db8::10]:443");
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");

    // --- Names that resolve to loopback or cloud metadata: never dialled.
    for (name, port) in [("loop.example.com", 7000), ("metadata.example.com", 7000)] {
        let a = format!("{name}:{port}");
        let (_s, head) = px.connect(&a);
        assert!(head.starts_with("HTTP/1.1 403"), "{a}: {head}");
        assert!(head.contains("forbidden_address"), "{a}: {head}");
        let l = px.wait_log("forbidden", |v| authority_is(v, &a));
        assert_eq!(l["reason"], "forbidden_address");
        assert_eq!(l["upstream"], Value::Null);
    }
    // ... on a TLS port: 200, then a TLS alert (curl fails), same reason.
    let out = px.curl(&["-x", proxy, "https://metadata.example.com/"]);
    assert!(!out.success(), "{out:?}");
    px.wait_log("forbidden tls", |v| {
        authority_is(v, "metadata.example.com:443") && v["reason"] == "forbidden_address"
    });
    // ... and by absolute-form.
    let out = px.curl(&["-x", proxy, "-i", "http://loop.example.com/"]);
    assert!(out.stdout.starts_with("HTTP/1.1 403"), "{out:?}");
    assert!(out.stdout.contains("forbidden_address"), "{out:?}");

    // --- A name whose resolution fails: reason dns.
    let out = px.curl(&["-x", proxy, "-i", "http://nx.example.com/"]);
    assert!(out.stdout.starts_with("HTTP/1.1 403"), "{out:?}");
    assert!(out.stdout.contains("dns"), "{out:?}");
    px.wait_log("dns", |v| {
        authority_is(v, "nx.example.com:80") && v["reason"] == "dns"
    });

    // --- A refused port: 502 after the decision.
    let (_s, head) = px.connect("api.example.com:9");
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    let l = px.wait_log("refused", |v| authority_is(v, "api.example.com:9"));
    assert_eq!(l["decision"], "allow");
    assert_eq!(l["error"], "connect_refused");

    // --- Absolute-form, allowed and denied, curl -x.
    let out = px.curl(&["-x", proxy, "http://api.example.com/"]);
    assert!(
        out.ok().starts_with("http ok host=api.example.com"),
        "{out:?}"
    );
    let l = px.wait_log("absolute-form", |v| {
        authority_is(v, "api.example.com:80") && v["decision"] == "allow"
    });
    assert_eq!(l["decision"], "allow");
    assert_eq!(l["mode"], "explicit");
    let out = px.curl(&["-x", proxy, "-i", "http://www.example.org/"]);
    assert!(out.stdout.starts_with("HTTP/1.1 403"), "{out:?}");
    assert!(
        out.stdout
            .to_ascii_lowercase()
            .contains("x-portcullis-reason: not_in_registry"),
        "{out:?}"
    );

    // --- Proxy and hop-by-hop headers never reach the upstream.
    let out = px.curl(&[
        "-x",
        proxy,
        "-H",
        "Proxy-Authorization: Basic c2VjcmV0OnNlY3JldA==",
        "-H",
        "Connection: keep-alive, X-Hop",
        "-H",
        "X-Hop: 1",
        "-H",
        "X-Kept: 1",
        "http://api.example.com:8081/path?q=1",
    ]);
    let body = out.ok().to_string();
    assert!(body.contains("path: /path?q=1"), "{body}");
    assert!(body.contains("x-kept: 1"), "{body}");
    assert!(body.contains("host: api.example.com:8081"), "{body}");
    for gone in [
        "proxy-authorization",
        "proxy-connection",
        "x-hop",
        "connection: keep",
    ] {
        assert!(!body.contains(gone), "{gone} forwarded: {body}");
    }
    drop(header_echo);

    // --- https:// absolute-form: 400.
    let mut s = px.raw();
    s.write_all(b"GET https://api.example.com/ HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
        .unwrap();
    let (head, _) = read_response(&mut s);
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");

    // --- Keep-alive: several hosts on one plain-HTTP proxy connection, each
    // request its own flow.
    let mut s = px.raw();
    for host in ["api.example.com", "a.files.example.com", "www.example.org"] {
        write!(s, "GET http://{host}/ HTTP/1.1\r\nHost: {host}\r\n\r\n").unwrap();
        let (head, body) = read_response(&mut s);
        if host == "www.example.org" {
            assert!(head.starts_with("HTTP/1.1 403"), "{host}: {head}");
        } else {
            assert!(head.starts_with("HTTP/1.1 200"), "{host}: {head}");
            assert!(body.starts_with(&format!("http ok host={host}")), "{body}");
        }
    }
    // Host must equal the absolute-form authority.
    write!(
        s,
        "GET http://api.example.com/ HTTP/1.1\r\nHost: www.example.org\r\n\r\n"
    )
    .unwrap();
    let (head, _) = read_response(&mut s);
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(head.contains("host_mismatch"), "{head}");
    let client = s.local_addr().unwrap().to_string();
    let same_conn: Vec<Value> = {
        px.wait_log("keep-alive", |v| {
            v["client"] == client.as_str() && v["reason"] == "host_mismatch"
        });
        px.lines()
            .into_iter()
            .filter(|v| v["client"] == client.as_str())
            .collect()
    };
    let auths: Vec<&str> = same_conn
        .iter()
        .map(|v| v["authority"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        auths,
        [
            "api.example.com:80",
            "a.files.example.com:80",
            "www.example.org:80",
            "api.example.com:80"
        ],
        "{same_conn:#?}"
    );

    // --- Python urllib with a ProxyHandler: http:// absolute-form, https:// by CONNECT.
    let py = format!(
        r#"
import ssl, urllib.request, urllib.error
ctx = ssl.create_default_context(cafile={ca:?})
o = urllib.request.build_opener(
    urllib.request.ProxyHandler({{"http": "{proxy}", "https": "{proxy}"}}),
    urllib.request.HTTPSHandler(context=ctx))
print(o.open("http://api.example.com/", timeout=10).read().decode().split()[0:3])
print(o.open("https://api.example.com/", timeout=10).read().decode().split()[0:3])
try:
    o.open("http://www.example.org/", timeout=10)
except urllib.error.HTTPError as e:
    print("denied", e.code, e.headers["X-Portcullis-Reason"])
try:
    o.open("https://www.example.org/", timeout=10)
except urllib.error.URLError as e:
    print("tunnel refused", "403" in str(e.reason))
"#,
        ca = pki().ca_cert.to_str().unwrap()
    );
    let out = w.run_pod(
        Cmd::new("python3")
            .args(["-c", &py])
            .timeout(Duration::from_secs(60)),
    );
    assert_eq!(
        out.ok(),
        "['http', 'ok', 'host=api.example.com']\n\
         ['tls', 'ok', 'sni=api.example.com']\n\
         denied 403 not_in_registry\n\
         tunnel refused True\n",
        "{out:?}"
    );

    // ... and urllib's default opener, which takes HTTPS_PROXY from the environment.
    let py_env = format!(
        "import ssl, urllib.request\n\
         ctx = ssl.create_default_context(cafile={ca:?})\n\
         print(urllib.request.urlopen('https://a.files.example.com/', context=ctx, timeout=10).read().decode().split()[1:3])\n",
        ca = pki().ca_cert.to_str().unwrap()
    );
    let out = w.run_pod(
        Cmd::new("python3")
            .args(["-c", &py_env])
            .env("HTTPS_PROXY", proxy)
            .timeout(Duration::from_secs(60)),
    );
    assert_eq!(out.ok(), "['ok', 'sni=a.files.example.com']\n", "{out:?}");
    assert!(
        poll_until(Duration::from_secs(10), || px
            .lines()
            .iter()
            .filter(|v| authority_is(v, "a.files.example.com:443"))
            .count()
            >= 2),
        "the env-proxy request did not go through the proxy"
    );

    // --- A client outside explicit_clients: reset, counted, logged.
    // (The reset may already show in the connect helper.)
    if let Ok(mut s) = w.connect(&w.inet, "192.0.2.2:3128".parse().unwrap()) {
        let _ = s.write_all(b"CONNECT api.example.com:443 HTTP/1.1\r\n\r\n");
        let (got, _) = read_to_end_timeout(&mut s, Duration::from_secs(5));
        assert!(got.is_empty(), "answered an outside client: {got:?}");
    }
    let l = px.wait_log("outside client", |v| v["reason"] == "client_not_allowed");
    assert_eq!(
        l["client"].as_str().unwrap().split(':').next(),
        Some("192.0.2.1")
    );
    // ... while a client inside (the pod's own address) is served.
    let mut s = w
        .connect(&w.pod, "192.0.2.2:3128".parse().unwrap())
        .expect("tcp connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"CONNECT api.example.com:7000 HTTP/1.1\r\n\r\n")
        .unwrap();
    assert!(read_head(&mut s).starts_with("HTTP/1.1 200"));

    // --- Metrics carry the new reasons; /denied lists names, not mismatches.
    let metrics = w.curl(&["http://127.0.0.1:15000/metrics"]);
    for reason in [
        "sni_mismatch",
        "host_mismatch",
        "forbidden_address",
        "client_not_allowed",
        "dns",
    ] {
        assert!(
            metrics.stdout.contains(&format!("reason=\"{reason}\"")),
            "{reason} missing from metrics"
        );
    }
    let denied = w.curl(&["http://127.0.0.1:15000/denied"]);
    let denied = denied.ok();
    assert!(denied.contains("www.example.org"), "{denied}");
    assert!(!denied.contains("mismatch"), "{denied}");
    assert!(!denied.contains("forbidden_address"), "{denied}");
}

#[test]
fn explicit_tunnel_moves_1gib_intact() {
    let px = Px::start();
    const GIB: u64 = 1 << 30;
    let (mut s, head) = px.connect("api.example.com:9000");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let t = Instant::now();
    bulk_download(&mut s, GIB).expect("1 GiB download through the tunnel");
    let down = t.elapsed();
    let (mut s, head) = px.connect("api.example.com:9000");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let t = Instant::now();
    bulk_upload(&mut s, GIB).expect("1 GiB upload through the tunnel");
    let up = t.elapsed();
    drop(s);
    // The same service dialled directly from the pod (no redirect rules
    // exist), 256 MiB each way, for a ratio measured in the same run.
    const DIRECT: u64 = 256 << 20;
    let bulk = sa(addr::API_V4, port::BULK);
    let mut d = px.world.pod_connect(bulk).expect("direct connect");
    let t = Instant::now();
    bulk_download(&mut d, DIRECT).expect("direct download");
    let direct_down = t.elapsed();
    let mut d = px.world.pod_connect(bulk).expect("direct connect");
    let t = Instant::now();
    bulk_upload(&mut d, DIRECT).expect("direct upload");
    let direct_up = t.elapsed();
    let rate = |bytes: u64, d: Duration| bytes as f64 / (1 << 20) as f64 / d.as_secs_f64();
    eprintln!(
        "explicit tunnel: 1 GiB down {:.0} MiB/s, up {:.0} MiB/s; direct (no proxy): down {:.0} MiB/s, up {:.0} MiB/s",
        rate(GIB, down),
        rate(GIB, up),
        rate(DIRECT, direct_down),
        rate(DIRECT, direct_up),
    );
    let l = px.wait_log("bulk up", |v| {
        authority_is(v, "api.example.com:9000") && v["bytes_up"].as_u64() > Some(GIB)
    });
    assert_eq!(l["error"], Value::Null, "{l}");
    let l = px.wait_log("bulk down", |v| {
        authority_is(v, "api.example.com:9000") && v["bytes_down"].as_u64() >= Some(GIB)
    });
    assert_eq!(l["error"], Value::Null, "{l}");
}

#[test]
fn check_requires_explicit_clients_for_a_non_loopback_listener() {
    let dir = std::env::temp_dir().join(format!("pc-explicit-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("open.toml");
    std::fs::write(
        &cfg,
        "[proxy]\nlisten = []\nexplicit_listen = [\"0.0.0.0:3128\"]\n",
    )
    .unwrap();
    let out = Cmd::new(portcullis_bin())
        .args(["check", "-c", cfg.to_str().unwrap()])
        .run();
    assert_eq!(out.status, Some(1), "{out:?}");
    assert!(out.stderr.contains("explicit_clients"), "{out:?}");
    assert_eq!(out.stderr.trim().lines().count(), 1, "{out:?}");

    // With explicit_clients, or on loopback, it is valid; listen = [] alone is not.
    for (ok, text) in [
        (
            true,
            "[proxy]\nlisten = []\nexplicit_listen = [\"0.0.0.0:3128\"]\nexplicit_clients = [\"10.0.0.0/8\"]\n",
        ),
        (true, "[proxy]\nlisten = []\nexplicit_listen = [\"127.0.0.1:3128\"]\n"),
        (false, "[proxy]\nlisten = []\n"),
        (
            false,
            "[proxy]\nexplicit_listen = [\"127.0.0.1:3128\"]\nexplicit_clients = [\"nope\"]\n",
        ),
    ] {
        std::fs::write(&cfg, text).unwrap();
        let out = Cmd::new(portcullis_bin())
            .args(["check", "-c", cfg.to_str().unwrap()])
            .run();
        assert_eq!(out.success(), ok, "{text}\n{out:?}");
    }

    // `check` says what it accepted; `explain` answers for explicit requests.
    std::fs::write(
        &cfg,
        "[proxy]\nlisten = []\nexplicit_listen = [\"0.0.0.0:3128\"]\nexplicit_clients = [\"10.0.0.0/8\"]\n\
         [[service_entry]]\nname = \"api\"\nhosts = [\"api.example.com\"]\nports = [{ number = 443, protocol = \"TLS\" }]\n",
    )
    .unwrap();
    let c = cfg.to_str().unwrap();
    let out = Cmd::new(portcullis_bin()).args(["check", "-c", c]).run();
    assert!(
        out.stdout
            .contains("explicit_listen: 0.0.0.0:3128 (clients: 10.0.0.0/8)"),
        "{out:?}"
    );
    // `init` refuses such a file: its rules would redirect to a port nothing listens on.
    let out = Cmd::new(portcullis_bin())
        .args(["init", "-c", c, "--dry-run"])
        .run();
    assert!(!out.success(), "{out:?}");
    assert!(
        out.stderr.contains("[proxy] listen is empty") && out.stderr.lines().count() == 1,
        "{out:?}"
    );
    let explain = |args: &[&str]| {
        Cmd::new(portcullis_bin())
            .args(["explain", "-c", c])
            .args(args)
            .run()
    };
    let out = explain(&["--connect", "api.example.com:443"]);
    assert!(out.success(), "{out:?}");
    assert!(out.stdout.contains("decision: allow"), "{out:?}");
    assert!(out.stdout.contains("entry: api"), "{out:?}");
    let out = explain(&[
        "--connect",
        "api.example.com:443",
        "--sni",
        "evil.example.net",
    ]);
    assert!(out.stdout.contains("reason: sni_mismatch"), "{out:?}");
    let out = explain(&["--url", "http://api.example.com/"]);
    assert!(out.stdout.contains("decision: deny"), "{out:?}");
    assert!(out.stdout.contains("not_in_registry"), "{out:?}");
    let out = explain(&["--url", "https://api.example.com/"]);
    assert_eq!(out.status, Some(2), "{out:?}");
    let out = explain(&["--connect", "x:1", "--dst", "192.0.2.1:1"]);
    assert_eq!(out.status, Some(2), "{out:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// deploy/kubernetes/explicit: a config `check` accepts (explicit only, with
/// explicit_clients), a Deployment without init containers that fits
/// PodSecurity "restricted", a Service on the proxy port, and NetworkPolicies
/// confining the app to the proxy and DNS.
#[test]
fn kubernetes_explicit_example() {
    use serde_norway::Value as Y;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/explicit");
    let mut docs: Vec<Y> = Vec::new();
    for f in ["egress-proxy.yaml", "app.yaml"] {
        let text = std::fs::read_to_string(dir.join(f)).unwrap();
        for d in serde_norway::Deserializer::from_str(&text) {
            let v: Y = serde::Deserialize::deserialize(d).unwrap_or_else(|e| panic!("{f}: {e}"));
            if !v.is_null() {
                docs.push(v);
            }
        }
    }
    let kind = |k: &str| -> Vec<&Y> {
        docs.iter()
            .filter(|d| d["kind"].as_str() == Some(k))
            .collect()
    };
    assert_eq!(
        kind("Namespace")[0]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"].as_str(),
        Some("restricted")
    );

    // The config: explicit only, valid, clients required and given.
    let cm = kind("ConfigMap")[0];
    let text = cm["data"]["config.toml"].as_str().unwrap();
    let cfg = portcullis::config::Config::parse(std::path::Path::new("configmap"), text)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(cfg.proxy.listen.is_empty());
    assert!(!cfg.proxy.explicit_listen.is_empty());
    assert!(!cfg.proxy.explicit_clients.is_empty());
    let proxy_port = cfg.proxy.explicit_listen[0].port();

    // The Deployment: no init container; restricted: non-root, no
    // escalation, every capability dropped, RuntimeDefault seccomp.
    let deps = kind("Deployment");
    let proxy = deps
        .iter()
        .find(|d| d["metadata"]["name"].as_str() == Some("egress-proxy"))
        .unwrap();
    let pod = &proxy["spec"]["template"]["spec"];
    assert!(pod.get("initContainers").is_none(), "no init container");
    for d in &deps {
        let pod = &d["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"].as_str(),
            Some("RuntimeDefault")
        );
        for c in pod["containers"].as_sequence().unwrap() {
            let sc = &c["securityContext"];
            assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
            assert_eq!(sc["capabilities"]["drop"][0].as_str(), Some("ALL"));
            assert!(sc["capabilities"].get("add").is_none());
        }
    }
    let ports: Vec<i64> = pod["containers"][0]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|p| p["containerPort"].as_i64())
        .collect();
    assert!(ports.contains(&i64::from(proxy_port)), "{ports:?}");
    let svc = kind("Service")[0];
    assert_eq!(
        svc["spec"]["ports"][0]["port"].as_i64(),
        Some(i64::from(proxy_port))
    );

    // The app's policy: egress to the proxy's port and DNS only.
    let app_np = kind("NetworkPolicy")
        .into_iter()
        .find(|n| n["metadata"]["name"].as_str() == Some("egress-via-proxy"))
        .unwrap();
    let egress = app_np["spec"]["egress"].as_sequence().unwrap();
    let allowed: Vec<i64> = egress
        .iter()
        .flat_map(|r| r["ports"].as_sequence().unwrap().iter())
        .filter_map(|p| p["port"].as_i64())
        .collect();
    assert_eq!(allowed, [i64::from(proxy_port), 53, 53]);
    assert!(egress
        .iter()
        .all(|r| r["to"].as_sequence().is_some_and(|t| !t.is_empty())));
    let app = deps
        .iter()
        .find(|d| d["metadata"]["name"].as_str() == Some("example-app"))
        .unwrap();
    let env = app["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_sequence()
        .unwrap();
    assert!(env.iter().any(|e| e["name"].as_str() == Some("HTTPS_PROXY")
        && e["value"]
            .as_str()
            .unwrap()
            .ends_with(&format!(":{proxy_port}"))));
}

/// Reload, limits and drain apply to the explicit listener as to the
/// transparent one: a reload's registry decides new requests at once, and
/// its explicit_clients new connections; past max_connections a connection
/// is reset and logged `overload`; after SIGTERM /ready says 503 while new
/// requests are still served, and open tunnels are closed at drain_timeout.
#[test]
fn explicit_reload_limits_and_drain() {
    let world = World::start();
    let base = CONFIG.replace(
        "drain_timeout = \"2s\"",
        "drain_timeout = \"3s\"\nmax_connections = 3",
    );
    let cfg = world.write_file("config.toml", &base);
    let proxy = world.spawn_proxy(&["run", "-c", cfg.to_str().unwrap()]);
    world.wait_tcp(&world.pod, "127.0.0.1:3128".parse().unwrap());
    let mut px = Px { world, proxy };

    // Limits: three open tunnels fill max_connections; the fourth is reset.
    let mut open: Vec<TcpStream> = (0..3)
        .map(|_| {
            let (s, head) = px.connect("api.example.com:7000");
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            s
        })
        .collect();
    assert!(px.try_connect("api.example.com:7000").is_none());
    let l = px.wait_log("overload", |v| v["reason"] == "overload");
    assert_eq!(l["mode"], "explicit");
    open.truncate(1);
    // The two closed tunnels free their slots once their flows end.
    assert!(poll_until(Duration::from_secs(10), || {
        px.lines()
            .iter()
            .filter(|v| authority_is(v, "api.example.com:7000") && v["decision"] == "allow")
            .count()
            >= 2
    }));

    // Reload: the api entry gone, the name is denied before 200.
    let without_api = base
        .replacen("name = \"api\"", "name = \"api-renamed\"", 1)
        .replacen(
            "hosts = [\"api.example.com\"]",
            "hosts = [\"api2.example.com\"]",
            1,
        );
    std::fs::write(&cfg, without_api).unwrap();
    assert!(px.proxy.signal(libc::SIGHUP));
    assert!(
        poll_until(Duration::from_secs(10), || {
            px.try_connect("api.example.com:7000")
                .is_some_and(|(_s, head)| head.starts_with("HTTP/1.1 403"))
        }),
        "the reload did not apply: {}",
        px.proxy.logs(3000)
    );

    // Drain: /ready 503, a new request still served, the open tunnel closed
    // at drain_timeout and logged.
    assert!(px.proxy.signal(libc::SIGTERM));
    let ready = || {
        px.world
            .curl(&[
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "http://127.0.0.1:15021/ready",
            ])
            .stdout
    };
    assert!(poll_until(Duration::from_secs(5), || ready() == "503"));
    let out = px
        .world
        .curl(&["-x", "http://127.0.0.1:3128", "http://api2.example.com/"]);
    // api2 has no DNS record: decided and answered (dns), i.e. still served.
    assert!(out.success(), "{out:?}");
    let t = Instant::now();
    let status = px.proxy.wait_timeout(Duration::from_secs(15));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert!(t.elapsed() < Duration::from_secs(10));
    let l = px.wait_log("tunnel closed by the drain", |v| {
        authority_is(v, "api.example.com:7000") && v["error"].is_string()
    });
    assert_eq!(l["decision"], "allow");
    // Cut, not ended: the client's tunnel is reset (RST), never closed with FIN.
    let t = &mut open[0];
    t.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 64];
    let got = loop {
        match t.read(&mut buf) {
            Ok(n) if n > 0 => continue,
            other => break other,
        }
    };
    assert!(
        matches!(&got, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "a drained tunnel must be reset: {got:?}"
    );
    drop(open);
}

/// Bulk through an explicit tunnel against the transparent path, measured in
/// the same run by the same proxy process (one config with both `listen` and
/// `explicit_listen`, the redirect rules installed by `init`), alternating
/// rounds of 512 MiB downloads with checksums. Figures are printed, never
/// asserted (the machine is shared).
#[test]
fn explicit_tunnel_beside_the_transparent_path() {
    let world = World::start();
    let both = CONFIG.replace(
        "listen = []",
        "listen = [\"127.0.0.1:15001\", \"[::1]:15001\"]",
    ) + "\n[redirect]\nproxy_uid = 1337\nproxy_gid = 1337\n";
    let cfg = world.write_file("config.toml", &both);
    world.init(&cfg);
    let proxy = world.spawn_proxy(&["run", "-c", cfg.to_str().unwrap()]);
    world.wait_tcp(&world.pod, "127.0.0.1:15001".parse().unwrap());
    world.wait_tcp(&world.pod, "127.0.0.1:3128".parse().unwrap());
    let px = Px { world, proxy };
    const N: u64 = 512 << 20;
    let rate = |d: Duration| N as f64 / (1 << 20) as f64 / d.as_secs_f64();
    let (mut explicit, mut transparent) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let (mut s, head) = px.connect("api.example.com:9000");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let t = Instant::now();
        bulk_download(&mut s, N).expect("explicit download");
        explicit.push(rate(t.elapsed()));
        // The test process runs as root: its connection is redirected.
        let mut s = px
            .world
            .pod_connect(sa(addr::API_V4, port::BULK))
            .expect("redirected connect");
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let t = Instant::now();
        bulk_download(&mut s, N).expect("transparent download");
        transparent.push(rate(t.elapsed()));
    }
    let modes = || -> Vec<String> {
        px.lines()
            .iter()
            .filter(|v| v["bytes_down"].as_u64() == Some(N))
            .map(|v| v["mode"].as_str().unwrap_or("?").to_string())
            .collect()
    };
    poll_until(Duration::from_secs(10), || modes().len() == 6);
    let modes = modes();
    assert_eq!(
        modes.iter().filter(|m| *m == "transparent").count(),
        3,
        "{modes:?}"
    );
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[1]
    };
    let (e, t) = (median(&mut explicit), median(&mut transparent));
    eprintln!(
        "512 MiB downloads, median of 3: explicit tunnel {e:.0} MiB/s, transparent {t:.0} MiB/s, ratio {:.2} (rounds: explicit {explicit:.0?}, transparent {transparent:.0?})",
        e / t
    );
}

/// Under ALLOW_ANY and under audit, unlisted names pass (logged as
/// passthrough / audit), but the explicit path still never dials loopback or
/// link-local addresses, nor an IP literal naming them.
#[test]
fn explicit_allow_any_and_audit_never_dial_inward() {
    let world = World::builder()
        .add_dns(&[
            ("loop.example.com", "127.0.0.1"),
            ("metadata.example.com", "169.254.169.254"),
        ])
        .start();
    let allow_any = format!("outbound_traffic_policy = \"ALLOW_ANY\"\n{CONFIG}");
    let cfg = world.write_file("config.toml", &allow_any);
    let proxy = world.spawn_proxy(&["run", "-c", cfg.to_str().unwrap()]);
    world.wait_tcp(&world.pod, "127.0.0.1:3128".parse().unwrap());
    let mut px = Px { world, proxy };
    let proxy_url = "http://127.0.0.1:3128";

    for (policy, decision) in [("ALLOW_ANY", "passthrough"), ("audit", "audit")] {
        if policy == "audit" {
            std::fs::write(&cfg, format!("audit = true\n{CONFIG}")).unwrap();
            assert!(px.proxy.signal(libc::SIGHUP));
            assert!(
                px.proxy.wait_output("reload", Duration::from_secs(10)),
                "{}",
                px.proxy.logs(2000)
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        // An unlisted name passes, by CONNECT and by absolute-form.
        let out = px.curl(&["-x", proxy_url, "https://www.example.org/"]);
        assert!(out.ok().starts_with("tls ok"), "{policy}: {out:?}");
        let out = px.curl(&["-x", proxy_url, "http://www.example.org/"]);
        assert!(out.ok().starts_with("http ok"), "{policy}: {out:?}");
        let l = px.wait_log("unlisted", |v| {
            authority_is(v, "www.example.org:80") && v["decision"] == decision
        });
        assert_eq!(l["reason"], "not_in_registry", "{policy}");
        // Inward addresses never, by name or by literal.
        for a in [
            "loop.example.com:7000",
            "metadata.example.com:7000",
            "127.0.0.1:15000",
            "169.254.169.254:80",
            "[::1]:15000",
        ] {
            let (_s, head) = px.connect(a);
            assert!(head.starts_with("HTTP/1.1 403"), "{policy} {a}: {head}");
            assert!(head.contains("forbidden_address"), "{policy} {a}: {head}");
        }
        let out = px.curl(&["-x", proxy_url, "-i", "http://127.0.0.1:15000/config"]);
        assert!(out.stdout.starts_with("HTTP/1.1 403"), "{policy}: {out:?}");
        // An entry's HTTP port: 200, then the request inside is refused.
        let (mut s, head) = px.connect("metadata.example.com:80");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        s.write_all(b"GET / HTTP/1.1\r\nHost: metadata.example.com\r\n\r\n")
            .unwrap();
        let (head, body) = read_response(&mut s);
        assert!(head.starts_with("HTTP/1.1 403"), "{policy}: {head}");
        assert!(body.contains("forbidden_address"), "{policy}: {body}");
    }
}
