#!/usr/bin/env python3
"""Time one base-backup command (backup or restore) and report a whole benchmark run.

Usage:
    backup_measure.py time --out RESULTS.jsonl [--tag KEY=VALUE ...] [--env KEY=VALUE ...]
                           [--cwd DIR] [--log FILE] [--size-dir DIR] [--json-stdout]
                           [--tree PID ...] [--quiet-secs N] -- ARGV...
    backup_measure.py report RESULTS.jsonl VERIFY.jsonl META.json REPORT.md REPORT.json

`time` (run as the postgres user by bench/backup.sh) appends one JSON line per command:
wall seconds, peak RSS, CPU time, the CPU time other work on the machine used meanwhile,
and, with --size-dir, how much the store grew. It exits non-zero if the command did.

Why it is built this way:
- Wall time is time.perf_counter() around fork/exec/wait of the whole command, which is
  what an operator waits for: for both tools that includes the checkpoint, reading and
  compressing the data directory, writing the store, and waiting until the backup's WAL is
  in the store (backup), or downloading, checking, writing and fsyncing (restore).
- Peak RSS is GNU time's %M. A child's ru_maxrss would also count the pages this Python
  process had when it forked; GNU time is about 1 MiB, so %M is the tool's own. For a tool
  that starts worker processes (pgBackRest with process-max=2), %M is the largest single
  process of the tree, not the sum: the kernel reports children's peak RSS that way.
- CPU time is the rusage of the command and everything it waited for (pgBackRest's
  workers included). "Other" CPU is the machine's busy time (/proc/stat, all cores) minus
  that, minus the PostgreSQL cluster, the S3 server and the TLS proxy (the process trees
  given with --tree, with their reaped children), minus this script: what someone else's
  build or test took from the 2 cores while we measured.
- Before the clock starts: sync(), so that no command pays for dirty pages another one
  left behind (wal-rs restores end with syncfs(), which flushes the whole file system),
  then a wait of at most --quiet-secs for the machine to be idle for 1.5 s.
- The environment is only what --env gives plus a clean base: WALRS_*, AWS_*,
  PGBACKREST_* and PG* variables of the caller are dropped.
"""

import json
import math
import os
import statistics
import subprocess
import sys
import time

