"""Run every benchmark script in bench/, collect its figures, render the table.

Each ``bench/*.py`` script (this one and ``_``-prefixed helpers excepted)
prints whatever it likes and ends its output with ONE JSON object on its last
line. This runner runs them one after another, each under its own time limit
and continuing past failures, and writes:

- ``bench/results.json``: the machine description and each script's status,
  output tail and JSON object;
- ``bench/RESULTS.md``: a markdown table (figure, value, target, pass/short,
  script, GPU or CPU) with the machine description;
- the same table into ``README.md`` between ``<!-- bench:start -->`` and
  ``<!-- bench:end -->`` (the markers are appended when absent).

Exit status: 0 when every script produced its JSON object (figures short of
their targets included: the table says so), 1 when any script failed, timed
out or printed no JSON object.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
START_MARKER = "<!-- bench:start -->"
END_MARKER = "<!-- bench:end -->"
DEFAULT_TIMEOUT_S = 1800.0
# A bench that does not say which layer count it measured is taken to be on
# the default model (SmolLM2-135M: 30 layers).
DEFAULT_N_LAYERS = 30


@dataclass(frozen=True)
class Target:
    """A figure's target: ``value <op> bound`` passes."""

    bench: str
    figure: str
    op: str  # ">=", "<=" or "=="
    bound: float | str  # a number, or "3+n_layers" (read from that bench's JSON)

    def resolve(self, result: dict[str, Any]) -> float:
        if isinstance(self.bound, str):
            n_layers = result.get("n_layers", DEFAULT_N_LAYERS)
            return 3 + float(n_layers)
        return float(self.bound)

    def met(self, value: float, bound: float) -> bool:
        if self.op == ">=":
            return value >= bound
        if self.op == "<=":
            return value <= bound
        return value == bound


TARGETS: tuple[Target, ...] = (
    Target("store", "cache_vs_bare_ratio", ">=", 0.9),
    Target("store", "cache_grad_vs_bare_ratio", ">=", 0.9),
    Target("store", "bytes_per_pair", "<=", 4),
    Target("store", "bytes_per_pair_with_grad", "<=", 6),
    Target("store", "read_vs_recompute_speedup", ">=", 5),
    Target("store", "top_examples_p50_ms", "<=", 20),
    Target("store", "features_at_p50_ms", "<=", 5),
    Target("attribution", "atp_forward_equivalents", "<=", 3.5),
    Target("attribution", "atpstar_forward_equivalents", "<=", "3+n_layers"),
    Target("attribution", "scan_vs_ideal_ratio", ">=", 0.9),
    Target("attribution", "recall_at_20_heads_atpstar", ">=", 0.9),
    Target("attribution", "recall_at_20_features_atpstar", ">=", 0.9),
    Target("attribution", "atp2_forward_equivalents", "<=", 5),
    Target("attribution", "verified_recall_cost_at_20_heads_best", "<=", 30),
    Target("attribution", "missed_effect_bound_covers", "==", 1),
    Target("attribution", "missed_effect_bound_over_true", "<=", 2),
    Target("scaling", "two_vs_one_actor_speedup", ">=", 1.7),
    Target("scaling", "ray_overhead_fraction", "<=", 0.05),
    Target("scaling", "warm_job_startup_s", "<=", 5),
    Target("api", "api_errors", "==", 0),
    Target("api", "api_p99_ms", "<=", 100),
    Target("api", "feature_page_p99_ms", "<=", 100),
    Target("shard_overhead", "shard_check_growth_ratio", "<=", 1.5),
    Target("scale", "per_shard_overhead_ratio", "<=", 1.2),
    Target("scale", "driver_rss_mb_1m_prompts", "<=", 1000),
    Target("scale", "driver_startup_s_1m_prompts", "<=", 30),
    Target("scale", "driver_commits_per_s", ">=", 200),
    Target("scale", "objects_per_shard", "<=", 8),
    Target("scale", "index_flush_ms_131k_features", "<=", 200),
    Target("cli_startup", "cli_query_seconds", "<=", 2),
    Target("reliability", "silent_wrong_answers", "==", 0),
    Target("reliability", "bad_inputs_with_traceback", "==", 0),
    Target("reliability", "corruptions_undetected", "==", 0),
    Target("reliability", "repairs_not_identical", "==", 0),
    Target("cached_attribution", "cached_atp_vs_model_atp_speedup", ">=", 50),
    Target("cached_attribution", "paired_cache_vs_cache_ratio", ">=", 0.6),
    Target("cached_attribution", "targeted_scan_ablation_fraction", "<=", 0.2),
    Target("cached_attribution", "top_attributions_p50_ms", "<=", 20),
)


# --- running the scripts ---------------------------------------------------------


def discover(bench_dir: Path) -> list[Path]:
    """The bench scripts, in name order (this runner and _helpers excluded)."""
    return sorted(
        path
        for path in bench_dir.glob("*.py")
        if path.name != Path(__file__).name and not path.name.startswith("_")
    )


