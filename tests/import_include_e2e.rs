//! `include` while the proxy runs, in a namespace world: entries from an
//! included TOML fragment and from a ConfigMap-style volume of Istio YAML
//! serve at start; a `..data` symlink swap of that volume allows a flow that
//! was denied before (and `/denied?format=toml` stops offering it); a bad
//! included file on reload is reported with its file and line and the running
//! config stays.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const LISTEN: &str = "127.0.0.1:15001";
const HEALTH: &str = "127.0.0.1:15021";
const ADMIN: &str = "127.0.0.1:15000";

/// A ConfigMap volume of Istio YAML, updated as kubelet does: a new
/// timestamped directory, a new `..data` symlink renamed over the old one,
/// the old directory removed; `x.yaml -> ..data/x.yaml` never changes.
struct Volume {
    dir: PathBuf,
    current: Option<String>,
    n: usize,
}

impl Volume {
    fn new(dir: PathBuf, files: &[(&str, &str)]) -> Volume {
        std::fs::create_dir_all(&dir).unwrap();
        set_mode(&dir, 0o755);
        let mut v = Volume {
            dir,
            current: None,
            n: 0,
        };
        v.update(files);
        for (f, _) in files {
            std::os::unix::fs::symlink(format!("..data/{f}"), v.dir.join(f)).unwrap();
        }
        v
    }

    fn update(&mut self, files: &[(&str, &str)]) {
        self.n += 1;
        let ts = format!("..2026_12_02_06_00_{:02}.{:09}", self.n, self.n);
        let d = self.dir.join(&ts);
        std::fs::create_dir(&d).unwrap();
        set_mode(&d, 0o755);
        for (f, text) in files {
            std::fs::write(d.join(f), text).unwrap();
            set_mode(&d.join(f), 0o644);
        }
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&ts, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        if let Some(old) = self.current.replace(ts) {
            std::fs::remove_dir_all(self.dir.join(old)).unwrap();
        }
    }
}

const SE_HTTP: &str = r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: api-http
  namespace: shop
spec:
  hosts:
  - api.example.com
  ports:
  - number: 80
    name: http
    protocol: HTTP
  resolution: DNS
"#;

/// www.example.org over TLS, as Istio users write it: no resolution (NONE,
/// Istio's default), which the include reads as DNS.
const SE_ORG: &str = r#"---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: org
  namespace: shop
spec:
  host: www.example.org
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: org
  namespace: shop
spec:
  hosts:
  - www.example.org
  ports:
  - number: 443
    name: https
    protocol: HTTPS
"#;

const SE_UNSAFE: &str = r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: mongo-any
  namespace: shop
spec:
  hosts:
  - mongo.example.com
  ports:
  - number: 27017
    name: mongo
    protocol: MONGO
"#;

struct Run {
    world: World,
    proxy: Proc,
}

impl Run {
    fn pod(&self) -> &str {
        &self.world.pod
    }
    fn admin_json(&self, path: &str) -> Value {
        let (code, body) = http_get(self.pod(), ADMIN, path).unwrap();
        assert_eq!(code, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    }
    fn admin_text(&self, path: &str) -> String {
        let (code, body) = http_get(self.pod(), ADMIN, path).unwrap();
        assert_eq!(code, 200, "{path}: {body}");
        body
    }
    fn curl_ok(&self, url: &str, want: &str) -> bool {
        self.world.curl(&["-4", url]).stdout.contains(want)
    }
    /// Waits until `/config` reports the `n`-th reload with `result`.
    #[track_caller]
    fn wait_reload(&self, result: &str, n: u64) -> Value {
        let mut last = Value::Null;
        let ok = poll_until(Duration::from_secs(15), || {
            let (c, body) = match http_get(self.pod(), ADMIN, "/metrics") {
                Ok(x) => x,
                Err(_) => return false,
            };
            let line = format!("portcullis_config_reloads_total{{result=\"{result}\"}} {n}");
            if c == 200 && body.lines().any(|l| l == line) {
                last = self.admin_json("/config");
                return true;
            }
            false
        });
        assert!(
            ok,
            "no {n}th reload with result {result}\n{}",
            self.proxy.logs(4000)
        );
        last
    }
}

fn source_of<'a>(cfg: &'a Value, name: &str) -> (&'a str, u64) {
    let e = cfg["config"]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no entry {name}: {cfg}"));
    (e["source"].as_str().unwrap(), e["line"].as_u64().unwrap())
}

