#!/usr/bin/env bash
# Base-backup benchmark: wal-rs backup-push / backup-fetch against pgBackRest
# `backup --type=full` / `restore` (Debian's package, lz4, process-max=2), each tool into its
# own store of the same kind, on one PostgreSQL 15 cluster loaded by pgbench:
#   - local stores: wal-rs file:// directory, pgBackRest posix repository;
#   - S3: both on one s3s-fs on 127.0.0.1 (pgBackRest only speaks https to S3, so it goes
#     through stunnel, a TLS terminator in front of the same server; wal-rs uses http);
#   - backups at a larger scale (default 200), both stores, for peak RSS and time.
# Rounds alternate the tools (wal-rs, pgBackRest, wal-rs, pgBackRest); one restore of each
# tool is started afterwards and must reach the end of recovery with every pgbench row.
# Prints the table and writes bench/results/backup-latest.md and .json. See bench/BACKUP.md.
#
# Runs as root on a fresh machine (installs pgbackrest, GNU time and stunnel4 if missing);
# every tool and PostgreSQL run as the postgres user. Builds nothing: it measures
# target/dist/wal-rs (make dist first) and needs .cache/tools/bin/s3s-fs (make tools).
#
# Environment knobs:
#   BENCH_DIR          work directory (default /tmp/wal-rs-backup-bench); removed at the end
#                      unless BENCH_KEEP=1 or the run failed (then kept, with the logs)
#   BENCH_SCALE        pgbench scale of the comparison (default 50, about 780 MB)
#   BENCH_BIG_SCALE    pgbench scale of the backup-push RSS check (default 200; 0 skips it)
#   BENCH_ROUNDS       rounds per tool, store and phase at BENCH_SCALE (default 2)
#   BENCH_BIG_ROUNDS   backup rounds per tool at BENCH_BIG_SCALE (default 1)
#   BENCH_BIG_S3=0     at BENCH_BIG_SCALE, back up to the local stores only (default: S3 too)
#   BENCH_PGBR_S3=0    do not run pgBackRest on S3 (through stunnel); compare wal-rs on S3
#                      with pgBackRest on posix only
#   BENCH_WAIT_QUIET   seconds each timed command may wait for the machine to go idle first
#                      (default 10; 0: do not wait); the report says how busy it was
#   BENCH_STRICT=1     exit 3 when a target is missed (default: report only)
#   WALRS_BIN          wal-rs binary (default target/dist/wal-rs, the LTO build `make dist` makes)
#   WALRS_S3S_FS       s3s-fs binary (default .cache/tools/bin/s3s-fs)
set -euo pipefail
bench="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$bench/.." && pwd)"
. "$repo/scripts/pg-lib.sh"

started=$SECONDS
root="${BENCH_DIR:-/tmp/wal-rs-backup-bench}"
scale="${BENCH_SCALE:-50}"
big_scale="${BENCH_BIG_SCALE:-200}"
rounds="${BENCH_ROUNDS:-2}"
big_rounds="${BENCH_BIG_ROUNDS:-1}"
pgbr_s3="${BENCH_PGBR_S3:-1}"
quiet="${BENCH_WAIT_QUIET:-10}"
walrs_src="${WALRS_BIN:-$repo/target/dist/wal-rs}"
s3s_fs="${WALRS_S3S_FS:-$repo/.cache/tools/bin/s3s-fs}"
# Python from the system, not a per-user shim under /root that postgres cannot read.
py=/usr/bin/python3
step() { printf '\n== %s\n' "$*"; }
die() { echo "bench: $*" >&2; exit 1; }
notes=()

[ -x "$walrs_src" ] || die "no wal-rs binary at $walrs_src: run make dist (or set WALRS_BIN=target/release/wal-rs)"
[ -x "$s3s_fs" ] || die "no s3s-fs at $s3s_fs: run make tools"
[ -x "$py" ] || die "$py is needed to time the commands"
if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || die "no postgres user: install PostgreSQL 15"
fi
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
echo "uptime before: $(uptime)"

