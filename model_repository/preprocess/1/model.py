"""preprocess: see moderation/serving/preprocess_model.py."""
from moderation.serving.preprocess_model import PreprocessModel as TritonPythonModel

__all__ = ["TritonPythonModel"]  # the class Triton's python backend loads
