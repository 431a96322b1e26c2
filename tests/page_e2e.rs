//! The traffic page end to end (docs/DESIGN.md §4): allowed, denied and
//! audit flows through the proxy in a namespace world, then a real browser
//! (Debian's headless Chromium, started in the pod namespace and driven
//! through its DevTools protocol) loads the admin listener's page; the test
//! reads the rendered DOM and compares it with the access log, saves a
//! screenshot, and checks that new flows change the open document without a
//! navigation. Also `portcullis status` and the admin listener's Host check.

mod common;

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const ADMIN: &str = "127.0.0.1:15000";
const DEVTOOLS_PORT: u16 = 9222;

const ENTRIES: &str = concat!(
    api_entry!(),
    files_entry!(),
    r#"
[[service_entry]]
name = "idle-backend"
addresses = ["198.51.100.7/32"]
ports = [{ number = 7000, protocol = "TCP" }]
"#
);

fn config(audit: bool) -> String {
    proxy_config(
        &format!("outbound_traffic_policy = \"REGISTRY_ONLY\"\naudit = {audit}"),
        &format!("admin = \"{ADMIN}\"\ndrain_timeout = \"1s\""),
        ENTRIES,
    )
}

/// A world with the proxy running in the pod, its access log on stdout.
struct Pod {
    world: World,
    proxy: Proc,
    cfg: PathBuf,
}

impl Pod {
    fn start() -> Pod {
        Pod::start_with(&config(false))
    }

    fn start_with(text: &str) -> Pod {
        let world = World::start();
        let cfg = world.write_file("config.toml", text);
        world.init(&cfg);
        let proxy = world.spawn_proxy(&["run", "-c", cfg.to_str().unwrap()]);
        world.wait_tcp(&world.pod, "127.0.0.1:15001".parse().unwrap());
        world.wait_tcp(&world.pod, ADMIN.parse().unwrap());
        let pod = Pod { world, proxy, cfg };
        let ok = poll_until(Duration::from_secs(10), || {
            pod.get("/ready").is_ok_and(|(c, _, _)| c == 200)
        });
        assert!(ok, "never ready\n{}", pod.proxy.logs(4000));
        pod
    }

    /// GET from inside the pod with the given Host (default: the address).
    fn get_host(&self, path: &str, host: &str) -> io::Result<(u16, String, String)> {
        http_get_host(&self.world.pod, ADMIN, path, host)
    }

    fn get(&self, path: &str) -> io::Result<(u16, String, String)> {
        self.get_host(path, ADMIN)
    }

    /// curl from the pod as root (redirected to the proxy); the result is
    /// not asserted: denied flows fail by design.
    fn flow(&self, url: &str) {
        let _ = self.world.curl(&["-o", "/dev/null", url]);
    }

    /// The access log once it holds `n` lines (and no more appear for a moment).
    #[track_caller]
    fn log(&mut self, n: usize) -> Vec<Value> {
        let lines = self.proxy.wait_stdout_lines(n, Duration::from_secs(15));
        assert!(
            lines.len() >= n,
            "wanted {n} access-log lines, got {lines:?}\n{}",
            self.proxy.logs(4000)
        );
        std::thread::sleep(Duration::from_millis(300));
        let lines = parse_log(self.proxy.stdout().lines());
        assert_eq!(lines.len(), n, "unexpected flows: {lines:#?}");
        lines
    }

    /// Rewrites the config (audit on) and reloads with SIGHUP.
    fn reload_audit(&mut self) {
        let tmp = self.cfg.with_extension("tmp");
        std::fs::write(&tmp, config(true)).unwrap();
        set_mode(&tmp, 0o644);
        std::fs::rename(&tmp, &self.cfg).unwrap();
        assert!(self.proxy.signal(libc::SIGHUP));
        let ok = poll_until(Duration::from_secs(10), || {
            self.get("/api/summary")
                .ok()
                .and_then(|(_, _, b)| serde_json::from_str::<Value>(&b).ok())
                .is_some_and(|s| s["audit"] == json!(true))
        });
        assert!(ok, "the reload never took\n{}", self.proxy.logs(4000));
    }
}

