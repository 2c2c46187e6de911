"""The soak and abuse run (tests/soak.py) in its short form: a flood of slow clients, concurrent big uploads, huge
images beside small ones, adapter churn and a hostile adapter file, disconnects and a schema fuzz of generations
and edits, while a canary checks that other requests' images never change. The long form's counts are in
docs/hardening.md."""

import asyncio

import pytest


@pytest.fixture(scope="module")
def soak(tmp_path_factory):
    from soak import run

    return asyncio.run(run("short", tmp_path_factory.mktemp("soak")))


def test_slow_clients_do_not_starve_the_probe_or_flood_the_log(soak):
    f = soak["flood"]
    assert f["opened"] >= f["slow_connections"]
    assert f["healthz_failed"] == 0 and f["healthz_max_s"] < 1.0, f
    assert f["log_growth_bytes"] < 1_000_000, f


def test_uploads_in_flight_bound_the_servers_memory(soak):
    u = soak["uploads"]
    assert sum(u["statuses"].values()) == u["uploads"] and all(400 <= int(s) < 500 for s in u["statuses"]), u
    assert u["envelopes_with_request_id"] == u["uploads"]
    assert u["rss_growth_mb"] <= u["allowed_growth_mb"], u


def test_small_edits_are_not_held_behind_huge_images(soak):
    d = soak["decode"]
    assert d["small_statuses"] == {"200": 10} and d["small_max_s"] < d["phase_s"] / 2, d


def test_adapters_stop_at_the_cap_and_a_hostile_file_is_refused_fast(soak):
    a = soak["adapters"]
    assert a["registered"] == soak["param_lora_cap"] and a["first_refusal_at"] == soak["param_lora_cap"]
    assert a["refusal_statuses"] == {"409": soak["param_registrations"] - soak["param_lora_cap"]}
    assert a["churn_statuses"] == {"200": a["registered"], "201": a["registered"]}
    assert a["hostile_statuses"] == {"400 param=path": a["hostile_attempts"]} and a["hostile_max_s"] < 1.0
    assert a["hostile_attempts"] >= soak["param_hostile"]
    # The hostile file costs generations no more than any refused registration sent as often.
    assert a["generation_p99_s_during_hostile"] < max(0.1, 2 * a["generation_p99_s_beside_benign_refusals"]), a
    assert not a["listing_has_host_paths"]


def test_disconnects_are_one_info_line_and_a_499_each(soak):
    n = soak["disconnects"]["disconnects"]
    assert soak["http_responses"].get("499") == n
    assert soak["server_log"]["client_disconnected_lines"] == n


def test_fuzz_gets_no_5xx_and_every_error_in_the_envelope(soak):
    z = soak["fuzz"]
    assert z["requests"] >= soak["param_fuzz"] and z["5xx"] == 0 and z["non_envelope_errors"] == 0, z["examples_bad"]
    ran = {k.split()[0] for k, n in z["by_kind_status"].items() if k.endswith(" 200") and n}
    assert {"generations-json", "edit-multipart", "edit-json"} <= ran, z["by_kind_status"]


def test_no_canary_changed_and_nothing_failed_on_the_server(soak):
    assert soak["canary"]["rounds"] > 10 and soak["canary"]["changed"] == 0
    assert not any(s.startswith("5") for s in soak["http_responses"]), soak["http_responses"]
    assert soak["server_log"]["error_lines"] == 0 and soak["server_log"]["tracebacks"] == 0
