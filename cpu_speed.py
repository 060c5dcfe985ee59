"""
CPU speed machinery, kept off the method's reading path and applied in one line:

    model = cpu_speed.apply(model)          # sar.py, once the model is built
    cpu_speed.apply(threads=args.threads)   # tokenizer.py (no Linear layers to swap)

Three measured wins for fp32 training and sampling on CPUs (the numbers, the profiles and the commands are in
docs/benchmarks.md):

1. Threads (`set_threads`): use the cores that other processes leave free. OpenMP threads that share a core
   with another busy process spin-wait for each other, which slowed a step several times over on a busy
   2-core machine. $OMP_NUM_THREADS, if set, wins.
2. Freed memory kept (`keep_freed_memory`, glibc only): by default glibc hands large freed blocks back to the
   OS, so every training step faults its activations and gradients in again, page by page; after this a
   process keeps its peak size and a step takes a handful of page faults instead of hundreds of thousands.
3. fp32 Linear layers through oneDNN (`FastLinear`, x86 CPUs): torch runs an fp32 nn.Linear on MKL's sgemm,
   which takes a generic code path on AMD CPUs; oneDNN's kernel, which torch ships too, computes the same
   products faster. apply() turns every nn.Linear of a CPU model into a FastLinear: the same
   parameters and state_dict, its forward and both backward products in oneDNN, and plain F.linear under
   autocast, under torch.compile and on any other device. The same math; fp32 rounding differs in the last
   bits only.

Turn it off: SAR_CPU_SPEED=0 keeps torch's defaults for all three (an explicit thread count still applies);
SAR_ONEDNN=0 turns off only 3. The oneDNN op is private to torch: if a torch release drops or changes it,
apply() warns once and the model keeps F.linear.
"""

import ctypes
import os
import platform
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ENABLED = os.environ.get('SAR_CPU_SPEED', '1') != '0'
ONEDNN_LINEAR = (ENABLED and os.environ.get('SAR_ONEDNN', '1') != '0' and torch.backends.mkldnn.is_available()
                 and platform.machine().lower() in ('x86_64', 'amd64'))


def apply(model=None, threads=0):
    """Threads and allocator for this process; with a model on the CPU, its nn.Linear layers become
    FastLinear (in place). Returns the model. threads > 0 fixes the thread count."""
    if not ENABLED:
        torch.set_num_threads(threads) if threads > 0 else None
        return model
    set_threads(threads)
    keep_freed_memory()
    on_cpu = model is not None and all(p.device.type == 'cpu' for p in model.parameters())
    if on_cpu and ONEDNN_LINEAR and onednn_works():
        for m in model.modules():
            if type(m) is nn.Linear:
                m.__class__ = FastLinear
    return model


def native_bf16():
    """True where the CPU computes bf16 natively (AVX512-BF16): there bf16 autocast is faster than fp32;
    elsewhere torch emulates it, slower than fp32 (docs/benchmarks.md)."""
    return bool(getattr(torch.cpu, '_is_avx512_bf16_supported', lambda: False)())


# ---------------------------------------------------------------------------------------------------------
# 1. threads, 2. allocator
# ---------------------------------------------------------------------------------------------------------
def set_threads(n=0):
    """torch's CPU threads: n if n > 0; else $OMP_NUM_THREADS if it is set (torch already follows it); else
    the cores this process may use minus those other processes keep busy right now: the runnable tasks that
    /proc/loadavg counts now (not the 1-minute average, which still holds the job that just ended), the median
    of 10 looks over ~50 ms. Without /proc, every core is used."""
    if n <= 0 and os.environ.get('OMP_NUM_THREADS'):
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    busy = []
    for _ in range(10 if n <= 0 else 0):
        try:
            with open('/proc/loadavg') as f:
                busy.append(int(f.read().split()[3].split('/')[0]) - 1)  # runnable tasks, this one excluded
        except (OSError, ValueError, IndexError):
            break
        time.sleep(0.005)
    torch.set_num_threads(n if n > 0 else max(1, cores - (sorted(busy)[len(busy) // 2] if busy else 0)))
    return torch.get_num_threads()


def keep_freed_memory():
    """Make glibc's malloc keep the memory it frees: large blocks come from the heap instead of mmap (which
    unmaps them when freed) and the heap's top is never trimmed. A no-op where the C library is not glibc."""
    if platform.libc_ver()[0] != 'glibc':
        return
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-4, 0)    # M_MMAP_MAX = 0: large blocks come from the heap too
        libc.mallopt(-1, -1)   # M_TRIM_THRESHOLD = -1: never trim the heap
    except (OSError, AttributeError, TypeError):
        pass


# ---------------------------------------------------------------------------------------------------------
# 3. fp32 Linear layers through oneDNN
# ---------------------------------------------------------------------------------------------------------
def _onednn_mm(a, b, bias=None):
    """a (M, K) @ b (N, K)^T [+ bias] -> (M, N), oneDNN's fp32 matmul; strided (transposed) views are fine."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, 'none', [], '')


_ONEDNN_OK = None


def onednn_works():
    """Whether this torch still has the oneDNN op and it computes F.linear (checked once, on a tiny product);
    if not, one warning line, and the caller keeps F.linear."""
    global _ONEDNN_OK
    if _ONEDNN_OK is None:
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*s, generator=g) for s in ((5, 8), (3, 8), (3,)))
        try:
            _ONEDNN_OK = torch.allclose(_onednn_mm(x, w, b), F.linear(x, w, b), atol=1e-5)
            why = 'its result differs from F.linear'
        except Exception as e:  # an op missing or with another signature in a future torch
            _ONEDNN_OK, why = False, f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        if not _ONEDNN_OK:
            print(f"warning: cpu_speed: the oneDNN linear kernel is not usable in torch {torch.__version__} "
                  f"({why}); Linear layers use F.linear", file=sys.stderr)
    return _ONEDNN_OK


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b for a 2-D x (M, K); the forward and both gradient products (g W, g^T x) in oneDNN."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        ctx.has_bias = bias is not None
        return _onednn_mm(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):                                                               # g (M, N)
        x, weight = ctx.saved_tensors
        gx = _onednn_mm(g, weight.t()) if ctx.needs_input_grad[0] else None             # g W
        gw = _onednn_mm(g.t(), x.t()) if ctx.needs_input_grad[1] else None              # g^T x
        gb = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def linear(x, weight, bias=None):
    """F.linear, with the products of an fp32 CPU linear (no autocast, not under torch.compile, which picks its
    own kernels) in oneDNN."""
    if (x.device.type == 'cpu' and x.dtype == weight.dtype == torch.float32 and x.numel()
            and not torch.is_autocast_enabled('cpu') and not torch.compiler.is_compiling()):
        y = _OneDNNLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias)             # (M, N), M = rows of x
        return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class FastLinear(nn.Linear):
    """nn.Linear (same parameters and state_dict) computed by linear() above; apply() makes it."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)
