"""The command line and the configuration as a user meets them: files that are not configs, `--set` values, ports
that are taken, a batch run that would overwrite files it did not write, and the README's config reference against
the real fields. Nothing here starts Ray or a model: ``Deployment.start`` and ``ray_backend.connect`` are replaced
where a command would reach them."""

import json
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from orchestrator import cli, deployment, ray_backend
from zimage_common.config import Config, config_from_dict, load_config
from zimage_common.errors import ConfigError, NotReadyError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "clusters").glob("*.yaml"))
LOCAL = str(ROOT / "clusters" / "local-cpu.yaml")
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def job_lines(n: int) -> str:
    return "".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/images/generations",
                               "body": {"prompt": "x"}}) + "\n" for i in range(n))


@pytest.fixture
def no_start(monkeypatch):
    """A deployment that refuses to start (one-line error, exit 2): what a command did before it shows."""
    async def refuse(*a, **k):
        raise NotReadyError("the deployment would start here")

    monkeypatch.setattr(deployment.Deployment, "start", refuse)


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_batch_clobbers_an_existing_output_jsonl(tmp_path, capsys, no_start):
    """`--out DIR` where DIR already holds an output.jsonl but no batch.db (another tool's, a job whose batch.db was
    removed): refused before anything is written, the file kept."""
    src = tmp_path / "job.jsonl"
    src.write_text(job_lines(2))
    out = tmp_path / "results"
    out.mkdir()
    (out / "output.jsonl").write_text('{"precious": true}\n')
    code, err = run_cli(capsys, "batch", str(src), "--out", str(out))
    assert code != 0, err
    assert (out / "output.jsonl").read_text() == '{"precious": true}\n', "output.jsonl overwritten silently"


def test_batch_destroys_its_own_input_when_it_is_named_output_jsonl_in_out(tmp_path, capsys, no_start):
    """The input file is DIR/output.jsonl and --out is DIR: refused, the input kept."""
    out = tmp_path / "run"
    out.mkdir()
    src = out / "output.jsonl"
    src.write_text(job_lines(3))
    code, err = run_cli(capsys, "batch", str(src), "--out", str(out))
    assert code == 2, err
    assert src.read_text() == job_lines(3), "the input file was overwritten"


def test_serve_does_not_check_the_metrics_port_before_ray(capsys, monkeypatch):
    """`serve` checks server.metrics_host:metrics_port before Ray starts, as it checks --host/--port."""
    import socket

    def ray_would_start(_cluster):
        raise AssertionError("Ray would start before server.metrics_port was checked")

    monkeypatch.setattr(ray_backend, "connect", ray_would_start)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        code, err = run_cli(capsys, "serve", "--port", "0", "--set",
                            f"server.metrics_port={busy.getsockname()[1]}")
    assert code == 2 and "server.metrics_port" in err, (code, err)


def test_serve_with_a_busy_metrics_port_prints_a_traceback_and_exits_3(tmp_path):
    """The same as a user sees it (Ray's start skipped): one line naming server.metrics_port, no traceback."""
    import socket

    code = ("import sys; from orchestrator import cli, ray_backend; ray_backend.connect = lambda c: None; "
            "sys.exit(cli.main(sys.argv[1:]))")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        p = subprocess.run([sys.executable, "-c", code, "serve", "--port", "0", "--set",
                            f"server.metrics_port={busy.getsockname()[1]}"],
                           capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=120)
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.returncode == 2 and "server.metrics_port" in p.stderr, (p.returncode, p.stderr[-2000:])


def test_metrics_port_equal_to_the_api_port_is_accepted():
    """server.metrics_port == server.port is refused by the config, not found when `serve` binds."""
    with pytest.raises(ConfigError, match="metrics_port"):
        config_from_dict({"server": {"port": 8000, "metrics_port": 8000}})


def test_validate_passes_a_local_config_that_plan_refuses(capsys):
    """cluster.num_gpus is a declared inventory for `plan` (and for the local Ray that start-up makes), and
    `validate` plans with it too: it never says ok where `plan` and start-up fail."""
    assert cli.main(["plan", LOCAL, "--json", "--set", "deployment.replicas=5"]) == 1
    assert "only 2 replica(s) fit" in capsys.readouterr().err
    assert cli.main(["validate", LOCAL, "--set", "deployment.replicas=5"]) == 1, "validate said ok"


