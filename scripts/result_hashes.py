"""Refactors keep results: run a fixed set of commands, then print the sha256 of every result file.

Run it before moving code and again after; the two lists must be equal. Hashed: every `metrics.json`
(without the timing fields, which change from run to run), `layer_stats.csv` and `tables/*.csv`.

    python scripts/result_hashes.py run OUT_DIR      # the fixed commands into OUT_DIR, then the hashes
    python scripts/result_hashes.py hash OUT_DIR     # only the hashes of what OUT_DIR holds

The commands use `python -m outlier_study.cli` of this interpreter from the current directory, so the
code under test is the checkout you stand in. SmolLM2 and WikiText-2 commands are skipped (with a line
saying so) where the WikiText-2 file is absent.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

TINY = "tiny-llama,tiny-qwen2,tiny-mistral,tiny-gpt2,tiny-gemma3"
EXPERIMENTS = "profile,table1,table2,table45,fig4,fig5,fig6,perplexity,quant,co,fig7,fig8,fig9,table3,table6"
SMALL = ["dataset.n_windows=2", "dataset.seq_len=64", "progress=false"]
WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
TIMING_KEYS = ("profile_seconds", "tokens_per_second")


def commands(out: Path) -> list[list[str]]:
    """The fixed set: tiny models through every experiment, interventions and methods on two of them,
    and (with WikiText-2) the SmolLM2 profile at 4 × 512 and Table 2 at 10 × 512."""
    root = [f"paths.output_root={out}"]
    cmds = [
        ["-m", f"model={TINY}", f"experiment={EXPERIMENTS}", *SMALL, *root, "paths.sweep=tiny"],
        [
            "-m",
            "model=tiny-llama,tiny-gpt2",
            "experiment=perplexity",
            "intervention=none,massive,residual,gamma,weight_channels",
            *SMALL,
            *root,
            "paths.sweep=interventions",
        ],
        [
            "-m",
            "model=tiny-llama",
            "experiment=quant",
            "quant=w8a8,w4a4",
            "method=none,massive_y6,rotation",
            *SMALL,
            *root,
            "paths.sweep=methods",
        ],
        [
            "-m",
            "model=tiny-llama",
            "experiment=quant",
            "quant=w8a8,w4a4",
            "method=gamma_smooth,smoothquant",
            "++method.calib_windows=4",
            *SMALL,
            *root,
            "paths.sweep=methods",
        ],
    ]
    if WIKITEXT.is_file():
        data = ["dataset=wikitext2", f"dataset.path={WIKITEXT}", "progress=false", *root]
        cmds += [
            [
                "-m",
                "model=smollm2-135m",
                "experiment=profile",
                "dataset.n_windows=4",
                *data,
                "paths.sweep=real",
            ],
            [
                "-m",
                "model=smollm2-135m",
                "experiment=table2",
                "dataset.n_windows=10",
                *data,
                "paths.sweep=real",
            ],
        ]
    else:
        print(f"skipped the SmolLM2 commands: {WIKITEXT} is absent", file=sys.stderr)
    return cmds


def digest(path: Path) -> str:
    if path.name == "metrics.json":
        data = json.loads(path.read_text())
        for key in TIMING_KEYS:
            data.pop(key, None)
        payload = json.dumps(data, sort_keys=True).encode()
    else:
        payload = path.read_bytes()
    return hashlib.sha256(payload).hexdigest()


def result_files(out: Path) -> list[Path]:
    found = [*out.rglob("metrics.json"), *out.rglob("layer_stats.csv"), *out.rglob("tables/*.csv")]
    return sorted(p for p in found if "collected" not in p.parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("action", choices=("run", "hash"))
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    out: Path = args.out.resolve()
    if args.action == "run":
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        for cmd in commands(out):
            print("+ outlier-study " + " ".join(cmd), file=sys.stderr)
            subprocess.run(
                [sys.executable, "-m", "outlier_study.cli", *cmd], check=True, env=env, stdout=sys.stderr
            )
    for path in result_files(out):
        print(f"{digest(path)}  {path.relative_to(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
