"""Profiling overhead benchmark: `make bench`.

Reports the cost of profiling as RATIOS against a plain forward pass measured in the same run, on the same
model, windows and batch size, through the same `forward` call that profiling uses. Absolute seconds depend
on the machine (core count, BLAS, other load) and are printed only for context; a ratio measured in one run
cancels most of that, so it is what the goals are about:

  full profile (all taps but attention scores/probs) time / plain time   goal <= 1.30
  MA profile (resid.pre/mid/post, mlp.hidden, mlp.out; no moments, as the MA experiments) / plain  <= 1.10
  CO profile (per-channel moments at every norm input/standardized/output tap) time / plain  goal <= 1.15
  fake-quant W8A8 perplexity time (weight quantization included) / plain perplexity time    goal <= 1.50
  peak RSS of a full-profile process / peak RSS of a plain-forward process goal <= 1.10
  perplexity tokens/s (no intervention) / plain logits-forward tokens/s   goal >= 0.95
  Table 2 wall time (`run` of experiment=table2) / (1 model load + 5 evaluations) goal <= 1.10
  local multirun of 6 interventions (Hydra's basic launcher, one process) / (1 load + 6 evaluations)  <= 1.10
  peak RSS of a layerwise process / of an in-memory process, above their pre-load baseline   goal <= 0.35

Two floors say what this machine can do at the full profile's taps, through the profile's own hooks: hooks
whose sink does nothing (the cost of the hooks alone), and hooks that read each tensor once with
`torch.aminmax` (no temporary: the cheapest statistic there is). They have no goal; the rows "full profile /
read-once floor" and "MA profile / read-once floor" say how far the statistics are from that floor.

Times are medians over `--repeats` alternating repetitions (plain, full, MA, ..., a cached model load, the
Table 2 job, plain, ...) to damp noise on small machines (the min/min ratio and the load average are printed
too). Each Table 2 job starts as a fresh job of a sweep would: no model kept from the one before, the
converted model and the tokenized corpus read from their caches (`paths.model_cache`, `paths.token_cache`),
which `make bench` fills before timing. The 6-job multirun and its 6 direct evaluations alternate 3 times
(median), each multirun a fresh sweep whose first job loads the model. Peak RSS comes from fresh child
processes of this script (`--mode plain|full`, 3 of each, alternating), each loading the same model: the
peak after the load (VmHWM reset right after it; the load's own peak would otherwise dominate both) or,
where Linux cannot reset it, the peak over the whole life. The row is the ratio of the median peaks; its
context lists each full child and the ratio of the largest full peak to the median plain one, since under
glibc's malloc about one full-profile process in four keeps 120-360 MiB of freed heap (which one depends on
the address layout; see docs/development.md). Missing a goal is reported, not an error (exit 0).

Layerwise (`execution=layerwise`, one decoder layer resident at a time) is measured by two more children:
`--mode memory` (the in-memory model) and `--mode layerwise` run all windows through `forward_windows`
`--repeats` times after a warm-up pass, and report their median pass time and peak RSS over the whole
process life (load included: what decides whether a model fits). Python with torch and transformers
already holds a few hundred MB that no execution mode can give back, so each child also reports its
baseline: VmRSS after the imports, the tokenizer and the windows, just before the model loads. The goal
row compares the peaks above that baseline (what the model and its run add); the whole-process ratio is
printed too, without a goal, and so is the time ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from outlier_study.config.vocab import ReducerKind

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw"
MA_TAPS = ["resid.pre", "resid.mid", "resid.post", "mlp.hidden", "mlp.out"]
CO_TAPS = ["resid.pre", "attn.norm_std", "attn.norm", "resid.mid", "mlp.norm_std", "mlp.norm"]
GOALS = {
    "full_time": 1.30,
    "ma_time": 1.10,
    "co_time": 1.15,
    "quant_time": 1.50,
    "full_peak_rss": 1.10,
    "ppl_tps": 0.95,
    "table2_time": 1.10,
    "multirun_time": 1.10,
    "hooks_floor": None,  # floors: what the machine can do, not goals
    "read_once_floor": None,
    "full_to_floor": None,
    "ma_to_floor": None,
    "layerwise_peak_rss": 0.35,  # above each process's pre-load baseline
    "layerwise_peak_rss_total": None,  # whole process: the interpreter's own few hundred MB included
    "layerwise_time": None,  # reported: reading every layer once per pass has a cost
}
HIGHER_IS_BETTER = {"ppl_tps"}
EXECUTIONS = ("memory", "layerwise")  # the children of the layerwise rows, one per `execution` value


def compose(args: argparse.Namespace, *extra: str) -> tuple[Any, str]:
    """The real Hydra config for the model and windows; WikiText-2 when present, else the embedded corpus."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from outlier_study.config import CONF_DIR
    from outlier_study.config.schema import register_configs

    if WIKITEXT.is_file():
        data, note = ["dataset=wikitext2", f"dataset.path={WIKITEXT}"], f"wikitext2 ({WIKITEXT})"
    else:
        data, note = ["dataset=embedded"], f"embedded (fallback: {WIKITEXT} not found)"
    overrides = [
        f"model={args.model}",
        *data,
        f"dataset.seq_len={args.seq_len}",
        f"dataset.n_windows={args.windows}",
        f"dataset.batch_size={args.batch_size}",
        "progress=false",
        *extra,
    ]
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides), note


