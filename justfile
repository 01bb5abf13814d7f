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

# Deployment tools pinned outside uv.lock: kustomize is a Go program (built
# from the Go module proxy into $(go env GOPATH)/bin), checkov runs in its
# own throw-away environment via uvx so its ~100 dependencies stay out of the
# project's lock.
kustomize_version := "v5.8.2"
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

# Install the test tools that live outside uv.lock: kustomize, built by Go from its module proxy.
tools:
    #!/usr/bin/env bash
    set -euo pipefail
    gobin="$(go env GOPATH)/bin/kustomize"
    [[ -n ${KUSTOMIZE:-} || -x $gobin ]] || command -v kustomize >/dev/null ||
        go install sigs.k8s.io/kustomize/kustomize/v5@{{ kustomize_version }}

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
    # kustomize: $KUSTOMIZE, else $(go env GOPATH)/bin/kustomize, else on
    # PATH, else built from the Go module proxy at the pinned version.
    t0=$EPOCHREALTIME
    kustomize=${KUSTOMIZE:-}
    if [[ -z $kustomize ]]; then
        gobin="$(go env GOPATH 2>/dev/null || true)/bin/kustomize"
        if [[ -x $gobin ]]; then kustomize=$gobin
        elif command -v kustomize >/dev/null 2>&1; then kustomize=$(command -v kustomize)
        else
            echo "lint-deploy: installing kustomize {{ kustomize_version }} with go install" >&2
            go install sigs.k8s.io/kustomize/kustomize/v5@{{ kustomize_version }}
            kustomize=$gobin
        fi
    fi
    rendered=$(mktemp -d)
    trap 'rm -rf "$rendered"' EXIT
    "$kustomize" build manifests/base >"$rendered/base.yaml"
    for overlay in manifests/overlays/*/; do
        name=$(basename "$overlay")
        mkdir -p "$rendered/overlays"
        "$kustomize" build "$overlay" >"$rendered/overlays/$name.yaml"
    done
    step "kustomize $("$kustomize" version) render"
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

# Start the local Kafka broker (fetches its jars once; harmless when running).
kafka-up:
    python3 kafka/broker.py up

# Stop the local Kafka broker.
kafka-down:
    python3 kafka/broker.py down

# Stop the local Kafka broker and delete its data and logs (keeps jars, certs, password).
kafka-wipe:
    python3 kafka/broker.py wipe

# Show whether the local Kafka broker runs and both its listeners answer.
kafka-status:
    python3 kafka/broker.py status

# Print export lines for the local Kafka broker: eval "$(just kafka-env)".
kafka-env:
    @python3 kafka/broker.py env

# Run the tests (args go to pytest) against the local Kafka broker, started if needed.
[positional-arguments]
test *args: sync tools
    [[ -n "${LOADER_TEST_KAFKA_BOOTSTRAP:-}" ]] || python3 kafka/broker.py up
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
        python3 kafka/broker.py up
        eval "$(python3 kafka/broker.py env)"
        export KAFKA_BOOTSTRAP_SERVERS=$LOADER_TEST_KAFKA_BOOTSTRAP
    fi
    exec uv run python -m loader.testing.demo

# Benchmark end to end, a few minutes; writes docs/benchmarks.md and docs/freshness.png (args: --no-docs --window 5 ...).
[positional-arguments]
bench *args: sync
    BENCH_COMMAND="just bench $*" uv run python -m bench.run "$@"
