#!/usr/bin/env bash
# Throughput at realistic S3 latency (see bench/THROUGHPUT.md): wal-rs against pgBackRest,
# both on an S3 store (s3s-fs on 127.0.0.1) behind walrs-faultproxy adding 30 ms per request.
#
#   1. Archiving: a primary under sustained write load (pgbench -i at a large scale), with
#      archive_command = wal-rs wal-push, then = pgbackrest archive-push (async, process-max 2):
#      the largest .ready backlog, and the time from a WAL switch to the segment in the store.
#   2. Recovery: one base backup, >= 200 segments of WAL archived by both tools, restored five
#      ways, in interleaved rounds: WAL already in pg_wal (crash recovery: the limit; and archive
#      recovery), restore_command = cp from a local copy, wal-rs wal-fetch, pgBackRest async
#      archive-get.
#   3. Daemon decision: how much of one wal-push on S3 is process start, configuration,
#      credentials and connection setup.
#
# Results: bench/results/throughput-latest.md and .json. Runs as root (installs pgbackrest and
# stunnel4 with apt-get if missing); PostgreSQL and both tools run as the postgres user.
#
# Environment knobs:
#   THROUGHPUT_DIR      work directory (default /tmp/wal-rs-throughput); removed at the end
#                       unless THROUGHPUT_KEEP=1 or the run failed
#   THROUGHPUT_DELAY_MS proxy delay per request (default 30)
#   THROUGHPUT_SCALE    pgbench -i scale of the archiving load (default 400, 45-65 s here)
#   THROUGHPUT_RECOVERY_SCALE     pgbench -i scale before the recovery run's transactions (150)
#   THROUGHPUT_RECOVERY_SEGMENTS  segments the restores replay, at least (default 220)
#   THROUGHPUT_DAEMON_REPS        repetitions of each single-push case (default 10)
#   THROUGHPUT_RESTORE_ROUNDS     rounds of the six restores, interleaved (default 6); the
#                       report's headline is each restore's median round
#   THROUGHPUT_RESTORE_ORDER      "balanced" (default): round k runs the six restores in row k
#                       of a Williams square, so over 6 rounds each restore runs once in each
#                       position and once right after each other restore; "fixed": the same
#                       order every round (the method before stop 22)
#   THROUGHPUT_WAIT_QUIET         before each timed phase, wait up to this many seconds for
#                       the rest of the machine to pause (default 30; 0: do not wait)
#   THROUGHPUT_STRICT=1 exit 3 when a target is missed (default: report only)
#   THROUGHPUT_PHASES   which of "archive recovery daemon" to run (default all three; the
#                       daemon decision uses the recovery run's WAL); the report leaves out
#                       what was not run
#   WALRS_BIN, WALRS_FAULTPROXY_BIN, WALRS_S3S_FS   binaries (defaults target/dist/wal-rs,
#                       target/release/walrs-faultproxy and .cache/tools/bin/s3s-fs)
set -euo pipefail
bench="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$bench/.." && pwd)"
. "$repo/scripts/pg-lib.sh"

