"""Per-request LoRA: adapters kept as low-rank factors (never merged into the base weights), applied per sample
inside one packed transformer call.

Reading: whatever diffusers' Z-Image LoRA loader accepts (0.42.1, ``ZImageLoraLoaderMixin.lora_state_dict``: its PEFT
layout, and the kohya, ai-toolkit/ComfyUI, PEFT ``default.`` and dotted layouts its
``_convert_non_diffusers_z_image_lora_to_diffusers`` converts; we call that function), turned into per-module factors
with each module's PEFT scale (``lora_alpha / r``, ``rank_pattern``, ``alpha_pattern``, rsLoRA, as
``peft.tuners.lora.LoraLayer.update_layer``) folded into ``B``: ``W_eff = W + scale * B @ A``, what diffusers computes
after ``load_lora_weights`` + ``fuse_lora``.

Applying (``actors/packed.py``): the blocks' linears (q/k/v/out, w1/w2/w3, adaLN modulation) take a term per token
row. A batch's adapters are stacked along the rank (``A_cat [R, in]``, ``B_cat [out, R]``), and ``S [samples, R]``
holds each sample's scale for each adapter's columns: ``delta = ((x @ A_cat^T) * S[seg]) @ B_cat^T``, two thin
memory-bound matmuls over all rows and one graph for any adapter set (``R`` is dynamic; ranks are padded to
``RANK_MULTIPLE``). q/k/v share one ``A`` matmul, as do w1/w3.

Residency: an adapter is read and converted once, at registration, and kept on the CPU; at most ``max_resident``
stay on the transformer's device (LRU); a batch naming one that is not is copied in first (no file read), and a
batch with more distinct adapters than that holds them all for that batch only."""

from __future__ import annotations

import itertools
import logging
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

log = logging.getLogger(__name__)

BLOCK_GROUPS = ("layers", "noise_refiner", "context_refiner")
# The linears of a block that take a per-row LoRA term, in the order of ``BlockLora.factors``.
BLOCK_MODULES = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0")
RANK_MULTIPLE = 8
_MODULE_RE = re.compile(r"^(?P<block>(?:" + "|".join(BLOCK_GROUPS) + r")\.\d+)\.(?P<module>.+)$")


class LoraError(ValueError):
    """An adapter that cannot be used with this model (its message says why and what to do)."""


class AdapterGone(LoraError):
    """A running request names adapters that were unregistered (DELETE /v1/loras) after it was screened."""

    def __init__(self, names):
        self.names = frozenset(names)
        super().__init__(f"LoRA adapter(s) not registered on this replica: {', '.join(sorted(self.names))}")


# ---- reading ----------------------------------------------------------------------------------------------------
def confine(path: str | Path, root: str | Path) -> tuple[Path, str]:
    """``path`` (relative to ``root``, or absolute) resolved, symlinks included, and required to stay inside
    ``root`` (itself resolved). Returns the resolved path and its name relative to ``root`` for messages. Raises
    LoraError when it leaves ``root``, saying nothing of what lies outside (not even whether it exists)."""
    base = Path(root).expanduser().resolve()
    given = Path(path)
    if "\0" in str(path):
        raise LoraError("path holds a NUL character")
    try:
        real = (given if given.is_absolute() else base / given).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        real = None
    if real is None or not real.is_relative_to(base):
        raise LoraError("path is outside the directory adapters are read from (model.lora_dir; for a hub source, "
                        "its snapshot): give a path relative to it, without '..' and without symlinks that lead "
                        "out of it")
    if not given.is_absolute():
        label = given.as_posix()
    elif given.is_relative_to(Path(root).expanduser()):
        label = given.relative_to(Path(root).expanduser()).as_posix()
    else:
        label = real.relative_to(base).as_posix()
    return real, label or "."


def _redact(text: str, roots: Sequence[str | Path]) -> str:
    """``text`` with the host's directories above the adapter root left out (an error message for a client)."""
    for r in sorted({str(x) for x in roots if x}, key=len, reverse=True):
        text = text.replace(r.rstrip("/") + "/", "").replace(r, ".")
    return text


