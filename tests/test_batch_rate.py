"""benchmarks/batch_rate.py's comparison (pure logic): the closed loop sends the job's own lines in the job's mix of
sizes, and the job's arithmetic is read back from its output file."""

import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from batch_job_input import write_job  # noqa: E402
from batch_rate import _job_tflop, _SameMix  # noqa: E402

from orchestrator.benchmark.sizes import request_tflop  # noqa: E402


def test_the_closed_loop_sends_the_jobs_lines_in_the_jobs_mix_of_sizes(tmp_path):
    job = tmp_path / "job.jsonl"
    write_job(job, 600, "mixed")
    lines = [json.loads(t)["body"] for t in job.read_text().splitlines()]
    mix = Counter(b["size"] for b in lines)
    sent = _SameMix(job, 104, seed=0)
    got = Counter(f"{p['width']}x{p['height']}" for p in (sent.params() for _ in range(104)))
    assert sum(got.values()) == 104 and set(got) == set(mix)
    for size, n in mix.items():  # each size's share within one request of the job's
        assert abs(got[size] - 104 * n / 600) < 1
    prompts = {b["prompt"] for b in lines}
    assert all(p["prompt"] in prompts for p in (sent.params() for _ in range(104)))


def test_the_jobs_arithmetic_counts_its_finished_lines_at_their_caption_tokens(tmp_path):
    job = tmp_path / "job.jsonl"
    write_job(job, 3, "uniform", (512, 768))
    ids = [json.loads(t)["custom_id"] for t in job.read_text().splitlines()]
    usage = {"input_tokens_details": {"text_tokens": 40}}
    out = tmp_path / "output.jsonl"
    out.write_text("\n".join(json.dumps(r) for r in [
        {"custom_id": ids[0], "response": {"body": {"data": [{}, {}], "usage": usage}}, "error": None},
        {"custom_id": ids[1], "response": {"status_code": 400, "body": {"error": {"message": "no"}}}, "error": None},
        {"custom_id": ids[2], "response": {"body": {"data": [{}]}}, "error": None},
    ]) + "\n")
    assert _job_tflop(job, out, 9) == [request_tflop(512, 768, 40, 9)] * 2 + [request_tflop(512, 768, None, 9)]