def last_json_object(stdout: str) -> dict[str, Any] | None:
    """The JSON object on the last non-empty line of ``stdout``, else None."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    if not lines:
        return None
    try:
        value = json.loads(lines[-1])
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _tail(text: str, n_lines: int = 20) -> str:
    return "\n".join(text.splitlines()[-n_lines:])


def run_script(script: Path, timeout_s: float, python: str, log_dir: Path) -> dict[str, Any]:
    """Run one script; its status, timing, output tail and JSON object."""
    env = dict(os.environ)
    # Benches are offline and quiet like the tests.
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env["PYTHONUNBUFFERED"] = "1"
    start = time.perf_counter()
    # A session of its own, so a timeout ends the script's whole process group
    # (local Ray workers, servers it started) and nothing else.
    proc = subprocess.Popen(
        [python, str(script)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
        stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - start
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / f"{script.stem}.log").write_text(
        f"$ {python} {script}\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n", encoding="utf-8"
    )
    result = last_json_object(stdout)
    if timed_out:
        status = "timeout"
    elif proc.returncode != 0:
        status = "failed"
    elif result is None:
        status = "no-json"
    else:
        status = "ok"
    return {
        "script": _display_path(script),
        "status": status,
        "returncode": proc.returncode,
        "seconds": round(seconds, 2),
        "timeout_s": timeout_s,
        "result": result,
        "stdout_tail": _tail(stdout),
        "stderr_tail": _tail(stderr),
    }


def _kill_group(proc: subprocess.Popen[str]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


# --- the machine ---------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _gpus() -> list[str]:
    # nvidia-smi rather than torch: importing torch to ask costs seconds and
    # would initialise CUDA in the runner.
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def _dist_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (subprocess.SubprocessError, OSError):
        return None
    return out.stdout.strip() or None


def describe_machine() -> dict[str, Any]:
    return {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "ram_gib": _ram_gib(),
        "gpus": _gpus(),
        "python": platform.python_version(),
        "os": platform.platform(),
        "torch": _dist_version("torch"),
        "ray": _dist_version("ray"),
        "circuitscan": _dist_version("circuitscan"),
        "git_commit": _git_commit(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def machine_line(machine: dict[str, Any]) -> str:
    gpus = ", ".join(machine["gpus"]) or "no GPU"
    ram = f"{machine['ram_gib']} GiB RAM" if machine.get("ram_gib") else "RAM unknown"
    return (
        f"{machine['cpu_model']}, {machine['cpu_cores']} cores, {ram}, {gpus}; "
        f"torch {machine['torch']}, ray {machine['ray']}, Python {machine['python']}; "
        f"{machine['date']}"
        + (f", commit {machine['git_commit']}" if machine["git_commit"] else "")
    )


# --- the table -----------------------------------------------------------------


def _bench_name(script: str) -> str:
    return Path(script).stem


def _device(result: dict[str, Any], machine: dict[str, Any]) -> str:
    """GPU or CPU: what the bench says it measured on, else what the machine has."""
    device = result.get("device")
    if isinstance(device, str) and device:
        return "GPU" if device.startswith("cuda") or device.lower() == "gpu" else "CPU"
    if isinstance(result.get("gpu"), bool):
        return "GPU" if result["gpu"] else "CPU"
    return "GPU" if machine["gpus"] else "CPU"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def format_value(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, int):  # bool included
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and abs(value) < 0.01:
            return f"{value:.2e}"
        return f"{value:,.3f}".rstrip("0").rstrip(".") if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _format_bound(op: str, bound: float) -> str:
    symbol = {">=": "≥", "<=": "≤", "==": "="}[op]
    return f"{symbol} {format_value(int(bound) if bound.is_integer() else bound)}"


def build_rows(benches: dict[str, dict[str, Any]], machine: dict[str, Any]) -> list[dict[str, Any]]:
    """Targeted figures first (pass / short / missing), then each bench's other figures."""
    rows: list[dict[str, Any]] = []
    by_bench = {_bench_name(run["script"]): run for run in benches.values()}
    targeted: set[tuple[str, str]] = set()
    for target in TARGETS:
        run = by_bench.get(target.bench)
        if run is None:
            continue  # that bench script is not present: nothing to report
        targeted.add((target.bench, target.figure))
        result = run["result"] or {}
        bound = target.resolve(result)
        value = result.get(target.figure)
        number = _number(value)
        if number is None:
            status = "missing"
        else:
            status = "pass" if target.met(number, bound) else "short"
        rows.append(
            {
                "figure": target.figure,
                "value": value,
                "target": _format_bound(target.op, bound),
                "status": status,
                "script": run["script"],
                "device": _device(result, machine),
            }
        )
    for name, run in sorted(by_bench.items()):
        result = run["result"] or {}
        for figure, value in result.items():
            if (name, figure) in targeted or _number(value) is None:
                continue
            rows.append(
                {
                    "figure": figure,
                    "value": value,
                    "target": "",
                    "status": "",
                    "script": run["script"],
                    "device": _device(result, machine),
                }
            )
    return rows


