#!/usr/bin/env bash
# Recovery probes: where the time of a restore through wal-rs goes, beyond what
# bench/throughput.sh reports. Runs restores of that benchmark's recovery phase again, in
# interleaved rounds, from a work directory it kept, plus restores it does not run:
#
#   crash        crash recovery from pg_wal, no restore_command (the limit the target names)
#   ln           restore_command = 'ln <copy>/%f %p': PostgreSQL's own cost per restored file
#   walrs-s3     wal-rs through the latency proxy (30 ms per request) to s3s-fs, as the benchmark
#   walrs-local  wal-rs from a local directory store holding the same segments: the same
#                wal-rs work (prefetch, decompression, sha256, fsync) with no S3 server and no
#                proxy sharing the machine's cores
#   crash-busy   crash recovery while a loop beside it fetches the same segments with wal-fetch
#                from the local store into /dev/shm, one every 40 ms plus the fetch: the
#                prefetcher's CPU work at about replay's pace, without a restore_command.
#                What that work on the other core costs replay itself.
#   ahead        no tool: only the disk writes any restore_command that makes new files
#                has to do. A loop copies each segment (from the page cache) into a staging
#                folder beside the data directory and fsyncs it, at most 8 segments ahead of
#                the restores (the prefetch count's default); restore_command waits for
#                the file and hard-links it. An ideal prefetcher that spends no CPU on
#                download, decompression or sha256.
#
# Usage, as root:
#   THROUGHPUT_KEEP=1 THROUGHPUT_PHASES=recovery bash bench/throughput.sh   # once
#   bash bench/recovery_probe.sh [ROUNDS] [VARIANT ...]
# VARIANT@TAG runs a wal-rs variant with the binary <work dir>/bin/wal-rs.TAG instead, for an
# interleaved A/B of two builds (e.g. walrs-local walrs-local@new).
# Round r runs the variants rotated by r-1 places (round 1 in the order given).
# Defaults: 2 rounds of all six. Prints one line per restore and a summary (the best round
# and the median of each, ratios to crash and to ln). Nothing is written to bench/results.
set -euo pipefail

root="${THROUGHPUT_DIR:-/tmp/wal-rs-throughput}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
rounds="${1:-2}"
shift || true
variants=("$@")
[ "${#variants[@]}" -gt 0 ] || variants=(crash ln walrs-s3 walrs-local crash-busy ahead)

