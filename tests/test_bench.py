"""The benchmark harness on the CPU: tiny model, short run, JSON and plot produced, baseline side by side."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_ok(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run a command of the project from the repository root; it must succeed (its output's tail if not)."""
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc


def bench_ok(args: list[str], monkeypatch) -> None:
    """``zimage-orch bench ARGS`` in this process, on the session's Ray (as tests/test_ray_integration.py runs
    ``generate``): the same entry point, argument parsing and run as the command, without a Python process and a
    local Ray of its own to start (about 7 s of each test on two cores). It must succeed."""
    from orchestrator.cli import main

    monkeypatch.setattr(sys, "argv", ["zimage-orch", "bench", *args])  # what the report records as its command
    assert main(["bench", *args]) == 0


@pytest.mark.slow
@pytest.mark.ray
def test_bench_cpu_short_run(tmp_path, tiny_cache, ray_cluster, monkeypatch):
    out = tmp_path / "bench"
    bench_ok(["--set", f"model.cache_dir={tiny_cache}", "--set", "defaults.width=64", "--set", "defaults.height=64",
              "--concurrency", "1,4", "--requests", "8", "--warmup", "2", "--baseline", "--baseline-requests", "2",
              "--out", str(out)], monkeypatch)
    report = json.loads((out / "bench.json").read_text())
    assert report["card"] == "cpu" and report["sizes"] == ["64x64"]
    assert report["baseline"]["sizes"]["64x64"]["images"] == 2
    c1, c4 = report["runs"]
    assert (c1["concurrency"], c4["concurrency"]) == (1, 4)
    for run in (c1, c4):
        assert run["images"] == 8 and run["failed"] == 0 and run["throughput_vs_baseline"] > 0
        assert run["latency_p50_s"] <= run["latency_p95_s"] <= run["latency_p99_s"]
        assert set(run["stage_p50_s"]) == {"encode_s", "image_encode_s", "denoise_s", "decode_s", "total_s"}
        assert [b["batch"] for b in run["batch_stages"]] == sorted(b["batch"] for b in run["batch_stages"])
    assert max(int(k) for k in c4["batch_sizes"]) > 1
    assert (out / "bench.png").stat().st_size > 1000
    # where the start-up went: the deployment's phases add up to no more than the whole, and the replica's own
    # phases (a warm-up on the CPU: its batches, no attention plans to build) to no more than the replicas' phase
    phases = report["startup_phases_s"]
    assert list(phases) == ["connect", "inventory", "replicas"] and sum(phases.values()) <= report["startup_s"]
    for replica in report["replicas"].values():  # (one per logical GPU; they start side by side)
        own = dict(replica["startup_s"])
        assert own.pop("process") > 0  # the actor's process, from its creation (Ray may have made it earlier)
        assert list(own) == ["imports", "load", "speed_options", "warmup_batches", "warmup_extra", "attention_plans",
                             "text_encoder"]
        assert own["warmup_batches"] > 0 and sum(own.values()) <= phases["replicas"]


@pytest.mark.slow
@pytest.mark.ray
def test_bench_edit_workloads_cpu(tmp_path, tiny_cache, ray_cluster, monkeypatch):
    """img2img, inpaint and the mixed stream beside text-to-image in one run (what the GPU entry edits-1024 runs):
    edits at --edit-steps 5, strength 0.6 run 3 steps, as many as the 3-step text-to-image, so they share batches."""
    out = tmp_path / "bench"
    bench_ok(["--set", f"model.cache_dir={tiny_cache}", "--set", "defaults.width=64", "--set", "defaults.height=64",
              "--set", "deployment.replicas=1", "--workload", "uniform,img2img,inpaint,edit-mix", "--steps", "3",
              "--edit-steps", "5", "--strength", "0.6", "--concurrency", "6", "--requests", "6", "--warmup", "3",
              "--out", str(out)], monkeypatch)
    report = json.loads((out / "bench.json").read_text())
    runs = {r["workload"]: r for r in report["runs"]}
    assert set(runs) == {"uniform", "img2img", "inpaint", "edit-mix"}
    for w, run in runs.items():
        assert run["images"] == 6 and run["failed"] == 0, run
        assert (run["stage_p50_s"]["image_encode_s"] > 0) == (w != "uniform")
    assert max(int(k) for k in runs["edit-mix"]["batch_sizes"]) > 1
    # edits running 3 steps share packed batches with 3-step text-to-image
    assert any("+" in k for k in runs["edit-mix"]["batches_by_kinds"]), runs["edit-mix"]["batches_by_kinds"]
    assert set(runs["inpaint"]["batches_by_kinds"]) == {"inpaint"}


