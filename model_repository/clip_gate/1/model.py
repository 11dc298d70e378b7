"""clip_gate: see moderation/serving/clip_gate_model.py."""
from moderation.serving.clip_gate_model import ClipGateModel as TritonPythonModel

__all__ = ["TritonPythonModel"]  # the class Triton's python backend loads
