"""The roofline's report (``benchmarks/roofline.py``): markdown tables from its JSON. ``python3
benchmarks/roofline_report.py DIR/roofline.json`` prints them again."""

from __future__ import annotations

import json
import sys

DATASHEET_TFLOPS = {"bf16": 989.0, "fp8": 1979.0}  # H100 SXM, dense
ISSUE_FORWARD_TFLOP = 56.6  # issue #32: one 1024^2 forward, both refiners included
ISSUE_IMAGE_TFLOP = 464.0  # issue #32: eight forwards + text encoder + VAE (the step loop runs nine: see the report)

# ---- tables --------------------------------------------------------------------------------------------------
CLASSES = {"gemm": "linear / GEMM", "attention": "attention",
           "elementwise": "norm / RoPE / elementwise / modulation (Triton)",
           "quantize": "fp8 activation quantize (Triton, with what it fused)", "other": "other kernels (aten)",
           "memcpy": "copies and memsets"}


def _flop_class(flops: dict, cls: str) -> tuple[float, float, float]:
    """(FLOPs, ideal seconds at the datasheet peak, at the measured GEMM peak) of one op class; float8 GEMMs at the
    fp8 peak, everything else at bf16's."""
    parts = {"gemm": ("gemm_bf16", "gemm_fp8"), "attention": ("attention",), "conv": ("conv",)}.get(cls, ())
    return sum(flops.get(p, 0) for p in parts), *(_ideal({p: flops.get(p, 0) for p in parts}, peaks)
                                                   for peaks in (DATASHEET_TFLOPS, None))


_MEASURED: dict = {}


def _ideal(flops: dict, peaks: dict | None) -> float:
    peaks = peaks or _MEASURED or DATASHEET_TFLOPS
    fp8 = flops.get("gemm_fp8", 0)
    return (sum(flops.values()) - fp8) / (peaks["bf16"] * 1e12) + fp8 / (peaks["fp8"] * 1e12)


