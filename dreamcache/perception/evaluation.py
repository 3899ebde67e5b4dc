"""`dreamcache eval`: the paper's DreamBench protocol on any model this library loads.

Input is the DreamBench layout: a folder with one sub-folder of images per subject and the
`prompts_and_classes.txt` that lists each subject's class and the object and live-subject prompt
templates. For each subject, one reference image (the first, sorted by name) is segmented, put on
white and cached; every prompt of its kind is generated N times with seeds 0..N-1 (plus --seed);
each shot is scored against the reference (DINO, CLIP-I, CLIP-T and the masked MDINO, MCLIP-I).
Written: `per_image.csv`, `per_subject.csv`, and `table.md` / `table.csv` shaped like the paper's
Table 2 and its masked-metrics table, with the settings used.
"""

from __future__ import annotations

import csv
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import mean

from tqdm.auto import tqdm

from dreamcache.core.guidance import DEFAULT_GUIDANCE, DEFAULT_TEXT_SCALE, Guidance
from dreamcache.core.images import open_image
from dreamcache.core.pipeline import DreamCachePipeline
from dreamcache.perception.scoring import METRICS, Scorer
from dreamcache.perception.segmentation import Segmenter

PROMPTS_FILE = "prompts_and_classes.txt"
LIVE_CLASSES = frozenset({"cat", "dog"})  # DreamBench's live subjects get the live-subject prompts
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


@dataclass
class BenchSubject:
    name: str
    class_name: str
    images: list[Path]

    @property
    def live(self) -> bool:
        return self.class_name in LIVE_CLASSES


@dataclass
class EvalSettings:
    images_per_prompt: int = 4
    steps: int = 50
    guidance: Guidance = DEFAULT_GUIDANCE
    text_scale: float = DEFAULT_TEXT_SCALE
    image_scale: float | None = None
    seed: int = 0
    reference_index: int = 0
    batch_size: int = 8
    max_subjects: int | None = None
    max_prompts: int | None = None


@dataclass
class EvalResult:
    output_dir: Path
    rows: list[dict] = field(default_factory=list)
    means: dict[str, float | None] = field(default_factory=dict)


def render(template: str, class_name: str) -> str:
    """DreamBench's templates take (unique_token, class_token); DreamCache needs no unique token."""
    return " ".join(template.format("", class_name).split())


def load_dreambench(root: str | Path) -> tuple[list[BenchSubject], dict[str, list[str]]]:
    """Subjects (with their classes and images) and the prompt templates by kind ("object", "live")."""
    root = Path(root)
    spec = root / PROMPTS_FILE
    if not spec.is_file():
        raise FileNotFoundError(f"{spec} not found: a DreamBench folder holds one folder per subject and {PROMPTS_FILE}")
    classes: dict[str, str] = {}
    prompts: dict[str, list[str]] = {"object": [], "live": []}
    section = None
    for line in spec.read_text().splitlines():
        stripped = line.strip()
        if stripped == "Classes":
            section = "classes"
        elif stripped.startswith("Object Prompts"):
            section = "object"
        elif stripped.startswith("Live Subject Prompts"):
            section = "live"
        elif stripped == "Prompts":
            section = None
        elif section == "classes" and "," in stripped and stripped != "subject_name,class":
            name, class_name = (part.strip() for part in stripped.split(",", 1))
            classes[name] = class_name
        elif section in prompts:
            match = re.match(r"""['"](.+)['"]\.format\(\s*unique_token\s*,\s*class_token\s*\)""", stripped)
            if match:
                prompts[section].append(match[1])
    subjects = []
    for name, class_name in sorted(classes.items()):
        folder = root / name
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        if not images:
            raise FileNotFoundError(f"subject {name!r} is listed in {spec} but {folder} has no images")
        subjects.append(BenchSubject(name, class_name, images))
    if not subjects or not prompts["object"]:
        raise ValueError(f"{spec} lists no subjects or no object prompts")
    return subjects, prompts


