#!/usr/bin/env python3
"""Test upstream servers for portcullis end-to-end tests (standard library only).

Started by tests/common/mod.rs inside the "inet" namespace of a test world:

    python3 tests/upstreams.py --cert CERT --key KEY

It listens on 0.0.0.0 and [::] (IPV6_V6ONLY, so both families are served on
every address of the namespace) and prints READY on stdout once every socket
listens. Then it prints ``ACCEPT <local> <peer>`` on stdout for every connection
it accepts (so a test can prove that a denied flow never reached an upstream). Every service reports the local address the client reached
(``<ip>:<port>`` for IPv4, ``[<ip>]:<port>`` for IPv6, like Rust's SocketAddr).

  443, 8443  TLS (TLS 1.2/1.3, ALPN http/1.1). Serves HTTP/1.1 requests; the body is
             ``tls ok sni=<sni or -> local=<addr>\\n``. The SNI is recorded with
             sni_callback.
  80, 8080   plain HTTP/1.1; body ``http ok host=<Host or -> local=<addr>\\n``.
             Both HTTP flavours keep the connection alive (unless the request says
             ``Connection: close`` or is HTTP/1.0), read a Content-Length body,
             and serve ``GET /bytes/<n>`` with n pattern bytes (see below).
  7000       TCP echo until EOF, then shutdown(SHUT_WR) and close.
  7001       half-close: reads until EOF, then replies ``got <n> bytes\\n`` and closes.
  7003       reset: reads once (any bytes), then closes with an RST (SO_LINGER 0).
  2222       server-first: sends ``BANNER <addr>\\r\\n`` at once on accept, then echoes.
  9000       bulk sink/source. The client sends one line:
               ``SEND <n>\\n``  the server sends n pattern bytes, then shutdown(SHUT_WR),
                             then waits for the client's EOF and closes.
               ``RECV <n>\\n``  the server reads exactly n bytes, then replies
                             ``OK <n> <crc32>\\n`` (crc32: zlib.crc32 / IEEE 802.3, as
                             8 lower-case hex digits) and closes. If the client ends
                             early: ``SHORT <got> <crc32>\\n``.
             Pattern bytes: byte number k of the stream (from 0) is ``k % 251``.

With ``--origdst PORT`` (used inside the pod namespace) it instead runs a fake
proxy listener on 0.0.0.0:PORT and [::]:PORT that answers each connection with
``ORIGDST <addr>\\n`` (SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST; ``ORIGDST none``
when the flow was not redirected), then echoes until EOF.

With ``--listen SPEC...`` (tests that build their own namespaces: tests/common/lone.rs)
it runs only the listeners named, each on the one address given:
``tcp/ADDR/PORT/LABEL`` answers ``LABEL ORIGDST <addr>\\n`` (as above, so a client
sees who answered and for which destination), then echoes until EOF;
``udp/ADDR/PORT`` echoes every datagram.
"""

import argparse
import socket
import ssl
import struct
import sys
import threading
import time
import zlib

PERIOD = 251
CHUNK = PERIOD * 4096  # a multiple of the period, so chunks concatenate seamlessly
PATTERN = bytes(i % PERIOD for i in range(PERIOD)) * 4096 + bytes(range(PERIOD))

SO_ORIGINAL_DST = 80  # same value for SOL_IP and SOL_IPV6 (IP6T_SO_ORIGINAL_DST)

threading.stack_size(512 * 1024)


def fmt_addr(sockaddr):
    host, port = sockaddr[0], sockaddr[1]
    if ":" in host:
        if host.startswith("::ffff:") and "." in host:
            return "%s:%d" % (host[7:], port)
        return "[%s]:%d" % (host, port)
    return "%s:%d" % (host, port)


def local_of(conn):
    try:
        return fmt_addr(conn.getsockname())
    except OSError:
        return "-"


def send_pattern(conn, n, offset=0):
    """Send n pattern bytes, starting at stream offset `offset`."""
    view = memoryview(PATTERN)
    start = offset % PERIOD
    while n > 0:
        take = min(n, CHUNK)
        conn.sendall(view[start:start + take])
        n -= take
        start = (start + take) % PERIOD


