"""language_decoder: see moderation/serving/decoder_model.py (shared with language_decoder_int8)."""
from moderation.serving.decoder_model import DecoderModel as TritonPythonModel  # noqa: F401
