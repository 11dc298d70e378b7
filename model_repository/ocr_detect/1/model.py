"""ONNX model served by the shared onnxruntime runner (see moderation/serving/onnx_model.py)."""
from moderation.serving.onnx_model import OnnxRunner as TritonPythonModel

__all__ = ["TritonPythonModel"]  # the class Triton's python backend loads
