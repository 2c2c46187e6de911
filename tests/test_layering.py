"""Dependency direction, checked on the source: the shared vocabulary (``zimage_common/``: config, messages,
errors, logging, prompts) imports neither side nor Ray or torch; actors/ imports nothing from orchestrator/; and
orchestrator/ reaches actors/ only through ray_backend (and the benchmark's plain-diffusers baseline)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REACHES_ACTORS = {"ray_backend.py", "benchmark/run.py"}


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_actors_import_nothing_from_the_driver():
    for f in (ROOT / "actors").glob("*.py"):
        up = {m for m in imports(f) if m.split(".")[0] == "orchestrator"}
        assert not up, (f.name, up)


def test_the_shared_vocabulary_imports_neither_side_nor_ray_or_torch():
    files = list((ROOT / "zimage_common").glob("*.py"))
    assert {f.stem for f in files} >= {"config", "messages", "errors", "logging_setup", "prompts"}
    for f in files:
        used = {m.split(".")[0] for m in imports(f)}
        assert not used & {"orchestrator", "actors", "ray", "torch"}, (f.name, used)


def test_orchestrator_reaches_actors_only_through_ray_backend():
    for f in (ROOT / "orchestrator").rglob("*.py"):  # the benchmark subpackage's modules too
        if any(m.startswith("actors") for m in imports(f)):
            name = f.relative_to(ROOT / "orchestrator").as_posix()
            assert name in REACHES_ACTORS, name


def test_server_imports_no_benchmark_tooling():
    """The server's runtime needs neither matplotlib (the bench extra) nor the benchmark package. In a fresh
    interpreter, so modules other tests imported cannot hide an import."""
    import subprocess
    import sys

    code = ("import sys, orchestrator.server, orchestrator.deployment; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib' "
            "or m.startswith('orchestrator.benchmark')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout


def test_no_product_module_is_over_600_lines():
    """Each file has one job; one that grows past 600 lines is doing two (split it by job, not by line)."""
    long = {f.relative_to(ROOT).as_posix(): n for d in ("orchestrator", "actors", "placement", "zimage_common")
            for f in (ROOT / d).rglob("*.py") if (n := len(f.read_text().splitlines())) > 600}
    assert not long, long
