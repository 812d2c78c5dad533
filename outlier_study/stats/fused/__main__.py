"""`python -m outlier_study.stats.fused build`: compile the kernel into its cache folder now (`make install`
runs it, so the first profile does not wait for the compiler); `where` prints that folder."""

from __future__ import annotations

import argparse
import sys

from outlier_study.stats.fused.build import build_dir, load_kernel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m outlier_study.stats.fused", description=__doc__)
    parser.add_argument("command", choices=["build", "where"])
    args = parser.parse_args(argv)
    if args.command == "where":
        print(build_dir())
        return 0
    kernel = load_kernel(verbose=True)
    if kernel is None:
        return 1  # load_kernel printed why
    print(f"fused kernel: {kernel.__file__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