GNU_TIME = "/usr/bin/time"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_busy_seconds():
    """Non-idle CPU time of the whole machine, all cores, in seconds (from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / TICK


def tree_cpu_seconds(roots):
    """CPU time of the processes under `roots` (included), with the children they reaped."""
    if not roots:
        return 0.0
    parent, cpu = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid = int(entry)
        parent[pid] = int(fields[1])
        # utime, stime, cutime, cstime: the children it has reaped are counted in the last two.
        cpu[pid] = sum(int(x) for x in fields[11:15]) / TICK
    wanted = set(roots)
    total = 0.0
    for pid in cpu:
        p, seen = pid, 0
        while p and seen < 64:
            if p in wanted:
                total += cpu[pid]
                break
            p, seen = parent.get(p, 0), seen + 1
    return total


def wait_for_quiet(max_secs, threshold=0.2, window=0.5, needed=3):
    """Waits (at most max_secs) until the machine has been nearly idle for a few windows in
    a row. Returns the seconds waited, or None if it never became quiet."""
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


def dir_bytes(path):
    total = 0
    for dirpath, _, names in os.walk(path):
        for n in names:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_size
            except OSError:
                pass
    return total


def parse_pairs(pairs):
    out = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep:
            sys.exit(f"expected KEY=VALUE, got {p!r}")
        out[k] = v
    return out


def time_command(args):
    opts = {"tag": [], "env": [], "tree": [], "cwd": "/", "log": "/dev/null", "size_dir": None,
            "json_stdout": False, "quiet_secs": 0.0, "out": None}
    i = 0
    while i < len(args) and args[i] != "--":
        a = args[i]
        if a == "--json-stdout":
            opts["json_stdout"] = True
            i += 1
            continue
        key = a[2:].replace("-", "_")
        if key not in opts or i + 1 >= len(args):
            sys.exit(f"unknown or incomplete option {a}\n{__doc__}")
        if isinstance(opts[key], list):
            opts[key].append(args[i + 1])
        else:
            opts[key] = args[i + 1]
        i += 2
    argv = args[i + 1:]
    if not argv or not opts["out"]:
        sys.exit(__doc__)
    tags = parse_pairs(opts["tag"])
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("WALRS_", "AWS_", "PGBACKREST_", "PG"))}
    env = {**base, **parse_pairs(opts["env"])}
    trees = [int(p) for p in opts["tree"]]
    rss_file = opts["out"] + ".rss"

    size_before = dir_bytes(opts["size_dir"]) if opts["size_dir"] else None
    os.sync()
    waited = wait_for_quiet(float(opts["quiet_secs"])) if float(opts["quiet_secs"]) > 0 else 0.0

    with open(opts["log"], "a") as log:
        log.write(f"\n$ (cd {opts['cwd']} && {' '.join(argv)})  # {json.dumps(tags)}\n")
        log.flush()
        stdout = subprocess.PIPE if opts["json_stdout"] else log
        busy0, tree0, self0 = cpu_busy_seconds(), tree_cpu_seconds(trees), sum(os.times()[:2])
        started_at = time.time()
        t0 = time.perf_counter()
        proc = subprocess.Popen([GNU_TIME, "-f", "%M", "-o", rss_file, *argv], env=env, cwd=opts["cwd"],
                                stdin=subprocess.DEVNULL, stdout=stdout, stderr=log)
        out = proc.stdout.read() if opts["json_stdout"] else b""
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # keep Popen from waiting again
        cpu = usage.ru_utime + usage.ru_stime
        ours = tree_cpu_seconds(trees) - tree0 + sum(os.times()[:2]) - self0 + cpu
        other = max(0.0, cpu_busy_seconds() - busy0 - ours)
        if out:
            log.write(out.decode(errors="replace"))
    if proc.returncode != 0:
        sys.exit(f"FAILED (exit {proc.returncode}): {' '.join(argv)}\n  see {opts['log']}")
    with open(rss_file) as f:
        rss_kib = int(f.read().split()[-1])
    record = {
        **tags,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_at)),
        "wall_s": wall,
        "rss_kib": rss_kib,
        "cpu_s": cpu,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
        "other_cpu_s": other,
        "waited_for_quiet_s": waited,
        "argv": argv,
    }
    if size_before is not None:
        record["stored_bytes"] = dir_bytes(opts["size_dir"]) - size_before
    if opts["json_stdout"]:
        try:
            record["output"] = json.loads(out)
        except ValueError:
            record["output"] = None
    with open(opts["out"], "a") as f:
        f.write(json.dumps(record) + "\n")
    note = "" if waited is not None else ", the machine did not go quiet before it"
    print(f"  {tags.get('phase', '?'):7} {tags.get('tool', '?'):10} {tags.get('store', '?'):24} "
          f"scale {tags.get('scale', '?'):>3} round {tags.get('round', '?')}: {wall:6.2f} s, "
          f"peak RSS {rss_kib / 1024:6.1f} MiB, CPU {cpu:5.2f} s, other work {other / wall * 100:3.0f}% of a core{note}",
          flush=True)


# ---------------------------------------------------------------- report

TARGET_BACKUP = 2.5
TARGET_RESTORE = 1.25
TARGET_RSS_MIB = 64.0


def load_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def floor2(x):
    return f"{math.floor(x * 100) / 100:.2f}"


def fmt_s(values):
    return " / ".join(f"{v:.2f}" for v in values) if values else "-"


def report(results_path, verify_path, meta_path, md_path, json_path):
    runs = load_jsonl(results_path)
    verify = load_jsonl(verify_path)
    with open(meta_path) as f:
        meta = json.load(f)
    scale = int(meta["scale"])
    big = int(meta.get("big_scale") or 0)

    def sel(phase, tool, store, sc):
        return [r for r in runs if r["phase"] == phase and r["tool"] == tool and r["store"] == store
                and int(r["scale"]) == sc]

    # Rows in the order they were measured.
    rows = []
    for r in runs:
        key = (r["tool"], r["store"], int(r["scale"]))
        if key not in rows:
            rows.append(key)

    def stats(rs):
        if not rs:
            return None
        w = [r["wall_s"] for r in rs]
        return {"walls": w, "median": statistics.median(w), "min": min(w),
                "rss_mib": max(r["rss_kib"] for r in rs) / 1024.0,
                "cpu_median": statistics.median(r["cpu_s"] for r in rs),
                "other_share": sum(r["other_cpu_s"] for r in rs) / sum(w),
                "stored_mib": (statistics.median(r["stored_bytes"] for r in rs) / 1048576.0
                               if all("stored_bytes" in r for r in rs) else None)}

    table = [
        "| tool | store | scale | backup s (each round) | backup s median / min | restore s (each round) "
        "| restore s median / min | backup peak RSS MiB | restore peak RSS MiB | backup CPU s | restore CPU s "
        "| stored MiB |",
        "|---|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    summary = {}
    for tool, store, sc in rows:
        b, r = stats(sel("backup", tool, store, sc)), stats(sel("restore", tool, store, sc))
        summary[(tool, store, sc)] = (b, r)
        def num(st, key, digits):
            return "-" if not st or st.get(key) is None else f"{st[key]:.{digits}f}"

        def med_min(st):
            return "-" if not st else f"{st['median']:.2f} / {st['min']:.2f}"

        table.append(
            f"| {tool} | {store} | {sc} | {fmt_s(b['walls']) if b else '-'} | {med_min(b)} | "
            f"{fmt_s(r['walls']) if r else '-'} | {med_min(r)} | {num(b, 'rss_mib', 1)} | {num(r, 'rss_mib', 1)} | "
            f"{num(b, 'cpu_median', 2)} | {num(r, 'cpu_median', 2)} | {num(b, 'stored_mib', 0)} |"
        )

    verdicts, ok_all = [], True
    ratio_table = [
        "| comparison | scale | backup: pgBackRest / wal-rs, medians | min / min | backup target >= "
        f"{TARGET_BACKUP}x | restore: pgBackRest / wal-rs, medians | min / min | restore target >= {TARGET_RESTORE}x |",
        "|---|---:|---|---:|---|---|---:|---|",
    ]

    def ratio_row(label, sc, walrs_key, pgbr_key, counts):
        """One comparison: both phases. counts: whether it decides the targets."""
        nonlocal ok_all
        w_all, p_all = summary.get(walrs_key), summary.get(pgbr_key)
        if not w_all or not p_all:
            return
        cells = []
        for idx, target in ((0, TARGET_BACKUP), (1, TARGET_RESTORE)):
            w, p = w_all[idx], p_all[idx]
            if not w or not p:
                cells += ["-", "-", "-"]
                continue
            med, mn = p["median"] / w["median"], p["min"] / w["min"]
            ok = med >= target
            if counts:
                ok_all &= ok
            verdict = f"**{'met' if ok else 'MISSED'}**" if counts else f"({'would meet' if ok else 'would miss'}; reference only)"
            # Shown rounded down, so that a ratio just under the target never reads as the target.
            cells += [f"{p['median']:.2f} / {w['median']:.2f} s = **{floor2(med)}x**", f"{floor2(mn)}x", verdict]
        ratio_table.append(f"| {label} | {sc} | " + " | ".join(cells) + " |")

    def s3_key(tool, sc):
        return next((k for k in rows if k[0] == tool and k[1].startswith("s3") and k[2] == sc), None)

    for sc, counts in ((scale, True), (big, False)):
        if not sc:
            continue
        ratio_row("local stores (wal-rs file://, pgBackRest posix)", sc, ("wal-rs", "local", sc),
                  ("pgBackRest", "local (posix)", sc), counts)
        if s3_key("wal-rs", sc) and s3_key("pgBackRest", sc):
            ratio_row("S3: both on the same s3s-fs (pgBackRest through the TLS proxy)", sc, s3_key("wal-rs", sc),
                      s3_key("pgBackRest", sc), counts)
        if s3_key("wal-rs", sc):
            ratio_row("wal-rs on S3 vs pgBackRest on posix", sc, s3_key("wal-rs", sc),
                      ("pgBackRest", "local (posix)", sc), counts and not s3_key("pgBackRest", sc))
    verdicts += ratio_table
    verdicts.append("")
    # Peak RSS of backup-push, per store, at both scales: at most 64 MiB, and the same.
    rss_table = [
        f"| wal-rs backup-push, store | peak RSS MiB at scale {scale} | peak RSS MiB at scale {big or '-'} "
        f"| growth | target <= {TARGET_RSS_MIB:.0f} MiB at both scales |",
        "|---|---:|---:|---:|---|",
    ]
    for store in dict.fromkeys(k[1] for k in rows if k[0] == "wal-rs"):
        small = summary.get(("wal-rs", store, scale), (None, None))[0]
        large = summary.get(("wal-rs", store, big), (None, None))[0] if big else None
        if not small:
            continue
        peaks = [small["rss_mib"]] + ([large["rss_mib"]] if large else [])
        ok = max(peaks) <= TARGET_RSS_MIB and (not big or large is not None)
        ok_all &= ok
        growth = (f"{large['rss_mib'] - small['rss_mib']:+.1f} MiB ({(large['rss_mib'] / small['rss_mib'] - 1) * 100:+.0f}%)"
                  if large else "-")
        large_cell = f"{large['rss_mib']:.1f}" if large else "(not run)"
        rss_table.append(
            f"| {store} | {small['rss_mib']:.1f} | {large_cell} | {growth} "
            f"| **{'met' if ok else 'MISSED'}** |"
        )
    verdicts += rss_table

    ver_lines = []
    for v in verify:
        ver_lines.append(
            f"- {v['tool']} ({v['store']}), restore of round 1: started on port {v['port']} with archive_mode=off, "
            f"end of recovery after {v['recovery_s']:.1f} s (timeline {v['timeline']}), "
            f"count(*) from pgbench_accounts = {v['count']:,} (expected {v['expected']:,}): "
            f"**{'ok' if v['ok'] else 'WRONG'}**"
        )
        ok_all &= bool(v["ok"])

    other = sum(r["other_cpu_s"] for r in runs)
    measured = sum(r["wall_s"] for r in runs)
    share = other / measured if measured else 0.0
    busy_note = (
        f"Other work on the machine used {other:.1f} CPU-seconds during the {measured:.0f} s of timed commands, "
        f"{share * 100:.0f}% of one core on average (of {meta.get('cores', '?')} cores; kernel writeback counts "
        "here too). Per command in the table below."
    )
    if share > 0.25:
        busy_note += (" WARNING: the machine was busy; absolute times are inflated and tools with more threads "
                      "or processes lose more, so re-run on a quiet machine before trusting a 10-20% difference.")

    every = [
        "| # | phase | tool | store | scale | round | wall s | peak RSS MiB | CPU s (user + sys) | other work, % of a core | stored MiB | detail |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for n, r in enumerate(runs, 1):
        detail = ""
        o = r.get("output") or {}
        if o.get("wal_wait_ms") is not None:
            detail = f"{o.get('name', '')}: {o.get('partitions', '?')} partitions, waited {o['wal_wait_ms']} ms for WAL"
        every.append(
            f"| {n} | {r['phase']} | {r['tool']} | {r['store']} | {r['scale']} | {r['round']} | {r['wall_s']:.2f} | "
            f"{r['rss_kib'] / 1024:.1f} | {r['cpu_s']:.2f} ({r['user_s']:.2f} + {r['sys_s']:.2f}) | "
            f"{r['other_cpu_s'] / r['wall_s'] * 100:.0f} | "
            f"{r['stored_bytes'] / 1048576:.0f} | {detail} |" if "stored_bytes" in r else
            f"| {n} | {r['phase']} | {r['tool']} | {r['store']} | {r['scale']} | {r['round']} | {r['wall_s']:.2f} | "
            f"{r['rss_kib'] / 1024:.1f} | {r['cpu_s']:.2f} ({r['user_s']:.2f} + {r['sys_s']:.2f}) | "
            f"{r['other_cpu_s'] / r['wall_s'] * 100:.0f} | - | {detail} |"
        )

    notes = meta.get("notes", [])
    print()
    print("\n".join(table))
    print()
    print("\n".join(verdicts))
    if ver_lines:
        print()
        print("\n".join(ver_lines))
    print()
    print(busy_note)
    for n in notes:
        print(f"note: {n}")

    md = [
        "# Base-backup benchmark: wal-rs backup-push / backup-fetch vs pgBackRest backup / restore",
        "",
        f"- date: {meta.get('date', '?')}",
        f"- machine: {meta.get('machine', '?')}",
        f"- load average before / after the run: {meta.get('load_before', '?')} / {meta.get('load_after', '?')}"
        " (the machine is shared: other builds or tests may have been running; see the CPU note below)",
        f"- wal-rs: {meta.get('walrs', '?')}",
        f"- pgBackRest: {meta.get('pgbackrest', '?')}",
        f"- PostgreSQL: {meta.get('postgres', '?')}",
        f"- database: {meta.get('database', '?')}",
        f"- S3 server: {meta.get('s3_server', '?')}",
        f"- command: `{meta.get('command', '?')}`; the whole run took {meta.get('elapsed', '?')}",
        "",
        "## Results",
        "",
        *table,
        "",
        "Rounds ran alternately (wal-rs, pgBackRest, wal-rs, pgBackRest), backups first, then restores of each "
        "tool's latest backup into fresh empty directories. Wall time covers the whole command: for backups the "
        "fast checkpoint, the copy, and the wait until the backup's WAL is in the tool's own store; for restores "
        "the download, checks, writes and fsync. Peak RSS is GNU time's `%M` (for pgBackRest the largest of its "
        "processes: main and process-max=2 workers). CPU s is the median of user + system time of the command "
        "and its workers. Stored MiB is what one backup added to its store.",
        "",
        "## Ratios and targets",
        "",
        *verdicts,
        "",
        "## Each restore is usable",
        "",
        *(ver_lines or ["- (not checked)"]),
        "",
        "## Notes",
        "",
        *[f"- {n}" for n in notes],
        f"- {busy_note}",
        "",
        "## Every timed command",
        "",
        *every,
        "",
    ]
    with open(md_path, "w") as f:
        f.write("\n".join(md))
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "runs": runs, "verify": verify, "targets_met": ok_all}, f, indent=1)
    return 0 if ok_all else 3


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "time":
        time_command(sys.argv[2:])
    elif len(sys.argv) == 7 and sys.argv[1] == "report":
        sys.exit(report(*sys.argv[2:]))
    else:
        sys.exit(__doc__)
