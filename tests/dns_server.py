#!/usr/bin/env python3
"""A small authoritative UDP DNS server for tests/resolver_e2e.rs: it answers
A/AAAA from a records file and misbehaves on request, so tests can give the
proxy a resolver that drops one family, answers slowly, or says NXDOMAIN.

    dns_server.py --listen 192.0.2.54 --records FILE --control FILE

FILE lines: `name address` (A or AAAA by the address's family). The control
file (re-read on every query, so a test can change behaviour while running)
holds words:
    drop-aaaa   never answer AAAA queries (some corporate resolvers)
    drop-all    never answer
    delay=SECS  answer after SECS seconds
Names not in the records file get NXDOMAIN with an SOA whose minimum is
--neg-ttl (default 10); a known name asked for a family it lacks gets NODATA
with the same SOA. Every query is printed to stdout as `query TYPE name from ADDR:PORT id N at T`
before anything else happens to it, and READY once listening.
"""

import argparse
import ipaddress
import socket
import struct
import sys
import threading
import time

A, AAAA, SOA = 1, 28, 6


def parse_name(msg, off):
    labels = []
    while True:
        n = msg[off]
        off += 1
        if n == 0:
            break
        labels.append(msg[off:off + n].decode("ascii", "replace"))
        off += n
    return ".".join(labels), off


def encode_name(name):
    out = b""
    for label in name.rstrip(".").split("."):
        if label:
            out += bytes([len(label)]) + label.encode("ascii")
    return out + b"\0"


def load_records(path):
    recs = {}
    with open(path) as f:
        for line in f:
            w = line.split()
            if len(w) >= 2:
                recs.setdefault(w[0].lower().rstrip("."), []).append(ipaddress.ip_address(w[1]))
    return recs


def control(path):
    try:
        with open(path) as f:
            return f.read().split()
    except OSError:
        return []


def answer(query, recs, ttl, neg_ttl):
    qid, flags = struct.unpack("!HH", query[:4])
    name, off = parse_name(query, 12)
    qtype, qclass = struct.unpack("!HH", query[off:off + 4])
    question = query[12:off + 4]
    rd = flags & 0x0100
    addrs = recs.get(name.lower())
    rrs = b""
    n_an = n_ns = 0
    rcode = 0
    if addrs is None:
        rcode = 3  # NXDOMAIN
    else:
        for a in addrs:
            if (qtype == A and a.version == 4) or (qtype == AAAA and a.version == 6):
                rrs += b"\xc0\x0c" + struct.pack("!HHIH", qtype, 1, ttl, len(a.packed)) + a.packed
                n_an += 1
    if n_an == 0:
        # NXDOMAIN or NODATA: the SOA says how long to remember it (RFC 2308)
        zone = encode_name("test")
        soa = encode_name("ns.test") + encode_name("hostmaster.test") + struct.pack(
            "!IIIII", 1, 3600, 600, 86400, neg_ttl)
        rrs += zone + struct.pack("!HHIH", SOA, 1, neg_ttl, len(soa)) + soa
        n_ns = 1
    hdr = struct.pack("!HHHHHH", qid, 0x8400 | rd | rcode, 1, n_an, n_ns, 0)
    return hdr + question + rrs, qtype, name


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", action="append", required=True)
    ap.add_argument("--port", type=int, default=53)
    ap.add_argument("--records", required=True)
    ap.add_argument("--control", required=True)
    ap.add_argument("--ttl", type=int, default=60)
    ap.add_argument("--neg-ttl", type=int, default=10)
    args = ap.parse_args()
    lock = threading.Lock()

    def say(line):
        with lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def serve(addr):
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.bind((addr, args.port))
        while True:
            data, peer = s.recvfrom(4096)
            try:
                resp, qtype, name = answer(data, load_records(args.records), args.ttl, args.neg_ttl)
            except Exception as e:  # malformed query: ignore it
                say(f"bad query from {peer}: {e}")
                continue
            tname = {A: "A", AAAA: "AAAA"}.get(qtype, str(qtype))
            say(f"query {tname} {name} from {peer[0]}:{peer[1]} id {struct.unpack('!H', data[:2])[0]} at {time.monotonic():.3f}")
            ctl = control(args.control)
            if "drop-all" in ctl or ("drop-aaaa" in ctl and qtype == AAAA):
                continue
            delay = [float(w.split("=", 1)[1]) for w in ctl if w.startswith("delay=")]
            if delay:
                threading.Timer(delay[0], s.sendto, (resp, peer)).start()
            else:
                s.sendto(resp, peer)

    for a in args.listen:
        threading.Thread(target=serve, args=(a,), daemon=True).start()
    time.sleep(0.2)
    say("READY")
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
