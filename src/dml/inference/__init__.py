"""Use a trained model: embed images, index the embeddings with faiss, search them, export the model.

Everything goes through the checkpoint's own config: the images are preprocessed by its dataset's test
transform, so that what is searched is exactly what ``evaluate.py`` scored.

- :class:`Embedder` embeds image files, folders or a dataset split with a checkpoint;
- :class:`Embeddings` is the file it writes (safetensors: vectors, labels; names and provenance in the
  metadata), written atomically;
- :class:`Index` is a faiss index of an embeddings file (exact by default; IVF or HNSW with their recall
  measured against exact), saved with its metadata, refusing queries of another model;
- :func:`embed_to_shards` embeds a catalogue into a folder of shards (each whole or absent; resumable;
  several processes under DDP), read back by :class:`ShardedEmbeddings` (checked) or
  :func:`load_embeddings` (either format), and indexed shard by shard by :func:`build_from_shards`
  (IVF-PQ for galleries that do not fit in memory as float32);
- :func:`export` writes the embedding model as ONNX and TorchScript with its preprocessing beside it.
"""

from dml.inference.embedder import IMAGE_SUFFIXES, SPLITS, Embedder, find_images
from dml.inference.embeddings import Embeddings
from dml.inference.exporting import EmbeddingModel, export, preprocessing
from dml.inference.index import Index, SearchResult
from dml.inference.index_shards import build_from_shards
from dml.inference.predicting import embed_to_shards
from dml.inference.shards import ShardedEmbeddings, load_embeddings

__all__ = [
    "IMAGE_SUFFIXES",
    "SPLITS",
    "EmbeddingModel",
    "Embedder",
    "Embeddings",
    "Index",
    "SearchResult",
    "ShardedEmbeddings",
    "build_from_shards",
    "embed_to_shards",
    "export",
    "find_images",
    "load_embeddings",
    "preprocessing",
]