@pytest.mark.slow
@pytest.mark.ray
def test_bench_controlnet_workloads_cpu(tmp_path, tiny_cache, ray_cluster, monkeypatch):
    """What the GPU entry controlnet-1024 runs, with the tiny ControlNet: control requests alone and beside plain
    ones (they share batches). Whole batches here, so that sharing shows in the calls' record: under step scheduling
    a request goes to the replica at once and shares steps there (tests/test_controlnet.py)."""
    out = tmp_path / "bench"
    bench_ok(["--set", f"model.cache_dir={tiny_cache}", "--set", "router.scheduling=batch",
              "--set", "defaults.width=64", "--set", "defaults.height=64", "--set", "deployment.replicas=1",
              "--set", "model.controlnet.source=tiny", "--workload", "control,control-mix", "--steps", "2",
              "--concurrency", "1,4", "--requests", "4", "--warmup", "2", "--out", str(out)], monkeypatch)
    runs = json.loads((out / "bench.json").read_text())["runs"]
    assert [r["label"] for r in runs] == ["control-c1", "control-c4", "control-mix-c1", "control-mix-c4"]
    assert all(r["images"] == 4 and r["failed"] == 0 for r in runs)
    assert any("+" in k for k in runs[3]["batches_by_kinds"]), runs[3]["batches_by_kinds"]


def test_mixed_sizes_and_summary_math():
    from orchestrator.benchmark.report import percentile, summarize
    from zimage_common.messages import ImageResult, StageTimes

    rs = [ImageResult(f"q{i}", True, replica_id="r0" if i < 2 else "r1", batch_id=i // 2, batch_size=2,
                      latency_s=float(i + 1), queue_s=0.5, stage_times=StageTimes(1, 2, 3, 6)) for i in range(4)]
    rs.append(ImageResult("bad", False, error="x", error_type="timeout"))
    s = summarize("t", rs, elapsed=12.0, concurrency=2)
    assert s.images == 4 and s.failed == 1 and s.throughput_img_s == pytest.approx(4 / 12, abs=1e-4)
    assert s.batch_sizes == {"2": 2} and s.replica_busy_fraction == {"r0": 0.5, "r1": 0.5}
    assert percentile([1, 2, 3, 4], 0.5) == 2.5 and s.latency_p50_s == 2.5


def test_every_batch_of_a_phase_is_in_its_report_in_batch_order():
    from orchestrator.benchmark.report import summarize
    from zimage_common.messages import ImageResult, StageTimes

    def res(i, rid, bid, encode_s):
        return ImageResult(f"q{i}", True, replica_id=rid, batch_id=bid, batch_size=1, latency_s=1.0,
                           stage_times=StageTimes(encode_s, 1, 0.1, 1.2))

    rs = [res(0, "r0", 3, 0.5), res(1, "r0", 4, 0.25), res(2, "r0", 6, 0.0), res(3, "r1", 5, 0.75),
          res(4, "r1", 7, 0.125)]
    s = summarize("t", rs, elapsed=10.0)
    assert [(b["batch"], b["replica"], b["encode_s"]) for b in s.batch_stages] == [
        (3, "r0", 0.5), (4, "r0", 0.25), (5, "r1", 0.75), (6, "r0", 0.0), (7, "r1", 0.125)]
    assert s.batch_stages[0]["denoise_s"] == 1 and s.batch_stages[0]["total_s"] == 1.2