/// Per entry label (entry, or BlackHole / Passthrough), what the access log
/// says: flows by decision, bytes up and down.
#[derive(Debug, Default, Clone, PartialEq)]
struct Seen {
    flows: BTreeMap<String, u64>,
    total: u64,
    up: u64,
    down: u64,
}

fn by_entry(log: &[Value]) -> BTreeMap<String, Seen> {
    let mut out: BTreeMap<String, Seen> = BTreeMap::new();
    for l in log {
        let decision = l["decision"].as_str().unwrap().to_string();
        let entry = match l["entry"].as_str() {
            Some(e) => e.to_string(),
            None if decision == "deny" => "BlackHole".into(),
            None => "Passthrough".into(),
        };
        let s = out.entry(entry).or_default();
        *s.flows.entry(decision).or_default() += 1;
        s.total += 1;
        s.up += l["bytes_up"].as_u64().unwrap();
        s.down += l["bytes_down"].as_u64().unwrap();
    }
    out
}

// ------------------------------------------------------------ Chromium

/// Headless Chromium in the pod namespace (as root: its flows, if it made
/// any, would show in the access log, which the tests compare exactly),
/// with the DevTools protocol on 127.0.0.1:9222.
struct Browser {
    _proc: Proc,
    cdp: Cdp,
}

impl Browser {
    fn start(world: &World) -> Browser {
        let profile = world.path("chromium-profile");
        let _ = std::fs::create_dir_all(&profile);
        let proc = world.spawn_pod(Cmd::new("chromium").label("chromium").args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--disable-default-apps",
            "--hide-scrollbars",
            "--window-size=1400,1000",
            "--remote-debugging-address=127.0.0.1",
            &format!("--remote-debugging-port={DEVTOOLS_PORT}"),
            &format!("--user-data-dir={}", profile.display()),
            "about:blank",
        ]));
        assert!(
            wait_tcp_in(
                &world.pod,
                format!("127.0.0.1:{DEVTOOLS_PORT}").parse().unwrap(),
                Duration::from_secs(30)
            ),
            "chromium's DevTools port never opened\n{}",
            proc.logs(4000)
        );
        let cdp = Cdp::connect(&world.pod);
        Browser { _proc: proc, cdp }
    }
}

/// A DevTools protocol session on the browser's first page.
struct Cdp {
    ws: tungstenite::WebSocket<TcpStream>,
    next: u64,
}

impl Cdp {
    fn connect(ns: &str) -> Cdp {
        let addr = format!("127.0.0.1:{DEVTOOLS_PORT}");
        let mut targets = Value::Null;
        let ok = poll_until(Duration::from_secs(20), || {
            let Ok(mut s) = connect_in(ns, addr.parse().unwrap(), Duration::from_secs(5)) else {
                return false;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            // Chromium's DevTools server speaks HTTP/1.1 only, and may keep
            // the connection open: read the head, then Content-Length bytes.
            let _ = write!(
                s,
                "GET /json/list HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
            );
            let mut raw = Vec::new();
            let mut buf = [0u8; 4096];
            let body = loop {
                let text = String::from_utf8_lossy(&raw).into_owned();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(usize::MAX);
                    if body.len() >= len {
                        break body.to_string();
                    }
                }
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break String::new(),
                    Ok(n) => raw.extend_from_slice(&buf[..n]),
                }
            };
            targets = serde_json::from_str(&body).unwrap_or(Value::Null);
            targets
                .as_array()
                .is_some_and(|a| a.iter().any(|t| t["type"] == "page"))
        });
        assert!(ok, "no page target in {targets}");
        let url = targets
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page")
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .unwrap()
            .to_string();
        let stream = connect_in(ns, addr.parse().unwrap(), Duration::from_secs(5)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let (ws, _) = tungstenite::client(url.as_str(), stream).expect("websocket handshake");
        Cdp { ws, next: 1 }
    }

    /// Sends a command; returns its result (events in between are skipped).
    #[track_caller]
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next;
        self.next += 1;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.ws.send(tungstenite::Message::text(msg)).unwrap();
        loop {
            let m = self.ws.read().unwrap_or_else(|e| panic!("{method}: {e}"));
            let tungstenite::Message::Text(t) = m else {
                continue;
            };
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["id"] == json!(id) {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluates a JavaScript expression in the page; its value.
    #[track_caller]
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
        );
        assert!(r.get("exceptionDetails").is_none(), "{expr}: {r}");
        r["result"]["value"].clone()
    }

