#!/usr/bin/env bash
# make bench: push and then fetch 32 real 16 MiB WAL segments, one process per segment as
# PostgreSQL calls archive_command / restore_command, with
#   - wal-rs on a local directory store,
#   - pgBackRest (Debian's package, lz4, posix repository, synchronous archive-push),
#   - wal-rs on an S3 store (s3s-fs on 127.0.0.1),
# and print p50/p95 milliseconds per segment and the peak RSS of one process.
# Results also go to bench/results/wal-latest.md (and the raw samples to wal-latest.json).
#
# Runs as root on a fresh machine (installs pgbackrest and GNU time if missing); every
# tool runs as the postgres user, as it would under PostgreSQL. See bench/README.md.
#
# Environment knobs:
#   BENCH_DIR      work directory (default /tmp/wal-rs-bench); removed at the end unless
#                  BENCH_KEEP=1 or the run failed (then it is kept, with the tools' logs)
#   BENCH_SEGMENTS number of segments (default 32)
#   BENCH_SCALE    pgbench scale of the bulk load (default 4)
#   BENCH_RESULTS  folder for wal-latest.md and .json (default bench/results)
#   BENCH_STRICT=1 exit 3 when a target is missed (default: report only)
#   BENCH_WAIT_QUIET seconds to wait, before timing, for other work on this shared machine
#                  to pause (default 90; 0: do not wait); the report says how busy it was
#   WALRS_BIN      wal-rs binary (default target/dist/wal-rs, the LTO build `make dist` makes)
#   WALRS_S3S_FS   s3s-fs binary (default .cache/tools/bin/s3s-fs; `make tools` builds it)
set -euo pipefail
bench="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$bench/.." && pwd)"
. "$repo/scripts/pg-lib.sh"

started=$SECONDS
root="${BENCH_DIR:-/tmp/wal-rs-bench}"
nseg="${BENCH_SEGMENTS:-32}"
# pgbench scale: the bulk load fills the first 3-4 segments, the transactions the rest, so
# that the median lands among the transaction segments in every run, not on the border.
scale="${BENCH_SCALE:-4}"
walrs_src="${WALRS_BIN:-$repo/target/dist/wal-rs}"
s3s_fs="${WALRS_S3S_FS:-$repo/.cache/tools/bin/s3s-fs}"
# Python from the system, not a per-user shim under /root that postgres cannot read.
py=/usr/bin/python3
step() { printf '\n== %s\n' "$*"; }
die() { echo "bench: $*" >&2; exit 1; }

[ -x "$walrs_src" ] || die "no wal-rs binary at $walrs_src: run make dist (or set WALRS_BIN=target/release/wal-rs)"
[ -x "$s3s_fs" ] || die "no s3s-fs at $s3s_fs: run make tools (or make bench)"
[ -x "$py" ] || die "$py is needed to time the processes"
if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || die "no postgres user: install PostgreSQL 15"
fi

step "pgBackRest"
# pgbackrest is the peer measured; GNU time (/usr/bin/time) reports each process's peak RSS.
bash "$repo/scripts/need-packages.sh" pgbackrest /usr/bin/time:time || die "pgBackRest and GNU time are needed"
pgbackrest_bin="$(command -v pgbackrest)"
pgbackrest_version="$("$pgbackrest_bin" version)"
echo "$pgbackrest_version at $pgbackrest_bin"

# Everything lives in one work directory the postgres user owns.
make_workdir "$root"
pg_port=$(free_port)
s3_port=$(free_port)
s3s_pid=""
ok=0

