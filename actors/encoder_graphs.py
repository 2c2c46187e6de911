"""The text encoder's forward up to the state Z-Image uses, and CUDA graphs of it at (prompts, padded length)
buckets, captured at start-up.

Z-Image takes the second-to-last layer's output (``hidden_states[-2]``, no final norm). ``penultimate`` is the
encoder with its last layer and final norm left out, sharing every other module: its ``last_hidden_state`` is that
state, without running a layer whose output is thrown away or keeping every layer's states.

The encoder (Qwen3-4B, 36 layers) is launch-bound at serving sizes: on an H100 one 108-token prompt took 43 ms of
wall time for 8.4 ms of kernels (docs/benchmarks.md, the roofline), Python that also holds the GIL the step loop's
thread needs to launch its steps. A replayed graph launches the same kernels in one call.

One graph serves every prompt of its bucket because the encoder is causal: a token's state never depends on the
tokens after it, so right padding with any token and no attention mask leaves each prompt's own states as they are
(the eager path pads to the longest prompt and masks, the same arithmetic). A call's ids go into the graph of the
next length up; its prompts run in chunks of the graphed counts (8 -> 8, 7 -> 4 + 2 + 1), never padded rows."""

from __future__ import annotations

import copy
import logging
import time

import torch

log = logging.getLogger(__name__)

# Lengths step finely where captions are (a padded token costs compute once a chunk is compute-bound) and up to the
# 512 tokens the engine keeps; counts are chunk sizes any number of prompts decomposes into.
LENGTHS = (32, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
COUNTS = (1, 2, 4, 8)


def penultimate(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """``text_encoder`` (a transformers decoder model: ``layers``, ``norm``) without its last layer and final norm,
    sharing every other module, so weight swaps made later inside the kept layers (quantization) apply to both."""
    m = copy.copy(text_encoder)
    m._modules = dict(text_encoder._modules)
    m.layers = torch.nn.ModuleList(list(text_encoder.layers)[:-1])
    m.norm = torch.nn.Identity()
    return m


def chunks(n: int, counts: tuple[int, ...] = COUNTS) -> list[int]:
    """``n`` prompts as chunk sizes from ``counts`` (which holds 1), largest first."""
    out = []
    while n:
        c = max(k for k in counts if k <= n)
        out.append(c)
        n -= c
    return out


class EncoderGraphs:
    """``encoder`` (``penultimate``'s) captured at every (count, length) of ``counts`` x ``lengths``; ``run(ids)``
    gives the states of a ``[prompts, tokens]`` id tensor through the graphs, or None where no length covers it.

    Each graph uses the cuBLAS workspace torch keeps for the stream it was captured on: nothing in the replica may
    clear cuBLAS's workspaces process-wide (inductor's ``reduce-overhead`` mode does), or it is freed under them."""

    def __init__(self, encoder: torch.nn.Module, device: torch.device, lengths=LENGTHS, counts=COUNTS,
                 pad_id: int = 0):
        self.encoder, self.device, self.pad_id = encoder, device, pad_id
        self.lengths, self.counts = tuple(sorted(lengths)), tuple(sorted(counts))
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._no_masks = dict.fromkeys(getattr(encoder.config, "layer_types", None) or ["full_attention"])
        self.pool_bytes = 0
        b, n = self.counts[-1], self.lengths[-1]
        # every graph reads its ids from and writes its states to a corner of these two buffers
        self.ids = torch.full((b, n), pad_id, dtype=torch.long, device=device)
        self.out = torch.empty(b, n, encoder.config.hidden_size, dtype=encoder.embed_tokens.weight.dtype,
                               device=device)

    def _forward(self, b: int, n: int) -> None:
        # No mask at all (a mapping of each attention type to None: the model builds none): causal attention alone,
        # whatever the model would infer while a stream captures (transformers treats capture as tracing, and builds
        # explicit masks from what it is given then).
        states = self.encoder(input_ids=self.ids[:b, :n], attention_mask=self._no_masks, use_cache=False)
        self.out[:b, :n].copy_(states.last_hidden_state)

    @torch.no_grad()
    def capture(self) -> float:
        """Capture every bucket, largest first (the smaller ones reuse the shared pool's blocks), on a side stream
        of this thread; returns the seconds it took. On an error nothing stays captured (``run`` returns None, the
        caller runs eager) and the error raised is the one the forward raised."""
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(side):
                for b in reversed(self.counts):
                    for n in reversed(self.lengths):
                        self._forward(b, n)  # lazy initialisation (cuBLAS workspaces, plans) before the capture
                        side.synchronize()
                        graph = torch.cuda.CUDAGraph()
                        # thread-local: a CUDA call of another thread (Ray's, a health() call's) neither fails
                        # nor breaks it
                        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
                        try:
                            self._forward(b, n)
                        except BaseException:
                            try:
                                graph.capture_end()
                            except Exception:  # noqa: BLE001, S110 - the capture is invalid; the forward's error is raised
                                pass
                            raise
                        graph.capture_end()
                        self.graphs[(b, n)] = graph
        except BaseException:
            self.graphs.clear()
            raise
        finally:
            torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        self.pool_bytes = _pool_bytes(self.device)
        return time.perf_counter() - t0

    def run(self, ids: torch.Tensor) -> torch.Tensor | None:
        """The states ``[prompts, tokens, hidden]`` of ``ids`` (on any device), a tensor of its own; None where no
        graph is captured or the ids are longer than the longest graph."""
        prompts, tokens = ids.shape
        n = next((length for length in self.lengths if length >= tokens), None)
        if not self.graphs or n is None:
            return None
        out, start = [], 0
        for c in chunks(prompts, self.counts):
            self.ids[:c, :n].fill_(self.pad_id)
            self.ids[:c, :tokens].copy_(ids[start:start + c])
            self.graphs[(c, n)].replay()
            out.append(self.out[:c, :tokens].clone())
            start += c
        return out[0] if len(out) == 1 else torch.cat(out)


def _pool_bytes(device: torch.device) -> int:
    """Bytes the allocator holds in private pools on ``device`` (CUDA graphs' pools; the replica has no others)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        segments = torch.cuda.memory_snapshot()
    except Exception:  # noqa: BLE001 - a figure for the log, not worth failing over
        return 0
    return sum(s["total_size"] for s in segments
               if s.get("device") == index and tuple(s.get("segment_pool_id", (0, 0))) != (0, 0))
