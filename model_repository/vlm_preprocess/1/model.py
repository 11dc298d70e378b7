"""vlm_preprocess: see moderation/serving/vlm_preprocess_model.py."""
from moderation.serving.vlm_preprocess_model import VlmPreprocessModel as TritonPythonModel

__all__ = ["TritonPythonModel"]  # the class Triton's python backend loads