def read_state_dict(path: str | Path, root: str | Path | None = None,
                    max_bytes: int | None = None) -> tuple[dict[str, torch.Tensor], dict | None]:
    """An adapter file (``.safetensors``) or a directory holding one (``pytorch_lora_weights.safetensors`` or a
    single ``.safetensors`` file), through diffusers' Z-Image loader: returns its diffusers-layout state dict and
    its PEFT metadata (None for community files, whose alphas the conversion folds into the weights).

    ``root``: where the file must be (runtime registration: ``model.lora_dir``, or a hub snapshot): ``path`` is
    relative to it (or absolute inside it), resolved with its symlinks, the file must be a ``.safetensors`` file
    inside it, and messages name paths relative to it only. ``max_bytes``: the largest file read (its size is
    checked before it is opened). Every failure is a LoraError."""
    from diffusers.loaders.lora_pipeline import ZImageLoraLoaderMixin

    if root is not None:
        p, label = confine(path, root)
        secret: list[str | Path] = [Path(root).expanduser().resolve(), Path(root).expanduser(), root]
    else:
        p = Path(path).expanduser()
        label, secret = str(p), []
    if not p.exists():
        raise LoraError(f"no adapter at {label!r} (give a .safetensors file or a directory holding one)")
    if p.is_dir():
        files = sorted(f.name for f in p.glob("*.safetensors"))
        if not files:
            raise LoraError(f"{label!r} holds no .safetensors file")
        name = "pytorch_lora_weights.safetensors" if "pytorch_lora_weights.safetensors" in files else files[0]
        if len(files) > 1 and name != "pytorch_lora_weights.safetensors":
            raise LoraError(f"{label!r} holds several .safetensors files ({', '.join(files)}): name the file")
        folder, shown_name = p, f"{label}/{name}" if root is None or label != "." else name
        if root is not None:  # the entry itself may be a symlink
            real, _ = confine(p / name, root)
            if not real.is_file():
                raise LoraError(f"{shown_name!r} is not a file")
    else:
        if root is not None and not Path(path).name.endswith(".safetensors"):
            raise LoraError(f"{label!r} is not a .safetensors file (the only format read at runtime)")
        folder, name, shown_name = p.parent, p.name, label
        if root is not None and not name.endswith(".safetensors"):  # a hub cache's blob: open it by its link
            lexical = Path(path) if Path(path).is_absolute() else Path(root).expanduser().resolve() / path
            folder, name = lexical.parent, lexical.name
    if max_bytes is not None:
        try:
            size = (folder / name).stat().st_size
        except OSError:
            size = 0  # the loader says what is wrong with it
        if size > max_bytes:
            raise LoraError(f"{shown_name!r} is {size} bytes; the largest adapter file read is {max_bytes} "
                            f"(model.lora_max_file_bytes)")
    _check_header(folder / name, shown_name)  # before any tensor is read: a bad header is refused in milliseconds
    try:
        sd, meta = ZImageLoraLoaderMixin.lora_state_dict(str(folder), weight_name=name, local_files_only=True,
                                                         return_lora_metadata=True)
    except Exception as e:  # noqa: BLE001 - whatever diffusers or safetensors raise, the file is the problem
        raise LoraError(f"{shown_name!r} is not a Z-Image LoRA diffusers can read: "
                        f"{_redact(f'{type(e).__name__}: {e}', secret)[:500]}") from e
    return sd, meta


# A rank_pattern / alpha_pattern key as this server reads it: a module name or a dotted tail of one. The file's
# header is data from whoever wrote the file; PEFT runs its keys as regular expressions, and a crafted one
# (nested quantifiers) holds a replica's interpreter for minutes, so none is ever compiled or run here.
_MODULE_NAME = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")
MAX_PATTERNS = 4096
MAX_PATTERN_CHARS = 256


def _check_header(path: Path, shown_name: str) -> None:
    """The PEFT metadata in a .safetensors header (``lora_adapter_metadata``), checked as ``_check_metadata`` does,
    from the header alone. A header that cannot be read here is left for the loader to report."""
    import json

    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get("lora_adapter_metadata")
        meta = json.loads(raw) if raw else None
    except Exception:  # noqa: BLE001 - not readable as safetensors here: the loader says why
        return
    if isinstance(meta, dict):
        try:
            _check_metadata({str(k).removeprefix("transformer."): v for k, v in meta.items()})
        except LoraError as e:
            raise LoraError(f"{shown_name!r}: {e}") from None