def read_line(conn, limit=4096):
    """Read up to and including a newline, byte-exact (no over-read)."""
    buf = bytearray()
    while len(buf) < limit:
        b = conn.recv(1)
        if not b:
            break
        buf += b
        if b == b"\n":
            break
    return bytes(buf)


def recv_until(conn, buf, marker, limit=1 << 20):
    while marker not in buf:
        if len(buf) > limit:
            return None
        data = conn.recv(65536)
        if not data:
            return None
        buf += data
    return buf


# ---------------------------------------------------------------- services


def svc_echo(conn):
    while True:
        data = conn.recv(262144)
        if not data:
            break
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


def svc_halfclose(conn):
    n = 0
    while True:
        data = conn.recv(262144)
        if not data:
            break
        n += len(data)
    conn.sendall(b"got %d bytes\n" % n)


def svc_reset(conn):
    conn.recv(65536)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def svc_banner(conn):
    conn.sendall(b"BANNER %s\r\n" % local_of(conn).encode())
    svc_echo(conn)


def svc_bulk(conn):
    line = read_line(conn).strip()
    parts = line.split()
    if len(parts) != 2 or not parts[1].isdigit():
        conn.sendall(b"ERR expected SEND <n> or RECV <n>\n")
        return
    cmd, n = parts[0], int(parts[1])
    if cmd == b"SEND":
        send_pattern(conn, n)
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(65536):
            pass
    elif cmd == b"RECV":
        crc, got = 0, 0
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while got < n:
            k = conn.recv_into(view[: min(len(buf), n - got)])
            if k == 0:
                break
            crc = zlib.crc32(view[:k], crc)
            got += k
        word = b"OK" if got == n else b"SHORT"
        conn.sendall(b"%s %d %08x\n" % (word, got, crc & 0xFFFFFFFF))
    else:
        conn.sendall(b"ERR expected SEND <n> or RECV <n>\n")


def http_loop(conn, describe):
    """Serve HTTP/1.x requests on conn; describe(host) makes the body."""
    buf = bytearray()
    while True:
        got = recv_until(conn, buf, b"\r\n\r\n", limit=1 << 20)
        if got is None:
            return
        head_end = buf.index(b"\r\n\r\n") + 4
        head = bytes(buf[:head_end]).decode("latin-1")
        del buf[:head_end]
        lines = head.split("\r\n")
        request = lines[0].split(" ")
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers.setdefault(k.strip().lower(), v.strip())
        length = int(headers.get("content-length", "0") or "0")
        while len(buf) < length:
            data = conn.recv(65536)
            if not data:
                return
            buf += data
        del buf[:length]
        version = request[2] if len(request) > 2 else "HTTP/1.0"
        close = headers.get("connection", "").lower() == "close" or version != "HTTP/1.1"
        path = request[1] if len(request) > 1 else "/"
        if path.startswith("/bytes/") and path[7:].isdigit():
            n = int(path[7:])
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                b"Content-Length: %d\r\n%s\r\n" % (n, b"Connection: close\r\n" if close else b"")
            )
            send_pattern(conn, n)
        else:
            body = describe(headers.get("host", "-")).encode()
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n%s"
                % (len(body), b"Connection: close\r\n" if close else b"", body)
            )
        if close:
            return


def svc_http(conn):
    local = local_of(conn)
    http_loop(conn, lambda host: "http ok host=%s local=%s\n" % (host, local))


_tls_local = threading.local()


def make_tls_context(cert, key):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["http/1.1"])

    def on_sni(_sslobj, server_name, _ctx):
        _tls_local.sni = server_name
        return None

    ctx.sni_callback = on_sni
    return ctx