step "tools: pgBackRest, GNU time, stunnel"
bash "$repo/scripts/need-packages.sh" pgbackrest /usr/bin/time:time || die "pgBackRest and GNU time are needed"
if [ "$pgbr_s3" = 1 ]; then
    if ! bash "$repo/scripts/need-packages.sh" stunnel4 openssl; then
        pgbr_s3=0
        notes+=("stunnel4 could not be installed, so pgBackRest was not run on S3: wal-rs on S3 is compared with pgBackRest on posix")
    fi
fi
pgbackrest_bin="$(command -v pgbackrest)"
pgbackrest_version="$("$pgbackrest_bin" version)"
echo "$pgbackrest_version at $pgbackrest_bin"

# Everything lives in one work directory the postgres user owns.
make_workdir "$root"
fstype="$(df -T "$root" | awk 'NR==2{print $2}')"
[ "$fstype" != tmpfs ] || notes+=("the work directory is on tmpfs: fsync costs nothing there, restore times are not representative")
pg_port=$(free_port)
s3_port=$(free_port)
tls_port=$(free_port)
s3s_pid=""
tls_pid=""
pg_pid=""
verify_dirs=()
ok=0

cleanup() {
    # Runs on every exit, success or failure: stop what this script started, by its own
    # data directories and pids only.
    set +e
    local d p
    for d in "${verify_dirs[@]}"; do as_pg pg_ctl -D "$d" -m immediate stop >/dev/null 2>&1; done
    as_pg pg_ctl -D "$root/pg" -m immediate stop >/dev/null 2>&1
    for p in $s3s_pid $tls_pid; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    # Processes a cut-short run may have left: those running this run's private copy of
    # wal-rs (a prefetcher), or pgBackRest with one of this run's config files.
    for p in /proc/[0-9]*; do
        if [ "$(readlink "$p/exe" 2>/dev/null)" = "$root/bin/wal-rs" ] ||
            tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -q -- "--config=$root/"; then
            kill "${p#/proc/}" 2>/dev/null
        fi
    done
    if [ "$ok" = 1 ] && [ "${BENCH_KEEP:-0}" != 1 ]; then
        rm -rf "$root"
    else
        echo "bench: work directory kept for inspection: $root (logs: $root/logs/)" >&2
    fi
}
trap cleanup EXIT

# Copy the binary: others may rebuild target/ during the run, and the postgres user must
# be able to execute it. The copy is what gets measured, and its checksum is recorded.
as_pg mkdir -p "$root/bin" "$root/logs" "$root/walrs-store" "$root/restore" \
    "$root/pgbr/repo" "$root/pgbr/log" "$root/pgbr/lock" "$root/pgbr/spool" \
    "$root/pgbr/log-s3" "$root/pgbr/lock-s3" "$root/pgbr/spool-s3"
cp "$walrs_src" "$root/bin/wal-rs"
cp "$bench/backup_measure.py" "$root/bin/backup_measure.py"
chmod 755 "$root/bin/wal-rs" "$root/bin/backup_measure.py"
walrs="$root/bin/wal-rs"
walrs_desc="$(walrs_describe "$walrs" "$walrs_src" "$repo")"
echo "wal-rs: $walrs_desc"

step "S3 store: s3s-fs on 127.0.0.1:$s3_port"
mkdir -p "$root/s3data/bench"
"$s3s_fs" --host 127.0.0.1 --port "$s3_port" --access-key benchak --secret-key benchsecretkey \
    "$root/s3data" >"$root/logs/s3s-fs.log" 2>&1 &