def _pattern_value(patterns: dict, key: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup (``peft.utils.other.get_pattern_key``: the first pattern, in the
    file's order, that matches the module name or a dotted tail of it) for patterns that are module names, as
    ``_check_metadata`` requires: by dictionary lookup of each dotted tail, no regular expression."""
    if not patterns:
        return default
    parts = key.split(".")
    tails = {".".join(parts[i:]) for i in range(len(parts))}
    for pattern, value in patterns.items():  # the file's order decides between several matches, as in PEFT
        if pattern in tails:
            return value
    return default


def _check_metadata(meta: dict) -> None:
    """The PEFT metadata fields we use, checked before use: a file's header is the caller's data."""
    def bad(v, zero_ok: bool) -> bool:
        return isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or not (v >= 0 if zero_ok else v > 0)

    for key in ("r", "lora_alpha"):
        v = meta.get(key)
        if v is not None and bad(v, key == "lora_alpha"):
            raise LoraError(f"the adapter's metadata (lora_adapter_metadata) has {key} = {str(v)[:40]!r}; a "
                            f"finite {'non-negative' if key == 'lora_alpha' else 'positive'} number expected")
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = meta.get(key)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise LoraError(f"the adapter's metadata has {key} of type {type(patterns).__name__}; an object "
                            f"{{pattern: number}} expected")
        if len(patterns) > MAX_PATTERNS:
            raise LoraError(f"the adapter's metadata has {len(patterns)} {key} entries; at most {MAX_PATTERNS}")
        for pattern, value in patterns.items():
            if not isinstance(pattern, str) or len(pattern) > MAX_PATTERN_CHARS \
                    or not _MODULE_NAME.fullmatch(pattern):
                raise LoraError(f"the adapter's metadata has a {key} key that is not a module name: "
                                f"{str(pattern)[:60]!r}. Adapter files are not trusted to carry regular "
                                f"expressions; list the modules by name (e.g. 'layers.3.attention.to_q' or "
                                f"'to_q')")
            if bad(value, key == "alpha_pattern"):
                raise LoraError(f"the adapter's metadata has {key}[{str(pattern)[:60]!r}] = {str(value)[:40]!r}; "
                                f"a finite {'non-negative' if key == 'alpha_pattern' else 'positive'} number "
                                f"expected")


def factors_from_state_dict(state_dict: dict[str, torch.Tensor], metadata: dict | None = None,
                            dtype: torch.dtype = torch.float32) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``module name -> (A [r, in], B [out, r] with the module's PEFT scale folded in)`` from a diffusers-layout
    state dict (keys ``[transformer.]<module>.lora_A.weight`` / ``.lora_B.weight``)."""
    sd = {k.removeprefix("transformer."): v for k, v in state_dict.items()}
    meta = {k.removeprefix("transformer."): v for k, v in (metadata or {}).items()}
    if any(".lokr_" in k for k in sd):
        raise LoraError("LoKr adapters are not supported for per-request use (only LoRA)")
    if any("lora_magnitude_vector" in k or "dora_scale" in k for k in sd):
        raise LoraError("DoRA adapters are not supported for per-request use (only LoRA)")
    if any(k.endswith(".lora_B.bias") for k in sd):
        raise LoraError("adapters with a LoRA bias (lora_bias) are not supported")
    names = sorted({k.rsplit(".lora_A.", 1)[0] for k in sd if ".lora_A." in k})
    extra = sorted(k for k in sd if ".lora_A." not in k and ".lora_B." not in k)
    if not names or extra:
        raise LoraError(f"not a LoRA state dict (keys like 'layers.0.attention.to_q.lora_A.weight' expected; "
                        f"found {', '.join(extra[:3]) or 'no lora_A keys'})")
    if metadata:
        _check_metadata(meta)
    r_default, alpha_default = meta.get("r"), meta.get("lora_alpha")
    out = {}
    for name in names:
        a, b = sd.get(f"{name}.lora_A.weight"), sd.get(f"{name}.lora_B.weight")
        if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise LoraError(f"module {name}: lora_A/lora_B missing or of mismatched ranks")
        rank = a.shape[0]
        if rank < 1:
            raise LoraError(f"module {name}: rank 0 (lora_A has no rows); every module needs rank 1 or more")
        if metadata:
            r = _pattern_value(meta.get("rank_pattern"), name, r_default or rank)
            alpha = _pattern_value(meta.get("alpha_pattern"), name, alpha_default if alpha_default is not None else r)
            scale = alpha / (r ** 0.5) if meta.get("use_rslora") else alpha / r
        else:  # diffusers' convention without metadata (``get_peft_kwargs``): alpha == rank, scale 1
            scale = 1.0
        out[name] = (a.to(dtype).contiguous(), (b.float() * scale).to(dtype).contiguous())
        # A batch stacks its adapters and scales each sample's columns: a NaN column times another sample's scale
        # of 0 is NaN, so one non-finite adapter would blank every image of its batch.
        if not all(bool(torch.isfinite(t).all()) for t in out[name]):
            raise LoraError(f"module {name}: the factors are not all finite (NaN or infinity, after the PEFT scale "
                            f"{scale:g}); the adapter file is damaged or was trained into overflow")
    return out


# ---- adapters ----------------------------------------------------------------------------------------------------
@dataclass
class LoraAdapter:
    """One adapter's factors on the CPU, grouped by block, ranks padded to ``rank`` (a multiple of
    RANK_MULTIPLE). ``blocks["layers.3"]["attention.to_q"] = (A [rank, in], B [out, rank])``."""

    name: str
    source: str
    rank: int  # padded rank: its columns in a stacked batch
    true_rank: int  # the largest rank of any module, as trained
    blocks: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]
    device_blocks: dict | None = None  # the same on the transformer's device while resident
    version: int = 0  # its registration's number in its store: a replacement under the same name is another

    @property
    def modules(self) -> list[str]:
        return sorted({m for b in self.blocks.values() for m in b})

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for b in self.blocks.values() for ab in b.values() for t in ab)

    def info(self, resident: bool) -> dict:
        return {"name": self.name, "source": self.source, "rank": self.true_rank, "modules": self.modules,
                "blocks": len(self.blocks), "bytes": self.nbytes, "resident": resident}


