"""How a model may be quantized: the choices that the command line and the settings offer, without torch.

`int8serve --help` lists them, and a wrong one is refused before anything heavy is imported; int8.py and loader.py,
which act on them, take them from here.
"""

from __future__ import annotations

__all__ = ["DEFAULT_GROUP_SIZE", "DEFAULT_QUANTIZER", "GROUP_SIZES", "QUANTIZERS", "QUANTIZER_TIMES"]

# The default weight scheme: one bf16 scale per 32 input values (0 = per output channel). Chosen by measurement
# (benchmarks/accuracy.py, docs/benchmarks.md "int8 accuracy"; stories260K against fp32 through the kernel with
# precise activations, rounding to nearest): per 32, KLD 0.000636 and top-1 98.51%; per channel 0.000794 and 98.36%;
# at 6% more bytes per step (a 2-byte scale per 32 weights). With GPTQ's rounding (gptq.py, the loader's default)
# per 32 reaches issue #10's targets: KLD 0.000482, top-1 98.78% (targets 0.0005, 98.7%). Since the output head keeps
# its rounding error for the logits it refines (Int8Linear.set_residual): 0.000418 / 98.90% through the kernel with
# precise activations, 0.000473 / 98.81% through the bf16 prefill kernel (Zen 4, 2026-12-05).
DEFAULT_GROUP_SIZE = 32
GROUP_SIZES = (0, 32, 64, 128)

# How full-precision weights become int8: "gptq" (error-compensating, calibrated on the package's own text: the
# default, measured more accurate) or "rtn" (each weight rounded to its nearest step: no calibration, faster).
QUANTIZERS = ("gptq", "rtn")
DEFAULT_QUANTIZER = "gptq"
# What each took on the 7B shape (docs/benchmarks.md, "First and later start of a 7B-shape model" and the notes
# below it), said alike by the help of serve, quantize and eval-ppl and by the README (tests/test_settings.py)
QUANTIZER_TIMES = ("a 7B model's first quantization on 2 cores took 10 to 23 minutes with gptq (581 s on an Emerald "
                   "Rapids, 1395 s on a Zen 4) and 13 minutes with rtn (808 s on a shared Sapphire Rapids)")
