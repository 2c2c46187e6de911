"""Dependency direction, checked on the source: actors/ uses only orchestrator's pure shared modules, and
orchestrator/ reaches actors/ only through ray_backend (and the benchmark's plain-diffusers baseline)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ACTORS_MAY_USE = {"orchestrator.messages", "orchestrator.prompts", "orchestrator.errors", "orchestrator.config",
                  "orchestrator.logging_setup"}
REACHES_ACTORS = {"ray_backend.py", "bench.py"}


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_actors_use_only_the_shared_orchestrator_modules():
    for f in (ROOT / "actors").glob("*.py"):
        used = {m for m in imports(f) if m.startswith("orchestrator")}
        assert used <= ACTORS_MAY_USE, (f.name, used - ACTORS_MAY_USE)


def test_orchestrator_reaches_actors_only_through_ray_backend():
    for f in (ROOT / "orchestrator").glob("*.py"):
        if any(m.startswith("actors") for m in imports(f)):
            assert f.name in REACHES_ACTORS, f.name


def test_shared_modules_do_not_import_ray_or_torch():
    for name in ACTORS_MAY_USE:
        f = ROOT / (name.replace(".", "/") + ".py")
        heavy = {m for m in imports(f) if m.split(".")[0] in ("ray", "torch")}
        assert not heavy, (f.name, heavy)
