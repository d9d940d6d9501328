"""The ``dda`` command line (DESIGN.md section 6)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> int:
    from tasks.demo import run_demo

    result = run_demo(seed=args.seed)
    if not result.hallucinated:
        print("no held-out output hallucinated: nothing to trace (raise the substitution rate or epochs)")
        return 1
    print(f"\nfirst traced output: {result.hallucinated[0][1]!r}")
    print("top training samples by DDA score:")
    for score, sample in result.top:
        flag = "CORRUPTED" if sample.corrupted else "clean"
        print(f"  {score:+.4f}  {sample.sample_id}  [{flag}]  {sample.response}")
    print(f"\nmean ROC-AUC over {len(result.hallucinated)} traced outputs ({result.n_corrupted} corrupted samples):")
    for method, auc in result.auc.items():
        print(f"  {method:34s} {auc:.3f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``dda`` with one sub-command per action."""
    parser = argparse.ArgumentParser(prog="dda", description="DDA lineage: which training samples caused this output")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the whole pipeline end to end on an embedded canary world")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dda`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, OSError) as exc:
        print(f"dda {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
