"""Exploration before the speed benchmark: which knobs move SD 1.5 UNet / VAE time on this GPU.

One-off measurements that decided the fast paths (issue 9); the benchmark proper is bench/speed.py.
    python3 bench/explore_unet.py OUT.json
"""
import json, sys, time, traceback
import torch
sys.path.insert(0, ".")
from dreamcache.core.architectures import build_random_pipeline_components
from dreamcache.core.pipeline import DreamCachePipeline
from dreamcache.core.adapter import use_memory
from dreamcache.core.cache import collate_memory

path = sys.argv[1]
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
def save():
    json.dump(res, open(path, "w"), indent=1)

def bench(fn, n=20, warm=5):
    for _ in range(warm): fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    ts.sort(); return ts[len(ts) // 2]

def measure(name, fn, **kw):
    try:
        t0 = time.perf_counter(); v = fn(**kw); res[name] = v
        print(f"{name:55s} {v}  ({time.perf_counter()-t0:.0f}s)", flush=True)
    except Exception as e:
        res[name] = f"error: {type(e).__name__}: {e}"[:400]; traceback.print_exc()
    save()

dt = torch.float16
pipe = DreamCachePipeline(**build_random_pipeline_components("sd15"), safety_checker=None, feature_extractor=None,
                          requires_safety_checker=False).to("cuda", dt)
unet, vae = pipe.unet, pipe.vae
torch.manual_seed(0)
def inputs(b):
    return (torch.randn(b, 4, 64, 64, device="cuda", dtype=dt), torch.full((b,), 500, device="cuda"),
            torch.randn(b, 77, 768, device="cuda", dtype=dt))

def unet_ms(b, model=None):
    x, t, e = inputs(b); m = unet if model is None else model
    with torch.no_grad():
        return bench(lambda: m(x, t, encoder_hidden_states=e))

measure("eager_b16", unet_ms, b=16)
unet.to(memory_format=torch.channels_last)
measure("eager_cl_b16", unet_ms, b=16)
from torch.nn.attention import sdpa_kernel, SDPBackend
for be in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
    def f(be=be):
        with sdpa_kernel(getattr(SDPBackend, be)):
            return unet_ms(16)
    measure(f"eager_cl_b16_{be}", f)
for b in (2, 3, 4, 8, 32, 48, 64):
    measure(f"eager_cl_b{b}", unet_ms, b=b)

# encoder half: conv_in + time embedding + down blocks
def enc_ms(b):
    x, t, e = inputs(b)
    def enc():
        emb = unet.time_embedding(unet.get_time_embed(sample=x, timestep=t))
        h = unet.conv_in(x)
        for blk in unet.down_blocks:
            if getattr(blk, "has_cross_attention", False):
                h, _ = blk(hidden_states=h, temb=emb, encoder_hidden_states=e)
            else:
                h, _ = blk(hidden_states=h, temb=emb)
        return h
    with torch.no_grad():
        return bench(enc)
measure("encoder_only_cl_b16", enc_ms, b=16)
measure("encoder_only_cl_b2", enc_ms, b=2)

# CUDA graph of the eager UNet
def graph_ms(b):
    x, t, e = inputs(b)
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.no_grad():
        with torch.cuda.stream(s):
            for _ in range(3): unet(x, t, encoder_hidden_states=e)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            unet(x, t, encoder_hidden_states=e)
    return bench(g.replay)
for b in (2, 3, 16):
    measure(f"cudagraph_eager_cl_b{b}", graph_ms, b=b)

# adapters (current code)
pipe.load_dreamcache()
for a in pipe.dreamcache_adapters.values():
    for p in a.parameters(): p.data.mul_(0.1)
from PIL import Image
im = Image.new("RGB", (512, 512), "white"); im.paste((200, 40, 40), (100, 100, 400, 400)); cache = pipe.cache_subject(im)
names = [l.name for l in pipe.dreamcache_layers]
def adapter_ms(b, cached, model=None):
    mem = collate_memory([None] * (b - cached) + [cache] * cached, names, "cuda", dt)
    with use_memory(unet, mem):
        return unet_ms(b, model)
measure("adapters_half_cached_cl_b16", adapter_ms, b=16, cached=8)
measure("adapters_all_cached_cl_b16", adapter_ms, b=16, cached=16)
measure("adapters_none_cached_cl_b16", adapter_ms, b=16, cached=0)
measure("adapters_half_cached_cl_b2", adapter_ms, b=2, cached=1)

# torch.compile: adapters attached, half cached
def compiled(b, cached, **opts):
    torch._dynamo.reset(); t0 = time.perf_counter()
    m = torch.compile(unet, fullgraph=True, dynamic=False, **opts)
    ms = adapter_ms(b, cached, m)
    return {"ms": ms, "first_call_s": time.perf_counter() - t0}
measure("compile_default_adapters_half_b16", compiled, b=16, cached=8)
import torch._inductor.config as ic
ic.conv_1x1_as_mm = True; ic.coordinate_descent_tuning = True; ic.epilogue_fusion = False
measure("compile_tuned_adapters_half_b16", compiled, b=16, cached=8)
measure("compile_tuned_adapters_half_b32", compiled, b=32, cached=16)
measure("compile_tuned_reduce_overhead_half_b2", compiled, b=2, cached=1, mode="reduce-overhead")
pipe.unload_dreamcache()
def compiled_plain(b, **opts):
    torch._dynamo.reset(); t0 = time.perf_counter(); m = torch.compile(unet, fullgraph=True, dynamic=False, **opts)
    return {"ms": unet_ms(b, m), "first_call_s": time.perf_counter() - t0}
measure("compile_tuned_plain_b16", compiled_plain, b=16)

# VAE
vae.to(memory_format=torch.channels_last)
def vae_dec(b, model=None):
    z = torch.randn(b, 4, 64, 64, device="cuda", dtype=dt)
    with torch.no_grad():
        return bench(lambda: vae.decode(z).sample, n=10, warm=3)
def vae_enc(b):
    x = torch.randn(b, 3, 512, 512, device="cuda", dtype=dt)
    with torch.no_grad():
        return bench(lambda: vae.encode(x).latent_dist.mode(), n=10, warm=3)
measure("vae_decode_cl_b8", vae_dec, b=8)
measure("vae_encode_cl_b32", vae_enc, b=32)
print(json.dumps(res, indent=1))