s3s_pid=$!
wait_for "s3s-fs to listen on $s3_port" 30 bash -c "exec 3<>/dev/tcp/127.0.0.1/$s3_port"
s3_server="s3s-fs $("$s3s_fs" --version | awk '{print $NF}') on 127.0.0.1, on the same 2 cores (a test server that keeps objects as plain files; its GET is known to be slow, reading files in 4 KiB pieces)"
if [ "$pgbr_s3" = 1 ]; then
    # pgBackRest speaks only https to S3: a TLS terminator in front of the same s3s-fs.
    as_pg mkdir -p "$root/tls"
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 \
        -keyout "$root/tls/key.pem" -out "$root/tls/cert.pem" >/dev/null 2>&1
    cat >"$root/tls/stunnel.conf" <<CONF
foreground = yes
pid =
# Without these, each small request waits on Nagle's algorithm and delayed ACKs inside
# the proxy: pgBackRest's S3 restore of about 1,000 objects took 2.5x as long.
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1
[s3]
accept = 127.0.0.1:$tls_port
connect = 127.0.0.1:$s3_port
cert = $root/tls/cert.pem
key = $root/tls/key.pem
CONF
    stunnel4 "$root/tls/stunnel.conf" >"$root/logs/stunnel.log" 2>&1 &
    tls_pid=$!
    wait_for "stunnel to listen on $tls_port" 30 bash -c "exec 3<>/dev/tcp/127.0.0.1/$tls_port"
    s3_server="$s3_server; pgBackRest reaches it through stunnel $(stunnel4 -version 2>&1 | awk '/^stunnel/{print $2; exit}') (TLS) on 127.0.0.1:$tls_port"
fi

step "PostgreSQL 15 cluster, archive_mode=on, archiving into both tools' stores"
# The archive_command chains both tools, for one store kind at a time: wal-rs's
# backup-push and pgBackRest's backup each wait until the backup's WAL is in their own
# store. Before each backup the tool being measured goes first in the chain, so neither
# waits for the other's push of the backup's last segment.
s3_walrs_vars="WALRS_STORE=s3://bench/walrs AWS_ACCESS_KEY_ID=benchak AWS_SECRET_ACCESS_KEY=benchsecretkey AWS_ENDPOINT_URL=http://127.0.0.1:$s3_port AWS_REGION=us-east-1 WALRS_S3_PATH_STYLE=true"
push_walrs_local="WALRS_STORE=file://$root/walrs-store $walrs wal-push %p"
push_pgbr_local="$pgbackrest_bin --config=$root/pgbr-posix.conf --stanza=bench archive-push %p"
push_walrs_s3="$s3_walrs_vars $walrs wal-push %p"
push_pgbr_s3="$pgbackrest_bin --config=$root/pgbr-s3.conf --stanza=bench archive-push %p"
archive_chain() { # archive_chain local|s3 wal-rs|pgBackRest: the archive_command, that tool first
    local w p
    if [ "$1" = local ]; then w=$push_walrs_local p=$push_pgbr_local; else w=$push_walrs_s3 p=$push_pgbr_s3; fi
    if [ "$1" = s3 ] && [ "$pgbr_s3" != 1 ]; then echo "$w"
    elif [ "$2" = wal-rs ]; then echo "$w && $p"
    else echo "$p && $w"
    fi
}
archive_local="$(archive_chain local wal-rs)"
as_pg initdb -D "$root/pg" -U postgres --auth=trust >/dev/null
cat >>"$root/pg/postgresql.conf" <<CONF
port = $pg_port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$root'
wal_level = replica
archive_mode = on
archive_command = '$archive_local'
# No timed checkpoint and no autovacuum inside a measurement: each backup's own fast
# checkpoint is preceded by an untimed CHECKPOINT, so both tools get an equally cheap one.
checkpoint_timeout = 1h
autovacuum = off
CONF
as_pg pg_ctl -D "$root/pg" -l "$root/logs/postgres.log" -w start >/dev/null
pg_pid="$(head -1 "$root/pg/postmaster.pid")"

