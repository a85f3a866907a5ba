"""Exact per-example clipping: the engine, its plan and the clipping rules.

``GradSampleEngine`` is imported lazily: the rules import this package's building blocks (contributions,
costs) and the engine imports the rules.
"""

__all__ = ["GradSampleEngine"]


def __getattr__(name: str):
    if name == "GradSampleEngine":
        from fastdp.engine.engine import GradSampleEngine

        return GradSampleEngine
    raise AttributeError(name)