def test_a_repeated_key_silently_drops_the_first_section(tmp_path):
    """Two `router:` sections: PyYAML would keep the last and drop max_batch_size: 4 without a word; the loader
    refuses a repeated key, naming it and its lines."""
    f = tmp_path / "dup.yaml"
    f.write_text("router:\n  max_batch_size: 4\nserver:\n  port: 9000\nrouter:\n  queue_limit: 10\n")
    try:
        cfg = load_config(f)
    except ConfigError as e:
        assert "router" in str(e)
        return
    pytest.fail(f"loaded with router.max_batch_size={cfg.router.max_batch_size} (the file says 4)")


def test_an_empty_section_is_refused_while_an_empty_file_is_the_defaults(tmp_path):
    """`router:` with its keys commented out is None: it means that section's defaults, as an empty file means
    every default (it was refused, naming a class the user never wrote)."""
    assert load_config(_write(tmp_path / "empty.yaml", "")) == Config()
    f = _write(tmp_path / "commented.yaml", "router:\n#  max_batch_size: 4\n")
    assert load_config(f) == Config()


def _fields(model, prefix=""):
    for name, f in model.model_fields.items():
        yield prefix + name
        for t in (f.annotation, *typing.get_args(f.annotation)):
            for u in (t, *typing.get_args(t)):
                if isinstance(u, type) and issubclass(u, BaseModel):
                    yield from _fields(u, f"{prefix}{name}.")


def _readme_fields() -> dict[str, str]:
    """Field path -> the row that documents it, from README.md's configuration reference table. Names in a row
    after the first without a section inherit the first one's (`cluster.wait_for_gpus`, `wait_timeout_s`)."""
    text = (ROOT / "README.md").read_text()
    table = text.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    out = {}
    for row in (line for line in table.splitlines() if line.startswith("| `")):
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        names = [n.strip() for tick in re.findall(r"`([^`]+)`", cells[0]) for n in tick.split("/")]
        prefix = names[0].rsplit(".", 1)[0]
        for n in names:
            out[n if n.split(".")[0] in Config.model_fields else f"{prefix}.{n}"] = row
    return out


def test_readme_leaves_config_fields_undocumented():
    documented = _readme_fields()
    real = set(_fields(Config))
    assert not set(documented) - real, f"documented but no such field: {sorted(set(documented) - real)}"
    # Sections and the sub-fields of list items and sub-sections are documented in their parent's row.
    missing = sorted(p for p in real - set(documented) if p.count(".") == 1 and p not in
                     ("frontdoor.idempotency", "outputs.s3"))
    assert not missing, f"fields with no row in README.md's configuration reference: {missing}"


def test_readme_controlnet_row_leaves_out_revision():
    row = _readme_fields()["model.controlnet"]
    assert "revision" in row, row


@pytest.mark.parametrize("field,raw", [
    ("model.revision", "0123"),         # YAML 1.1 octal: becomes 83, and the error says "got 83"
    ("server.metrics_host", "::"),      # the IPv6 wildcard: becomes {':': None}, error shows no value at all
    ("frontdoor.name", "12:30"),        # sexagesimal: becomes 750
    ("server.served_model_name", "1.0"),
])
def test_set_on_a_string_field_loses_what_was_typed(field, raw):
    """`--set` parses the value as YAML, but a text field keeps what was typed (a revision 0123 is not 83, a time
    12:30 is not 750)."""
    try:
        cfg = load_config(LOCAL, [f"{field}={raw}"])
    except ConfigError as e:
        msg = str(e)
        assert repr(raw) in msg and "quote" in msg, msg
        return
    section, name = field.split(".")
    assert getattr(getattr(cfg, section), name) == raw


