"""How an AOTInductor package of the VAE decoder loads and runs on this torch: whether one package per size can
replace ``torch.compile`` (whose warm start traces each size with dynamo, about 2 s a size, on the main thread). On
the GPU image's torch 2.11 every way of loading below dies with a segmentation fault inside ``aoti_load_package``
(``torch/export/pt2_archive/_package.py`` ``_load_aoti``), the package with its weights included, so the decoder
stays ``torch.compile``'d (one H100, tree ee57b30, 2026-11-27: ``benchmarks/results/s11call3-probe_aoti_load.json``).
Compiling works: 72 s for the first 512x512 package, 21 s for the second. Compiles one size twice,
without the weights in the package (``aot_inductor.package_constants_in_so=False``) and with them, then tries each
way of loading in its own process (a crash ends that try only), printing each step as it passes:

- ``nowt-user``: no weights in the package, the live parameters given with ``load_constants(user_managed=True)``
- ``nowt-copy``: the same with ``user_managed=False`` (the package copies them)
- ``wt``: the weights in the package, nothing loaded
- ``wt-user``: the weights in the package, replaced by the live parameters (``user_managed=True``)

    python3 benchmarks/probe_aoti_load.py OUT.json [--size 512x512] [--dir /tmp/aoti-probe]

Each try reports its load time, decode time, largest difference from the eager decoder, the GPU memory the loaded
model adds, and whether its output follows an in-place change of the decoder's weights.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("nowt-user", "nowt-copy", "wt", "wt-user")


def make_vae(w: int, h: int):
    import torch
    from diffusers import AutoencoderKL

    from actors.models import FULL_VAE_CONFIG

    torch.manual_seed(0)  # the same random weights in every process
    with torch.device("cuda"):
        vae = AutoencoderKL(**FULL_VAE_CONFIG).to(torch.bfloat16).eval().requires_grad_(False)
    vae.to(memory_format=torch.channels_last)
    return vae, (1, vae.config.latent_channels, h // 8, w // 8)


def step(name: str, **kw) -> None:
    print("STEP", name, json.dumps(kw), flush=True)


def compile_both(args, w: int, h: int) -> dict:
    import torch
    from torch._inductor import aoti_compile_and_package

    vae, shape = make_vae(w, h)
    z = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
    out = {}
    for name, cfg in (("nowt", {"aot_inductor.package_constants_in_so": False}), ("wt", {})):
        path = Path(args.dir) / f"{name}-{w}x{h}.pt2"
        path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with torch.no_grad():
            program = torch.export.export(vae.decoder, (z,), strict=False)
            aoti_compile_and_package(program, package_path=str(path), inductor_configs=cfg)
        out[name] = {"compile_s": round(time.perf_counter() - t0, 1), "bytes": path.stat().st_size}
        step("compiled", variant=name, **out[name])
    return out


def try_variant(args, variant: str, w: int, h: int) -> dict:
    import torch
    from torch._inductor import aoti_load_package

    vae, shape = make_vae(w, h)
    dec = vae.decoder
    params = dict(dec.named_parameters()) | dict(dec.named_buffers())
    path = Path(args.dir) / f"{variant.split('-')[0]}-{w}x{h}.pt2"
    torch.cuda.synchronize()
    mem0 = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    model = aoti_load_package(str(path), device_index=0)
    step("loaded", s=round(time.perf_counter() - t0, 3))
    fqns = model.get_constant_fqns()
    step("fqns", n=len(fqns), missing=[n for n in fqns if n not in params][:5])
    if variant != "wt":
        model.load_constants({n: params[n] for n in fqns}, check_full_update=True,
                             user_managed=variant.endswith("user"))
        step("constants")
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    mem = (torch.cuda.memory_allocated() - mem0) / 2**30
    z = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        a = model(z)
        step("ran", out_type=type(a).__name__)
        a = a[0] if isinstance(a, (list, tuple)) else a
        b = dec(z)
        diff = (a.float() - b.float()).abs().max().item()
        times = []
        for _ in range(5):
            torch.cuda.synchronize()
            t = time.perf_counter()
            model(z)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        before = model(z)
        before = (before[0] if isinstance(before, (list, tuple)) else before).float()
        params["conv_out.bias"].add_(1.0)
        after = model(z)
        after = (after[0] if isinstance(after, (list, tuple)) else after).float()
    return {"ok": True, "load_s": round(load_s, 3), "memory_gib": round(mem, 3), "max_abs_diff": round(diff, 5),
            "decode_s": round(sorted(times)[2], 4), "follows_live_weights": (after - before).abs().mean().item() > 0.5}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?")
    p.add_argument("--size", default="512x512")
    p.add_argument("--dir", default="/tmp/aoti-probe")
    p.add_argument("--variant", choices=VARIANTS)
    args = p.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    if args.variant:  # one try, in this process
        print("RESULT", json.dumps(try_variant(args, args.variant, w, h)), flush=True)
        return
    import torch

    report = {"torch": torch.__version__, "card": torch.cuda.get_device_name(), "size": args.size,
              "compile": compile_both(args, w, h), "variants": {}}
    for v in VARIANTS:
        proc = subprocess.run([sys.executable, "-X", "faulthandler", __file__, "--size", args.size, "--dir", args.dir,
                               "--variant", v], capture_output=True, text=True, timeout=300)
        lines = proc.stdout.splitlines()
        result = next((json.loads(x[7:]) for x in lines if x.startswith("RESULT ")), None)
        report["variants"][v] = result or {"ok": False, "rc": proc.returncode,
                                           "steps": [x for x in lines if x.startswith("STEP")],
                                           "stderr_tail": proc.stderr.strip().splitlines()[-12:]}
        print(v, json.dumps(report["variants"][v]), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