    /// The loader (document) id of the main frame: changes on any navigation.
    fn loader_id(&mut self) -> String {
        let t = self.call("Page.getFrameTree", json!({}));
        t["frameTree"]["frame"]["loaderId"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn updates(&mut self) -> u64 {
        self.eval("Number(document.body && document.body.dataset.updates || 0)")
            .as_u64()
            .unwrap_or(0)
    }

    /// Waits until the page has rendered at least `n` answers.
    #[track_caller]
    fn wait_updates(&mut self, n: u64) {
        let t = Instant::now();
        while self.updates() < n {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "the page never rendered {n} updates: {}",
                self.eval("document.getElementById('updated').textContent")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn screenshot(&mut self, path: &Path) {
        let height = self
            .eval("Math.ceil(document.documentElement.scrollHeight)")
            .as_u64()
            .unwrap_or(1800)
            .clamp(600, 4000);
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1400, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        );
        let r = self.call("Page.captureScreenshot", json!({"format": "png"}));
        let png = base64_decode(r["data"].as_str().unwrap());
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
        eprintln!("screenshot: {}", path.display());
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter_map(val) {
        acc = (acc << 6) | c;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// What the rendered entries table says: name -> (column class -> text).
const READ_ENTRIES: &str = r#"JSON.stringify(Array.from(document.querySelectorAll('#entries tr.entry-row')).map(tr => {
  const o = {name: tr.dataset.entry};
  for (const c of ['flows', 'allow', 'deny', 'audit', 'passthrough', 'bytes-up', 'bytes-down', 'denials']) {
    const td = tr.querySelector('td.' + c);
    o[c] = td.textContent;
    if (td.title) o[c + '-title'] = td.title;
  }
  return o;
}))"#;

const READ_DENIED: &str = r#"JSON.stringify(Array.from(document.querySelectorAll('#denied tr.denied-row')).map(tr => ({
  name: tr.dataset.name,
  count: tr.querySelector('td.count').textContent,
  deny: tr.querySelector('td.deny').textContent,
  audit: tr.querySelector('td.audit').textContent,
  toml: (tr.querySelector('pre.toml') || {}).textContent || null,
})))"#;

fn rows(cdp: &mut Cdp, expr: &str) -> Vec<Value> {
    let text = cdp.eval(expr);
    serde_json::from_str(text.as_str().unwrap()).unwrap()
}

fn row<'a>(rows: &'a [Value], key: &str, name: &str) -> &'a Value {
    rows.iter()
        .find(|r| r[key] == json!(name))
        .unwrap_or_else(|| panic!("no row {name:?} in {rows:#?}"))
}

