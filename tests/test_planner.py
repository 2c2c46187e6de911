"""Placement tables: pure logic, no Ray, no torch."""

import json
import sys
from pathlib import Path

import pytest

from placement import GPU, DeploymentSpec, Inventory, PlacementError, model_spec, plan

ROOT = Path(__file__).resolve().parents[1]
Z = model_spec("modelscope", "bfloat16")


def inv(*nodes):
    return Inventory.from_nodes(list(nodes))


def test_placement_imports_neither_ray_nor_torch():
    import subprocess

    code = "import sys, placement; print(any(m in sys.modules for m in ('torch', 'ray')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("px,batch,expected", [(1024 * 1024, 1, 21.6), (1280 * 1280, 1, 22.9)])
def test_memory_model_matches_measured_whole_pipeline_peaks(px, batch, expected):
    """Whole-pipeline peaks measured on an H100 (2026-11-26): one image, where the VAE decode dominates."""
    est = Z.peak_gib(("text_encoder", "transformer", "vae"), px, batch)
    assert abs(est - expected) / expected < 0.05, est


@pytest.mark.parametrize("component,tokens,pixels,prompts,measured", [
    ("transformer", 4224, 0, 0, 0.624), ("transformer", 16896, 0, 0, 2.498), ("transformer", 33792, 0, 0, 4.995),
    ("transformer", 18432, 0, 0, 2.730), ("vae", 0, 1024 * 1024, 0, 2.378), ("vae", 0, 512 * 512, 0, 0.596),
    ("vae", 0, 2048 * 2048, 0, 9.508),
])
def test_component_activations_match_measured(component, tokens, pixels, prompts, measured):
    """Activation peaks above the weights measured on an H200 (benchmarks/probe_packed.py, tree 8c1fc32,
    2026-11-27): a packed transformer forward by tokens, one VAE decode by size."""
    est = Z.components[component].activation_gib(tokens, pixels, prompts)
    assert abs(est - measured) / measured < 0.05, est


def test_packed_batches_grow_with_tokens_and_decode_with_the_largest_image():
    """Decoding one image at a time: a batch of four 1024^2 images needs only its tokens' activations more than one
    (the VAE's part no longer grows with the batch)."""
    names = ("text_encoder", "transformer", "vae")
    one = Z.peak_gib(names, 1024 * 1024, 1)
    four = Z.peak_gib(names, 1024 * 1024, 4)
    assert four - one < 0.5
    assert Z.batch_peak_gib(names, 40_000, 1024 * 1024, 4) > Z.batch_peak_gib(names, 20_000, 1024 * 1024, 4)


def test_replicate_one_per_gpu_with_limits():
    p = plan(Z, inv(("n0", 2, 23.5)), DeploymentSpec("replicate", width=1024, height=1024, max_batch_size=16))
    assert [r.gpus for r in p.replicas] == [(0,), (1,)]
    # 24 GB cards: 23.0 GiB usable - 18.9 of bf16 weights leaves room for about 27.5k tokens, six 1024^2 images
    assert all(r.max_batch_size == 6 for r in p.replicas), [r.max_batch_size for r in p.replicas]
    assert all(27_000 < r.max_batch_tokens < 28_500 for r in p.replicas)
    assert all(1024 * 1024 <= r.max_pixels < 1536 * 1536 for r in p.replicas)
    capped = plan(Z, inv(("n0", 2, 23.5)), DeploymentSpec("replicate", max_batch_size=16, max_batch_tokens=18432))
    assert all(r.max_batch_tokens == 18432 and r.max_batch_size == 4 for r in capped.replicas)
    assert p.gpus[0].components == ("r0.text_encoder", "r0.transformer", "r0.vae")


def test_replicate_error_carries_numbers():
    with pytest.raises(PlacementError) as e:
        plan(Z, inv(("n0", 2, 16.0)), DeploymentSpec("replicate"))
    msg = str(e.value)
    assert "whole pipeline needs 21.3 GiB at 1024x1024" in msg and "n0:0 with 16.0 GiB" in msg and "split" in msg


