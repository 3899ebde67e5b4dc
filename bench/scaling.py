"""Scaling a catalogue run over task workers (issue 11): images/hour with 1 and N workers, no item twice.

    python3 bench/scaling.py                                    # CPU: 1 vs 2 workers, one core each, tiny model
    python3 bench/scaling.py --gpus 0 1 --model sd15 ...        # one worker per GPU (no 2-GPU machine lent yet)
    python3 bench/scaling.py --gpus 0 0 --model sd15 --database sqlite ...   # two workers sharing one GPU

Each round starts a fresh database (on a PostgreSQL server, or a SQLite file where no server can be
had), a Prefect server shared by the rounds, N long-lived `dreamcache worker` processes (each loads
the model once, before taking work; worker i runs on the i-th --gpus id), and `--runs` consecutive
`execution=task-workers` catalogue runs, in one process, whose generation batches go to them: the first
finds the workers cold (compilation, CUDA-graph capture), the next ones warm, as a long-lived pool is. It
records each run's wall time and images/hour, which worker generated each image, and checks that
every planned image was generated exactly once, by the workers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.provenance import git_commit  # noqa: E402
from tests.servers import PostgresServer, PrefectServer  # noqa: E402  (the suite's real-server harness)

# A round's runs one after another in one process, as a scheduler's would be: its imports are paid once, and
# each run's wall time is its own.
RUN = """
import json, time
from flows.runs.catalogue import catalogue_run
from flows.platform.params import CatalogueRunParams
for params in json.loads({runs!r}):
    start = time.perf_counter()
    summary = catalogue_run(CatalogueRunParams(**params))
    print(json.dumps(dict(wall_s=time.perf_counter() - start, generated=summary["images_generated"],
                          planned=summary["images_planned"], failed=summary["images_failed"])), flush=True)
"""


def model_settings(model: str, folder: Path) -> dict:
    """Environment for a model: the bundled tiny one, or random weights of a real architecture and scorers."""
    if model == "tiny":
        return {}
    from dreamcache.core.architectures import build_random_pipeline_components, save_random_scorers
    from dreamcache.core.pipeline import DreamCachePipeline

    pipe = DreamCachePipeline(**build_random_pipeline_components(model), safety_checker=None, feature_extractor=None,
                              requires_safety_checker=False)
    pipe.save_pretrained(folder / "base")
    pipe.load_dreamcache()
    pipe.save_dreamcache(folder / "adapter")
    clip, dino = save_random_scorers(folder / "scorers", "base")
    return dict(DREAMCACHE_BASE_MODEL=str(folder / "base"), DREAMCACHE_ADAPTER=str(folder / "adapter"),
                DREAMCACHE_CLIP_MODEL=clip, DREAMCACHE_DINO_MODEL=dino, DREAMCACHE_DTYPE="float16")


def start_worker(env: dict, log: Path, device: str | None) -> subprocess.Popen:
    env = dict(env)
    if device is None:  # CPU: one core each, so N workers use N cores and 1 worker is the one-core baseline
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", DREAMCACHE_DEVICE="cpu")
    else:
        env.update(CUDA_VISIBLE_DEVICES=device, DREAMCACHE_DEVICE="cuda")
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "worker"], cwd=ROOT, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait_ready(worker: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    """A worker is ready once Prefect's task worker has started serving (the model is loaded before)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise RuntimeError(f"worker exited:\n{log.read_text()[-3000:]}")
        if "task worker" in log.read_text().lower():
            return
        time.sleep(0.5)
    raise TimeoutError(f"worker not ready after {timeout} s:\n{log.read_text()[-3000:]}")


def claims(database_url: str) -> dict:
    from sqlalchemy import create_engine, func, select

    from db.models import Generation, WorkStatus

    engine = create_engine(database_url)
    with engine.connect() as db:
        by_worker = dict(db.execute(select(Generation.claimed_by, func.count()).where(
            Generation.status == WorkStatus.done).group_by(Generation.claimed_by)).all())
        rows = db.scalar(select(func.count()).select_from(Generation))
        distinct = db.scalar(select(func.count(func.distinct(Generation.output_uri))))
    engine.dispose()
    return {"by_worker": by_worker, "rows": rows, "distinct_outputs": distinct}


