"""Re-time the final models a finished suite run kept, and rewrite its report::

    python -m bench.suite.retime bench/results/suite

The command-line entry of :func:`bench.suite.latency.main`, in a module the package does not
import (``python -m bench.suite.latency`` would run a module already imported by the package).
"""

from __future__ import annotations

from .latency import main

if __name__ == "__main__":
    main()
