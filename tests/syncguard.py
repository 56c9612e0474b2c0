"""What would synchronise a CUDA stream, caught on any device: a dispatch mode that refuses the ATen
operations which read a tensor back to the host or produce a shape that depends on its values."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# item(), bool(), int(), float(), tolist() and torch.equal read values; nonzero, unique, masked_select and
# boolean-mask indexing size their output by them; a copy to the CPU waits for the stream.
READS_BACK = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default,
              aten.nonzero.default, aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
              aten.unique_consecutive.default, aten.repeat_interleave.Tensor}


class HostReadError(AssertionError):
    pass


class NoHostReads(TorchDispatchMode):
    """Raise HostReadError on any operation in READS_BACK beyond the first `allowed` (counted in `reads`), any
    index by a boolean mask, and any copy of a tensor from a non-CPU device to the CPU."""

    def __init__(self, allowed: int = 0):
        super().__init__()
        self.allowed, self.reads = allowed, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in READS_BACK:
            self.reads += 1
            if self.reads > self.allowed:
                raise HostReadError(f"{func} reads a tensor back to the host")
        if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None):
                raise HostReadError(f"{func} with a boolean mask sizes its output by the mask's values")
        if func is aten._to_copy.default and kwargs.get("device") is not None:
            source = args[0].device
            if source.type != "cpu" and torch.device(kwargs["device"]).type == "cpu":
                raise HostReadError("a copy to the CPU")
        return func(*args, **kwargs)
