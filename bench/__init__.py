"""Benchmarks (not tests): each script warms up, repeats, reports medians and writes CSV +
markdown into bench/results/."""