def setup(args: argparse.Namespace, *extra: str) -> tuple[Any, torch.Tensor, list[int], str]:
    from outlier_study.data import build_windows

    cfg, note = compose(args, *extra)
    lm = load(cfg)
    windows = build_windows(cfg.dataset, lm.tokenizer, None, cfg.paths.token_cache)  # fills the token cache
    return lm, windows.input_ids, list(range(lm.n_layers)), note


def load(cfg: Any, tokenizer: Any = None) -> Any:
    from outlier_study.models.loader import load_model

    return load_model(cfg.model, cfg.dtype, cfg.device, cfg.paths.model_cache, tokenizer, cfg.execution)


def table2_seconds(args: argparse.Namespace, out_dir: Path) -> float:
    """Wall time of the whole Table 2 job as a user runs it (model load, windows, 5 evaluations, files),
    as a fresh job of a sweep: no model kept from an earlier job, the converted model and the tokenized
    corpus read from their caches."""
    from outlier_study.app import run
    from outlier_study.models.reuse import MODELS

    cfg, _ = compose(args, "experiment=table2")
    shutil.rmtree(out_dir / "table2_job", ignore_errors=True)  # a finished job would be skipped (resume)
    MODELS.clear()
    t = time.perf_counter()
    run(cfg, job_dir=out_dir / "table2_job")
    return time.perf_counter() - t


RSS_CHILDREN = 3  # fresh plain / full child pairs: the row is the median peak of each mode
MULTIRUN_REPEATS = 3  # alternations of (6 direct evaluations, the 6-job multirun): a minute each
# The 6 jobs of the multirun measure: MAs at y6 / y7 / x9 replaced by the mean or zero.
MULTIRUN = [
    "experiment=perplexity",
    "intervention=massive",
    "intervention.tap=y6,y7,x9",
    "intervention.value=mean,zero",
]


