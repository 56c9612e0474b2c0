"""Memory figures: the peak memory of one generate (the CUDA allocator's peak, or the sampled resident set
size on CPU) and the size of a KV cache."""

from __future__ import annotations

import ctypes
import os
import threading
import time

import torch

from .. import prune


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator, or sampled resident set size on CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            _map_large_blocks()
            self.base = self.peak = _rss()
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.running = False
            self.thread.join()
            self.bytes = max(self.peak, _rss()) - self.base


def _map_large_blocks() -> None:
    """glibc: serve blocks >= 128 KiB with mmap (returned to the OS on free) and trim the heap."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD; a fixed value also stops its dynamic growth
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def kv_bytes(cache) -> int:
    """Bytes of the keys and values a cache holds, over all layers."""
    return sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in cache.layers)


def attach(model, method: str, budget, budget_scope: str = "per_image", video_scope: str | None = None):
    """The pruning of one configuration, or None for "none"; a video scope only for a prompt with a video."""
    if method == "none":
        return None
    return prune(model, method, budget, budget_scope=budget_scope, **({"video_scope": video_scope} if video_scope else {}))


@torch.inference_mode()
def peak_memory(model, inputs, method: str, budget: int, budget_scope: str = "per_image",
                video_scope: str | None = None) -> float:
    """MB above the pre-call level during generate(max_new_tokens=1). On CPU this changes how glibc maps
    memory for the rest of the process, which slows it down, so it runs after every timing."""
    handle = attach(model, method, budget, budget_scope, video_scope)
    try:
        with PeakMemory(model.device) as memory:
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
    finally:
        if handle:
            handle.remove()
    return memory.bytes / 2**20
