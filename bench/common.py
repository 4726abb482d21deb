"""Shared parts of the benchmark scripts: machine description, timing, tables and the record file.

Each script prints its tables and appends a dated section with the command line and the machine to
``docs/benchmarks.md`` (``--no-record`` skips that). Import this module only after setting
``XLA_FLAGS``, because it imports JAX.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone

import jax
import jax.numpy as jnp
import jaxlib
from jax.extend import core as jax_core

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD_FILE = os.path.join(REPO_ROOT, "docs", "benchmarks.md")
RECORDS_HEADING = "## Records"
TELEMETRY_OFF = {"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
                 "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def turn_off_telemetry() -> None:
    """Set the telemetry opt-outs of Prefect and MLflow unless the caller has set them."""
    for name, value in TELEMETRY_OFF.items():
        os.environ.setdefault(name, value)


def add_record_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-record", action="store_true",
                        help=f"print only; do not append a section to {os.path.relpath(RECORD_FILE, REPO_ROOT)}")
    parser.add_argument("--note", default="", help="free text added to the recorded section, e.g. other load")


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, or platform.processor() elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _process_cpu_seconds() -> dict[int, float]:
    ticks = os.sysconf("SC_CLK_TCK")
    seconds = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as stat:
                # Fields after the parenthesised command name; utime and stime are fields 14 and 15.
                fields = stat.read().rsplit(")", 1)[1].split()
            seconds[int(entry)] = (int(fields[11]) + int(fields[12])) / ticks
        except (OSError, IndexError, ValueError):
            continue
    return seconds


def busy_processes(interval_s: float = 1.0, min_share: float = 0.2) -> str:
    """List other processes that used at least ``min_share`` of a core over ``interval_s`` (Linux only)."""
    if not os.path.isdir("/proc"):
        return "unknown"
    before = _process_cpu_seconds()
    time.sleep(interval_s)
    after = _process_cpu_seconds()
    busy = []
    for pid, seconds in after.items():
        share = (seconds - before.get(pid, seconds)) / interval_s
        if pid == os.getpid() or share < min_share:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                command = " ".join(cmdline.read().replace(b"\0", b" ").decode(errors="replace").split())
        except OSError:
            continue
        busy.append(f"`{command[:70]}` ({100 * share:.0f} % of a core)")
    return "; ".join(busy) or "none"


def _busy_and_own_cpu_seconds() -> tuple[float, float]:
    """Return the CPU seconds the machine spent busy since boot, and those of this process and its children."""
    with open("/proc/stat", encoding="utf-8") as stat:
        values = [int(value) for value in stat.readline().split()[1:]]
    idle = values[3] + values[4]  # idle and iowait
    busy = (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    own = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        own += usage.ru_utime + usage.ru_stime
    return busy, own


class OtherLoad:
    """Average number of cores that other processes kept busy between construction and ``cores()``."""

    def __init__(self):
        self.started = time.perf_counter()
        self.start = _busy_and_own_cpu_seconds() if os.path.exists("/proc/stat") else None

    def cores(self) -> float | None:
        if self.start is None:
            return None
        busy, own = _busy_and_own_cpu_seconds()
        others = (busy - self.start[0]) - (own - self.start[1])
        return max(others, 0.0) / (time.perf_counter() - self.started)


MONITOR = OtherLoad()


def describe_machine(other_load: str | None = None) -> dict[str, str]:
    """Describe the CPU, cores, load, library versions and JAX backend of this process, as text fields.

    ``other_load`` is the result of ``busy_processes()`` taken at the start of the benchmark. The
    cores used by other processes are averaged from this module's import to this call.
    """
    load_1m, load_5m, _ = os.getloadavg()
    devices = jax.devices()
    others = MONITOR.cores()
    return {
        "cpu": cpu_model(),
        "cores": f"{os.cpu_count()} logical, {len(os.sched_getaffinity(0))} usable by this process",
        "other processes using CPU at the start": other_load if other_load is not None else "not checked",
        "cores kept busy by other processes during the run (average)":
            "unknown" if others is None else f"{others:.2f}",
        "load average at the end (1 min, 5 min)": f"{load_1m:.2f}, {load_5m:.2f}",
        "python": platform.python_version(),
        "jax / jaxlib": f"{jax.__version__} / {jaxlib.__version__}",
        "backend": f"{jax.default_backend()}, {len(devices)} x {devices[0].device_kind}",
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") or "(not set)",
    }


def peak_rss_mib() -> float:
    """Return the peak resident memory of this process so far, in MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_calls(function: Callable[[], object], repeats: int) -> list[float]:
    """Return the wall seconds of ``repeats`` calls; ``function`` must block until its work is done."""
    durations = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        durations.append(time.perf_counter() - started)
    return durations


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def measure_matmul_peak(size: int = 2048, repeats: int = 10) -> float:
    """Measure the best GFLOP/s of a float32 ``size`` x ``size`` jnp.dot, as the machine's reference peak."""
    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(key_a, (size, size), jnp.float32)
    b = jax.random.normal(key_b, (size, size), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    durations = time_calls(lambda: dot(a, b).block_until_ready(), repeats)
    return 2.0 * size**3 / min(durations) / 1e9


def cost_flops(compiled) -> float:
    """Return the FLOPs of a compiled XLA computation by XLA's cost analysis (0 if unknown)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", 0.0))


def _sub_jaxprs(params: dict):
    for value in params.values():
        candidates = value if isinstance(value, (list, tuple)) else [value]
        for candidate in candidates:
            if isinstance(candidate, jax_core.ClosedJaxpr):
                yield candidate.jaxpr
            elif isinstance(candidate, jax_core.Jaxpr):
                yield candidate


def matmul_conv_flops(jaxpr) -> float:
    """Count 2 x multiply-adds of every dot_general and conv_general_dilated in ``jaxpr`` and its sub-jaxprs."""
    total = 0.0
    for equation in jaxpr.eqns:
        name = equation.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = equation.params["dimension_numbers"]
            lhs_shape = equation.invars[0].aval.shape
            contracted = math.prod(lhs_shape[axis] for axis in lhs_contract)
            total += 2.0 * math.prod(equation.outvars[0].aval.shape) * contracted
        elif name == "conv_general_dilated":
            rhs_spec = equation.params["dimension_numbers"].rhs_spec  # (out, in, *spatial) axes of the kernel
            kernel_shape = equation.invars[1].aval.shape
            per_output = kernel_shape[rhs_spec[1]] * math.prod(kernel_shape[axis] for axis in rhs_spec[2:])
            total += 2.0 * math.prod(equation.outvars[0].aval.shape) * per_output
        for sub in _sub_jaxprs(equation.params):
            total += matmul_conv_flops(sub)
    return total


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Format rows as a Markdown table; floats get 3 significant digits, or none after the point from 100 up."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line() -> str:
    """Return the command that started this process, with the script path relative to the repository root."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), REPO_ROOT)
    return shlex.join([".venv/bin/python", script, *sys.argv[1:]])


def record_section(title: str, machine: dict[str, str], body: str, note: str = "") -> str:
    """Build the Markdown section for one benchmark run."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    flags = os.environ.get("XLA_FLAGS", "")
    env = f"XLA_FLAGS={shlex.quote(flags)} " if flags else ""
    lines = [f"### {title}, {stamp}", "", "```bash", env + command_line(), "```", ""]
    lines += [f"- {name}: {value}" for name, value in machine.items()]
    if note:
        lines.append(f"- note: {note}")
    lines += ["", body.strip(), ""]
    return "\n".join(lines)


def append_record(section: str) -> None:
    """Append ``section`` under the Records heading of docs/benchmarks.md, creating what is missing."""
    os.makedirs(os.path.dirname(RECORD_FILE), exist_ok=True)
    existing = ""
    if os.path.exists(RECORD_FILE):
        with open(RECORD_FILE, encoding="utf-8") as handle:
            existing = handle.read()
    with open(RECORD_FILE, "a", encoding="utf-8") as handle:
        if not existing:
            handle.write("# Benchmarks\n\n")
        if RECORDS_HEADING not in existing:
            handle.write(f"\n{RECORDS_HEADING}\n\nSections appended by the scripts in `bench/`, oldest first.\n\n")
        handle.write(section + "\n")
    print(f"Appended the results to {os.path.relpath(RECORD_FILE, REPO_ROOT)}")


def finish(title: str, body: str, args: argparse.Namespace, machine: dict[str, str]) -> None:
    """Print the machine and the tables, then record them unless ``--no-record`` was given."""
    for name, value in machine.items():
        print(f"{name}: {value}")
    print()
    print(body)
    if not args.no_record:
        append_record(record_section(title, machine, body, args.note))
