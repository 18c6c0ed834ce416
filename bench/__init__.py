"""Benchmarks (not tests): each script warms up, repeats, reports medians and writes CSV +
markdown into bench/results/.

Importing the package (every ``python -m bench.<script>`` does) steadies glibc's ``malloc``
for the whole process (:func:`gatedprune.steady_allocator`): with its default adaptive
thresholds, whether a freed feature map's pages must be faulted in again depends on what ran
before, which moved latency ratios of the same models by up to 0.4 between processes."""

from gatedprune.profiling import steady_allocator

steady_allocator()
