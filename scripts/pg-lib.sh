# Shared shell helpers for the demo and the benchmarks: run PostgreSQL 15 tools as the
# postgres user (PostgreSQL refuses to run as root), make throwaway clusters, wait for
# conditions with deadlines (never fixed sleeps).

PGBIN="${PGBIN:-$(pg_config --bindir)}"

# as_pg CMD...: run a command as the postgres user when we are root.
as_pg() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- env PATH="$PGBIN:$PATH" "$@"
    else
        env PATH="$PGBIN:$PATH" "$@"
    fi
}

# make_workdir DIR: a fresh directory the postgres user owns.
make_workdir() {
    rm -rf "$1"
    mkdir -p "$1"
    if [ "$(id -u)" = 0 ]; then chown postgres: "$1"; fi
}

# free_port: a TCP port nothing listens on.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# wait_for DESCRIPTION SECONDS CMD...: poll CMD every 0.1 s until it succeeds or time runs out.
wait_for() {
    local what="$1" secs="$2"; shift 2
    local end=$(( $(date +%s) + secs ))
    until "$@" >/dev/null 2>&1; do
        if [ "$(date +%s)" -ge "$end" ]; then
            echo "timed out after ${secs}s waiting for: $what" >&2
            return 1
        fi
        sleep 0.1
    done
}

# psql_at PORT SQL: run one query on the local cluster at PORT, print the bare result.
psql_at() {
    as_pg psql -X -q -At -h 127.0.0.1 -p "$1" -U postgres -d postgres -c "$2"
}

# walrs_describe BIN SOURCE REPO: one line naming the wal-rs a benchmark measures: its
# version, the repository's commit (with "+local changes" when src/ or Cargo files differ
# from it), the binary's path in the repository and the first 12 hex digits of its sha256.
walrs_describe() {
    local bin="$1" src="$2" repo="$3" rev
    rev="$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?')"
    git -C "$repo" diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || rev="$rev+local changes"
    echo "$("$bin" --version), git $rev, binary ${src#"$repo"/} sha256 $(sha256sum "$bin" | cut -c1-12)"
}
