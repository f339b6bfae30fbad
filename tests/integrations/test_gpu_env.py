"""The GPU environment (``make setup-gpu``, ``requirements/gpu.txt``) resolves, checked without a GPU.

``pip install -e ".[vllm]"`` cannot resolve against the main lock (``requirements/lock.txt`` has
transformers 5.24; vLLM 0.31, the newest TRL 1.16 accepts, needs transformers <5.18 and torch 2.13), so
GPU users get a lock of their own: ``requirements/gpu.txt``, every package of the project's
``[math,data,trl,lora,vllm,dev]`` install pinned for CPython 3.11 and 3.12 on Linux x86_64.

* the fast test checks the lock's promises offline: the stack's pins, the main lock's torch (the CPU
  tests run on the torch the GPU users get), and the project's own version ranges;
* the slow tests (``make test-slow``, ``make check-gpu-lock``; need PyPI) run pip's real resolver on
  the lock, for a Linux x86_64 CUDA host, in ``--dry-run --report`` mode: it must resolve, to exactly
  the lock's versions, while reading package metadata only (PEP 658 metadata files where the index
  serves them, else HTTP range requests into the wheels: pip's ``fast-deps``), never a CUDA wheel.

``python tests/integrations/test_gpu_env.py --write`` regenerates the lock from :data:`STACK` (same
resolver call, without ``-c``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
GPU_LOCK = REPO / "requirements" / "gpu.txt"
EXTRAS = "math,data,trl,lora,vllm,dev"
STACK = {
    "torch": "2.13.0",  # what vllm 0.31.0 pins; the CPU tests' torch (Makefile TORCH_SPEC)
    "vllm": "0.31.0",  # the newest vLLM TRL 1.16 accepts (trl[vllm]: vllm>=0.22.0,<=0.31.0)
    "transformers": "5.17.0",  # the newest vllm 0.31.0 accepts (>=5.10.4,<5.18.0)
    "trl": "1.16.0",
    "peft": "0.21.2",
}
"""The GPU stack: versions that accept each other (from their PyPI metadata)."""
EXTRA_PINS = ["setuptools>=77.0.3,<81"]  # torch needs >=77.0.3; vllm on Python 3.12 needs <81
PYTHONS = ("3.11", "3.12")
# Wheels of the lock need glibc >= 2.31 (llguidance); list manylinux tags up to 2.35 (Ubuntu 22.04).
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(17, 36)] + ["manylinux2014_x86_64"]
MAX_FILE_BYTES = 20 << 20  # no single package file this large is fetched: metadata only
_RESPONSE = re.compile(r'"GET (\S+) HTTP/[\d.]+" (\d{3}) (\d+)')


def read_lock(path: Path = GPU_LOCK) -> dict[str, str]:
    """``{canonical name: version}`` of a ``name==version`` file (comments ignored)."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def resolve(python: str, *requirements: str, constraints: Path | None = None) -> dict:
    """pip's resolver, dry run, for CPython ``python`` on Linux x86_64: its report plus measurements.

    The machine's pip configuration is ignored (``PIP_CONFIG_FILE=/dev/null``, ``--isolated``): a local
    wheel directory or constraint must not stand in for PyPI's CUDA builds.
    """
    command = [sys.executable, "-m", "pip", "--isolated", "--disable-pip-version-check", "install"]
    fast_deps = [*command, "--use-feature=fast-deps"]
    if subprocess.run([*fast_deps, "--help"], capture_output=True).returncode == 0:  # this pip has it
        command = fast_deps  # metadata by HTTP range requests where the index serves no PEP 658 files
    report_file = tempfile.NamedTemporaryFile(suffix=".json", delete=False)
    report_file.close()
    command += [
        "--dry-run",
        "--ignore-installed",
        "--only-binary",
        ":all:",
        "--report",
        report_file.name,
        "-vv",
    ]
    command += [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    command += ["--python-version", python, "--implementation", "cp", "--abi", f"cp{python.replace('.', '')}"]
    if constraints is not None:
        command += ["-c", str(constraints)]
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull}
    start = time.monotonic()
    out = subprocess.run(
        [*command, *requirements], capture_output=True, text=True, env=env, cwd=REPO, timeout=900
    )
    seconds = time.monotonic() - start
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads(Path(report_file.name).read_text())
    os.unlink(report_file.name)
    log = out.stdout + out.stderr  # pip logs its debug lines to stdout, warnings to stderr
    responses = [(path, int(size)) for path, status, size in _RESPONSE.findall(log) if status[0] == "2"]
    files = [(path, size) for path, size in responses if not path.startswith("/simple/")]
    return {
        "report": report,
        "seconds": seconds,
        "index_bytes": sum(size for path, size in responses if path.startswith("/simple/")),
        "file_bytes": sum(size for _, size in files),
        "largest_file": max(files, key=lambda item: item[1], default=("", 0)),
    }


