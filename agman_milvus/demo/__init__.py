"""``agman demo``: a procedurally drawn catalog, a quickly trained AG-MAN, and an HTML report.

* :mod:`agman_milvus.demo.garments` draws product photos; :mod:`agman_milvus.demo.catalog`
  samples products and writes images + ``manifest.csv`` (the fashion-products layout).
* :mod:`agman_milvus.demo.model` trains (or loads from its cache) the demo checkpoint and
  measures it against the untrained ImageNet floor.
* :mod:`agman_milvus.demo.report` builds the self-contained HTML page.
"""
