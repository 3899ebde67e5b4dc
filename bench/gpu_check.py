"""GPU check: the library runs in fp16 and bf16 on CUDA at SD 1.5 size (random weights); rough timings.

Not the speed benchmark (that is issue 9): it checks that fast-path dtypes work, that a mixed batch
matches single runs within fp16/bf16 tolerance, and gives first UNet timings.

    python3 bench/gpu_check.py      # on a CUDA machine; writes gpu_check.json under $OUT or here
"""
import json, os, sys, time
import torch
sys.path.insert(0, ".")
from PIL import Image, ImageDraw
from dreamcache.core.architectures import build_random_pipeline_components
from dreamcache.core.pipeline import DreamCachePipeline
from dreamcache.core.adapter import use_memory
from dreamcache.core.cache import collate_memory

out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
def product(c):
    im = Image.new("RGB", (512, 512), "white"); ImageDraw.Draw(im).ellipse((100, 80, 400, 440), fill=c); return im

def timed(fn, n=10):
    for _ in range(3): fn()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): fn()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / n

for dtype in (torch.float16, torch.bfloat16):
    name = str(dtype).split(".")[1]
    pipe = DreamCachePipeline(**build_random_pipeline_components("sd15"), safety_checker=None, feature_extractor=None,
                              requires_safety_checker=False).to("cuda", dtype)
    pipe.load_dreamcache()
    for a in pipe.dreamcache_adapters.values():  # random adapters at SD scale: keep them small so fp16 stays finite
        for p in a.parameters(): p.data.mul_(0.1)
    caches = pipe.cache_subjects([product((200, 30, 40)), product((30, 40, 200))])
    r = {}
    for guidance in ("combined", "joint"):
        imgs = pipe(["a mug on a beach", "a lamp", "a mug in snow", "a box"], subject=[caches[0], None, caches[1], caches[0]],
                    seed=[1, 2, 3, 4], guidance=guidance, num_inference_steps=4, output_type="np", progress=False).images
        import numpy as np
        arr = np.stack(imgs)
        alone = np.stack(pipe(["a mug in snow"], subject=[caches[1]], seed=[3], guidance=guidance, num_inference_steps=4,
                              output_type="np", progress=False).images)
        r[guidance] = {"finite": bool(np.isfinite(arr).all()), "std": float(arr.std()),
                       "batch_vs_alone_maxabs": float(np.abs(arr[2:3] - alone).max())}
    lat = torch.randn(16, 4, 64, 64, device="cuda", dtype=dtype); t = torch.full((16,), 500, device="cuda")
    txt = torch.randn(16, 77, 768, device="cuda", dtype=dtype)
    names = [l.name for l in pipe.dreamcache_layers]
    with torch.no_grad():
        r["unet_b16_no_cache_ms"] = 1000 * timed(lambda: pipe.unet(lat, t, encoder_hidden_states=txt))
        mem = collate_memory([caches[0]] * 16, names, "cuda", dtype)
        with use_memory(pipe.unet, mem):
            r["unet_b16_all_cached_ms"] = 1000 * timed(lambda: pipe.unet(lat, t, encoder_hidden_states=txt))
        pipe.unload_dreamcache()
        r["unet_b16_plain_diffusers_ms"] = 1000 * timed(lambda: pipe.unet(lat, t, encoder_hidden_states=txt))
        pipe.load_dreamcache()
    refs = [product((i * 7 % 255, 40, 200)) for i in range(64)]
    pipe.cache_subjects(refs[:8], batch_size=32)
    torch.cuda.synchronize(); t0 = time.perf_counter(); pipe.cache_subjects(refs, batch_size=32); torch.cuda.synchronize()
    r["cache_subjects_per_s_incl_preprocess"] = 64 / (time.perf_counter() - t0)
    out[name] = r
    del pipe; torch.cuda.empty_cache()
print(json.dumps(out, indent=1))
open(os.path.join(os.environ.get("OUT", "."), "gpu_check.json"), "w").write(json.dumps(out, indent=1))
