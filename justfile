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
