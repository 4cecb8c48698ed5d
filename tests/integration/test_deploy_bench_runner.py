"""bench/run_all, run for real on a temporary folder of tiny bench scripts."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "bench" / "run_all"

SCRIPTS = {
    # Passes one target, falls short of another, omits a third, adds a figure.
    "store.py": """
        print("warming up")
        print('{"not": "the last line"}')
        import json
        print(json.dumps({"cache_vs_bare_ratio": 0.95, "cache_grad_vs_bare_ratio": 0.9,
                          "bytes_per_pair": 5.1, "bytes_per_pair_with_grad": 6,
                          "top_examples_p50_ms": 3.25, "features_at_p50_ms": 0.5,
                          "tokens_per_s": 123456.7, "device": "cpu"}))
    """,
    # A 4-layer model: the AtP* target becomes 3 + 4 = 7 forward equivalents.
    "attribution.py": """
        import json
        print(json.dumps({"n_layers": 4, "atp_forward_equivalents": 3.6,
                          "atpstar_forward_equivalents": 6.5, "scan_vs_ideal_ratio": 0.93,
                          "recall_at_20_heads_atpstar": 1.0,
                          "recall_at_20_features_atpstar": 0.95, "device": "cuda:0"}))
    """,
    "api.py": """
        print("api_p99_ms=12 (but no JSON object)")
    """,
    # Hangs, with a child process of its own: the timeout must end both.
    "scaling.py": """
        import subprocess, sys, time, pathlib
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        pathlib.Path(sys.argv[0]).with_suffix(".child").write_text(str(child.pid))
        print("started", flush=True)
        time.sleep(60)
    """,
    "crash.py": """
        import json, sys
        print(json.dumps({"partial": 1}))
        sys.exit(3)
    """,
    # The newer targeted scripts: one passes, one falls short.
    "cli_startup.py": """
        import json
        print(json.dumps({"cli_query_seconds": 1.5, "cli_schema_seconds": 1.2}))
    """,
    "shard_overhead.py": """
        import json
        print(json.dumps({"shard_check_growth_ratio": 2.0, "shard_check_ms_1k": 0.1}))
    """,
    "scale.py": """
        import json
        print(json.dumps({"per_shard_overhead_ratio": 1.1, "driver_rss_mb_1m_prompts": 560,
                          "driver_startup_s_1m_prompts": 12, "driver_commits_per_s": 90,
                          "objects_per_shard": 70, "index_flush_ms_131k_features": 150}))
    """,
    "cached_attribution.py": """
        import json
        print(json.dumps({"cached_atp_vs_model_atp_speedup": 60.0,
                          "paired_cache_vs_cache_ratio": 0.5, "cached_atp_max_abs_diff": 1e-4}))
    """,
    # Meets one target, misses the other.
    "reliability.py": """
        import json
        print(json.dumps({"corruptions_tried": 28, "corruptions_detected": 28,
                          "silent_wrong_answers": 0, "bad_inputs_with_traceback": 1}))
    """,
    "_helper.py": """
        import pathlib, sys
        pathlib.Path(sys.argv[0]).with_suffix(".ran").write_text("ran")
    """,
}


def _write_bench_dir(folder: Path) -> None:
    folder.mkdir()
    for name, body in SCRIPTS.items():
        (folder / name).write_text(textwrap.dedent(body), encoding="utf-8")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie awaiting its reaper counts as ended.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


def test_run_all_collects_json_renders_table_and_survives_failures(tmp_path: Path) -> None:
    bench_dir = tmp_path / "bench"
    _write_bench_dir(bench_dir)
    readme = tmp_path / "README.md"
    readme.write_text("# project\n\nIntro text.\n", encoding="utf-8")

    started = time.monotonic()
    proc = subprocess.run(
        [str(RUNNER), "--bench-dir", str(bench_dir), "--timeout", "6", "--readme", str(readme)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 1, proc.stdout + proc.stderr  # some scripts failed
    assert elapsed < 45

    results = json.loads((bench_dir / "results.json").read_text(encoding="utf-8"))
    machine = results["machine"]
    for key in ("cpu_model", "cpu_cores", "ram_gib", "gpus", "torch", "ray", "date"):
        assert key in machine, key
    assert machine["cpu_cores"] >= 1 and machine["torch"] and machine["ray"]

    benches = results["benches"]
    assert set(benches) == {
        "store",
        "attribution",
        "api",
        "scaling",
        "crash",
        "cli_startup",
        "shard_overhead",
        "scale",
        "cached_attribution",
        "reliability",
    }
    assert not (bench_dir / "_helper.ran").exists()
    status = {name: run["status"] for name, run in benches.items()}
    assert status == {
        "store": "ok",
        "attribution": "ok",
        "api": "no-json",
        "scaling": "timeout",
        "crash": "failed",
        "cli_startup": "ok",
        "shard_overhead": "ok",
        "scale": "ok",
        "cached_attribution": "ok",
        "reliability": "ok",
    }
    assert benches["crash"]["returncode"] == 3
    assert benches["store"]["result"]["bytes_per_pair"] == 5.1
    assert 5.5 < benches["scaling"]["seconds"] < 25
    child_pid = int((bench_dir / "scaling.child").read_text())
    assert not _alive(child_pid), "the timed-out script's child process survived"
    assert (bench_dir / "logs" / "scaling.log").read_text().count("started") == 1

    rows = {(r["script"].rsplit("/", 1)[-1], r["figure"]): r for r in results["rows"]}
    assert rows["store.py", "cache_vs_bare_ratio"]["status"] == "pass"
    assert rows["store.py", "cache_grad_vs_bare_ratio"]["status"] == "pass"  # ≥ is inclusive
    assert rows["store.py", "bytes_per_pair"]["status"] == "short"
    assert rows["store.py", "read_vs_recompute_speedup"]["status"] == "missing"
    assert rows["store.py", "tokens_per_s"]["target"] == ""
    assert rows["store.py", "cache_vs_bare_ratio"]["device"] == "CPU"
    atpstar = rows["attribution.py", "atpstar_forward_equivalents"]
    assert (atpstar["target"], atpstar["status"], atpstar["device"]) == ("≤ 7", "pass", "GPU")
    assert rows["attribution.py", "atp_forward_equivalents"]["status"] == "short"
    assert rows["api.py", "api_errors"]["status"] == "missing"
    assert ("scaling.py", "two_vs_one_actor_speedup") in rows
    assert rows["cli_startup.py", "cli_query_seconds"]["status"] == "pass"
    assert rows["shard_overhead.py", "shard_check_growth_ratio"]["status"] == "short"
    assert rows["scale.py", "driver_rss_mb_1m_prompts"]["status"] == "pass"
    assert rows["scale.py", "driver_commits_per_s"]["status"] == "short"
    assert rows["cached_attribution.py", "cached_atp_vs_model_atp_speedup"]["status"] == "pass"
    assert rows["cached_attribution.py", "paired_cache_vs_cache_ratio"]["status"] == "short"

    assert rows["reliability.py", "silent_wrong_answers"]["status"] == "pass"
    assert rows["reliability.py", "bad_inputs_with_traceback"]["status"] == "short"

    table = (bench_dir / "RESULTS.md").read_text(encoding="utf-8")
    assert "| figure | value | target | status | script | device |" in table
    assert "| `bytes_per_pair` | 5.1 | ≤ 4 | **short** |" in table
    assert "| `top_examples_p50_ms` | 3.25 | ≤ 20 | pass |" in table
    assert "| `tokens_per_s` | 123,457 |" in table
    assert "timeout" in table and "no-json" in table
    assert f"{machine['cpu_cores']} cores" in table
    assert "no bench script here yet" not in table  # every targeted bench is present

    text = readme.read_text(encoding="utf-8")
    assert text.startswith("# project\n\nIntro text.\n")
    assert text.count("<!-- bench:start -->") == 1 and text.count("<!-- bench:end -->") == 1
    assert "| `bytes_per_pair` | 5.1 | ≤ 4 | **short** |" in text


def _load_runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run_all", ROOT / "bench" / "run_all.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_readme_table_is_replaced_between_markers_only(tmp_path: Path) -> None:
    runner = _load_runner()
    readme = tmp_path / "README.md"
    readme.write_text(
        "intro\n\n<!-- bench:start -->\nold table\n<!-- bench:end -->\n\nafter\n", encoding="utf-8"
    )
    runner.update_readme(readme, "| new |\n")
    runner.update_readme(readme, "| newer |\n")
    assert readme.read_text(encoding="utf-8") == (
        "intro\n\n<!-- bench:start -->\n| newer |\n<!-- bench:end -->\n\nafter\n"
    )


def test_targets_without_a_script_are_listed() -> None:
    runner = _load_runner()
    machine = runner.describe_machine()
    benches = {
        "api": {
            "script": "bench/api.py",
            "status": "ok",
            "returncode": 0,
            "seconds": 1.0,
            "result": {"api_errors": 0, "api_p99_ms": 150.0, "gpu": False},
        }
    }
    rows = runner.build_rows(benches, machine)
    assert [(r["figure"], r["status"], r["device"]) for r in rows] == [
        ("api_errors", "pass", "CPU"),
        ("api_p99_ms", "short", "CPU"),
        ("feature_page_p99_ms", "missing", "CPU"),
    ]
    table = runner.render_markdown(rows, benches, machine)
    assert "- bench/store.py: `cache_vs_bare_ratio`" in table
    assert "- bench/api.py" not in table
    assert "1 pass, 1 short, 1 missing." in table


def test_last_line_must_be_a_json_object() -> None:
    runner = _load_runner()
    assert runner.last_json_object('noise\n{"a": 1}\n\n') == {"a": 1}
    assert runner.last_json_object('{"a": 1}\nnoise\n') is None
    assert runner.last_json_object("[1, 2]\n") is None
    assert runner.last_json_object("") is None
