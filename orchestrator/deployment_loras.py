"""Per-request LoRA adapters of a deployment: register one at runtime on every replica (all or none), remove it,
list them, and give a restarted replica the runtime ones again. ``Deployment`` takes these methods from
``LoraAdmin``; they use its config, replicas and LoRA books."""

from __future__ import annotations

import asyncio
import logging

from zimage_common.config import LoraSpec, hub_path_problem
from zimage_common.errors import (
    ConflictError,
    ForbiddenError,
    InvalidRequestError,
    NotReadyError,
    ReplicaUnavailableError,
    ZImageError,
)

from .replicas import ReplicaHandle

log = logging.getLogger("orchestrator.deployment")


class LoraAdmin:
    # ---- per-request LoRA -------------------------------------------------------------------------------
    @property
    def lora_names(self) -> frozenset[str]:
        """The adapters requests may name (``loras``)."""
        return frozenset(self.lora_specs)

    async def register_lora(self, name: str, path: str | None = None, **spec) -> dict:
        """Load an adapter on every replica, all or none: ``path`` inside ``model.lora_dir`` on each replica's
        machine (relative to it, or absolute inside it; symlinks resolved), or ``source`` / ``model_id`` /
        ``revision`` for a hub when ``model.lora_runtime_hub`` allows it. A bad adapter is an
        ``InvalidRequestError`` naming ``path`` and the reason, and no replica keeps it; a registration the
        configuration does not allow is a ``ForbiddenError`` (403) saying which setting would; the name of a
        configured adapter (model.loras) is a ``ConflictError`` (409). Replaces a runtime adapter of the same
        name. Returns what ``loras()`` says of it."""
        m = self.config.model
        if m.lora_slots <= 0:
            raise InvalidRequestError("per-request LoRA is off in this deployment: set model.lora_max_resident "
                                      "above 0 (or configure model.loras)", param="name")
        if spec.get("source", "local") not in ("local", None) and (problem := hub_path_problem(path)):
            raise InvalidRequestError(problem, param="path")
        try:
            lora = LoraSpec(name=name, path=path, **spec)
        except (ValueError, TypeError) as e:
            message, loc = _first_error(e)
            if loc is None:  # the spec's cross-field check: name the field it found missing
                loc = "path" if (spec.get("source") or "local") == "local" and not path else \
                    "model_id" if not spec.get("model_id") and (spec.get("source") or "local") != "local" else "name"
            raise InvalidRequestError(f"invalid adapter: {message}", param=loc) from None
        if lora.name in self._configured_loras:
            raise ConflictError(f"adapter {lora.name!r} is configured (model.loras) and cannot be replaced at "
                                f"runtime; register this one under another name", param="name")
        if lora.source == "local" and m.lora_dir is None:
            raise ForbiddenError("runtime registration of adapter files is off on this deployment: the operator "
                                 "sets model.lora_dir (the directory they may be read from) to enable it; "
                                 "adapters in model.loras are loaded at start-up", param="path")
        if lora.source != "local" and not m.lora_runtime_hub:
            raise ForbiddenError(f"runtime registration of {lora.source} adapters is off on this deployment: the "
                                 f"operator enables it with model.lora_runtime_hub (or lists the adapter in "
                                 f"model.loras)", param="source")
        async with self._lora_lock:
            replacing = lora.name in self._runtime_loras
            if not replacing and len(self._runtime_loras) >= m.lora_max_runtime:
                raise ConflictError(f"{len(self._runtime_loras)} adapters are registered at runtime, the most this "
                                    f"deployment holds (model.lora_max_runtime = {m.lora_max_runtime}); remove one "
                                    f"(DELETE /v1/loras/{{name}}) first", param="name")
            handles = list(self.replicas.values())
            if not handles:
                raise NotReadyError("no replica to load the adapter on")
            outs = await asyncio.gather(*(h.call("register_lora", lora.model_dump()) for h in handles),
                                        return_exceptions=True)
            loaded = [h for h, o in zip(handles, outs) if not isinstance(o, BaseException) and o["ok"]]
            refused = [o["error"] for o in outs if not isinstance(o, BaseException) and not o["ok"]]
            bad = [(h.replica_id, o) for h, o in zip(handles, outs) if isinstance(o, BaseException)]
            if refused or not loaded:  # all or none
                # A replica that loaded the new file has replaced the old adapter of that name: it is gone there,
                # so a replacement that fails there removes the name everywhere (never some replicas with the old
                # one); where none loaded it, the old adapter stands everywhere
                dropped = replacing and bool(loaded)
                await asyncio.gather(*(h.call("unregister_lora", lora.name) for h in (handles if dropped else loaded)),
                                     return_exceptions=True)
                gone = ""
                if dropped:
                    self.lora_specs.pop(lora.name, None)
                    self._runtime_loras.discard(lora.name)
                    self._runtime_bytes.pop(lora.name, None)
                    gone = "; the adapter registered before under that name was removed (register it again)"
                if refused:
                    raise InvalidRequestError(f"adapter {lora.name!r} could not be loaded: {refused[0]}{gone}",
                                              param="path")
                raise NotReadyError(f"no replica could load adapter {lora.name!r}: {bad[0][1]}")
            nbytes = max(int((o.get("info") or {}).get("bytes", 0)) for o in outs if not isinstance(o, BaseException))
            others = sum(b for n, b in self._runtime_bytes.items() if n != lora.name)
            if others + nbytes > m.lora_max_runtime_bytes:
                await asyncio.gather(*(h.call("unregister_lora", lora.name) for h in loaded), return_exceptions=True)
                if replacing:  # the old adapter of that name was replaced on the replicas: it is gone now
                    self.lora_specs.pop(lora.name, None)
                    self._runtime_loras.discard(lora.name)
                    self._runtime_bytes.pop(lora.name, None)
                raise ConflictError(f"adapter {lora.name!r} takes {nbytes} bytes; with the {others} bytes of the "
                                    f"other runtime adapters that is over model.lora_max_runtime_bytes = "
                                    f"{m.lora_max_runtime_bytes}; remove one (DELETE /v1/loras/{{name}}) first",
                                    param="path")
            self._runtime_bytes[lora.name] = nbytes
            for rid, e in bad:  # down replicas: they get it when they come back (before_live)
                log.warning("LoRA %s: replica %s unreachable (%s); it loads the adapter when it is back", lora.name,
                            rid, e)
            self.lora_specs[lora.name] = lora
            self._runtime_loras.add(lora.name)
            log.info("LoRA %s registered on %d replica(s)", lora.name, len(loaded))
            # Under the lock: a DELETE of the same name right after would otherwise remove it before it is listed.
            return next(i for i in await self.loras() if i["name"] == lora.name)

    async def unregister_lora(self, name: str) -> bool:
        """Remove a runtime adapter from every replica; False when no adapter has that name. Requests already
        queued with it fail with a 400 naming ``loras``. A configured adapter (model.loras) is a ConflictError:
        the operator removes it from the config."""
        if name in self._configured_loras:
            raise ConflictError(f"adapter {name!r} is configured (model.loras) and cannot be removed at runtime; "
                                f"remove it from the config and restart", param="name")
        async with self._lora_lock:
            if self.lora_specs.pop(name, None) is None:
                return False
            self._runtime_loras.discard(name)
            self._runtime_bytes.pop(name, None)
            await asyncio.gather(*(h.call("unregister_lora", name) for h in self.replicas.values()),
                                 return_exceptions=True)
        log.info("LoRA %s removed", name)
        return True

    async def loras(self) -> list[dict]:
        """Every adapter: name, source, rank, modules, bytes, and per replica where it is (``gpu``: resident on
        the transformer's device, ``host``: in host memory, copied in for a batch that needs it)."""
        async def ask(h):
            try:
                return h.replica_id, await asyncio.wait_for(h.call("loras"), 30)
            except Exception as e:  # noqa: BLE001 - a replica down is reported, not raised
                log.debug("LoRA list of replica %s: %s", h.replica_id, e)
                return h.replica_id, None

        answers = await asyncio.gather(*(ask(h) for h in self.live()))
        out = []
        for name, spec in sorted(self.lora_specs.items()):
            entry = {"name": name, "source": spec.source, "path": shown_path(spec, self.config.model.lora_dir),
                     "model_id": spec.model_id,
                     "runtime": name in self._runtime_loras, "replicas": {}}
            for rid, infos in answers:
                info = next((i for i in infos or () if i["name"] == name), None)
                if info is None:
                    continue
                entry.update(rank=info["rank"], modules=info["modules"], bytes=info["bytes"])
                entry["replicas"][rid] = "gpu" if info["resident"] else "host"
            out.append(entry)
        return out

    async def _resync_loras(self, replica_id: str, handle: ReplicaHandle) -> None:
        """A restarted replica loaded only the configured adapters: give it the runtime ones again, under the
        registry's lock (a registration or removal in flight finishes first, or waits for this one)."""
        async with self._lora_lock:
            await self._resync_loras_locked(replica_id, handle)

    async def _resync_loras_locked(self, replica_id: str, handle: ReplicaHandle) -> None:
        for name in sorted(self._runtime_loras):
            spec = self.lora_specs.get(name)
            if spec is None:
                continue
            try:
                out = await handle.call("register_lora", spec.model_dump())
            except (NotReadyError, ReplicaUnavailableError):
                raise  # not back yet: the replica set asks again
            except ZImageError as e:  # one adapter must not keep a replica out of rotation
                out = {"ok": False, "error": str(e)}
            if not out["ok"]:
                log.error("replica %s: LoRA %s no longer loads after its restart: %s", replica_id, name,
                          out["error"])


def _first_error(e: ValueError) -> tuple[str, str | None]:
    """A validation error's first problem, and the field it names (pydantic's), else its text and None."""
    errors = getattr(e, "errors", None)
    if not callable(errors):
        return str(e), None
    first = errors()[0]
    if not first["loc"]:
        return first["msg"], None
    return f"{'.'.join(str(x) for x in first['loc'])}: {first['msg']}", str(first["loc"][0])


def shown_path(spec: LoraSpec, lora_dir) -> str | None:
    """An adapter's path as clients see it: relative to ``model.lora_dir`` when inside it, a hub snapshot's path
    as given, else only the file's (or directory's) name; never where the host keeps its files."""
    from pathlib import Path

    if spec.path is None or spec.source != "local":
        return spec.path
    p = Path(spec.path)
    if not p.is_absolute():
        return p.as_posix()
    if lora_dir is not None:
        for base in (Path(lora_dir).expanduser(), Path(lora_dir).expanduser().resolve()):
            if p.is_relative_to(base):
                return p.relative_to(base).as_posix()
    return p.name
