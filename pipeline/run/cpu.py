"""CPU settings of the process that runs the forward: glibc's freed-memory threshold, oneDNN's fp32 matmul mode."""

from __future__ import annotations

import ctypes
import logging
import time

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


KEEP_FREED_BYTES = 256 * 2**20  # blocks up to this size stay in the heap when freed (see keep_freed_memory)


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed blocks of up to 256 MiB for reuse instead of returning them to the system.

    A CPU forward frees and allocates the same large activations batch after
    batch; by default glibc returns them with ``munmap`` and every batch faults
    its pages in again. Returns False where there is no glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameters, from glibc's malloc.h
    return bool(libc.mallopt(m_mmap_threshold, KEEP_FREED_BYTES) and libc.mallopt(m_trim_threshold, KEEP_FREED_BYTES))


FP32_MATMUL_RTOL = 1e-5  # fp32 matmuls are ~1e-6 from float64 here; one pass of bf16 inputs is 6e-3 to 7e-3


PROBE_TOKENS = 8192  # tokens per timed probe: a batch of max_len 256 or 4096, two cells at 3200


def fp32_matmul_probe(dim: int, n_heads: int, n_tokens: int, seed: int = 0) -> tuple[float, float]:
    """Error and time of fp32 matmuls and attention at a transformer block's shapes, under the current settings.

    The probe is ``[T, dim] @ [dim, 4 dim] @ [4 dim, dim]`` and scaled-dot-product
    attention over cells of ``n_tokens`` tokens in ``n_heads`` heads, for
    ``T`` = :data:`PROBE_TOKENS` tokens (at least one cell), on random inputs.

    Returns
    -------
    error
        The largest absolute difference from float64 over the largest absolute
        float64 value, on the matmuls and on the first cell's attention.
    seconds
        The fastest of three timed runs of the probe, after one untimed.
    """
    gen = torch.Generator().manual_seed(seed)
    n_cells = max(1, PROBE_TOKENS // n_tokens)
    x = torch.randn(n_cells * n_tokens, dim, generator=gen)
    w_in, w_out = torch.randn(dim, 4 * dim, generator=gen), torch.randn(4 * dim, dim, generator=gen) / 2
    q, k, v = torch.randn(3, n_cells, n_heads, n_tokens, dim // n_heads, generator=gen)

    def block():
        return x @ w_in @ w_out, F.scaled_dot_product_attention(q, k, v)

    with torch.inference_mode():
        seconds = []
        for _ in range(4):
            start = time.perf_counter()
            mlp, attention = block()
            seconds.append(time.perf_counter() - start)
        mlp_ref = x.double() @ w_in.double() @ w_out.double()
        attention_ref = F.scaled_dot_product_attention(q[:1].double(), k[:1].double(), v[:1].double())
    pairs = [(mlp, mlp_ref), (attention[:1], attention_ref)]
    error = max(float((out.double() - ref).abs().max() / ref.abs().max()) for out, ref in pairs)
    return error, min(seconds[1:])


def fp32_matmul_precision() -> str | None:
    """``torch.backends.mkldnn.matmul.fp32_precision``, or None with a torch that lacks the setting or oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return None
    return getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", None)


def fast_fp32_matmul(dim: int, n_heads: int, n_tokens: int) -> bool:
    """Let oneDNN run fp32 matmuls and CPU attention on bf16 units where that is as exact as fp32, and faster.

    How exact and fast ``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``
    is depends on the CPU's kernels and on the shapes, so it is probed at the
    model's shapes (:func:`fp32_matmul_probe`) and kept only if within
    ``FP32_MATMUL_RTOL`` of float64 and at least 10% faster than fp32
    instructions. Returns whether it is on (False without the setting or oneDNN).
    """
    previous = fp32_matmul_precision()
    if previous is None:
        return False
    matmul = torch.backends.mkldnn.matmul
    matmul.fp32_precision = "ieee"
    fp32_seconds = fp32_matmul_probe(dim, n_heads, n_tokens)[1]
    matmul.fp32_precision = "bf16"
    error, bf16_seconds = fp32_matmul_probe(dim, n_heads, n_tokens)
    keep = error <= FP32_MATMUL_RTOL and bf16_seconds < 0.9 * fp32_seconds
    log.debug("fp32 matmuls on bf16 units: %.2g from float64, %.2gx the time of fp32 units: %s", error,
             bf16_seconds / fp32_seconds, "used" if keep else "not used")  # fmt: skip
    if not keep:
        matmul.fp32_precision = previous
    return keep