@pytest.mark.slow
def test_matrix_runs_entries_and_groups(tmp_path, tiny_cache):
    """A matrix file's entries run one process each, reports land under OUT/NAME, a group selects entries."""
    matrix = tmp_path / "m.yaml"
    matrix.write_text(f"""
runs:
  cpu-short:
    machine: cpu
    timeout_s: 240
    bench: --set model.cache_dir={tiny_cache} --set defaults.width=64 --set defaults.height=64
      --set deployment.replicas=1 --workload uniform,mixed --sizes 64x64,32x48 --concurrency 2 --requests 4
      --warmup 1 --repeat 2
  hello:
    timeout_s: 30
    script: -c "import sys, pathlib; pathlib.Path('{{out}}/hi.txt').write_text('ok')"
groups:
  both: [cpu-short, hello]
""")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "orchestrator.cli", "bench", "--matrix", str(matrix), "--run", "both", "--out",
           str(out)]
    proc = run_ok(cmd)
    report = json.loads((out / "cpu-short" / "bench.json").read_text())
    assert report["label"] == "cpu-short"
    assert [(r["workload"], r["round"]) for r in report["runs"]] == [("uniform", 1), ("mixed", 1), ("uniform", 2),
                                                                      ("mixed", 2)]
    assert len(report["phase_ratios"]["mixed-c2"]["per_round"]) == 2  # --repeat 2: the ratio in each round
    assert all(r["failed"] == 0 and r["megapixels_s"] > 0 for r in report["runs"])
    assert (out / "hello" / "hi.txt").read_text() == "ok" and "summary:" in proc.stdout


def test_matrix_lanes_run_entries_side_by_side_one_gpu_each(tmp_path):
    """--lanes N: one-GPU entries split over N lanes (longest limit first onto the least-loaded lane), each lane's
    entries one after another on its own GPU (CUDA_VISIBLE_DEVICES), side by side with the other lanes; entries
    that need several GPUs are refused."""
    from orchestrator.benchmark.matrix import load_matrix, plan_lanes, run_matrix

    helper = tmp_path / "which_gpu.py"
    helper.write_text("import os, sys, time, pathlib\ntime.sleep(0.5)\n"
                      "pathlib.Path(sys.argv[1], 'gpu.txt').write_text(os.environ.get('CUDA_VISIBLE_DEVICES', '-'))\n")
    matrix = tmp_path / "m.yaml"
    matrix.write_text("runs:\n" + "".join(f"  {n}:\n    timeout_s: {t}\n    script: {helper} '{{out}}'\n"
                                           for n, t in (("a", 300), ("b", 200), ("c", 100), ("d", 50))))
    entries, _ = load_matrix(matrix)
    plan = plan_lanes(list(entries.values()), 2)
    assert [[e.name for e in lane] for lane in plan] == [["a", "d"], ["b", "c"]]
    out = tmp_path / "out"
    assert run_matrix(str(matrix), "a,b,c,d", str(out), lanes=2) == 0
    gpus = {n: (out / n / "gpu.txt").read_text() for n in "abcd"}
    assert gpus == {"a": "0", "d": "0", "b": "1", "c": "1"}
    wide = tmp_path / "w.yaml"
    wide.write_text("runs:\n  s: {machine: nvidia-h100-x4, script: -c pass}\n")
    with pytest.raises(ValueError, match="several GPUs"):
        plan_lanes(list(load_matrix(wide)[0].values()), 2)
    assert [[e.name for e in lane] for lane in plan_lanes(list(load_matrix(wide)[0].values()), 1)] == [["s"]]


