"""dyvte: dynamic visual-token exit (DyVTE) for LLaVA-style models, exported to ONNX/TensorRT.

Importing ``dyvte`` is cheap: torch, onnxruntime, transformers and tensorrt load only when a
function that needs them runs.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
