"""2-bit-aware mixed 2/4-bit quantization: the matrix quantizer and its packed form
(mixed), checkpoint quantization and loading on QuantLinear (model), calibration, GGUF
export and evaluation. `weightops.quant.load(OUT)` returns a transformers model running
on the packed weights."""

from weightops.quant.mixed import Packed, QuantError, dequantize, quantize
from weightops.quant.model import QuantLinear, load, quantize_model

__all__ = [
    "Packed",
    "QuantError",
    "QuantLinear",
    "dequantize",
    "load",
    "quantize",
    "quantize_model",
]
