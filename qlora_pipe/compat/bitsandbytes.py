"""Reaches into bitsandbytes. Verified with bitsandbytes 0.50.2 (0.51.x allowed by pyproject).

keep_plain_nf4_on_cpu
    In eval mode without grad (evaluation, generation) bitsandbytes 0.50 repacks a CPU layer's weight
    in place for its AVX512-BF16 kernel, converting the absmax constants to bf16 and undoing double
    quantization. The inverse on save is lossy, so the base the adapter trains against would silently
    change after the first evaluation (the training loss of the same batch moved by ~1e-4). GPU runs
    never take this path. Turned off through the layer's ``support_avx512bf16_for_cpu`` attribute.
    Remove once bitsandbytes' CPU packing is lossless or opt-in.
    Caught by: tests/test_model.py::test_evaluation_does_not_alter_the_4bit_base.

quantized_like_loading, dequantized_fp32
    The export rebuilds dequant(quant(W)) for one tensor at a time with the same class and settings the
    training load used (``Params4bit`` moved to a device quantizes it), so the merge adds the LoRA delta
    to exactly the weights the adapter was trained against. The dequant runs in fp32 by giving a copy of the
    quant state ``dtype = float32`` (bitsandbytes writes its output in that dtype; verified: the bf16
    dequant equals this fp32 one rounded to bf16, bit for bit).
    Caught by: tests/test_export.py::test_merge_is_faithful_and_reloads_with_plain_transformers and
    tests/test_merge_delta.py (a delta below one bf16 step is kept).

NF4Rows
    The same dequant(quant(W)) built a block of rows at a time, so that no fp32 copy of a whole weight is
    made (bitsandbytes' quantizer alone makes several of its input). NF4 quantizes blocks of ``blocksize``
    consecutive values each on its own, so rows starting on a block boundary quantize to the same packed
    bytes and absmax as the whole weight; with double quantization bitsandbytes then quantizes all the
    absmax values at once around their mean (``functional.quantize_4bit``: ``offset = absmax.mean()``,
    ``quantize_blockwise(absmax - offset, blocksize=256)``) and dequantizes them before the 4-bit values
    (``functional.dequantize_4bit``): both steps are repeated here on every block's absmax together, and
    each block is dequantized with its share. The blocksize is ``Params4bit``'s default, as loading uses it.
    Caught by: tests/test_export_memory.py::test_nf4_rows_are_the_bits_of_the_whole_weight.

quiet_hub_kernel_notice
    On a CPU with AVX512-BF16, importing bitsandbytes tries to fetch a CPU gemv kernel from the Hub
    (``kernels-community/quantization-bitsandbytes``, backends/cpu/ops.py) and logs a warning when it
    cannot (offline, no ``kernels``, an untrusted publisher): on every command. That kernel only serves
    the CPU inference fast path keep_plain_nf4_on_cpu turns off, so the notice is dropped (shown with
    --debug) by a filter on that module's logger, matched on the message's start. With the Hub offline,
    the ``kernels`` library (verified with kernels 0.19.1) first logs that it skips the publisher trust check
    of that same repository (``kernels._internals.hf_hub``): dropped the same way, for that repository only.
    Remove when bitsandbytes stops fetching at import. Caught by:
    tests/test_doctor.py::test_bitsandbytes_noise_and_failure and tests/test_terminal.py (train, export).

load_problem, kernel_description
    Whether bitsandbytes imports at all (doctor fails, and the commands that load 4-bit weights refuse in
    one line, when it does not), and which 4-bit kernel a run uses: ``cextension.BNB_BACKEND`` and the
    native library's name. Caught by: tests/test_doctor.py::test_bitsandbytes_noise_and_failure.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_pipe.errors import UserError

if TYPE_CHECKING:  # torch loads only when a function runs: the CLI installs the log filter before any command
    import torch
    from torch import nn

VERIFIED = {"bitsandbytes": "0.50.2", "kernels": "0.19.1"}
HUB_KERNEL_REPO = "kernels-community/quantization-bitsandbytes"
# logger -> the start of the notice it logs about bitsandbytes' Hub kernel at import
HUB_KERNEL_NOTICES = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
    "kernels._internals.hf_hub": f"Skipping publisher trust check for '{HUB_KERNEL_REPO}'",
}
INSTALL_HINT = "pip install -c qlora_pipe/constraints.txt bitsandbytes"


class _DropHubKernelNotice(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def quiet_hub_kernel_notice() -> None:
    """Drop the import-time notices about bitsandbytes' Hub CPU kernel (see above); idempotent."""
    for name, start in HUB_KERNEL_NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropHubKernelNotice) for f in logger.filters):
            logger.addFilter(_DropHubKernelNotice(start))