def build_adapter(name: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], transformer,
                  source: str = "") -> LoraAdapter:
    """Check ``factors`` against ``transformer`` (every module exists, is one this server applies per sample,
    and has matching shapes) and pad ranks to a multiple of RANK_MULTIPLE."""
    shapes = {}
    for fqn, mod in transformer.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and w.ndim == 2:
            shapes[fqn] = (mod.out_features, mod.in_features) if hasattr(mod, "out_features") else tuple(w.shape)
    blocks: dict[str, dict] = {}
    unsupported = []
    true_rank = max(a.shape[0] for a, _ in factors.values())
    rank = -(-true_rank // RANK_MULTIPLE) * RANK_MULTIPLE
    for fqn, (a, b) in sorted(factors.items()):
        m = _MODULE_RE.match(fqn)
        if fqn not in shapes:
            raise LoraError(f"module {fqn!r} is not in this model's transformer (is the adapter for Z-Image?)")
        if m is None or m.group("module") not in BLOCK_MODULES:
            unsupported.append(fqn)
            continue
        out_f, in_f = shapes[fqn]
        if a.shape[1] != in_f or b.shape[0] != out_f:
            raise LoraError(f"module {fqn!r}: the adapter is {b.shape[0]}x{a.shape[1]}, the model's layer "
                            f"{out_f}x{in_f} (an adapter for another model size?)")
        r = a.shape[0]
        if r < rank:
            a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])])
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], dim=1)
        blocks.setdefault(m.group("block"), {})[m.group("module")] = (a, b)
    if unsupported:
        raise LoraError(f"the adapter targets layers outside the transformer blocks ({', '.join(unsupported[:4])}"
                        f"{', ...' if len(unsupported) > 4 else ''}); per-request LoRA applies to the blocks' "
                        f"attention, feed-forward and adaLN linears only")
    return LoraAdapter(name, source, rank, true_rank, blocks)


