#!/usr/bin/env python3
"""Fetch promtool, pinned, and print its path: `python3 tools/promtool.py`.

promtool (Prometheus's rule checker and rule unit-test runner) comes from Debian's `prometheus`
package at a pinned version, verified by sha256, unpacked without root and without installing
anything: `apt-get download` fetches the .deb (from the machine's configured Debian mirror, into
a private package list when the system's has none), and the binary is taken out of its
data.tar.xz with the standard library. It is kept in .cache/tools/ and reused.

$PROMTOOL, when set, names a promtool to use instead (any 2.x; printed as is).
Standard library only: it runs before `uv sync`.
"""

from __future__ import annotations

import hashlib
import io
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "prometheus"
VERSION = "2.42.0+ds-5+deb12u1"  # Debian 12 (bookworm)
# One pinned .deb per architecture this project runs on.
SHA256 = {"amd64": "81d59a24fce84f7fbe97a45a4f2914b6a5881b5cd1db2a6a0e129e515e1a5f55"}
MEMBER = "./usr/bin/promtool"

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "tools"


def architecture() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        machine, machine
    )


def cached_path() -> Path:
    return CACHE / f"promtool-{VERSION}-{architecture()}" / "promtool"


def fail(message: str) -> None:
    print(f"promtool: {message}", file=sys.stderr)
    sys.exit(1)


def apt_download(workdir: Path) -> Path:
    """The pinned .deb in `workdir`: with the system's package lists, else a private copy."""
    spec = f"{PACKAGE}={VERSION}"

    def apt_get(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["apt-get", "-q", *args], cwd=workdir, capture_output=True, text=True, check=False
        )

    attempt = apt_get("download", spec)
    if attempt.returncode != 0:
        # No (or stale) system package lists, and no root to refresh them: fetch a private
        # set into the work directory and download with those.
        lists = workdir / "lists"
        (lists / "partial").mkdir(parents=True)
        (workdir / "archives" / "partial").mkdir(parents=True)
        private = [
            f"-oDir::State::Lists={lists}",
            f"-oDir::Cache={workdir}",
            f"-oDir::Cache::archives={workdir / 'archives'}",
            "-oDebug::NoLocking=1",
        ]
        update = apt_get(*private, "update")
        attempt = apt_get(*private, "download", spec)
        if attempt.returncode != 0:
            fail(
                f"apt-get download {spec} failed (is this Debian 12 with its mirror "
                f"reachable? set PROMTOOL to a promtool instead):\n{update.stderr}"
                f"{attempt.stderr}"
            )
    debs = sorted(workdir.glob(f"{PACKAGE}_*.deb"))
    if len(debs) != 1:
        fail(f"expected one {PACKAGE} .deb from apt-get download, found {len(debs)}")
    return debs[0]


def ar_member(archive: bytes, prefix: str) -> bytes:
    """A member of a Unix ar archive (a .deb is one) whose name starts with `prefix`."""
    if not archive.startswith(b"!<arch>\n"):
        fail("the .deb is not an ar archive")
    offset = 8
    while offset + 60 <= len(archive):
        header = archive[offset : offset + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        start = offset + 60
        if name.startswith(prefix):
            return archive[start : start + size]
        offset = start + size + (size % 2)
    fail(f"no {prefix}* in the .deb")
    raise AssertionError("unreachable")


def fetch() -> Path:
    arch = architecture()
    expected = SHA256.get(arch)
    if expected is None:
        fail(f"no pinned {PACKAGE} .deb for {arch}; set PROMTOOL to a promtool")
    target = cached_path()
    with tempfile.TemporaryDirectory(prefix="promtool-") as tmp:
        deb = apt_download(Path(tmp))
        data = deb.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected:
            fail(f"{deb.name}: sha256 {digest}, expected {expected}; not using it")
        payload = ar_member(data, "data.tar")
        with tarfile.open(fileobj=io.BytesIO(payload)) as tar:
            member = tar.extractfile(MEMBER)
            if member is None:
                fail(f"{MEMBER} is not in {deb.name}")
                raise AssertionError("unreachable")
            binary = member.read()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    partial.replace(target)  # atomic: a concurrent run sees no half-written binary
    return target


def main() -> None:
    explicit = os.environ.get("PROMTOOL")
    if explicit:
        if shutil.which(explicit) is None:
            fail(f"PROMTOOL={explicit} is not an executable")
        print(explicit)
        return
    path = cached_path()
    if not os.access(path, os.X_OK):
        print(f"promtool: fetching {PACKAGE} {VERSION} with apt-get download", file=sys.stderr)
        path = fetch()
    print(path)


if __name__ == "__main__":
    main()