def _f(x, digits=1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _tf(flops: float, digits: int = 2) -> str:
    """FLOPs as TFLOP on the GPU; as plain FLOPs on the tiny CPU model, whose counts are millions."""
    return f"{flops / 1e12:.{digits}f}" if _GPU[0] else f"{flops:.4g}"


def _pct(ideal: float, t: float) -> str:
    return f"{100 * ideal / t:.0f}%" if t > 0 and ideal > 0 and _GPU[0] else "-"


_GPU = [True]


def render(res: dict) -> str:
    _MEASURED.clear()
    _MEASURED.update(res.get("gemm_peak_tflops") or {})
    gpu = res["card"] != "cpu (tiny model)"
    _GPU[:] = [gpu]
    unit = "GPU" if gpu else "CPU (self time of the ops; no % of an H100's peak)"
    lines = [f"# Roofline: {res['card']}, torch {res['torch']}, {res['model']} model, {res['size']}, "
             f"{res['steps']} steps", ""]
    if res.get("gemm_peak_tflops"):
        p = res["gemm_peak_tflops"]
        lines += [f"Large GEMM (8192^3) on this card: bf16 {p['bf16']} TFLOP/s ({_pct(p['bf16'], 989)} of the "
                  f"datasheet's 989), fp8 {p['fp8']} TFLOP/s ({_pct(p['fp8'], 1979)} of 1979). Ideal times below "
                  f"count float8 GEMMs at the fp8 peak and everything else at bf16's.", ""]
    lines += [f"Note: {n}" for n in res.get("notes", [])] + ([""] if res.get("notes") else [])
    lines += ["## Steps: one transformer call (the caption path runs once per batch: Components)", "",
              "| state | batch | tokens | wall ms | kernels ms | idle ms | TFLOP | TFLOP/s | % of datasheet ideal "
              "| % of measured ideal | kernels | launches | host syncs | D2H copies |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, rows in res["states"].items():
        for b, r in rows.items():
            if not isinstance(r, dict):
                continue
            fl, wall = sum(r["flops"].values()), r["wall_s"]
            lines.append(
                f"| {name} | {b} | {r['tokens']} | {_f(1e3 * wall)} | {_f(1e3 * r.get('kernel_busy_s', 0))} | "
                f"{_f(1e3 * r.get('idle_s', 0))} | {_tf(fl)} | {_f(fl / wall / 1e12)} | "
                f"{_pct(_ideal(r['flops'], DATASHEET_TFLOPS), wall)} | {_pct(_ideal(r['flops'], None), wall)} | "
                f"{r.get('kernels', '-')} | {r.get('launches', '-')} | {r.get('host_syncs', '-')} | "
                f"{r.get('d2h_copies', '-')} |")
    lines += ["", f"## Per op class ({unit} time)", ""]
    for name, rows in res["states"].items():
        for b, r in rows.items():
            if not isinstance(r, dict):
                continue
            total = sum(r["time_s"].values()) or 1.0
            lines += [f"### {name}, batch {b}", "", "| op class | TFLOP | ms | share of time | TFLOP/s "
                      "| % of datasheet | % of measured peak |", "| --- | --- | --- | --- | --- | --- | --- |"]
            for cls, label in CLASSES.items():
                t = r["time_s"].get(cls, 0.0)
                fl, ideal_ds, ideal_m = _flop_class(r["flops"], cls)
                if not t and not fl:
                    continue
                lines.append(f"| {label} | {_tf(fl) if fl else '-'} | {_f(1e3 * t, 2)} | "
                             f"{100 * t / total:.1f}% | {_f(fl / t / 1e12) if fl and t else '-'} | "
                             f"{_pct(ideal_ds, t)} | {_pct(ideal_m, t)} |")
            lines.append("")
    lines += ["## Components", "",
              "| component | TFLOP | kernels ms | wall ms | TFLOP/s (wall) | % of datasheet ideal |",
              "| --- | --- | --- | --- | --- | --- |"]
    comps = [(f"text encoder, batch {b} ({r['tokens'][1]} tokens padded)", r)
             for b, r in res["text_encoder"].items()]
    comps += [(f"text encoder, batch {b}, CUDA graphs (model.text_encoder_graphs)", r["graphs"])
              for b, r in res["text_encoder"].items() if "graphs" in r]
    for name, rows in res["states"].items():
        comps += [(f"caption path (context refiner), {name}, batch {b}", r["caption_path"])
                  for b, r in rows.items() if isinstance(r, dict)]
    if res.get("vae"):
        comps.append(("VAE decode, one image", res["vae"]))
    for label, r in comps:
        fl, wall = sum(r["flops"].values()), r["wall_s"]
        ideal = _ideal(r["flops"], DATASHEET_TFLOPS)
        lines.append(f"| {label} | {_tf(fl, 3)} | {_f(1e3 * r.get('kernel_busy_s', 0), 2)} | "
                     f"{_f(1e3 * wall, 2)} | {_f(fl / wall / 1e12)} | {_pct(ideal, wall)} |")
    lines += _per_image(res) + _accuracy(res)
    return "\n".join(lines) + "\n"


def _per_image(res: dict) -> list[str]:
    steps, vae = res["steps"], res.get("vae")
    out = ["", f"## Per image ({steps} transformer calls; the caption path and the encode shared by the batch; one "
           f"decode)", "",
           "| state | batch | TFLOP/image | s/image | s/image at the datasheet | img/s | % of datasheet |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, rows in res["states"].items():
        for b, r in rows.items():
            te = res["text_encoder"].get(b)
            if not isinstance(r, dict) or te is None:
                continue
            n = int(b)
            parts = [(r, steps / n), (r["caption_path"], 1 / n), (te, 1 / n)] + ([(vae, 1)] if vae else [])
            fl = sum(sum(x["flops"].values()) * k for x, k in parts)
            s = sum(x["wall_s"] * k for x, k in parts)
            ideal = sum(_ideal(x["flops"], DATASHEET_TFLOPS) * k for x, k in parts)
            out.append(f"| {name} | {b} | {_tf(fl, 1)} | {_f(s, 3)} | {_f(ideal, 3)} | {_f(1 / s, 2)} | "
                       f"{_pct(ideal, s)} |")
    one = next((rows.get("1") for rows in res["states"].values() if isinstance(rows.get("1"), dict)), None)
    if one is not None:
        fwd = sum(one["flops"].values()) + sum(one["caption_path"]["flops"].values())
        unit = "TFLOP" if _GPU[0] else "FLOP"
        out += ["", f"One forward at batch 1 with its caption path: {_tf(fwd)} {unit} (issue #32: about "
                f"{ISSUE_FORWARD_TFLOP} at 1024^2 with a 128-token caption). Issue #32's {ISSUE_IMAGE_TFLOP:.0f} "
                f"TFLOP an image counts eight forwards; the step loop (as diffusers' pipeline) runs {steps} for "
                f"{steps} steps."]
        if res.get("analytic_request_tflop"):
            a = res["analytic_request_tflop"]
            out.append(f"The benchmark harness's analytic count for this request (orchestrator/benchmark/sizes.py "
                       f"request_tflop, {a['caption_tokens']} caption tokens): {a['tflop']} TFLOP an image.")
        if not vae:
            out.append("The VAE decode was not measured (--no-vae, or the run stopped before it): per-image "
                       "numbers leave it out.")
    return out


def _accuracy(res: dict) -> list[str]:
    if not res["accuracy"]:
        return []
    out = ["", f"## Accuracy against eager bf16 (same inputs; {res['steps']} steps)", "",
           "| state | option | forward rel L2 | latents rel L2 | image PSNR dB | non-finite |",
           "| --- | --- | --- | --- | --- | --- |"]
    for name, a in res["accuracy"].items():
        out.append(f"| {name} | {a['option']} | {a['forward_rel_l2']} | {a['latents_rel_l2']} | "
                   f"{a['image_psnr_db']} | {a['nonfinite_fraction']} |")
    probe = next(iter(res["accuracy"].values()))["probe"]
    return out + ["", f"Probe: {probe}."]


if __name__ == "__main__":
    print(render(json.load(open(sys.argv[1]))))