# ---- one batch ---------------------------------------------------------------------------------------------------
@dataclass
class BatchLora:
    """The stacked factors of one batch's adapters, and each (packed) sample's scale per rank column.

    ``scales``: ``[samples, R]`` in the caller's sample order (negative passes included); ``blocks[name]``: the
    factor tuple a block's forward takes (``packed._block_forward``), None for blocks no adapter touches."""

    scales: torch.Tensor
    blocks: dict[str, tuple]
    names: tuple[str, ...] = ()
    _rows: dict = field(default_factory=dict)

    def rows(self, seg: torch.Tensor) -> torch.Tensor:
        """``[T, R]``: the scale of every token row (its sample's), cached per segment tensor."""
        key = id(seg)
        got = self._rows.get(key)
        if got is None or got[0] is not seg:
            got = (seg, self.scales[seg])
            self._rows[key] = got
        return got[1]


def stack_block(adapters: Sequence[LoraAdapter], block: str, transformer) -> tuple | None:
    """The factor tuple of one block for these adapters (in this order), zeros where an adapter leaves a module
    alone; None when none touches the block. Order: (qkv_A [3R, D], q_B, k_B, v_B, o_A, o_B, w13_A [2R, D], w1_B,
    w3_B, w2_A, w2_B, ada_A | None, ada_B | None)."""
    if not any(block in a.device_blocks for a in adapters):
        return None
    mod = transformer.get_submodule(block)
    stacked = {}
    for name in BLOCK_MODULES:
        try:
            lin = mod.get_submodule(name)
        except AttributeError:
            continue  # a block without modulation (the context refiner)
        pa, pb = [], []
        for a in adapters:
            got = a.device_blocks.get(block, {}).get(name)
            if got is None:
                ref = next(iter(next(iter(a.device_blocks.values())).values()))[0]
                got = (ref.new_zeros(a.rank, lin.in_features), ref.new_zeros(lin.out_features, a.rank))
            pa.append(got[0])
            pb.append(got[1])
        stacked[name] = torch.cat(pa, 0).contiguous(), torch.cat(pb, 1).contiguous()
    q, k, v = (stacked[f"attention.to_{x}"] for x in "qkv")
    o = stacked["attention.to_out.0"]
    w1, w2, w3 = (stacked[f"feed_forward.w{i}"] for i in (1, 2, 3))
    ada = stacked.get("adaLN_modulation.0", (None, None))
    return (torch.cat([q[0], k[0], v[0]]), q[1], k[1], v[1], o[0], o[1], torch.cat([w1[0], w3[0]]), w1[1], w3[1],
            w2[0], w2[1], ada[0], ada[1])