@pytest.mark.parametrize("item,secret", [
    ("server.api_keys=[sk-live-123", "sk-live-123"),
    ("outputs.signing_secret=@abcdefghijklmnopq", "abcdefghijklmnopq"),
])
def test_a_set_value_that_is_not_yaml_echoes_the_secret(item, secret):
    """Rejected values of secret fields are never echoed (config.SECRET_FIELDS), by --set's YAML error either."""
    with pytest.raises(ConfigError) as e:
        load_config(LOCAL, [item])
    assert secret not in str(e.value), str(e.value)


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize("name,content,fragment", [
    ("list.yaml", "- a\n- b\n", "the top level must be a mapping of sections, got list"),
    ("scalar.yaml", "hello\n", "the top level must be a mapping of sections, got str"),
    ("syntax.yaml", "router:\n  max_batch_size: [4\n", "invalid YAML at line 3"),
    ("two-docs.yaml", "router:\n  max_batch_size: 4\n---\nserver:\n  port: 9000\n",
     "invalid YAML at line 3, column 1: expected a single document in the stream; but found another document (a "
     "config is one YAML document: remove the '---' and merge the sections)"),
    ("binary.yaml", b"\xff\xfe\x00bad", "not a UTF-8 text file"),
    ("adir", None, "cannot read config file: Is a directory"),
    ("missing.yaml", "", "cannot read config file: No such file or directory"),
    ("wrongtype.yaml", "router:\n  max_batch_size: lots\n", "router.max_batch_size: Input should be a valid integer"),
    ("nullvalue.yaml", "server:\n  port: null\n", "server.port: Input should be a valid integer (got None)"),
])
def test_bad_config_files_are_one_line_naming_the_file(tmp_path, capsys, name, content, fragment):
    path = tmp_path / name
    if name == "adir":
        path.mkdir()
    elif name != "missing.yaml":
        _write(path, content)
    code, err = run_cli(capsys, "plan", str(path))
    assert code == 2 and "Traceback" not in err, (code, err)
    assert err.strip() == err.strip().splitlines()[0] and err.startswith(f"error: {path}: ") and fragment in err, err
    code, err = run_cli(capsys, "validate", str(path))
    assert code == 1 and err.startswith(f"INVALID {path}: ") and fragment in err, err


@pytest.mark.parametrize("item,fragment", [
    ("router.max_batch_size", "expected dotted.path=value"),
    ("=5", "expected dotted.path=value"),
    ("router.max_batch_size.x=1", "max_batch_size is not a section"),
    ("model.model_id=[", "the value is not valid YAML"),
    ("nosuch.field=1", "nosuch: unknown key"),
    ("router.max_batch_size=abc", "router.max_batch_size: Input should be a valid integer"),
    ("router.max_batch_size=null", "(got None)"),
])
def test_bad_set_items_are_one_line(capsys, item, fragment):
    code, err = run_cli(capsys, "plan", LOCAL, "--set", item)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1 and fragment in err, err


def test_set_parses_yaml_scalars():
    for raw in ("true", "yes", "on", "1"):
        assert load_config(LOCAL, [f"model.compile={raw}"]).model.compile is True
    assert load_config(LOCAL, ["model.revision=null"]).model.revision is None
    cfg = load_config(LOCAL, ['server.api_keys=["k1", "k2"]', "deployment.mode=split", "deployment.replicas=1",
                              "deployment.gpus_per_replica=2",
                              'deployment.device_map={"text_encoder": 0, "transformer": 1, "vae": 1}'])
    assert cfg.server.api_keys == ["k1", "k2"] and cfg.deployment.device_map["transformer"] == 1
    assert load_config(None, ["router.max_batch_size=8"]).router.max_batch_size == 8


def test_listeners_bind_loopback_by_default():
    for cfg in (Config(), load_config(None), *(load_config(p) for p in SHIPPED)):
        assert cfg.server.host == "127.0.0.1" and cfg.server.metrics_host == "127.0.0.1"
        assert cfg.server.metrics_port is None
    assert "include_dashboard=False" in (ROOT / "orchestrator" / "ray_backend.py").read_text()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_validate_and_plan(path, capsys):
    assert cli.main(["validate", str(path)]) == 0
    assert cli.main(["plan", str(path), "--json"]) == 0


