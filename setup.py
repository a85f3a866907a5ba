"""Build script for fastdp.

The pure-Python package always installs. The compiled extension ``fastdp._C`` (csrc/) is optional:

- its CPU kernels are built whenever torch imports and a C++ compiler works (OpenMP when the compiler has it);
- its CUDA kernels are added when nvcc and a CUDA build of torch (``torch.version.cuda``) are present and a GPU is
  visible, or ``FORCE_CUDA=1`` (build machines without a GPU);
- ``FASTDP_SKIP_EXT=1`` skips the extension; ``TORCH_CUDA_ARCH_LIST`` (CUDA architectures) and ``MAX_JOBS``
  (parallel compile jobs with ninja) are read by torch.utils.cpp_extension.

A failed extension build prints why and leaves a working pure-Python install (fastdp then runs its torch backend and
``backend="cpp"``/``"cuda"`` raise with the kept import error), unless ``FASTDP_REQUIRE_EXT=1`` (CI, .ci/run): then
the install fails with the build's error. ``kernels/`` is installed as ``fastdp.kernels``
(never as a bare top-level package).
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "fastdp._C"
REBUILD_HINT = "pip install --no-build-isolation -e .  (with a C++ compiler; FASTDP_SKIP_EXT unset)"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _note(msg: str) -> None:
    print(f"fastdp setup: {msg}", file=sys.stderr, flush=True)


def cuda_plan() -> tuple[bool, str]:
    """Whether to compile the CUDA kernels, and why (or why not)."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception as e:  # noqa: BLE001 - any import failure means no CUDA build
        return False, f"torch is not importable ({type(e).__name__}: {e})"
    if not torch.version.cuda:
        return False, f"torch {torch.__version__} is not a CUDA build"
    if CUDA_HOME is None:
        return False, "nvcc / CUDA_HOME not found"
    if not (_flag("FORCE_CUDA") or torch.cuda.is_available()):
        return False, "no visible GPU (set FORCE_CUDA=1 to build the CUDA kernels anyway)"
    return True, f"CUDA {torch.version.cuda} at {CUDA_HOME}"


def ext_modules() -> list:
    """The extension modules to build: [] when skipped or when torch is missing, else [fastdp._C]."""
    if _flag("FASTDP_SKIP_EXT"):
        _note("FASTDP_SKIP_EXT=1: not building fastdp._C (pure-Python install)")
        stale = glob.glob(os.path.join(ROOT, "fastdp", "_C.*"))
        if stale:
            _note(f"note: {stale[0]} from an earlier in-place build is still there and will be imported; delete it")
        return []
    try:
        from torch.utils.cpp_extension import CppExtension, CUDAExtension
    except Exception as e:  # noqa: BLE001
        _note(f"torch.utils.cpp_extension is not importable ({type(e).__name__}: {e}): not building fastdp._C")
        return []
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp"), root_dir=ROOT))
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu"), root_dir=ROOT))
    with_cuda, why = cuda_plan()
    cxx = ["-O3", "-fno-math-errno", "-ffp-contract=off"]
    if with_cuda:
        _note(f"building fastdp._C with CPU and CUDA kernels ({why})")
        nvcc = ["-O3", "-DFASTDP_WITH_CUDA", "-lineinfo"]
        return [
            CUDAExtension(
                EXT_NAME,
                cpp + cu,
                extra_compile_args={"cxx": [*cxx, "-DFASTDP_WITH_CUDA"], "nvcc": nvcc},
            )
        ]
    _note(f"building fastdp._C with CPU kernels only (CUDA: {why})")
    return [CppExtension(EXT_NAME, cpp, extra_compile_args={"cxx": cxx})]


