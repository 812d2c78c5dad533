"""Console entry `outlier-study-collect SWEEP_DIR`: tables across a sweep's jobs and one HTML report.

Exit codes: 0 every job is ok; 1 some job failed, is still running or is incomplete (the tables and the
report are still written, and list those jobs); 2 bad input (no such folder, no job folders in it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from outlier_study.output.files import write_text
from outlier_study.output.tables import to_markdown, write_table
from outlier_study.sweep.collect import collect, is_pivot
from outlier_study.sweep.report import render

EXIT_OK, EXIT_NOT_ALL_OK, EXIT_BAD_INPUT = 0, 1, 2


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.2f} MB" if n_bytes >= 1e5 else f"{n_bytes / 1e3:.1f} kB"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="outlier-study-collect",
        description="Collect a sweep's job folders (any folder with status.json) into paper-layout tables "
        "(Markdown, CSV, LaTeX) and one self-contained HTML report.",
        epilog="exit codes: 0 all jobs ok; 1 some job failed/running/incomplete (outputs still written); "
        "2 bad input",
    )
    p.add_argument(
        "sweep_dir", metavar="SWEEP_DIR", type=Path, help="a Hydra multirun folder, or one job folder"
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default: SWEEP_DIR/collected)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    sweep: Path = args.sweep_dir
    if not sweep.is_dir():
        print(f"error: SWEEP_DIR: '{sweep}' is not a folder", file=sys.stderr)
        return EXIT_BAD_INPUT
    out: Path = args.out if args.out is not None else sweep / "collected"
    collection = collect(sweep, skip=out)
    if not collection.jobs:
        print(
            f"error: SWEEP_DIR: no job folders (a folder holding status.json) under '{sweep}'",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    try:
        for table in collection.tables:
            write_table(out, table, formats=("md", "csv", "tex"))
        report = out / "report.html"
        write_text(report, render(collection))
    except OSError as err:
        print(f"error: --out: cannot write to '{out}': {err.strerror or err}", file=sys.stderr)
        return EXIT_BAD_INPUT

    for table in collection.tables:
        if is_pivot(table.name):
            print(to_markdown(table))
    for job in collection.jobs:
        if not job.ok:
            print(f"{job.status.upper()}: {job.name}: {job.error.splitlines()[0] if job.error else ''}")
    counts = ", ".join(f"{n} {s}" for s, n in collection.counts().items() if n)
    print(f"collected {len(collection.jobs)} job(s) under {sweep}: {counts}")
    names = ", ".join(t.name for t in collection.tables)
    print(f"tables ({len(collection.tables)}, each .md .csv .tex) in {out}: {names}")
    print(f"report: {report} ({_size(report.stat().st_size)})")
    return EXIT_OK if collection.all_ok else EXIT_NOT_ALL_OK


if __name__ == "__main__":
    sys.exit(main())
