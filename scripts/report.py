"""Turn a sweep dir into report.md, figures, CSV tables and TensorBoard runs of seed aggregates.

Everything goes into the sweep dir itself (or --out): report.md, *.png, runs.csv, curves.csv,
and aggregates/<config>/, one TensorBoard run per config with its mean and spread over seeds.

    python scripts/report.py outputs/multirun/convergence/<stamp>
    python scripts/report.py outputs/multirun/convergence/<stamp> --target 0.97
    python scripts/report.py outputs/multirun/convergence/final --out docs/results --prefix convergence_t95_
    python scripts/report.py outputs/multirun/depth/final --target 0.9   # a study: tables per depth, no pooling

A sweep where model.widths, train.batch_size or norm.position varies is reported as that study
(conf/experiment/depth|batch_size|placement); runs with probes (probe.every > 0, e.g.
experiment=santurkar) add the landscape and internal-covariate-shift section and figures.

Tiny CPU recipe: run a smoke sweep first (see README), then point this at its sweep dir.
"""
import argparse
import sys

from bnexp.report.aggregate import aggregates_dir
from bnexp.report.write import write_report
from bnexp.report.runs import ReportError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", metavar="SWEEP_DIR", help="a sweep dir holding one run dir per (norm, lr, seed)")
    parser.add_argument("--target", type=float, default=0.95,
                        help="validation accuracy that steps, speed-ups and each norm's best lr are measured at "
                             "(default 0.95); test accuracy is reported, never chosen on")
    parser.add_argument("--out", metavar="DIR", help="write report.md and figures here instead of the sweep dir")
    parser.add_argument("--prefix", default="", help="start every written file name with this (e.g. convergence_)")
    args = parser.parse_args(argv)
    try:
        report, figures = write_report(args.sweep_dir, target=args.target, out_dir=args.out, prefix=args.prefix)
    except ReportError as err:
        print(f"report.py: error: {err}", file=sys.stderr)
        return 2
    print(f"report:  {report}")
    for fig in figures:
        print(f"figure:  {fig}")
    out, prefix = report.parent, args.prefix
    print(f"tables:  {out / f'{prefix}runs.csv'}, {out / f'{prefix}curves.csv'}")
    print(f"tensorboard: {aggregates_dir(out, prefix)} (seeds aggregated; tensorboard --logdir {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
