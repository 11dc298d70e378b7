"""language_decoder_int8 (the INT8 fallback decoder): see moderation/serving/decoder_model.py."""
from moderation.serving.decoder_model import DecoderModel as TritonPythonModel

__all__ = ["TritonPythonModel"]  # the class Triton's python backend loads
