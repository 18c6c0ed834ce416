"""Command line: ``gatedprune demo`` and ``gatedprune bench``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from .demo import DemoConfig

__all__ = ["find_bench_root", "main"]


def find_bench_root(candidates: Sequence[Path] | None = None) -> Path:
    """The repository folder holding the benchmark suite (``bench/suite``), which is not part
    of the installed package: by default the checkout this source file lives in, then the
    current directory. Raises ``FileNotFoundError`` with what to do when there is none.

    >>> (find_bench_root() / "bench" / "suite").is_dir()  # doctest: +SKIP
    True
    """
    if candidates is None:
        candidates = [Path(__file__).resolve().parents[2], Path.cwd()]
    for root in candidates:
        if (root / "bench" / "suite" / "runner.py").is_file():
            return root
    looked = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        "gatedprune bench runs the benchmark suite in the repository's bench/ folder, which "
        f"is not installed with the package (looked in: {looked}). Run it from a checkout: "
        "git clone the repository, pip install -e '.[bench]', then gatedprune bench (or "
        "python -m bench) inside it."
    )


def _bench(args: argparse.Namespace) -> int:
    try:
        root = find_bench_root()
    except FileNotFoundError as e:
        print(f"gatedprune bench: {e}", file=sys.stderr)
        return 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from bench.suite.runner import main as bench_main  # the same entry as python -m bench

    argv = ["--quick"] if args.quick else []
    if args.jobs is not None:
        argv += ["--jobs", str(args.jobs)]
    if args.out is not None:
        argv += ["--out", str(args.out)]
    bench_main(argv, prog="gatedprune bench")
    return 0


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def _int_at_least(text: str, minimum: int) -> int:
    """``text`` as an int >= ``minimum`` (an ``ArgumentTypeError`` naming both otherwise).

    >>> _int_at_least("-1", 1)
    Traceback (most recent call last):
    argparse.ArgumentTypeError: expected an integer >= 1, got '-1'
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer >= {minimum}, got {text!r}"
        ) from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
    return value


def _non_negative(text: str) -> int:
    return _int_at_least(text, 0)


def _seed(text: str) -> int:
    from .train import MAX_SEED

    value = _non_negative(text)
    if value >= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2**63), got {text!r}")
    if value == MAX_SEED - 1:  # the demos fine-tune with seed + 1, itself a Trainer seed
        raise argparse.ArgumentTypeError(
            f"expected a seed in [0, 2**63) below 2**63 - 1 (the fine-tuning uses seed + 1), "
            f"got {text!r}"
        )
    return value