def test_split_places_components_by_device_map():
    d = DeploymentSpec("split", gpus_per_replica=2, device_map={"text_encoder": 0, "transformer": 1, "vae": 1},
                       width=2048, height=2048)
    p = plan(Z, inv(("n0", 2, 23.5)), d)
    (r,) = p.replicas
    assert r.components == {"text_encoder": {"node": "n0", "gpu": 0}, "transformer": {"node": "n0", "gpu": 1},
                            "vae": {"node": "n0", "gpu": 1}}
    assert r.max_pixels >= 2048 * 2048
    te, dit = p.gpus
    assert te.estimated_peak_gib < 9 and dit.estimated_peak_gib < 23.5


def test_split_error_names_component_and_gpu():
    d = DeploymentSpec("split", gpus_per_replica=2, device_map={"text_encoder": 0, "transformer": 0, "vae": 1})
    with pytest.raises(PlacementError, match=r"text_encoder \+ transformer need\(s\) .* GiB at 1024x1024"):
        plan(Z, inv(("n0", 2, 16.0)), d)


def test_auto_replicates_where_whole_pipeline_fits_and_pairs_the_rest():
    p = plan(Z, inv(("a", 2, 79.0), ("b", 4, 16.0)), DeploymentSpec("auto"))
    assert [(r.node, r.gpus) for r in p.replicas] == [("a", (0,)), ("a", (1,)), ("b", (0, 3)), ("b", (1, 2))]
    split = p.replicas[2]
    assert split.device_map == {"text_encoder": 0, "transformer": 1, "vae": 1}


def test_auto_lets_small_gpus_borrow_a_text_encoder():
    # 1024^2: a whole pipeline fits the 40 GiB card, only transformer + VAE the 16 GiB ones. Borrowing the
    # big card's encoder gives three denoisers; pairing the small cards into a split would give two.
    gpus = Inventory((GPU("n", 0, 40.0), GPU("n", 1, 16.0), GPU("n", 2, 16.0)))
    p = plan(Z, gpus, DeploymentSpec("auto"))
    assert [(r.gpus, r.encoder_replica) for r in p.replicas] == [((0,), None), ((1,), "r0"), ((2,), "r0")]


def test_auto_at_large_size_splits_24gb_cards():
    p = plan(Z, inv(("n0", 2, 23.5)), DeploymentSpec("auto", width=1536, height=1536))
    assert len(p.replicas) == 1 and p.replicas[0].gpus == (0, 1)


def test_replicas_count_is_checked():
    with pytest.raises(PlacementError, match="replicas = 3 but only 2"):
        plan(Z, inv(("n0", 2, 80.0)), DeploymentSpec("replicate", replicas=3))


def test_an_unknown_mode_names_the_field_and_every_mode():
    with pytest.raises(PlacementError, match="deployment.mode 'pipeline'; use one of replicate, split, auto, "
                                             "shared-encoder"):
        plan(Z, inv(("n0", 2, 80.0)), DeploymentSpec("pipeline"))


def test_deterministic_and_ordered():
    i = inv(("b", 2, 80.0), ("a", 2, 80.0))
    p1 = plan(Z, i, DeploymentSpec("replicate"))
    p2 = plan(Z, Inventory(tuple(reversed(i.gpus))), DeploymentSpec("replicate"))
    assert p1 == p2 and [r.node for r in p1.replicas] == ["a", "a", "b", "b"]


def test_plan_cli_json_for_every_shipped_config(capsys):
    from orchestrator.cli import main

    for path in sorted((ROOT / "clusters").glob("*.yaml")):
        assert main(["plan", str(path), "--json"]) == 0, path
        data = json.loads(capsys.readouterr().out)
        assert data["replicas"], path
        for r in data["replicas"]:
            assert set(r["components"]) == {"text_encoder", "transformer", "vae"}
            assert all({"node", "gpu"} <= set(c) for c in r["components"].values())
        for g in data["gpus"]:
            assert {"node", "gpu", "capacity_gib", "estimated_peak_gib"} <= set(g)


