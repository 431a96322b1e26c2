#!/usr/bin/env python3
"""Whole-machine CPU accounting for one measurement, with other users' processes set apart.

    cpuacct.py snap [--self PID] NETNS_NAME... > FILE     # a snapshot
    cpuacct.py delta FILE0 FILE1             # JSON: machine busy seconds, others', ours

On veth the receive work of a flow runs in the sender's softirq, so one process's CPU time
misleads: the benchmark counts the busy time of the whole machine from /proc/stat. This machine
is shared, though (compilers, fuzzers), so a snapshot also sums the CPU time of every user-space
process that is neither in the benchmark's network namespaces nor the benchmark script or one of
its descendants (`--self`) ("others"); `ours` = machine busy - others: the benchmark's
processes, the kernel's interrupt/softirq work and kernel threads. Other processes that exit
inside the interval are not seen, so their CPU there counts as ours: `ours` errs high, never
low, and more so on a busy machine (the result file keeps the raw figures too).
"""
import json
import os
import sys

HZ = os.sysconf("SC_CLK_TCK")
PF_KTHREAD = 0x00200000


def ns_inode(path):
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def snap(netns_names, self_pid=None):
    ours = {ns_inode(f"/run/netns/{n}") for n in netns_names} - {None}
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
    total = busy + v[3] + v[4]
    procs = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                st = f.read()
            fields = st[st.rindex(")") + 2:].split()
            if int(fields[6]) & PF_KTHREAD:
                continue
            if ns_inode(f"/proc/{pid}/ns/net") in ours:
                continue
            # ppid; utime stime (fields 4, 14-15 of proc_pid_stat(5)). Not cutime: a parent
            # reaping a long-lived child would add that child's whole life to the interval.
            procs[pid] = (fields[1], int(fields[11]) + int(fields[12]))
        except (OSError, ValueError, IndexError):
            continue
    mine = {str(self_pid)} if self_pid else set()
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _) in procs.items():
            if ppid in mine and pid not in mine:
                mine.add(pid)
                grew = True
    others = {pid: t for pid, (_, t) in procs.items() if pid not in mine}
    return {"busy": busy, "total": total, "others": others}


def delta(a, b):
    others = 0
    for pid, t in b["others"].items():
        others += t - a["others"].get(pid, 0) if pid in a["others"] else t
    others = max(others, 0)
    busy = b["busy"] - a["busy"]
    return {"machine_busy_s": round(busy / HZ, 3),
            "others_s": round(others / HZ, 3),
            "ours_s": round(max(busy - others, 0) / HZ, 3),
            "util": round(busy / max(b["total"] - a["total"], 1), 3)}


def main():
    if len(sys.argv) >= 2 and sys.argv[1] == "snap":
        args, self_pid = sys.argv[2:], None
        if args[:1] == ["--self"]:
            self_pid, args = int(args[1]), args[2:]
        json.dump(snap(args, self_pid), sys.stdout)
    elif len(sys.argv) == 4 and sys.argv[1] == "delta":
        with open(sys.argv[2]) as f:
            a = json.load(f)
        with open(sys.argv[3]) as f:
            b = json.load(f)
        print(json.dumps(delta(a, b)))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