def load_problem() -> str | None:
    """Why bitsandbytes does not import (a broken install, a missing native library), or None."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # any failure inside its import is the same answer: it cannot be used
        return f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    return None


def require_bitsandbytes(command: str) -> None:
    """A one-line refusal, before any work, for a command that loads or writes 4-bit weights."""
    problem = load_problem()
    if problem is not None:
        raise UserError(f"{command}: bitsandbytes does not load ({problem}); 4-bit models need it: {INSTALL_HINT}")


def kernel_description() -> str:
    """The 4-bit kernel this machine's runs use."""
    import torch
    from bitsandbytes import cextension

    backend = getattr(cextension, "BNB_BACKEND", "unknown")
    native = getattr(getattr(cextension, "lib", None), "_lib", None)  # the ctypes CDLL bitsandbytes loaded
    library = Path(native._name).name if native is not None else "no native library"
    if torch.cuda.is_available():
        return f"{backend}: bitsandbytes' native 4-bit kernels ({library})"
    return (
        f"{backend}: NF4 dequantized by bitsandbytes ({library}), matmul by torch; its AVX512-BF16 inference path "
        "and that path's Hub kernel stay off (they repack the 4-bit weights in place)"
    )


def keep_plain_nf4_on_cpu(model: nn.Module) -> None:
    """Turn off bitsandbytes' CPU inference fast path on the model's 4-bit layers (see above)."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def quantized_like_loading(value: torch.Tensor, quant_type: str, double_quant: bool, quant_storage: torch.dtype):
    """The 4-bit parameter a CPU load with these settings makes of ``value`` (bitsandbytes' Params4bit)."""
    import bitsandbytes as bnb

    return bnb.nn.Params4bit(
        value, requires_grad=False, compress_statistics=double_quant, quant_type=quant_type, quant_storage=quant_storage
    ).to("cpu")


def dequantized_fp32(param) -> torch.Tensor:
    """dequant() of a quantized Params4bit computed in fp32: the exact NF4 values (code x absmax). Training's
    dequant in the compute dtype is this value rounded once (bitsandbytes dequantizes into the quant state's
    dtype); adding the LoRA delta to that already-rounded weight and rounding again would drop every delta
    under half a 16-bit step, so the export adds it here and rounds once."""
    import copy

    import bitsandbytes as bnb
    import torch

    state = copy.copy(param.quant_state)  # a shallow copy: the packed data and constants are shared, not copied
    state.dtype = torch.float32
    return bnb.functional.dequantize_4bit(param.data, state)


class NF4Rows:
    """dequant(quant(W)) of one weight, a block of rows at a time (see above): the bits of
    ``dequantized_fp32(quantized_like_loading(W))``, without a whole fp32 copy of W."""

    def __init__(self, quant_type: str, double_quant: bool) -> None:
        import bitsandbytes as bnb
        import torch

        self.quant_type, self.double_quant = quant_type, double_quant
        self.blocksize: int = bnb.nn.Params4bit(torch.empty(0), requires_grad=False).blocksize
        self.packed: list[torch.Tensor] = []
        self.shapes: list[tuple[int, ...]] = []
        self.first: list[int] = []  # each block's first absmax
        self.absmax: list[torch.Tensor] = []
        self.scales: torch.Tensor | None = None  # every absmax, as dequantization sees it

    def add(self, rows: torch.Tensor) -> None:
        """Quantize the next rows (in the compute dtype; they start on a quantization block's boundary)."""
        import bitsandbytes as bnb
        import torch

        packed, state = bnb.functional.quantize_4bit(
            rows,
            blocksize=self.blocksize,
            compress_statistics=False,
            quant_type=self.quant_type,
            quant_storage=torch.uint8,
        )
        self.first.append(sum(len(a) for a in self.absmax))
        self.packed.append(packed)
        self.shapes.append(tuple(rows.shape))
        self.absmax.append(state.absmax)

    def finish(self) -> None:
        """The absmax values of every block together: double quantization and back, as bitsandbytes does."""
        import bitsandbytes as bnb
        import torch

        absmax, self.absmax = torch.cat(self.absmax), []
        if self.double_quant:
            offset = absmax.mean()
            quantized, state2 = bnb.functional.quantize_blockwise(absmax - offset, blocksize=256)
            absmax = bnb.functional.dequantize_blockwise(quantized, state2)
            absmax += offset
        self.scales = absmax.float()

    def rows(self, index: int) -> torch.Tensor:
        """Block ``index`` dequantized in fp32."""
        import bitsandbytes as bnb
        import torch

        shape, first = self.shapes[index], self.first[index]
        count = -(-math.prod(shape) // self.blocksize)
        state = bnb.functional.QuantState(
            absmax=self.scales[first : first + count],
            shape=torch.Size(shape),
            dtype=torch.float32,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
        )
        return bnb.functional.dequantize_4bit(self.packed[index], state)