def test_plan_cli_reports_what_cannot_fit(tmp_path, capsys):
    from orchestrator.cli import main

    bad = tmp_path / "small.yaml"
    bad.write_text("cluster:\n  nodes: [{name: tiny-node, gpus: 2, gpu_memory_gib: 12}]\n"
                   "deployment:\n  mode: replicate\n")
    assert main(["plan", str(bad)]) == 1
    assert "tiny-node:0 with 12.0 GiB" in capsys.readouterr().err
    assert main(["plan", str(ROOT / "clusters" / "dual-4090d-replicate.yaml")]) == 0
    assert "r1" in capsys.readouterr().out


def test_quantized_components_weigh_what_they_hold():
    bf16 = model_spec("modelscope")
    fp8 = model_spec("modelscope", transformer="fp8")
    te8 = model_spec("modelscope", transformer="fp8", text_encoder="int8")
    assert bf16.weights_gib(["transformer"]) == pytest.approx(11.46, abs=0.01)
    assert fp8.weights_gib(["transformer"]) == pytest.approx(5.86, abs=0.01)  # blocks' linears 1 byte, rest bf16
    assert bf16.weights_gib(["text_encoder"]) == pytest.approx(7.30, abs=0.01)  # without its unused last layer
    assert te8.weights_gib(["text_encoder"]) == pytest.approx(4.01, abs=0.01)
    assert fp8.precisions == {"transformer": "fp8", "text_encoder": "bfloat16", "vae": "bfloat16"}


@pytest.mark.parametrize("spec,measured", [(dict(), 21.47), (dict(transformer="fp8"), 15.77)])
def test_serving_peaks_within_five_percent(spec, measured):
    """Peaks of the whole pipeline measured while serving mixed traffic on one H100 (2026-11-27, bf16 on tree 35a7979,
    fp8 on 4a3f06f: batches of up to 5 at 1024^2-class sizes, within the default 18,432-token budget), against the
    model's estimate at that budget and the largest size of that traffic (1344x768)."""
    m = model_spec("modelscope", **spec)
    est = m.batch_peak_gib(("text_encoder", "transformer", "vae"), 18_432, 1344 * 768, 5)
    assert abs(est - measured) / measured < 0.05, est


def test_auto_precision_picks_the_faster_plan_that_fits_and_says_why():
    from placement import plan_best

    d = DeploymentSpec("replicate", width=1024, height=1024, max_batch_size=16, max_batch_tokens=18_432)
    options = [model_spec("modelscope", transformer=t) for t in ("none", "fp8")]
    p = plan_best(options, inv(("n0", 2, 23.5)), d)
    assert dict(p.precisions)["transformer"] == "fp8"
    assert any("precision chosen: transformer fp8" in n for n in p.notes), p.notes
    assert any("vs transformer bfloat16" in n for n in p.notes)
    # the text encoder in int8 buys nothing where bf16 already reaches the token budget: not chosen
    te = [model_spec("modelscope", text_encoder=q) for q in ("none", "int8")]
    assert dict(plan_best(te, inv(("n0", 2, 23.5)), d).precisions)["text_encoder"] == "bfloat16"
    # ...and where it serves in 14 GiB, the start-up does not fit: components load in bf16 and are quantized on
    # the device (19.5 GiB with the 512^2 reference run), so the planner refuses and says how much it needs
    with pytest.raises(PlacementError, match="needs 19.5 GiB"):
        plan_best([model_spec("modelscope", transformer="fp8", text_encoder=q) for q in ("none", "int8")],
                  inv(("n0", 1, 14.0)), DeploymentSpec("replicate", width=1024, height=1024))