# What README.md's configuration reference says, read by hand, against the code's defaults.
README_DEFAULTS = {
    "cluster.address": None, "cluster.num_cpus": None, "cluster.num_gpus": None, "cluster.nodes": None,
    "cluster.wait_for_gpus": None, "cluster.wait_timeout_s": 900,
    "model.source": "modelscope", "model.model_id": "Tongyi-MAI/Z-Image-Turbo", "model.dtype": "bfloat16",
    "model.low_cpu_mem_usage": True, "model.attention": "runs", "model.lora_max_rank": 64, "model.lora_dir": None,
    "model.lora_runtime_hub": False, "model.compile": False, "model.compile_cpp_wrapper": False,
    "model.quantization": "none", "model.fp8_backend": "native", "model.fp8_bf16_blocks": [],
    "model.text_encoder_quantization": "none", "model.text_encoder_graphs": True, "model.controlnet": None,
    "model.lora_max_runtime": 16, "model.lora_max_runtime_bytes": 4 * 1024**3,
    "model.lora_max_file_bytes": 2 * 1024**3,
    "deployment.mode": "replicate", "deployment.replicas": None, "deployment.gpus_per_replica": 1,
    "deployment.device_map": None, "deployment.cpu_per_replica": 1, "deployment.torch_threads": None,
    "deployment.warmup": True, "deployment.start_timeout_s": 1800,
    "deployment.warmup_sizes": ["512x512", "1024x1024", "768x1344", "1344x768", "1024x768"],
    "deployment.gpu_memory_limit_gib": None, "deployment.health_interval_s": 15, "deployment.health_timeout_s": 60,
    "deployment.health_failures_before_restart": 3, "deployment.unresponsive_after_s": 10,
    "router.max_batch_size": 16, "router.max_batch_tokens": 18432, "router.max_wait_ms": 10,
    "router.queue_limit": 256, "router.request_timeout_s": 600, "router.max_attempts": 3, "router.hang_factor": 5,
    "router.hang_min_s": 180, "router.first_batch_timeout_s": 900, "router.scheduling": "step",
    "router.step_free_tokens": 4096, "router.step_join_window": 1, "router.step_short_ratio": 0.5,
    "defaults.width": 1024, "defaults.height": 1024, "defaults.num_inference_steps": 9,
    "defaults.guidance_scale": 0.0, "defaults.negative_prompt": None,
    "defaults.quality_steps": {"low": 4, "medium": 6, "high": 9}, "defaults.strength": 0.6,
    "defaults.inpaint_strength": 1.0,
    "limits.max_prompt_chars": 4000, "limits.max_n": 8, "limits.max_pixels": 2048**2, "limits.max_steps": 50,
    "limits.max_body_bytes": 1_000_000, "limits.max_upload_bytes": 64 * 1024**2,
    "limits.max_image_bytes": 50_000_000, "limits.max_input_pixels": 40_000_000,
    "limits.max_request_input_pixels": 100_000_000, "limits.max_concurrent_image_decodes": 2,
    "limits.decode_pixel_budget": 64_000_000, "limits.decode_wait_s": 10,
    "limits.max_inflight_upload_bytes": 256 * 1024**2, "limits.upload_wait_s": 10,
    "server.host": "127.0.0.1", "server.port": 8000, "server.api_keys": [], "server.metrics_port": None,
    "server.metrics_host": "127.0.0.1", "server.max_connections": 32768, "server.fd_reserve": 512,
    "server.header_timeout_s": 10, "server.body_idle_timeout_s": 30, "server.body_timeout_s": 300,
    "server.keep_alive_s": 5, "server.backlog": 2048, "server.served_model_name": "z-image-turbo",
    "server.drain_timeout_s": 600, "server.docs": False,
    "outputs.backend": "local", "outputs.directory": Path("zimage-data/outputs"), "outputs.url_ttl_s": 3600,
    "outputs.public_base_url": None, "outputs.signing_secret": None, "outputs.s3": None,
    "batches.directory": Path("zimage-data/batches"), "batches.max_lines": 50_000,
    "batches.cli_max_lines": 1_000_000, "batches.max_upload_bytes": 200 * 1024**2,
    "batches.max_stored_bytes": 10 * 1024**3, "batches.min_free_disk_bytes": 1024**3, "batches.max_inflight": None,
    "batches.reserve_replicas": 1, "batches.reserve_batch_size": 1, "batches.reserve_s": 10,
    "frontdoor.pool": None, "frontdoor.name": None, "frontdoor.encode_on_replica": True,
    "frontdoor.replica_encode_threads": 2, "frontdoor.max_frontdoors": 8,
    "frontdoor.idempotency.ttl_s": 3600, "frontdoor.idempotency.max_entries": 10_000,
    "frontdoor.idempotency.max_bytes": 512 * 1024**2, "frontdoor.idempotency.claim_lease_s": 900,
}


