"""The whole-market overlay: an Indexed Job whose pods are the shards of one run.

Rendered with `kubectl kustomize` and validated like the base and the example
(tests/test_manifests.py, whose checks it reuses), plus what sharding relies on.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import kubernetes_validate
import pytest
from test_manifests import (
    CONTAINER,
    FINAL_EXITS,
    K8S_VERSIONS,
    MANIFESTS,
    PASSWORD_ENV,
    SPEC_ENV,
    Obj,
    check_ca,
    check_grace,
    check_password,
    check_probe_and_resources,
    check_security,
    config,
    mebibytes,
    pod_spec,
    render,
    the,
)

MARKET = MANIFESTS / "overlays" / "market"
# The settings of a sharded, market-wide run, beside the spec's.
MARKET_ENV = SPEC_ENV | {"SHARD_COUNT", "STREAMS_PER_CONNECTION", "SYMBOLS_REFRESH"}


@pytest.fixture
def market() -> tuple[Obj, ...]:
    return render(MARKET)


def check_indexed(job: Obj, configmap: Obj) -> None:
    spec = job["spec"]
    env = config(job, configmap)
    shards = int(env["SHARD_COUNT"])
    assert spec.get("completionMode") == "Indexed", "JOB_COMPLETION_INDEX names each pod's shard"
    assert spec["completions"] == shards, "one completion index per shard, no more, no fewer"
    assert spec["parallelism"] == shards, "every shard runs at once"
    assert "SHARD_INDEX" not in env, "the index comes from JOB_COMPLETION_INDEX, per pod"
    assert spec.get("backoffLimitPerIndex", 0) >= 1, "a failing shard is retried on its own"
    assert "backoffLimit" not in spec, "a Job-wide limit would let one shard's retries end all"
    assert pod_spec(job)["restartPolicy"] == "Never"
    assert spec.get("podReplacementPolicy") == "Failed"
    rules = spec["podFailurePolicy"]["rules"]
    fail_index = [
        r
        for r in rules
        if r["action"] == "FailIndex"
        and r["onExitCodes"]["operator"] == "In"
        and r["onExitCodes"]["values"] == FINAL_EXITS
        and r["onExitCodes"].get("containerName", CONTAINER) == CONTAINER
    ]
    assert fail_index, "exits 2 and 3 must fail their index at once, not spend its retries"
    assert not [r for r in rules if r["action"] == "FailJob"], "one shard must not end all"
    ignore = [
        r
        for r in rules
        if r["action"] == "Ignore"
        and any(c["type"] == "DisruptionTarget" for c in r.get("onPodConditions", []))
    ]
    assert ignore, "evictions must not spend a shard's retries"
    assert int(env["STREAMS_PER_CONNECTION"]) <= 1024


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_market_objects_validate_against_kubernetes_schemas(
    market: tuple[Obj, ...], version: str
) -> None:
    assert {o["kind"] for o in market} == {"ServiceAccount", "ConfigMap", "NetworkPolicy", "Job"}
    for obj in market:
        kubernetes_validate.validate(obj, version, strict=True)


def test_market_job_is_indexed_by_shard(market: tuple[Obj, ...]) -> None:
    check_indexed(the(market, "Job"), the(market, "ConfigMap"))


def test_market_keeps_the_base_guarantees(market: tuple[Obj, ...]) -> None:
    job, cm = the(market, "Job"), the(market, "ConfigMap")
    check_security(job, the(market, "ServiceAccount"))
    check_grace(job, cm)
    check_password(job, cm)
    assert check_ca(job, cm) == "k3-cluster-ca-cert"
    check_probe_and_resources(job, cm)
    unknown = set(cm["data"]) - MARKET_ENV
    assert not unknown, f"not a setting of the worker (typo?): {sorted(unknown)}"


def test_market_resources_follow_the_sizing_guide(market: tuple[Obj, ...]) -> None:
    resources = next(
        c for c in pod_spec(the(market, "Job"))["containers"] if c["name"] == CONTAINER
    )["resources"]
    # docs/sizing.md: the whole market's worker stays under 200 MB; a shard gets headroom.
    assert mebibytes(resources["limits"]["memory"]) >= 256
    assert resources["limits"]["cpu"] == "1"


def test_each_pod_gets_its_shard_from_the_completion_index(
    market: tuple[Obj, ...], tmp_path: Path
) -> None:
    """The ConfigMap as each pod sees it (plus the index Kubernetes sets) passes the worker's
    parser, and the indexes name every shard once."""
    from loader.settings import load_settings  # noqa: PLC0415 - only this test needs the worker

    job, cm = the(market, "Job"), the(market, "ConfigMap")
    env = dict(cm["data"])
    ca = tmp_path / "ca.crt"
    ca.write_text("not checked here\n")
    env |= {"CA_PATH": str(ca), PASSWORD_ENV: "from-the-secret"}
    shards = []
    for index in range(job["spec"]["completions"]):
        settings = load_settings({**env, "JOB_COMPLETION_INDEX": str(index)})
        assert settings.selection.everything
        shards.append((settings.shard_index, settings.shard_count))
    count = job["spec"]["completions"]
    assert shards == [(i, count) for i in range(count)]


def _unindexed(job: Obj) -> None:
    del job["spec"]["completionMode"]


def _fewer_completions(job: Obj) -> None:
    job["spec"]["completions"] = 2


def _serial(job: Obj) -> None:
    job["spec"]["parallelism"] = 1


def _job_wide_backoff(job: Obj) -> None:
    del job["spec"]["backoffLimitPerIndex"]
    job["spec"]["backoffLimit"] = 6


def _failjob_on_2(job: Obj) -> None:
    job["spec"]["podFailurePolicy"]["rules"][0]["action"] = "FailJob"


def _disruption_counted(job: Obj) -> None:
    rules = job["spec"]["podFailurePolicy"]["rules"]
    job["spec"]["podFailurePolicy"]["rules"] = [r for r in rules if r["action"] != "Ignore"]


MUTATIONS: dict[str, Callable[[Obj], None]] = {
    "not-indexed": _unindexed,
    "fewer-completions-than-shards": _fewer_completions,
    "shards-one-at-a-time": _serial,
    "job-wide-backoff": _job_wide_backoff,
    "failjob-on-2": _failjob_on_2,
    "disruption-counted": _disruption_counted,
}


@pytest.mark.parametrize("mutation", MUTATIONS.values(), ids=MUTATIONS.keys())
def test_indexed_checks_catch_mutations(
    market: tuple[Obj, ...], mutation: Callable[[Obj], None]
) -> None:
    job, cm = the(market, "Job"), the(market, "ConfigMap")
    mutation(job)
    with pytest.raises(AssertionError):
        check_indexed(job, cm)
