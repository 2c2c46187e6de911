"""The Z-Image-Turbo computation, stage by stage, each component on its own device: what
``diffusers.ZImagePipeline.__call__`` computes (diffusers 0.42: chat-templated prompt -> ``hidden_states[-2]`` masked
-> flow-matching Euler steps with the size-dependent shift ``mu`` -> ``latents / scaling + shift`` -> VAE decode),
with three differences of structure, none of math:

- the stages are separate calls (a split placement puts the components on different GPUs; the step loop,
  ``actors/steploop.py``, runs the steps while callers encode and decode);
- ``step`` advances samples that each have their own size, seed, guidance, negative prompt, schedule and progress by
  one step, in one transformer call over all of them packed into one sequence (``actors/packed.py``);
- the VAE decodes one image at a time (its activations dominate a replica's peak memory).

Noise is drawn per request on the CPU from its own seed, so an image depends only on its own request
(``tests/test_engine.py`` checks against ``ZImagePipeline`` and each sample of a mixed batch against its solo run)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas

from .conditioning import encode_conditions, encode_controls
from .controlnet import PackedControl, forward
from .devices import ReadStream, sync
from .encoder_graphs import penultimate
from .packed import PackedLayout, PackedTransformer


def has_images(samples) -> bool:
    """Whether any sample has an input image (an edit) or a control image: the call has an image-encode stage."""
    return any(s.image is not None or s.control_image is not None for s in samples)


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    module = module.to(device)
    if next(module.parameters()).dtype != dtype:  # loaded weights already come in the right dtype
        module = module.to(dtype)
    return module


@dataclass(frozen=True)
class Sample:
    """One image of a batch."""

    prompt: str
    seed: int
    width: int
    height: int
    guidance_scale: float = 0.0
    negative_prompt: str | None = None
    loras: tuple[tuple[str, float], ...] = ()  # (adapter name, scale): per-request LoRA (actors/lora.py)
    # [conditioning] img2img / inpainting (actors/conditioning.py): the input image, uint8 [H, W, 3] at this size;
    # the mask, uint8 [H, W], 128 or more = repaint (binarized as diffusers' mask processor does); the sample's own
    # schedule length (it runs the last steps_run(num_inference_steps, strength) steps of it).
    image: Any = field(default=None, compare=False, repr=False)
    mask: Any = field(default=None, compare=False, repr=False)
    strength: float = 1.0
    num_inference_steps: int | None = None
    # [controlnet] the control image, uint8 [H, W, 3] at this size, and its conditioning scale (actors/controlnet.py)
    control_image: Any = field(default=None, compare=False, repr=False)
    control_scale: float = 0.75
    name: str = ""  # the request id (the step loop's log lines and cancellation)
    tokens: int = 0  # its cost in the replica's token budget (``ImageRequest.tokens``)
    priority: int = 0  # ``ImageRequest.priority``: the step loop steps the most urgent samples only


@dataclass
class EncodedPrompts:
    positive: list[torch.Tensor]  # one per sample
    negative: list[torch.Tensor]  # one per sample with guidance > 0, in sample order


@dataclass(frozen=True)
class Schedule:
    """One sample's flow-matching schedule: diffusers' ``FlowMatchEulerDiscreteScheduler`` with the sample's own
    ``mu``, read out once, so a step is plain arithmetic: ``x += drop[i] * raw`` is the scheduler's
    ``x + (sigma[i+1] - sigma[i]) * v`` with ``v = -raw``, bit for bit (float32 values)."""

    t_in: torch.Tensor  # [steps] the transformer's timestep input per step, (1000 - t) / 1000, on its device
    sigmas: tuple[float, ...]  # [steps + 1], ending at 0
    drop: tuple[float, ...]  # [steps] sigma[i] - sigma[i+1]
    keep: tuple[float, ...]  # [steps + 1] 1 - sigma[i] (the weight of the clean latents when noising to sigma[i])


@dataclass(eq=False)
class Packed:
    """A running set's packed call, built when the set changes (``ZImageEngine.pack``): its layout (captions
    refined), its ControlNet input, its negative passes, and the timestep input of each of its coming steps."""

    layout: PackedLayout
    control: PackedControl | None
    cfg: list[int]  # the samples with guidance: their negative passes follow the samples, in this order
    t_in: torch.Tensor  # [steps left, entries]: row k is the call's timestep input k steps after ``base``
    base: int  # the first sample's step when this was built
    dtype: torch.dtype  # the transformer's input dtype, read here: diffusers' ``ModelMixin.dtype`` walks every module


class ZImageEngine:
    """Holds the components and runs encode, the denoising step and decode. Not thread-safe per stage: callers run
    at most one call of each stage at a time (stages on different devices may run concurrently)."""

    def __init__(self, components: dict, devices: dict[str, str], dtype: torch.dtype, remote_encode=None):
        """``devices`` maps each component this engine holds to its device. Without a text encoder, the encode
        stage calls ``remote_encode(prompts, negative_prompts, guidance)`` (another replica's encoder)."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.image_processor import VaeImageProcessor

        self.devices = {k: torch.device(v) for k, v in devices.items()}
        self.dtype = dtype
        self.remote_encode = remote_encode
        self.tokenizer = components.get("tokenizer")
        self.text_encoder = self.encoder = self.encoder_graphs = None
        if "text_encoder" in devices:
            # Only what encodes run, up to the state Z-Image takes: the last layer and final norm (0.19 GiB in bf16)
            # are neither placed nor kept, once the caller lets go of the loaded model.
            self.text_encoder = self.encoder = _place(penultimate(components["text_encoder"]),
                                                      self.devices["text_encoder"], dtype)
        elif remote_encode is None:
            raise ValueError("an engine without a text encoder needs remote_encode")
        self.transformer = _place(components["transformer"], self.devices["transformer"], dtype)
        self.packed = PackedTransformer(self.transformer)
        self.loras = None  # an ``actors.lora.LoraStore`` once the replica enables per-request LoRA
        self.vae = _place(components["vae"], self.devices["vae"], dtype)
        # what the step loop made is read (checked, previewed, decoded) on a stream of its own where the VAE shares
        # the transformer's GPU (``devices.ReadStream``); across GPUs the copy between them orders the streams
        vae_device = self.devices["vae"]
        self.reader = ReadStream(vae_device) if vae_device.type == "cuda" and vae_device == self.devices[
            "transformer"] else None
        self.controlnet = None  # [controlnet] beside the transformer, sharing its embedders and refiners
        if components.get("controlnet") is not None:
            self.controlnet = _place(components["controlnet"], self.devices["transformer"], dtype)
        self._scheduler_config = components["scheduler"].config
        self._scheduler_cls = FlowMatchEulerDiscreteScheduler
        self._schedules: dict[tuple[int, int, int], Schedule] = {}
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (VAE downsampling x the transformer's 2x2 patches)."""
        return self.vae_scale_factor * 2

    # ---- stage 1: text ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(
        self, prompts: Sequence[str], negative_prompts: Sequence[str | None] | None = None,
        guidance: float | Sequence[float] = 0.0, max_sequence_length: int = 512,
    ) -> EncodedPrompts:
        """Caption embeddings of every prompt, and of the negative prompt (``""`` when none) of every sample whose
        guidance is above 0, in one text-encoder call."""
        n = len(prompts)
        guidance = [float(guidance)] * n if isinstance(guidance, (int, float)) else [float(g) for g in guidance]
        if self.text_encoder is None:
            return self.remote_encode(list(prompts), list(negative_prompts or [None] * n), guidance)
        negs = list(negative_prompts or [None] * n)
        cfg = [i for i, g in enumerate(guidance) if g > 0]
        out = self._encode(list(prompts) + [negs[i] or "" for i in cfg], max_sequence_length)
        return EncodedPrompts(out[:n], out[n:])

    def _encode(self, prompts: list[str], max_sequence_length: int) -> list[torch.Tensor]:
        texts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=True
            )
            for p in prompts
        ]
        # Right padding to the longest prompt (then to a graph's length), not to max_sequence_length as diffusers
        # does: the encoder is causal, so a token's state does not depend on the padding after it, and short prompts
        # cost less.
        inputs = self.tokenizer(texts, padding="longest", padding_side="right", max_length=max_sequence_length,
                                truncation=True, return_tensors="pt")
        lengths = inputs.attention_mask.sum(dim=1).tolist()
        hidden = self.encoder_graphs.run(inputs.input_ids) if self.encoder_graphs is not None else None
        if hidden is not None:  # already a copy of its own, trimmed to the longest prompt
            return [hidden[i, :n] for i, n in enumerate(lengths)]
        device = self.devices["text_encoder"]
        hidden = self.encoder(input_ids=inputs.input_ids.to(device), use_cache=False,
                              attention_mask=inputs.attention_mask.to(device).bool()).last_hidden_state
        return [hidden[i, :n].clone() for i, n in enumerate(lengths)]  # each its own: not the padded batch

    def capture_encoder_graphs(self) -> tuple[int, float, int]:
        """CUDA graphs of the encoder at every bucket (``actors/encoder_graphs.py``), on the calling thread's
        device; ``(graphs, seconds, bytes their memory pool holds)``. From then on ``_encode`` replays them where
        one covers the prompts."""
        from .encoder_graphs import EncoderGraphs

        graphs = EncoderGraphs(self.encoder, self.devices["text_encoder"], pad_id=self.tokenizer.pad_token_id or 0)
        seconds = graphs.capture()
        self.encoder_graphs = graphs
        return len(graphs.graphs), seconds, graphs.pool_bytes

    @torch.no_grad()
    def prewarm_encoder(self, shapes: Sequence[tuple[int, int]]) -> list[tuple[int, int, float]]:
        """Run the text encoder once at each ``(prompts, padded length)`` of ``shapes``, on synthetic token ids
        right-padded as ``_encode`` pads captions of different lengths (the first row full, the others shorter;
        one prompt alone has no padding, as in serving), so what long and padded captions need the first time (on a
        fresh GPU, several times a warm encode) is loaded at warm-up, not in the serving path (the encoder without
        CUDA graphs). Returns ``(prompts, length, seconds)`` per shape; nothing without a text encoder of its own."""
        if self.text_encoder is None:
            return []
        device = self.devices["text_encoder"]
        vocab = int(getattr(self.text_encoder.config, "vocab_size", 0) or len(self.tokenizer))
        g = torch.Generator("cpu").manual_seed(0)
        out = []
        for b, n in shapes:
            t0 = time.perf_counter()
            ids = torch.randint(0, vocab, (b, n), generator=g)
            lengths = torch.tensor([n - (i * n) // (2 * b) for i in range(b)])  # row i keeps n - i*n/(2b) tokens
            mask = torch.arange(n)[None, :] < lengths[:, None]
            self.encoder(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            sync(device)
            out.append((b, n, time.perf_counter() - t0))
        return out

    # ---- stage 2: denoise (the step loop's math) -------------------------------------------------------
    def lora_batch(self, per_sample: list, pinned: list | None = None):
        """The per-request LoRA of a packed call (``LoraStore.batch``), per sample in the call's order, on the
        adapters each sample pinned when it was made."""
        if self.loras is None:
            raise ValueError("this replica has per-request LoRA off (model.lora_max_resident is 0)")
        return self.loras.batch(per_sample, pinned)

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        return 2 * (int(height) // self.size_multiple), 2 * (int(width) // self.size_multiple)

    def initial_latents(self, samples: Sequence[Sample]) -> list[torch.Tensor]:
        """Per sample ``[16, h, w]`` float32 noise from its own seed (drawn on the CPU, as diffusers' pipeline
        does with a CPU generator), on the transformer's device."""
        out = []
        for s in samples:
            h, w = self.latent_size(s.height, s.width)
            g = torch.Generator("cpu").manual_seed(int(s.seed))
            channels = self.transformer.config.in_channels
            out.append(torch.randn((1, channels, h, w), generator=g, dtype=torch.float32)[0])
        return [x.to(self.devices["transformer"]) for x in out]

    def schedule(self, h: int, w: int, num_steps: int) -> Schedule:
        """The schedule of a ``[C, h, w]`` latent over ``num_steps`` steps (cached: a few sizes and step counts
        recur)."""
        key = (h, w, num_steps)
        got = self._schedules.get(key)
        if got is None:
            scheduler = self._scheduler_cls.from_config(self._scheduler_config)
            cfg = scheduler.config
            mu = calculate_shift((h // 2) * (w // 2), cfg.get("base_image_seq_len", 256),
                                 cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                                 cfg.get("max_shift", 1.15))
            scheduler.set_timesteps(sigmas=get_default_z_image_sigmas(num_steps), device="cpu", mu=mu)
            sig = scheduler.sigmas
            t_in = ((1000 - scheduler.timesteps) / 1000).to(self.devices["transformer"], non_blocking=True)
            got = Schedule(t_in, tuple(sig.tolist()), tuple((sig[:-1] - sig[1:]).tolist()),
                           tuple((1.0 - sig).tolist()))
            self._schedules[key] = got
        return got

    def pieces(self, latents: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor | None) -> tuple:
        """A sample's packed pieces (``actors/packed.py``): its own, and its negative pass's with guidance."""
        shape = (1, latents.shape[-2], latents.shape[-1])
        own = self.packed.piece(shape, len(positive))
        return (own,) if negative is None else (own, self.packed.piece(shape, len(negative)))

    @torch.no_grad()
    def pack(self, samples: Sequence) -> Packed:
        """The packed call of a running set (``actors.steploop.RunningSample``: their pieces, captions, adapters,
        ControlNet inputs and schedules): every sample, then the negative pass of each with guidance, which uses
        the sample's own adapters and ControlNet input, as diffusers does. Captions not refined yet are refined
        here, together, once."""
        cfg = [k for k, s in enumerate(samples) if s.guidance > 0]
        order = list(range(len(samples))) + cfg
        layout = self.packed.pack([s.pieces[0] for s in samples] + [samples[k].pieces[1] for k in cfg])
        if any(s.loras for s in samples):
            layout.lora = self.lora_batch([samples[j].loras for j in order],
                                          [getattr(samples[j], "pinned", None) or {} for j in order])
        self.packed.captions(layout, [s.positive for s in samples] + [samples[k].negative for k in cfg])
        device, dtype = self.devices["transformer"], self.transformer.dtype
        control = PackedControl.build(self.controlnet, [samples[j].control for j in order],
                                      [samples[j].control_scale for j in order],
                                      [samples[j].latents.shape[-2:] for j in order], device, dtype)
        t_in = torch.nn.utils.rnn.pad_sequence([samples[j].schedule.t_in[samples[j].step:] for j in order])
        return Packed(layout, control, cfg, t_in, samples[0].step, dtype)

    @torch.no_grad()
    def step(self, samples: Sequence, packed: Packed) -> None:
        """One denoising step of every sample of ``packed``'s running set, each at its own step of its own schedule:
        one packed transformer call (with the negative passes), each sample's velocity (with guidance combined with
        its negative pass's, as diffusers does), then every sample's flow-matching Euler update as one multi-tensor
        op. Sets each sample's ``latents``, ``pred`` (the velocity's negative, for the clean-latent estimate) and
        ``step``, then runs its ``after_step`` hook."""
        x = [s.latents.to(packed.dtype).unsqueeze(1) for s in samples]
        x += [x[k] for k in packed.cfg]  # the negative passes' inputs: the same tensors
        out = forward(self.packed, x, packed.t_in[samples[0].step - packed.base], None, packed.layout, packed.control)
        negative_of = {j: len(samples) + k for k, j in enumerate(packed.cfg)}
        raw = []
        for j, s in enumerate(samples):
            pred = out[j].float()
            if s.guidance > 0:
                pred = pred + s.guidance * (pred - out[negative_of[j]].float())
            raw.append(pred.squeeze(1))
        drops = [s.schedule.drop[s.step] for s in samples]
        moved = torch._foreach_add([s.latents for s in samples], torch._foreach_mul(raw, drops))
        for s, lat, pred in zip(samples, moved, raw):
            s.latents, s.pred = lat, pred
            s.step += 1
            if s.after_step is not None:
                s.after_step(s)

    # ---- stage 3: decode -------------------------------------------------------------------------------
    def reading(self, ready=None):
        """The context in which what the loop made is read: on the reader stream once ``ready`` (``devices.mark``
        after the step that made it; without one, everything the caller's stream has so far) is reached, or on the
        caller's stream where there is no reader."""
        return self.reader.after(ready) if self.reader is not None else contextlib.nullcontext()

    @torch.no_grad()
    def decode(self, latents: Sequence[torch.Tensor], ready=None) -> list[np.ndarray]:
        """Per sample latents ``[16, h, w]`` -> uint8 images ``[H, W, 3]``, one VAE call per image, once
        ``ready`` is reached (see ``reading``)."""
        with self.reading(ready):
            return [self.decode_one(lat) for lat in latents]

    def decode_one(self, latent: torch.Tensor) -> np.ndarray:
        lat = latent.unsqueeze(0).to(self.devices["vae"], self.vae.dtype)
        lat = lat / self.vae.config.scaling_factor + self.vae.config.shift_factor
        image = self.vae.decode(lat, return_dict=False)[0]
        arr = self.image_processor.postprocess(image, output_type="np")
        return (arr * 255).round().clip(0, 255).astype(np.uint8)[0]

    # ---- the stages of one call, each timed and finished on its device ---------------------------------
    def encode_stage(self, prompts: Sequence[str], negative_prompts: Sequence[str | None],
                     guidance: Sequence[float]) -> tuple[EncodedPrompts, float]:
        t0 = time.perf_counter()
        enc = self.encode(prompts, negative_prompts, guidance)
        if self.text_encoder is not None:
            sync(self.devices["text_encoder"])
        return enc, time.perf_counter() - t0

    def encode_images_stage(self, samples: Sequence[Sample], num_inference_steps: int) -> tuple[list, list, float]:
        """Edits' and ControlNet's input images through the VAE: per sample its ``Conditioning`` and control
        latents (None where it has none)."""
        t0 = time.perf_counter()
        conditions = encode_conditions(self, samples, num_inference_steps)
        controls = encode_controls(self, samples)
        sync(self.devices["vae"])
        return conditions, controls, time.perf_counter() - t0

    def decode_stage(self, latents: Sequence[torch.Tensor], ready=None) -> tuple[list[np.ndarray], float]:
        t0 = time.perf_counter()
        return self.decode(latents, ready), time.perf_counter() - t0

    def check_size(self, height: int, width: int) -> None:
        multiple = self.size_multiple
        for name, v in (("height", height), ("width", width)):
            if v <= 0 or v % multiple:
                raise ValueError(f"{name} must be a positive multiple of {multiple} (got {v})")