die() { echo "recovery_probe: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (PostgreSQL runs as postgres through runuser)"
[ -d "$root/rec-base" ] && [ -d "$root/rec-wal" ] ||
    die "no kept recovery work directory in $root: run THROUGHPUT_KEEP=1 THROUGHPUT_PHASES=recovery bash bench/throughput.sh"
PGBIN="$(pg_config --bindir)"
walrs="$root/bin/wal-rs"
tool=(python3 "$root/bin/throughput_tool.py")
s3s_fs="${WALRS_S3S_FS:-$repo/.cache/tools/bin/s3s-fs}"
port=55998
local_store="$root/probe-store"
mapfile -t segs < <(ls "$root/rec-wal" | grep -E '^[0-9A-F]{24}$' | sort)
[ "${#segs[@]}" -gt 0 ] || die "no segments in $root/rec-wal"
as_pg() { runuser -u postgres -- "$@"; }
wanted() { local v; for v in "${variants[@]}"; do [ "${v%@*}" = "$1" ] && return 0; done; return 1; }

# Everything started here is stopped on exit, whatever happens.
started=()
cluster=""
cleanup() {
    [ -z "$cluster" ] || as_pg "$PGBIN/pg_ctl" -D "$cluster" -m immediate stop >/dev/null 2>&1 || true
    for p in "${started[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$root"/probe-restore "$root"/probe-restore.wal /dev/shm/walrs-probe
}
trap cleanup EXIT

if { wanted walrs-local || wanted crash-busy; } && [ ! -d "$local_store/wal_005" ]; then
    echo "local store: pushing ${#segs[@]} segments into $local_store (not timed)"
    as_pg mkdir -p "$local_store"
    for s in "${segs[@]}"; do
        as_pg env WALRS_STORE="file://$local_store" WALRS_ARCHIVE_AHEAD=0 "$walrs" wal-push "$root/rec-wal/$s" 2>/dev/null
    done
fi
s3_env=""
if wanted walrs-s3; then
    [ -x "$s3s_fs" ] || die "no s3s-fs at $s3s_fs: make tools"
    s3_port=58111
    "$s3s_fs" --host 127.0.0.1 --port "$s3_port" --access-key throughputak --secret-key throughputsecretkey \
        "$root/s3" >"$root/probe-s3s-fs.log" 2>&1 &
    started+=("$!")
    "$root/bin/walrs-faultproxy" --upstream "127.0.0.1:$s3_port" --delay-ms 30 >"$root/probe-proxy.out" 2>/dev/null &
    started+=("$!")
    for _ in $(seq 100); do grep -q '^listening ' "$root/probe-proxy.out" 2>/dev/null && break; sleep 0.1; done
    proxy_port=$(sed -n 's/^listening .*://p' "$root/probe-proxy.out")
    [ -n "$proxy_port" ] || die "the proxy did not start"
    s3_env="WALRS_STORE=s3://walrs/rec AWS_ACCESS_KEY_ID=throughputak AWS_SECRET_ACCESS_KEY=throughputsecretkey AWS_ENDPOINT_URL=http://127.0.0.1:$proxy_port AWS_REGION=us-east-1 WALRS_S3_PATH_STYLE=true"
fi

# The loop of crash-busy: wal-fetch of every segment in turn, paced, until killed.
busy_loop() {
    mkdir -p /dev/shm/walrs-probe
    while :; do
        for s in "${segs[@]}"; do
            WALRS_STORE="file://$local_store" WALRS_PREFETCH_COUNT=0 "$walrs" wal-fetch "$s" /dev/shm/walrs-probe/x 2>/dev/null || true
            rm -f /dev/shm/walrs-probe/x
            sleep 0.04
        done
    done
}

# The two halves of ahead, run as postgres so that PostgreSQL may link and later recycle the
# files. The copier stays at most 8 segments ahead of what restore_command has handed out.
cat >"$root/probe-ahead-copy.sh" <<'SH'
stage="$1"; src="$2"; shift 2; i=0
for s in "$@"; do
    while [ "$(wc -l <"$stage/.consumed")" -lt $((i - 8)) ]; do sleep 0.002; done
    cp "$src/$s" "$stage/.$s.tmp" && sync "$stage/.$s.tmp" && mv "$stage/.$s.tmp" "$stage/$s"
    i=$((i + 1))
done
SH
cat >"$root/probe-ahead-restore.sh" <<'SH'
# restore_command of ahead: names not among the segments are "not in the archive".
[ -e "$2/$3" ] || exit 1
while [ ! -e "$1/$3" ]; do sleep 0.001; done
ln "$1/$3" "$4" && echo "$3" >>"$1/.consumed"
SH
chmod 755 "$root/probe-ahead-copy.sh" "$root/probe-ahead-restore.sh"

out="$root/probe-results"
mkdir -p "$out"
probe() {  # VARIANT ROUND
    local v="$1" r="$2" d="$root/probe-restore" busy="" bin="$walrs" base="${1%@*}"
    [ "$base" = "$v" ] || bin="$walrs.${v#*@}"
    [ -x "$bin" ] || die "no binary $bin for $v"
    rm -rf "$d" "$d.wal"
    cp -a "$root/rec-base" "$d"
    chown -R postgres: "$d"
    chmod 700 "$d"
    printf 'port = %s\narchive_mode = off\nmax_wal_size = 4GB\n' "$port" >>"$d/postgresql.conf"
    case "$base" in
        crash|crash-busy) as_pg cp "${segs[@]/#/$root/rec-wal/}" "$d/pg_wal/" ;;
        ln) as_pg mkdir "$d.wal"; as_pg cp "${segs[@]/#/$root/rec-wal/}" "$d.wal/"
            echo "restore_command = 'ln $d.wal/%f %p'" >>"$d/postgresql.conf" ;;
        walrs-s3) echo "restore_command = '$s3_env $bin wal-fetch %f %p'" >>"$d/postgresql.conf" ;;
        ahead) as_pg mkdir "$d.wal"; as_pg touch "$d.wal/.consumed"
            echo "restore_command = '/bin/sh $root/probe-ahead-restore.sh $d.wal $root/rec-wal %f %p'" >>"$d/postgresql.conf" ;;
        walrs-local) echo "restore_command = 'WALRS_STORE=file://$local_store $bin wal-fetch %f %p'" >>"$d/postgresql.conf" ;;
        *) die "unknown variant $v" ;;
    esac
    case "$base" in crash|crash-busy) ;; *) as_pg touch "$d/recovery.signal" ;; esac
    sync
    local log="$root/logs/probe-$v-r$r.log"
    cat >"$out/$v-r$r.spec.json" <<JSON
{"name": "$v", "pgbin": "$PGBIN", "port": $port, "log": "$log", "datadir": "$d",
 "start_cmd": ["runuser", "-u", "postgres", "--", "$PGBIN/pg_ctl", "-D", "$d", "-l", "$log", "-W", "start"],
 "deadline": 900, "verify": {}, "quiet_wait": $([ "$base" = crash-busy ] && echo 0 || echo 20),
 "walrs_log": "$(case "$base" in walrs*) echo "$log" ;; esac)"}
