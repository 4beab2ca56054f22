"""Shared helpers for the benchmark scripts: machine/library info, timing, memory sampling, JSON+MD output.

Every script writes ``benchmarks/results/<name>.json`` (full record) and ``benchmarks/results/<name>.md``
(a short human-readable table). All models in these benchmarks use random weights.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
DATA_ROOT = Path(os.environ.get("CLIPLAB_DATA", "/work/shared/datasets"))
IMAGENETTE_VAL = DATA_ROOT / "imagenette_sample" / "val"
MiB = 1024 * 1024


# -- machine and library description ----------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict:
    """CPU count, affinity, platform, Python, torch thread count, memory."""
    import torch

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        affinity = None
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "cpu_model": _cpu_model(),
        "mem_total_gib": _mem_total_gib(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "cuda_available": torch.cuda.is_available(),
        "device": "cpu",
    }


def library_versions() -> dict:
    import numpy
    import open_clip
    import PIL
    import torch

    try:
        from importlib.metadata import version

        cliplab_version = version("cliplab")
    except Exception:  # pragma: no cover
        cliplab_version = None
    return {
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
        "cliplab": cliplab_version,
    }


def git_revision() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(BENCH_DIR), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(BENCH_DIR), "status", "--porcelain", "--", "../src"],
                               capture_output=True, text=True, timeout=10)
        rev = out.stdout.strip() or None
        return f"{rev}-dirty-src" if rev and dirty.stdout.strip() else rev
    except Exception:  # pragma: no cover
        return None


def benchmark_model(spec: str):
    """(backbone, weights note): ``recipe:NAME`` is a cliplab recipe model (trained on first use), else load_model."""
    from cliplab.models import load_model

    if spec.startswith("recipe:"):
        from cliplab.train.recipes import recipe_model

        name = spec.split(":", 1)[1]
        folder = recipe_model(name, DATA_ROOT)
        card = json.loads((folder / "model_card.json").read_text())
        held = card["held_out"].get("zeroshot_top1")
        note = (f"trained here by the cliplab recipe {name} ({card['data']['pairs']} {card['data']['source']} "
                f"train images with template captions, val zero-shot {100 * held:.1f}%): weights that carry "
                "signal, but a small model that has seen these classes, not a general CLIP")
        return load_model(str(folder)), note
    backbone = load_model(spec, device="cpu")
    return backbone, ("random weights: the numbers say nothing about which method helps"
                      if backbone.info.random_weights else "trained weights")


def built_model(spec: str, *, held_label: str, after: str, random_note: str):
    """(backbone, weights note) for a model that must exist already: ``recipe:NAME`` is loaded only if built (never
    trained here; the note gives its held-out zero-shot as ``held_label`` and ends with ``after``), else load_model."""
    from cliplab.models import load_model

    if spec.startswith("recipe:"):
        from cliplab.train.recipes import recipe_model

        name = spec.split(":", 1)[1]
        folder = recipe_model(name, DATA_ROOT, build=False)
        card = json.loads((folder / "model_card.json").read_text())
        held = card.get("held_out", {}).get("zeroshot_top1")
        note = (f"trained here by the cliplab recipe {name} (CIFAR-10 train images with template captions"
                + (f", {held_label} {100 * held:.1f}%" if held is not None else "") + ")" + after)
        backbone = load_model(str(folder))
        backbone.display_name = spec
        return backbone, note
    backbone = load_model(spec, device="cpu")
    return backbone, random_note if backbone.info.random_weights else "trained weights"


def model_info(backbone) -> dict:
    info = backbone.info
    return {
        "model_id": backbone.model_id,
        "name": info.name,
        "random_weights": bool(info.random_weights),
        "embed_dim": backbone.embed_dim,
    }


# -- timing ---------------------------------------------------------------------------------------------------
class Timer:
    """``with Timer() as t: ...`` then ``t.seconds`` (perf_counter)."""

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        return False


def median(values):
    values = sorted(values)
    n = len(values)
    if n == 0:
        return float("nan")
    mid = n // 2
    return values[mid] if n % 2 else (values[mid - 1] + values[mid]) / 2


class CpuAccount:
    """CPU seconds used by this process (+ reaped children) and by everything else on the machine.

    ``with CpuAccount() as cpu: ...`` then ``cpu.result``: wall seconds, own CPU seconds (self + reaped
    children, e.g. DataLoader workers after they exit), machine busy CPU seconds from /proc/stat and
    ``foreign_cpu_s`` = machine busy - own: work by other processes competing for the cores (noise);
    ``foreign_load`` = that per wall second (0.5 = half a core taken by others); ``steal_cpu_s`` = hypervisor steal.
    """

    @staticmethod
    def _machine_s() -> tuple[float, float]:
        """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
        try:
            with open("/proc/stat") as handle:
                f = [int(v) for v in handle.readline().split()[1:]] + [0] * 8
        except OSError:
            return float("nan"), float("nan")
        hz = os.sysconf("SC_CLK_TCK")
        busy = f[0] + f[1] + f[2] + f[5] + f[6]  # user nice system irq softirq (guest is inside user)
        return busy / hz, f[7] / hz

    @staticmethod
    def _own_s() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def __enter__(self):
        self._wall, self._own, (self._busy, self._steal) = time.perf_counter(), self._own_s(), self._machine_s()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self._wall
        own = self._own_s() - self._own
        busy, steal = self._machine_s()
        busy, steal = busy - self._busy, steal - self._steal
        self.result = {
            "wall_s": wall,
            "own_cpu_s": own,
            "machine_busy_cpu_s": busy,
            "foreign_cpu_s": max(0.0, busy - own),
            "foreign_load": max(0.0, busy - own) / wall if wall > 0 else float("nan"),
            "steal_cpu_s": steal,
        }
        return False


