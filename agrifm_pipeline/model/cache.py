"""A small per-shape cache for tensors that depend only on a feature map's geometry.

The encoder's shift masks and attention biases are functions of a few sizes
(padded size, window, shift, dtype, device) and, for the bias, of one parameter
(the position-bias table). A forward pass over chips of one size asks for the
same few every time, so each owner keeps the last few it built.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch


class ShapeCache:
    """The ``maxsize`` most recently used tensors, by key (least recently used goes first).

    ``depends_on``, where given, is a tensor the value was computed from (a
    parameter): an entry is used only while that tensor still holds the bytes
    it held when the entry was made, so loading or editing weights in place can
    never serve a stale value. The check is a byte comparison on the calling
    thread (``torch.equal`` may fan out to the intra-op thread pool, which costs
    more than the comparison at these sizes). Entries are not made while autograd records a
    graph through ``depends_on`` (the value must then be part of the graph), and
    not on devices other than the CPU when ``depends_on`` is given: checking a
    GPU tensor's values would wait for the device on every call, and building
    the value there costs a few kernel launches. Values made under
    ``torch.inference_mode`` are kept apart from the others (inference tensors
    cannot be saved for a backward pass).
    """

    def __init__(self, maxsize: int = 8) -> None:
        self.maxsize = maxsize
        self._entries: OrderedDict[Hashable, tuple[bytes | None, torch.Tensor]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def get(
        self,
        key: Hashable,
        build: Callable[[], torch.Tensor],
        depends_on: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The cached value for ``key``, else ``build()`` (kept when cacheable)."""
        if depends_on is not None and (
            depends_on.device.type != "cpu"
            or (torch.is_grad_enabled() and depends_on.requires_grad)
        ):
            return build()
        key = (key, torch.is_inference_mode_enabled())
        hit = self._entries.get(key)
        current = None if depends_on is None else _contents(depends_on)
        if hit is not None and hit[0] == current:
            self._entries.move_to_end(key)
            return hit[1]
        value = build()
        self._entries[key] = (current, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)
        return value


def _contents(t: torch.Tensor) -> bytes:
    """The bytes of a CPU tensor's values."""
    return t.detach().contiguous().view(torch.uint8).numpy().tobytes()