def multirun_seconds(args: argparse.Namespace, out_dir: Path) -> float:
    """Wall time of a 6-job sweep as a user runs it: CLI entry, Hydra's basic launcher, this process."""
    from outlier_study import cli
    from outlier_study.models.reuse import MODELS

    root = out_dir / "multirun_root"
    shutil.rmtree(root, ignore_errors=True)  # a rerun would otherwise skip the finished jobs
    MODELS.clear()  # a fresh sweep: its first job loads the model, the other five reuse it
    data = [f"dataset.path={WIKITEXT}", "dataset=wikitext2"] if WIKITEXT.is_file() else ["dataset=embedded"]
    argv = ["outlier-study", "-m", *MULTIRUN, f"model={args.model}", *data, f"dataset.seq_len={args.seq_len}"]
    argv += [f"dataset.n_windows={args.windows}", f"dataset.batch_size={args.batch_size}", "progress=false"]
    argv += [f"paths.output_root={root}", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    saved, sys.argv = sys.argv, argv
    t = time.perf_counter()
    try:
        cli.main()
    finally:
        sys.argv = saved
    return time.perf_counter() - t


def intervention_evaluations(lm: Any, ids: torch.Tensor, batch_size: int) -> float:
    """The same 6 evaluations done directly: the denominator's work, without Hydra, files or reloads."""
    from outlier_study.interventions.massive import replace_massive
    from outlier_study.measure.perplexity import evaluate_perplexity

    t = time.perf_counter()
    for tap in ("mlp.hidden", "mlp.out", "attn.out"):
        for value in ("mean", "zero"):
            with replace_massive(lm, tap, None, value, 100.0, 1000.0):
                evaluate_perplexity(lm, ids, batch_size=batch_size, progress=False)
    return time.perf_counter() - t


def runners(
    lm: Any, ids: torch.Tensor, layers: list[int], batch_size: int, reducer: str = "auto"
) -> dict[str, Callable[[], None]]:
    """plain: all windows through `forward`; full / ma: `profile_windows` on those taps, result included;
    hooks / read_once: the full profile's taps with a sink that does nothing / reads each tensor once."""
    from outlier_study.measure.forward import forward, logits_forward
    from outlier_study.measure.hooks import tap_hooks
    from outlier_study.measure.perplexity import evaluate_perplexity
    from outlier_study.measure.profiler import profile_channels, profile_windows
    from outlier_study.quant.fake import QuantSpec, fake_quant

    def quant_ppl() -> None:
        with fake_quant(lm, QuantSpec(w_bits=8, a_bits=8, name="w8a8")):  # weight quantization timed too
            evaluate_perplexity(lm, ids, batch_size=batch_size, progress=False)

    def plain() -> None:
        for batch in ids.split(batch_size):
            forward(lm, batch)

    def logits() -> None:
        for batch in ids.split(batch_size):
            logits_forward(lm, batch)

    def profile(taps: list[str], moments: bool = True) -> Callable[[], None]:
        return lambda: (
            profile_windows(
                lm, ids, taps, layers, batch_size=batch_size, progress=False, moments=moments, reducer=reducer
            )
            and None
        )

    def floor(read: bool) -> Callable[[], None]:
        """`plain` under the profile's own hooks at the full taps, whose sink reads each tensor once with
        `torch.aminmax` (`read`) or does nothing: what any statistic at those taps costs at least."""

        def sink(_layer: int, _tap: str, x: torch.Tensor, _valid: torch.Tensor | None) -> None:
            if read:
                torch.aminmax(x)

        def run() -> None:
            with tap_hooks(lm.model, lm.adapter, full_taps, layers, sink):
                plain()

        return run

    full_taps = lm.arch.taps(None)
    return {
        "plain": plain,
        "hooks": floor(read=False),
        "read_once": floor(read=True),
        "full": profile(full_taps),
        "ma": profile(lm.arch.taps(MA_TAPS), moments=False),
        "co": lambda: (
            profile_channels(lm, ids, lm.arch.taps(CO_TAPS), layers, batch_size=batch_size, progress=False)
            and None
        ),
        "logits": logits,
        "ppl": lambda: evaluate_perplexity(lm, ids, batch_size=batch_size, progress=False) and None,
        "quant": quant_ppl,
    }


def peak_rss_kib() -> int:
    """This process's peak RSS in KiB: VmHWM where Linux has it, else `ru_maxrss`. Not `ru_maxrss` first:
    Linux carries it over from the parent through fork and exec, so a child of this (large) process would
    report the parent's peak."""
    return hwm_kib() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_hwm() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM, Linux >= 4.0), so a later peak excludes the load."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def status_kib(field: str) -> int | None:
    """A /proc/self/status field in KiB (VmHWM: the RSS high-water mark, VmRSS: the RSS now)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    line = next((ln for ln in status.splitlines() if ln.startswith(f"{field}:")), None)
    return int(line.split()[1]) if line else None


def hwm_kib() -> int | None:
    return status_kib("VmHWM")


def allocator() -> str:
    """The malloc this process runs on: a preloaded jemalloc or tcmalloc where one is mapped, else glibc."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    found = re.search(r"lib(jemalloc|tcmalloc)[^/\s]*$", maps, re.MULTILINE)
    return found.group(1) if found else "glibc"


