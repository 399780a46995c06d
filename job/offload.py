"""JOB_TRAIN__OFFLOAD_CHECKPOINTS: with gradient checkpointing on a GPU, what checkpointing keeps of each decoder layer
(its input: tokens x hidden size in bf16, 10 KiB a token for each of a 13B's 40 layers) waits for the backward pass in
pinned CPU memory instead of GPU memory.

How: torch's non-reentrant checkpointing (the job's) saves each checkpointed layer's inputs as saved tensors of the
enclosing autograd context, so saved-tensor hooks around the training step see them; the layer's own activations are
not saved (the checkpoint's inner hooks drop them and the recompute brings them back), so they never reach these hooks.
Every CUDA tensor of at least MIN_BYTES saved there (the layer inputs, and the few large tensors saved outside the
layers: the final norm's input, the loss's) is copied to pinned memory on a side stream while the GPU goes on with the
forward, and its GPU memory is released once the copy is done. In the backward, which needs them in the reverse order,
fetching one also starts copying the next one back on the side stream, so the copy overlaps the layer's recompute.

Parameters are never copied (a frozen weight saved by an op is the model's own tensor, not an activation). On a CPU,
or with checkpointing off, nothing happens: the context is a no-op."""

from __future__ import annotations

import contextlib

import torch

from job.decode import side_stream

#: Smaller saved tensors stay where they are: copying them costs more than they hold.
MIN_BYTES = 1 << 20


class _Saved:
    __slots__ = ("device", "host", "copied", "back", "ready")

    def __init__(self, device, host, copied):
        self.device, self.host, self.copied = device, host, copied
        self.back = self.ready = None


class OffloadSaved(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that keep large CUDA activations in pinned CPU memory until the backward needs them."""

    def __init__(self, min_bytes: int = MIN_BYTES):
        self.min_bytes = min_bytes
        self.stream = side_stream(torch.device("cuda", torch.cuda.current_device()))
        self.order: list[_Saved] = []  # in the order saved: the backward takes them from the end
        super().__init__(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        if (not t.is_cuda or isinstance(t, torch.nn.Parameter) or t.numel() * t.element_size() < self.min_bytes
                or isinstance(t._base, torch.nn.Parameter)):
            return t
        host = torch.empty(t.shape, dtype=t.dtype, layout=t.layout, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(self.stream):
            host.copy_(t, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        t.record_stream(self.stream)  # its memory is not reused before the copy has read it
        saved = _Saved(t.device, host, copied)
        self.order.append(saved)
        return saved

    def _fetch(self, saved: _Saved) -> None:
        """Start copying `saved` back to its GPU on the side stream."""
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(saved.copied)
            saved.back = saved.host.to(saved.device, non_blocking=True)
            saved.ready = torch.cuda.Event()
            saved.ready.record(self.stream)

    def _unpack(self, saved):
        if not isinstance(saved, _Saved):
            return saved
        if saved.back is None:
            self._fetch(saved)
        i = _index(self.order, saved)
        if i is not None:  # the one saved before it is most likely the next one the backward needs
            del self.order[i]
            if i > 0 and self.order[i - 1].back is None:
                self._fetch(self.order[i - 1])
        current = torch.cuda.current_stream(saved.device)
        current.wait_event(saved.ready)
        back = saved.back
        back.record_stream(current)
        saved.back = None  # a second unpack (retain_graph) fetches it again
        return back


def _index(order: list, item) -> int | None:
    for i in range(len(order) - 1, -1, -1):
        if order[i] is item:
            return i
    return None


def during_step(enabled: bool):
    """The hooks for one training step (forward and backward) where `enabled` and a GPU is in use, else a no-op."""
    return OffloadSaved() if enabled and torch.cuda.is_available() else contextlib.nullcontext()