def installed(report: dict) -> dict[str, str]:
    return {
        canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
        for item in report["install"]
        if canonicalize_name(item["metadata"]["name"]) != "flowrl"
    }


def test_the_gpu_lock_pins_the_stack_and_the_projects_ranges_accept_it() -> None:
    pins = read_lock()
    assert {name: pins.get(name) for name in STACK} == STACK
    torch_spec = re.search(r"^TORCH_SPEC \?= torch==(\S+)$", (REPO / "Makefile").read_text(), re.M)
    assert torch_spec and torch_spec.group(1) == STACK["torch"], "the CPU tests run on the GPU lock's torch"
    pyproject = (REPO / "pyproject.toml").read_text()
    for quoted in re.findall(r'"((?:torch|vllm|transformers|trl|peft)\b[^"]*)"', pyproject):
        requirement = Requirement(quoted)
        assert requirement.specifier.contains(pins[canonicalize_name(requirement.name)]), quoted
    for name in ("numpy", "accelerate", "datasets", "math-verify", "pytest", "nvidia-nccl-cu13"):
        assert name in pins, f"{name}: the lock pins the whole install, CUDA libraries included"


@pytest.mark.slow
@pytest.mark.parametrize("python", PYTHONS)
def test_the_gpu_lock_resolves_from_metadata_alone(python: str) -> None:
    """pip resolves the project's GPU install under the lock, to exactly the lock's versions (nothing
    missing, nothing extra), fetching no CUDA wheel: no package file over MAX_FILE_BYTES."""
    result = resolve(python, f".[{EXTRAS}]", constraints=GPU_LOCK)
    got, pins = installed(result["report"]), read_lock()
    assert got == pins, {
        k: (got.get(k), pins.get(k)) for k in set(got) | set(pins) if got.get(k) != pins.get(k)
    }
    path, size = result["largest_file"]
    assert size < MAX_FILE_BYTES, f"downloaded {path} ({size / 1e6:.0f} MB) to read its metadata"
    print(
        f"\nPython {python}: resolved {len(got)} packages in {result['seconds']:.0f} s; fetched "
        f"{result['index_bytes'] / 1e6:.0f} MB of index pages and {result['file_bytes'] / 1e6:.1f} MB of "
        f"package files (largest {size / 1e6:.2f} MB)"
    )


def write_lock() -> None:
    """Resolve :data:`STACK` with the project's extras for Python 3.11 and write ``requirements/gpu.txt``."""
    stack = [f"{name}=={version}" for name, version in STACK.items()]
    result = resolve(PYTHONS[0], *stack, *EXTRA_PINS, f".[{EXTRAS}]")
    pins = installed(result["report"])
    header = (
        "# The GPU environment (make setup-gpu): CUDA torch, vLLM, transformers, TRL and peft versions that\n"
        '# accept each other, and every other package of `pip install -e ".[math,data,trl,lora,vllm,dev]"`,\n'
        "# pinned for CPython 3.11 and 3.12 on Linux x86_64 (glibc >= 2.31). The main lock (lock.txt)\n"
        "# cannot be used with vLLM: it has transformers 5.24, and vllm 0.31.0 needs <5.18.\n"
        "#   " + " ".join(stack) + "\n"
        "# Checked by tests/integrations/test_gpu_env.py (pip's resolver, dry run, metadata only; make\n"
        "# check-gpu-lock). Regenerate: .venv/bin/python tests/integrations/test_gpu_env.py --write\n"
    )
    GPU_LOCK.write_text(header + "".join(f"{name}=={pins[name]}\n" for name in sorted(pins)))
    print(f"wrote {GPU_LOCK} ({len(pins)} packages) in {result['seconds']:.0f} s")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/integrations/test_gpu_env.py --write")
    write_lock()