cleanup() {
    # Runs on every exit, success or failure: stop what this script started, by its own
    # data directory and pid only.
    as_pg pg_ctl -D "$root/pg" -m immediate stop >/dev/null 2>&1 || true
    if [ -n "$s3s_pid" ]; then kill "$s3s_pid" 2>/dev/null || true; wait "$s3s_pid" 2>/dev/null || true; fi
    # Background processes wal-rs may have left if the run was cut short: only those
    # running this run's private copy of the binary.
    local p
    for p in /proc/[0-9]*; do
        if [ "$(readlink "$p/exe" 2>/dev/null)" = "$root/bin/wal-rs" ]; then kill "${p#/proc/}" 2>/dev/null || true; fi
    done
    if [ "$ok" = 1 ] && [ "${BENCH_KEEP:-0}" != 1 ]; then
        rm -rf "$root"
    else
        echo "bench: work directory kept for inspection: $root (tool logs: $root/*.log)" >&2
    fi
}
trap cleanup EXIT

# Copy the binary: others may rebuild target/ during the run, and the postgres user must
# be able to execute it. The copy is what gets measured, and its checksum is recorded.
as_pg mkdir -p "$root/bin" "$root/archive" "$root/segs" "$root/walrs-store" "$root/restore" \
    "$root/pgbr/repo" "$root/pgbr/log" "$root/pgbr/lock" "$root/pgbr/spool"
cp "$walrs_src" "$root/bin/wal-rs"
cp "$bench/measure.py" "$root/bin/measure.py"
chmod 755 "$root/bin/wal-rs" "$root/bin/measure.py"
walrs="$root/bin/wal-rs"
walrs_desc="$(walrs_describe "$walrs" "$walrs_src" "$repo")"
echo "wal-rs: $walrs_desc"

step "real WAL: a throwaway PostgreSQL 15 cluster, pgbench -i -s $scale, then pgbench runs"
as_pg initdb -D "$root/pg" -U postgres --auth=trust >/dev/null
# The archive_command copies each finished segment to a temporary name and renames it, so
# a file in $root/archive is always complete when we see it.
cat >>"$root/pg/postgresql.conf" <<CONF
port = $pg_port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$root'
wal_level = replica
archive_mode = on
archive_command = 'test ! -f $root/archive/%f && cp %p $root/archive/.%f.tmp && mv $root/archive/.%f.tmp $root/archive/%f'
# Frequent checkpoints, as on a busy production primary: the pgbench transactions then
# keep writing full-page images, so their WAL is stationary (a steady mix of page images
# and small records) instead of page images first and small records later.
max_wal_size = 128MB
# Only makes pgbench faster; the WAL records are the same.
synchronous_commit = off
CONF
as_pg pg_ctl -D "$root/pg" -l "$root/postgres.log" -w start >/dev/null
as_pg pgbench -h 127.0.0.1 -p "$pg_port" -U postgres -i -s "$scale" -q postgres 2>&1 | tail -1
# A checkpoint after the load, as a production cluster has them all the time: the pgbench
# run then writes full-page images, which is what most archived WAL looks like.
psql_at "$pg_port" "checkpoint"

# Segment 1 holds initdb's catalog; the benchmark uses segments 2 .. nseg+1, i.e. the
# bulk load and then the pgbench transactions. No pg_switch_wal: every segment is full.
segments=()
for i in $(seq 2 $((nseg + 1))); do segments+=("$(printf '%08X%08X%08X' 1 0 "$i")"); done
last="${segments[-1]}"
deadline=$((SECONDS + 300))
until [ -f "$root/archive/$last" ]; do
    [ "$SECONDS" -lt "$deadline" ] || die "timed out waiting for $last to be archived"
    # Generate WAL in short bursts and look again; pgbench is the workload, not a sleep.
    as_pg pgbench -h 127.0.0.1 -p "$pg_port" -U postgres -c 2 -j 2 -T 2 -n postgres >/dev/null 2>&1 ||
        die "pgbench failed; see $root/postgres.log"
done
for s in "${segments[@]}"; do
    [ "$(stat -c %s "$root/archive/$s")" = 16777216 ] || die "$s is not a 16 MiB segment"
    as_pg cp "$root/archive/$s" "$root/segs/$s"
done
chmod 600 "$root/segs/"*
echo "${#segments[@]} segments ${segments[0]} .. $last, $(du -sm "$root/segs" | cut -f1) MiB"

