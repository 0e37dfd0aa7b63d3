"""Batch inference: load an encoder once, embed many chips in batches.

The engine is what both the single-ROI API and the pipeline's embedding stage
use. It owns the device, the precision and the batch size, and records them.
Precision is applied here and nowhere else: the model is loaded in float32, and
for bfloat16 the engine stores its matmul weights in bf16 once and runs every
forward under ``torch.autocast``.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from agrifm_pipeline.checkpoint import ResolvedCheckpoint, resolve_checkpoint
from agrifm_pipeline.errors import (
    BackendError,
    InputContractError,
    PerformanceWarning,
    SettingsError,
)
from agrifm_pipeline.model import (
    cast_for_autocast,
    load_encoder,
    native_bf16_cpu,
    resolve_device,
    resolve_precision,
)
from agrifm_pipeline.model.weights import checkpoint_tensors
from agrifm_pipeline.settings import AgriFMSettings, load_settings

ENCODER_BACKENDS = ("ours", "official")
K = TypeVar("K")

_CHIPS_DONE = [0]
_CHIPS_LOCK = threading.Lock()


def chips_embedded() -> int:
    """Chips every engine of this process has embedded so far (progress displays read it)."""
    with _CHIPS_LOCK:
        return _CHIPS_DONE[0]


@dataclass(frozen=True)
class InferenceOptions:
    """How chips go through the encoder; all of it is recorded."""

    device: str = "auto"
    precision: str = "float32"
    batch_size: int = 8
    encoder: str = "ours"

    def __post_init__(self) -> None:
        if (
            not isinstance(self.batch_size, int)
            or isinstance(self.batch_size, bool)
            or self.batch_size < 1
        ):
            raise SettingsError(f"batch_size={self.batch_size!r}; use a whole number >= 1")
        if self.encoder not in ENCODER_BACKENDS:
            raise BackendError(
                f"encoder={self.encoder!r} is not known; use one of {ENCODER_BACKENDS}"
            )
        resolve_precision(self.precision)


@dataclass
class EmbeddingEngine:
    """An encoder loaded once, with the record of what it is.

    Use :meth:`create` (or :func:`get_engine`, which caches engines).
    """

    model: torch.nn.Module
    device: torch.device
    precision: str
    batch_size: int
    encoder: str
    checkpoint: dict[str, Any]
    param_stats: dict[str, float] = field(default_factory=dict)
    autocast_dtype: torch.dtype | None = None

    @classmethod
    def create(
        cls,
        checkpoint: str | Path | ResolvedCheckpoint | None = None,
        *,
        settings: AgriFMSettings | None = None,
        options: InferenceOptions | None = None,
    ) -> EmbeddingEngine:
        settings = settings or load_settings()
        options = options or InferenceOptions()
        device = resolve_device(options.device)
        precision, autocast_dtype = resolve_precision(options.precision)
        resolved = (
            checkpoint
            if isinstance(checkpoint, ResolvedCheckpoint)
            else resolve_checkpoint(checkpoint, settings)
        )
        model: torch.nn.Module
        info: dict[str, Any]
        if options.encoder == "ours":
            ours = load_encoder(resolved, device=device)
            info = {**ours.checkpoint_info, "precision": precision}
            model = ours
        else:
            from agrifm_pipeline.model.official import load_official_encoder

            if precision != "float32":
                raise SettingsError(
                    "the official-source encoder runs in float32 only here; use precision='float32'"
                )
            state = checkpoint_tensors(resolved)
            model = load_official_encoder(state, settings=settings, device=str(device))
            info = {**resolved.as_record(), "untrained": resolved.untrained}
        with torch.no_grad():
            flat = torch.cat([p.detach().flatten().float().cpu() for p in model.parameters()])
            stats = {
                "param_mean": float(flat.mean()),
                "param_std": float(flat.std()),
                "param_absmax": float(flat.abs().max()),
            }
        if autocast_dtype is not None:
            _warn_if_software_bf16(device, precision)
            cast_for_autocast(model, autocast_dtype)
        return cls(
            model=model,
            device=device,
            precision=precision,
            batch_size=options.batch_size,
            encoder=options.encoder,
            checkpoint=info,
            param_stats=stats,
            autocast_dtype=autocast_dtype,
        )

    @property
    def untrained(self) -> bool:
        return bool(self.checkpoint.get("untrained"))

    @property
    def cpu_matmul(self) -> str | None:
        """The library our fp32 linear layers run on (the one the model was built with);
        None where they do not run: off the CPU, under autocast, or the official code."""
        if self.device.type != "cpu" or self.autocast_dtype is not None:
            return None
        return getattr(self.model, "cpu_matmul", None)

    def record(self) -> dict[str, Any]:
        """What produced the embeddings: device, precision, batch size, checkpoint."""
        return {
            "encoder_backend": self.encoder,
            "device": str(self.device),
            "precision": self.precision,
            "batch_size": self.batch_size,
            "cpu_matmul": self.cpu_matmul,
            "checkpoint": self.checkpoint,
            **self.param_stats,
        }

    def _batches(self, chips: torch.Tensor) -> Iterator[torch.Tensor]:
        pin = self.device.type == "cuda"
        for start in range(0, chips.shape[0], self.batch_size):
            batch = chips[start : start + self.batch_size]
            if pin:
                batch = batch.pin_memory()
            yield batch.to(self.device, non_blocking=pin)

    @torch.inference_mode()
    def embed(self, chips: torch.Tensor) -> torch.Tensor:
        """(N, T, 10, S, S) normalised float32 -> (N, D, h, w) float32 on the CPU."""
        if chips.ndim != 5 or chips.shape[2] != 10:
            raise InputContractError(
                f"chips must be (N, T, 10, S, S) normalised tensors; got {tuple(chips.shape)}"
            )
        # Outputs stay on the device until the last batch is queued: on a GPU the
        # forward passes run asynchronously, so the next batch is pinned and its
        # copy queued while the current one computes, and the only wait is the one
        # copy back at the end (an output is 1024 x 7 x 7 floats a chip, 200 kB).
        outputs = []
        for batch in self._batches(chips.float()):
            outputs.append(self.forward(batch))
            with _CHIPS_LOCK:
                _CHIPS_DONE[0] += batch.shape[0]
        return torch.cat(outputs, dim=0).float().cpu()

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """The model on one batch already on the device, at the engine's precision."""
        if self.autocast_dtype is None:
            return self.model(batch)
        with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype):
            return self.model(batch)

    def feature_shape(self, n_frames: int, image_size: int) -> tuple[int, int, int]:
        """(D, h, w) of one chip's features, without running the encoder when its
        architecture is known (ours); the official code is run once on a zero chip."""
        from agrifm_pipeline.model.config import EncoderConfig

        cfg = getattr(self.model, "cfg", None)
        if isinstance(cfg, EncoderConfig):
            h, w = cfg.grid_hw(image_size, image_size)
            return cfg.output_channels(n_frames), h, w
        zero = torch.zeros((1, n_frames, 10, image_size, image_size))
        d, h, w = self.embed(zero).shape[1:]
        return int(d), int(h), int(w)

    def embed_many(self, chip_groups: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        """Embed several (n_i, T, 10, S, S) groups together, in shared batches."""
        groups = list(chip_groups)
        if not groups:
            return []
        sizes = [g.shape[0] for g in groups]
        out = self.embed(torch.cat(groups, dim=0))
        return list(torch.split(out, sizes, dim=0))

    def embed_stream(
        self, groups: Iterable[tuple[K, torch.Tensor]]
    ) -> Iterator[tuple[K, torch.Tensor]]:
        """Embed a stream of (key, (n_i, T, 10, S, S)) groups in shared batches.

        Chips of consecutive groups fill the same batches, so a run of many
        small tile-years keeps the device's batch full; a group is yielded as
        soon as all its chips are done, and at most one batch plus one group
        is held in memory beyond what the caller holds. A group of no chips (a
        tile-year with nothing to encode) costs no encoder time: it is yielded, in
        order, with an empty tensor.
        """
        pending: list[tuple[K, int]] = []  # groups waiting for outputs, with chip counts
        queue: list[torch.Tensor] = []  # input chips not yet run
        queued = 0
        done: list[torch.Tensor] = []  # outputs not yet handed out

        def run(n: int) -> None:
            nonlocal queued, queue
            chips = torch.cat(queue, dim=0) if len(queue) > 1 else queue[0]
            head, rest = chips[:n], chips[n:]
            done.append(self.embed(head))
            queue = [rest] if rest.shape[0] else []
            queued -= n

        def ready() -> Iterator[tuple[K, torch.Tensor]]:
            nonlocal done
            while pending:
                key, n = pending[0]
                if n == 0:
                    pending.pop(0)
                    yield key, torch.empty((0,))
                    continue
                have = sum(d.shape[0] for d in done)
                if have < n:
                    return
                out = torch.cat(done, dim=0) if len(done) > 1 else done[0]
                done = [out[n:]] if out.shape[0] > n else []
                pending.pop(0)
                yield key, out[:n]

        for key, chips in groups:
            pending.append((key, chips.shape[0]))
            if chips.shape[0]:
                queue.append(chips)
            queued += chips.shape[0]
            while queued >= self.batch_size:
                run(self.batch_size)
            yield from ready()
        while queued:
            run(min(queued, self.batch_size))
        yield from ready()


def _warn_if_software_bf16(device: torch.device, precision: str) -> None:
    if device.type == "cpu" and not native_bf16_cpu():
        warnings.warn(
            f"precision={precision!r} on this CPU ({torch.backends.cpu.get_cpu_capability()}, "
            "no AVX512-BF16 or AMX): PyTorch multiplies bfloat16 in software here, many "
            "times slower than float32 for the encoder; use precision='float32' on this machine",
            PerformanceWarning,
            stacklevel=3,
        )


def prefetch(items: Iterable[K], depth: int = 1) -> Iterator[K]:
    """Produce ``items`` on a background thread, up to ``depth`` ahead of the consumer.

    Reading and decompressing the next tile-year's chips then overlaps the
    forward pass of the current one (the encoder's own threads, or the GPU,
    stay busy). Order is kept; an exception in the producer is raised here.
    """
    import queue

    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(("item", item))
            q.put(("done", None))
        except BaseException as exc:  # handed to the consumer
            q.put(("error", exc))

    thread = threading.Thread(target=produce, name="agrifm-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)


_ENGINES: OrderedDict[tuple[Any, ...], EmbeddingEngine] = OrderedDict()
_ENGINES_LOCK = threading.Lock()
_MAX_ENGINES = 2


def get_engine(
    checkpoint: str | Path | None = None,
    *,
    settings: AgriFMSettings | None = None,
    options: InferenceOptions | None = None,
) -> EmbeddingEngine:
    """A cached engine: repeated single-ROI calls load the model once."""
    settings = settings or load_settings()
    options = options or InferenceOptions()
    resolved = resolve_checkpoint(checkpoint, settings)
    key = (
        resolved.sha256,
        str(resolve_device(options.device)),
        resolve_precision(options.precision)[0],
        options.batch_size,
        options.encoder,
    )
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is not None:
            _ENGINES.move_to_end(key)
            return engine
    engine = EmbeddingEngine.create(resolved, settings=settings, options=options)
    with _ENGINES_LOCK:
        _ENGINES[key] = engine
        while len(_ENGINES) > _MAX_ENGINES:
            _ENGINES.popitem(last=False)
    return engine


def clear_engine_cache() -> None:
    with _ENGINES_LOCK:
        _ENGINES.clear()