def test_quantized_plans_count_the_start_up_peak():
    """fp8 weights serve in 16 GiB, but they start as bf16 on the device: the plan shows both peaks."""
    d = DeploymentSpec("replicate", width=1024, height=1024, max_batch_size=4, max_batch_tokens=18_432)
    fp8 = plan(model_spec("modelscope", transformer="fp8"), inv(("n0", 1, 23.5)), d)
    g = fp8.gpus[0]
    assert g.estimated_peak_gib < 17 < 19 < g.load_peak_gib < 20
    assert fp8.to_dict()["gpus"][0]["load_peak_gib"] == round(g.load_peak_gib, 2)
    bf16 = plan(model_spec("modelscope"), inv(("n0", 1, 23.5)), d).gpus[0]
    assert bf16.load_peak_gib < bf16.estimated_peak_gib  # unquantized: its weights load as they serve


def test_fp8_plan_shows_more_room_than_bf16_on_24gb():
    d = DeploymentSpec("replicate", width=1024, height=1024, max_batch_size=16)
    bf16 = plan(model_spec("modelscope"), inv(("n0", 1, 23.5)), d)
    fp8 = plan(model_spec("modelscope", transformer="fp8"), inv(("n0", 1, 23.5)), d)
    assert fp8.replicas[0].max_batch_tokens > bf16.replicas[0].max_batch_tokens + 30_000
    assert (bf16.replicas[0].max_batch_size, fp8.replicas[0].max_batch_size) == (6, 15)


def test_fp8_blocks_kept_in_bf16_are_counted_at_two_bytes():
    """model.fp8_bf16_blocks: each main block kept in bf16 holds its linears in two bytes (34 blocks of one size are
    quantizable: 30 main, 2 + 2 refiners); a plan with them has less room, and more blocks than the model has are
    refused naming the field."""
    t = lambda **kw: model_spec("modelscope", transformer="fp8", **kw).components["transformer"]  # noqa: E731
    all_fp8, last15 = t(), t(bf16_blocks=15)
    assert last15.weights_gib("fp8") - all_fp8.weights_gib("fp8") == pytest.approx(15 * 176_947_200 / 2**30)
    d = DeploymentSpec("replicate", width=1024, height=1024, max_batch_size=16)
    room = [plan(model_spec("modelscope", transformer="fp8", bf16_blocks=n), inv(("n0", 1, 23.5)), d)
            .replicas[0].max_batch_tokens for n in (0, 15)]
    assert room[1] < room[0]
    with pytest.raises(ValueError, match="model.fp8_bf16_blocks keeps 31 main blocks in bf16; this model has 30"):
        model_spec("modelscope", transformer="fp8", bf16_blocks=31)


def test_plan_counts_lora_memory():
    """Resident adapters (and a batch's stacked copy) are counted on the transformer's GPU, and the plan says so."""
    from placement import lora_adapter_gib, with_loras

    inv = Inventory.from_nodes([("n", 1, 80.0)])
    d = DeploymentSpec(width=1024, height=1024)
    base = plan(model_spec("modelscope"), inv, d)
    spec = with_loras(model_spec("modelscope"), 4, 64)
    withl = plan(spec, inv, d)
    assert abs(spec.lora_gib - 8 * lora_adapter_gib(64)) < 1e-9 and 2.5 < spec.lora_gib < 3.5
    assert withl.gpus[0].estimated_peak_gib - base.gpus[0].estimated_peak_gib > 2.5 or \
        withl.replicas[0].max_batch_tokens < base.replicas[0].max_batch_tokens
    assert withl.to_dict()["lora_gib_per_replica"] == round(spec.lora_gib, 3)
    assert any("LoRA: 4 resident adapter(s) of rank <= 64" in n for n in withl.notes)
    assert with_loras(model_spec("modelscope"), 0, 64) == model_spec("modelscope")


def test_plan_cli_takes_overrides(capsys):
    from orchestrator.cli import main

    path = str(ROOT / "clusters" / "dual-4090d-auto.yaml")
    precisions = []
    for extra in ([], ["--set", "model.quantization=none"]):
        assert main(["plan", path, "--json", *extra]) == 0
        precisions.append(json.loads(capsys.readouterr().out)["precisions"]["transformer"])
    assert precisions == ["fp8", "bfloat16"]


