"""What one request may carry: per-post byte limits, posts per request, the public models. Shared by the models
(which enforce the per-post limits) and the gateway (which refuses a message no post limit could admit before
it is buffered); nothing here imports beyond the standard library, so the gateway image stays small."""
from __future__ import annotations

MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_TEXT_BYTES = 16 * 1024
MAX_OPTIONS_BYTES = 4096
# Posts per request of the entry model (its max_batch_size); larger batches come from Triton's dynamic batcher.
ENTRY_MAX_POSTS = 8
# The only models the public port serves; everything else is reached through the ensemble and BLS.
PUBLIC_MODELS = ("moderate",)
# Protobuf framing, tensor headers, requested outputs and parameters of a full request.
REQUEST_SLACK_BYTES = 1024 * 1024
MAX_REQUEST_BYTES = ENTRY_MAX_POSTS * (MAX_IMAGE_BYTES + MAX_TEXT_BYTES + MAX_OPTIONS_BYTES) + REQUEST_SLACK_BYTES
