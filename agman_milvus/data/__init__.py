"""Data: reference split readers, product catalogs, triplet sampling and datasets."""

from agman_milvus.data.catalog import Catalog, CatalogSplit, read_catalog, split_catalog
from agman_milvus.data.datasets import ImageTable, LabeledImageDataset, TrainTransform, TripletDataset
from agman_milvus.data.formats import FormatError, Label, RetrievalSplit, Triplet
from agman_milvus.data.sampler import NothingToSampleError, TripletSampler
from agman_milvus.data.sources import DataSource, catalog_source, reference_source

__all__ = [
    "Catalog", "CatalogSplit", "DataSource", "FormatError", "ImageTable", "Label",
    "LabeledImageDataset", "NothingToSampleError", "RetrievalSplit", "TrainTransform", "Triplet",
    "TripletDataset", "TripletSampler", "catalog_source", "read_catalog", "reference_source",
    "split_catalog",
]