def test_lora_memory_with_a_controlnet_counts_the_base_models_adapters():
    """A deployment with both a ControlNet and LoRA plans (the ControlNet's name suffix does not hide the shapes)."""
    from placement.memory import with_loras

    plain = with_loras(model_spec("modelscope"), 4, 64)
    both = with_loras(model_spec("modelscope", controlnet=True), 4, 64)
    assert both.lora_gib == plain.lora_gib > 0
    assert with_loras(model_spec("tiny", controlnet=True), 2, 8).lora_gib > 0


def test_fp8_only_where_the_declared_gpus_have_fp8_tensor_cores(tmp_path, capsys):
    """auto never picks fp8 on Ampere or older (a replica would fail at start), and says so; an explicit fp8 on
    such cards is refused at plan time, naming the field."""
    from orchestrator.cli import main
    from placement.memory import fp8_capable

    assert [fp8_capable(t) for t in ("RTX 4090D", "H100 80GB", "RTX 6000 Ada", "A100-SXM4-80GB", "RTX 3090",
                                     "RTX A6000", "Tesla T4", "", "something new")] == \
        [True, True, True, False, False, False, False, None, None]
    shipped = ROOT / "clusters" / "dual-4090d-auto.yaml"
    assert main(["plan", str(shipped), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["precisions"]["transformer"] == "fp8"
    a100 = shipped.read_text().replace("gpu_type: RTX 4090D", "gpu_type: A100-PCIE-40GB")
    cfg = tmp_path / "a100.yaml"
    cfg.write_text(a100)
    assert main(["plan", str(cfg), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["precisions"]["transformer"] == "bfloat16"
    assert any("fp8 not considered: A100-PCIE-40GB" in n for n in data["notes"])
    cfg.write_text(a100.replace("quantization: auto", "quantization: fp8"))
    assert main(["plan", str(cfg)]) == 1
    assert "model.quantization fp8 needs GPUs with fp8 tensor cores" in capsys.readouterr().err


def test_the_text_encoders_graph_pool_is_counted_on_its_device():
    """With ``model.text_encoder_graphs`` (and a warm-up, where they are captured) the text encoder's device holds
    their pool for good (464 MiB measured on an H100): more resident memory there, a smaller batch budget where it
    shares the card with the transformer, nothing on the toy model (CPU) or without a warm-up."""
    from orchestrator.deployment import plan_for
    from zimage_common.config import config_from_dict

    plain, graphs = model_spec("modelscope"), model_spec("modelscope", encoder_graphs=True)
    assert graphs.weights_gib(["text_encoder"]) - plain.weights_gib(["text_encoder"]) == pytest.approx(464 / 1024)
    assert graphs.weights_gib(["transformer", "vae"]) == plain.weights_gib(["transformer", "vae"])
    names = ["transformer", "text_encoder", "vae"]
    assert graphs.max_batch_tokens(names, 24.0, 1024 * 1024, 4) < plain.max_batch_tokens(names, 24.0, 1024 * 1024, 4)
    assert model_spec("tiny", encoder_graphs=True) == model_spec("tiny")

    inventory = Inventory((GPU("n", 0, 80.0),))
    peak = {}
    for graphs_on, warmup in ((True, True), (False, True), (True, False)):
        cfg = config_from_dict({"model": {"source": "random-full", "text_encoder_graphs": graphs_on},
                                "deployment": {"mode": "replicate", "replicas": 1, "warmup": warmup}})
        peak[graphs_on, warmup] = plan_for(cfg, inventory).gpus[0].estimated_peak_gib
    assert peak[True, True] - peak[False, True] == pytest.approx(464 / 1024, abs=0.01)
    assert peak[True, False] == peak[False, True]  # no warm-up: nothing captured, nothing counted
    said = "the text encoder's CUDA graphs hold 0.45 GiB on its GPU (model.text_encoder_graphs: false leaves"
    for graphs_on, shown in ((True, True), (False, False)):
        cfg = config_from_dict({"model": {"source": "random-full", "text_encoder_graphs": graphs_on},
                                "deployment": {"mode": "replicate", "replicas": 1}})
        assert any(said in n for n in plan_for(cfg, inventory).notes) is shown