def load_average() -> list[float] | None:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


# -- memory ---------------------------------------------------------------------------------------------------
def _status_kib(pid: int | str, field: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (0 when the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _rollup_kib(pid: int | str) -> dict[str, int]:
    """Pss and USS (Private_Clean + Private_Dirty) of a process from /proc/<pid>/smaps_rollup, kB."""
    out = {"pss": 0, "uss": 0}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    out["pss"] = int(line.split()[1])
                elif line.startswith(("Private_Clean:", "Private_Dirty:")):
                    out["uss"] += int(line.split()[1])
    except (OSError, ValueError):
        pass
    return out


def child_pids(parent: int) -> list[int]:
    """Direct children of ``parent`` (scans /proc; /proc/<pid>/task/*/children is not always available)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: the ppid is the 2nd field after the last ')'
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and int(fields[1]) == parent:
            found.append(int(entry))
    return found


def vm_hwm_bytes() -> int:
    """Peak resident set of this process (VmHWM), bytes."""
    return _status_kib("self", "VmHWM") * 1024


def rss_bytes() -> int:
    return _status_kib("self", "VmRSS") * 1024


class MemorySampler(threading.Thread):
    """Polls the memory of this process and its children (DataLoader workers) every ``interval`` seconds.

    Peaks recorded (bytes): ``main_rss``; ``children_rss`` (sum of the workers' RSS: counts pages they
    share with the main process after fork again, an upper bound); ``main_rss_plus_children_uss`` (main RSS +
    the workers' private pages: every page once, attributed to the main process where shared; the
    headline figure); ``total_pss`` (main + workers PSS; also splits library pages with *unrelated*
    processes on the machine, so it moves when they start or stop); ``max_children``.
    """

    def __init__(self, interval: float = 0.05, with_smaps: bool = True):
        super().__init__(daemon=True)
        self.interval = interval
        self.with_smaps = with_smaps
        self.pid = os.getpid()
        self._stop_event = threading.Event()
        self.peak = {"main_rss": 0, "children_rss": 0, "main_rss_plus_children_uss": 0, "total_pss": 0,
                     "children_uss": 0, "max_children": 0}
        self.samples = 0

    def sample(self) -> None:
        main = _status_kib(self.pid, "VmRSS") * 1024
        kids = child_pids(self.pid)
        kids_rss = sum(_status_kib(k, "VmRSS") for k in kids) * 1024
        peak = self.peak
        peak["main_rss"] = max(peak["main_rss"], main)
        peak["children_rss"] = max(peak["children_rss"], kids_rss)
        peak["max_children"] = max(peak["max_children"], len(kids))
        if self.with_smaps:
            rollups = [_rollup_kib(k) for k in kids]
            kids_uss = sum(r["uss"] for r in rollups) * 1024
            pss = (_rollup_kib(self.pid)["pss"] + sum(r["pss"] for r in rollups)) * 1024
            peak["children_uss"] = max(peak["children_uss"], kids_uss)
            peak["main_rss_plus_children_uss"] = max(peak["main_rss_plus_children_uss"], main + kids_uss)
            peak["total_pss"] = max(peak["total_pss"], pss)
        self.samples += 1

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def stop(self) -> dict:
        self._stop_event.set()
        self.join()
        self.sample()
        return dict(self.peak, samples=self.samples, interval_s=self.interval)


def memory_status() -> dict:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, bytes."""
    return {k: _status_kib("self", k) * 1024 for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}


# -- output ---------------------------------------------------------------------------------------------------
def header(name: str, description: str, quick: bool) -> dict:
    return {
        "benchmark": name,
        "description": description,
        "mode": "quick" if quick else "full",
        "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "libraries": library_versions(),
        "git": git_revision(),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
    }


def md_table(columns: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.1f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def environment_md(record: dict) -> str:
    m, lib = record["machine"], record["libraries"]
    return "\n".join([
        "## Environment",
        "",
        f"- machine: {m['cpu_count']} CPUs ({m['cpu_affinity']} usable), {m['cpu_model']}, "
        f"{m['mem_total_gib']} GiB RAM, {m['platform']}, device {m['device']}",
        f"- torch threads: {m['torch_num_threads']} (intra-op, torch default), "
        f"{m['torch_num_interop_threads']} inter-op",
        f"- Python {m['python']}; torch {lib['torch']}, open_clip {lib['open_clip']}, numpy {lib['numpy']}, "
        f"pillow {lib['pillow']}, cliplab {lib['cliplab']} (git {record.get('git')})",
        f"- mode: {record['mode']}; started {record['started']}; command `{record['command']}`",
        "",
    ])


def write_results(name: str, record: dict, markdown_body: str) -> tuple[Path, Path]:
    """Write ``results/<name>.json`` and ``results/<name>.md`` (the markdown gets an environment section)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    record = dict(record, finished=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
    json_path = RESULTS_DIR / f"{name}.json"
    md_path = RESULTS_DIR / f"{name}.md"
    json_path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    md_path.write_text(markdown_body.rstrip() + "\n\n" + environment_md(record))
    print(f"wrote {json_path}\nwrote {md_path}")
    return json_path, md_path


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def library_default_workers(backbone) -> int:
    """What ``embed_images(num_workers=None)`` resolves to for ``backbone`` (works with either signature)."""
    from cliplab.features.embed import default_workers

    try:
        return default_workers(backbone.device)
    except TypeError:  # older signature without a device argument
        return default_workers()