def child(args: argparse.Namespace) -> None:
    """One fresh process: load, one plain warm-up pass, one `args.mode` pass; print its peak RSS as JSON.

    Loading transiently needs more memory than a forward, so the peak over the whole life tends to
    be the load's peak in both modes; the peak after loading comes from VmHWM reset right after the load."""
    if args.mode in EXECUTIONS:
        return execution_child(args)
    lm, ids, layers, _ = setup(args)
    after_load = peak_rss_kib()
    has_hwm = reset_hwm()
    run = runners(lm, ids, layers, args.batch_size, args.reducer)
    run["plain"]()
    run[args.mode]()
    peak_after_load = hwm_kib() if has_hwm else None
    out = {"mode": args.mode, "peak_kib": max(after_load, peak_rss_kib()), "load_peak_kib": after_load}
    print(json.dumps(out | {"peak_after_load_kib": peak_after_load, "allocator": allocator()}))


def execution_child(args: argparse.Namespace) -> None:
    """`--mode layerwise` and its reference `--mode memory` (the `execution` value): the pre-load baseline
    (VmRSS after the imports, the tokenizer and the windows), then the load, a warm-up pass and
    `--repeats` timed passes of all windows through `forward_windows`; the peak RSS over the whole life."""
    from outlier_study.data import build_windows
    from outlier_study.measure.forward import forward_windows
    from outlier_study.models.loader import load_tokenizer

    cfg, _ = compose(args, f"execution={args.mode}")
    tokenizer = load_tokenizer(cfg.model, cfg.paths.model_cache)
    ids = build_windows(cfg.dataset, tokenizer).input_ids
    baseline = status_kib("VmRSS")
    lm = load(cfg, tokenizer)
    forward_windows(lm, ids, args.batch_size, False, "warm-up")
    seconds = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        forward_windows(lm, ids, args.batch_size, False, cfg.execution)
        seconds.append(time.perf_counter() - t)
    out = {"mode": str(cfg.execution), "baseline_kib": baseline, "peak_kib": peak_rss_kib()}
    out |= {"run_s": statistics.median(seconds), "run_min_s": min(seconds), "times_s": seconds}
    print(json.dumps(out | {"layers_read": 0 if lm.store is None else lm.store.reads}))


def measure_rss(args: argparse.Namespace, mode: str) -> dict[str, int]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--mode", mode, "--model", args.model]
    cmd += ["--windows", str(args.windows), "--seq-len", str(args.seq_len)]
    cmd += ["--batch-size", str(args.batch_size), "--reducer", args.reducer]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"child --mode {mode} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def meets(key: str, ratio: float) -> bool | None:
    """Whether a ratio meets its goal; None for a floor, which has none."""
    goal = GOALS[key]
    if goal is None:
        return None
    return ratio >= goal if key in HIGHER_IS_BETTER else ratio <= goal


Spec = list[tuple[str, str, float, float, str]]  # (measure, key, numerator, denominator, context)


def as_rows(spec: Spec) -> list[dict[str, Any]]:
    return [
        {
            "measure": measure,
            "key": key,
            "ratio": num / den,
            "goal": GOALS[key],
            "pass": meets(key, num / den),
            "context": fmt.format(num, den),
        }
        for measure, key, num, den, fmt in spec
    ]


def layerwise_spec(args: argparse.Namespace) -> tuple[dict[str, Any], Spec]:
    """The `--mode memory` and `--mode layerwise` children, and their rows."""
    lw = {mode: measure_rss(args, mode) for mode in EXECUTIONS}
    above = {m: (r["peak_kib"] - r["baseline_kib"]) / 1024 for m, r in lw.items()}
    total = {m: r["peak_kib"] / 1024 for m, r in lw.items()}
    base = {m: r["baseline_kib"] / 1024 for m, r in lw.items()}
    spec = [
        (
            "layerwise peak RSS / memory (above base)",
            "layerwise_peak_rss",
            above["layerwise"],
            above["memory"],
            "{:.0f} vs {:.0f} MiB" + f" above baselines of {base['layerwise']:.0f}, {base['memory']:.0f} MiB",
        ),
        (
            "layerwise peak RSS / memory (process)",
            "layerwise_peak_rss_total",
            total["layerwise"],
            total["memory"],
            "{:.0f} vs {:.0f} MiB",
        ),
        (
            "layerwise time / in-memory time",
            "layerwise_time",
            lw["layerwise"]["run_s"],
            lw["memory"]["run_s"],
            "{:.2f}s vs {:.2f}s (medians; min/min "
            + f"{lw['layerwise']['run_min_s'] / lw['memory']['run_min_s']:.2f})",
        ),
    ]
    return lw, spec


