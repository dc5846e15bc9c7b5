"""What a released ZeRO-3 parameter is: an object that refuses to be read.

Stage 3 keeps only this rank's chunk of a partitioned parameter between uses. The parameter
object stays (autograd, hooks and the user's references hold it), with its shape, and with
its class swapped for a subclass of its own class whose `__torch_function__` lets metadata
through (shape, dtype, device, `.grad`, hooks) and hands any read of its values to the stage
that owns it (`Reader.read_released`). The stage gathers the parameter when the read comes
from inside a forward or the backward (a weight used by a module that does not own it), and
otherwise raises `ParameterNotGathered` naming the parameter. The class is swapped back when
the parameter is gathered, so a gathered parameter costs nothing.

Why not a NaN or an empty placeholder alone: a NaN placeholder is read silently (training goes
on with a wrong update), and kernels handed a tensor whose storage was resized to zero bytes
may crash the process rather than raise. The placeholder under the swapped class is still a
one-element NaN expanded to the shape (stride 0): a read that bypasses `__torch_function__`
(C++ code handed the tensor directly) cannot touch unowned memory, and AccumulateGrad, which
lays out a gradient after the parameter it accumulates into, sees the parameter's shape.
"""

from __future__ import annotations

import weakref
from typing import Protocol

import torch
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

_T = torch.Tensor
METADATA = frozenset({
    *(getattr(_T, name).__get__ for name in (
        "shape", "dtype", "device", "requires_grad", "grad", "is_leaf", "grad_fn", "layout", "ndim", "is_cuda",
        "is_cpu", "is_meta", "is_sparse", "is_quantized", "is_nested", "_base", "output_nr", "_version", "itemsize",
        "nbytes", "retains_grad")),
    *(getattr(_T, name).__set__ for name in ("grad", "requires_grad", "data")),
    *(getattr(_T, name) for name in (
        "size", "dim", "numel", "nelement", "element_size", "stride", "storage_offset", "is_floating_point",
        "is_complex", "is_signed", "is_contiguous", "untyped_storage", "data_ptr", "get_device", "requires_grad_",
        "register_hook", "register_post_accumulate_grad_hook", "retain_grad", "__hash__", "__len__", "is_pinned",
        "is_shared", "new_empty", "new_zeros", "new_ones", "new_full", "new_empty_strided")),
    torch.empty_like, torch.zeros_like, torch.ones_like, torch.full_like,
})
"""Functions that read a parameter's metadata, never its values: allowed while it is released."""


class ParameterNotGathered(RuntimeError):
    """A released ZeRO-3 parameter was read where nothing gathers it."""


class Reader(Protocol):
    def read_released(self, param: torch.Tensor) -> None:
        """Gather `param` for a read now, or raise ParameterNotGathered."""


_READERS: WeakIdKeyDictionary = WeakIdKeyDictionary()
"""Released parameter -> a weak reference to the stage that owns it (a strong one would keep
the parameter, and so the entry and the whole model, alive through the stage)."""
_CLASSES: dict[type, type] = {}
"""A parameter class -> its released subclass."""
_ORIGINAL: dict[type, type] = {}
"""A released subclass -> the class it was made for."""


def _released_function(cls, func, types, args=(), kwargs=None):
    kwargs = kwargs or {}
    if func in METADATA:
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)
    for leaf in tree_leaves((args, kwargs)):
        if type(leaf) in _ORIGINAL:
            reader = _READERS[leaf]()
            if reader is None:
                raise ParameterNotGathered("a ZeRO-3 parameter of an engine that no longer exists was read: its "
                                           "values lived in that engine's shards")
            reader.read_released(leaf)  # gathers it (its class is swapped back) or raises
    return func(*args, **kwargs)


def released_class(cls: type) -> type:
    """The released subclass of parameter class `cls` (made once per class)."""
    if cls not in _CLASSES:
        sub = type(f"Released{cls.__name__}", (cls,), {
            "__torch_function__": classmethod(_released_function),
            "__doc__": f"A ZeRO-3 {cls.__name__} whose values live in other ranks' shards (runtime/zero/released.py).",
        })
        _CLASSES[cls] = sub
        _ORIGINAL[sub] = cls
    return _CLASSES[cls]


def mark_released(param: torch.Tensor, *, reader: Reader) -> None:
    """Make reads of `param` go to `reader` (after its data became the placeholder)."""
    _READERS[param] = weakref.ref(reader)
    if type(param) not in _ORIGINAL:
        param.__class__ = released_class(type(param))


def mark_gathered(param: torch.Tensor) -> None:
    """Give `param` its own class back (before its data becomes the whole tensor)."""
    original = _ORIGINAL.get(type(param))
    if original is not None:
        param.__class__ = original


def is_released(param: torch.Tensor) -> bool:
    return type(param) in _ORIGINAL