def svc_tls(ctx):
    def handler(conn):
        local = local_of(conn)
        _tls_local.sni = None
        conn.settimeout(30)
        try:
            tls = ctx.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):
            return
        sni = _tls_local.sni or "-"
        tls.settimeout(None)
        try:
            http_loop(tls, lambda host: "tls ok sni=%s local=%s\n" % (sni, local))
            try:
                tls.unwrap()
            except (ssl.SSLError, OSError, ValueError):
                pass
        finally:
            tls.close()

    return handler


def svc_origdst(conn, label=None):
    orig = "none"
    try:
        if conn.family == socket.AF_INET:
            raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port = struct.unpack("!H", raw[2:4])[0]
            orig = "%s:%d" % (socket.inet_ntop(socket.AF_INET, raw[4:8]), port)
        else:
            raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
            port = struct.unpack("!H", raw[2:4])[0]
            orig = "[%s]:%d" % (socket.inet_ntop(socket.AF_INET6, raw[8:24]), port)
    except OSError:
        pass
    prefix = b"" if label is None else label.encode() + b" "
    conn.sendall(b"%sORIGDST %s\n" % (prefix, orig.encode()))
    svc_echo(conn)


# ---------------------------------------------------------------- plumbing


def serve_conn(handler, conn):
    try:
        handler(conn)
    except (OSError, ssl.SSLError, ValueError):
        pass
    finally:
        try:
            conn.close()
        except OSError:
            pass


_log_lock = threading.Lock()


def log_accept(conn, peer):
    line = "ACCEPT %s %s\n" % (local_of(conn), fmt_addr(peer))
    with _log_lock:
        sys.stdout.write(line)
        sys.stdout.flush()


def accept_loop(lsock, handler):
    while True:
        try:
            conn, peer = lsock.accept()
        except OSError:
            time.sleep(0.01)
            continue
        log_accept(conn, peer)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=serve_conn, args=(handler, conn), daemon=True).start()


def listen(family, port, addr=None, kind=socket.SOCK_STREAM):
    s = socket.socket(family, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((addr or "::", port))
    else:
        s.bind((addr or "0.0.0.0", port))
    if kind == socket.SOCK_STREAM:
        s.listen(4096)
    return s


def udp_echo_loop(s):
    while True:
        try:
            data, peer = s.recvfrom(2048)
            s.sendto(data, peer)
        except OSError:
            time.sleep(0.01)


def listen_specs(specs):
    """The threads of ``--listen``: one per ``tcp/ADDR/PORT/LABEL`` or ``udp/ADDR/PORT``."""
    threads = []
    for spec in specs:
        parts = spec.split("/")
        kind, addr, port = parts[0], parts[1], int(parts[2])
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        if kind == "tcp":
            label = parts[3]
            s = listen(family, port, addr)
            handler = lambda conn, label=label: svc_origdst(conn, label)
            threads.append(threading.Thread(target=accept_loop, args=(s, handler), daemon=True))
        elif kind == "udp":
            s = listen(family, port, addr, socket.SOCK_DGRAM)
            threads.append(threading.Thread(target=udp_echo_loop, args=(s,), daemon=True))
        else:
            raise SystemExit("bad --listen spec %r" % spec)
    return threads


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--origdst", type=int, help="run only the fake-proxy listener on this port")
    ap.add_argument("--listen", nargs="+", help="run only these listeners (see above)")
    args = ap.parse_args()

    if args.listen:
        for t in listen_specs(args.listen):
            t.start()
        sys.stdout.write("READY\n")
        sys.stdout.flush()
        threading.Event().wait()
    if args.origdst:
        services = {args.origdst: svc_origdst}
    else:
        tls = svc_tls(make_tls_context(args.cert, args.key))
        services = {
            443: tls,
            8443: tls,
            80: svc_http,
            8080: svc_http,
            7000: svc_echo,
            7001: svc_halfclose,
            7003: svc_reset,
            2222: svc_banner,
            9000: svc_bulk,
        }

    socks = []
    for port, handler in services.items():
        for family in (socket.AF_INET, socket.AF_INET6):
            socks.append((listen(family, port), handler))
    for s, handler in socks:
        threading.Thread(target=accept_loop, args=(s, handler), daemon=True).start()
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    threading.Event().wait()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
