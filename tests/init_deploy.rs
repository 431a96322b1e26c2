//! The deployment examples in deploy/ say what docs/DESIGN.md §5 requires of a
//! deployment: init with NET_ADMIN/NET_RAW as root, the proxy as a native
//! sidecar running as [redirect] proxy_uid/proxy_gid with a startup probe on
//! /ready, the app as another uid without capabilities; the systemd unit runs
//! init privileged before the proxy and leaves the rules when it stops.

use std::path::PathBuf;

use portcullis::config::Config;
use serde_norway::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn yaml(rel: &str) -> Vec<Value> {
    let path = root().join(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{rel}: {e}"));
    let mut docs = Vec::new();
    for doc in serde_norway::Deserializer::from_str(&text) {
        let v: Value = serde::Deserialize::deserialize(doc)
            .unwrap_or_else(|e| panic!("{rel} is not valid YAML: {e}"));
        docs.push(v);
    }
    assert!(!docs.is_empty(), "{rel} holds no document");
    docs
}

/// `v.a.b.c`, panicking with the path when something is missing.
fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    let mut cur = v;
    for key in path.split('.') {
        cur = match key.parse::<usize>() {
            Ok(i) => cur.get(i),
            Err(_) => cur.get(key),
        }
        .unwrap_or_else(|| panic!("missing `{path}` (at `{key}`)"));
    }
    cur
}

fn str_at<'a>(v: &'a Value, path: &str) -> &'a str {
    at(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("`{path}` is not a string"))
}

fn int_at(v: &Value, path: &str) -> i64 {
    at(v, path)
        .as_i64()
        .unwrap_or_else(|| panic!("`{path}` is not an integer"))
}

fn strings(v: &Value, path: &str) -> Vec<String> {
    at(v, path)
        .as_sequence()
        .unwrap_or_else(|| panic!("`{path}` is not a list"))
        .iter()
        .map(|x| x.as_str().unwrap_or_default().to_string())
        .collect()
}

fn by_kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d.get("kind").and_then(Value::as_str) == Some(kind))
        .unwrap_or_else(|| panic!("no {kind}"))
}

