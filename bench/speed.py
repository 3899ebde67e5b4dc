"""GPU speed benchmark (issue 9): plain diffusers and this project side by side, in one run.

    python3 bench/speed.py                       # on a CUDA machine; all sections; bench/results/speed_<gpu>.json
    python3 bench/speed.py --only generation latency
    python3 bench/speed.py --tiny --output X     # the CPU smoke version CI runs: tiny models, a few steps

SD 1.5 architecture with random weights (speed does not depend on the values), 512x512, fp16.
Sections: generation (images/s for batch 1..32: plain diffusers `StableDiffusionPipeline`, the
project eager, the project with its fast paths, each guidance mode; VAE decode included),
latency (one 100-step image, batch 1), fidelity (fast paths and fp16 against eager fp32), cache
(extraction subjects/s), vae (decode images/s), perception (segmentation and scoring images/s),
e2e (a whole embedded catalogue run: images/hour including loading, compilation and every step).
Each section writes into the JSON as it finishes, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import StableDiffusionPipeline  # noqa: E402

from bench.provenance import git_commit  # noqa: E402
from dreamcache.core.architectures import (  # noqa: E402
    build_random_pipeline_components,
    build_tiny_pipeline_components,
    save_random_scorers,
)
from dreamcache.core.cache import extract_features  # noqa: E402
from dreamcache.core.denoiser import FastPaths  # noqa: E402
from dreamcache.core.pipeline import DreamCachePipeline  # noqa: E402

SECTIONS = ("fidelity", "generation", "latency", "cache", "vae", "perception", "e2e")
PROMPTS = ["a {c} mug on a beach at sunset", "a {c} lamp in a loft", "a {c} bottle on snow", "a {c} box on a desk"]


def random_pipeline(components: dict, device, dtype) -> DreamCachePipeline:
    """A pipeline of random weights with random default adapters, kept small so that fp16 stays finite."""
    pipe = DreamCachePipeline(**components, safety_checker=None, feature_extractor=None,
                              requires_safety_checker=False).to(device, dtype)
    torch.manual_seed(0)
    pipe.load_dreamcache()
    with torch.no_grad():
        for adapter in pipe.dreamcache_adapters.values():
            for p in adapter.parameters():
                p.mul_(0.1)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def product(i: int, size: int = 512) -> Image.Image:
    """A coloured product on white, different for each i (the shape of a segmented reference)."""
    rng = np.random.default_rng(i)
    im = Image.new("RGB", (size, size), "white")
    colour = tuple(int(v) for v in rng.integers(20, 230, 3))
    box = tuple(int(v * size) for v in (0.2 + 0.1 * rng.random(), 0.15, 0.8 - 0.1 * rng.random(), 0.85))
    (ImageDraw.Draw(im).ellipse if i % 2 else ImageDraw.Draw(im).rectangle)(box, fill=colour)
    return im


def prompts(n: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)].format(c=("red", "blue", "green")[i % 3]) for i in range(n)]


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int = 1) -> float:
    """Median wall seconds of `repeats` calls (after the caller's warm-up)."""
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = "cpu" if args.tiny else "cuda"
        self.dtype = torch.float32 if args.tiny else torch.float16
        self.steps = 3 if args.tiny else 50
        self.batches = [1, 2] if args.tiny else [1, 2, 4, 8, 16, 32]
        self.scorer_size = "tiny" if args.tiny else "base"  # base: CLIP ViT-B/32 and DINO ViT-S/16 shapes
        self.results = {"settings": self.settings(), "sections": {}}
        self.pipe = self.project_pipeline(self.dtype)
        self.base = self.diffusers_pipeline()
        self.fast = FastPaths(static_batch=True) if args.tiny else FastPaths.gpu()  # CI: compile is tested apart
        self.caches = self.pipe.cache_subjects([product(i) for i in range(max(self.batches))])

    def components(self):
        if self.args.tiny:
            return build_tiny_pipeline_components(seed=0)
        return build_random_pipeline_components("sd15", seed=0)

    def project_pipeline(self, dtype) -> DreamCachePipeline:
        return random_pipeline(self.components(), self.device, dtype)

    def diffusers_pipeline(self) -> StableDiffusionPipeline:
        """Plain diffusers on the same base weights, with its own UNet (a copy taken without adapters)."""
        adapters = self.pipe.dreamcache_adapters
        self.pipe.unload_dreamcache()
        parts = dict(self.pipe.components, unet=copy.deepcopy(self.pipe.unet))
        self.pipe.load_dreamcache(adapters)
        base = StableDiffusionPipeline(**parts)
        base.set_progress_bar_config(disable=True)
        return base

    def settings(self) -> dict:
        a = self.args
        out = {"model": "tiny random" if a.tiny else "SD 1.5 architecture, random weights",
               "resolution": 64 if a.tiny else 512, "dtype": "float32" if a.tiny else "float16",
               "steps": 3 if a.tiny else 50, "torch": torch.__version__, "python": platform.python_version()}
        import diffusers
        out["diffusers"] = diffusers.__version__
        out["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() and not a.tiny else platform.processor() or "cpu"
        out.update(git_commit())
        return out

    def record(self, section: str, data) -> None:
        self.results["sections"][section] = data
        path = Path(self.args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.results, indent=1) + "\n")
        print(f"== {section}: {json.dumps(data)[:2000]}", flush=True)

    # --- generation ----------------------------------------------------------------------

    def generate(self, n, guidance, subject=True, steps=None, pipe=None):
        pipe = pipe or self.pipe
        subjects = [self.caches[i % len(self.caches)] for i in range(n)] if subject else None
        return pipe(prompts(n), subject=subjects, seed=list(range(n)), guidance=guidance,
                    num_inference_steps=steps or self.steps, batch_size=n, output_type="pt", progress=False).images

    def diffusers_generate(self, base, n, steps=None):
        gens = [torch.Generator(self.device).manual_seed(i) for i in range(n)]
        return base(prompts(n), num_inference_steps=steps or self.steps, guidance_scale=7.5, generator=gens,
                    output_type="pt").images

    def images_per_s(self, fn, n) -> float:
        fn(2)  # warm-up: kernels chosen, graphs captured and compiled for this shape (fewer steps)
        return n / timed(lambda: fn(None), self.device)

    def section_generation(self):
        base = self.base
        rows = []
        for n in self.batches:
            row = {"batch": n}
            row["diffusers_eager"] = self.images_per_s(lambda s: self.diffusers_generate(base, n, s), n)
            self.pipe.disable_fast_paths()
            for g in ("joint", "combined"):
                row[f"project_eager_{g}"] = self.images_per_s(lambda s: self.generate(n, g, steps=s), n)
            rows.append(row)
            self.record("generation", {"rows": rows})
        self.pipe.enable_fast_paths(self.fast)
        compile_start = time.perf_counter()
        self.generate(self.batches[-1], "joint", steps=2)
        first_call = time.perf_counter() - compile_start
        for row in reversed(rows):
            n = row["batch"]
            row["project_fast_text_only"] = self.images_per_s(lambda s: self.generate(n, "joint", False, s), n)
            for g in ("joint", "combined"):
                row[f"project_fast_{g}"] = self.images_per_s(lambda s: self.generate(n, g, steps=s), n)
            self.record("generation", {"rows": rows, "fast_first_call_s": first_call})
        if not self.args.tiny:  # what a diffusers user gets from its documented knob, at the workers' batch
            eager_unet, base.unet = base.unet, torch.compile(base.unet)
            n = 16
            start = time.perf_counter()
            self.diffusers_generate(base, n, 2)
            compile_s = time.perf_counter() - start
            ips = self.images_per_s(lambda s: self.diffusers_generate(base, n, s), n)
            base.unet = eager_unet
            self.record("generation", {"rows": rows, "fast_first_call_s": first_call,
                                       "diffusers_compiled_b16": {"images_per_s": ips, "first_call_s": compile_s}})

    def section_latency(self):
        steps = 4 if self.args.tiny else 100
        out = {"steps": steps}
        self.diffusers_generate(self.base, 1, 2)
        out["diffusers_eager_s"] = timed(lambda: self.diffusers_generate(self.base, 1, steps), self.device)
        for label, fast in (("eager", FastPaths.off()), ("fast", self.fast)):
            self.pipe.enable_fast_paths(fast)
            for g in ("joint", "combined"):
                self.generate(1, g, steps=2)
                out[f"{label}_{g}_s"] = timed(lambda: self.generate(1, g, steps=steps), self.device, repeats=3)
        self.record("latency", out)

    def section_fidelity(self):
        """Fast paths and fp16 against the eager fp32 pipeline: same prompts, subjects, seeds."""
        steps = 3 if self.args.tiny else 20
        n = 4 if not self.args.tiny else 2
        reference = self.project_pipeline(torch.float32)
        reference.disable_fast_paths()
        ref_caches = reference.cache_subjects([product(i) for i in range(n)])
        out = {"steps": steps, "images": n, "pixels": "[0, 1]"}
        for g in ("joint", "combined"):
            subjects = ref_caches
            want = reference(prompts(n), subject=subjects, seed=list(range(n)), guidance=g, num_inference_steps=steps,
                             batch_size=n, output_type="pt", progress=False).images.float()
            for label, fast in (("eager", FastPaths.off()), ("fast", self.fast)):
                self.pipe.enable_fast_paths(fast)
                got = self.generate(n, g, steps=steps).float().cpu()
                diff = (got - want.cpu()).abs()
                out[f"{g}_{label}"] = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
                                       "psnr_db": float(10 * torch.log10(1 / diff.square().mean().clamp_min(1e-12)))}
        del reference
        self.record("fidelity", out)

    # --- cache, VAE, perception ----------------------------------------------------------------

    def section_cache(self):
        pipe = self.pipe
        out = {}
        batch = 8 if self.args.tiny else 64
        side = pipe.resolution
        layers = pipe.dreamcache_layers
        empty = pipe._empty_embedding()
        from diffusers import DDPMScheduler
        noise = DDPMScheduler.from_config(pipe.scheduler.config)
        latents = torch.randn(batch, 4, side // 8, side // 8, device=self.device, dtype=self.dtype)
        pixels = torch.rand(batch, 3, side, side, device=self.device, dtype=self.dtype) * 2 - 1
        with torch.no_grad():
            def from_latents():
                extract_features(pipe.unet, latents, empty, layers, noise)

            def from_pixels():
                z = pipe.vae.encode(pixels).latent_dist.mode() * pipe.vae.config.scaling_factor
                extract_features(pipe.unet, z, empty, layers, noise)

            for name, fn in (("from_latents", from_latents), ("from_pixels", from_pixels)):
                fn()
                out[f"{name}_subjects_per_s"] = batch / timed(fn, self.device, repeats=3)
        images = [product(i) for i in range(batch)]
        pipe.cache_subjects(images[:2])
        out["from_pil_subjects_per_s"] = batch / timed(lambda: pipe.cache_subjects(images, batch_size=batch),
                                                       self.device)
        out["batch"] = batch
        self.record("cache", out)

    def section_vae(self):
        out = {}
        vae = self.pipe.vae
        side = self.pipe.resolution // 8
        decoders = [("eager", vae.decode)] + ([] if self.args.tiny else [("compiled", torch.compile(vae.decode))])
        for label, decode in decoders:
            for n in ([2] if self.args.tiny else [8, 16]):
                z = torch.randn(n, 4, side, side, device=self.device, dtype=self.dtype)
                with torch.no_grad():
                    decode(z)
                    out[f"{label}_b{n}_images_per_s"] = n / timed(lambda: decode(z), self.device, repeats=3)
        self.record("vae", out)

    def section_perception(self):
        from dreamcache.perception.scoring import Scorer
        from dreamcache.perception.segmentation import BorderColourSegmenter, SamSegmenter

        out = {}
        n = 4 if self.args.tiny else 64
        shots = [product(1000 + i) for i in range(n)]
        refs = [product(i) for i in range(n)]
        border = BorderColourSegmenter()
        out["border_colour_images_per_s"] = n / timed(lambda: [border.segment(s) for s in shots], "cpu")
        if not self.args.tiny:  # SAM ViT-B at full size, random weights (1024 px input)
            from segment_anything import sam_model_registry

            segmenter = SamSegmenter(sam_model_registry["vit_b"](checkpoint=None).to(self.device).eval(), "vit_b")
            segmenter.segment(shots[0])
            out["sam_vit_b_images_per_s"] = n / timed(lambda: [segmenter.segment(s) for s in shots], self.device)
        with tempfile.TemporaryDirectory() as folder:
            clip, dino = save_random_scorers(folder, self.scorer_size)
            scorer = Scorer(clip, dino, border, self.device, batch_size=32)
            scorer.score(shots[:2], refs[:2], prompts(2))
            out["scoring_images_per_s"] = n / timed(lambda: scorer.score(shots, refs, prompts(n)), self.device)
        out["images"] = n
        self.record("perception", out)

    # --- end to end ---------------------------------------------------------------------------

    def section_e2e(self):
        """A whole embedded catalogue run in a fresh process: loading, compiling and every step counted."""
        with tempfile.TemporaryDirectory() as folder:
            folder = Path(folder)
            self.pipe.unload_dreamcache()
            self.pipe.save_pretrained(folder / "base")
            self.pipe.load_dreamcache()
            self.pipe.save_dreamcache(folder / "adapter")
            clip, dino = save_random_scorers(folder / "scorers", self.scorer_size)
            env = dict(os.environ, DREAMCACHE_HOME=str(folder / "home"), DREAMCACHE_BASE_MODEL=str(folder / "base"),
                       DREAMCACHE_ADAPTER=str(folder / "adapter"), DREAMCACHE_CLIP_MODEL=clip,
                       DREAMCACHE_DINO_MODEL=dino, DREAMCACHE_DEVICE=self.device,
                       DREAMCACHE_DTYPE="float32" if self.args.tiny else "float16")
            prompts_n, per_prompt, steps = (2, 1, 3) if self.args.tiny else (16, 4, 50)
            code = (
                "import json, sys, time\n"
                "from flows.runs.catalogue import run_embedded\n"
                "from flows.platform.params import CatalogueRunParams\n"
                f"p = CatalogueRunParams(source='flows/examples/catalogue', prompts={prompts(prompts_n)!r}, "
                f"images_per_prompt={per_prompt}, steps={steps}, guidance='combined', output_prefix='bench')\n"
                "t = time.perf_counter(); s = run_embedded(p, progress=False); t = time.perf_counter() - t\n"
                "print(json.dumps({'wall_s': t, 'summary': {k: v for k, v in s.items() if k != 'products'}}))\n"
            )
            root = Path(__file__).resolve().parents[1]
            proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"embedded run failed:\n{proc.stderr[-3000:]}")
            run = json.loads(proc.stdout.strip().splitlines()[-1])
        images = run["summary"]["images_generated"]
        out = {"prompts": prompts_n, "images_per_prompt": per_prompt, "steps": steps, "guidance": "combined",
               "wall_s": run["wall_s"],
               "summary": {k: v for k, v in run["summary"].items() if k not in ("contact_sheets", "rejections", "output")}}
        out["images_per_hour"] = images / run["wall_s"] * 3600
        self.record("e2e", out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run with tiny models (CI)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="sections to run (default: all)")
    parser.add_argument("--output", help="results JSON (default: bench/results/speed_<device>.json)")
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or --tiny for the CPU smoke run")
    if args.output is None:
        tag = "cpu_tiny" if args.tiny else torch.cuda.get_device_name().split()[1].lower()
        args.output = str(Path(__file__).parent / "results" / f"speed_{tag}.json")
    torch._dynamo.config.cache_size_limit = 64  # the benchmark sweeps many shapes on purpose
    bench = Bench(args)
    failed = []
    for section in args.only or SECTIONS:
        start = time.perf_counter()
        try:
            getattr(bench, f"section_{section}")()
        except Exception as exc:  # one broken section must not cost the others' figures
            traceback.print_exc()
            bench.record(section, {"error": f"{type(exc).__name__}: {exc}"[:2000]})
            failed.append(section)
        print(f"   ({section}: {time.perf_counter() - start:.0f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