started=$SECONDS
root="${THROUGHPUT_DIR:-/tmp/wal-rs-throughput}"
delay="${THROUGHPUT_DELAY_MS:-30}"
arch_scale="${THROUGHPUT_SCALE:-400}"
rec_scale="${THROUGHPUT_RECOVERY_SCALE:-150}"
rec_segments="${THROUGHPUT_RECOVERY_SEGMENTS:-220}"
daemon_reps="${THROUGHPUT_DAEMON_REPS:-10}"
quiet_wait="${THROUGHPUT_WAIT_QUIET:-30}"
rounds="${THROUGHPUT_RESTORE_ROUNDS:-6}"
restore_order="${THROUGHPUT_RESTORE_ORDER:-balanced}"
case "$restore_order" in balanced|fixed) ;; *) echo "throughput: THROUGHPUT_RESTORE_ORDER must be balanced or fixed" >&2; exit 1 ;; esac
phases=" ${THROUGHPUT_PHASES:-archive recovery daemon} "
runs_phase() { [[ "$phases" == *" $1 "* ]]; }
walrs_src="${WALRS_BIN:-$repo/target/dist/wal-rs}"
proxy_src="${WALRS_FAULTPROXY_BIN:-$repo/target/release/walrs-faultproxy}"
s3s_fs="${WALRS_S3S_FS:-$repo/.cache/tools/bin/s3s-fs}"
py=/usr/bin/python3
ak=throughputak
sk=throughputsecretkey
step() { printf '\n== %s: %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { echo "throughput: $*" >&2; exit 1; }

[ -x "$walrs_src" ] || die "no wal-rs at $walrs_src: run make dist (or set WALRS_BIN=target/release/wal-rs)"
[ -x "$proxy_src" ] || die "no walrs-faultproxy at $proxy_src: cargo build --release --workspace"
[ -x "$s3s_fs" ] || die "no s3s-fs at $s3s_fs: make tools"
[ -x "$py" ] || die "$py is needed"
[ "$(id -u)" = 0 ] || die "run as root (PostgreSQL and the tools run as postgres through runuser)"
id postgres >/dev/null 2>&1 || die "no postgres user: install PostgreSQL 15"

step "prerequisites"
bash "$repo/scripts/need-packages.sh" pgbackrest stunnel4 openssl || die "pgBackRest, stunnel4 and openssl are needed"
pgbackrest_bin="$(command -v pgbackrest)"
pgbackrest_version="$("$pgbackrest_bin" version)"
echo "$pgbackrest_version; $(stunnel4 -version 2>&1 | grep -m1 '^stunnel')"

uptime_before="$(uptime | sed 's/^ *//')"
echo "before: $(uptime)"

make_workdir "$root"
as_pg mkdir -p "$root/bin" "$root/results" "$root/logs" "$root/rec-wal" "$root/daemon" \
    "$root/pgbr/spool" "$root/pgbr/log" "$root/pgbr/lock"
chmod 755 "$root/results" "$root/logs"
# Private copies: others may rebuild target/ during the run, and postgres must be able to run them.
cp "$walrs_src" "$root/bin/wal-rs"
cp "$proxy_src" "$root/bin/walrs-faultproxy"
cp "$bench/throughput_tool.py" "$root/bin/throughput_tool.py"
chmod 755 "$root/bin/"*
walrs="$root/bin/wal-rs"
tool=("$py" "$root/bin/throughput_tool.py")
walrs_desc="$(walrs_describe "$walrs" "$walrs_src" "$repo")"
echo "wal-rs: $walrs_desc"

# What this run started, stopped on exit whatever happens: by pid, data directory or the
# private binary's path, never by a broad name.
helper_pids=()
clusters=()
ok=0
leftovers() {
    # Tool processes that outlive their command: wal-rs prefetchers (this run's private
    # binary) and pgBackRest's async processes (this run's config file).
    "${tool[@]}" leftovers "$walrs" "--config=$root/pgbackrest.conf"
}
cgroup_prefix="walrs-throughput-$$"
cleanup() {
    local d p
    for d in "${clusters[@]}"; do
        [ -f "$d/postmaster.pid" ] && as_pg pg_ctl -D "$d" -m immediate stop >/dev/null 2>&1 || true
    done
    for p in $(leftovers); do kill "$p" 2>/dev/null || true; done
    for p in "${helper_pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${helper_pids[@]}"; do wait "$p" 2>/dev/null || true; done
    # The CPU accounting groups of this run (empty once its processes are gone).
    for d in /sys/fs/cgroup/cpuacct/"$cgroup_prefix"-* /sys/fs/cgroup/"$cgroup_prefix"-*; do
        [ -d "$d" ] && rmdir "$d" 2>/dev/null || true
    done
    if [ "$ok" = 1 ] && [ "${THROUGHPUT_KEEP:-0}" != 1 ]; then
        rm -rf "$root"
    else
        echo "throughput: work directory kept: $root (logs in $root/logs, $root/*.log)" >&2
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# Waits (with a deadline) until no tool process of this run is left, then kills stragglers.
wait_no_leftovers() {
    local end=$((SECONDS + ${1:-30})) p
    while [ -n "$(leftovers)" ] && [ "$SECONDS" -lt "$end" ]; do sleep 0.1; done
    for p in $(leftovers); do echo "killing leftover tool process $p: $(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null)"; kill "$p" 2>/dev/null || true; done
}

step "S3: s3s-fs, latency proxies ($delay ms per request), TLS terminator for pgBackRest"
s3_port=$(free_port)
mkdir -p "$root/s3/walrs" "$root/s3/pgbr"
"$s3s_fs" --host 127.0.0.1 --port "$s3_port" --access-key "$ak" --secret-key "$sk" "$root/s3" >"$root/s3s-fs.log" 2>&1 &
s3s_pid=$!
helper_pids+=("$s3s_pid")
wait_for "s3s-fs on $s3_port" 30 bash -c "exec 3<>/dev/tcp/127.0.0.1/$s3_port"

declare -A proxy_port proxy_pid
start_proxy() {
    "$root/bin/walrs-faultproxy" --upstream "127.0.0.1:$s3_port" --delay-ms "$delay" --control ${2:-} \
        >"$root/proxy-$1.out" 2>"$root/proxy-$1.log" &
    proxy_pid[$1]=$!
    helper_pids+=("$!")
    wait_for "proxy $1 to listen" 20 grep -q '^listening ' "$root/proxy-$1.out"
    proxy_port[$1]=$(sed -n 's/^listening .*://p' "$root/proxy-$1.out")
    echo "proxy $1: 127.0.0.1:${proxy_port[$1]} -> s3s-fs, $delay ms"
}
start_proxy walrs --log       # wal-rs, archiving and recovery (one line per request)
start_proxy pgbackrest --log  # pgBackRest, behind stunnel
start_proxy daemon            # the single-push measurements

# pgBackRest speaks only HTTPS to S3: a TLS terminator in front of its proxy.
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$root/tls-key.pem" -out "$root/tls-cert.pem" \
    -days 2 -subj /CN=127.0.0.1 2>/dev/null
tls_port=$(free_port)
cat >"$root/stunnel.conf" <<CONF
foreground = yes
pid =
debug = 3
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1
[s3]
accept = 127.0.0.1:$tls_port
connect = 127.0.0.1:${proxy_port[pgbackrest]}
cert = $root/tls-cert.pem
key = $root/tls-key.pem
CONF
stunnel4 "$root/stunnel.conf" >"$root/stunnel.log" 2>&1 &
stunnel_pid=$!
helper_pids+=("$stunnel_pid")
wait_for "stunnel on $tls_port" 20 bash -c "exec 3<>/dev/tcp/127.0.0.1/$tls_port"
echo "stunnel: https://127.0.0.1:$tls_port -> proxy pgbackrest"

port_arch_walrs=$(free_port); port_arch_pgbr=$(free_port); port_rec=$(free_port); port_restore=$(free_port)
walrs_env() {  # the store settings, inline in archive_command / restore_command (they run as postgres)
    echo "WALRS_STORE=s3://walrs/$1 AWS_ACCESS_KEY_ID=$ak AWS_SECRET_ACCESS_KEY=$sk AWS_ENDPOINT_URL=http://127.0.0.1:${proxy_port[walrs]} AWS_REGION=us-east-1 WALRS_S3_PATH_STYLE=true"
}
cat >"$root/pgbackrest.conf" <<CONF
[global]
repo1-type=s3
repo1-path=/repo
repo1-s3-bucket=pgbr
repo1-s3-endpoint=127.0.0.1
repo1-storage-port=$tls_port
repo1-storage-verify-tls=n
repo1-s3-uri-style=path
repo1-s3-region=us-east-1
repo1-s3-key=$ak
repo1-s3-key-secret=$sk
compress-type=lz4
archive-async=y
process-max=2
spool-path=$root/pgbr/spool
log-path=$root/pgbr/log
lock-path=$root/pgbr/lock
log-level-console=warn
log-level-file=info

[arch]
pg1-path=$root/arch-pgbackrest/pg
pg1-port=$port_arch_pgbr
pg1-socket-path=$root

[rec]
pg1-path=$root/rec/pg
pg1-port=$port_rec
pg1-socket-path=$root
CONF
chmod 644 "$root/pgbackrest.conf"
pgbr="$pgbackrest_bin --config=$root/pgbackrest.conf"
watch_pids="{\"s3s-fs\": $s3s_pid, \"proxy\": PROXY, \"stunnel\": $stunnel_pid}"

# new_cluster DIR PORT ARCHIVE_COMMAND [MAX_WAL_SIZE]: initdb and settings for a throwaway primary.
new_cluster() {
    local dir="$1" port="$2" cmd="$3" max_wal="${4:-4GB}"
    as_pg mkdir -p "$dir"
    as_pg initdb -D "$dir/pg" -U postgres --auth=trust >/dev/null
    clusters+=("$dir/pg")
    cat >>"$dir/pg/postgresql.conf" <<CONF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$root'
wal_level = replica
archive_mode = on
archive_command = '$cmd'
max_wal_size = $max_wal
wal_compression = off
synchronous_commit = off
log_timezone = 'UTC'
log_line_prefix = '%m [%p] '
CONF
    as_pg pg_ctl -D "$dir/pg" -l "$dir/postgres.log" -w start >/dev/null
    psql_at "$port" "create table tp_marker (i int)" >/dev/null
}

no_ready() { ! ls "$1" | grep -q '\.ready$'; }

# archive_phase TOOL: the primary under load, archive_command = TOOL.
archive_phase() {
    local t="$1" dir="$root/arch-$1" port cmd store wlog="" px pxport
    case "$t" in
        walrs) port=$port_arch_walrs; px=${proxy_pid[walrs]}; pxport=${proxy_port[walrs]}
               cmd="$(walrs_env arch) $walrs wal-push %p"; store="$root/s3/walrs/arch/wal_005"
               wlog="$dir/postgres.log" ;;
        pgbackrest) port=$port_arch_pgbr; px=${proxy_pid[pgbackrest]}; pxport=${proxy_port[pgbackrest]}
               cmd="$pgbr --stanza=arch archive-push %p"; store="$root/s3/pgbr/repo/archive/arch" ;;
    esac
    step "archiving with $t: pgbench -i -s $arch_scale on a fresh primary"
    new_cluster "$dir" "$port" "$cmd"
    if [ "$t" = pgbackrest ]; then as_pg $pgbr --stanza=arch stanza-create; fi
    # Let the archiver finish initdb's segment and any switch before the load starts.
    sync
    wait_for "idle archiver" 60 no_ready "$dir/pg/pg_wal/archive_status"
    cat >"$root/archive-$t.spec.json" <<JSON
{"tool": "$t", "pgbin": "$PGBIN", "port": $port, "pg_wal": "$dir/pg/pg_wal", "store_root": "$store",
 "load_cmd": ["$PGBIN/pgbench", "-h", "127.0.0.1", "-p", "$port", "-U", "postgres", "-i", "-s", "$arch_scale", "-q", "postgres"],
 "load_log": "$root/logs/arch-$t-pgbench.log", "interval": 0.1, "switches": 5, "drain_deadline": 600,
 "walrs_log": "$wlog", "watch_pids": ${watch_pids/PROXY/$px}, "proxy_control_port": $pxport,
 "proxy_log": "$root/proxy-$t.log", "cgroup": "$cgroup_prefix-arch-$t",
 "quiet_wait": $quiet_wait}
JSON
    "${tool[@]}" archive "$root/archive-$t.spec.json" "$root/results/archive-$t.json"
    as_pg pg_ctl -D "$dir/pg" -m fast stop >/dev/null
    wait_no_leftovers 30
    rmdir "/sys/fs/cgroup/cpuacct/$cgroup_prefix-arch-$t" 2>/dev/null || true
    cp "$dir/postgres.log" "$root/logs/arch-$t-postgres.log"
    rm -rf "$dir"
}

