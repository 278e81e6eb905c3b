"""``agman demo``: a procedurally drawn catalog, a quickly trained AG-MAN, and an HTML report.

* :mod:`agman_milvus.app.demo.garments` draws product photos; :mod:`agman_milvus.app.demo.photos`
  samples products and writes images + ``manifest.csv`` (the fashion-products layout).
* :mod:`agman_milvus.app.demo.demo_model` trains (or loads from its cache) the demo checkpoint and
  measures it against the untrained ImageNet floor.
* :mod:`agman_milvus.app.demo.page` builds the self-contained HTML page.
"""
