# wal-rs: build, test, demo, bench. Everything the tests need is installed under .cache/
# (ignored by git), so `make test` works on a fresh machine.

CARGO ?= cargo
TOOLS := $(CURDIR)/.cache/tools
S3S_FS := $(TOOLS)/bin/s3s-fs
# s3s-fs newer than 0.14.1 needs a newer rustc than this toolchain: pin it.
S3S_FS_VERSION := 0.14.1

export WALRS_S3S_FS := $(S3S_FS)

.PHONY: build test unit integration tools demo bench lint fmt clean

# The workspace's binaries: wal-rs, wal-rs-control, and the fault proxy the tests use.
build:
	$(CARGO) build --release --workspace --bins

tools: $(S3S_FS)

$(S3S_FS):
	$(CARGO) install --locked s3s-fs --version $(S3S_FS_VERSION) --features binary --root $(TOOLS)

# All tests: unit tests, then integration tests against real PostgreSQL 15 and a real
# S3-protocol server on 127.0.0.1.
test: build tools
	$(CARGO) test --release --workspace

unit:
	$(CARGO) test --release --workspace --lib --bins

integration: build tools
	$(CARGO) test --release --test integration

demo: build
	bash scripts/demo.sh

# Benchmarks against pgBackRest on this machine (not tests: they report, they do not fail
# on a slow machine). WAL push/fetch, then base backups, then throughput at 30 ms latency.
bench: build tools
	bash bench/run.sh
	bash bench/backup.sh
	bash bench/throughput.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
