//! Proves the end-to-end harness (tests/common) works, without the proxy.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::path::Path;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(10);

fn gone(world_ns: &[String], dir: &Path) {
    for ns in world_ns {
        assert!(!netns_path(ns).exists(), "netns {ns} still exists");
        assert!(
            !Path::new("/etc/netns").join(ns).exists(),
            "/etc/netns/{ns} still exists"
        );
    }
    assert!(!dir.exists(), "{} still exists", dir.display());
}

#[test]
fn world_comes_up_fast() {
    let t0 = Instant::now();
    let w = World::start();
    let up = t0.elapsed();
    assert!(up < Duration::from_secs(3), "world took {up:?}");
    assert!(w.pod.len() <= 15 && w.inet.len() <= 15);
    assert!(w.pod.starts_with("pc") && w.pod != w.inet);
}

#[test]
fn https_by_name_v4_and_v6() {
    let w = World::start();
    let out = w.curl(&["-4", "https://api.example.com/"]);
    assert_eq!(
        out.ok(),
        "tls ok sni=api.example.com local=192.0.2.10:443\n"
    );
    let out = w.curl(&["-6", "https://api.example.com:8443/"]);
    assert_eq!(
        out.ok(),
        "tls ok sni=api.example.com local=[2001:db8::10]:8443\n"
    );
    let out = w.curl(&["-4", "https://a.files.example.com/"]);
    assert_eq!(
        out.ok(),
        "tls ok sni=a.files.example.com local=192.0.2.11:443\n"
    );
    // the pod's resolver really is the world's dnsmasq
    assert!(w
        .dns_queries()
        .iter()
        .any(|(t, n)| t == "A" && n == "api.example.com"));
}

#[test]
fn http_plain_and_bytes() {
    let w = World::start();
    let out = w.curl(&["-4", "http://api.example.com/"]);
    assert_eq!(
        out.ok(),
        "http ok host=api.example.com local=192.0.2.10:80\n"
    );
    let out = w.curl(&["http://other.example.net:8080/x"]);
    assert_eq!(
        out.ok(),
        "http ok host=other.example.net:8080 local=198.51.100.7:8080\n"
    );
    let out = w.curl(&["-6", "http://[2001:db8::11]/"]);
    assert_eq!(
        out.ok(),
        "http ok host=[2001:db8::11] local=[2001:db8::11]:80\n"
    );
    let out = w.curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{size_download}",
        "http://api.example.com/bytes/1000000",
    ]);
    assert_eq!(out.ok(), "1000000");
    // keep-alive: two requests on one connection
    let out = w.curl(&[
        "-4",
        "-v",
        "http://api.example.com/a",
        "http://api.example.com/b",
    ]);
    assert!(
        out.stderr.contains("Re-using existing connection"),
        "{out:?}"
    );
}

#[test]
fn s_client_helper() {
    let w = World::start();
    let req = b"GET / HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n";
    let out = w.s_client("192.0.2.10:443", &["-servername", "api.example.com"], req);
    assert!(
        out.stdout
            .contains("tls ok sni=api.example.com local=192.0.2.10:443"),
        "{out:?}"
    );
    let out = w.s_client("[2001:db8::10]:443", &["-noservername"], req);
    assert!(
        out.stdout.contains("tls ok sni=- local=[2001:db8::10]:443"),
        "{out:?}"
    );
}

#[test]
fn echo_banner_halfclose_reset_v4_v6() {
    let w = World::start();
    for ip in [
        addr::API_V4,
        addr::API_V6,
        addr::OTHER_V4,
        addr::ORG_V4,
        addr::FILES_V6,
    ] {
        // echo
        let mut s = w.pod_connect(sa(ip, port::ECHO)).unwrap();
        s.write_all(b"hello\n").unwrap();
        assert_eq!(read_line(&mut s, T).unwrap(), "hello\n");
        s.shutdown(Shutdown::Write).unwrap();
        let (rest, r) = read_to_end_timeout(&mut s, T);
        assert!(r.is_ok() && rest.is_empty());

        // server-first banner, without sending anything
        let mut s = w.pod_connect(sa(ip, port::BANNER)).unwrap();
        assert_eq!(
            read_line(&mut s, T).unwrap(),
            format!("BANNER {}\r\n", sa(ip, port::BANNER))
        );
        s.write_all(b"x\n").unwrap();
        assert_eq!(read_line(&mut s, T).unwrap(), "x\n");

        // half-close
        let mut s = w.pod_connect(sa(ip, port::HALF_CLOSE)).unwrap();
        s.write_all(&[7u8; 100_000]).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let (got, r) = read_to_end_timeout(&mut s, T);
        r.unwrap();
        assert_eq!(String::from_utf8(got).unwrap(), "got 100000 bytes\n");

        // reset
        let mut s = w.pod_connect(sa(ip, port::RESET)).unwrap();
        s.write_all(b"bye").unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        let mut buf = [0u8; 16];
        let e = s.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);

        // nothing listens: refused
        let e = w.pod_connect(sa(ip, port::CLOSED)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
    }
}