def test_matrix_rejects_unknown_names(tmp_path):
    from orchestrator.benchmark.matrix import load_matrix, select

    matrix = tmp_path / "m.yaml"
    matrix.write_text("runs:\n  a: {bench: --requests 1}\ngroups:\n  g: [a]\n")
    entries, groups = load_matrix(matrix)
    assert [e.name for e in select(entries, groups, "g,a")] == ["a"]
    with pytest.raises(ValueError, match="neither a run nor a group"):
        select(entries, groups, "nope")
    matrix.write_text("runs:\n  a: {bench: x, script: y}\n")
    with pytest.raises(ValueError, match="exactly one of"):
        load_matrix(matrix)
    for text, want in (("runs: [a", "not valid YAML"), ("- a\n", "a mapping with 'runs'"),
                       ("runs: [1, 2]\n", "are mappings"), ("runs:\n  a: {bench: x}\ngroups:\n  g: 5\n", "a list"),
                       ("runs:\n  a: {bench: 'x \"y'}\n", "runs.a: No closing quotation"),
                       ("runs:\n  a: {bench: x, timeout_s: abc}\n", "runs.a: could not convert"),
                       ("runs:\n  a: {bench: x, timeout_s: null}\n", "runs.a: float"),
                       ("runs:\n  a: {bench: [x]}\n", "runs.a: 'bench' / 'script' is one string"),
                       ("runs:\n  a: {bench: x}\ngroups:\n  g: [a, [b]]\n", "groups.g: a list of run names")):
        matrix.write_text(text)
        with pytest.raises(ValueError, match=want):
            load_matrix(matrix)