if runs_phase archive; then
    archive_phase walrs
    archive_phase pgbackrest
fi

# Not indented, for the here-documents' sake.
if runs_phase recovery || runs_phase daemon; then
step "recovery: base backup, then >= $rec_segments segments archived by wal-rs and pgBackRest"
rec_cmd="$(walrs_env rec) $walrs wal-push %p && $pgbr --stanza=rec archive-push %p && cp %p $root/rec-wal/.%f.tmp && mv -f $root/rec-wal/.%f.tmp $root/rec-wal/%f"
# Checkpoints every ~250 MB of WAL, as on a busy primary: the transactions then write page
# images as well as small records, the usual mix of archived WAL.
new_cluster "$root/rec" "$port_rec" "$rec_cmd" 512MB
as_pg $pgbr --stanza=rec stanza-create
as_pg pg_basebackup -h 127.0.0.1 -p "$port_rec" -U postgres -D "$root/rec-base" -X none -c fast >"$root/logs/rec-basebackup.log" 2>&1 \
    || die "pg_basebackup failed: $(cat "$root/logs/rec-basebackup.log")"
start_seg=$(sed -n 's/^START WAL LOCATION: .*(file \([0-9A-F]*\))$/\1/p' "$root/rec-base/backup_label")
[ -n "$start_seg" ] || die "no start segment in the backup label"
segno() { echo $(( 16#${1:8:8} * 256 + 16#${1:16:8} )); }
as_pg pgbench -h 127.0.0.1 -p "$port_rec" -U postgres -i -s "$rec_scale" -q postgres >"$root/logs/rec-pgbench.log" 2>&1
psql_at "$port_rec" "checkpoint" >/dev/null
deadline=$((SECONDS + 900))
while :; do
    cur=$(psql_at "$port_rec" "select pg_walfile_name(pg_current_wal_lsn())")
    [ $(( $(segno "$cur") - $(segno "$start_seg") + 1 )) -lt "$rec_segments" ] || break
    [ "$SECONDS" -lt "$deadline" ] || die "timed out generating WAL"
    # The workload is the clock here: short pgbench runs, then look again.
    as_pg pgbench -h 127.0.0.1 -p "$port_rec" -U postgres -c 4 -j 2 -T 5 -n postgres >>"$root/logs/rec-pgbench.log" 2>&1
done
psql_at "$port_rec" "insert into tp_marker values (42)" >/dev/null
last_seg=$(psql_at "$port_rec" "select pg_walfile_name(pg_switch_wal())")
archived_is() { [ "$(psql_at "$port_rec" 'select last_archived_wal from pg_stat_archiver')" = "$1" ]; }
wait_for "$last_seg archived by all three" 900 archived_is "$last_seg"
nseg=$(( $(segno "$last_seg") - $(segno "$start_seg") + 1 ))
declare -A verify=(
    [accounts]="select count(*) from pgbench_accounts"
    [branches]="select sum(bbalance) from pgbench_branches"
    [history]="select count(*) || '/' || coalesce(sum(delta), 0) from pgbench_history"
    [marker]="select max(i) from tp_marker"
)
verify_json="{$(for k in "${!verify[@]}"; do printf '"%s": "%s",' "$k" "${verify[$k]}"; done | sed 's/,$//')}"
primary_state="{$(for k in "${!verify[@]}"; do printf '"%s": "%s",' "$k" "$(psql_at "$port_rec" "${verify[$k]}")"; done | sed 's/,$//')}"
as_pg pg_ctl -D "$root/rec/pg" -m fast stop >/dev/null
wait_no_leftovers 60
cp "$root/rec/postgres.log" "$root/logs/rec-primary-postgres.log"
rm -rf "$root/rec/pg"
"$py" -c 'import json,sys; json.dump({"segments": int(sys.argv[1]), "first_segment": sys.argv[2], "last_segment": sys.argv[3],
    "load": sys.argv[4], "verify": json.loads(sys.argv[5])}, open(sys.argv[6], "w"))' \
    "$nseg" "$start_seg" "$last_seg" "pgbench -i -s $rec_scale, a checkpoint, then pgbench -c 4 -j 2 -T 5 runs (max_wal_size 512MB)" "$primary_state" \
    "$root/results/recovery-primary.json"
echo "$nseg segments $start_seg .. $last_seg; primary's state $primary_state"
echo "stored: wal-rs $(du -sm "$root/s3/walrs/rec" | cut -f1) MiB, pgBackRest $(du -sm "$root/s3/pgbr/repo/archive/rec" | cut -f1) MiB, local copy $(du -sm "$root/rec-wal" | cut -f1) MiB"

# restore_phase NAME ROUND: the base backup restored and recovered to the end of the archive.
restore_phase() {
    local name="$1" round="$2" d="$root/restore-$1" px='null' pxport='null' pxlog='' n
    step "restore: $name (round $round of $rounds)"
    rm -rf "$d" "$d.wal"
    cp -a "$root/rec-base" "$d"
    chown -R postgres: "$d"
    chmod 700 "$d"
    clusters+=("$d")
    # Restartpoints far apart during replay, the same for every restore: what is compared is
    # how fast WAL reaches the startup process.
    cat >>"$d/postgresql.conf" <<CONF
port = $port_restore
archive_mode = off
max_wal_size = 4GB
CONF
    case "$name" in
        local|local-archive)
            # The limit: every segment already in pg_wal (the copy is not timed). "local": no
            # restore_command, crash recovery from the backup label replays them all.
            # "local-archive": archive recovery like the S3 restores, but restore_command
            # always answers "not in the archive", so PostgreSQL reads every segment from pg_wal.
            local files=()
            for n in $(seq "$(segno "$start_seg")" "$(segno "$last_seg")"); do
                files+=("$root/rec-wal/$(printf '%s%08X%08X' "${start_seg:0:8}" $((n / 256)) $((n % 256)))")
            done
            as_pg cp "${files[@]}" "$d/pg_wal/"
            if [ "$name" = local-archive ]; then
                echo "restore_command = 'false'" >>"$d/postgresql.conf"
                as_pg touch "$d/recovery.signal"
            fi ;;
        local-cp)
            # A restore_command with no network and no decompression: cp from the local copy.
            # What any process-per-segment restore_command costs on this machine.
            echo "restore_command = 'cp $root/rec-wal/%f %p'" >>"$d/postgresql.conf"
            as_pg touch "$d/recovery.signal" ;;
        local-ln)
            # A restore_command that writes nothing: a hard link to a copy made beforehand
            # (not timed; its pages are already in memory). PostgreSQL's own cost per
            # restored file (a process, rename, fsyncs, .done) without the cost of putting
            # 16 MiB of new pages in memory, which local-cp pays. A scratch copy, because
            # PostgreSQL may recycle (overwrite) a segment file it was given.
            as_pg mkdir "$d.wal"
            as_pg cp "$root"/rec-wal/0* "$d.wal/"
            echo "restore_command = 'ln $d.wal/%f %p'" >>"$d/postgresql.conf"
            as_pg touch "$d/recovery.signal" ;;
        walrs)
            px=${proxy_pid[walrs]}; pxport=${proxy_port[walrs]}; pxlog="$root/proxy-walrs.log"
            echo "restore_command = '$(walrs_env rec) $walrs wal-fetch %f %p'" >>"$d/postgresql.conf"
            as_pg touch "$d/recovery.signal" ;;
        pgbackrest)
            px=${proxy_pid[pgbackrest]}; pxport=${proxy_port[pgbackrest]}; pxlog="$root/proxy-pgbackrest.log"
            echo "restore_command = '$pgbr --stanza=rec --pg1-path=$d archive-get %f \"%p\"'" >>"$d/postgresql.conf"
            as_pg touch "$d/recovery.signal" ;;
    esac
    sync
    cat >"$root/recover-$name-r$round.spec.json" <<JSON
{"name": "$name", "pgbin": "$PGBIN", "port": $port_restore, "log": "$root/logs/restore-$name-r$round.log", "datadir": "$d",
 "start_cmd": ["runuser", "-u", "postgres", "--", "$PGBIN/pg_ctl", "-D", "$d", "-l", "$root/logs/restore-$name-r$round.log", "-W", "start"],
 "deadline": 900, "verify": $verify_json, "walrs_log": "$([ "$name" = walrs ] && echo "$root/logs/restore-$name-r$round.log")",
 "cgroup": "$cgroup_prefix-restore-$name-r$round",
 "watch_pids": ${watch_pids/PROXY/$px}, "proxy_control_port": $pxport, "proxy_log": "$pxlog",
 "quiet_wait": $quiet_wait}
