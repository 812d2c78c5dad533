"""Check a `hydra/launcher=slurm` request against the cluster before a sweep submits anything.

SLURM itself refuses a request no node can hold only when the cluster sets EnforcePartLimits; many don't,
and the job then waits in the queue forever. Asking `sinfo` what the partition's nodes have turns that
into one error naming the launcher key. It runs as a Hydra callback at the start of every multirun
(conf/config.yaml, `hydra.callbacks`) and does nothing for the other launchers.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from outlier_study.errors import ConfigError

FIELD = "hydra.launcher"


@dataclass(frozen=True)
class Node:
    """What one node offers in one partition, as `sinfo` reports it."""

    partition: str
    default: bool
    cpus: int
    mem_mb: int
    gpus: int


def _gpus(gres: str) -> int:
    """GPUs in a gres string such as 'gpu:8', 'gpu:a100:4(S:0-1)' or '(null)'."""
    total = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def cluster_nodes() -> list[Node]:
    """Every (partition, node) of the cluster; a ConfigError when no SLURM controller answers."""
    try:
        out = subprocess.run(
            ["sinfo", "--noheader", "--Node", "--format=%P|%c|%m|%G"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ConfigError(
            "hydra/launcher", f"slurm needs a reachable SLURM cluster (sinfo: {err})", ["local", "basic"]
        ) from None
    if out.returncode != 0:
        reason = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError("hydra/launcher", f"slurm: sinfo failed: {reason}", ["local", "basic"])
    nodes = []
    for line in out.stdout.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 4:
            continue
        name, cpus, mem, gres = fields
        mem_mb = int(re.sub(r"\D.*", "", mem) or 0)
        nodes.append(Node(name.rstrip("*"), name.endswith("*"), int(cpus), mem_mb, _gpus(gres)))
    return nodes


def check_request(params: Mapping[str, Any], nodes: Sequence[Node]) -> None:
    """Refuse a request that no node of the chosen partition can hold, naming the launcher key."""
    partitions = sorted({n.partition for n in nodes})
    partition = params.get("partition")
    if partition is None:
        defaults = [n.partition for n in nodes if n.default]
        if not defaults:
            return  # no default partition: sbatch will say so
        partition = defaults[0]
    elif partition not in partitions:
        raise ConfigError(f"{FIELD}.partition", f"unknown partition '{partition}'", partitions)
    pool = [n for n in nodes if n.partition == partition]
    cpus = (params.get("cpus_per_task") or 1) * (params.get("tasks_per_node") or 1)
    most_cpus = max(n.cpus for n in pool)
    if cpus > most_cpus:
        raise ConfigError(
            f"{FIELD}.cpus_per_task",
            f"{cpus} CPUs per node requested, but the largest node in partition '{partition}' "
            f"has {most_cpus}",
        )
    mem_gb = params.get("mem_gb")
    most_mem = max(n.mem_mb for n in pool)
    if mem_gb is not None and mem_gb * 1024 > most_mem:
        raise ConfigError(
            f"{FIELD}.mem_gb",
            f"{mem_gb} GB requested, but the largest node in partition '{partition}' has "
            f"{most_mem / 1024:.1f} GB",
        )
    gpus = params.get("gpus_per_node") or 0
    most_gpus = max(n.gpus for n in pool)
    if gpus > most_gpus:
        where = f"partition '{partition}'"
        with_gpus = sorted({n.partition for n in nodes if n.gpus >= gpus})
        raise ConfigError(
            f"{FIELD}.gpus_per_node",
            f"{gpus} GPUs per node requested, but {where} has "
            + (f"at most {most_gpus}" if most_gpus else "no GPUs")
            + (f" (partitions with enough: {', '.join(with_gpus)})" if with_gpus else ""),
        )
    if (params.get("nodes") or 1) > len(pool):
        raise ConfigError(
            f"{FIELD}.nodes", f"{params['nodes']} nodes requested, partition '{partition}' has {len(pool)}"
        )


class CheckSlurmRequest(Callback):
    """Hydra callback: before a SLURM sweep submits, refuse a request that no node can hold."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        launcher = config.hydra.launcher
        if not str(launcher.get("_target_", "")).endswith(".SlurmLauncher"):
            return
        keys = ("partition", "cpus_per_task", "tasks_per_node", "mem_gb", "gpus_per_node", "nodes")
        params = {k: OmegaConf.select(launcher, k) for k in keys}
        try:
            check_request(params, cluster_nodes())
        except ConfigError as err:  # Hydra turns a callback's exception into a warning and goes on
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
