"""``python -m bench [--quick] [--out DIR]``: run the benchmark suite (see bench.suite)."""

from bench.suite.runner import main

if __name__ == "__main__":
    main()
