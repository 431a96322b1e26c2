#!/usr/bin/env python3
"""Turns one bench run into its result file and a Markdown table of ratios.

    report.py collect RESULTS.jsonl OUT.json --meta key=value ...
    report.py table OUT.json            # the tables for bench/README.md

Higher is better for throughput and churn rate; lower for CPU per GiB, latency, memory.
Targets (issue 6), each against the best peer (Envoy, HAProxy, nginx) for that metric:
  throughput >= 1.1x; whole-machine CPU per GiB <= 0.7x; churn rate >= 1.1x with a lower p99;
  idle memory <= 3 KiB per flow.
"""
import json
import sys

PEERS = ["envoy", "haproxy", "nginx"]
OURS = "portcullis"
RELAYS = ["portcullis", "portcullis-copy8k", "portcullis-copy256k", "tokio-splice"]


def collect(src, out, meta):
    results = {}
    with open(src) as f:
        for line in f:
            line = line.strip()
            if line:
                r = json.loads(line)
                results[r.pop("target")] = r
    doc = {"meta": meta, "results": results}
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def dig(r, *path):
    for p in path:
        if not isinstance(r, dict) or r.get(p) is None:
            return None
        r = r[p]
    return r


def metrics(results):
    """(label, path, unit, higher_is_better, fmt)"""
    rows = [
        ("bulk 1 flow: throughput", ("bulk", "gbit_s"), "Gbit/s", True),
        ("bulk 1 flow: machine CPU per GiB", ("bulk", "cpu_s_per_gib"), "CPU-s/GiB", False),
        ("bulk 16 flows: throughput", ("bulk16", "gbit_s"), "Gbit/s", True),
        ("bulk 16 flows: machine CPU per GiB", ("bulk16", "cpu_s_per_gib"), "CPU-s/GiB", False),
        ("bulk 1 flow: raw machine CPU per GiB, other users included", ("bulk", "machine_cpu_s_per_gib"), "CPU-s/GiB", False),
        ("bulk 16 flows: raw machine CPU per GiB, other users included", ("bulk16", "machine_cpu_s_per_gib"), "CPU-s/GiB", False),
        ("bulk 1 flow: proxy process CPU per GiB", ("bulk", "proxy_cpu_s_per_gib"), "CPU-s/GiB", False),
        ("bulk 16 flows: proxy process CPU per GiB", ("bulk16", "proxy_cpu_s_per_gib"), "CPU-s/GiB", False),
    ]
    cases = []
    for r in results.values():
        for k in (r.get("churn") or {}):
            if k not in cases:
                cases.append(k)
    for c in cases:
        kind, conc = c.split("_c")
        name = f"churn {kind.upper()} c={conc}"
        rows += [
            (f"{name}: flows/s", ("churn", c, "rate"), "flows/s", True),
            (f"{name}: p50 TTFB", ("churn", c, "p50_us"), "µs", False),
            (f"{name}: p99 TTFB", ("churn", c, "p99_us"), "µs", False),
            (f"{name}: p99.9 TTFB", ("churn", c, "p999_us"), "µs", False),
            (f"{name}: proxy CPU per flow", ("churn", c, "proxy_cpu_us_per_flow"), "µs", False),
        ]
    rows.append(("proxy RSS with 0 flows (after warm-up)", ("memory", "rss_kb_before"), "KiB", False))
    rows.append(("idle flows: proxy RSS per flow", ("memory", "kib_per_flow"), "KiB", False))
    rows.append(("idle flows: proxy fds per flow", ("memory", "fds_per_flow"), "fds", False))
    rows.append(("idle TLS flows: proxy RSS per flow", ("memory_tls", "kib_per_flow"), "KiB", False))
    rows.append(("idle TLS flows: proxy fds per flow", ("memory_tls", "fds_per_flow"), "fds", False))
    return rows


def fmt(v):
    if v is None:
        return "–"
    if isinstance(v, float):
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.2f}"
    return f"{v:,}"


def ratio(a, b):
    if a is None or b in (None, 0):
        return None
    return a / b


def best_peer(results, path, higher):
    vals = [(dig(results.get(p), *path), p) for p in PEERS]
    vals = [(v, p) for v, p in vals if v is not None]
    if not vals:
        return None, None
    return (max if higher else min)(vals)


def verdict(results, label, path, higher):
    ours = dig(results.get(OURS), *path)
    if ours is None:
        return ""
    if path in (("memory", "kib_per_flow"), ("memory_tls", "kib_per_flow")):
        return "met" if ours <= 3 else "missed"
    if path[-1] in ("p50_us", "p999_us", "proxy_cpu_s_per_gib", "machine_cpu_s_per_gib") or path in (("memory", "fds_per_flow"), ("memory_tls", "fds_per_flow"), ("memory", "rss_kb_before")):
        return ""
    best, who = best_peer(results, path, higher)
    if best is None:
        return ""
    if path[-1] == "gbit_s":
        ok = ours >= 1.1 * best
    elif path[-1] == "cpu_s_per_gib":
        ok = ours <= 0.7 * best
    elif path[-1] == "rate":
        # >= 1.1x the best peer's rate, and a lower p99 than that peer
        p99 = dig(results.get(OURS), *path[:-1], "p99_us")
        p99_peer = dig(results.get(who), *path[:-1], "p99_us")
        ok = ours >= 1.1 * best and p99 is not None and p99_peer is not None and p99 < p99_peer
    elif path[-1] == "p99_us":
        return ""
    else:
        return ""
    return ("met" if ok else "missed") + f" (best peer: {who})"


