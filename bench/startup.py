"""Start-up of the `dreamcache` command (issue 33): each command run N times, each time in a fresh process, and
the median wall time reported. Commands that load no model must not pay for torch, diffusers or Prefect.

    .venv/bin/python bench/startup.py                          # 5 runs each; bench/results/startup.json
    .venv/bin/python bench/startup.py --checkout /tmp/old      # the same commands on another checkout's code

Each run is `python -m flows.cli ARGS` (what the `dreamcache` console script imports) with a home of its own;
`history` reads a database migrated beforehand, untimed, so that it times the reading and not the schema made
on first use. The figures depend on the machine's load: it is recorded with them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.provenance import git_commit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {"--help": ["--help"], "history": ["history"], "run --help": ["run", "--help"]}
# The targets on the 2-core machine class.
TARGETS_S = {"--help": 2.0, "history": 5.0}
HEAVY = ("torch", "diffusers", "transformers", "prefect")


def environment(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DREAMCACHE_", "PREFECT_"))}
    env["DREAMCACHE_HOME"] = str(home)
    return env


def timed(args: list[str], checkout: Path, env: dict) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=checkout, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def heavy_modules(args: list[str], checkout: Path, env: dict) -> list[str]:
    """Which of HEAVY the command imports (once, untimed)."""
    probe = ("import json, runpy, sys; sys.argv = ['dreamcache', *sys.argv[1:]]\n"
             "try:\n    runpy.run_module('flows.cli', run_name='__main__')\n"
             "except SystemExit:\n    pass\n"
             f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", probe, *args], cwd=checkout, env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--checkout", type=Path, default=ROOT, help="Whose code to time (default: this one).")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "startup.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dreamcache-startup-") as home:
        env = environment(Path(home))
        subprocess.run([sys.executable, "-m", "flows.cli", "db", "upgrade"], cwd=args.checkout, env=env, check=True,
                       capture_output=True)
        load_before = os.getloadavg()
        results = {}
        for name, command in COMMANDS.items():
            runs = [timed(command, args.checkout, env) for _ in range(args.repeats)]
            results[name] = dict(median_s=round(statistics.median(runs), 3), runs_s=[round(r, 3) for r in runs],
                                 target_s=TARGETS_S.get(name), imports=heavy_modules(command, args.checkout, env))
            print(f"dreamcache {name:<12} median {results[name]['median_s']:6.2f} s  "
                  f"(runs {', '.join(f'{r:.2f}' for r in runs)}; heavy imports: {results[name]['imports'] or 'none'})")
        load_after = os.getloadavg()

    report = dict(
        benchmark="startup", repeats=args.repeats, commands=results,
        checkout="this repository" if args.checkout == ROOT else args.checkout.name, **(git_commit() if args.checkout == ROOT else {}),
        machine=dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                     cpus=os.cpu_count(), python=platform.python_version(),
                     load_average_1min=[round(load_before[0], 2), round(load_after[0], 2)]),
        command=" ".join([Path(sys.executable).name, *sys.argv]),
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