step "pgBackRest stanzas (lz4, process-max=2): posix repository$([ "$pgbr_s3" = 1 ] && echo ', S3 repository through stunnel')"
pgbr_common="compress-type=lz4
process-max=2
repo1-retention-full=100
log-level-console=warn"
cat >"$root/pgbr-posix.conf" <<CONF
[global]
repo1-type=posix
repo1-path=$root/pgbr/repo
$pgbr_common
log-path=$root/pgbr/log
lock-path=$root/pgbr/lock
spool-path=$root/pgbr/spool

[bench]
pg1-path=$root/pg
pg1-port=$pg_port
pg1-socket-path=$root
CONF
s3_repo() { # port: an S3 repository on s3s-fs (directly, or through the TLS proxy)
    cat <<CONF
[global]
repo1-type=s3
repo1-path=/pgbr
repo1-s3-bucket=bench
repo1-s3-endpoint=127.0.0.1
repo1-storage-port=$1
repo1-s3-region=us-east-1
repo1-s3-key=benchak
repo1-s3-key-secret=benchsecretkey
repo1-s3-uri-style=path
repo1-storage-verify-tls=n
$pgbr_common
log-path=$root/pgbr/log-s3
lock-path=$root/pgbr/lock-s3
spool-path=$root/pgbr/spool-s3

[bench]
pg1-path=$root/pg
pg1-port=$pg_port
pg1-socket-path=$root
CONF
}
s3_repo "$s3_port" >"$root/pgbr-s3-http.conf"
[ "$pgbr_s3" = 1 ] && s3_repo "$tls_port" >"$root/pgbr-s3.conf"
chmod 644 "$root"/pgbr-*.conf
as_pg "$pgbackrest_bin" --config="$root/pgbr-posix.conf" --stanza=bench stanza-create
[ "$pgbr_s3" = 1 ] && as_pg "$pgbackrest_bin" --config="$root/pgbr-s3.conf" --stanza=bench stanza-create
# Can pgBackRest talk plain http to the S3 server, as wal-rs does? (It cannot: it always
# starts TLS.) Record its own answer.
http_probe="$(as_pg timeout 60 "$pgbackrest_bin" --config="$root/pgbr-s3-http.conf" --stanza=bench --io-timeout=2 repo-ls 2>&1 | head -3 | tr '\n' ' ')" && http_rc=0 || http_rc=$?
echo "pgBackRest against http://127.0.0.1:$s3_port (plain http): exit $http_rc: $http_probe"
if [ "$http_rc" != 0 ]; then
    if [ "$pgbr_s3" = 1 ]; then
        notes+=("$pgbackrest_version cannot use an S3 server over plain http: \`repo-ls\` against s3s-fs at http://127.0.0.1:$s3_port exited $http_rc with \`${http_probe% }\`. Its S3 rows therefore go through stunnel, a TLS terminator (self-signed certificate, repo1-storage-verify-tls=n) in front of the same s3s-fs, while wal-rs talks plain http to s3s-fs: pgBackRest's S3 times include TLS and one more local hop, on the same 2 cores.")
    else
        notes+=("$pgbackrest_version cannot use an S3 server over plain http: \`repo-ls\` exited $http_rc with \`${http_probe% }\`. wal-rs on S3 is compared with pgBackRest on its posix repository.")
    fi
else
    notes+=("pgBackRest answered over plain http (unexpected for $pgbackrest_version)")
fi

# wait_archived: every finished WAL segment archived by the current archive_command.
wait_archived() {
    wait_for "the archiver to catch up (see $root/logs/postgres.log)" 600 \
        bash -c "! compgen -G '$root/pg/pg_wal/archive_status/*.ready' >/dev/null"
}
# set_archive COMMAND: switch archive_command, reload, and let the archiver catch up.
set_archive() {
    psql_at "$pg_port" "alter system set archive_command = '$1'" >/dev/null
    psql_at "$pg_port" "select pg_reload_conf()" >/dev/null
    psql_at "$pg_port" "select pg_switch_wal()" >/dev/null
    wait_archived
}
load() { # load SCALE: pgbench -i, then a checkpoint; every row's WAL archived
    local t0=$SECONDS
    as_pg pgbench -h 127.0.0.1 -p "$pg_port" -U postgres -i -s "$1" -q postgres 2>&1 | tail -1
    psql_at "$pg_port" "checkpoint"
    wait_archived
    db_size["$1"]="$(psql_at "$pg_port" "select pg_size_pretty(pg_database_size('postgres'))"), data directory $(du -sh "$root/pg" | cut -f1)"
    echo "scale $1: ${db_size[$1]}; load and archiving took $((SECONDS - t0)) s"
}
declare -A db_size

