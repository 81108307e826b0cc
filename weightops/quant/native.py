"""The quantizer's passes over the weights as fused native loops (native.c), where a C
compiler is at hand; the torch code of each pass stays the fallback and the reference.

A pass in torch is a few operations per row block, each of which reads and writes the
whole block (weightops.quant.blocks); in C it is one loop that reads each group once and
keeps its sums in registers. A whole quantization of SmolLM2-135M at the default setting
takes 0.9 s with them and 1.7 s without at one thread, 0.8 s and 1.3 s at two (fresh
processes, WEIGHTOPS_NATIVE=0 against the default; docs/quant.md).

The library is compiled on first use with the system's C compiler (`CC`, else `cc`) into
the user's cache (`$XDG_CACHE_HOME/weightops/native`, else ~/.cache/weightops/native),
under a name that hashes the source, the flags, the compiler's version and the CPU, so
a changed source or another machine sharing the folder compiles its own; the file is
written beside and renamed into place, so concurrent first runs do not see half of it.
Without a compiler, or with `WEIGHTOPS_NATIVE=0`, every pass runs in torch. The two
differ only in the order of each group's sums (float rounding), not in the codes they
round each weight to for the same grid.

A pass is split over torch.get_num_threads() threads by groups (inside `torch_aside`,
over the threads torch had before it); ctypes releases the interpreter lock for the
call, so the threads run at once.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import functools
import hashlib
import itertools
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("native.c")
# -ffp-contract=off: no fused multiply-adds, so each weight's arithmetic is torch's and
# the same on every CPU; -march=native is safe because the CPU is in the file's name.
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared", "-std=c11")

# wo_search_2bit has room for this many keys (both sides).
MAX_KEYS = 64
# and this many clip factors (one vector's lanes, native.c's LANES).
MAX_FACTORS = 8
# The group sizes the kernels take: whole vectors (native.c's LANES), up to the buffer of
# codes in wo_round_pack.
GROUP_SIZES = range(8, 1025, 8)

_I64, _F32 = ctypes.c_int64, ctypes.c_float
_P = ctypes.c_void_p
SIGNATURES = {
    "wo_stack_bf16": (_P, _P, _P, _P, _I64, _I64, _I64),
    "wo_extremes": (_P, _P, _P, _I64, _I64, _I64),
    "wo_search_2bit": (_P, _P, _P, _P, _P, _P, _I64, _F32, _F32, _I64, _I64)
    + (_P,) * 7
    + (_I64, _I64, _I64),
    "wo_refine_step": (_P, _P, _P, _P, _P, _P, _F32, _P, _I64, _I64, _I64),
    "wo_round_pack": (_P,) * 8 + (_I64,) * 5,
}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "weightops" / "native"


def _cpu() -> str:
    """The CPU's model and feature flags (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features"))]
    return platform.machine() + "\n".join(sorted(set(keep)))


def _compile(compiler: list[str]) -> Path:
    version = subprocess.run(
        [*compiler, "--version"], capture_output=True, text=True, check=True
    ).stdout
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), " ".join(FLAGS), version, _cpu()]).encode()
    ).hexdigest()[:16]
    target = cache_dir() / f"quant-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".quant-", suffix=".so")
    os.close(fd)
    try:
        subprocess.run(
            [*compiler, *FLAGS, "-o", tmp, str(SOURCE), "-lm"],
            capture_output=True,
            text=True,
            check=True,
        )
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def _load(compiler: list[str]) -> ctypes.CDLL:
    """The library, built if needed; a cached file that does not load (damaged after it
    was written) is built again once."""
    path = _compile(compiler)
    try:
        return ctypes.CDLL(str(path))
    except OSError:
        path.unlink(missing_ok=True)
        return ctypes.CDLL(str(_compile(compiler)))


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be had (no compiler, a failed
    build, WEIGHTOPS_NATIVE=0): the callers then run their torch code. A build that
    fails where a compiler is found says so once, as a warning."""
    if os.environ.get("WEIGHTOPS_NATIVE", "1").strip() == "0":
        return None
    compiler = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or "gcc"]
    if not shutil.which(compiler[0]):
        return None
    try:
        lib = _load(compiler)
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        warnings.warn(
            f"weightops: the quantizer's native kernels did not build ({detail.strip()[:300]}); "
            "quantizing with torch alone, about twice as slow",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    for name, args in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, None
    return lib


def ready(groups: torch.Tensor, dtype: torch.dtype = torch.float32) -> bool:
    """Whether the kernels are at hand and take `groups` [..., group size]: contiguous,
    of `dtype`, on the CPU, groups of a size in GROUP_SIZES."""
    return (
        groups.dtype == dtype
        and groups.device.type == "cpu"
        and groups.dim() > 0
        and groups.shape[-1] in GROUP_SIZES
        and groups.is_contiguous()
        and library() is not None
    )


@functools.cache
def _pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="weightops-native")


_local = threading.local()


@contextlib.contextmanager
def torch_aside() -> Iterator[None]:
    """Torch on one thread for the block, the kernels on as many as torch had. Each of
    torch's OpenMP threads spins for a while after an operation it shared, waiting for
    the next; around the kernels that took a core from them: on SmolLM2-135M at two
    threads the search took 0.25 s with torch's threads spinning beside it and 0.16 s
    without. The small per-group operations between the kernels gain little from a
    second thread anyway."""
    threads = torch.get_num_threads()
    _local.threads = threads
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _local.threads = None


def run(name: str, groups: int, *args: torch.Tensor | float | int) -> None:
    """Call kernel `name` over `groups` groups (or rows, for a kernel that takes rows),
    split into one contiguous range per torch thread. Tensors must be contiguous; they
    are passed by address."""
    fn = getattr(library(), name)
    if not all(a.is_contiguous() for a in args if isinstance(a, torch.Tensor)):
        raise ValueError(f"{name}: the native kernels take contiguous tensors only")
    ptrs = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
    threads = getattr(_local, "threads", None) or torch.get_num_threads()
    # Fewer than 256 groups a thread (16 K weights at 64) is less work than handing it over.
    threads = min(threads, max(1, groups // 256))
    bounds = [groups * i // threads for i in range(threads + 1)]
    ranges = list(itertools.pairwise(bounds))
    jobs = [_pool(threads).submit(fn, *ptrs, g0, g1) for g0, g1 in ranges[1:]]
    # The calling thread takes the first range itself.
    fn(*ptrs, *ranges[0])
    for job in jobs:
        job.result()