step "pgBackRest stanza (posix repository, lz4, synchronous archive-push)"
cat >"$root/pgbackrest.conf" <<CONF
[global]
repo1-type=posix
repo1-path=$root/pgbr/repo
compress-type=lz4
archive-async=n
log-path=$root/pgbr/log
lock-path=$root/pgbr/lock
spool-path=$root/pgbr/spool
log-level-console=warn

[bench]
pg1-path=$root/pg
pg1-port=$pg_port
pg1-socket-path=$root
CONF
chmod 644 "$root/pgbackrest.conf"
pgbr=("$pgbackrest_bin" "--config=$root/pgbackrest.conf" "--stanza=bench")
# stanza-create reads the system identifier from the running cluster; afterwards
# archive-push and archive-get only read pg_control, so the cluster is stopped to keep
# it from competing for the CPU during the measurements.
as_pg "${pgbr[@]}" stanza-create
as_pg pg_ctl -D "$root/pg" -m fast stop >/dev/null

step "S3 store: s3s-fs on 127.0.0.1:$s3_port"
mkdir -p "$root/s3data/bench"
"$s3s_fs" --host 127.0.0.1 --port "$s3_port" --access-key benchak --secret-key benchsecretkey \
    "$root/s3data" >"$root/s3s-fs.log" 2>&1 &
s3s_pid=$!
wait_for "s3s-fs to listen on $s3_port" 30 bash -c "exec 3<>/dev/tcp/127.0.0.1/$s3_port"

step "measure: ${#segments[@]} pushes, then ${#segments[@]} fetches, per tool and store (as user postgres)"
# Each tool and store restores into its own pg_wal, so that nothing one leaves there (wal-rs
# keeps prefetched segments beside RECOVERYXLOG) can serve another.
for d in walrs-local pgbackrest walrs-s3 walrs-defaults; do as_pg mkdir -p "$root/restore/$d/pg_wal"; done
# The scenario "wal-rs with its defaults" pushes from a pg_wal as PostgreSQL leaves it
# during a backlog: every segment there, each with its archive_status/<name>.ready.
as_pg mkdir -p "$root/primary/pg_wal/archive_status" "$root/walrs-defaults-store"
for s in "${segments[@]}"; do
    as_pg cp -p "$root/segs/$s" "$root/primary/pg_wal/$s"
    as_pg touch "$root/primary/pg_wal/archive_status/$s.ready"
done
names_json=$(printf '"%s",' "${segments[@]}")
s3_env='"WALRS_STORE": "s3://bench/wal", "AWS_ACCESS_KEY_ID": "benchak", "AWS_SECRET_ACCESS_KEY": "benchsecretkey",
             "AWS_ENDPOINT_URL": "http://127.0.0.1:'"$s3_port"'", "AWS_REGION": "us-east-1", "WALRS_S3_PATH_STYLE": "true"'
