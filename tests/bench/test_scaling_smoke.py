"""The scaling benchmarks' CPU smoke runs (issue 11): real workers, real launches, correctness asserted.

No speed-up is asserted (two CI cores say little about two GPUs); what is asserted is what the
benchmarks exist to show besides speed: every planned image generated exactly once, by the workers,
which stayed up (loaded the model once); and N training processes following one process's loss curve.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_catalogue_run_over_one_and_two_task_workers(tmp_path):
    output = tmp_path / "scaling.json"
    proc = subprocess.run([sys.executable, "bench/scaling.py", "--workers", "1", "2",
                           "--prompts", "a {category} on a beach", "--images-per-prompt", "2", "--steps", "2",
                           "--batch-size", "2", "--runs", "2",
                           "--output", str(output)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(output.read_text())
    assert [r["workers"] for r in results["rounds"]] == [1, 2]
    for round_ in results["rounds"]:
        assert round_["each_image_once"] and round_["only_workers_generated"] and round_["workers_alive_throughout"]
        assert [run["generated"] for run in round_["runs"]] == [12, 12]  # 6 products x 1 prompt x 2, twice
        assert round_["claims"]["rows"] == 24 and len(round_["claims"]["by_worker"]) <= round_["workers"]
        assert all(run["speedup_vs_one_worker"] > 0 for run in round_["runs"])
    assert results["commit"]


def test_adapter_training_on_two_processes_follows_one(tmp_path):
    output = tmp_path / "ddp.json"
    proc = subprocess.run([sys.executable, "bench/ddp.py", "--global-batch", "4", "--warmup", "1", "--steps", "2",
                           "--output", str(output)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(output.read_text())
    assert [(r["processes"], r["batch_per_process"]) for r in results["runs"]] == [(1, 4), (2, 2)]
    assert all(len(r["losses"]) == 3 for r in results["runs"])  # one log line per step: only the main process logs
    assert results["loss_curve_max_relative_difference"] < 1e-5
    assert results["adapter_weights_max_relative_difference"] < 1e-3
    assert results["speedup"] > 0
