"""Build script for fastdp.

The pure-Python package always installs. The compiled extension ``fastdp._C`` (csrc/) is optional and
is added by the kernels work; ``FASTDP_SKIP_EXT=1`` skips it explicitly. ``kernels/`` is installed as
``fastdp.kernels`` (never as a bare top-level package).
"""

import os

from setuptools import find_packages, setup

packages = find_packages(include=["fastdp", "fastdp.*"]) + ["fastdp.kernels"]

setup(
    name="fastdp",
    version="0.1.0",
    description="Exact, fast differentially private training (DP-SGD) for PyTorch",
    long_description=open(os.path.join(os.path.dirname(__file__), "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"fastdp.kernels": "kernels"},
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
        "triton": ["triton"],
        "test": ["pytest", "pytest-benchmark", "opacus>=1.5", "scikit-learn"],
    },
    entry_points={"console_scripts": ["fastdp-train = fastdp.train:cli"]},
)
