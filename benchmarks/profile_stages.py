"""Stage micro-benchmarks on one GPU with the full-size random-weight model: where a batch's time goes, and
what the VAE decode gains from channels_last and torch.compile. Prints a table; writes JSON to argv[1]."""

import json
import sys

import torch
from gpu_timing import first_call_s, one_step, timed

from actors.engine import Sample, ZImageEngine
from actors.models import build_components


def main(path):
    torch.backends.cudnn.benchmark = True
    comps = build_components("full", device="cuda", dtype=torch.bfloat16)
    eng = ZImageEngine(comps, dict.fromkeys(("transformer", "text_encoder", "vae"), "cuda"), torch.bfloat16)
    res = {"card": torch.cuda.get_device_name(0)}
    prompt = "a photograph of an astronaut riding a horse on mars, cinematic lighting"
    for b in (1, 4):
        samples = [Sample(prompt, i, 1024, 1024) for i in range(b)]
        lat = eng.initial_latents(samples)
        res[f"encode_bs{b}_s"] = timed(lambda: eng.encode(["a photograph of an astronaut"] * b))
        res[f"denoise_1step_bs{b}_s"] = timed(one_step(eng, samples), reps=3)
        res[f"decode_{b}_images_s"] = timed(lambda: eng.decode(lat))  # one VAE call per image
    lat4 = eng.initial_latents([Sample(prompt, i, 1024, 1024) for i in range(4)])
    eng.vae.to(memory_format=torch.channels_last)
    res["decode_4_images_channels_last_s"] = timed(lambda: eng.decode(lat4))
    eng.vae.decoder = torch.compile(eng.vae.decoder, dynamic=False)
    res["decode_compile_first_call_s"] = first_call_s(lambda: eng.decode(lat4))
    res["decode_4_images_channels_last_compiled_s"] = timed(lambda: eng.decode(lat4))
    for k, v in res.items():
        print(f"{k:40s} {v if isinstance(v, str) else round(v, 4)}")
    json.dump(res, open(path, "w"), indent=2)


if __name__ == "__main__":
    main(sys.argv[1])