def bench_layerwise(args: argparse.Namespace) -> dict[str, Any]:
    """`--layerwise-only`: the layerwise rows alone (two child processes, no timing loop in this one)."""
    before = os.getloadavg()[0]
    lw, spec = layerwise_spec(args)
    return {
        "model": args.model,
        "dataset": compose(args)[1],
        "windows": args.windows,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_avg_1m": [before, os.getloadavg()[0]],
        "rows": as_rows(spec),
        "layerwise_kib": lw,
    }


def bench(args: argparse.Namespace) -> dict[str, Any]:
    load_avg = [os.getloadavg()[0]]
    t0 = time.perf_counter()
    lm, ids, layers, note = setup(args)  # also fills the converted-model cache before the children load it
    load_s = time.perf_counter() - t0
    run = runners(lm, ids, layers, args.batch_size, args.reducer)
    run["plain"]()  # warm-up
    names = [*run, "table2", "cached_load", "evals6", "multirun"]
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.repeats):
        for name, fn in run.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
        t = time.perf_counter()
        load(compose(args)[0])  # a cached load, as every job after the first GGUF conversion has
        times["cached_load"].append(time.perf_counter() - t)
        times["table2"].append(table2_seconds(args, args.out.parent))
    for _ in range(min(args.repeats, MULTIRUN_REPEATS)):  # each takes as long as 6 evaluations
        times["evals6"].append(intervention_evaluations(lm, ids, args.batch_size))
        times["multirun"].append(multirun_seconds(args, args.out.parent))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    cached_load_s, table2_s = med["cached_load"], med["table2"]
    evals6_s, multirun_s = med["evals6"], med["multirun"]
    load_avg.append(os.getloadavg()[0])
    rss: dict[str, list[dict[str, Any]]] = {"plain": [], "full": []}
    for _ in range(RSS_CHILDREN):  # alternating: one child's peak is one draw of the allocator's layout
        for mode, children in rss.items():
            children.append(measure_rss(args, mode))
    lw, lw_spec = layerwise_spec(args)

    after_load = all(r["peak_after_load_kib"] for runs in rss.values() for r in runs)
    rss_key = "peak_after_load_kib" if after_load else "peak_kib"
    peaks = {m: [r[rss_key] / 1024 for r in runs] for m, runs in rss.items()}
    mib = {m: statistics.median(p) for m, p in peaks.items()}
    life = {m: statistics.median(r["peak_kib"] / 1024 for r in runs) for m, runs in rss.items()}
    spec = [  # (measure, key, numerator, denominator, context)
        ("full profile time / plain", "full_time", med["full"], med["plain"], "{:.3f}s vs {:.3f}s"),
        ("MA profile time / plain", "ma_time", med["ma"], med["plain"], "{:.3f}s vs {:.3f}s"),
        ("CO profile time / plain", "co_time", med["co"], med["plain"], "{:.3f}s vs {:.3f}s"),
        ("fake-quant W8A8 perplexity / plain", "quant_time", med["quant"], med["ppl"], "{:.3f}s vs {:.3f}s"),
        (
            f"full peak RSS / plain ({'after load' if after_load else 'whole life'})",
            "full_peak_rss",
            mib["full"],
            mib["plain"],
            "{:.0f} vs {:.0f} MiB",
        ),
        (
            "perplexity tokens/s / plain logits tokens/s",
            "ppl_tps",
            med["logits"],
            med["ppl"],
            "{:.3f}s vs {:.3f}s",
        ),
        (
            "Table 2 time / (1 load + 5 evaluations)",
            "table2_time",
            table2_s,
            cached_load_s + 5 * med["ppl"],
            "{:.1f}s vs {:.1f}s",
        ),
        (
            "local multirun of 6 interventions / (1 load + 6 evaluations)",
            "multirun_time",
            multirun_s,
            cached_load_s + evals6_s,
            "{:.1f}s vs {:.1f}s",
        ),
        (
            "floor: empty hooks at the full taps / plain",
            "hooks_floor",
            med["hooks"],
            med["plain"],
            "{:.3f}s vs {:.3f}s",
        ),
        (
            "floor: read-once hooks (aminmax) / plain",
            "read_once_floor",
            med["read_once"],
            med["plain"],
            "{:.3f}s vs {:.3f}s",
        ),
        (
            "full profile / read-once floor",
            "full_to_floor",
            med["full"],
            med["read_once"],
            "{:.3f}s vs {:.3f}s",
        ),
        ("MA profile / read-once floor", "ma_to_floor", med["ma"], med["read_once"], "{:.3f}s vs {:.3f}s"),
        *lw_spec,
    ]
    rows = as_rows(spec)
    by_key = {r["key"]: r for r in rows}
    least = {name: min(ts) for name, ts in times.items()}  # min/min is robust to other load
    min_ratios = {
        "full_time": least["full"] / least["plain"],
        "ma_time": least["ma"] / least["plain"],
        "co_time": least["co"] / least["plain"],
        "table2_time": least["table2"] / (least["cached_load"] + 5 * least["ppl"]),
        "multirun_time": least["multirun"] / (least["cached_load"] + least["evals6"]),
    }
    for key, ratio in min_ratios.items():
        by_key[key]["ratio_min"] = ratio
        by_key[key]["context"] += f" (min/min {ratio:.2f})"
    rss_row = by_key["full_peak_rss"]
    rss_row["ratio_max"] = max(peaks["full"]) / mib["plain"]
    each = ", ".join(f"{p:.0f}" for p in peaks["full"])
    rss_row["context"] += f" (full children {each}; largest / plain {rss_row['ratio_max']:.2f})"
    if after_load:
        rss_row["context"] += f" (peak incl. load: {life['full']:.0f} vs {life['plain']:.0f} MiB)"
    return {
        "model": args.model,
        "dataset": note,
        "windows": int(ids.shape[0]),
        "seq_len": int(ids.shape[1]),
        "batch_size": args.batch_size,
        "reducer": args.reducer,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_avg_1m": load_avg,  # before loading, after timing: above the CPU count, times are unreliable
        "load_s": load_s,
        "cached_load_s": cached_load_s,
        "table2_s": table2_s,
        "rows": rows,
        "times_s": times,
        "median_s": med,
        "rss_kib": rss,
        "allocator": rss["full"][0].get("allocator", "unknown"),
        "layerwise_kib": lw,
    }


