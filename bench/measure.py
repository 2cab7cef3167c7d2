#!/usr/bin/env python3
"""Time WAL archiving tools the way PostgreSQL calls them: one process per segment.

Usage:
    measure.py run SPEC.json RESULTS.json
    measure.py report RESULTS.json REPORT.md   (prints the tables, writes the markdown)

SPEC.json (written by bench/run.sh):
    {
      "segments_dir": "/abs/dir",          # the real segments; their sha256 is the reference
      "segments": ["0000000100...", ...],  # consecutive names, in order
      "server_pids": [1234],               # helpers of ours (the S3 server): CPU not "other"
      "combos": [                          # the comparison, interleaved per segment
        {"tool": "wal-rs", "store": "local",
         "env": {"WALRS_STORE": "file:///..."},
         "warmup": [["/abs/wal-rs", "--version"]],
         "push": ["/abs/wal-rs", "wal-push", "/abs/segs/{name}"], "push_cwd": "/abs",
         "fetch": ["/abs/wal-rs", "wal-fetch", "{name}", "/abs/r/pg_wal/RECOVERYXLOG"],
         "fetch_cwd": "/abs/r", "fetch_dest": "/abs/r/pg_wal/RECOVERYXLOG",
         "log": "/abs/walrs-local.log", "stored": ["/abs/store/dir"]},
        ...
      ],
      "scenarios": [                       # run alone afterwards, not interleaved
        {... same keys ..., "ready_dir": "/abs/d/pg_wal/archive_status"}
      ]
    }

Why it is built this way:
- Every tool invocation is a fresh process, sequential, exactly one per segment, as
  PostgreSQL's archiver and startup process do. Process start-up cost is part of what
  PostgreSQL pays, so it is part of the figure.
- The comparison's combinations are interleaved per segment (push segment i with every
  tool, then segment i+1, ...), and the order rotates from one segment to the next. This
  machine has 2 cores and another job may be using one: interleaving spreads that noise
  over all tools evenly instead of penalising whichever tool ran during a compile.
- Wall time comes from time.perf_counter() around fork/exec/wait; CPU time from
  os.wait4(), the rusage of that one child; peak RSS from GNU time's %M (see run_one: a
  child's ru_maxrss would include this Python process's pages at fork time).
- This script is a child subreaper: a process a tool leaves running in the background (a
  detached prefetcher, say) becomes our child when its parent exits, so we can wait for
  it and count its CPU. In the comparison, each process's leftovers are waited for before
  the next tool starts (untimed, but reported), so no tool's background work lands in
  another tool's timing. Scenarios let background work overlap, as it would in PostgreSQL,
  and count the wait for it at the end in their total.
- After each fetch, the restored file's sha256 is compared with the original, outside the
  timed section; any mismatch or non-zero exit aborts the whole benchmark. The restored
  file is then deleted, as PostgreSQL deletes RECOVERYXLOG, so every fetch creates a file.
"""

import ctypes
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
BACKGROUND_DEADLINE_SECS = 120


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                return h.hexdigest()
            h.update(chunk)


def cpu_busy_seconds():
    """Non-idle CPU time of the whole machine, all cores, in seconds (from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid):
    """user + system CPU time of one process (e.g. the S3 server), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def wait_for_quiet(max_secs, threshold=0.2, window=0.5, needed=3):
    """Waits (at most max_secs) until the machine has been nearly idle for a few windows in
    a row: nothing of ours runs now, so any busy CPU time is someone else's build or test.
    Returns the seconds waited, or None if it never became quiet."""
    start = time.perf_counter()
    calm = 0
    while time.perf_counter() - start < max_secs:
        b0, t0 = cpu_busy_seconds(), time.perf_counter()
        time.sleep(window)  # the sampling window of the measurement, not a synchronisation
        share = (cpu_busy_seconds() - b0) / (time.perf_counter() - t0)
        calm = calm + 1 if share < threshold else 0
        if calm >= needed:
            return time.perf_counter() - start
    return None