/// en-US grouping, as the page prints counts.
fn grouped(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Every entry the access log names is on the page with the same flows per
/// decision and the same bytes; Err says what differs.
fn matches_log(entries: &[Value], log: &[Value]) -> Result<(), String> {
    for (name, seen) in by_entry(log) {
        let r = entries
            .iter()
            .find(|r| r["name"] == json!(name))
            .ok_or_else(|| format!("no row {name:?}"))?;
        let mut want = vec![("flows", grouped(seen.total))];
        for d in ["allow", "deny", "audit", "passthrough"] {
            want.push((d, grouped(seen.flows.get(d).copied().unwrap_or(0))));
        }
        want.push(("bytes-up-title", format!("{} bytes", grouped(seen.up))));
        want.push(("bytes-down-title", format!("{} bytes", grouped(seen.down))));
        for (k, v) in want {
            if r[k] != json!(v) {
                return Err(format!("{name} {k}: page {} vs log {v}: {r}", r[k]));
            }
        }
    }
    Ok(())
}

#[track_caller]
fn assert_matches_log(entries: &[Value], log: &[Value]) {
    if let Err(e) = matches_log(entries, log) {
        panic!("{e}\n{entries:#?}");
    }
}

fn artefact(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("page_e2e")
        .join(name)
}

/// Phase 1 traffic (REGISTRY_ONLY): 4 allowed flows, 2 denied.
fn allowed_and_denied(pod: &mut Pod) -> Vec<Value> {
    pod.flow("https://api.example.com/");
    pod.flow("https://api.example.com/");
    pod.flow("http://api.example.com/bytes/20000");
    pod.flow("https://a.files.example.com/");
    pod.flow("https://www.example.org/");
    pod.flow("http://other.example.net/");
    let log = pod.log(6);
    let seen = by_entry(&log);
    assert_eq!(seen["api"].flows["allow"], 3, "{log:#?}");
    assert!(seen["api"].down > 20000, "{log:#?}");
    assert_eq!(seen["files"].flows["allow"], 1, "{log:#?}");
    assert_eq!(seen["BlackHole"].flows["deny"], 2, "{log:#?}");
    log
}

#[test]
fn page_renders_the_traffic_of_the_access_log() {
    let mut pod = Pod::start();
    let log = allowed_and_denied(&mut pod);

    let mut b = Browser::start(&pod.world);
    let nav = b
        .cdp
        .call("Page.navigate", json!({"url": format!("http://{ADMIN}/")}));
    assert!(nav.get("errorText").is_none(), "{nav}");
    b.cdp.wait_updates(1);
    // what the first answer rendered, against the access log
    let entries = rows(&mut b.cdp, READ_ENTRIES);
    assert_matches_log(&entries, &log);
    // the registry's idle entry is listed too, with no flows
    let idle = row(&entries, "name", "idle-backend");
    assert_eq!(idle["flows"], json!("0"), "{idle}");
    assert_eq!(
        row(&entries, "name", "BlackHole")["denials"],
        json!("not_in_registry 2")
    );
    // graph nodes: the entries that carried traffic and the catch-alls
    let nodes = b.cdp.eval(
        "JSON.stringify(Array.from(document.querySelectorAll('#graph g.node[data-node]')).map(g => g.dataset.node))",
    );
    let nodes: Vec<String> = serde_json::from_str(nodes.as_str().unwrap()).unwrap();
    for n in ["api", "files", "BlackHole", "Passthrough"] {
        assert!(nodes.iter().any(|x| x == n), "{n} not drawn: {nodes:?}");
    }
    let edges = b
        .cdp
        .eval("document.querySelectorAll('#graph path.edge.deny').length");
    assert_eq!(edges, json!(1), "one deny edge, to BlackHole");
    // the denied names, each with the TOML /denied?format=toml gives
    let denied = rows(&mut b.cdp, READ_DENIED);
    let (_, _, all_toml) = pod.get("/denied?format=toml").unwrap();
    for name in ["www.example.org", "other.example.net"] {
        let r = row(&denied, "name", name);
        assert_eq!(r["count"], json!("1"), "{r}");
        assert_eq!(r["deny"], json!("1"), "{r}");
        let toml = r["toml"].as_str().unwrap();
        assert!(toml.contains(&format!("hosts = [\"{name}\"]")), "{toml}");
        assert!(all_toml.contains(toml), "{toml}\nnot in\n{all_toml}");
    }
    assert_eq!(
        b.cdp.eval("document.getElementById('policy').textContent"),
        json!("REGISTRY_ONLY")
    );
    assert_eq!(
        b.cdp.eval("document.getElementById('audit').textContent"),
        json!("off")
    );
    // no flow of the browser's own went through the proxy meanwhile
    assert_eq!(pod.proxy.stdout().lines().count(), log.len());

    let html = b.cdp.eval("document.documentElement.outerHTML");
    let html = html.as_str().unwrap();
    for n in [
        "api.example.com",
        "*.files.example.com",
        "www.example.org",
        "idle-backend",
    ] {
        assert!(html.contains(n), "{n} not in the DOM");
    }
    std::fs::create_dir_all(artefact("")).unwrap();
    std::fs::write(artefact("traffic-page.html"), html).unwrap();
    // one service entry unfolded, as an operator would before copying it
    b.cdp
        .eval("document.querySelector('#denied tr[data-name=\"www.example.org\"] details').open = true; 1");
    b.cdp.screenshot(&artefact("traffic-page.png"));
}

#[test]
fn page_updates_in_place_when_new_flows_arrive() {
    let mut pod = Pod::start();
    let log = allowed_and_denied(&mut pod);

    let mut b = Browser::start(&pod.world);
    b.cdp.call("Page.enable", json!({}));
    b.cdp
        .call("Page.navigate", json!({"url": format!("http://{ADMIN}/")}));
    b.cdp.wait_updates(1);
    let loader = b.cdp.loader_id();
    let history = b.cdp.call("Page.getNavigationHistory", json!({}));
    // a mark on this document: a reload or navigation would lose it
    b.cdp.eval("window.__portcullis_test = 'same document'; 1");
    let before = rows(&mut b.cdp, READ_ENTRIES);
    assert_matches_log(&before, &log);
    assert!(rows(&mut b.cdp, READ_DENIED)
        .iter()
        .all(|r| r["audit"] == json!("0")));
    let updates = b.cdp.updates();

    // new flows: the registry in audit mode, two more allowed, one audited
    pod.reload_audit();
    pod.flow("https://api.example.com/");
    pod.flow("https://api.example.com/");
    pod.flow("https://www.example.org/");
    let log = pod.log(9);
    assert_eq!(log[8]["decision"], "audit", "{log:#?}");

    // the open page shows them without being reloaded
    let t = Instant::now();
    let after = loop {
        let r = rows(&mut b.cdp, READ_ENTRIES);
        // (a poll may land while the last flow still moves bytes: wait
        // until the page agrees with the whole log)
        if r != before && matches_log(&r, &log).is_ok() {
            break r;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the page never changed: {r:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_matches_log(&after, &log);
    assert_eq!(row(&after, "name", "api")["allow"], json!("5"));
    let denied = rows(&mut b.cdp, READ_DENIED);
    let org = row(&denied, "name", "www.example.org");
    assert_eq!(org["audit"], json!("1"), "{org}");
    assert_eq!(org["count"], json!("2"), "{org}");
    assert_eq!(org["deny"], json!("1"), "{org}");
    assert_eq!(
        b.cdp.eval("document.getElementById('audit').textContent"),
        json!("on")
    );

    assert!(b.cdp.updates() > updates);
    assert_eq!(b.cdp.loader_id(), loader, "the document was replaced");
    assert_eq!(
        b.cdp.eval("window.__portcullis_test"),
        json!("same document")
    );
    let history_after = b.cdp.call("Page.getNavigationHistory", json!({}));
    assert_eq!(history_after, history, "a navigation happened");
    b.cdp
        .eval("document.querySelector('#denied tr[data-name=\"www.example.org\"] details').open = true; 1");
    b.cdp.screenshot(&artefact("traffic-page-after-audit.png"));
}

/// Sets a search box's value as typing would (an `input` event).
fn type_into(cdp: &mut Cdp, id: &str, text: &str) {
    cdp.eval(&format!(
        "(() => {{ const e = document.getElementById('{id}'); e.value = {}; e.dispatchEvent(new Event('input')); return 1; }})()",
        json!(text)
    ));
}

#[track_caller]
fn wait_text(cdp: &mut Cdp, expr: &str, want: impl Fn(&str) -> bool) -> String {
    let t = Instant::now();
    loop {
        let v = cdp.eval(expr);
        let s = v.as_str().unwrap_or_default().to_string();
        if want(&s) {
            return s;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "{expr}: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn page_stays_readable_with_hundreds_of_entries_and_thousands_of_names() {
    const ENTRIES_N: usize = 300;
    const NAMES_N: usize = 2000;
    let mut text = config(false);
    for i in 0..ENTRIES_N {
        text.push_str(&format!(
            "\n[[service_entry]]\nname = \"svc-{i}\"\nhosts = [\"svc-{i}.example.com\"]\nports = [{{ number = 443, protocol = \"TLS\" }}]\n"
        ));
    }
    // entry names come from the config and may hold anything: text, never HTML
    text.push_str(
        "\n[[service_entry]]\nname = \"<img src=x id=pwned>\"\nhosts = [\"markup.example.com\"]\nports = [{ number = 443, protocol = \"TLS\" }]\n",
    );
    let mut pod = Pod::start_with(&text);
    pod.flow("https://api.example.com/");
    // thousands of names a client invents, each denied
    let t = Instant::now();
    for i in 0..NAMES_N {
        let mut s = pod.world.pod_connect(sa(addr::ORG_V4, port::HTTP)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET / HTTP/1.1\r\nHost: n{i}.example\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        assert!(
            answer.starts_with(b"HTTP/1.1 403"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }
    eprintln!("{NAMES_N} denied flows in {:?}", t.elapsed());
    let log = pod.log(1 + NAMES_N);

    // what the API costs at this size (figures, not asserted)
    for path in [
        "/api/summary",
        "/api/denied",
        "/api/denied?q=n1234.&limit=50",
    ] {
        let out = pod.world.run_pod(Cmd::new("curl").args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download} %{time_total}",
            &format!("http://{ADMIN}{path}"),
        ]));
        eprintln!("GET {path}: status, bytes, seconds = {}", out.ok());
    }

    let mut b = Browser::start(&pod.world);
    b.cdp
        .call("Page.navigate", json!({"url": format!("http://{ADMIN}/")}));
    b.cdp.wait_updates(1);
    let entries = rows(&mut b.cdp, READ_ENTRIES);
    assert_eq!(entries.len(), 100, "top 100 entries, busiest first");
    assert_eq!(entries[0]["name"], json!("BlackHole"));
    assert_matches_log(&entries[..2], &log);
    let count = b
        .cdp
        .eval("document.getElementById('entry-count').textContent");
    assert_eq!(
        count,
        json!(format!(
            "showing 100 of {} ({} in all)",
            ENTRIES_N + 6,
            ENTRIES_N + 6
        ))
    );
    // the filter finds an idle entry far down the list
    type_into(&mut b.cdp, "entry-filter", "svc-250.");
    let names = wait_text(
        &mut b.cdp,
        "Array.from(document.querySelectorAll('#entries tr.entry-row')).map(r => r.dataset.entry).join(' ')",
        |s| s == "svc-250",
    );
    assert_eq!(names, "svc-250");
    type_into(&mut b.cdp, "entry-filter", "pwned");
    wait_text(
        &mut b.cdp,
        "Array.from(document.querySelectorAll('#entries tr.entry-row')).map(r => r.dataset.entry + '|' + r.querySelector('td.name').textContent).join(' ')",
        |s| s == "<img src=x id=pwned>|<img src=x id=pwned>",
    );
    assert_eq!(
        b.cdp.eval("document.getElementById('pwned') === null && document.querySelectorAll('main img').length === 0"),
        json!(true),
        "an entry name became markup"
    );

    // names: the top 50 of 2000, and the search box asks the server
    let denied = rows(&mut b.cdp, READ_DENIED);
    assert_eq!(denied.len(), 50);
    let count = b
        .cdp
        .eval("document.getElementById('denied-count').textContent");
    assert_eq!(
        count,
        json!(format!("showing 50 of {NAMES_N} matching names ({NAMES_N} names in 2,000 records held, at most 4,096)"))
    );
    type_into(&mut b.cdp, "denied-filter", "N1234.");
    let found = wait_text(
        &mut b.cdp,
        "Array.from(document.querySelectorAll('#denied tr.denied-row')).map(r => r.dataset.name).join(' ')",
        |s| s == "n1234.example",
    );
    assert_eq!(found, "n1234.example");
    let r = rows(&mut b.cdp, READ_DENIED);
    assert!(r[0]["toml"]
        .as_str()
        .unwrap()
        .contains("hosts = [\"n1234.example\"]\nports = [{ number = 80, protocol = \"HTTP\" }]"));
    b.cdp.screenshot(&artefact("traffic-page-many.png"));
}

#[test]
fn status_prints_the_summary_and_the_admin_listener_checks_host() {
    let mut pod = Pod::start();
    let log = allowed_and_denied(&mut pod);
    let seen = by_entry(&log);

    let out = pod
        .world
        .portcullis(&["status", "--url", &format!("http://{ADMIN}")]);
    let text = out.ok().to_string();
    eprintln!("{text}");
    // the entry table: name, kind, flows, allow, deny, audit, pass, bytes up, bytes down
    let line = |name: &str| -> Vec<String> {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no line for {name} in\n{text}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    for (name, s) in &seen {
        let l = line(name);
        assert_eq!(l[2], s.total.to_string(), "{name}: {l:?}");
        assert_eq!(l[3], s.flows.get("allow").copied().unwrap_or(0).to_string());
        assert_eq!(l[4], s.flows.get("deny").copied().unwrap_or(0).to_string());
        assert_eq!(l[7], s.up.to_string(), "{name}: {l:?}");
        assert_eq!(l[8], s.down.to_string(), "{name}: {l:?}");
    }
    assert_eq!(line("BlackHole")[9], "not_in_registry=2");
    assert!(
        text.contains("policy REGISTRY_ONLY, audit off, ready"),
        "{text}"
    );
    // idle-backend and Passthrough
    assert!(
        text.contains("(2 entries without flows not shown"),
        "{text}"
    );
    assert!(
        text.contains("total: 6 flows (allow 4, deny 2, audit 0, passthrough 0)"),
        "{text}"
    );
    let org = line("www.example.org");
    assert_eq!(org[1..5], ["1", "1", "0", "443/tls"], "{org:?}");
    assert_eq!(line("other.example.net")[4], "80/http");
    // --all lists the idle entry; localhost works; names are refused
    let all = pod
        .world
        .portcullis(&["status", "--all", "--url", "http://localhost:15000"]);
    assert!(
        all.ok().lines().any(|l| l.starts_with("idle-backend ")),
        "{all:?}"
    );
    let named = pod
        .world
        .portcullis(&["status", "--url", "http://admin.example:15000"]);
    assert!(!named.success());
    assert!(named.stderr.contains("no name lookups"), "{named:?}");
    let closed = pod
        .world
        .portcullis(&["status", "--url", "http://127.0.0.1:9"]);
    assert!(!closed.success());
    assert!(closed.stderr.contains("refused"), "{closed:?}");

    // Host check: loopback literals and localhost, any port
    for host in [
        "127.0.0.1:15000",
        "localhost:15000",
        "localhost",
        "[::1]:8080",
        "127.0.0.1",
    ] {
        let (code, _, _) = pod.get_host("/api/summary", host).unwrap();
        assert_eq!(code, 200, "Host: {host}");
    }
    for host in [
        "evil.example",
        "evil.example:15000",
        "192.0.2.2:15000",
        "localhost.evil.example",
    ] {
        for path in ["/", "/api/summary", "/denied", "/metrics"] {
            let (code, _, body) = pod.get_host(path, host).unwrap();
            assert_eq!(code, 421, "Host: {host} {path}: {body}");
            assert!(!body.contains("api.example.com"), "{body}");
        }
    }
    // curl as a browser would send it, with an Origin: no CORS answer
    let out = pod.world.run_pod(Cmd::new("curl").args([
        "-sS",
        "-D",
        "-",
        "-o",
        "/dev/null",
        "-H",
        "Origin: http://evil.example",
        "-H",
        "Host: evil.example",
        &format!("http://{ADMIN}/api/summary"),
    ]));
    let head = out.ok().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 421"), "{head}");
    let (code, head, body) = pod.get("/").unwrap();
    assert_eq!(code, 200);
    assert!(
        head.contains("content-security-policy: default-src 'self'"),
        "{head}"
    );
    assert!(!head.contains("access-control-allow"), "{head}");
    assert!(
        !body.contains("<script>") && !body.contains("<style"),
        "inline code: {body}"
    );
    assert!(body.contains("<script src=\"app.js\""), "{body}");
    // the time series: entries that carried traffic
    let series = poll_until(Duration::from_secs(15), || {
        pod.get("/api/series")
            .ok()
            .and_then(|(_, _, b)| serde_json::from_str::<Value>(&b).ok())
            .is_some_and(|v| {
                v["interval_s"] == json!(5)
                    && v["entries"]["api"]
                        .as_array()
                        .is_some_and(|a| !a.is_empty())
            })
    });
    assert!(series, "{:?}", pod.get("/api/series"));
    assert_eq!(pod.get("/api/series?entry=idle-backend").unwrap().0, 404);
    let (code, head, _) = pod.get("/app.js").unwrap();
    assert_eq!(code, 200);
    assert!(head.contains("content-type: text/javascript"), "{head}");
    // the health listener (probed from other hosts) has no Host check
    let mut s = connect_in(
        &pod.world.pod,
        "127.0.0.1:15021".parse().unwrap(),
        Duration::from_secs(5),
    )
    .unwrap();
    write!(s, "GET /ready HTTP/1.0\r\nHost: 192.0.2.2:15021\r\n\r\n").unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).unwrap();
    assert!(r.starts_with("HTTP/1.0 200"), "{r}");
}