step "pgbench -i -s $scale"
load "$scale"

# measure PHASE TOOL STORE SCALE ROUND OPTIONS... -- ARGV...: one timed command, as postgres.
measure() {
    local phase=$1 tool=$2 store=$3 sc=$4 rnd=$5
    shift 5
    local trees=(--tree "$pg_pid" --tree "$s3s_pid")
    [ -z "$tls_pid" ] || trees+=(--tree "$tls_pid")
    as_pg "$py" "$root/bin/backup_measure.py" time --out "$root/results.jsonl" \
        --tag "phase=$phase" --tag "tool=$tool" --tag "store=$store" --tag "scale=$sc" --tag "round=$rnd" \
        "${trees[@]}" --quiet-secs "$quiet" --cwd "$root" "$@"
}
pg_env=(--env "PGHOST=$root" --env "PGPORT=$pg_port" --env PGUSER=postgres --env PGDATABASE=postgres)
walrs_local_env=(--env "WALRS_STORE=file://$root/walrs-store")
walrs_s3_env=()
for kv in $s3_walrs_vars; do walrs_s3_env+=(--env "$kv"); done

# backup_pair KIND SCALE ROUND: one wal-rs backup-push, then one pgBackRest backup.
backup_pair() {
    local kind=$1 sc=$2 rnd=$3
    set_archive "$(archive_chain "$kind" wal-rs)"
    psql_at "$pg_port" "checkpoint"
    wait_archived
    if [ "$kind" = local ]; then
        measure backup wal-rs local "$sc" "$rnd" "${walrs_local_env[@]}" "${pg_env[@]}" \
            --size-dir "$root/walrs-store/basebackups_005" --json-stdout --log "$root/logs/walrs-local.log" \
            -- "$walrs" backup-push --fast --json "$root/pg"
    else
        measure backup wal-rs "s3 (s3s-fs, http)" "$sc" "$rnd" "${walrs_s3_env[@]}" "${pg_env[@]}" \
            --size-dir "$root/s3data/bench/walrs/basebackups_005" --json-stdout --log "$root/logs/walrs-s3.log" \
            -- "$walrs" backup-push --fast --json "$root/pg"
    fi
    [ "$kind" = local ] || [ "$pgbr_s3" = 1 ] || return 0
    set_archive "$(archive_chain "$kind" pgBackRest)"
    psql_at "$pg_port" "checkpoint"
    wait_archived
    if [ "$kind" = local ]; then
        measure backup pgBackRest "local (posix)" "$sc" "$rnd" --size-dir "$root/pgbr/repo/backup" \
            --log "$root/logs/pgbackrest-local.log" \
            -- "$pgbackrest_bin" --config="$root/pgbr-posix.conf" --stanza=bench backup --type=full --start-fast
    elif [ "$pgbr_s3" = 1 ]; then
        measure backup pgBackRest "s3 (s3s-fs via stunnel)" "$sc" "$rnd" --size-dir "$root/s3data/bench/pgbr/backup" \
            --log "$root/logs/pgbackrest-s3.log" \
            -- "$pgbackrest_bin" --config="$root/pgbr-s3.conf" --stanza=bench backup --type=full --start-fast
    fi
}