def run_eval(
    pipe: DreamCachePipeline,
    scorer: Scorer,
    segmenter: Segmenter,
    dataset: str | Path,
    output_dir: str | Path,
    settings: EvalSettings = EvalSettings(),
    model_label: str = "DreamCache",
    progress: bool = True,
) -> EvalResult:
    subjects, templates = load_dreambench(dataset)
    subjects = subjects[: settings.max_subjects]
    output_dir = Path(output_dir)
    (output_dir / "images").mkdir(parents=True, exist_ok=True)
    result = EvalResult(output_dir)
    for subject in tqdm(subjects, desc="subjects", disable=not progress):
        reference = open_image(subject.images[settings.reference_index])
        cut = segmenter.segment(reference, subject.class_name, name=f"{subject.name} reference")
        cache = pipe.cache_subject(cut.subject_on_white(reference, pipe.resolution), seed=settings.seed)
        prompts = [render(t, subject.class_name) for t in templates["live" if subject.live else "object"]]
        prompts = prompts[: settings.max_prompts]
        jobs = [(p, settings.seed + k) for p in prompts for k in range(settings.images_per_prompt)]
        images = pipe(
            [p for p, _ in jobs], subject=cache, seed=[s for _, s in jobs], guidance=settings.guidance,
            guidance_scale=settings.text_scale, image_guidance_scale=settings.image_scale,
            num_inference_steps=settings.steps, batch_size=settings.batch_size, progress=False,
        ).images
        scores = scorer.score(images, [reference] * len(images), [p for p, _ in jobs],
                              [subject.class_name] * len(images),
                              names=[f"{subject.name} '{p}' seed {s}" for p, s in jobs])
        for (prompt, seed), image, image_scores in zip(jobs, images, scores):
            path = output_dir / "images" / subject.name / f"{prompts.index(prompt):02d}-seed{seed}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
            row = {"subject": subject.name, "class": subject.class_name, "prompt": prompt, "seed": seed,
                   "image": str(path.relative_to(output_dir))}
            row.update({m: None for m in METRICS})
            row.update({s.name: s.value for s in image_scores})
            result.rows.append(row)
    result.means = {m: _mean(r[m] for r in result.rows) for m in METRICS}
    _write(result, settings, model_label, pipe)
    return result


def _mean(values) -> float | None:
    present = [v for v in values if v is not None]
    return mean(present) if present else None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _write(result: EvalResult, settings: EvalSettings, label: str, pipe: DreamCachePipeline) -> None:
    out = result.output_dir
    columns = ["subject", "class", "prompt", "seed", "image", *METRICS]
    with open(out / "per_image.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(result.rows)
    with open(out / "per_subject.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["subject", "class", "images", *METRICS])
        for name in dict.fromkeys(r["subject"] for r in result.rows):
            rows = [r for r in result.rows if r["subject"] == name]
            writer.writerow([name, rows[0]["class"], len(rows), *(_fmt(_mean(r[m] for r in rows)) for m in METRICS)])
    m = result.means
    masked_counts = sum(r["mdino"] is not None or r["mclip_i"] is not None for r in result.rows)
    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "DINO", "CLIP-I", "CLIP-T", "MDINO", "MCLIP-I", "images"])
        writer.writerow([label, *(_fmt(m[k]) for k in METRICS), len(result.rows)])
    setting_lines = "\n".join(f"| {k} | {v} |" for k, v in asdict(settings).items())
    (out / "table.md").write_text(
        f"# DreamBench evaluation\n\n"
        f"{len({r['subject'] for r in result.rows})} subjects, {len(result.rows)} images; "
        f"base `{pipe.name_or_path}`, adapter preset `{pipe._dreamcache_preset}`, "
        f"{pipe.resolution}x{pipe.resolution}.\n\n"
        f"## Table 2 (unmasked)\n\n| Method | DINO | CLIP-I | CLIP-T |\n|---|---|---|---|\n"
        f"| {label} | {_fmt(m['dino'])} | {_fmt(m['clip_i'])} | {_fmt(m['clip_t'])} |\n\n"
        f"## Masked metrics\n\n| Method | MCLIP-I | MDINO |\n|---|---|---|\n"
        f"| {label} | {_fmt(m['mclip_i'])} | {_fmt(m['mdino'])} |\n\n"
        f"Masked scores cover {masked_counts} of {len(result.rows)} images (the others could not be segmented).\n\n"
        f"## Settings\n\n| setting | value |\n|---|---|\n{setting_lines}\n"
    )