JSON
    rm -f "$log"
    if [ "$base" = crash-busy ]; then busy_loop & busy=$!; started+=("$busy"); fi
    if [ "$base" = ahead ]; then
        as_pg /bin/sh "$root/probe-ahead-copy.sh" "$d.wal" "$root/rec-wal" "${segs[@]}" & busy=$!; started+=("$busy")
    fi
    cluster="$d"
    "${tool[@]}" recover "$out/$v-r$r.spec.json" "$out/$v-r$r.json" >/dev/null
    [ -z "$busy" ] || { kill "$busy" 2>/dev/null || true; wait "$busy" 2>/dev/null || true; }
    as_pg "$PGBIN/pg_ctl" -D "$d" -m fast stop >/dev/null
    cluster=""
    rm -rf "$d" "$d.wal"
    python3 - "$out/$v-r$r.json" "$v" "$r" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
sp = r.get("startup_process") or {}
print(f"{sys.argv[2]:<12} round {sys.argv[3]}: {r['seconds']:6.2f} s to the end of recovery (redo {r['redo_elapsed_s']} s, "
      f"startup process CPU {r['redo_cpu_s']} s; on a CPU {sp.get('on_cpu_s')} s, waiting for one "
      f"{sp.get('runnable_waiting_s')} s, sleeping {sp.get('sleeping_s')} s; "
      f"{r['segments_restored_by_command']} files from restore_command)")
PY
}

rm -f "$out"/*.json
# Round r starts r-1 places further along the list (a cyclic rotation), so that no variant
# always runs first or always follows the same one.
n=${#variants[@]}
for r in $(seq 1 "$rounds"); do
    for i in $(seq 0 $((n - 1))); do
        v="${variants[$(( (i + r - 1) % n ))]}"
        probe "$v" "$r"
    done
done
python3 - "$out" "${variants[@]}" <<'PY'
import glob, json, os, sys
out, variants = sys.argv[1], sys.argv[2:]
times = {}
for v in variants:
    runs = [json.load(open(f)) for f in glob.glob(os.path.join(out, f"{v}-r*.json")) if not f.endswith(".spec.json")]
    if runs:
        times[v] = sorted(r["seconds"] for r in runs)
# The best round is the one least disturbed by other work; the median shows what to expect.
for label, pick in (("best round", lambda t: t[0]), ("median", lambda t: (t[(len(t) - 1) // 2] + t[len(t) // 2]) / 2)):
    chosen = {v: pick(t) for v, t in times.items()}
    print(f"\n{label} of each:")
    for v, s in chosen.items():
        parts = [f"{s:.2f} s"]
        for ref in ("crash", "ln"):
            if ref in chosen and v not in ("crash", ref):
                parts.append(f"{s / chosen[ref]:.2f}x {ref}")
        print(f"  {v:<12} " + ", ".join(parts))
PY
