"""How much identity the base model itself keeps: true renders of held-out products, noised to t
and denoised by the base (text-only, SDEdit), read by the world's classifier.

A personalised shot starts from pure noise and sees the product only through the cache, so it
cannot keep more identity than the base keeps when it is handed the true shot itself, lightly noised.
If that figure is under the target, the base model, not the adapters, is what has to improve.

    python bench/world_sdedit_bound.py MODEL_DIR [--output bench/results/world_sdedit_bound.json]
"""

import argparse
import json
from pathlib import Path

import torch

from dreamcache.world import scene as world
from dreamcache.world.evaluation import Cases, FidelityEvaluator
from dreamcache.world.model import caption_tokens


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--products", type=int, default=24)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps over the full schedule")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    evaluator = FidelityEvaluator(args.model, "cuda" if torch.cuda.is_available() else "cpu", steps=args.steps)
    pipe, device = evaluator.pipe, evaluator.device
    cases = Cases.held_out(args.products, seeds=(0,))
    renders = evaluator.renders(cases, pipe.resolution).to(device, pipe.unet.dtype)
    scale = pipe.vae.config.scaling_factor
    latents = pipe.vae.encode(renders).latent_dist.mean * scale
    report = {"ceiling (true renders)": evaluator.score(cases, renders.float()).identity,
              "vae round trip": evaluator.score(cases, pipe.vae.decode(latents / scale).sample.float().clamp(-1, 1)).identity}
    captions = [world.caption(p.family, s) for p, s, _ in cases.rows()]
    text = pipe.text_encoder(caption_tokens(pipe.tokenizer, captions, device))[0]
    empty = pipe.text_encoder(caption_tokens(pipe.tokenizer, [""] * len(captions), device))[0]
    for start, guidance in ((200, 1.0), (200, 7.5), (400, 1.0), (400, 7.5), (600, 1.0), (800, 1.0)):
        pipe.scheduler.set_timesteps(args.steps)
        timesteps = [t for t in pipe.scheduler.timesteps if t <= start]
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0)).to(device, latents.dtype)
        x = pipe.scheduler.add_noise(latents, noise, timesteps[0].reshape(1))
        for t in timesteps:
            uncond, cond = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([empty, text])).sample.chunk(2)
            x = pipe.scheduler.step(uncond + guidance * (cond - uncond), t, x).prev_sample
        scores = evaluator.score(cases, pipe.vae.decode(x / scale).sample.float().clamp(-1, 1))
        report[f"sdedit t={start} guidance {guidance:g}"] = scores.identity
        report[f"sdedit t={start} guidance {guidance:g} per attribute"] = scores.accuracy
    for name, value in report.items():
        if not name.endswith("attribute"):
            print(f"{name:32s} identity {value:.3f} ({value / report['ceiling (true renders)']:.0%} of the ceiling)")
    if args.output:
        args.output.write_text(json.dumps(dict(model=str(args.model), products=args.products, steps=args.steps,
                                               results=report), indent=1) + "\n")


if __name__ == "__main__":
    main()