def show(result: dict[str, Any]) -> None:
    print(
        f"model {result['model']}, {result['windows']} x {result['seq_len']} tokens, "
        f"batch {result['batch_size']}, median of {result['repeats']}, {result['torch_threads']} threads, "
        f"reducer {result['reducer']}, malloc {result.get('allocator', 'unknown')}"
    )
    print(f"data  {result['dataset']}")
    before, after = result["load_avg_1m"]
    busy = "  (busy machine: ratios are noisy)" if max(before, after) > (result["cpus"] or 1) else ""
    print(f"load  1-min load average {before:.1f} before, {after:.1f} after, {result['cpus']} CPUs{busy}")
    print(f"{'measure':<40} {'ratio':>6} {'goal':>6}  {'':<4}  absolute")
    for r in result["rows"]:
        verdict = {True: "pass", False: "MISS", None: ""}[r["pass"]]
        goal = "" if r["goal"] is None else f"{r['goal']:.2f}"
        print(f"{r['measure']:<40} {r['ratio']:>6.3f} {goal:>6}  {verdict:<4}  {r['context']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--reducer", choices=[k.value for k in ReducerKind], default="auto", help="config reducer")
    p.add_argument("--repeats", type=int, default=5, help="alternating timed repetitions (median)")
    p.add_argument("--out", type=Path, default=REPO / "outputs/bench/bench.json")
    modes = ["bench", "plain", "full", *EXECUTIONS]
    p.add_argument("--mode", choices=modes, default="bench", help=argparse.SUPPRESS)
    p.add_argument("--layerwise-only", action="store_true", help="only the layerwise rows (two children)")
    args = p.parse_args()
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.mode != "bench":
        child(args)
        return
    result = bench_layerwise(args) if args.layerwise_only else bench(args)
    show(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