class LoraStore:
    """The adapters a replica knows (all on the CPU) and the ones resident on the transformer's device (at most
    ``max_resident``, least recently used evicted first). Thread-safe: registration runs beside batches."""

    def __init__(self, transformer, max_resident: int = 4, dtype: torch.dtype | None = None):
        self.transformer = transformer
        self.max_resident = max(1, int(max_resident))
        self._dtype = dtype
        self._adapters: dict[str, LoraAdapter] = {}
        self._resident: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.RLock()
        self._stack_cache: tuple | None = None  # ((name, version)..., blocks): consecutive batches of one set
        self._versions = itertools.count(1)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The factors' dtype: the model's compute dtype (not an fp8 weight's storage type)."""
        return self._dtype or getattr(self.transformer, "dtype", torch.float32)

    def __contains__(self, name: str) -> bool:
        return name in self._adapters

    def names(self) -> list[str]:
        return sorted(self._adapters)

    def add(self, name: str, path: str | Path, max_rank: int | None = None, root: str | Path | None = None,
            max_bytes: int | None = None) -> dict:
        """Read, convert and check an adapter (``root``: the directory it must be in, ``max_bytes``: the largest
        file read; see ``read_state_dict``), then make it resident (evicting the least recently used beyond
        max_resident). Replaces an adapter of the same name. Raises LoraError with the reason."""
        sd, meta = read_state_dict(path, root, max_bytes)
        try:
            adapter = build_adapter(name, factors_from_state_dict(sd, meta, self.dtype), self.transformer, str(path))
        except LoraError:
            raise
        except Exception as e:  # noqa: BLE001 - odd tensors or metadata: the adapter's fault, said as such
            raise LoraError(f"the adapter could not be converted: {type(e).__name__}: {str(e)[:300]}") from e
        if max_rank is not None and adapter.true_rank > max_rank:
            raise LoraError(f"adapter {name!r} has rank {adapter.true_rank}, above model.lora_max_rank = {max_rank} "
                            f"(what the memory plan counts per adapter); raise it")
        return self.add_adapter(adapter)

    def add_adapter(self, adapter: LoraAdapter) -> dict:
        with self._lock:
            self.remove(adapter.name)
            adapter.version = next(self._versions)
            self._adapters[adapter.name] = adapter
            self._make_resident([adapter.name])
            self._evict(keep=())
            log.info("LoRA %s registered: rank %d, %d blocks, %.1f MiB (%s)", adapter.name, adapter.true_rank,
                     len(adapter.blocks), adapter.nbytes / 2**20, adapter.source)
            return adapter.info(True)

    def remove(self, name: str) -> bool:
        with self._lock:
            adapter = self._adapters.pop(name, None)
            if adapter is None:
                return False
            adapter.device_blocks = None
            self._resident.pop(name, None)
            self._stack_cache = None
            return True

    def info(self) -> list[dict]:
        with self._lock:
            return [a.info(n in self._resident) for n, a in sorted(self._adapters.items())]

    def pin(self, names) -> dict[str, LoraAdapter]:
        """The adapters ``names`` name now. A running sample keeps these to its end (``batch``'s ``pinned``):
        replaced or removed meanwhile, its image does not depend on whether another request joined its set.
        ``AdapterGone`` for a name not registered."""
        with self._lock:
            unknown = {n for n in names if n not in self._adapters}
            if unknown:
                raise AdapterGone(unknown)
            return {n: self._adapters[n] for n in names}

    def prefetch(self, names) -> None:
        """Make ``names`` resident now (ahead of the batches that will use them), within max_resident."""
        with self._lock:
            self._make_resident([n for n in names if n in self._adapters][-self.max_resident:])
            self._evict(keep=())

    def _make_resident(self, names) -> None:
        for n in names:
            a = self._adapters[n]
            if a.device_blocks is None:
                a.device_blocks = self._upload(a)
            self._resident[n] = None
            self._resident.move_to_end(n)

    def _upload(self, a: LoraAdapter) -> dict:
        dev = self.device
        return {blk: {m: (x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)) for m, (x, y) in mods.items()}
                for blk, mods in a.blocks.items()}

    def _evict(self, keep) -> None:
        for n in list(self._resident):
            if len(self._resident) <= self.max_resident:
                break
            if n in keep:
                continue
            self._resident.pop(n)
            self._adapters[n].device_blocks = None
            if self._stack_cache is not None and any(n == name for name, _ in self._stack_cache[0]):
                self._stack_cache = None

    def batch(self, per_sample: Sequence[Sequence[tuple[str, float]]],
              pinned: Sequence[dict] | None = None) -> BatchLora | None:
        """The batch's stacked factors for each sample's ``(name, scale)`` list (caller's order, negative passes
        included), or None when no sample names an adapter. Adapters listed twice for a sample add up. A sample's
        ``pinned`` adapters (``pin``) are used for the names it has, the registered ones for the rest: two samples
        may run two versions of one name side by side."""
        if not any(per_sample):
            return None
        with self._lock:
            chosen, unknown = [], set()
            for i, loras in enumerate(per_sample):
                mine = pinned[i] if pinned is not None else {}
                got = {n: mine.get(n) or self._adapters.get(n) for n, _ in loras}
                unknown |= {n for n, a in got.items() if a is None}
                chosen.append(got)
            if unknown:
                raise AdapterGone(unknown)
            # sorted: the column order depends on the set only
            adapters = sorted({id(a): a for got in chosen for a in got.values()}.values(),
                              key=lambda a: (a.name, a.version))
            key = tuple((a.name, a.version) for a in adapters)
            self._make_resident([a.name for a in adapters if self._adapters.get(a.name) is a])
            if self._stack_cache is not None and self._stack_cache[0] == key:
                blocks = self._stack_cache[1]
            else:  # a version no longer registered is copied in for this stack only
                on_device = [a if a.device_blocks is not None else replace(a, device_blocks=self._upload(a))
                             for a in adapters]
                blocks = {f"{g}.{i}": stack_block(on_device, f"{g}.{i}", self.transformer)
                          for g in BLOCK_GROUPS for i in range(len(getattr(self.transformer, g)))}
                self._stack_cache = (key, blocks)
            cols, start = {}, 0
            for a in adapters:
                cols[id(a)] = (start, start + a.rank)
                start += a.rank
            scales = torch.zeros(len(per_sample), start)
            for i, loras in enumerate(per_sample):
                for n, s in loras:
                    a, b = cols[id(chosen[i][n])]
                    scales[i, a:b] += float(s)
            names = tuple(dict.fromkeys(a.name for a in adapters))
            # The batch runs on its stacked copies: a batch of more adapters than max_resident keeps the extra ones
            # for itself only (the least recently used leave the device now)
            self._evict(keep=())
            return BatchLora(scales.to(self.device, self.dtype), blocks, names)


