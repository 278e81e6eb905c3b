"""Process-level speed settings for CPU and GPU inference, applied once per process.

On CPU, eager PyTorch is bound by page faults under glibc's malloc: every forward pass mmaps and
unmaps its ~50 MB activation buffers. tcmalloc (``LD_PRELOAD``) avoids that; without it we
raise glibc's mmap threshold in-process with ``mallopt`` so freed buffers are reused, which
gives most of the same gain. Models run in ``channels_last`` (about 1.25x on CPU), with each
BatchNorm that follows a convolution folded into it, and in bfloat16 where the hardware computes
it natively (:func:`inference_autocast`).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import functools
import logging
import os

import cv2
import torch
from torch.nn.utils.fusion import fuse_conv_bn_eval

from agman_milvus.core.config import Precision
from agman_milvus.core.errors import ConfigurationError
from agman_milvus.core.threads import cpu_count, set_limit

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_configured = False

TCMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                  "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4")


def tcmalloc_loaded() -> bool:
    return "tcmalloc" in os.environ.get("LD_PRELOAD", "")


def tcmalloc_path() -> str | None:
    """The tcmalloc library to preload into worker processes, if installed."""
    return next((p for p in TCMALLOC_PATHS if os.path.exists(p)), None)


def tune_glibc_malloc() -> bool:
    """Keep freed activation buffers in the heap instead of returning them to the OS, in one
    arena for every thread made afterwards: in a thread of its own arena the model ran at 7.8 ms
    an image against 4.1 in the main thread, 5.5 with one arena (the embedded default's
    screening thread; docs/benchmarks.md)."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    try:
        libc = ctypes.CDLL(libc_name)
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, 2**30) == 1
        ok &= libc.mallopt(_M_ARENA_MAX, 1) == 1
        return bool(ok)
    except (OSError, AttributeError):
        return False


def configure_process() -> None:
    """Apply the allocator and thread settings (idempotent)."""
    global _configured
    if _configured:
        return
    _configured = True
    if not tcmalloc_loaded():
        logger.debug("glibc malloc tuned for inference: %s", tune_glibc_malloc())
    torch.set_num_threads(cpu_count())


def limit_threads(threads: int) -> None:
    """Hold this process's CPU work to ``threads`` threads: PyTorch's and OpenCV's own pools and
    the thread pools of :mod:`agman_milvus.core.threads`. Several processes on one machine
    (``agman worker -c N``) then share its cores instead of each running one thread a core: on
    2 cores ``-P prefork -c 2`` ran a screening job at a median 8.6 checks/s against 6.7 for one
    worker on both cores, where two workers on both cores each were slower than one
    (docs/benchmarks.md)."""
    set_limit(threads)
    torch.set_num_threads(cpu_count())
    cv2.setNumThreads(cpu_count())
    logger.info("CPU work of process %d held to %d thread(s)", os.getpid(), cpu_count())


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` means CUDA when available, else CPU; ``cuda`` on a machine without a CUDA
    device is a :class:`~agman_milvus.core.errors.ConfigurationError`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError("device 'cuda' was asked for but no CUDA device is available "
                                 "(use auto or cpu)")
    return torch.device(device)


@functools.cache
def native_bfloat16_cpu() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX tiles): there oneDNN runs
    a bfloat16 convolution about twice as fast as a float32 one; elsewhere it emulates bfloat16,
    more slowly than float32. (The probes are torch's own, private: absent, the answer is no.)"""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def uses_bfloat16(device: torch.device, precision: Precision = "auto") -> bool:
    """Whether inference on ``device`` computes in bfloat16: for ``precision`` "bfloat16", and
    for "auto" on CUDA and on a CPU with native bfloat16 (:func:`native_bfloat16_cpu`)."""
    if precision == "auto":
        return device.type != "cpu" or native_bfloat16_cpu()
    return precision == "bfloat16"


def inference_autocast(device: torch.device,
                       precision: Precision = "auto") -> contextlib.AbstractContextManager:
    """bfloat16 autocast where :func:`uses_bfloat16`, else nothing (float32)."""
    if uses_bfloat16(device, precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_for_inference(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A copy of ``model`` for inference: eval mode, each BatchNorm that follows a convolution
    folded into it (:func:`fold_batchnorm`), on ``device``, channels_last memory format.
    ``model`` itself is left as it is (it may be trained further)."""
    configure_process()
    model = fold_batchnorm(copy.deepcopy(model).eval())
    return model.to(device=device, memory_format=torch.channels_last)


def fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every eval-mode ``BatchNorm2d`` that directly follows a ``Conv2d`` in a
    ``Sequential`` (torchvision's MobileNetV2 and ResNet downsample blocks) into the convolution's
    weights, in place: one pass over the activations fewer. In a screening job's MobileNetV2
    embedding, the BatchNorms had taken 29% of the time (py-spy; docs/benchmarks.md)."""
    for module in model.modules():
        if not isinstance(module, torch.nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:], strict=False):
            conv, norm = module._modules[first], module._modules[second]
            if isinstance(conv, torch.nn.Conv2d) and isinstance(norm, torch.nn.BatchNorm2d):
                module._modules[first] = fuse_conv_bn_eval(conv, norm)
                module._modules[second] = torch.nn.Identity()
    return model