# In the comparison wal-rs runs with prefetch and push-ahead off: like pgBackRest with
# archive-async=n, each process then does exactly the work for its own segment.
one_at_a_time='"WALRS_COMPRESSION": "lz4", "WALRS_PREFETCH_COUNT": "0", "WALRS_ARCHIVE_AHEAD": "0"'
cat >"$root/spec.json" <<JSON
{
  "segments_dir": "$root/segs",
  "segments": [${names_json%,}],
  "server_pids": [$s3s_pid],
  "wait_quiet_secs": ${BENCH_WAIT_QUIET:-90},
  "combos": [
    {"tool": "wal-rs", "store": "local",
     "env": {"WALRS_STORE": "file://$root/walrs-store", $one_at_a_time},
     "warmup": [["$walrs", "--version"]],
     "push": ["$walrs", "wal-push", "$root/segs/{name}"], "push_cwd": "$root",
     "fetch": ["$walrs", "wal-fetch", "{name}", "$root/restore/walrs-local/pg_wal/RECOVERYXLOG"],
     "fetch_cwd": "$root/restore/walrs-local", "fetch_dest": "$root/restore/walrs-local/pg_wal/RECOVERYXLOG",
     "log": "$root/walrs-local.log", "stored": ["$root/walrs-store"]},
    {"tool": "pgBackRest", "store": "local",
     "warmup": [["$pgbackrest_bin", "version"]],
     "push": ["${pgbr[0]}", "${pgbr[1]}", "${pgbr[2]}", "archive-push", "$root/segs/{name}"], "push_cwd": "$root",
     "fetch": ["${pgbr[0]}", "${pgbr[1]}", "${pgbr[2]}", "archive-get", "{name}", "$root/restore/pgbackrest/pg_wal/RECOVERYXLOG"],
     "fetch_cwd": "$root/restore/pgbackrest", "fetch_dest": "$root/restore/pgbackrest/pg_wal/RECOVERYXLOG",
     "log": "$root/pgbackrest.log", "stored": ["$root/pgbr/repo/archive"]},
    {"tool": "wal-rs", "store": "s3",
     "env": {$s3_env, $one_at_a_time},
     "push": ["$walrs", "wal-push", "$root/segs/{name}"], "push_cwd": "$root",
     "fetch": ["$walrs", "wal-fetch", "{name}", "$root/restore/walrs-s3/pg_wal/RECOVERYXLOG"],
     "fetch_cwd": "$root/restore/walrs-s3", "fetch_dest": "$root/restore/walrs-s3/pg_wal/RECOVERYXLOG",
     "log": "$root/walrs-s3.log", "stored": ["$root/s3data/bench"]}
  ],
  "scenarios": [
    {"tool": "wal-rs", "store": "local", "note": "defaults (push-ahead, prefetch)",
     "env": {"WALRS_STORE": "file://$root/walrs-defaults-store"},
     "push": ["$walrs", "wal-push", "pg_wal/{name}"], "push_cwd": "$root/primary",
     "ready_dir": "$root/primary/pg_wal/archive_status",
     "fetch": ["$walrs", "wal-fetch", "{name}", "pg_wal/RECOVERYXLOG"],
     "fetch_cwd": "$root/restore/walrs-defaults", "fetch_dest": "$root/restore/walrs-defaults/pg_wal/RECOVERYXLOG",
     "log": "$root/walrs-defaults.log", "stored": ["$root/walrs-defaults-store"],
     "left_behind": {"the restore's pg_wal/walrs_prefetch": "$root/restore/walrs-defaults/pg_wal/walrs_prefetch",
                     "the primary's pg_wal/walrs_archive_status": "$root/primary/pg_wal/walrs_archive_status"}}
  ]
}
JSON
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
as_pg "$py" "$root/bin/measure.py" run "$root/spec.json" "$root/results.json"
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"

step "results"
results="${BENCH_RESULTS:-$bench/results}"
mkdir -p "$results"
elapsed=$((SECONDS - started))
cpu="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
export BENCH_META
BENCH_META=$("$py" -c 'import json,sys; print(json.dumps(dict(zip(sys.argv[1::2], sys.argv[2::2]))))' \
    date "$(date -u '+%Y-%m-%d %H:%M UTC')" \
    machine "$(nproc) cores, $cpu, $(free -g | awk '/^Mem:/{print $2}') GiB RAM, Linux $(uname -r), $(df -T "$root" | awk 'NR==2{print $2}') work directory" \
    load_before "$load_before" load_after "$load_after" \
    walrs "$walrs_desc" pgbackrest "$pgbackrest_version" \
    postgres "$(as_pg postgres --version)" \
    user postgres command "${BENCH_COMMAND:-bash bench/run.sh (make bench)}" elapsed "${elapsed} s (including the WAL generation)")
cp "$root/results.json" "$results/wal-latest.json"
status=0
"$py" "$bench/measure.py" report "$results/wal-latest.json" "$results/wal-latest.md" || status=$?
[ "$status" = 0 ] || [ "$status" = 3 ] || die "the report failed"
echo
echo "written: $results/wal-latest.md, $results/wal-latest.json (${elapsed} s)"
ok=1
if [ "$status" = 3 ] && [ "${BENCH_STRICT:-0}" = 1 ]; then exit 3; fi