#[test]
fn blackhole_times_out() {
    let w = World::start();
    for ip in [addr::BLACKHOLE_V4, addr::BLACKHOLE_V6] {
        let e = connect_in(&w.pod, sa(ip, 443), Duration::from_millis(300)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{ip}");
    }
}

#[test]
fn bulk_64mib_both_ways() {
    let w = World::start();
    let n = 64 << 20;
    let t0 = Instant::now();
    let mut s = w.pod_connect(sa(addr::API_V4, port::BULK)).unwrap();
    bulk_download(&mut s, n).unwrap();
    let mut s = w.pod_connect(sa(addr::API_V6, port::BULK)).unwrap();
    bulk_upload(&mut s, n).unwrap();
    eprintln!("128 MiB of bulk in {:?}", t0.elapsed());
    // odd sizes, and a short upload is reported as such
    let mut s = w.pod_connect(sa(addr::OTHER_V4, port::BULK)).unwrap();
    bulk_download(&mut s, 1_234_567).unwrap();
    let mut s = w.pod_connect(sa(addr::OTHER_V4, port::BULK)).unwrap();
    s.write_all(b"RECV 10\n").unwrap();
    s.write_all(&pattern(0, 4)).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let (got, _) = read_to_end_timeout(&mut s, T);
    assert_eq!(
        String::from_utf8(got).unwrap(),
        format!("SHORT 4 {:08x}\n", crc32(&pattern(0, 4)))
    );
}

#[test]
fn crc32_matches_zlib() {
    assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    assert_eq!(crc32(b""), 0);
    let p = pattern(0, 1_000_003);
    assert_eq!(pattern_crc32(1_000_003), crc32(&p));
    assert_eq!(crc32_update(crc32(&p[..5]), &p[5..]), crc32(&p));
    assert_eq!(pattern(250, 3), vec![250, 0, 1]);
}

#[test]
fn dns_records_configurable_and_changeable() {
    let w = World::builder()
        .dns(&[
            ("svc.example.com", "192.0.2.10"),
            ("svc.example.com", "2001:db8::11"),
        ])
        .dns_ttl(1)
        .start();
    let ahosts = |name: &str| w.run_pod(Cmd::new("getent").args(["ahosts", name]));
    let out = ahosts("svc.example.com");
    assert!(
        out.ok().contains("192.0.2.10") && out.stdout.contains("2001:db8::11"),
        "{out:?}"
    );
    // not in the records: NXDOMAIN, answered at once
    let t0 = Instant::now();
    assert!(!ahosts("api.example.com").success());
    assert!(t0.elapsed() < Duration::from_secs(1));
    w.set_dns(&[("svc.example.com", "198.51.100.7")]);
    let out = ahosts("svc.example.com");
    assert!(
        out.ok().contains("198.51.100.7") && !out.stdout.contains("192.0.2.10"),
        "{out:?}"
    );
    let out = w.curl(&["http://svc.example.com/"]);
    assert_eq!(
        out.ok(),
        "http ok host=svc.example.com local=198.51.100.7:80\n"
    );
    // the pod never resolves through the machine's own resolver files
    let out = w.run_pod(Cmd::new("cat").arg("/etc/resolv.conf"));
    assert_eq!(
        out.ok(),
        "nameserver 192.0.2.53\nnameserver 2001:db8::53\noptions timeout:2 attempts:2\n"
    );
}

#[test]
fn run_as_uid_and_spawn_guards() {
    let w = World::start();
    let out = w.run_pod(Cmd::new("id").args(["-u"]).user(PROXY_UID, PROXY_UID));
    assert_eq!(out.ok(), "1337\n");
    let out = w.run_pod(Cmd::new("id").args(["-G"]).user(PROXY_UID, PROXY_UID));
    assert_eq!(out.ok(), "1337\n");
    // a listener as uid 1337 on an unprivileged port, waited for without connecting
    let mut p = w.spawn_pod(
        Cmd::new("socat")
            .args(["TCP-LISTEN:15001,reuseaddr,fork", "EXEC:cat"])
            .user(PROXY_UID, PROXY_UID),
    );
    w.wait_tcp(&w.pod, sa(addr::POD_V4, 15001));
    assert!(p.is_running());
    let mut s = w.pod_connect(sa(addr::POD_V4, 15001)).unwrap();
    s.write_all(b"ping\n").unwrap();
    assert_eq!(read_line(&mut s, T).unwrap(), "ping\n");
    let pid = p.pid();
    drop(p);
    // killed and reaped
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    // run() timeouts kill the command
    let out = w.run_pod(
        Cmd::new("sleep")
            .arg("30")
            .timeout(Duration::from_millis(200)),
    );
    assert!(out.timed_out && !out.success());
    // stdin is passed
    let out = w.run_pod(Cmd::new("cat").stdin("abc"));
    assert_eq!(out.ok(), "abc");
}

#[test]
fn redirect_helper_sends_pod_traffic_to_local_listener() {
    let w = World::start();
    let _fake = w.spawn_origdst_listener(15001);
    w.redirect(15001, Some(PROXY_UID));
    for dst in [
        sa(addr::API_V4, port::ECHO),
        sa(addr::OTHER_V4, 443),
        sa(addr::API_V6, port::BANNER),
        // even where nothing listens upstream
        sa(addr::BLACKHOLE_V4, 80),
    ] {
        let mut s = w.pod_connect(dst).unwrap();
        assert_eq!(read_line(&mut s, T).unwrap(), format!("ORIGDST {dst}\n"));
    }
    // the excluded uid goes straight to the upstream
    let out = w.curl_as(PROXY_UID, PROXY_UID, &["-4", "http://api.example.com/"]);
    assert_eq!(
        out.ok(),
        "http ok host=api.example.com local=192.0.2.10:80\n"
    );
    // anyone else is redirected (to a listener that does not speak HTTP)
    let out = w.curl_as(APP_UID, APP_UID, &["-4", "http://api.example.com/"]);
    assert!(!out.success(), "{out:?}");
    // DNS still works: the resolver is excluded (and UDP is never redirected)
    let out = w.run_pod(Cmd::new("getent").args(["ahosts", "api.example.com"]));
    assert!(out.success());
    assert!(w.iptables_save(&w.pod).contains("PCTEST_REDIRECT"));
}

#[test]
fn raw_iptables_redirect_in_pod() {
    let w = World::start();
    let _fake = w.spawn_origdst_listener(15001);
    w.run_pod(Cmd::new("iptables").args([
        "-w",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        "192.0.2.0/24",
        "-j",
        "REDIRECT",
        "--to-ports",
        "15001",
    ]))
    .ok();
    let mut s = w.pod_connect(sa(addr::FILES_V4, 9999)).unwrap();
    assert_eq!(read_line(&mut s, T).unwrap(), "ORIGDST 192.0.2.11:9999\n");
    // not redirected: SO_ORIGINAL_DST fails or names the listener itself
    // (what the proxy's loop guard must recognise)
    let mut s = w
        .pod_connect(sa("127.0.0.1".parse().unwrap(), 15001))
        .unwrap();
    let line = read_line(&mut s, T).unwrap();
    assert!(
        line == "ORIGDST none\n" || line == "ORIGDST 127.0.0.1:15001\n",
        "{line}"
    );
    let mut s = w.pod_connect(sa(addr::POD_V4, 15001)).unwrap();
    assert_eq!(read_line(&mut s, T).unwrap(), "ORIGDST 192.0.2.2:15001\n");
}

#[test]
fn lan_namespace_routes_through_pod() {
    let w = World::builder().lan(true).start();
    let lan = w.lan.clone().unwrap();
    for ip in [addr::API_V4, addr::API_V6] {
        let mut s = w.connect(&lan, sa(ip, port::ECHO)).unwrap();
        s.write_all(b"via gw\n").unwrap();
        assert_eq!(read_line(&mut s, T).unwrap(), "via gw\n");
    }
    let out = w.run_in(&lan, w.curl_cmd(&["https://api.example.com/"]));
    assert!(out.ok().starts_with("tls ok sni=api.example.com"));
}

#[test]
fn extra_inet_address() {
    let w = World::start();
    let ip = "198.51.100.8".parse().unwrap();
    w.add_inet_addr(ip);
    let mut s = w.pod_connect(sa(ip, port::BANNER)).unwrap();
    assert_eq!(
        read_line(&mut s, T).unwrap(),
        "BANNER 198.51.100.8:2222\r\n"
    );
}

#[test]
fn teardown_removes_everything() {
    let w = World::builder().lan(true).start();
    let names = vec![w.pod.clone(), w.inet.clone(), w.lan.clone().unwrap()];
    let dir = w.dir.clone();
    let stray = w.spawn_pod(Cmd::new("sleep").arg("1000"));
    std::mem::forget(stray); // leaked guard: the world still ends it
    drop(w);
    gone(&names, &dir);
}

#[test]
fn teardown_on_panic() {
    let seen = std::sync::Mutex::new(None);
    let r = std::panic::catch_unwind(|| {
        let w = World::start();
        *seen.lock().unwrap() = Some((vec![w.pod.clone(), w.inet.clone()], w.dir.clone()));
        panic!("deliberate");
    });
    assert!(r.is_err());
    let (names, dir) = seen.lock().unwrap().take().unwrap();
    gone(&names, &dir);
}

#[test]
fn parallel_worlds_are_isolated() {
    let worlds: Vec<World> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4).map(|_| s.spawn(World::start)).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut names: Vec<&str> = worlds.iter().map(|w| w.pod.as_str()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 4);
    // a redirect in one pod does not affect another
    let _fake = worlds[0].spawn_origdst_listener(15001);
    worlds[0].redirect(15001, None);
    let mut s = worlds[1]
        .pod_connect(sa(addr::API_V4, port::BANNER))
        .unwrap();
    assert_eq!(read_line(&mut s, T).unwrap(), "BANNER 192.0.2.10:2222\r\n");
    let mut s = worlds[0]
        .pod_connect(sa(addr::API_V4, port::BANNER))
        .unwrap();
    assert_eq!(read_line(&mut s, T).unwrap(), "ORIGDST 192.0.2.10:2222\n");
}