def build_ext_class():
    """torch's BuildExtension, made optional: any failure prints why and the install goes on without fastdp._C."""
    try:
        from torch.utils.cpp_extension import BuildExtension
    except Exception:  # noqa: BLE001
        from setuptools.command.build_ext import build_ext as BuildExtension

    class OptionalBuildExt(BuildExtension):
        def build_extensions(self) -> None:
            if self.compiler.compiler_type == "unix":
                openmp = _openmp_flags(self.compiler)
                for ext in self.extensions:
                    args = ext.extra_compile_args
                    (args["cxx"] if isinstance(args, dict) else args).extend(openmp)
                    ext.extra_link_args = [*ext.extra_link_args, *openmp]
            super().build_extensions()

        def run(self) -> None:
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - CompileError, LinkError, CalledProcessError, OSError, ...
                self.fallback(e)

        def fallback(self, err: BaseException) -> None:
            """Give up on the optional extension: say why and install without it (FASTDP_REQUIRE_EXT=1: fail)."""
            if _flag("FASTDP_REQUIRE_EXT"):
                _note(f"building fastdp._C FAILED ({type(err).__name__}: {err}) and FASTDP_REQUIRE_EXT=1: failing")
                raise err
            _note(
                f"building fastdp._C FAILED ({type(err).__name__}: {err}).\n"
                "fastdp installs without it and runs on its torch backend; backend='cpp'/'cuda' will raise. "
                f"To retry after fixing the toolchain: {REBUILD_HINT}"
            )
            # nothing was built: report no outputs so that install / editable_wheel do not look for them
            self.extensions = []
            self.distribution.ext_modules = []

        def get_outputs(self) -> list[str]:
            return super().get_outputs() if self.extensions else []

    return OptionalBuildExt


def _openmp_flags(compiler) -> list[str]:
    """["-fopenmp"] when the compiler accepts it (gcc, most clangs), else [] (the pragmas are then ignored)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            compiler.compile([src], output_dir=tmp, extra_postargs=["-fopenmp"])
            return ["-fopenmp"]
        except Exception:  # noqa: BLE001
            _note("the C++ compiler has no -fopenmp: the CPU kernels of fastdp._C run single-threaded")
            return []


def main() -> None:
    packages = find_packages(include=["fastdp", "fastdp.*"]) + ["fastdp.kernels"]
    modules = ext_modules()
    setup(
        name="fastdp",
        version="0.1.0",
        description="Exact, fast differentially private training (DP-SGD) for PyTorch",
        long_description=open(os.path.join(ROOT, "README.md")).read(),
        long_description_content_type="text/markdown",
        license="Apache-2.0",
        license_files=["LICENSE"],
        author="fastdp maintainers",
        keywords=["differential privacy", "DP-SGD", "pytorch", "deep learning"],
        classifiers=[
            "Development Status :: 3 - Alpha",
            "Intended Audience :: Science/Research",
            "Programming Language :: Python :: 3",
            "Programming Language :: C++",
            "Topic :: Scientific/Engineering :: Artificial Intelligence",
            "Topic :: Security",
        ],
        python_requires=">=3.10",
        packages=packages,
        package_dir={"fastdp.kernels": "kernels"},
        ext_modules=modules,
        cmdclass={"build_ext": build_ext_class()} if modules else {},
        install_requires=[
            "torch>=2.4",
            "numpy",
            "dp-accounting>=0.4",
            "scikit-learn",
            "tqdm",
            "matplotlib",
            "pillow",
        ],  # fmt: skip
        extras_require={
            # the Triton backend (a GPU); also what runs the Triton kernels' tests on a CPU under TRITON_INTERPRET=1,
            # which .ci/run installs: ".[test,triton]" (the kernel tests skip without it). Not in "test": ~1 GB
            "triton": ["triton>=3.0"],
            "test": ["pytest", "pytest-benchmark", "pytest-xdist", "opacus>=1.5", "scikit-learn"],
        },
        entry_points={"console_scripts": ["fastdp-train = fastdp.train:cli"]},
    )


if __name__ == "__main__":
    main()
