"""Build and load the fused kernel (`fused.cpp`) with torch's cpp_extension.

Why this route: the extension links against the torch of this environment, so `at::parallel_for` runs on
torch's own OpenMP pool (a second pool would fight the model's matmuls for the same cores), and tensors
cross the boundary without copies. It is compiled with -O3 and no -march: on x86-64 the hot loops carry
GCC target clones (AVX-512, AVX2, baseline) chosen when the library loads, so one build serves every node
of a cluster that shares the cache folder.

The build lands in `<cache>/kernels/fused-<key>` (cache: $OUTLIER_STUDY_CACHE, else
~/.cache/outlier-study), the key hashing the source and its path, the flags, the torch and Python versions
and the machine type, so an edited source or another torch never loads a stale library, and a library
found there is imported as it is. `make install` builds it (`python -m outlier_study.stats.fused build`);
otherwise the first profile does (about a minute). If the build or the load fails, `load_kernel` says so
in one warning line on stderr and returns None: the profile then runs the reference reducer.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).with_name("fused.cpp")
NAME = "outlier_study_fused"
CFLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]  # no FP traps: selects vectorize
LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_loaded: dict[str, ModuleType | None] = {}


def build_key() -> str:
    """What the binary depends on: source, flags, torch, Python and the machine type; and where the source
    lies, since torch's build file names it: two checkouts sharing one cache would otherwise rebuild each
    other's kernel on every switch (a minute each time, and two builds could race in one folder)."""
    h = hashlib.sha256(SOURCE.read_bytes())
    where = str(SOURCE.resolve())
    for part in (where, *CFLAGS, *LDFLAGS, torch.__version__, sys.version, platform.machine()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def build_dir() -> Path:
    root = os.environ.get("OUTLIER_STUDY_CACHE") or str(Path.home() / ".cache" / "outlier-study")
    return Path(root) / "kernels" / f"fused-{build_key()}"


def _import_built() -> ModuleType | None:
    """The library already in this key's folder, imported without running the build tool; None if absent
    or unloadable (then it is built again). Going through the build tool on every load would rebuild it
    whenever another `ninja` is first on PATH (an activated virtual environment's versus the system's):
    each rejects the other's build log, and a profile would wait a minute for the compiler."""
    from torch.utils.cpp_extension import LIB_EXT

    path = build_dir() / f"{NAME}{LIB_EXT}"
    spec = importlib.util.spec_from_file_location(NAME, path) if path.is_file() else None
    if spec is None or spec.loader is None:
        return None
    try:
        module = importlib.util.module_from_spec(spec)  # an extension is opened here
        spec.loader.exec_module(module)
    except ImportError:  # e.g. a build cut short: build it again
        return None
    return module


def _compile(verbose: bool) -> ModuleType:
    from torch.utils import cpp_extension

    where = build_dir()
    where.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=NAME,
        sources=[str(SOURCE)],
        extra_cflags=CFLAGS,
        extra_ldflags=LDFLAGS,
        build_directory=str(where),
        verbose=verbose,
    )


def load_kernel(verbose: bool = False) -> ModuleType | None:
    """The compiled kernel (built on first use, then loaded from the cache), or None with one warning
    line when it cannot be built or loaded; the answer is kept for the process."""
    with _lock:
        if "kernel" not in _loaded:
            try:
                _loaded["kernel"] = _import_built() or _compile(verbose)
            except Exception as err:  # a missing compiler, ninja or header: never fatal
                first = (str(err).strip().splitlines() or [type(err).__name__])[-1][:200]
                print(
                    f"warning: the fused reducer could not be built ({type(err).__name__}: {first}); "
                    "using the reference reducer",
                    file=sys.stderr,
                )
                _loaded["kernel"] = None
        return _loaded["kernel"]


def kernel_available() -> bool:
    return load_kernel() is not None
