"""postprocess: see moderation/serving/postprocess_model.py."""
from moderation.serving.postprocess_model import PostprocessModel as TritonPythonModel

__all__ = ["TritonPythonModel"]  # the class Triton's python backend loads
