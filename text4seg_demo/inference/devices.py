"""Which device a model runs or trains on, the precision it is served in there, and what the
CPU computes natively."""

from __future__ import annotations

from contextlib import contextmanager

QUANTS = ("auto", "4bit", "8bit", "bf16", "fp16", "fp32")
SMALL_PRODUCT = 2**20  # weights of a projection small enough to stay in one core's cache


def choose_device(requested: str | None = None):
    import torch

    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def describe(device) -> str:
    """The hardware behind ``device`` in words, for training records: the GPU's name, or the CPU
    model and its cores."""
    import os
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    return f"{os.cpu_count()}-core CPU ({model}{', bf16' if native_bf16() else ''})"


def _cpuinfo() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read().splitlines()
    except OSError:
        return []


def native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX) rather than emulating it."""
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpp_compiler() -> str | None:
    """The C++ compiler torch.compile would build CPU kernels with (``$CXX``, else g++ or clang++), if any."""
    import os
    import shutil

    return next(filter(None, (shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "clang++") if c)), None)


def plan_precision(quant: str, device) -> tuple[str, str]:
    """What can actually be served for ``quant`` on ``device``, and a note when it differs."""
    if quant not in QUANTS:
        raise ValueError(f"unknown --quant {quant!r}; expected one of {QUANTS}")
    if quant == "auto":
        return ("4bit", "") if device.type == "cuda" else ("fp16" if device.type == "mps" else "fp32", "")
    if quant == "8bit" and device.type == "cpu":  # the project's own int8 decode steps (decode_step.py)
        return "8bit", ""
    if quant in ("4bit", "8bit"):
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return "fp32" if device.type == "cpu" else "fp16", f"{quant} needs bitsandbytes (pip install bitsandbytes)"
        if device.type == "mps":
            return "fp16", f"bitsandbytes has no {quant} kernels for Apple MPS"
    if device.type == "cpu" and quant in ("fp16", "bf16"):
        notes = ["fp16 matrix products are slow or missing on CPU"] if quant == "fp16" else []
        if not native_bf16():
            notes.append("this CPU has no bf16 instructions, so bf16 is emulated: half the memory of fp32, "
                         "but several times slower")
        return "bf16", "; ".join(notes)
    return quant, ""


def decode_threads(model) -> int | None:
    """Threads for the single-token decode steps of ``model`` on a CPU: one when every projection
    of its language model is small (under :data:`SMALL_PRODUCT` weights, as in the bundled
    256-wide models), else None (torch's setting). A matrix-vector product that small is done
    before a second thread is worth waking, and a second thread that waits for a busy core (the
    browser, the web server, another job) stalls every step: on a 2-core CPU the bundled model
    decodes about as fast on one thread as on two when idle, and many times faster beside a busy core."""
    import torch

    text = model.get_decoder() if hasattr(model, "get_decoder") else model
    largest = max((m.weight.numel() for m in text.modules() if isinstance(m, torch.nn.Linear)), default=0)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    largest = max(largest, head.weight.numel() if head is not None else 0)
    return 1 if largest < SMALL_PRODUCT else None


@contextmanager
def intra_op_threads(n: int | None):
    """torch's intra-op thread count set to ``n`` inside the block (None: left as it is)."""
    import torch

    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
