#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets (files named seed-*) from the real captures in
tests/data/hellos/ and the config fixtures in tests/fixtures/. Run from anywhere:

    python3 fuzz/make_seeds.py

The ClientHello variants are made by editing the OpenSSL and chromium captures: the
server_name extension is rebuilt with other names, duplicated, or dropped, and the handshake
message is re-split into several records. Everything else the fuzzer finds lands next to the
seeds (cargo fuzz names those by their hash).
"""

import os
import shutil
import struct

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELLOS = os.path.join(ROOT, "tests", "data", "hellos")
CORPUS = os.path.join(ROOT, "fuzz", "corpus")


def read(name):
    with open(os.path.join(HELLOS, name), "rb") as f:
        return f.read()


def handshake(record_bytes):
    """The handshake message carried by a capture's records, and the record version."""
    out, rest = b"", record_bytes
    version = rest[1:3]
    while rest:
        n = struct.unpack("!H", rest[3:5])[0]
        out += rest[5:5 + n]
        rest = rest[5 + n:]
    return out, version


def records(msg, version, size=16384):
    out = b""
    for i in range(0, len(msg), size):
        chunk = msg[i:i + size]
        out += b"\x16" + version + struct.pack("!H", len(chunk)) + chunk
    return out


def split_hello(msg):
    """(prefix up to the extension block, list of (type, data))."""
    body = msg[4:]
    at = 2 + 32
    at += 1 + body[at]
    at += 2 + struct.unpack("!H", body[at:at + 2])[0]
    at += 1 + body[at]
    ext_len = struct.unpack("!H", body[at:at + 2])[0]
    ext, exts = body[at + 2:at + 2 + ext_len], []
    while ext:
        t, n = struct.unpack("!HH", ext[:4])
        exts.append((t, ext[4:4 + n]))
        ext = ext[4 + n:]
    return body[:at], exts


def join_hello(prefix, exts):
    ext = b"".join(struct.pack("!HH", t, len(d)) + d for t, d in exts)
    body = prefix + struct.pack("!H", len(ext)) + ext
    return b"\x01" + struct.pack("!I", len(body))[1:] + body


def sni(*names, kind=0):
    lst = b"".join(bytes([kind]) + struct.pack("!H", len(n)) + n for n in names)
    return (0, struct.pack("!H", len(lst)) + lst)


def sni_typed(*entries):
    """A server_name list of (name_type, name) entries, in order."""
    lst = b"".join(bytes([k]) + struct.pack("!H", len(n)) + n for k, n in entries)
    return (0, struct.pack("!H", len(lst)) + lst)


def with_sni(msg, exts_for):
    prefix, exts = split_hello(msg)
    return join_hello(prefix, exts_for(exts))


