"""2-bit-aware mixed 2/4-bit quantization (work in progress: the matrix quantizer and
its packed form; the model-level quantizer, QuantLinear, loading and export follow)."""

from weightops.quant.mixed import Packed, QuantError, dequantize, quantize

__all__ = ["Packed", "QuantError", "dequantize", "quantize"]