# restore_pair KIND ROUND: restore each tool's latest backup into a fresh empty directory.
restore_pair() {
    local kind=$1 rnd=$2 w="$root/restore/walrs-$1-$2" p="$root/restore/pgbackrest-$1-$2"
    as_pg mkdir -m 700 "$w" "$p"
    if [ "$kind" = local ]; then
        measure restore wal-rs local "$scale" "$rnd" "${walrs_local_env[@]}" --log "$root/logs/walrs-local.log" \
            -- "$walrs" backup-fetch "$w" LATEST
        measure restore pgBackRest "local (posix)" "$scale" "$rnd" --log "$root/logs/pgbackrest-local.log" \
            -- "$pgbackrest_bin" --config="$root/pgbr-posix.conf" --stanza=bench restore --pg1-path="$p"
    else
        measure restore wal-rs "s3 (s3s-fs, http)" "$scale" "$rnd" "${walrs_s3_env[@]}" --log "$root/logs/walrs-s3.log" \
            -- "$walrs" backup-fetch "$w" LATEST
        if [ "$pgbr_s3" = 1 ]; then
            measure restore pgBackRest "s3 (s3s-fs via stunnel)" "$scale" "$rnd" --log "$root/logs/pgbackrest-s3.log" \
                -- "$pgbackrest_bin" --config="$root/pgbr-s3.conf" --stanza=bench restore --pg1-path="$p"
        fi
    fi
}

# verify TOOL STORE DIR [VAR=VALUE...]: start a restored copy (archive_mode=off, its own
# port) with the tool's restore_command, wait for the end of recovery, count the rows.
verify() {
    local tool=$1 store=$2 dir=$3
    shift 3
    local port t0 state="" deadline count tli p
    port=$(free_port)
    verify_dirs+=("$dir")
    t0=$(date +%s%N)
    as_pg env "$@" pg_ctl -D "$dir" -l "$root/logs/verify-$(basename "$dir").log" -w -t 600 \
        -o "-c port=$port -c listen_addresses=127.0.0.1 -c unix_socket_directories=$root -c archive_mode=off" \
        start >/dev/null || die "the $tool restore in $dir did not start: see $root/logs/verify-$(basename "$dir").log"
    deadline=$((SECONDS + 600))
    until [ "$state" = f ]; do
        [ "$SECONDS" -lt "$deadline" ] || die "the $tool restore in $dir did not finish recovery within 600 s"
        sleep 0.2
        state="$(psql_at "$port" "select pg_is_in_recovery()" 2>/dev/null || true)"
    done
    local ms recovery_s
    ms=$((($(date +%s%N) - t0) / 1000000))
    recovery_s=$(printf '%d.%03d' $((ms / 1000)) $((ms % 1000)))
    count="$(psql_at "$port" "select count(*) from pgbench_accounts")"
    tli="$(psql_at "$port" "select timeline_id from pg_control_checkpoint()")"
    as_pg pg_ctl -D "$dir" -m fast stop >/dev/null
    # The restore_command of a wal-rs copy may have left a prefetcher: let it end first.
    for _ in $(seq 100); do
        local busy=0
        for p in /proc/[0-9]*; do
            [ "$(readlink "$p/exe" 2>/dev/null)" = "$walrs" ] && [[ "$(readlink "$p/cwd" 2>/dev/null)" == "$dir"* ]] && busy=1
        done
        [ "$busy" = 0 ] && break
        sleep 0.1
    done
    local expected=$((scale * 100000)) good=false
    [ "$count" = "$expected" ] && good=true
    printf '{"tool": "%s", "store": "%s", "port": %s, "recovery_s": %s, "timeline": %s, "count": %s, "expected": %s, "ok": %s}\n' \
        "$tool" "$store" "$port" "$recovery_s" "$tli" "$count" "$expected" "$good" >>"$root/verify.jsonl"
    echo "  verified $tool ($store): end of recovery after ${recovery_s} s on timeline $tli, $count rows in pgbench_accounts (expected $expected)"
    [ "$good" = true ] || die "the $tool restore in $dir has $count rows in pgbench_accounts, expected $expected"
    rm -rf "$dir"
}