JSON
    "${tool[@]}" recover "$root/recover-$name-r$round.spec.json" "$root/results/recover-$name-r$round.json"
    as_pg pg_ctl -D "$d" -m fast stop >/dev/null
    wait_no_leftovers 30
    rm -rf "$d" "$d.wal"
    rmdir "/sys/fs/cgroup/cpuacct/$cgroup_prefix-restore-$name-r$round" 2>/dev/null || true
}
# Rounds of the six restores, interleaved, so that a burst of other work on the shared
# machine does not land on one tool only. A restore's time also depends on what ran just
# before it (the first restore after the WAL was made ran fastest; the restore after cp,
# which writes and deletes 4.5 GB, ran slower), so by default the order changes from round
# to round: row k of a Williams square, in which over n rounds each of the n restores runs
# once in each position and once right after each other restore (first-order carry-over
# balanced). Row 0 is 0, 1, n-1, 2, n-2, ...; row k adds k to each index, modulo n.
restore_variants=(local local-archive local-cp local-ln walrs pgbackrest)
round_order() {
    local k="$1" n=${#restore_variants[@]} lo=1 hi i first=(0)
    hi=$((n - 1))
    if [ "$restore_order" = fixed ]; then echo "${restore_variants[@]}"; return; fi
    while [ "${#first[@]}" -lt "$n" ]; do
        first+=("$lo"); lo=$((lo + 1))
        [ "${#first[@]}" -lt "$n" ] || break
        first+=("$hi"); hi=$((hi - 1))
    done
    for i in "${first[@]}"; do printf '%s ' "${restore_variants[$(( (i + k) % n ))]}"; done
    echo
}
runs_phase recovery && for round in $(seq 1 "$rounds"); do
    read -r -a order_now <<<"$(round_order $((round - 1)))"
    "$py" -c 'import json,sys; json.dump({"round": int(sys.argv[2]), "method": sys.argv[3], "order": sys.argv[4:]}, open(sys.argv[1], "w"))' \
        "$root/results/order-r$round.json" "$round" "$restore_order" "${order_now[@]}"
    for v in "${order_now[@]}"; do restore_phase "$v" "$round"; done
done
fi

if runs_phase daemon; then
step "daemon decision: single wal-push processes, $daemon_reps of each case"
# Real segments of the recovery run (its transaction part), pushed into a fresh prefix.
mapfile -t dsegs < <(ls "$root/rec-wal" | grep -E '^[0-9A-F]{24}$' | sort | grep -v "$last_seg" | tail -n $((daemon_reps * 3 + 1)))
cat >"$root/daemon.spec.json" <<JSON
{"walrs": "$walrs", "proxy_port": ${proxy_port[daemon]}, "delay_ms": $delay, "reps": $daemon_reps,
 "work": "$root/daemon", "segments_dir": "$root/rec-wal", "quiet_wait": $quiet_wait,
 "segments": [$(printf '"%s",' "${dsegs[@]}" | sed 's/,$//')],
 "store": "s3://walrs/daemon-", "env": {"AWS_ACCESS_KEY_ID": "$ak", "AWS_SECRET_ACCESS_KEY": "$sk",
         "AWS_REGION": "us-east-1", "WALRS_S3_PATH_STYLE": "true"}}
JSON
chmod 644 "$root/daemon.spec.json"
as_pg "${tool[@]}" daemon "$root/daemon.spec.json" "$root/daemon/result.json"
cp "$root/daemon/result.json" "$root/results/daemon.json"
fi

step "results"
uptime_after="$(uptime | sed 's/^ *//')"
echo "after: $(uptime)"
elapsed=$((SECONDS - started))
cpu="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
"$py" -c 'import json,sys; json.dump(dict(zip(sys.argv[2::2], sys.argv[3::2])), open(sys.argv[1], "w"))' \
    "$root/results/meta.json" \
    date "$(date -u '+%Y-%m-%d %H:%M UTC')" \
    machine "$(nproc) cores, $cpu, $(free -g | awk '/^Mem:/{print $2}') GiB RAM, Linux $(uname -r), $(df -T "$root" | awk 'NR==2{print $2}') work directory" \
    uptime_before "$uptime_before" uptime_after "$uptime_after" \
    walrs "$walrs_desc" pgbackrest "$pgbackrest_version" postgres "$(as_pg postgres --version)" \
    delay_ms "$delay" command "${THROUGHPUT_COMMAND:-bash bench/throughput.sh}" \
    elapsed "$((elapsed / 60)) min $((elapsed % 60)) s"
mkdir -p "$bench/results"
status=0
"$py" "$bench/throughput_tool.py" report "$root/results" "$bench/results/throughput-latest.md" \
    "$bench/results/throughput-latest.json" || status=$?
[ "$status" = 0 ] || [ "$status" = 3 ] || die "the report failed"
echo
echo "written: bench/results/throughput-latest.md, bench/results/throughput-latest.json ($((elapsed / 60)) min $((elapsed % 60)) s)"
ok=1
if [ "$status" = 3 ] && [ "${THROUGHPUT_STRICT:-0}" = 1 ]; then exit 3; fi