def table(doc):
    results, meta = doc["results"], doc["meta"]
    present = [t for t in ["direct", OURS] + PEERS if t in results]
    lines = []
    m = meta
    built = (f"the prebuilt {m['portcullis_prebuilt']} (checkout at {m.get('portcullis_commit')})"
             if m.get("portcullis_prebuilt") else m.get("portcullis_commit"))
    lines.append(f"Run `{m.get('run_id')}`: portcullis {built}"
                 f"{' (+uncommitted src changes)' if m.get('portcullis_dirty', '0') != '0' and not m.get('portcullis_prebuilt') else ''},"
                 f" Envoy {m.get('envoy')}, HAProxy {m.get('haproxy')}, nginx {m.get('nginx')},"
                 f" iperf3 {m.get('iperf3')}; kernel {m.get('kernel')}, {m.get('cpus')} CPUs"
                 f" ({m.get('cpu_model')}); background CPU busy before/after:"
                 f" {m.get('background_busy_before')}/{m.get('background_busy_after')}.")
    lines.append("")
    head = ["metric"] + present + [f"pc/{t}" for t in present if t != OURS] + ["target"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for label, path, unit, higher in metrics(results):
        vals = {t: dig(results.get(t), *path) for t in present}
        if all(v is None for v in vals.values()):
            continue
        ours = vals.get(OURS)
        row = [f"{label} ({unit})"] + [fmt(vals[t]) for t in present]
        row += [fmt(ratio(ours, vals[t])) + ("x" if ratio(ours, vals[t]) is not None else "")
                for t in present if t != OURS]
        row.append(verdict(results, label, path, higher))
        lines.append("| " + " | ".join(row) + " |")
    relays = [t for t in RELAYS if t in results]
    if len(relays) > 1:
        lines.append("")
        lines.append("Relay comparison inside portcullis (same flows; tokio-splice is a bare"
                     " SO_ORIGINAL_DST relay without detection, bench/tools):")
        lines.append("")
        head = ["metric"] + relays + [f"splice/{t}" for t in relays if t != OURS]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for label, path, unit, higher in metrics(results):
            vals = {t: dig(results.get(t), *path) for t in relays}
            if all(v is None for v in vals.values()):
                continue
            ours = vals.get(OURS)
            row = [f"{label} ({unit})"] + [fmt(vals[t]) for t in relays]
            row += [fmt(ratio(ours, vals[t])) + ("x" if ratio(ours, vals[t]) is not None else "")
                    for t in relays if t != OURS]
            lines.append("| " + " | ".join(row) + " |")
    notes = []
    pol = []
    for t, r in results.items():
        p = r.get("policy") or {}
        want = {"tls_listed": "upstream", "tls_unlisted": "denied",
                "http_listed": "upstream", "http_unlisted": "denied"}
        if all(p.get(k) == v for k, v in want.items()):
            pol.append(f"{t}: enforced")
        elif p and all(p.get(k) == "upstream" for k in want):
            pol.append(f"{t}: none (passes everything)")
        else:
            pol.append(f"{t}: {json.dumps(p)}")
    if pol:
        lines.append("")
        lines.append("Policy check (a listed SNI and Host reach the upstream, unlisted ones are"
                     " refused): " + "; ".join(pol) + ".")
    for t, r in results.items():
        for key, what in (("memory", "idle flows"), ("memory_tls", "idle TLS flows")):
            mem = r.get(key) or {}
            if mem.get("failed"):
                notes.append(f"- {t}: {mem['failed']} of the {what} failed"
                             f" ({mem.get('first_error')}); per-flow figures use the"
                             f" {mem.get('established')} established.")
        for c, v in (r.get("churn") or {}).items():
            if v and v.get("errors"):
                notes.append(f"- {t}: churn {c}: {v['errors']} failed flows ({v.get('first_error')}).")
    if notes:
        lines.append("")
        lines += notes
    return "\n".join(lines)


def main():
    if len(sys.argv) >= 4 and sys.argv[1] == "collect":
        meta = {}
        if "--meta" in sys.argv:
            for kv in sys.argv[sys.argv.index("--meta") + 1:]:
                k, _, v = kv.partition("=")
                meta[k] = v
        collect(sys.argv[2], sys.argv[3], meta)
    elif len(sys.argv) == 3 and sys.argv[1] == "table":
        with open(sys.argv[2]) as f:
            print(table(json.load(f)))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