fn named<'a>(list: &'a Value, name: &str) -> (usize, &'a Value) {
    list.as_sequence()
        .expect("a list of containers")
        .iter()
        .enumerate()
        .find(|(_, c)| c.get("name").and_then(Value::as_str) == Some(name))
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// The files of the pod's /etc/portcullis, as kubelet lays them out from the
/// two ConfigMaps: the keys of portcullis-config at the top, those of
/// portcullis-serviceentries under istio/ (tests/static_binary.rs runs the
/// static binary's `check` and `init --dry-run` on exactly these files).
fn pod_etc_portcullis() -> Vec<(String, String)> {
    let docs = kubernetes_docs();
    let mut files = Vec::new();
    for (name, dir) in [
        ("portcullis-config", ""),
        ("portcullis-serviceentries", "istio/"),
    ] {
        let cm = docs
            .iter()
            .find(|d| {
                d.get("kind").and_then(Value::as_str) == Some("ConfigMap")
                    && d.get("metadata")
                        .and_then(|m| m.get("name"))
                        .and_then(Value::as_str)
                        == Some(name)
            })
            .unwrap_or_else(|| panic!("no ConfigMap {name}"));
        for (k, v) in at(cm, "data").as_mapping().expect("data is a map") {
            files.push((
                format!("{dir}{}", k.as_str().expect("key")),
                v.as_str().expect("a string").to_string(),
            ));
        }
    }
    files
}

fn kubernetes_docs() -> Vec<Value> {
    [
        "deploy/kubernetes/configmap.yaml",
        "deploy/kubernetes/serviceentries.yaml",
        "deploy/kubernetes/deployment.yaml",
    ]
    .iter()
    .flat_map(|f| yaml(f))
    .collect()
}

#[test]
fn kubernetes_example() {
    let docs = kubernetes_docs();
    let cm = by_kind(&docs, "ConfigMap");
    let dep = by_kind(&docs, "Deployment");

    // The settings the pod spec must agree with, read as plain TOML (the
    // whole config is checked by `portcullis check` in
    // tests/static_binary.rs, with the included ServiceEntries).
    let cfg_text = at(cm, "data")
        .get("config.toml")
        .and_then(Value::as_str)
        .expect("data.\"config.toml\"");
    let cfg: toml::Table = cfg_text
        .parse()
        .unwrap_or_else(|e| panic!("the ConfigMap's config.toml is not TOML: {e}"));
    let key = |path: &str| -> &toml::Value {
        let mut cur = cfg.get(path.split('.').next().unwrap());
        for k in path.split('.').skip(1) {
            cur = cur.and_then(|v| v.get(k));
        }
        cur.unwrap_or_else(|| panic!("config.toml: no `{path}`"))
    };
    let uid = key("redirect.proxy_uid").as_integer().expect("proxy_uid");
    let gid = key("redirect.proxy_gid").as_integer().expect("proxy_gid");
    // health on both families: kubelet probes the pod IP of its own family
    let health: Vec<std::net::SocketAddr> = key("proxy.health")
        .as_array()
        .expect("health is a list")
        .iter()
        .map(|a| a.as_str().expect("a string").parse().expect("IP:PORT"))
        .collect();
    assert_eq!(
        health,
        [
            "0.0.0.0:15021".parse().unwrap(),
            "[::]:15021".parse::<std::net::SocketAddr>().unwrap()
        ]
    );
    let health = health[0].port();
    // the ServiceEntries come from the second ConfigMap, mounted at istio/
    assert_eq!(
        key("include").as_array().expect("include is a list"),
        &vec![toml::Value::from("istio/*.yaml")]
    );
    // the resolver's files are read-only copies in the ConfigMap
    for (k, file) in [
        ("proxy.resolv_conf", "resolv.conf"),
        ("proxy.hosts_file", "hosts"),
    ] {
        assert_eq!(
            key(k).as_str(),
            Some(format!("/etc/portcullis/{file}").as_str())
        );
        assert!(at(cm, "data").get(file).is_some(), "data.{file}");
    }
    let ses = pod_etc_portcullis();
    let ses: Vec<&String> = ses
        .iter()
        .filter(|(f, _)| f.starts_with("istio/"))
        .map(|(f, _)| f)
        .collect();
    assert!(ses.len() >= 2, "{ses:?}");
    assert!(ses.iter().all(|f| f.ends_with(".yaml")), "{ses:?}");

    let pod = at(dep, "spec.template.spec");
    let inits = at(pod, "initContainers");
    let (init_i, init) = named(inits, "portcullis-init");
    let (side_i, side) = named(inits, "portcullis");
    let (_, app) = named(at(pod, "containers"), "app");
    assert!(init_i < side_i, "the rules go in before the proxy starts");

    // init: root with NET_ADMIN and NET_RAW, running `portcullis init -c FILE`
    assert_eq!(strings(init, "args")[..2], ["init", "-c"]);
    assert_eq!(int_at(init, "securityContext.runAsUser"), 0);
    assert_eq!(
        at(init, "securityContext.runAsNonRoot").as_bool(),
        Some(false)
    );
    let add = strings(init, "securityContext.capabilities.add");
    assert!(
        add.contains(&"NET_ADMIN".into()) && add.contains(&"NET_RAW".into()),
        "{add:?}"
    );

    // the proxy: a native sidecar as proxy_uid/proxy_gid, probed on /ready
    assert_eq!(str_at(side, "restartPolicy"), "Always");
    assert_eq!(
        strings(side, "args"),
        ["run", "-c", "/etc/portcullis/config.toml"]
    );
    assert_eq!(int_at(side, "securityContext.runAsUser"), uid);
    assert_eq!(int_at(side, "securityContext.runAsGroup"), gid);
    assert_eq!(str_at(side, "startupProbe.httpGet.path"), "/ready");
    assert_eq!(int_at(side, "startupProbe.httpGet.port"), i64::from(health));
    assert_eq!(health, 15021);
    assert!(side
        .get("securityContext")
        .and_then(|s| s.get("capabilities"))
        .and_then(|c| c.get("add"))
        .is_none());

    // the app: another uid, no capabilities, no escalation
    let app_uid = int_at(app, "securityContext.runAsUser");
    assert_ne!(app_uid, uid);
    assert_ne!(app_uid, 0);
    assert_eq!(strings(app, "securityContext.capabilities.drop"), ["ALL"]);
    assert!(at(app, "securityContext.capabilities").get("add").is_none());
    assert_eq!(
        at(app, "securityContext.allowPrivilegeEscalation").as_bool(),
        Some(false)
    );

    // both portcullis containers read the ConfigMaps at /etc/portcullis and
    // /etc/portcullis/istio
    let vols = at(pod, "volumes").as_sequence().expect("volumes");
    for (cm_name, path) in [
        ("portcullis-config", "/etc/portcullis"),
        ("portcullis-serviceentries", "/etc/portcullis/istio"),
    ] {
        let vol = vols
            .iter()
            .find(|v| {
                v.get("configMap")
                    .and_then(|c| c.get("name"))
                    .and_then(Value::as_str)
                    == Some(cm_name)
            })
            .unwrap_or_else(|| panic!("no volume of ConfigMap {cm_name}"));
        for c in [init, side] {
            let m = at(c, "volumeMounts")
                .as_sequence()
                .expect("volumeMounts")
                .iter()
                .find(|m| m.get("mountPath").and_then(Value::as_str) == Some(path))
                .unwrap_or_else(|| panic!("{path} not mounted"));
            assert_eq!(str_at(m, "name"), str_at(vol, "name"));
            assert_eq!(at(m, "readOnly").as_bool(), Some(true));
        }
    }
    // the image is the one placeholder, the same in both roles
    assert_eq!(str_at(init, "image"), str_at(side, "image"));
}

#[test]
fn systemd_unit() {
    let text = std::fs::read_to_string(root().join("deploy/systemd/portcullis.service"))
        .expect("deploy/systemd/portcullis.service");
    let keys: Vec<(&str, &str)> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('[') && !l.is_empty())
        .filter_map(|l| l.split_once('='))
        .collect();
    let get = |k: &str| -> Vec<&str> {
        keys.iter()
            .filter(|(key, _)| *key == k)
            .map(|(_, v)| *v)
            .collect()
    };
    assert_eq!(
        get("ExecStartPre"),
        ["+/usr/local/bin/portcullis init -c /etc/portcullis/config.toml"]
    );
    assert_eq!(
        get("ExecStart"),
        ["/usr/local/bin/portcullis run -c /etc/portcullis/config.toml"]
    );
    assert_eq!(get("ExecReload"), ["/bin/kill -HUP $MAINPID"]);
    assert_eq!(get("User"), ["portcullis"]);
    assert!(
        get("ExecStopPost").is_empty(),
        "rules must stay: fail closed"
    );
    assert!(get("ExecStop").is_empty());
    // the comments say how to create the user with uid 1337
    assert!(text.contains("useradd --system --uid 1337"));
    // and the host example config matches that uid
    let host = Config::load(&root().join("tests/fixtures/examples/host.toml")).expect("host.toml");
    assert_eq!(host.redirect.proxy_uid, 1337);
    assert!(
        text.contains("install -D -m 0644 deploy/systemd/config.toml /etc/portcullis/config.toml")
    );
}

