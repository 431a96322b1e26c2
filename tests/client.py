#!/usr/bin/env python3
"""One client connection for the namespace tests (standard library only).

    python3 tests/client.py tcp|udp ADDR PORT [MARK]

Started by tests/common/lone.rs (`Netns::client`) inside a namespace, as
whichever uid the test names (the redirect rules match on it). Prints one
line: what came back, or ``ERR <kind>``. MARK sets SO_MARK first. From the
environment: ``CLIENT_TIMEOUT`` (seconds, default 3) and ``CLIENT_SPORT``
(bind that source port first). UDP sends ``ping`` and also prints how long
the answer took (``ms=N``); a send refused locally (EPERM: the packet was
rejected in OUTPUT) is noted as ``send=...`` and the client still reads,
where the ICMP error shows as ECONNREFUSED.
"""

import os
import socket
import sys
import time

SO_MARK = 36

kind, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
if len(sys.argv) > 4:
    s.setsockopt(socket.SOL_SOCKET, SO_MARK, int(sys.argv[4], 0))
s.settimeout(float(os.environ.get("CLIENT_TIMEOUT", "3")))
if os.environ.get("CLIENT_SPORT"):
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", int(os.environ["CLIENT_SPORT"])))
t = time.monotonic()
note = ""
try:
    s.connect((addr, port))
    if kind == "udp":
        try:
            s.send(b"ping")
        except OSError as e:
            note = " send=%s" % type(e).__name__
    data = s.recv(200).decode().strip()
    print("%s ms=%d" % (data, (time.monotonic() - t) * 1000) if kind == "udp" else data)
except socket.timeout:
    print("ERR timeout" + note)
except OSError as e:
    print("ERR %s ms=%d%s" % (type(e).__name__, (time.monotonic() - t) * 1000, note))
