"""The speed benchmark's CPU smoke run (issue 9): every section runs end to end on tiny models.

No timing is asserted (a 2-core CI machine says nothing about a GPU); what is asserted is that each
section produced its figures, that the fast paths computed the eager fp32 function, and that the
end-to-end catalogue run generated every planned image.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _figures(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _figures(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _figures(value)
    elif isinstance(tree, float):
        yield tree


def test_the_benchmark_runs_every_section_on_tiny_models(tmp_path):
    output = tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, "bench/speed.py", "--tiny", "--output", str(output)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(output.read_text())
    sections = results["sections"]
    assert set(sections) == {"fidelity", "generation", "latency", "cache", "vae", "perception", "e2e"}
    assert results["settings"]["model"] == "tiny random"
    assert all(math.isfinite(v) and v >= 0 for v in _figures(sections))

    rows = sections["generation"]["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    columns = {"diffusers_eager", "project_eager_joint", "project_eager_combined", "project_fast_text_only",
               "project_fast_joint", "project_fast_combined"}
    assert all(columns <= set(r) and all(r[c] > 0 for c in columns) for r in rows)
    for mode in ("joint", "combined"):
        assert sections["fidelity"][f"{mode}_fast"]["max_abs"] < 1e-4  # fp32 fast paths vs eager fp32
    assert sections["cache"]["from_latents_subjects_per_s"] > 0
    e2e = sections["e2e"]["summary"]
    assert e2e["images_generated"] == e2e["images_planned"] == 12 and e2e["images_failed"] == 0  # 6 products x 2
