# wal-rs: build, test, demo, bench. Everything the tests need is installed under .cache/
# (ignored by git), so `make test` works on a fresh machine.

CARGO ?= cargo
TOOLS := $(CURDIR)/.cache/tools
S3S_FS := $(TOOLS)/bin/s3s-fs
# s3s-fs is pinned: a newer release may need a newer rustc than the rust-version in Cargo.toml.
S3S_FS_VERSION := 0.14.1

export WALRS_S3S_FS := $(S3S_FS)

.PHONY: build dist test unit integration soak tools packages demo bench lint fmt clean fuzz

# The workspace's binaries: wal-rs, wal-rs-control, and the fault proxy the tests use.
build:
	$(CARGO) build --release --workspace --bins

# The binary to install and to benchmark: target/dist/wal-rs, built with whole-program LTO
# (the `dist` profile in Cargo.toml). About 9 minutes here; the tests use the release build.
dist:
	$(CARGO) build --profile dist -p wal-rs --bin wal-rs

tools: $(S3S_FS)

# Commands that a machine with only PostgreSQL 15 lacks, installed with apt-get when missing
# (scripts/need-packages.sh): the tests run the lz4 tool (`lz4 -d` of a stored object must
# give back the original bytes); the demo and the soak report run python3.
packages:
	bash scripts/need-packages.sh lz4

$(S3S_FS):
	$(CARGO) install --locked s3s-fs --version $(S3S_FS_VERSION) --features binary --root $(TOOLS)

# All tests: unit tests, then integration tests against real PostgreSQL 15 and a real
# S3-protocol server on 127.0.0.1.
test: build tools packages
	$(CARGO) test --release --workspace

unit:
	$(CARGO) test --release --workspace --lib --bins

integration: build tools packages
	$(CARGO) test --release --test integration

# Reliability scenarios (issue 6): archiving and recovery through injected faults, kill -9
# at random moments, black holes, full disks. Seeded (WALRS_SOAK_SEED replays a run); each
# writes target/soak-results/<scenario>.json, rendered into docs/reliability.md.
soak: build tools packages
	bash scripts/need-packages.sh python3
	$(CARGO) test --release --test soak -- --test-threads=1
	python3 scripts/soak-report.py

demo: build
	bash scripts/need-packages.sh python3
	bash scripts/demo.sh

# Benchmarks against pgBackRest on this machine (not tests: they report, they do not fail
# on a slow machine). WAL push/fetch, then base backups, then throughput at 30 ms latency.
# They measure target/dist/wal-rs (WALRS_BIN picks another).
bench: build dist tools
	bash bench/run.sh
	bash bench/backup.sh
	bash bench/throughput.sh

# Coverage-guided fuzzing (cargo-fuzz, nightly Rust; not part of `make test`): each target
# runs FUZZ_SECONDS from the seeds in fuzz/corpus/<target>/. A crash lands in
# fuzz/artifacts/<target>/: add it to fuzz/regressions/<target>/ so tests/fuzz_regressions.rs
# keeps replaying it. FUZZ_TARGETS picks some; FUZZ_FLAGS adds libFuzzer flags.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= wal_name page_header sentinel manifest metadata tar_partition decode decrypt
FUZZ_FLAGS ?=

fuzz:
	@rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
	@$(CARGO) +nightly fuzz --version >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked
	cd fuzz && $(CARGO) +nightly fuzz build -O --debug-assertions
	@failed=""; for t in $(FUZZ_TARGETS); do \
	  mkdir -p fuzz/corpus/$$t; \
	  echo "== fuzz $$t for $(FUZZ_SECONDS) s"; \
	  (cd fuzz && $(CARGO) +nightly fuzz run -O --debug-assertions $$t corpus/$$t -- \
	    -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -timeout=30 -print_final_stats=1 $(FUZZ_FLAGS)) \
	    || failed="$$failed $$t"; \
	done; \
	if [ -n "$$failed" ]; then echo "fuzz: findings in$$failed (see fuzz/artifacts/)"; exit 1; fi

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
