"""The benchmark suite of issue 5: gatedprune against the tools people use instead, at equal
achieved FLOPs, in one command (``python -m bench [--quick]``).

Modules: :mod:`.workloads` (tasks and networks), :mod:`.baselines` (the methods),
:mod:`.runner` (configuration, training and latency phases, CLI), :mod:`.report` (tables,
verdicts, Pareto plots).
"""

from .baselines import METHODS, FixedPenalty, MethodResult, RunSpec
from .runner import FULL, QUICK, SuiteConfig, main, run_suite
from .workloads import WORKLOADS, PlainCNN1d, Workload

__all__ = [
    "FULL",
    "METHODS",
    "QUICK",
    "WORKLOADS",
    "FixedPenalty",
    "MethodResult",
    "PlainCNN1d",
    "RunSpec",
    "SuiteConfig",
    "Workload",
    "main",
    "run_suite",
]