def _out_dir(text: str) -> Path:
    """An output folder that can be created: checked before any training starts."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a directory path, got {text!r}")
    from .io import folder_problem

    path = Path(text)
    why = folder_problem(path)
    if why is not None:
        raise argparse.ArgumentTypeError(why)
    return path


def _positive(text: str) -> int:
    return _int_at_least(text, 1)


def _conv_demo(config: DemoConfig) -> dict[str, Any]:
    from .demo import run_demo

    return run_demo(config)


def _resnet1d_demo(config: DemoConfig) -> dict[str, Any]:
    from .demo_resnet import run_resnet_demo

    return run_resnet_demo(config)


def _lstm_demo(config: DemoConfig) -> dict[str, Any]:
    from .demo_lstm import run_lstm_demo

    return run_lstm_demo(config)


# --model: the demo's function, its default output directory, budget and epochs
DEMOS: dict[str, tuple[Callable[[DemoConfig], dict[str, Any]], Path, float, int]] = {
    "conv": (_conv_demo, Path("gatedprune-demo"), 0.1, 30),
    "resnet1d": (_resnet1d_demo, Path("gatedprune-demo-resnet1d"), 0.1, 30),
    "lstm": (_lstm_demo, Path("gatedprune-demo-lstm"), 0.25, 60),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gatedprune", description="Networks that prune themselves through learned gates."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="train a gated shortcut CNN (or a gated ResNet) on MNIST-1D under a FLOPs budget, "
        "prune it, report",
    )
    demo.add_argument(
        "--model",
        choices=list(DEMOS),
        default="conv",
        help="conv: a ShortcutConv1d grown and pruned; resnet1d: an ordinary 1D ResNet gated "
        "with gate_ (channels, residual blocks, dense shortcuts); lstm: a ShortcutLSTM on "
        "MNIST-1D as a sequence, pruned to plain nn.LSTM layers (conv)",
    )
    demo.add_argument(
        "--budget",
        type=_fraction,
        default=None,
        help="FLOPs fraction (0.1); with --model lstm a parameter fraction (0.25)",
    )
    demo.add_argument(
        "--epochs", type=_positive, default=None, help="training epochs (30; lstm: 60)"
    )
    demo.add_argument(
        "--finetune-epochs", type=_non_negative, default=5, help="fine-tuning epochs (5)"
    )
    demo.add_argument("--seed", type=_seed, default=0, help="random seed (0)")
    demo.add_argument(
        "--round-to",
        type=_positive,
        default=None,
        help="round every kept width to a multiple of this at the snap, e.g. 8 or 16 (the "
        "channel blocks of the CPU kernels); off by default",
    )
    demo.add_argument(
        "--latency",
        action="store_true",
        help="conv and resnet1d demos: --budget is a fraction of the all-open network's "
        "latency on one thread (conv: at batch 256, predicted by a gatedprune.LatencyModel; "
        "resnet1d: at batch 1, by a gatedprune.GatedLatencyModel), calibrated here first",
    )
    demo.add_argument(
        "--unit-group",
        type=_positive,
        default=1,
        help="conv demo: gate channels in groups of this many (1; 32 gates whole 32-channel "
        "layers and halves of 64-channel ones, so the budget removes layers)",
    )
    demo.add_argument(
        "--latency-ratio",
        type=_fraction,
        default=None,
        help="conv demo: add a latency budget of --budget / R (predicted at batch 256 by a "
        "gatedprune.LatencyModel calibrated here first), so the pruned net runs at least R "
        "times as fast as its FLOPs cut; the speed recipe is --unit-group 32 --latency-ratio 0.7",
    )
    demo.add_argument(
        "--out",
        type=_out_dir,
        default=None,
        help="output directory (gatedprune-demo, or gatedprune-demo-<model> with --model)",
    )
    demo.add_argument("--quiet", action="store_true", help="print nothing")
    bench = sub.add_parser(
        "bench",
        help="run the benchmark suite against other pruning tools (python -m bench; needs a "
        "source checkout)",
    )
    bench.add_argument(
        "--quick", action="store_true", help="smoke check: conv workload, 2 budgets, 1 seed"
    )
    bench.add_argument(
        "--jobs", type=_positive, default=None, help="parallel processes (2), one thread each"
    )
    bench.add_argument(
        "--out", type=Path, default=None, help="output folder (bench/results/suite[_quick])"
    )
    return parser


def _subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The parser of subcommand ``name`` (its errors print that subcommand's usage)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return cast(argparse.ArgumentParser, action.choices[name])
    raise LookupError(f"no subcommand {name!r}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gatedprune`` command.

    >>> main(["demo", "--model", "resnet1d", "--budget", "0.25"])  # doctest: +SKIP
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        return _bench(args)
    if args.command == "demo":
        from .demo import DemoConfig
        from .profiling import steady_allocator

        demo_parser = _subcommand(parser, "demo")
        run, default_out, default_budget, default_epochs = DEMOS[args.model]
        if args.latency and args.model == "lstm":
            demo_parser.error(f"--latency applies to --model conv or resnet1d, not {args.model}")
        if args.model != "conv" and (args.unit_group != 1 or args.latency_ratio is not None):
            demo_parser.error(
                f"--unit-group and --latency-ratio apply to --model conv, not {args.model}"
            )
        if args.latency and args.latency_ratio is not None:
            demo_parser.error(
                "--latency-ratio adds a latency budget next to the FLOPs budget; --latency makes "
                "--budget a latency fraction instead: give one of them"
            )
        config = DemoConfig(
            budget=default_budget if args.budget is None else args.budget,
            epochs=default_epochs if args.epochs is None else args.epochs,
            finetune_epochs=args.finetune_epochs,
            seed=args.seed,
            round_to=args.round_to,
            latency=args.latency,
            unit_group=args.unit_group,
            latency_ratio=args.latency_ratio,
            out=default_out if args.out is None else args.out,
            progress=not args.quiet,
        )
        try:  # every option the demo checks, before any work or folder creation
            config.validate()
        except (TypeError, ValueError) as e:
            demo_parser.error(str(e))  # exit 2, one line, as argparse's own errors
        steady_allocator()  # the demo's latency table: steadier timings (see its docstring)
        run(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