#[test]
fn upstream_accepts_and_dns_stop_start() {
    let w = World::start();
    assert!(w.upstream_accepts().is_empty());
    let s = w.pod_connect(sa(addr::OTHER_V4, port::ECHO)).unwrap();
    let local = s.local_addr().unwrap();
    assert!(poll_until(T, || w
        .upstream_accepts()
        .contains(&(sa(addr::OTHER_V4, port::ECHO), local))));
    w.stop_dns();
    let t0 = Instant::now();
    let out = w.run_pod(Cmd::new("getent").args(["ahosts", "api.example.com"]));
    assert!(
        !out.success() && t0.elapsed() < Duration::from_secs(5),
        "{out:?}"
    );
    w.start_dns();
    let out = w.run_pod(Cmd::new("getent").args(["ahosts", "api.example.com"]));
    assert!(out.ok().contains("192.0.2.10"));
}

#[test]
fn proxy_uid_can_run_the_binary_and_read_world_files() {
    let w = World::start();
    let cfg = w.write_file("config.toml", "# test\n");
    let out = w.run_pod(Cmd::new("cat").arg(&cfg).user(PROXY_UID, PROXY_UID));
    assert_eq!(out.ok(), "# test\n");
    let out = w.run_pod(
        Cmd::new(portcullis_bin())
            .arg("--help")
            .user(PROXY_UID, PROXY_UID)
            .timeout(Duration::from_secs(10)),
    );
    assert!(!matches!(out.status, Some(126) | Some(127)), "{out:?}");
}
