"""Queue and task names: the wire contract between producers and workers.

Deliberately free of imports, so a producer (the Client, ``agman ingest``) can name a task
without loading Celery's tasks, the model, Milvus or SQLAlchemy. Task names are part of the
message format: renaming one strands messages already queued under the old name.
"""

#: Embedding work (one model per GPU, ``solo`` pool).
GPU_QUEUE = "agman.gpu"
#: Everything else: screening jobs.
DEFAULT_QUEUE = "agman.default"

EMBED_TASK = "agman_milvus.workers.tasks.embed_images"
SCREEN_TASK = "agman_milvus.workers.screening_tasks.screen"

#: Message priorities on Redis (0 is served first): new work waits behind re-sent work, so images
#: of a killed worker or a lost message are not queued behind a whole backlog.
NORMAL_PRIORITY = 6
RESEND_PRIORITY = 0
