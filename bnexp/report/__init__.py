"""Reports: sweep dirs read back, statistics with intervals, studies, figures, exports, aggregates.

    runs.py       a sweep's run dirs read back (summary.json and curves) as `Run` records
    stats.py      steps to a target per (norm, lr), speed-ups, custom vs native agreement
    studies.py    the why studies: a value that varies (depth, batch size, placement), probes
    figures.py    the PNGs
    write.py      report.md assembled, its conclusions; `write_report`, what scripts/report.py calls
    tables.py     report.md's tables: the numbers as text, one function per section
    export.py     runs.csv and curves.csv
    aggregate.py  seed-aggregate TensorBoard runs
"""

from bnexp.report.write import write_report  # noqa: F401