def render_markdown(
    rows: list[dict[str, Any]],
    benches: dict[str, dict[str, Any]],
    machine: dict[str, Any],
    log_dir: str = "bench/logs",
) -> str:
    lines = [
        f"Measured on: {machine_line(machine)}.",
        "",
        "| figure | value | target | status | script | device |",
        "| --- | ---: | --- | --- | --- | --- |",
    ]
    for row in rows:
        status = {"pass": "pass", "short": "**short**", "missing": "**missing**"}.get(
            row["status"], row["status"]
        )
        lines.append(
            f"| `{row['figure']}` | {format_value(row['value'])} | {row['target']} | "
            f"{status} | {row['script']} | {row['device']} |"
        )
    if not benches:
        lines.append("| (no bench scripts found) | | | | | |")
    problems = [run for run in benches.values() if run["status"] != "ok"]
    if problems:
        lines += ["", "Scripts that did not finish cleanly:", ""]
        for run in problems:
            lines.append(
                f"- {run['script']}: {run['status']} (exit {run['returncode']}, "
                f"{run['seconds']:.0f} s); output in {log_dir}/{Path(run['script']).stem}.log"
            )
    present = {_bench_name(run["script"]) for run in benches.values()}
    absent = sorted({t.bench for t in TARGETS} - present)
    if absent:
        lines += ["", "Targets with no bench script here yet:", ""]
        for name in absent:
            figures = ", ".join(f"`{t.figure}`" for t in TARGETS if t.bench == name)
            lines.append(f"- bench/{name}.py: {figures}")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("pass", "short", "missing")}
    lines += [
        "",
        f"{counts['pass']} pass, {counts['short']} short, {counts['missing']} missing. "
        "Regenerate with `bench/run_all`; raw figures in `bench/results.json`.",
    ]
    return "\n".join(lines) + "\n"


def update_readme(readme: Path, table: str) -> None:
    """Put ``table`` between the bench markers (appending the markers when absent)."""
    text = readme.read_text(encoding="utf-8") if readme.exists() else ""
    block = f"{START_MARKER}\n{table}{END_MARKER}"
    pattern = re.compile(re.escape(START_MARKER) + r".*?" + re.escape(END_MARKER), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + "## Benchmarks\n\n" + block + "\n"
    readme.write_text(text, encoding="utf-8")


# --- main ------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--bench-dir", type=Path, default=BENCH_DIR, help="Folder of bench scripts."
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=float(os.environ.get("BENCH_TIMEOUT_S", DEFAULT_TIMEOUT_S)),
        help="Seconds each script may run (default $BENCH_TIMEOUT_S or 1800).",
    )
    parser.add_argument("--python", default=sys.executable, help="Interpreter for the scripts.")
    parser.add_argument("--only", nargs="*", default=None, help="Run only these bench names.")
    parser.add_argument(
        "--results", type=Path, default=None, help="Default: BENCH_DIR/results.json"
    )
    parser.add_argument("--markdown", type=Path, default=None, help="Default: BENCH_DIR/RESULTS.md")
    parser.add_argument(
        "--readme", type=Path, default=REPO_ROOT / "README.md", help="README to update."
    )
    parser.add_argument("--no-readme", action="store_true", help="Leave the README alone.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench_dir = args.bench_dir.resolve()
    scripts = discover(bench_dir)
    if args.only:
        scripts = [s for s in scripts if s.stem in set(args.only)]
    machine = describe_machine()
    print(f"[bench] {len(scripts)} script(s) on {machine_line(machine)}", flush=True)
    benches: dict[str, dict[str, Any]] = {}
    for script in scripts:
        print(f"[bench] {script.name} (limit {args.timeout:.0f} s) ...", flush=True)
        run = run_script(script, args.timeout, args.python, bench_dir / "logs")
        benches[script.stem] = run
        print(f"[bench] {script.name}: {run['status']} in {run['seconds']:.1f} s", flush=True)
        if run["status"] != "ok" and run["stderr_tail"]:
            print(_tail(run["stderr_tail"], 5), file=sys.stderr, flush=True)
    rows = build_rows(benches, machine)
    table = render_markdown(rows, benches, machine, _display_path(bench_dir / "logs"))
    results_path = args.results or bench_dir / "results.json"
    markdown_path = args.markdown or bench_dir / "RESULTS.md"
    results_path.write_text(
        json.dumps({"machine": machine, "benches": benches, "rows": rows}, indent=2) + "\n",
        encoding="utf-8",
    )
    markdown_path.write_text("# Benchmark results\n\n" + table, encoding="utf-8")
    if not args.no_readme:
        update_readme(args.readme, table)
    print(table, flush=True)
    return 0 if all(run["status"] == "ok" for run in benches.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
