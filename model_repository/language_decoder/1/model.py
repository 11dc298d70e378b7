"""language_decoder: see moderation/serving/decoder_model.py (shared with language_decoder_int8)."""
from moderation.serving.decoder_model import DecoderModel as TritonPythonModel

__all__ = ["TritonPythonModel"]  # the class Triton's python backend loads
