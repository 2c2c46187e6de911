"""Hostile and odd inputs to the Files and Batch APIs on fake replicas: every one a 4xx in the error envelope naming
the field (never a 500), and the service serving on."""

import httpx
import pytest
from batch_fakes import TimedBackend
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_batches_http import GEN, jsonl, req, serve, upload

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=6)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    with serve(tmp, TimedBackend(2)) as s:
        s.wait_ready(timeout_s=30)
        s.fid = upload(s, jsonl(req("a", prompt="x"))).json()["id"]
        yield s


def create(s, **body):
    return httpx.post(f"{s.url}/v1/batches", json={"input_file_id": s.fid, "endpoint": GEN,
                                                   "completion_window": "24h", **body}, timeout=30)


@pytest.mark.parametrize("window", [[], {}, {"24h": 1}, ["24h"]])
def test_a_completion_window_that_is_a_list_or_object_is_a_400(server, window):
    r = create(server, completion_window=window)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "completion_window", r.text


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after"]),
       value=JSON)
def test_any_json_in_a_create_field_is_answered_never_a_500(server, field, value):
    r = create(server, **{field: value})
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert r.json()["error"]["param"] == field, r.text
