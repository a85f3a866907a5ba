"""setup.py's optional extension build and fastdp without its extension.

No compiler runs here: the build's decisions are plain functions of setup.py, the failure path is driven by forcing
torch's BuildExtension to fail, and "no extension" is simulated by blocking the import of fastdp._C in a subprocess.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_py():
    """setup.py as a module (its setup() call only runs as __main__)."""
    spec = importlib.util.spec_from_file_location("fastdp_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_skip_ext_builds_nothing(setup_py, monkeypatch, capsys):
    monkeypatch.setenv("FASTDP_SKIP_EXT", "1")
    assert setup_py.ext_modules() == []
    assert "FASTDP_SKIP_EXT=1" in capsys.readouterr().err


def test_extension_sources(setup_py, monkeypatch):
    monkeypatch.delenv("FASTDP_SKIP_EXT", raising=False)
    (ext,) = setup_py.ext_modules()
    assert ext.name == "fastdp._C"
    assert "csrc/bindings.cpp" in ext.sources
    with_cuda, _ = setup_py.cuda_plan()
    assert any(s.endswith(".cu") for s in ext.sources) == with_cuda


@pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA build of torch can build the CUDA kernels")
def test_force_cuda_needs_a_cuda_torch(setup_py, monkeypatch):
    monkeypatch.setenv("FORCE_CUDA", "1")
    with_cuda, why = setup_py.cuda_plan()
    assert not with_cuda and "not a CUDA build" in why


def failing_build(setup_py, monkeypatch):
    """setup.py's build_ext command, ready to run, whose compile step (torch's BuildExtension) raises."""
    from setuptools import Distribution

    monkeypatch.delenv("FASTDP_SKIP_EXT", raising=False)
    cls = setup_py.build_ext_class()
    dist = Distribution({"name": "fastdp", "ext_modules": setup_py.ext_modules(), "cmdclass": {"build_ext": cls}})
    cmd = cls(dist)
    cmd.ensure_finalized()

    def fail(self):
        raise RuntimeError("forced compiler failure (test)")

    monkeypatch.setattr(cls.__mro__[1], "run", fail)  # torch's BuildExtension
    return cmd


def test_failed_build_leaves_a_pure_python_install(setup_py, monkeypatch, capsys):
    monkeypatch.delenv("FASTDP_REQUIRE_EXT", raising=False)  # .ci/run sets it
    cmd = failing_build(setup_py, monkeypatch)
    cmd.run()  # must not raise
    assert cmd.extensions == [] and cmd.get_outputs() == []
    err = capsys.readouterr().err
    assert "building fastdp._C FAILED" in err and "forced compiler failure" in err
    assert "pip install --no-build-isolation -e ." in err


def test_failed_build_fails_the_install_when_the_extension_is_required(setup_py, monkeypatch, capsys):
    """FASTDP_REQUIRE_EXT=1 (CI): a compile error fails the install with that error, rather than installing without
    the extension and leaving its tests to skip."""
    monkeypatch.setenv("FASTDP_REQUIRE_EXT", "1")
    cmd = failing_build(setup_py, monkeypatch)
    with pytest.raises(RuntimeError, match="forced compiler failure"):
        cmd.run()
    assert "FASTDP_REQUIRE_EXT=1: failing" in capsys.readouterr().err


BLOCK_EXT = """
import importlib.abc, logging, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "fastdp._C":
            raise {error}
        return None

sys.meta_path.insert(0, Block())
logging.basicConfig(level=logging.INFO, format="LOG %(message)s")
"""

CHECK = """
import json, fastdp
from fastdp.backends import resolve_backend
out = {"available": fastdp.available_backends(), "auto": resolve_backend("auto").name}
resolve_backend("auto")  # a second resolution logs nothing more
for name in ("cpp", "cuda"):
    try:
        resolve_backend(name)
        out[name] = None
    except ValueError as e:
        out[name] = str(e)
print("RESULT " + json.dumps(out))
"""


def run_without_extension(error: str) -> tuple[dict, str]:
    code = textwrap.dedent(BLOCK_EXT.format(error=error)) + textwrap.dedent(CHECK)
    env = {**os.environ, "FASTDP_BACKEND": "auto"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :]), proc.stderr


@pytest.mark.parametrize(
    "error, logged",
    [
        ('ModuleNotFoundError("No module named \'fastdp._C\'", name="fastdp._C")', False),  # never built
        ('ImportError("_C.so: undefined symbol: _ZN3c10 (forced)")', True),  # built against another torch
    ],
)
def test_fastdp_imports_and_explains_without_the_extension(error, logged):
    out, stderr = run_without_extension(error)
    assert "cpp" not in out["available"] and "cuda" not in out["available"]
    assert out["auto"] == "torch"
    for name in ("cpp", "cuda"):
        msg = out[name]
        assert f"backend {name!r} was requested but is not available" in msg
        assert "fastdp._C did not load" in msg and "pip install --no-build-isolation -e ." in msg
    assert ("undefined symbol" in out["cpp"]) == logged
    # an auto-selected backend that fails to load falls back with exactly one log line
    assert stderr.count("backend 'auto' falls back") == (1 if logged else 0)


@pytest.mark.parametrize("required", [False, True])
def test_pytest_refuses_to_run_without_the_extension_when_required(required):
    """tests/conftest.py: with FASTDP_REQUIRE_EXT=1 (.ci/run) a fastdp._C that does not load stops pytest before
    collection, with the import error; without the flag the suite collects (and the extension's tests skip)."""
    block = textwrap.dedent(BLOCK_EXT.format(error='ImportError("_C.so: undefined symbol: _ZN3c10 (forced)")'))
    args = ["-q", "--collect-only", "-p", "no:cacheprovider", "tests/test_philox.py"]
    code = block + f"import pytest\nsys.exit(pytest.main({args!r}))\n"
    env = {**os.environ, "FASTDP_REQUIRE_EXT": "1" if required else "0"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    if required:
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "FASTDP_REQUIRE_EXT=1 but fastdp._C did not load (ImportError: _C.so: undefined symbol" in proc.stdout
    else:
        assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------- package metadata
def test_license_and_metadata(setup_py, monkeypatch):
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    got = {}
    monkeypatch.setenv("FASTDP_SKIP_EXT", "1")
    monkeypatch.setattr(setup_py, "setup", lambda **kw: got.update(kw))
    setup_py.main()
    assert got["license"] == "Apache-2.0" and got["license_files"] == ["LICENSE"]
    assert got["author"] and got["description"] and got["classifiers"]


def test_the_test_extra_is_light_and_ci_installs_triton_explicitly(setup_py, monkeypatch):
    got = {}
    monkeypatch.setenv("FASTDP_SKIP_EXT", "1")
    monkeypatch.setattr(setup_py, "setup", lambda **kw: got.update(kw))
    setup_py.main()
    extras = got["extras_require"]
    # pip install ".[test]" must not pull Triton (~1 GB) onto a CPU-only machine; the triton extra has it
    assert not any(req.startswith("triton") for req in extras["test"])
    assert any(req.startswith("triton") for req in extras["triton"])
    assert 'pip install --quiet --no-build-isolation -e ".[test,triton]"' in (ROOT / ".ci" / "run").read_text()