class Background:
    """Processes left behind by the tools, adopted by this subreaper."""

    def __init__(self):
        self.cpu = 0.0
        self.count = 0

    def _reaped(self, usage):
        self.cpu += usage.ru_utime + usage.ru_stime
        self.count += 1

    def reap_finished(self):
        """Reaps leftovers that have already exited, without waiting."""
        while True:
            try:
                pid, _, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._reaped(usage)

    def wait_all(self):
        """Waits until every leftover has exited (they are all our children by now)."""

        def too_long(*_):
            raise TimeoutError

        old = signal.signal(signal.SIGALRM, too_long)
        signal.alarm(BACKGROUND_DEADLINE_SECS)
        try:
            while True:
                try:
                    _, _, usage = os.wait4(-1, 0)
                except ChildProcessError:
                    return
                self._reaped(usage)
        except TimeoutError:
            sys.exit(f"FAILED: background processes still running after {BACKGROUND_DEADLINE_SECS} s")
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)


# Peak RSS goes through GNU time. A child's ru_maxrss also counts what its parent had
# mapped when it forked, before exec: a tool started straight from this script would show
# Python's own 10-20 MiB. GNU time is small (about 1 MiB), so the %M it reports for the
# tool it starts is the tool's own.
GNU_TIME = "/usr/bin/time"
RSS_FILE = None  # set by run(): where GNU time writes the peak RSS


