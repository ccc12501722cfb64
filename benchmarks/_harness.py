"""Shared helpers for the side-by-side benchmarks.

Every benchmark runs leanclip and its peers in one process and reports ratios (ours / peer):
this machine is shared and noisy, so absolute times wander while ratios in one run hold.
"""

from __future__ import annotations

import datetime as _dt
import gc
import os
import platform
import resource
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

from training import report

# one home (training/report.py), shared with training's reports; re-exported for the benchmarks
cpu_model, markdown_table = report.cpu_model, report.markdown_table

RESULTS = Path(__file__).resolve().parent / "results"

# usearch 2.26 loaded before onnxruntime makes onnxruntime's import segfault (libstdc++ symbol
# clash); benchmarks that use both must load onnxruntime first.
try:
    import onnxruntime  # noqa: F401
except ImportError:
    pass


def _cpuinfo() -> Dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    out: Dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            out[key.strip()] = value.strip()
    except OSError:
        pass
    return out


def cpu_flags() -> str:
    flags = set(_cpuinfo().get("flags", "").split())
    wanted = [
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512_vnni",
        "avx_vnni",
        "avx512_bf16",
        "avx512_fp16",
        "amx_int8",
        "amx_bf16",
    ]
    return ",".join(f for f in wanted if f in flags)


# (vendor, family) -> [(first model, last model, name)]: the families the result tables are
# kept per (results/cpu/<family>/); anything else is named by its vendor, family and model.
_FAMILIES = {
    ("AuthenticAMD", 23): [(0x00, 0x2F, "amd-zen1"), (0x30, 0xFF, "amd-zen2")],
    ("AuthenticAMD", 25): [
        (0x00, 0x0F, "amd-zen3"),
        (0x10, 0x1F, "amd-zen4"),
        (0x20, 0x5F, "amd-zen3"),
        (0x60, 0xAF, "amd-zen4"),
    ],
    ("AuthenticAMD", 26): [(0x00, 0xFF, "amd-zen5")],
    ("GenuineIntel", 6): [
        (0x55, 0x55, "intel-skylake-sp"),
        (0x6A, 0x6C, "intel-icelake-sp"),
        (0x8F, 0x8F, "intel-sapphire-rapids"),
        (0xCF, 0xCF, "intel-emerald-rapids"),
        (0xAD, 0xAE, "intel-granite-rapids"),
        (0x97, 0x9A, "intel-alder-lake"),
        (0xB7, 0xBF, "intel-raptor-lake"),
    ],
}


def cpu_family() -> str:
    """A short name for this CPU's microarchitecture family, e.g. "amd-zen4"."""
    info = _cpuinfo()
    vendor = info.get("vendor_id", "")
    try:
        family, model = int(info.get("cpu family", "")), int(info.get("model", ""))
    except ValueError:
        return platform.machine().lower() or "unknown"
    for lo, hi, name in _FAMILIES.get((vendor, family), []):
        if lo <= model <= hi:
            return name
    short = {"AuthenticAMD": "amd", "GenuineIntel": "intel"}.get(vendor, vendor.lower() or "cpu")
    return f"{short}-f{family}-m{model}"


def cpu_description() -> str:
    """Model, family and the SIMD flags that matter here, for every result table."""
    info = _cpuinfo()
    ident = f"family {info.get('cpu family', '?')} model {info.get('model', '?')}"
    return f"{cpu_model()} [{cpu_family()}: {ident}; {os.cpu_count()} cores; {cpu_flags()}]"


def versions(packages: Iterable[str]) -> str:
    out = []
    for name in packages:
        try:
            out.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(f"{name} (not installed)")
    return ", ".join(out)


def blas_info() -> str:
    try:
        from threadpoolctl import threadpool_info

        infos = [i for i in threadpool_info() if i.get("user_api") == "blas"]
        return "; ".join(
            f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture')}, {i.get('num_threads')} threads)"
            for i in infos
        )
    except Exception:  # threadpoolctl is optional
        return "unknown"


def timeit(fn: Callable[[], object], repeat: int = 5, warmup: int = 1, min_time: float = 0.0) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    started = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - started < min_time:
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def header(title: str, packages: Iterable[str] = (), note: Optional[str] = None) -> str:
    lines = [
        f"# {title}",
        "",
        f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {cpu_description()}, {platform.system()} {platform.release()}",
        f"- load average at the start (1/5/15 min): {' / '.join(f'{x:.1f}' for x in os.getloadavg())}",
        f"- python {platform.python_version()}; {versions(['leanclip', 'numpy', *packages])}",
        f"- BLAS: {blas_info()}",
        f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
    ]
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def write_result(name: str, text: str) -> Path:
    """Write ``benchmarks/results/cpu/<family>/<name>.md`` (tables are kept per CPU family)
    and ``benchmarks/results/<name>.md`` (the latest run, whatever its CPU), and echo it."""
    text = text if text.endswith("\n") else text + "\n"
    family_dir = RESULTS / "cpu" / cpu_family()
    family_dir.mkdir(parents=True, exist_ok=True)
    (family_dir / f"{name}.md").write_text(text, encoding="utf-8")
    path = RESULTS / f"{name}.md"
    path.write_text(text, encoding="utf-8")
    print(text)
    print(f"[written to {path} and {family_dir / (name + '.md')}]")
    return path
