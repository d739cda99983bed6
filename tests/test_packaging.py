"""The package builds an sdist and a platform wheel holding the compiled core,
and the Dockerfile copies and runs only what the repository has.

No container engine runs on the test machines, so the Dockerfile is checked
by reading it: every path it copies exists, it runs as a non-root user,
exposes 8080 and probes /healthz.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(600)
def test_build_makes_an_sdist_and_a_wheel_with_the_compiled_core(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path), str(REPO)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (sdist,) = tmp_path.glob("fastws-*.tar.gz")
    (wheel,) = tmp_path.glob("fastws-*.whl")
    assert "-none-any" not in wheel.name, "the wheel must be platform-specific"
    names = zipfile.ZipFile(wheel).namelist()
    assert any(re.fullmatch(r"fastws/_core/fanout\..*\.so", n) for n in names), names
    for needed in (
        "fastws/_core/fanout.pxd",
        "fastws/_core/fanout.pyi",
        "fastws/py.typed",
        "fastws/static/fastws.js",  # the browser client, served at GET /fastws.js
    ):
        assert needed in names
    with tarfile.open(sdist) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
    for needed in (
        "setup.py",
        "pyproject.toml",
        "fastws/_core/fanout.pyx",
        "fastws/static/fastws.js",
        "README.md",
    ):
        assert needed in members


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def test_dockerfile_copies_only_what_the_repository_has() -> None:
    copies = [args for op, args in dockerfile_instructions() if op == "COPY"]
    assert copies
    for args in copies:
        if args.startswith("--from="):
            continue
        *sources, _destination = args.split()
        for source in sources:
            assert (REPO / source).exists(), f"Dockerfile copies missing {source}"


def test_dockerfile_is_multi_stage_non_root_and_probes_healthz() -> None:
    instructions = dockerfile_instructions()
    ops = [op for op, _ in instructions]
    assert ops.count("FROM") >= 2
    users = [args for op, args in instructions if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert ("EXPOSE", "8080") in instructions
    (healthcheck,) = [args for op, args in instructions if op == "HEALTHCHECK"]
    assert "/healthz" in healthcheck
    (entrypoint,) = [args for op, args in instructions if op == "ENTRYPOINT"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert '"fastws"' in entrypoint and "fastws" in scripts