# s3_probe: how fast the S3 server answers, untimed and outside the comparison: the mean
# time of 50 GETs of a small object on one connection, and the rate of one GET of the
# largest wal-rs partition; directly over http, and through the TLS proxy.
s3_probe() {
    command -v curl >/dev/null 2>&1 || return 0
    local small big proto port out
    small="$(cd "$root/s3data/bench" && find walrs -name cluster.json | head -1)"
    big="$(cd "$root/s3data/bench" && find walrs/basebackups_005 -name 'part_*' -printf '%s %p\n' | sort -n | tail -1 | cut -d' ' -f2)"
    [ -n "$small" ] && [ -n "$big" ] || return 0
    for proto in http https; do
        if [ "$proto" = http ]; then port=$s3_port; else [ -n "$tls_pid" ] || continue; port=$tls_port; fi
        local sargs=()
        for _ in $(seq 50); do sargs+=(-o /dev/null "$proto://127.0.0.1:$port/bench/$small"); done
        out="$(curl -sk --aws-sigv4 aws:amz:us-east-1:s3 --user benchak:benchsecretkey -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' \
            -w '%{http_code} %{time_total}\n' "${sargs[@]}" 2>/dev/null | awk '$1==200{n++; t+=$2} END{if(n) printf "%.1f ms per small GET (%d of 50 answered 200)", t/n*1000, n}')" || true
        out="$out, $(curl -sk --aws-sigv4 aws:amz:us-east-1:s3 --user benchak:benchsecretkey -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' \
            -o /dev/null -w '%{http_code} %{size_download} %{time_total}' "$proto://127.0.0.1:$port/bench/$big" 2>/dev/null |
            awk '$1==200 && $3>0{printf "%.0f MiB/s for one GET of a %.0f MiB object", $2/$3/1048576, $2/1048576}')" || true
        [ "$proto" = http ] || proto="https through stunnel"
        s3_speed+=("$proto: $out")
    done
    echo "  S3 server, measured with curl: $(IFS=';'; echo "${s3_speed[*]}")"
}
s3_speed=()

# phase KIND: backups, restores and checks on one kind of store.
phase() {
    local kind=$1 r
    for r in $(seq "$rounds"); do backup_pair "$kind" "$scale" "$r"; done
    for r in $(seq "$rounds"); do restore_pair "$kind" "$r"; done
    for r in $(seq 2 "$rounds"); do rm -rf "$root/restore/walrs-$kind-$r" "$root/restore/pgbackrest-$kind-$r"; done
    [ "$kind" = local ] || s3_probe
    if [ "$kind" = local ]; then
        verify wal-rs local "$root/restore/walrs-local-1"
        verify pgBackRest "local (posix)" "$root/restore/pgbackrest-local-1"
    else
        verify wal-rs "s3 (s3s-fs, http)" "$root/restore/walrs-s3-1" AWS_ACCESS_KEY_ID=benchak AWS_SECRET_ACCESS_KEY=benchsecretkey
        if [ "$pgbr_s3" = 1 ]; then
            verify pgBackRest "s3 (s3s-fs via stunnel)" "$root/restore/pgbackrest-s3-1"
        else
            rm -rf "$root/restore/pgbackrest-s3-1"
        fi
    fi
}

step "measure, local stores: $rounds rounds of backups, then $rounds of restores, tools alternating (as postgres)"
phase local

step "measure, S3: archive_command now pushes to the S3 stores"
set_archive "$(archive_chain s3 wal-rs)"
phase s3