def replace_sni(new):
    def f(exts):
        out = []
        for t, d in exts:
            if t == 0:
                out.extend(new)
            else:
                out.append((t, d))
        return out
    return f


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def tls_seeds():
    for cap in ["openssl-s_client.bin", "curl.bin", "chromium-mlkem.bin"]:
        raw = read(cap)
        base = cap[:-4]
        write("detect_tls", base, raw)
        msg, version = handshake(raw)
        for parts in (2, 3):
            size = -(-len(msg) // parts)
            write("detect_tls", "%s-%drecords" % (base, parts), records(msg, version, size))
        write("detect_tls", base + "-64byte-records", records(msg, version, 64))
        write("detect_tls", base + "-truncated", raw[: len(raw) // 2])
        write("detect_tls", base + "-with-ccs", raw + b"\x14\x03\x03\x00\x01\x01")

    msg, version = handshake(read("openssl-s_client.bin"))
    # client_hello takes a selector byte (record size) and the ClientHello body.
    for cap in ["openssl-s_client.bin", "curl.bin", "chromium-mlkem.bin"]:
        m, _ = handshake(read(cap))
        for sel in (0, 1, 2, 3):
            write("client_hello", "%s-sel%d" % (cap[:-4], sel), bytes([sel]) + m[4:])
    variants = {
        "no-sni": lambda e: [x for x in e if x[0] != 0],
        "ip-sni": replace_sni([sni(b"192.0.2.10")]),
        "ipv6-sni": replace_sni([sni(b"2001:db8::10")]),
        "upper-dot": replace_sni([sni(b"API.Example.COM.")]),
        "two-names": replace_sni([sni(b"api.example.com", b"evil.example.net")]),
        "two-sni-ext": replace_sni([sni(b"api.example.com"), sni(b"evil.example.net")]),
        "other-name-type": replace_sni([sni(b"x", kind=7)]),
        "other-name-type-before-host": replace_sni(
            [sni_typed((7, b"evil.example.net"), (0, b"api.example.com"))]
        ),
        "other-name-type-after-host": replace_sni(
            [sni_typed((0, b"api.example.com"), (1, b"evil.example.net"))]
        ),
        "empty-name": replace_sni([sni(b"")]),
        "nul-in-name": replace_sni([sni(b"api.example.com\x00.evil")]),
        "ech-grease": lambda e: replace_sni([sni(b"api.example.com")])(e)
        + [(0xFE0D, b"\x00" + b"\x5a" * 40)],
    }
    for name, f in variants.items():
        m = with_sni(msg, f)
        write("detect_tls", "openssl-" + name, records(m, version))
        write("client_hello", "openssl-" + name, b"\x00" + m[4:])
    # A hello declaring more than 64 KiB, and garbage that starts like TLS.
    big = bytearray(records(msg, version))
    big[6:9] = (70000).to_bytes(3, "big")
    write("detect_tls", "declared-too-large", bytes(big))
    write("detect_tls", "garbage", b"\x16\x03\x01\xff\xff" + bytes(range(256)))
    write("detect_tls", "sslv2", b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10")


HTTP_HEADS = {
    "plain": b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
    "port": b"GET / HTTP/1.1\r\nHost: api.example.com:8080\r\n\r\n",
    "ipv6-port": b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:8080\r\n\r\n",
    "bare-lf": b"GET / HTTP/1.1\nHost: a.example\n\n",
    "absolute-form": b"GET http://user:pw@API.example.com:80/x?y HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
    "absolute-mismatch": b"GET http://b.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n",
    "connect": b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n",
    "duplicate-host": b"GET / HTTP/1.1\r\nHost: a.example\r\nhost: b.example\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nX-A: 1\r\n Host: b.example\r\nHost: a.example\r\n\r\n",
    "body": b"POST / HTTP/1.1\r\nHost: a.example\r\nContent-Length: 5\r\n\r\nHost:",
    "keep-alive": b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\nGET / HTTP/1.1\r\nHost: b.example\r\n\r\n",
    "no-host": b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n",
    "backslash-userinfo": b"GET http://evil.example.net\\@api.example.com/ HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
    "scheme-no-slashes": b"GET http:evil.example.net/ HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
    "scheme-backslashes": b"GET http:\\\\evil.example.net/ HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
    "empty-segments": b"GET //x/y HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
    "empty-segments-host-like": b"GET //evil.example.net/x HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
    "h2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "http10": b"GET / HTTP/1.0\r\n\r\n",
}


def http_seeds():
    for cap in ["curl-http.bin", "chromium-http.bin"]:
        write("detect_http", cap[:-4], read(cap))
    for name, head in HTTP_HEADS.items():
        write("detect_http", name, head)


def config_seeds():
    fixtures = os.path.join(ROOT, "tests", "fixtures")
    paths = [os.path.join(ROOT, "config.toml")]
    for sub in sorted(os.listdir(fixtures)):
        d = os.path.join(fixtures, sub)
        paths += [os.path.join(d, f) for f in sorted(os.listdir(d)) if f.endswith(".toml")]
    for p in paths:
        rel = os.path.relpath(p, ROOT).replace(os.sep, "-")
        d = os.path.join(CORPUS, "config_parse")
        os.makedirs(d, exist_ok=True)
        shutil.copyfile(p, os.path.join(d, "seed-" + rel))


if __name__ == "__main__":
    tls_seeds()
    http_seeds()
    config_seeds()
