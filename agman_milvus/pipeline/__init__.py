"""The ingest pipeline: read/decode -> embed (one pass) -> Milvus -> SQL status."""

from agman_milvus.pipeline.decode import Decoded, decode_image_row, failure_text
from agman_milvus.pipeline.dispatch import (
    DEFAULT_QUEUE,
    EMBED_TASK,
    GPU_QUEUE,
    CeleryDispatcher,
    Dispatcher,
    InProcessDispatcher,
)
from agman_milvus.pipeline.runner import IndexReport, index_images

__all__ = [
    "CeleryDispatcher", "DEFAULT_QUEUE", "Decoded", "Dispatcher", "EMBED_TASK", "GPU_QUEUE",
    "InProcessDispatcher", "IndexReport", "decode_image_row", "failure_text", "index_images",
]