if [ "$big_scale" != 0 ]; then
    step "backups at scale $big_scale (local stores, then S3)"
    set_archive "$(archive_chain local wal-rs)"
    avail_gib=$(df -BG --output=avail "$root" | tail -1 | tr -dc 0-9)
    need_gib=$((big_scale * 15 / 200 + 5))
    if [ "$avail_gib" -lt "$need_gib" ]; then
        notes+=("scale $big_scale skipped: $avail_gib GiB free in $root, about $need_gib GiB needed")
        echo "skipped: only $avail_gib GiB free, about $need_gib GiB needed"
        big_scale=0
    else
        load "$big_scale"
        for r in $(seq "$big_rounds"); do backup_pair local "$big_scale" "$r"; done
        if [ "${BENCH_BIG_S3:-1}" = 1 ]; then
            for r in $(seq "$big_rounds"); do backup_pair s3 "$big_scale" "$r"; done
        fi
    fi
fi

step "results"
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"
echo "uptime after: $(uptime)"
mkdir -p "$bench/results"
elapsed=$((SECONDS - started))
cpu="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
database="pgbench -i -s $scale: ${db_size[$scale]}"
[ "$big_scale" = 0 ] || database="$database; pgbench -i -s $big_scale: ${db_size[$big_scale]}"
[ "${#s3_speed[@]}" = 0 ] || s3_server="$s3_server. Measured with curl after the S3 restores: $(IFS=';'; echo "${s3_speed[*]}" | sed 's/;/; /g')"
archive_s3="$(archive_chain s3 wal-rs)"
notes+=("archive_command, local rows: \`${archive_local//benchsecretkey/***}\`; S3 rows: \`${archive_s3//benchsecretkey/***}\`. Before each backup it is set (ALTER SYSTEM, reload, pg_switch_wal, archiver caught up) with the tool being measured first in the chain, so that neither waits for the other's push of the backup's last segment. Both tools wait for the backup's WAL in their own store: wal-rs always, pgBackRest with its default archive-check=y.")
notes+=("Before each timed command: (backups) an untimed CHECKPOINT and the archiver caught up; then sync and a wait of at most $quiet s for the machine to go idle. The data directory and the stores are in the page cache for both tools (RAM is larger than everything here); restores write to the same $fstype file system the stores are on. pgBackRest fsyncs each restored file; wal-rs calls syncfs() on the file system once.")
notes+=("The cluster runs with autovacuum=off and checkpoint_timeout=1h so that no background work of PostgreSQL lands inside one tool's measurement; data checksums are off (initdb's default), so pgBackRest does not verify pages.")
printf '%s\n' "${notes[@]}" >"$root/notes.txt"
"$py" -c '
import json, sys
meta = dict(zip(sys.argv[2::2], sys.argv[3::2]))
meta["notes"] = [l.rstrip("\n") for l in open(sys.argv[1]) if l.strip()]
print(json.dumps(meta, indent=1))' "$root/notes.txt" \
    date "$(date -u '+%Y-%m-%d %H:%M UTC')" \
    machine "$(nproc) cores, $cpu, $(free -g | awk '/^Mem:/{print $2}') GiB RAM, Linux $(uname -r), $fstype work directory" \
    cores "$(nproc)" load_before "$load_before" load_after "$load_after" \
    walrs "$walrs_desc" \
    pgbackrest "$pgbackrest_version (compress-type=lz4, process-max=2, archive-check=y, restore fsyncs)" \
    postgres "$(as_pg postgres --version)" database "$database" s3_server "$s3_server" scale "$scale" big_scale "$big_scale" \
    command "${BENCH_COMMAND:-bash bench/backup.sh}" elapsed "$elapsed s (including loading the data)" \
    >"$root/meta.json"
status=0
"$py" "$bench/backup_measure.py" report "$root/results.jsonl" "$root/verify.jsonl" "$root/meta.json" \
    "$bench/results/backup-latest.md" "$bench/results/backup-latest.json" || status=$?
[ "$status" = 0 ] || [ "$status" = 3 ] || die "the report failed"
echo
echo "load average before / after: $load_before / $load_after"
echo "written: bench/results/backup-latest.md, bench/results/backup-latest.json (${elapsed} s)"
ok=1
if [ "$status" = 3 ] && [ "${BENCH_STRICT:-0}" = 1 ]; then exit 3; fi