#[test]
fn include_serves_at_start_follows_a_configmap_swap_and_keeps_the_old_config_on_a_bad_file() {
    let world = World::start();
    let etc = world.path("etc");
    std::fs::create_dir_all(etc.join("entries")).unwrap();
    set_mode(&etc, 0o755);
    set_mode(&etc.join("entries"), 0o755);
    let frag = etc.join("entries/backend.toml");
    std::fs::write(
        &frag,
        "# echo backend by address\n[[service_entry]]\nname = \"backend\"\naddresses = [\"198.51.100.7/32\"]\nports = [{ number = 7000, protocol = \"TCP\" }]\n",
    )
    .unwrap();
    set_mode(&frag, 0o644);
    let mut vol = Volume::new(etc.join("istio"), &[("shop.yaml", SE_HTTP)]);
    let cfg = etc.join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "include = [\"entries/*.toml\", \"istio/*.yaml\"]\n\n[proxy]\nlisten = [\"{LISTEN}\", \"[::1]:15001\"]\nhealth = \"{HEALTH}\"\nadmin = \"{ADMIN}\"\nhello_timeout = \"2s\"\nconnect_timeout = \"2s\"\ndrain_min = \"0s\"\ndrain_timeout = \"2s\"\n\n[redirect]\nproxy_uid = 1337\nproxy_gid = 1337\n"
        ),
    )
    .unwrap();
    set_mode(&cfg, 0o644);

    world.init(&cfg);
    let proxy = world.spawn_proxy(&["run", "-c", cfg.to_str().unwrap()]);
    world.wait_tcp(&world.pod, LISTEN.parse().unwrap());
    world.wait_tcp(&world.pod, ADMIN.parse().unwrap());
    let run = Run { world, proxy };
    assert!(
        poll_until(Duration::from_secs(10), || http_get(
            run.pod(),
            HEALTH,
            "/ready"
        )
        .is_ok_and(|(c, _)| c == 200)),
        "never ready\n{}",
        run.proxy.logs(4000)
    );

    // At start: the fragment's TCP entry and the YAML's HTTP entry serve,
    // /config names their files and lines.
    let mut s = run
        .world
        .pod_connect(sa(addr::OTHER_V4, port::ECHO))
        .unwrap();
    s.write_all(b"ping\n").unwrap();
    let mut got = [0u8; 5];
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    std::io::Read::read_exact(&mut s, &mut got).unwrap();
    assert_eq!(&got, b"ping\n");
    drop(s);
    assert!(run.curl_ok("http://api.example.com/", "http ok host=api.example.com"));
    let c = run.admin_json("/config");
    assert_eq!(source_of(&c, "backend"), (frag.to_str().unwrap(), 2), "{c}");
    let shop = etc.join("istio/shop.yaml");
    assert_eq!(
        source_of(&c, "shop/api-http"),
        (shop.to_str().unwrap(), 1),
        "{c}"
    );
    // www.example.org is in no file yet: denied, and offered by /denied
    assert!(!run.curl_ok("https://www.example.org/", "tls ok"));
    let offer = run.admin_text("/denied?format=toml");
    assert!(offer.contains("hosts = [\"www.example.org\"]"), "{offer}");

    // The ConfigMap changes (..data swap): the flow is allowed once the
    // watcher has reloaded, and /denied no longer offers a covered name.
    vol.update(&[("shop.yaml", &format!("{SE_HTTP}{SE_ORG}"))]);
    let t = Instant::now();
    let c = run.wait_reload("success", 1);
    eprintln!("included ConfigMap swap in force after {:?}", t.elapsed());
    assert!(
        run.curl_ok("https://www.example.org/", "tls ok sni=www.example.org"),
        "{}",
        run.proxy.logs(4000)
    );
    assert_eq!(
        source_of(&c, "shop/org"),
        (shop.to_str().unwrap(), 23),
        "{c}"
    );
    let offer = run.admin_text("/denied?format=toml");
    assert!(!offer.contains("www.example.org"), "{offer}");

    // A bad included file on reload: logged and counted with its file and
    // line; the running config stays.
    vol.update(&[("shop.yaml", &format!("{SE_HTTP}{SE_ORG}---\n{SE_UNSAFE}"))]);
    let c = run.wait_reload("failure", 1);
    let err = c["reload"]["last_error"].as_str().unwrap_or_default();
    assert!(
        err.starts_with(&format!(
            "{}:36: ServiceEntry shop/mongo-any cannot be included",
            shop.display()
        )),
        "{c}"
    );
    assert!(run.proxy.stderr().contains("reload failed"));
    assert!(run.curl_ok("https://www.example.org/", "tls ok"));
    assert!(run.curl_ok("http://api.example.com/", "http ok"));
    assert!(source_of(&c, "shop/org").1 == 23, "{c}");

    // A fragment edited in place is seen too (a plain directory, no swap).
    std::fs::write(&frag, "[[service_entry]]\nname = \"backend\"\naddresses = [\"198.51.100.8/32\"]\nports = [{ number = 7000, protocol = \"TCP\" }]\n").unwrap();
    vol.update(&[("shop.yaml", &format!("{SE_HTTP}{SE_ORG}"))]);
    let c = run.wait_reload("success", 2);
    assert_eq!(c["reload"]["last_result"], "success", "{c}");
    let s = run.world.pod_connect(sa(addr::OTHER_V4, port::ECHO));
    let denied = match s {
        Err(_) => true,
        Ok(mut s) => {
            let _ = s.write_all(b"ping\n");
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut b = [0u8; 5];
            std::io::Read::read_exact(&mut s, &mut b).is_err()
        }
    };
    assert!(denied, "198.51.100.7 left the fragment");
}
