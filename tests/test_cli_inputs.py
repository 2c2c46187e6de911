"""``zimage-orch`` refuses bad input with one line naming the option or field, exit 2, before any deployment starts
(on a GPU that is minutes of model loading): no traceback, nothing started, nothing written."""

import pytest
from PIL import Image

from orchestrator import cli, deployment

GOOD_LINE = '{"custom_id": "a", "method": "POST", "url": "/v1/images/generations", "body": {"prompt": "x"}}\n'


@pytest.fixture
def no_start(monkeypatch):
    async def never(*a, **k):
        raise AssertionError("a deployment started")

    monkeypatch.setattr(deployment.Deployment, "start", never)


def refused(capsys, *argv: str) -> str:
    """The one error line ``argv`` is refused with (exit 2, from the command or from argparse)."""
    try:
        code = cli.main(list(argv))
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2, (code, err)
    assert "Traceback" not in err
    return err.splitlines()[-1]


def test_config_and_overrides(tmp_path, capsys, no_start):
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xfe\xff\x00 not text")
    assert refused(capsys, "plan", str(binary)) == f"error: {binary}: not a UTF-8 text file; a config is YAML text"
    line = refused(capsys, "demo", "--set", "model.model_id=[")
    assert "--set 'model.model_id=[': the value is not valid YAML" in line and "quote it" in line


def test_output_directories(tmp_path, capsys, no_start):
    afile = tmp_path / "afile"
    afile.write_text("")
    want = f"error: --out {afile}: exists and is not a directory"
    assert refused(capsys, "demo", "--out", str(afile)) == want
    assert refused(capsys, "generate", "--prompt", "x", "--out", str(afile)) == want
    assert refused(capsys, "bench", "--requests", "1", "--out", str(afile)) == want
    src = tmp_path / "in.jsonl"
    src.write_text(GOOD_LINE)
    assert refused(capsys, "batch", str(src), "--out", str(afile)) == want
    assert refused(capsys, "batch", str(src), "--out", str(tmp_path / "o"), "--state", str(afile)).startswith(
        f"error: --state {afile}")
    assert "name the bucket" in refused(capsys, "batch", str(src), "--out", "s3://")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "batch.db").write_text("not a database")
    assert "batch.db is not a job's state" in refused(capsys, "batch", str(src), "--out", str(corrupt))


@pytest.mark.parametrize("argv, want", [
    (["demo", "--images", "0"], "argument --images: must be at least 1, got 0"),
    (["generate", "--prompt", "x", "--n", "0", "--out", "o"], "argument --n: must be at least 1"),
    (["generate", "--prompt", "x", "--steps", "-1", "--out", "o"], "argument --steps: must be at least 1"),
    (["serve", "--port", "70000"], "argument --port: must be a port from 0 to 65535"),
    (["bench", "--concurrency", "1,"], "argument --concurrency: '1,': comma-separated integers"),
    (["bench", "--concurrency", "abc"], "argument --concurrency: 'abc' is not an integer"),
    (["bench", "--rate", "-1"], "argument --rate: must be a number above 0"),
    (["bench", "--baseline-requests", "0"], "argument --baseline-requests: must be at least 1"),
    (["batch", "in.jsonl", "--out", "o", "--window", "0"], "argument --window: must be at least 1"),
])
def test_numbers_out_of_range(argv, want, capsys, no_start):
    assert want in refused(capsys, *argv)


def test_generate_checks_its_requests_before_starting(tmp_path, capsys, no_start):
    out = str(tmp_path / "out")
    picture = tmp_path / "p.png"
    Image.new("RGB", (64, 64)).save(picture)
    cases = [
        (["--size", "100x100"], "width must be a multiple of 16"),
        (["--guidance", "-1"], "guidance_scale must be between 0 and 20"),
        (["--control-scale", "2"], "--control-scale needs --control-image"),
        (["--strength", "0.5"], "--strength needs --image"),
        (["--control-image", str(picture)], "this deployment has no ControlNet"),
        (["--image", str(picture), "--strength", "2"], "strength must be a number from 0 to 1"),
        (["--image", str(picture), "--mask", str(picture)], "mask has no alpha channel"),
    ]
    for args, want in cases:
        assert want in refused(capsys, "generate", "--prompt", "x", "--out", out, *args), args


def test_bench_options_that_need_a_matrix_or_a_server(tmp_path, capsys, no_start):
    assert refused(capsys, "bench", "--run", "x", "--dry-run") == "error: --run, --dry-run: only with --matrix FILE"
    assert "--workload: unknown ['bogus']" in refused(capsys, "bench", "--workload", "bogus", "--out",
                                                     str(tmp_path / "b"))