# ---- adapters for tests and benchmarks, in diffusers' own layout ----------------------------------------------------
def random_lora_state_dict(transformer, rank: int, seed: int = 0, alpha: float | None = None,
                           modules: Sequence[str] = BLOCK_MODULES, std: float = 0.02,
                           device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A random adapter for ``transformer`` in the layout diffusers saves (``transformer.<module>.lora_A.weight``,
    keys as ``get_peft_model_state_dict`` names them) and its PEFT metadata (``r``, ``lora_alpha``,
    ``target_modules``), with a non-zero ``B`` (a trained adapter's, not PEFT's zero init)."""
    g = torch.Generator("cpu").manual_seed(seed)
    sd = {}
    for fqn, mod in transformer.named_modules():
        m = _MODULE_RE.match(fqn)
        if m is None or m.group("module") not in modules or not hasattr(mod, "in_features"):
            continue
        a = torch.randn(rank, mod.in_features, generator=g) * std
        b = torch.randn(mod.out_features, rank, generator=g) * std
        sd[f"transformer.{fqn}.lora_A.weight"] = a.to(device, dtype)
        sd[f"transformer.{fqn}.lora_B.weight"] = b.to(device, dtype)
    meta = {"r": rank, "lora_alpha": alpha if alpha is not None else rank,
            "target_modules": sorted(set(modules)), "use_dora": False, "lora_bias": False}
    return sd, meta


def save_diffusers_lora(directory: str | Path, state_dict: dict, metadata: dict | None = None) -> Path:
    """Write ``state_dict`` (``transformer.``-prefixed keys) as diffusers' ``save_lora_weights`` does:
    ``pytorch_lora_weights.safetensors`` with the PEFT config in the ``lora_adapter_metadata`` header."""
    from diffusers.loaders.lora_pipeline import ZImageLoraLoaderMixin

    layers = {k.removeprefix("transformer."): v.contiguous() for k, v in state_dict.items()}
    ZImageLoraLoaderMixin.save_lora_weights(str(directory), transformer_lora_layers=layers,
                                            transformer_lora_adapter_metadata=metadata)
    return Path(directory) / "pytorch_lora_weights.safetensors"


def save_kohya_lora(path: str | Path, state_dict: dict, alpha: float = 2.0) -> Path:
    """Write ``state_dict`` (diffusers' ``transformer.<module>.lora_A/B`` keys) in the kohya layout community
    trainers write: ``lora_unet_<module with underscores>.lora_down/up.weight`` and ``.alpha``."""
    from safetensors.torch import save_file

    kohya = {}
    for k, v in state_dict.items():
        module, kind = k.removeprefix("transformer.").rsplit(".lora_", 1)
        key = "lora_unet_" + module.replace(".", "_")
        kohya[f"{key}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = v
        kohya[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(kohya, str(path))
    return Path(path)


def adapter_nbytes(dim: int, ffn_dim: int, adaln_dim: int, blocks_modulated: int, blocks_plain: int, rank: int,
                   bytes_per_value: int = 2) -> int:
    """Device bytes of one adapter of ``rank`` on every supported module (the planner's formula, stated in
    ``placement/memory.py`` too; ``tests/test_lora.py`` checks the two agree)."""
    per_rank = 4 * 2 * dim + 3 * (dim + ffn_dim)
    return rank * bytes_per_value * (blocks_modulated * (per_rank + adaln_dim + 4 * dim) + blocks_plain * per_rank)