def test_matrix_errors_are_one_line_naming_the_file(tmp_path, capsys):
    from orchestrator.cli import main

    assert main(["bench", "--matrix", str(tmp_path / "missing.yaml"), "--run", "x"]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    (tmp_path / "m.yaml").write_text("runs:\n  a: {bench: --requests 1}\n")
    assert main(["bench", "--matrix", str(tmp_path / "m.yaml"), "--run", "nope"]) == 2
    assert "--run: 'nope' is neither a run nor a group" in capsys.readouterr().err
    assert main(["bench", "--matrix", str(tmp_path / "m.yaml"), "--run", ","]) == 2
    assert "names no run" in capsys.readouterr().err


def test_shipped_matrix_is_valid():
    from orchestrator.benchmark.matrix import load_matrix

    entries, groups = load_matrix(ROOT / "benchmarks" / "matrix.yaml")
    assert "traffic" in groups and all(e.timeout_s <= 600 for e in entries.values())
    for e in entries.values():  # every bench entry parses with the real argument parser
        if e.bench:
            import shlex

            from orchestrator.cli import build_parser

            build_parser().parse_args(["bench", *shlex.split(e.bench)])


def test_steady_throughput_leaves_out_the_first_round():
    from orchestrator.benchmark.loadgen import steady_throughput

    # concurrency 2: the first round's answers come late (start-up), then one answer every 0.5 s
    done = [3.0, 3.1, 3.6, 4.1, 4.6, 5.1]
    assert steady_throughput(done, 2) == round(4 / 2.0, 4)  # from the 2nd completion (3.1 s) to the last (5.1 s)
    assert steady_throughput(done[:3], 2) is None  # too short a phase
    assert steady_throughput([1.0, 1.0, 1.0, 1.0], 2) is None  # no span


def test_closed_loop_records_completion_times_in_order():
    import asyncio

    from orchestrator.benchmark.loadgen import RequestMaker, closed_loop
    from zimage_common.config import load_config

    async def send(params):
        await asyncio.sleep(0.001)
        return params

    done: list[float] = []
    maker = RequestMaker.for_workload("uniform", load_config(None), [(64, 64)], 2, seed=1)
    results, elapsed = asyncio.run(closed_loop(send, maker, 3, 7, done_at=done))
    assert len(results) == 7 and len(done) == 7 and done == sorted(done) and 0 < done[-1] <= elapsed


@pytest.mark.slow
def test_probe_step_overhead_runs_end_to_end_on_the_cpu(tmp_path, tiny_cache):
    """The lone-request layering (benchmarks/probe_step_overhead.py) with the toy model: every layer timed at every
    size, the replica's calls served, and the profile written (no CUDA: no event times)."""
    out = tmp_path / "pso.json"
    cmd = [sys.executable, "benchmarks/probe_step_overhead.py", str(out), "--tiny", "--set",
           f"model.cache_dir={tiny_cache}", "--sizes", "64x64,32x48", "--reps", "1"]
    run_ok(cmd)
    phases = json.loads(out.read_text())["phases"]
    assert list(phases) == ["64x64", "32x48"]
    for p in phases.values():
        assert list(p) == ["forward", "engine_step", "run_alone", "serve"]
        assert all(v["wall_s"] > 0 and v["device_s"] is None for v in p.values())
        assert p["serve"]["denoise_stage_s"] > 0
    assert "cProfile of run_alone" in out.with_suffix(".txt").read_text()


@pytest.mark.slow
@pytest.mark.ray
def test_step_batching_benchmark_runs_end_to_end_on_the_cpu(tmp_path, tiny_cache, ray_cluster, monkeypatch):
    """benchmarks/step_batching.py with the toy model, its main() in this process on the session's Ray (a process
    and a local Ray of its own would add about 8 s on two cores): both schedulers, every load, no failure; the mixed
    workload's lone latency per size, and each phase's mean against its own requests' sizes' lone latency."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("step_batching", ROOT / "benchmarks" / "step_batching.py")
    sb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sb)
    monkeypatch.setattr(sys, "argv", [
        "step_batching.py", "--tiny", "--set", f"model.cache_dir={tiny_cache}", "--workload", "mixed", "--out",
        str(tmp_path), "--requests", "4", "--saturation", "4", "--lone", "1", "--warmup", "1"])
    assert sb.main() == 0
    report = json.loads((tmp_path / "step_batching.json").read_text())
    mixed = report["workloads"]["mixed"]
    assert set(mixed["lone_by_size"]) == {"32x32", "64x64", "64x48", "48x80", "80x48"}
    assert all(set(v) == {"batch", "step"} and all(x > 0 for x in v.values()) for v in mixed["lone_by_size"].values())
    rows = mixed["open_loop"]
    assert [(r["scheduler"], r["load"]) for r in rows] == [(s, x) for x in (0.5, 0.8, 0.95) for s in ("batch", "step")]
    for r in rows:
        assert r["failed"] == 0 and r["requests"] == 4
        # (the report rounds each to milliseconds: the ratio of the rounded values may differ by a percent)
        assert r["mean_over_lone"] == pytest.approx(r["latency_mean_s"] / r["lone_mean_s"], rel=0.02)
        assert r["fcfs_mean_s"] > 0 and r["fcfs_expected_mean_s"] > 0 and 0 <= r["arrivals_percentile"] <= 1
    assert set(mixed["target"]["mean_at_80_over_own_lone"]) == {"batch", "step"}
    assert (tmp_path / "step_batching.png").stat().st_size > 0


def test_fcfs_reference_of_a_phases_arrivals():
    """step_batching's yardstick: a FCFS server of lone latencies on open_loop's arrivals for a seed (the same
    exponential gaps), and how those arrivals rank among other draws."""
    import importlib.util
    import random

    spec = importlib.util.spec_from_file_location("step_batching", ROOT / "benchmarks" / "step_batching.py")
    sb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sb)
    rng = random.Random(3)
    gaps = [rng.expovariate(2.0) for _ in range(3)]
    arrivals = [0.0, gaps[0], gaps[0] + gaps[1]]
    free, total = 0.0, 0.0
    for a, s in zip(arrivals, (1.0, 0.5, 0.25)):
        free = max(a, free) + s
        total += free - a
    assert sb.fcfs_mean(2.0, 3, [1.0, 0.5, 0.25]) == pytest.approx(total / 3)
    assert sb.fcfs_mean(1e-9, 0, [1.0, 2.0]) == pytest.approx(1.5)  # far apart: each its own service time
    ref = sb.fcfs_reference(0.8, 0, [1.0] * 48, draws=500)
    # 80% utilisation: expected near M/D/1's 3x in a long run, less from an empty start; seed 0 is a sparse draw
    assert 2.0 < ref["fcfs_expected_mean_s"] < 3.2 and ref["fcfs_mean_s"] < ref["fcfs_expected_mean_s"]
    assert 0 <= ref["arrivals_percentile"] < 0.2


def test_phase_ratios_against_the_uniform_phase_of_each_round():
    """--repeat: each phase's MP/s over the uniform phase's of its own round and concurrency, and the spread over
    rounds."""
    from orchestrator.benchmark.report import phase_ratios

    def run(workload, rnd, mp, conc=8):
        return {"workload": workload, "round": rnd, "concurrency": conc, "rate_rps": None, "megapixels_s": mp}

    report = {"runs": [run("uniform", 1, 1.6), run("varied", 1, 1.5), run("mixed", 1, 1.6),
                       run("uniform", 2, 1.5), run("varied", 2, 1.5), run("mixed", 2, 1.35),
                       run("uniform", 1, 0.5, conc=1), run("varied", 1, 0.45, conc=1)]}
    phase_ratios(report)
    assert [r.get("megapixels_vs_uniform") for r in report["runs"]] == [None, 0.9375, 1.0, None, 1.0, 0.9, None, 0.9]
    assert report["phase_ratios"]["varied-c8"] == {"per_round": [0.9375, 1.0], "mean": 0.9688, "min": 0.9375,
                                                   "max": 1.0}
    assert report["phase_ratios"]["varied-c1"]["per_round"] == [0.9]
    one = {"runs": [run("uniform", 1, 1.0), run("varied", 1, 0.97)]}
    phase_ratios(one)
    assert one["runs"][1]["megapixels_vs_uniform"] == 0.97 and "phase_ratios" not in one


def test_scheduling_model_runs_the_real_join_policy():
    """benchmarks/simulate_scheduling.py: a model (not a measurement) of one replica under Poisson arrivals. Alone,
    a request takes its lone latency under either scheduler; the step loop's admission is StepLoop._admit's, so a
    policy that never joins runs sets one after another and one that always joins shares every step; at 80% of
    capacity at 1024^2 no policy brings the expected mean near 1.5x the lone latency (batching gains little)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("simulate_scheduling", ROOT / "benchmarks" / "simulate_scheduling.py")
    sim = importlib.util.module_from_spec(spec)
    sys.modules["simulate_scheduling"] = sim  # its dataclasses look their module up
    spec.loader.exec_module(sim)
    model = sim.Model()
    sizes = sim.SIZES["1024"]
    sparse = sim.requests(model, sizes, 0.01, 5, 1)  # 100 s apart: each alone
    sim.step_level(model, sparse, sim.POLICIES["default"])
    assert all(abs((r.done - r.arrival) - model.lone(r)) < 1e-6 for r in sparse)
    sparse = sim.requests(model, sizes, 0.01, 5, 1)
    sim.whole_batch(model, sparse)
    assert all(abs((r.done - r.arrival) - model.lone(r)) < 1e-6 for r in sparse)
    # two requests 1 s apart: never joining runs the second after the first; always joining shares the steps
    pair = [sim.Req(0, 0.0, 1024 * 1024, 4300), sim.Req(1, 1.0, 1024 * 1024, 4300)]
    sim.step_level(model, pair, sim.POLICIES["fcfs-sets"])
    first_end = pair[0].done
    assert pair[1].done - first_end >= model.steps * model.step([4300]) - 1e-9
    pair = [sim.Req(0, 0.0, 1024 * 1024, 4300), sim.Req(1, 0.3, 1024 * 1024, 4300)]
    sim.step_level(model, pair, sim.POLICIES["join-all"])
    assert pair[1].done - pair[0].done < model.steps * model.step([4300]) / 2
    args = ["--workload", "1024", "--loads", "0.8", "--draws", "20", "--requests", "32",
            "--policies", "default,fcfs-sets,join-all"]
    report = sim.run(sim.parse_args(args))
    rows = report["workloads"]["1024"]["rows"]
    assert [r["scheduler"] for r in rows] == ["batch", "step", "step", "step"]
    assert all(r["mean_over_lone"] > 1.8 for r in rows)



def test_probe_attention_fp8_runs_on_the_cpu(tmp_path):
    """The quantized-attention probe (benchmarks/probe_attention_fp8.py) on the CPU: the bf16 SDPA rows only, and
    each GPU candidate reported as unavailable rather than failing the run."""
    out = tmp_path / "pa.json"
    run_ok([sys.executable, "benchmarks/probe_attention_fp8.py", str(out), "--tiny"])
    report = json.loads(out.read_text())
    assert [r["length"] for r in report["rows"]] == [64, 96]
    assert all(r["sdpa_ms"] > 0 and r["gflop"] > 0 for r in report["rows"])
    assert set(report["unavailable"]) == {"cudnn_fp8", "sage"}
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("probe_attention_fp8", ROOT / "benchmarks/probe_attention_fp8.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    x = torch.randn(1, 30, 64, 128).transpose(1, 2) * 3  # a strided view, as the packed layout's
    q, descale = probe.per_tensor_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and q.stride() == x.stride()  # the strides the cuDNN graph is built with
    assert float(torch.log2(descale)) == round(float(torch.log2(descale)))  # a power of two: exact to apply
    assert probe.rel_l2(q.float() * descale, x) < 0.05


def _small_report() -> dict:
    from dataclasses import asdict

    from orchestrator.benchmark.report import summarize
    from zimage_common.messages import ImageResult, StageTimes

    rs = [ImageResult(f"q{i}", True, replica_id="r0", batch_id=i, batch_size=1, latency_s=1.0, width=64, height=64,
                      stage_times=StageTimes(0.1, 0.7, 0.1, 0.9)) for i in range(4)]
    return {"card": "cpu", "commit": "abc", "config": None, "sizes": ["64x64"],
            "runs": [asdict(summarize("uniform-c1", rs, elapsed=4.0, concurrency=1))]}


def test_report_writes_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from orchestrator.benchmark.report import write_report

    write_report(_small_report(), tmp_path)
    assert json.loads((tmp_path / "bench.json").read_text())["runs"][0]["images"] == 4
    assert (tmp_path / "bench.png").stat().st_size > 1000
    assert "bench.png" in capsys.readouterr().out.splitlines()[-1]


def test_report_without_matplotlib_writes_the_json_and_names_the_extra(tmp_path, capsys, monkeypatch):
    """matplotlib is the bench extra's: without it the JSON and the table are still written, and the command says
    how to get the plot."""
    from orchestrator.benchmark.report import write_report

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # any `import matplotlib...` now fails
    write_report(_small_report(), tmp_path)
    assert json.loads((tmp_path / "bench.json").read_text())["runs"][0]["images"] == 4
    assert not (tmp_path / "bench.png").exists()
    last = capsys.readouterr().out.splitlines()[-1]
    assert "no bench.png" in last and "pip install 'zimage-orchestrator[bench]'" in last, last


def test_bench_refuses_a_bad_size_before_starting_anything(tmp_path, capsys, monkeypatch):
    """``--sizes`` is checked as a request of that size would be, before the deployment (minutes on a GPU) starts
    and before the output directory is made."""
    from orchestrator import deployment
    from orchestrator.cli import main

    monkeypatch.setattr(deployment.Deployment, "start", lambda *a, **k: pytest.fail("the deployment started"))
    for sizes, want in (("1024x1024,0x0", "--sizes 0x0: width must be between 1 and"),
                        ("1000x1000", "--sizes 1000x1000: width must be a multiple of 16 (got 1000); try 992"),
                        ("4096x4096", "--sizes 4096x4096: size 4096x4096 is 16777216 pixels; the limit is")):
        assert main(["bench", "--sizes", sizes, "--out", str(tmp_path / "out")]) == 2
        assert want in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