def test_errors_after_the_start_are_one_line(tmp_path, capsys, monkeypatch):
    """What only the cluster can tell (nothing fits it; no Ray at cluster.address) is one line too."""
    from placement.planner import PlacementError

    async def no_fit(*a, **k):
        raise PlacementError("deployment.replicas = 5 but only 2 replica(s) fit")

    monkeypatch.setattr(deployment.Deployment, "start", no_fit)
    assert refused(capsys, "demo", "--out", str(tmp_path / "d")) == (
        "error: deployment.replicas = 5 but only 2 replica(s) fit")

    import ray

    from orchestrator import ray_backend
    from zimage_common.config import ClusterConfig
    from zimage_common.errors import NotReadyError

    def no_cluster(*a, **k):
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_cluster)
    with pytest.raises(NotReadyError, match="cluster.address='auto': no Ray cluster to join .* 'ray start --head'"):
        ray_backend.connect(ClusterConfig(address="auto"))

    # a host:port nobody listens on is refused at once, before Ray retries it for a minute
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray asked to join an address nobody answers"))
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(NotReadyError, match=f"cluster.address='{address}': nothing answers at 127.0.0.1:{port} "
                                                r"\(.*\); start a head there"):
            ray_backend.connect(ClusterConfig(address=address))
    with socket.socket() as s:  # one that answers goes on to Ray
        s.bind(("127.0.0.1", 0))
        s.listen()
        ray_backend.check_reachable(f"127.0.0.1:{s.getsockname()[1]}")
    if socket.has_ipv6:
        try:
            with socket.socket(socket.AF_INET6) as s:
                s.bind(("::1", 0))
                s.listen()
                ray_backend.check_reachable(f"[::1]:{s.getsockname()[1]}")  # bracketed IPv6 with its port
        except OSError as e:
            if "Cannot assign" not in str(e) and "not available" not in str(e):
                raise
    for no_port in ("auto", "::1", "fe80::1", "headnode", "ray://headnode"):
        ray_backend.check_reachable(no_port)  # left to Ray: nothing to check without a port
    with pytest.raises(NotReadyError, match="the host no-such-host.invalid does not resolve"):
        ray_backend.check_reachable("no-such-host.invalid:6379")


def test_serve_checks_its_address_before_starting(capsys, monkeypatch):
    """A port in use or a host that does not resolve, before Ray starts; the error names where the value came from
    (the flag, or the config field)."""
    import socket

    from orchestrator import ray_backend

    monkeypatch.setattr(ray_backend, "connect", lambda *a: pytest.fail("Ray started"))
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        by_flag = refused(capsys, "serve", "--port", str(port))
        by_config = refused(capsys, "serve", "--set", f"server.port={port}")
    assert by_flag.startswith(f"error: server.host/--port 127.0.0.1:{port}: cannot listen there")
    assert by_config.startswith(f"error: server.host/server.port 127.0.0.1:{port}: cannot listen there")
    assert "give an address of this machine" in refused(capsys, "serve", "--host", "no-such-host.invalid")


def test_bf16_blocks_that_do_not_exist_are_refused_by_validate_and_plan(capsys, no_start):
    cfg = "clusters/dual-4090d-replicate.yaml"
    for blocks, want in (("[0,99]", "block(s) [99] do not exist; this model has 30 main blocks (0-29)"),
                         ("last:99", "'last:99' keeps more main blocks in bf16 than the 30 this model has")):
        over = ["--set", f"model.fp8_bf16_blocks={blocks}", "--set", "model.quantization=fp8"]
        assert cli.main(["validate", cfg, *over]) == 1
        assert f"INVALID {cfg}: model.fp8_bf16_blocks: {want}" in capsys.readouterr().err
        assert refused(capsys, "plan", cfg, *over) == f"error: model.fp8_bf16_blocks: {want}"
    assert cli.main(["validate", cfg, "--set", "model.fp8_bf16_blocks=[0,29]", "--set", "model.quantization=fp8"]) == 0
    # the toy model's 2 blocks, with no declared inventory (validate plans nothing), and before a demo starts
    over = ["--set", "model.quantization=fp8", "--set", "model.fp8_bf16_blocks=[0,2]"]
    assert cli.main(["validate", "clusters/local-cpu.yaml", *over]) == 1
    assert "block(s) [2] do not exist; this model has 2 main blocks (0-1)" in capsys.readouterr().err
    assert "block(s) [2] do not exist" in refused(capsys, "demo", *over)


def test_bench_defaults_and_an_unreachable_server(tmp_path, capsys, no_start):
    assert cli.build_parser().parse_args(["bench"]).concurrency == [1, 4]  # argparse types its string default too
    line = refused(capsys, "bench", "--http", "http://127.0.0.1:9", "--requests", "1", "--warmup", "0",
                   "--out", str(tmp_path / "b"))
    assert line.startswith("error: --http http://127.0.0.1:9: ConnectError")
    assert refused(capsys, "bench", "--workload", "bogus", "--out", str(tmp_path / "w")).startswith(
        "error: --workload: unknown ['bogus']")
    assert not (tmp_path / "w").exists()  # refused before the output directory is made


def test_a_negative_prompt_without_guidance_is_pointed_out(tmp_path, caplog, monkeypatch):
    async def stop(*a, **k):
        raise SystemExit(0)  # the checks passed and the deployment would start here

    monkeypatch.setattr(deployment.Deployment, "start", stop)
    with pytest.raises(SystemExit):
        cli.main(["generate", "--prompt", "x", "--negative-prompt", "blurry", "--out", str(tmp_path / "g")])
    assert "--negative-prompt has no effect at guidance 0" in caplog.text


def test_a_locked_batch_state_is_not_called_corrupt(tmp_path, capsys, no_start, monkeypatch):
    import functools
    import sqlite3

    src, out = tmp_path / "in.jsonl", tmp_path / "out"
    src.write_text(GOOD_LINE)
    out.mkdir()
    holder = sqlite3.connect(out / "batch.db")
    holder.execute("BEGIN EXCLUSIVE")  # what a second run of the same job sees while the first one runs
    # the run's connection waits 0.2 s for the lock, not sqlite's default 5 s: it is held throughout either way
    monkeypatch.setattr(sqlite3, "connect", functools.partial(sqlite3.connect, timeout=0.2))
    try:
        line = refused(capsys, "batch", str(src), "--out", str(out))
    finally:
        holder.close()
    assert "is another run using this --state?" in line and "not a job's state" not in line