def test_readme_defaults_are_the_code_defaults():
    cfg = Config()
    for path, want in README_DEFAULTS.items():
        value = cfg
        for part in path.split("."):
            value = getattr(value, part)
        assert value == want, (path, value, want)
    assert set(README_DEFAULTS) - {"outputs.s3"} <= set(_readme_fields())  # outputs.s3.bucket/... has a row


def test_help_imports_no_heavy_library():
    code = ("import sys\nfrom orchestrator.cli import main\n"
            "for cmd in ([], ['demo'], ['generate'], ['validate'], ['plan'], ['serve'], ['bench'], ['batch'], "
            "['pool']):\n"
            "    try:\n        main([*cmd, '--help'])\n    except SystemExit as e:\n        assert e.code == 0, cmd\n"
            "heavy = sorted(m for m in ('torch', 'ray', 'diffusers', 'transformers', 'uvicorn', 'fastapi') "
            "if m in sys.modules)\nprint('HEAVY', heavy)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "HEAVY []" in p.stdout, p.stdout[-500:]


def test_batch_input_errors_are_one_line(tmp_path, capsys, no_start):
    cases = {
        "missing.jsonl": (None, "cannot read"),
        "empty.jsonl": ("", "holds no requests"),
        "blank.jsonl": ("\n\n", "holds no requests"),
        "notjson.jsonl": ("not json\n", "line 1: is not valid JSON"),
        "binary.jsonl": (b"\xff\xfe\x00\x01", "line 1: is not UTF-8 text"),
        "array.jsonl": ("[1, 2]\n", "line 1: must be a JSON object"),
    }
    for name, (content, fragment) in cases.items():
        if content is not None:
            _write(tmp_path / name, content)
        code, err = run_cli(capsys, "batch", str(tmp_path / name), "--out", str(tmp_path / f"out-{name}"))
        assert code == 2 and "Traceback" not in err and fragment in err and name in err, (name, err)
    # an --out in directories that do not exist yet is made, parents and all
    _write(tmp_path / "good.jsonl", job_lines(1))
    code, err = run_cli(capsys, "batch", str(tmp_path / "good.jsonl"), "--out", str(tmp_path / "a" / "b" / "c"))
    assert code == 2 and "the deployment would start here" in err
    assert (tmp_path / "a" / "b" / "c" / "images").is_dir()


def test_yaml_merge_keys_still_work_and_a_key_repeated_on_one_line_is_refused(tmp_path):
    f = _write(tmp_path / "anchor.yaml", "router: &r {max_batch_size: 4}\n")
    assert load_config(f).router.max_batch_size == 4
    f = _write(tmp_path / "anchors.yaml", "x-common: &c {max_batch_size: 2}\n")
    with pytest.raises(ConfigError, match="x-common"):  # anchors parse; the unknown section is still refused
        load_config(f)
    import yaml

    from zimage_common.config_text import UniqueKeyLoader

    assert yaml.load("x: &A {k: 1}\ny:\n  <<: *A\n  z: 2\n", Loader=UniqueKeyLoader) == \
        {"x": {"k": 1}, "y": {"k": 1, "z": 2}}
    with pytest.raises(ConfigError, match="'max_batch_size' appears twice"):
        load_config(_write(tmp_path / "flow.yaml", "router: {max_batch_size: 2, max_batch_size: 8}\n"))