def round_(n: int, args, env: dict, new_database, folder: Path) -> dict:
    database = new_database(f"scaling_{n}")
    env = dict(env, DREAMCACHE_DATABASE_URL=database)
    devices = args.gpus or [None]
    logs = [folder / f"worker{n}_{i}.log" for i in range(n)]
    workers = [start_worker(env, log, devices[i % len(devices)]) for i, log in enumerate(logs)]
    runs = []
    try:
        for worker, log in zip(workers, logs):
            wait_ready(worker, log)
        plans = [dict(source=str(ROOT / "flows/examples/catalogue"), prompts=args.prompts,
                      images_per_prompt=args.images_per_prompt, steps=args.steps, batch_size=args.batch_size,
                      guidance="combined", execution="task-workers", output_prefix=f"scaling-{n}-{r}",
                      seed=1000 * r)  # new seeds: a re-run would otherwise find its work done
                 for r in range(args.runs)]
        proc = subprocess.run([sys.executable, "-c", RUN.format(runs=json.dumps(plans))], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"run failed:\n{proc.stderr[-4000:]}")
        lines = [line for line in proc.stdout.splitlines() if line.startswith('{"wall_s"')]
        if len(lines) != args.runs:
            raise RuntimeError(f"{len(lines)} of {args.runs} runs reported:\n{proc.stdout[-4000:]}")
        for r, line in enumerate(lines):
            run = json.loads(line)
            runs.append(dict(run, warm=r > 0, images_per_hour=run["generated"] / run["wall_s"] * 3600))
            print(f"{n} worker(s), run {r}: {runs[-1]}", flush=True)
        alive = all(w.poll() is None for w in workers)  # same processes throughout: each loaded the model once
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait(timeout=60)
    done = claims(database)
    worker_ids = {f"{os.uname().nodename}:{w.pid}" for w in workers}
    planned, generated = sum(r["planned"] for r in runs), sum(r["generated"] for r in runs)
    return dict(workers=n, devices=[devices[i % len(devices)] for i in range(n)], runs=runs, claims=done,
                only_workers_generated=set(done["by_worker"]) <= worker_ids, workers_alive_throughout=alive,
                each_image_once=done["rows"] == done["distinct_outputs"] == planned == generated)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to compare")
    parser.add_argument("--gpus", nargs="+", help="CUDA device id per worker, reused round-robin "
                        "(default: CPU workers, one core each)")
    parser.add_argument("--model", default="tiny", choices=["tiny", "sd15", "sd21"],
                        help="tiny: the bundled model; else random weights of that architecture")
    parser.add_argument("--database", default="postgres", choices=["postgres", "sqlite"])
    parser.add_argument("--prompts", nargs="+", default=["a {category} on a beach", "a {category} in the snow"])
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--runs", type=int, default=1, help="consecutive runs per round (the first one cold)")
    parser.add_argument("--output", default=str(ROOT / "bench/results/scaling_cpu.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "prefect").mkdir()
        postgres = PostgresServer().start() if args.database == "postgres" else None
        prefect = PrefectServer(folder / "prefect").start()
        try:
            env = dict(os.environ, DREAMCACHE_HOME=str(folder / "home"), PREFECT_API_URL=prefect.url,
                       PREFECT_HOME=str(prefect.home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
                       **model_settings(args.model, folder / "model"))
            # Workers under Prefect must be given the platform's stores (flows/platform/resources.py): each round names
            # its own database (round_), and all share one object folder.
            env.pop("DREAMCACHE_CONFIG", None)
            env["DREAMCACHE_OBJECTS_URL"] = str(folder / "objects")

            def new_database(name: str) -> str:
                return postgres.create_database(name) if postgres else f"sqlite:///{folder / name}.db"

            rounds = [round_(n, args, env, new_database, folder) for n in args.workers]
        finally:
            prefect.stop()
            if postgres:
                postgres.destroy()
    base = {r: rounds[0]["runs"][r]["images_per_hour"] / rounds[0]["workers"] for r in range(args.runs)}
    for round_result in rounds:
        for r, run in enumerate(round_result["runs"]):
            run["speedup_vs_one_worker"] = run["images_per_hour"] / base[r]
    import torch

    device = "cpu" if args.gpus is None else f"{torch.cuda.get_device_name()}, CUDA ids {args.gpus}"
    settings = {k: v for k, v in vars(args).items() if k != "output"}
    out = {"device": device, "cores": os.cpu_count(), **git_commit(), "settings": settings, "rounds": rounds}
    Path(args.output).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return 0 if all(r["each_image_once"] and r["only_workers_generated"] for r in rounds) else 1


if __name__ == "__main__":
    raise SystemExit(main())