def run_one(argv, env, cwd, log):
    """Runs argv once; returns (milliseconds, peak RSS KiB, CPU seconds). Exits on failure."""
    log.write(f"$ (cd {cwd} && {' '.join(argv)})\n")
    log.flush()
    wrapped = [GNU_TIME, "-f", "%M", "-o", RSS_FILE, *argv]
    start = time.perf_counter()
    proc = subprocess.Popen(wrapped, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed_ms = (time.perf_counter() - start) * 1000.0
    proc.returncode = os.waitstatus_to_exitcode(status)  # keep Popen from waiting again
    if proc.returncode != 0:
        sys.exit(f"FAILED (exit {proc.returncode}): {' '.join(argv)}\n  see {log.name}")
    with open(RSS_FILE) as f:
        rss_kib = int(f.read().split()[-1])
    # CPU time: GNU time's own (well under a millisecond) plus the tool's.
    return elapsed_ms, rss_kib, usage.ru_utime + usage.ru_stime


class Combo:
    def __init__(self, spec):
        self.spec = spec
        self.label = f"{spec['tool']} ({spec['store']})"
        # Settings come only from the spec: drop any the caller's shell had exported.
        base = {k: v for k, v in os.environ.items() if not k.startswith(("WALRS_", "AWS_", "PGBACKREST_"))}
        self.env = {**base, **spec.get("env", {})}
        self.log = open(spec["log"], "a")
        self.samples = {"push": [], "fetch": []}
        self.background = Background()

    def warm_up(self):
        # Load each binary and its libraries into the page cache with a command that
        # touches no store, so the first timed segment is not a cold-disk outlier.
        for argv in self.spec.get("warmup", []):
            run_one(argv, self.env, self.spec["fetch_cwd"], self.log)

    def step(self, phase, name, originals):
        """One push or fetch of one segment; returns its CPU seconds."""
        argv = [part.format(name=name) for part in self.spec[phase]]
        ms, rss, cpu = run_one(argv, self.env, self.spec[f"{phase}_cwd"], self.log)
        self.samples[phase].append({"segment": name, "ms": ms, "rss_kib": rss, "cpu_ms": cpu * 1000.0})
        if phase == "push" and self.spec.get("ready_dir"):
            # What PostgreSQL's archiver does after archive_command succeeds.
            ready = os.path.join(self.spec["ready_dir"], name)
            os.rename(ready + ".ready", ready + ".done")
        if phase == "fetch":
            dest = self.spec["fetch_dest"]
            got = sha256_file(dest)
            if got != originals[name]:
                sys.exit(f"FAILED: {self.label} restored {name} with sha256 {got}, the original has {originals[name]}")
            os.unlink(dest)
        return cpu

    def result(self):
        stored = 0
        for root in self.spec.get("stored", []):
            for dirpath, _, files in os.walk(root):
                stored += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
        return {
            "tool": self.spec["tool"],
            "store": self.spec["store"],
            "note": self.spec.get("note", ""),
            "stored_bytes": stored,
            "background_processes": self.background.count,
            "background_cpu_ms": self.background.cpu * 1000.0,
            **self.samples,
        }


def dir_usage(path):
    """(files, bytes) under path; (0, 0) if it does not exist."""
    files = size = 0
    for dirpath, _, names in os.walk(path):
        for f in names:
            files += 1
            size += os.path.getsize(os.path.join(dirpath, f))
    return [files, size]


def progress(text):
    if sys.stderr.isatty():
        print(f"  {text}" + " " * 10, file=sys.stderr, end="\r", flush=True)


def run(spec_path, results_path):
    with open(spec_path) as f:
        spec = json.load(f)
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        sys.exit("FAILED: cannot become a child subreaper (prctl)")
    global RSS_FILE
    RSS_FILE = results_path + ".rss"
    names = spec["segments"]
    originals = {n: sha256_file(os.path.join(spec["segments_dir"], n)) for n in names}
    combos = [Combo(c) for c in spec["combos"]]
    scenarios = [Combo(c) for c in spec.get("scenarios", [])]
    for c in combos + scenarios:
        c.warm_up()
    max_wait = float(spec.get("wait_quiet_secs", 0))
    waited = wait_for_quiet(max_wait) if max_wait > 0 else 0.0
    if waited is None:
        print(f"  the machine stayed busy for {max_wait:.0f} s; measuring anyway", file=sys.stderr)
    elif waited > 2:
        print(f"  waited {waited:.0f} s for other work on the machine to pause", file=sys.stderr)

    # The machine is shared: account for the CPU time that was not ours during the
    # comparison (all cores' busy time, minus the tools and their leftovers, the S3
    # server and this script).
    servers = spec.get("server_pids", [])
    wall0, busy0 = time.perf_counter(), cpu_busy_seconds()
    servers0 = sum(process_cpu_seconds(p) for p in servers)
    self0 = sum(os.times()[:2])
    ours = 0.0
    for phase in ("push", "fetch"):
        for i, name in enumerate(names):
            k = i % len(combos)
            for c in combos[k:] + combos[:k]:
                ours += c.step(phase, name, originals)
                before = c.background.cpu
                c.background.wait_all()  # nothing of this tool may run during the next one
                ours += c.background.cpu - before
            progress(f"comparison: {phase} {i + 1}/{len(names)}")
        checked = "every restored file's sha256 matched" if phase == "fetch" else "all exited 0"
        print(f"  comparison, {phase}: {len(names)} segments x {len(combos)} tools/stores, {checked}" + " " * 10,
              file=sys.stderr)
    wall = time.perf_counter() - wall0
    ours += sum(process_cpu_seconds(p) for p in servers) - servers0 + sum(os.times()[:2]) - self0
    other = max(0.0, cpu_busy_seconds() - busy0 - ours)
    floor = fetch_floor(combos, spec)

    # Scenarios: one tool alone, its background work overlapping its next calls as it
    # would under PostgreSQL; each phase's total includes waiting for that work to end.
    totals = {}
    for c in scenarios:
        for phase in ("push", "fetch"):
            t0 = time.perf_counter()
            for i, name in enumerate(names):
                c.step(phase, name, originals)
                c.background.reap_finished()
                progress(f"{c.label} {c.spec.get('note', '')}: {phase} {i + 1}/{len(names)}")
            t_last = time.perf_counter()
            c.background.wait_all()
            totals[(c.label, phase)] = (time.perf_counter() - t_last) * 1000.0
        print(f"  scenario {c.label} {c.spec.get('note', '')}: {len(names)} pushes and fetches, sha256 matched"
              + " " * 10, file=sys.stderr)

    out = {
        "segments": names,
        "measure_seconds": wall,
        "cores": os.cpu_count(),
        "other_cpu_seconds": other,
        "waited_for_quiet_seconds": waited,
        "fetch_floor": floor,
        "combos": [c.result() for c in combos],
        "scenarios": [
            {
                **c.result(),
                "push_drain_ms": totals[(c.label, "push")],
                "fetch_drain_ms": totals[(c.label, "fetch")],
                "left_behind": {label: dir_usage(path) for label, path in c.spec.get("left_behind", {}).items()},
            }
            for c in scenarios
        ],
    }
    with open(results_path, "w") as f:
        json.dump(out, f, indent=1)


def fetch_floor(combos, spec):
    """The least a verified wal-fetch of one segment can take here, from two measurements:
    the same wal-fetch process for a name that is not in the store (start-up, configuration,
    one store lookup, exit 1), and sha256 of a segment's 16 MiB in OpenSSL (SHA-NI; the
    hash wal-fetch must finish before it hands the file over, which nothing else can
    shorten). Decompression and writing run beside the hash and add nothing here only if
    they overlap it perfectly."""
    walrs = next((c for c in combos if c.spec["tool"] == "wal-rs" and c.spec["store"] == "local"), None)
    if walrs is None:
        return None
    missing = "%s%08X" % (spec["segments"][-1][:16], 0xFF)
    argv = [part.format(name=missing) for part in walrs.spec["fetch"]]
    process_ms = []
    for _ in range(15):
        start = time.perf_counter()
        code = subprocess.call(argv, env=walrs.env, cwd=walrs.spec["fetch_cwd"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        process_ms.append((time.perf_counter() - start) * 1000.0)
        if code != 1:
            sys.exit(f"FAILED: wal-fetch of {missing}, which is not in the store, exited {code}, not 1")
    hash_ms = []
    for name in spec["segments"][:8]:
        with open(os.path.join(spec["segments_dir"], name), "rb") as f:
            data = f.read()
        start = time.perf_counter()
        h = hashlib.sha256()
        for off in range(0, len(data), 256 << 10):
            h.update(data[off:off + (256 << 10)])
        h.digest()
        hash_ms.append((time.perf_counter() - start) * 1000.0)
    return {"missing_name_fetch_ms": sorted(process_ms)[len(process_ms) // 2],
            "sha256_16mib_ms": sorted(hash_ms)[len(hash_ms) // 2]}


def pct(values, p):
    """Nearest-rank percentile: the smallest sample with at least p% of samples at or below it."""
    s = sorted(values)
    return s[max(0, math.ceil(p / 100.0 * len(s)) - 1)]


def summarize(c):
    st = {}
    for phase in ("push", "fetch"):
        ms = [s["ms"] for s in c[phase]]
        st[phase] = {
            "p50": pct(ms, 50),
            "p95": pct(ms, 95),
            "sum": sum(ms),
            "rss_mib": max(s["rss_kib"] for s in c[phase]) / 1024.0,
            "cpu_p50": pct([s["cpu_ms"] for s in c[phase]], 50),
        }
    st["stored_mib"] = c["stored_bytes"] / 1048576.0
    return st


def report(results_path, md_path):
    with open(results_path) as f:
        res = json.load(f)
    meta = json.loads(os.environ.get("BENCH_META", "{}"))
    n = len(res["segments"])
    stats = {(c["tool"], c["store"]): summarize(c) for c in res["combos"]}

    lines = [
        "| tool | store | push p50 ms | push p95 ms | fetch p50 ms | fetch p95 ms | push peak RSS MiB | fetch peak RSS MiB | stored MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in res["combos"]:
        st = stats[(c["tool"], c["store"])]
        lines.append(
            f"| {c['tool']} | {c['store']} | {st['push']['p50']:.1f} | {st['push']['p95']:.1f} | "
            f"{st['fetch']['p50']:.1f} | {st['fetch']['p95']:.1f} | "
            f"{st['push']['rss_mib']:.1f} | {st['fetch']['rss_mib']:.1f} | {st['stored_mib']:.1f} |"
        )
    leftovers = [c for c in res["combos"] if c["background_processes"]]

    verdict = []
    ok_all = True
    w = stats.get(("wal-rs", "local"))
    p = stats.get(("pgBackRest", "local"))
    if w and p:
        for phase, label in (("push", "wal-push"), ("fetch", "wal-fetch")):
            ratio = p[phase]["p50"] / w[phase]["p50"]
            ok = ratio >= 2.0
            ok_all &= ok
            verdict.append(
                f"- {label} vs pgBackRest archive-{'push' if phase == 'push' else 'get'}, local store, p50: "
                f"{p[phase]['p50']:.1f} / {w[phase]['p50']:.1f} ms = **{ratio:.2f}x** faster "
                f"(target >= 2x): **{'met' if ok else 'MISSED'}**; all {n} in total: "
                f"{p[phase]['sum']:.0f} / {w[phase]['sum']:.0f} ms = {p[phase]['sum'] / w[phase]['sum']:.2f}x"
            )
    if w:
        rss = w["push"]["rss_mib"]
        ok = rss <= 32.0
        ok_all &= ok
        verdict.append(
            f"- peak RSS of one wal-push (max over {n} processes, local store): **{rss:.1f} MiB** "
            f"(target <= 32 MiB): **{'met' if ok else 'MISSED'}**"
        )
    floor = res.get("fetch_floor")
    if floor and w and p:
        least = floor["missing_name_fetch_ms"] + floor["sha256_16mib_ms"]
        verdict.append(
            f"- the floor for a verified wal-fetch here: {least:.1f} ms = a wal-fetch process that finds nothing "
            f"({floor['missing_name_fetch_ms']:.1f} ms, start to exit) + sha256 of 16 MiB in OpenSSL with SHA-NI "
            f"({floor['sha256_16mib_ms']:.1f} ms), without GNU time's wrapper; at that floor wal-fetch would be "
            f"{p['fetch']['p50'] / least:.2f}x pgBackRest's p50 ({w['fetch']['p50']:.1f} ms measured)"
        )
    for c in leftovers:
        verdict.append(
            f"- note: {c['tool']} ({c['store']}) left {c['background_processes']} background processes "
            f"({c['background_cpu_ms']:.0f} ms CPU in all), waited for outside the timings"
        )

    cpu_lines = ["| tool | store | push CPU p50 ms | fetch CPU p50 ms |", "|---|---|---:|---:|"]
    for c in res["combos"]:
        st = stats[(c["tool"], c["store"])]
        cpu_lines.append(f"| {c['tool']} | {c['store']} | {st['push']['cpu_p50']:.1f} | {st['fetch']['cpu_p50']:.1f} |")

    secs = res.get("measure_seconds", 0.0)
    other = res.get("other_cpu_seconds", 0.0)
    share = other / secs if secs else 0.0
    busy_note = (
        f"Other work on the machine used {other:.1f} CPU-seconds during the {secs:.0f} s of the comparison, "
        f"{share * 100:.0f}% of one core on average (of {res.get('cores', '?')} cores; kernel writeback counts here too)."
    )
    if "waited_for_quiet_seconds" in res:
        w_q = res["waited_for_quiet_seconds"]
        busy_note += (" The machine never went quiet before timing started." if w_q is None
                      else f" Timing started after waiting {w_q:.0f} s for the machine to go quiet.")
    if share > 0.25:
        busy_note += " WARNING: the machine was busy; absolute times are inflated, re-run on a quiet machine."

    scen_lines = []
    if res.get("scenarios"):
        scen_lines = [
            f"| tool | store | settings | push p50 ms | push p95 ms | {n} pushes, sum ms | fetch p50 ms | fetch p95 ms "
            f"| {n} fetches, sum ms | background still running after the last fetch, ms | background processes "
            "| background CPU ms |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        left = []
        for c in res["scenarios"]:
            st = summarize(c)
            scen_lines.append(
                f"| {c['tool']} | {c['store']} | {c['note']} | {st['push']['p50']:.1f} | {st['push']['p95']:.1f} | "
                f"{st['push']['sum']:.0f} | {st['fetch']['p50']:.1f} | {st['fetch']['p95']:.1f} | "
                f"{st['fetch']['sum']:.0f} | {c['fetch_drain_ms']:.0f} | {c['background_processes']} | "
                f"{c['background_cpu_ms']:.0f} |"
            )
            for label, (files, size) in c.get("left_behind", {}).items():
                left.append(f"{c['tool']} ({c['store']}, {c['note']}): {files} files, {size / 1048576:.0f} MiB left in {label}")
        ref = [
            f"{c['tool']} ({c['store']}) {stats[(c['tool'], c['store'])]['push']['sum']:.0f} / "
            f"{stats[(c['tool'], c['store'])]['fetch']['sum']:.0f}"
            for c in res["combos"]
        ]
        scen_lines += ["", f"For comparison, {n} pushes / {n} fetches, sum (ms), in the comparison above: " + "; ".join(ref) + "."]
        if left:
            scen_lines += ["", "After everything ended: " + "; ".join(left) + "."]

    table = "\n".join(lines)
    print()
    print(f"Comparison: {n} real 16 MiB segments, one process per segment; p50/p95 are nearest-rank over {n} processes")
    print(table)
    print()
    print("\n".join(verdict))
    print()
    print(busy_note)
    if scen_lines:
        print()
        print("Alone, with background work (not part of the targets):")
        print("\n".join(scen_lines))

    md = [
        "# WAL archiving benchmark: wal-rs vs pgBackRest",
        "",
        f"- date: {meta.get('date', '?')}",
        f"- machine: {meta.get('machine', '?')}",
        f"- load average before / after the run: {meta.get('load_before', '?')} / {meta.get('load_after', '?')}",
        "  (this machine is shared: the other core may have been busy with builds or tests; see the CPU note below)",
        f"- wal-rs: {meta.get('walrs', '?')}",
        f"- pgBackRest: {meta.get('pgbackrest', '?')} (archive-push synchronous, compress-type=lz4, posix repository)",
        f"- PostgreSQL: {meta.get('postgres', '?')}",
        f"- segments: {n} consecutive real pgbench segments, {res['segments'][0]} .. {res['segments'][-1]}",
        f"- all tools ran as user `{meta.get('user', '?')}`, one process per segment, sequentially; every fetched "
        "file's sha256 matched the original",
        f"- command: `{meta.get('command', 'make bench')}`; whole run took {meta.get('elapsed', '?')}",
        "",
        "## Comparison (interleaved per segment; wal-rs with prefetch and push-ahead off, like pgBackRest synchronous)",
        "",
        table,
        "",
        "Ratios and targets:",
        "",
        *verdict,
        "",
        busy_note,
        "",
        "CPU time (user + system) of one process, median. When it is above the wall time, the tool used both cores.",
        "",
        *cpu_lines,
        "",
        "Columns: wall time of one process in milliseconds, from start to exit, which is how long PostgreSQL waits for it.",
        "Peak RSS is the largest GNU time `%M` of any one process in that row. Stored MiB is what the",
        f"{n} segments ({n * 16} MiB) occupy in the store after the run.",
        "",
    ]
    if scen_lines:
        md += [
            "## wal-rs alone with its defaults (not part of the targets)",
            "",
            "The segments sit in a pg_wal with all of them `.ready`, a backlog, and are pushed in order. Each",
            "`.ready` is renamed to `.done` after the push, as PostgreSQL's archiver does. Fetches run",
            "back to back, with no replay time between them, while the prefetcher works in the background.",
            "Sums cover the processes PostgreSQL waits for. The background columns show what runs besides them.",
            "",
            *scen_lines,
            "",
        ]
    md += [
        "## Every process of the comparison, in milliseconds",
        "",
        "The first few segments come from pgbench's bulk load, and the rest from pgbench transactions. A",
        "checkpoint runs every few segments (max_wal_size = 128MB), so the segment right after each one",
        "is full of page images and compresses less: those are the slow ones that make up the p95.",
        "",
        "| segment | " + " | ".join(f"{c['tool']} {c['store']} push" for c in res["combos"]) + " | "
        + " | ".join(f"{c['tool']} {c['store']} fetch" for c in res["combos"]) + " |",
        "|---|" + "---:|" * (2 * len(res["combos"])),
        *[
            f"| {name} | "
            + " | ".join(f"{c['push'][i]['ms']:.0f}" for c in res["combos"]) + " | "
            + " | ".join(f"{c['fetch'][i]['ms']:.0f}" for c in res["combos"]) + " |"
            for i, name in enumerate(res["segments"])
        ],
        "",
    ]
    with open(md_path, "w") as f:
        f.write("\n".join(md))
    return 0 if ok_all else 3


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "run":
        run(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 4 and sys.argv[1] == "report":
        sys.exit(report(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(__doc__)
