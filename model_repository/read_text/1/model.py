"""read_text: see moderation/serving/read_text_model.py."""
from moderation.serving.read_text_model import ReadTextModel as TritonPythonModel

__all__ = ["TritonPythonModel"]  # the class Triton's python backend loads