/// The host config shipped beside the unit: valid, the proxy's uid of the
/// unit, the host's DHCP clients listed (issue 10.1: without them a DHCP host
/// loses its lease), NTP allowed to named servers, so `check` has no warning
/// about it (issue 10.2), and it renders.
#[test]
fn systemd_host_config() {
    use portcullis::config::UserRef;
    let cfg =
        Config::load(&root().join("deploy/systemd/config.toml")).unwrap_or_else(|e| panic!("{e}"));
    assert!(cfg.warnings.is_empty(), "{:?}", cfg.warnings);
    assert_eq!(cfg.redirect.proxy_uid, 1337);
    assert_eq!(
        cfg.redirect.dhcp_client_uids,
        [UserRef::Id(0), UserRef::Name("systemd-network".into())]
    );
    let notes = portcullis::explain::udp_notes(&cfg);
    assert!(
        notes.iter().all(|n| !n.starts_with("warning:")),
        "{notes:?}"
    );
    assert!(cfg
        .redirect
        .allow_udp
        .iter()
        .any(|u| u.ports.contains(&123) && !u.cidrs.is_empty()));
    // names resolve from the target host's /etc/passwd
    let facts = portcullis::init::HostFacts::build(
        &cfg,
        "resolv.conf",
        portcullis::init::host::parse_nameservers("nameserver 127.0.0.53\n"),
        |_| String::new(),
        "root:x:0:0::/root:/bin/sh\nsystemd-network:x:998:998::/:/usr/sbin/nologin\n",
    );
    assert_eq!(
        facts.dhcp_uids,
        [(0, None), (998, Some("systemd-network".to_string()))]
    );
    let rules = portcullis::init::render_for(&cfg, &facts);
    let v4 = rules.v4.restore_input();
    assert!(
        v4.contains("--uid-owner 998 -m udp --sport 68 --dport 67 "),
        "{v4}"
    );
}
