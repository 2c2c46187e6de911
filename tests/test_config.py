"""Config validation: every shipped file validates; broken ones name the file and the dotted field path."""

from pathlib import Path

import pytest

from orchestrator.cli import main as cli_main
from zimage_common.config import LOCAL_CPU_DEFAULT, Config, config_from_dict, load_config
from zimage_common.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "clusters").glob("*.yaml"))


def test_shipped_configs_exist():
    names = {p.name for p in SHIPPED}
    assert "local-cpu.yaml" in names
    assert any("dual" in n for n in names)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cli_main(["validate", str(path)]) == 0


def test_local_cpu_yaml_is_the_embedded_default():
    assert load_config(ROOT / "clusters" / "local-cpu.yaml") == load_config(None)
    assert load_config(None) == config_from_dict(LOCAL_CPU_DEFAULT)


def test_safe_defaults():
    cfg = Config()
    assert cfg.model.dtype == "bfloat16"
    assert cfg.model.low_cpu_mem_usage is True
    assert (cfg.defaults.width, cfg.defaults.height, cfg.defaults.num_inference_steps) == (1024, 1024, 9)
    assert cfg.defaults.guidance_scale == 0.0
    assert cfg.server.host == "127.0.0.1"


BAD = [
    ("router:\n  max_batch_size: 0\n", "router.max_batch_size", "greater than or equal to 1"),
    ("router:\n  max_batchsize: 4\n", "router.max_batchsize", "unknown key"),
    ("surprise: 1\n", "surprise", "unknown key"),
    ("deployment:\n  replicas: 0\n", "deployment.replicas", "got 0"),
    ("defaults:\n  width: 1000\n", "defaults.width", "multiple of 16"),
    ("deployment:\n  mode: sideways\n", "deployment.mode", "replicate"),
    ("model:\n  source: local\n", "model", "local_path"),
    ("model:\n  dtype: int8\n", "model.dtype", "bfloat16"),
    ("deployment:\n  mode: split\n  gpus_per_replica: 2\n  device_map: {text_encoder: 0, transformer: 2, vae: 1}\n",
     "deployment", "gpus_per_replica is 2"),
    ("deployment:\n  mode: split\n  gpus_per_replica: 2\n  device_map: {text_encoder: 0, unet: 1}\n",
     "deployment.device_map", "unknown component"),
    ("cluster:\n  address: auto\n  num_gpus: 2\n", "cluster", "cannot be set when joining"),
    ("defaults:\n  width: 4096\n  height: 4096\n", "(top level)", "limits.max_pixels"),
    ("router: [1, 2]\n", "router", "valid dictionary"),
    ("router:\n  scheduling: whole\n", "router.scheduling", "'batch' or 'step'"),
    ("batches:\n  max_stored_bytes: 1048576\n", "batches", "must be at least max_upload_bytes"),
    ("batches:\n  max_stored_bytes: 1000\n", "batches.max_stored_bytes", "greater than or equal to 1048576"),
    ("batches:\n  min_free_disk_bytes: -1\n", "batches.min_free_disk_bytes", "greater than or equal to 0"),
    # keys older configs carry: the error says why they went and what to do
    ("deployment:\n  pipeline_stages: true\n", "deployment.pipeline_stages",
     "removed: every replica's step loop overlaps encode, denoise and decode"),
    ("deployment:\n  max_inflight_batches: 2\n", "deployment.max_inflight_batches",
     "removed: the router keeps up to two running sets' worth"),
]


@pytest.mark.parametrize("text,path,fragment", BAD, ids=[b[1] + ":" + b[2][:12] for b in BAD])
def test_bad_config_names_file_and_field(tmp_path, text, path, fragment):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert msg.startswith(f"{f}: {path}:"), msg
    assert fragment in msg, msg


def test_yaml_syntax_error_names_line(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("router:\n  max_batch_size: [4\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: invalid YAML at line \d+"):
        load_config(f)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")


def test_validate_cli_stops_at_first_bad(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("router:\n  queue_limit: -1\n")
    good = ROOT / "clusters" / "local-cpu.yaml"
    assert cli_main(["validate", str(good), str(bad), str(good)]) == 1
    err = capsys.readouterr().err
    assert "router.queue_limit" in err and str(bad) in err


def test_validate_cli_checks_overrides(capsys):
    good = str(ROOT / "clusters" / "local-cpu.yaml")
    assert cli_main(["validate", good, "--set", "model.fp8_backend=native"]) == 0
    assert cli_main(["validate", good, "--set", "model.fp8_backend=torchao"]) == 1
    err = capsys.readouterr().err
    assert "model.fp8_backend: fp8 backend 'torchao' is no longer offered: 'native' is the only one" in err


@pytest.mark.parametrize("loras,text", [
    ([{"name": "a", "path": "/x"}, {"name": "a", "path": "/y"}], "unique; repeated: a"),
    ([{"name": "a"}], "needs path"),
    ([{"name": "a", "source": "huggingface"}], "needs model_id"),
    ([{"name": "bad name", "path": "/x"}], "model.loras.0.name"),
])
def test_lora_config_errors_name_the_field(loras, text):
    with pytest.raises(ConfigError, match=text):
        config_from_dict({"model": {"loras": loras}})


def test_lora_slots_default_from_the_configured_adapters():
    m = config_from_dict({"model": {"loras": [{"name": f"a{i}", "path": "/x"} for i in range(6)]}}).model
    assert m.lora_slots == 4
    assert config_from_dict({}).model.lora_slots == 0
    assert config_from_dict({"model": {"lora_max_resident": 2}}).model.lora_slots == 2


@pytest.mark.parametrize("value", ["varlen", "flex"])
def test_retired_attention_kernels_are_refused_by_name(value):
    with pytest.raises(ConfigError, match=rf"model.attention: .*attention '{value}' is no longer offered"):
        config_from_dict({"model": {"attention": value}})
    assert config_from_dict({"model": {"attention": "runs"}}).model.attention == "runs"


def test_compile_cpp_wrapper_needs_compile():
    with pytest.raises(ConfigError, match="compile_cpp_wrapper changes how the compiled blocks launch, but compile is "
                                          "false: set compile to true"):
        config_from_dict({"model": {"compile_cpp_wrapper": True}})
    assert config_from_dict({"model": {"compile": True, "compile_cpp_wrapper": True}}).model.compile_cpp_wrapper
