#!/usr/bin/env bash
# make demo: a throwaway PostgreSQL 15 primary archives its WAL with wal-rs into a local
# directory store; pgbench writes; a copy is restored from a base backup plus the archived
# WAL, and its table checksums are compared with the primary's.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/pg-lib.sh"

root="${DEMO_DIR:-/tmp/wal-rs-demo}"
walrs_src="${WALRS_BIN:-$here/../target/release/wal-rs}"
make_workdir "$root"
cp "$walrs_src" "$root/wal-rs"
chmod 755 "$root/wal-rs"
as_pg mkdir -p "$root/store"
store="file://$root/store"
primary_port=$(free_port)
copy_port=$(free_port)

cleanup() {
    as_pg pg_ctl -D "$root/primary" -m immediate stop >/dev/null 2>&1 || true
    as_pg pg_ctl -D "$root/copy" -m immediate stop >/dev/null 2>&1 || true
}
trap cleanup EXIT

step() { printf '\n== %s\n' "$*"; }

step "initdb a PostgreSQL 15 primary archiving with: wal-rs wal-push %p -> $store"
as_pg initdb -D "$root/primary" -U postgres --auth=trust >/dev/null
cat >>"$root/primary/postgresql.conf" <<CONF
port = $primary_port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$root'
wal_level = replica
archive_mode = on
archive_command = 'WALRS_STORE=$store $root/wal-rs wal-push %p'
max_wal_size = 256MB
CONF
as_pg pg_ctl -D "$root/primary" -l "$root/primary.log" -w start >/dev/null

step "pgbench -i -s 10, then a base backup without WAL (pg_basebackup -X none)"
as_pg pgbench -h 127.0.0.1 -p "$primary_port" -U postgres -i -s 10 -q postgres 2>&1 | tail -1
as_pg pg_basebackup -h 127.0.0.1 -p "$primary_port" -U postgres -D "$root/copy" -X none --checkpoint=fast

step "pgbench for 10 s after the backup: this WAL reaches the copy only through the archive"
as_pg pgbench -h 127.0.0.1 -p "$primary_port" -U postgres -T 10 -c 2 postgres 2>&1 | grep -E "transactions actually processed|tps" | head -2
checksum_sql="select count(*) || ' rows, sum ' || sum(abalance) || ', md5 ' || md5(string_agg(aid::text || ':' || abalance, ',' order by aid)) from pgbench_accounts"
primary_sum=$(psql_at "$primary_port" "$checksum_sql")
last=$(psql_at "$primary_port" "select pg_walfile_name(pg_switch_wal())")
wait_for "segment $last to be archived" 60 \
    bash -c "[ \"\$(cd / && $(declare -f as_pg psql_at); PGBIN=$PGBIN; psql_at $primary_port 'select last_archived_wal from pg_stat_archiver')\" \\> '$last' ] || [ \"\$(PGBIN=$PGBIN; $(declare -f as_pg psql_at); psql_at $primary_port 'select last_archived_wal from pg_stat_archiver')\" = '$last' ]"
archived=$(psql_at "$primary_port" "select archived_count from pg_stat_archiver")
echo "archived $archived files; store holds $(ls "$root/store/wal_005" | wc -l) objects, $(du -sh "$root/store/wal_005" | cut -f1)"
as_pg pg_ctl -D "$root/primary" -m fast stop >/dev/null

step "restore the copy from the archive: restore_command = 'wal-rs wal-fetch %f %p'"
cat >>"$root/copy/postgresql.conf" <<CONF
port = $copy_port
archive_mode = off
restore_command = 'WALRS_STORE=$store $root/wal-rs wal-fetch %f %p'
CONF
as_pg touch "$root/copy/recovery.signal"
as_pg pg_ctl -D "$root/copy" -l "$root/copy.log" -w start >/dev/null
wait_for "the copy to finish recovery" 300 bash -c "[ \"\$($(declare -f as_pg psql_at); PGBIN=$PGBIN; psql_at $copy_port 'select pg_is_in_recovery()')\" = f ]"
restored=$(grep -c 'restored log file' "$root/copy.log" || true)
copy_sum=$(psql_at "$copy_port" "$checksum_sql")

step "compare"
echo "primary: $primary_sum"
echo "copy:    $copy_sum"
echo "the copy replayed $restored segments fetched by wal-rs"
if [ "$primary_sum" = "$copy_sum" ]; then
    echo "OK: the restored copy matches the primary"
else
    echo "MISMATCH: the restored copy differs from the primary" >&2
    exit 1
fi
