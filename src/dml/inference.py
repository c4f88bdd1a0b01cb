"""Use a trained model: embed images, index the embeddings with faiss, search them, export the model.

Everything goes through the checkpoint's own config: the images are preprocessed by its dataset's test
transform, so that what is searched is exactly what ``evaluate.py`` scored.

- :class:`Embedder` embeds image files, folders or a dataset split with a checkpoint;
- :class:`Embeddings` is the file it writes (safetensors: vectors, labels; names and provenance in the
  metadata), written atomically;
- :class:`Index` is a faiss index of an embeddings file (exact by default; IVF or HNSW with their recall
  measured against exact), saved with its metadata, refusing queries of another model;
- :func:`export` writes the embedding model as ONNX and TorchScript with its preprocessing beside it.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from dml.data.datasets.benchmark import FileBenchmark
from dml.data.fast_path import EncodedBatch
from dml.errors import UserError
from dml.log import get_logger

log = get_logger(__name__)

EMBEDDINGS_FORMAT = "dml-embeddings/1"
INDEX_FORMAT = "dml-index/1"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SPLITS = ("train", "val", "heldout", "test")
ROLES = {"query": 0, "gallery": 1}  # RawSplit.roles


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _refuse_existing(path: Path, key: str, overwrite: bool, marker: str | None = None) -> None:
    """Refuse to replace what is at ``path`` unless ``overwrite``; even then, only what this package wrote
    (a file for a file; a folder holding ``marker`` for a folder), never a user's other data."""
    if not path.exists():
        return
    if not overwrite:
        raise UserError(f"{key}={str(path)!r} already exists; choose another path or set overwrite=true")
    if marker is None and path.is_dir():
        raise UserError(f"{key}={str(path)!r} is a folder; give the path of a file")
    if marker is not None and not (path / marker).is_file():
        raise UserError(
            f"{key}={str(path)!r} exists and is not an output of this package (no {marker}): refusing to "
            "replace it even with overwrite=true; choose another path"
        )


@contextlib.contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write; it replaces ``path`` only when the block ends normally
    (the old one moved aside first, deleted last), and is removed otherwise: a stopped run leaves
    nothing that looks complete, and the old output stays until the new one is in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    aside = path.with_name(f".{path.name}.old-{os.getpid()}")
    try:
        yield tmp
        if path.exists():
            os.replace(path, aside)
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, aside):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            elif leftover.exists():
                leftover.unlink()


# --- embeddings files ---------------------------------------------------------------------------------
@dataclass
class Embeddings:
    """Embeddings with what they are of and what made them.

    Attributes:
        vectors: (N, d) float32, L2-normalised for cosine models.
        names: one per row: an image file's path, or ``<dataset>:<split>/<position>`` for a dataset split.
        labels: (N,) int64 class ids, -1 where unknown (image folders).
        checkpoint, checkpoint_sha256: the model that embedded them.
        metric: ``cosine`` (unit vectors, inner product) or ``euclidean``.
        skipped: images that could not be read, ``{"path", "error"}`` each.
    """

    vectors: torch.Tensor
    names: list[str]
    labels: torch.Tensor
    checkpoint: str
    checkpoint_sha256: str
    metric: str = "cosine"
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write one safetensors file (atomically: complete or absent)."""
        from safetensors.torch import save_file

        path = Path(path)
        _refuse_existing(path, "out", overwrite)
        metadata = {
            "format": EMBEDDINGS_FORMAT,
            "names": json.dumps(self.names),
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": self.checkpoint_sha256,
            "metric": self.metric,
            "skipped": json.dumps(self.skipped),
        }
        tensors = {"vectors": self.vectors.float().contiguous(), "labels": self.labels.long().contiguous()}
        with _atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Embeddings:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise UserError(f"embeddings file {str(path)!r} does not exist; write one with embed.py")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
        except Exception as e:  # noqa: BLE001 - any read failure means the same to the user
            raise UserError(f"{path} is not an embeddings file written by embed.py: {e}") from e
        if meta.get("format") != EMBEDDINGS_FORMAT or "vectors" not in tensors:
            raise UserError(
                f"{path} is not an embeddings file written by embed.py (format {meta.get('format')!r})"
            )
        return cls(
            tensors["vectors"],
            json.loads(meta["names"]),
            tensors["labels"],
            meta["checkpoint"],
            meta["checkpoint_sha256"],
            meta.get("metric", "cosine"),
            json.loads(meta.get("skipped", "[]")),
        )


# --- embedding ----------------------------------------------------------------------------------------
class _Files(torch.utils.data.Dataset):
    """Image files through a transform; an unreadable file gives its error message instead of a tensor."""

    def __init__(self, paths: Sequence[Path], transform: Callable[[Image.Image], torch.Tensor]):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            with Image.open(self.paths[i]) as image:
                image.load()
                return i, self.transform(image), ""
        except Exception as e:  # noqa: BLE001 - any decoding failure: the file is listed and skipped
            return i, None, f"{type(e).__name__}: {e}"


def _collate(items: list[tuple[int, torch.Tensor | None, str]]) -> tuple[list, torch.Tensor | None, list]:
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, err) for i, x, err in items if x is None]
    return [i for i, _ in good], (torch.stack([x for _, x in good]) if good else None), bad


def find_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` and its subfolders, by suffix, in sorted order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class Embedder:
    """A trained model with its preprocessing: images in, embeddings out.

    Use :meth:`from_checkpoint`; the model runs on ``device`` (``auto``: the GPU when there is one).
    """

    def __init__(
        self,
        module: nn.Module,
        datamodule: Any,
        checkpoint: Path,
        device: str = "auto",
        precision: str = "32-true",
    ):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        # As evaluate.py runs the model: at the training precision, and (image files on a GPU, with
        # dataset.pipeline=auto) through the fast path's decoding.
        self.autocast = {
            "bf16-mixed": torch.bfloat16,
            "bf16-true": torch.bfloat16,
            "16-mixed": torch.float16,
        }.get(str(precision))
        if self.autocast is torch.float16 and self.device.type != "cuda":
            self.autocast = None
        if getattr(datamodule, "pipeline", None) == "auto" and getattr(datamodule, "fast_by_default", False):
            datamodule.pipeline = "fast" if self.device.type == "cuda" else "classic"
        self.module = module.eval().to(self.device)
        self.datamodule = datamodule
        self.checkpoint = str(checkpoint)
        self.checkpoint_sha256 = file_sha256(checkpoint)
        self.metric: str = module.metric
        self.dataset_name: str = getattr(datamodule, "name", "data")
        self._file_transform: Callable[[Image.Image], torch.Tensor] | None = None

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str = "auto", dataset_root: str | None = None
    ) -> Embedder:
        """The model and test transform of a checkpoint written by ``train.py``; ``dataset_root``: where its
        dataset is now, if it moved since training (only splits need it)."""
        from dml.tasks import build_data_and_module, load_checkpoint

        path = Path(path)
        if not path.is_file():
            raise UserError(f"ckpt_path={str(path)!r} does not exist; give a checkpoint written by train.py")
        run_cfg, state_dict = load_checkpoint(path)
        if dataset_root is not None:
            run_cfg.dataset.root = str(dataset_root)
        datamodule, module = build_data_and_module(run_cfg)
        module.load_state_dict(state_dict)
        return cls(module, datamodule, path, device, run_cfg.get("trainer", {}).get("precision", "32-true"))

    @property
    def dim(self) -> int:
        return int(self.module.head.out_dim)

    # --- preprocessing ----------------------------------------------------------------------------------
    def file_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """Image file -> the tensor the model was evaluated on: the dataset's test transform. Datasets held
        as tensors (MNIST, synthetic) get the file converted to their channels and size first."""
        if self._file_transform is None:
            dm = self.datamodule
            test = dm.transform("test")
            if isinstance(dm, FileBenchmark):
                self._file_transform = _RGBThen(test)
            else:
                channels, height, width = dm.image_shape  # tensor datasets: no need to load them
                self._file_transform = _TensorLike(channels, height, width, test)
        return self._file_transform

    # --- embedding ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def embed_batch(self, images: torch.Tensor) -> torch.Tensor:
        """A preprocessed (B, C, H, W) batch -> (B, d) float32 embeddings on the CPU."""
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            return self.module(images.to(self.device)).float().cpu()

    def embed_files(
        self, paths: Sequence[str | Path], batch_size: int = 64, num_workers: int = 0, progress: bool = True
    ) -> Embeddings:
        """Embed image files; unreadable ones are listed in ``skipped`` (and logged), never fatal."""
        paths = [Path(p) for p in paths]
        loader = torch.utils.data.DataLoader(
            _Files(paths, self.file_transform()),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=_collate,
        )
        order, chunks, skipped = [], [], []
        with _progress(progress, len(paths), "embedding") as advance:
            for ids, images, bad in loader:
                if images is not None:
                    order += ids
                    chunks.append(self.embed_batch(images))
                for i, error in bad:
                    skipped.append({"path": str(paths[i].resolve()), "error": error})
                    log.warning("skipped %s: %s", paths[i], error)
                advance(len(ids) + len(bad))
        if not order:
            listed = "; ".join(f"{s['path']} ({s['error']})" for s in skipped[:3])
            raise UserError(f"none of the {len(paths)} images could be read: {listed}")
        names = [str(paths[i].resolve()) for i in order]
        vectors = torch.cat(chunks)
        labels = torch.full((len(names),), -1, dtype=torch.long)
        return Embeddings(
            vectors, names, labels, self.checkpoint, self.checkpoint_sha256, self.metric, skipped
        )

    def embed_folder(self, folder: str | Path, **kwargs: Any) -> Embeddings:
        """Embed every image under ``folder`` (subfolders included)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(f"images={str(folder)!r} is not a folder")
        paths = find_images(folder)
        if not paths:
            raise UserError(
                f"images={str(folder)!r} holds no image files ({', '.join(IMAGE_SUFFIXES)}), in any subfolder"
            )
        return self.embed_files(paths, **kwargs)

    @torch.no_grad()
    def embed_split(
        self,
        split: str = "test",
        role: str | None = None,
        batch_size: int | None = None,
        progress: bool = True,
    ) -> Embeddings:
        """Embed a split of the checkpoint's dataset (``train``, ``val``, ``heldout`` or ``test``) as the
        evaluation does: its loader (workers, the fast path's decoding on a GPU), with the class ids.

        ``role``: ``query`` or ``gallery``, for splits searched query against gallery (In-Shop): embed the
        gallery for the index and the queries to search, as ``evaluate.py`` does.
        """
        dm = self.datamodule
        dm.setup("test")
        if split not in dm.splits:
            raise UserError(f"split {split!r} is not in dataset {self.dataset_name}: {', '.join(dm.splits)}")
        data = dm.splits[split]
        positions = torch.arange(len(data))
        if role is not None:
            if data.roles is None:
                raise UserError(
                    f"split {split!r} of {self.dataset_name} has no query/gallery roles: drop ':{role}'"
                )
            if role not in ROLES:
                raise UserError(f"{split}:{role}: the role must be query or gallery")
            positions = torch.nonzero(data.roles == ROLES[role]).flatten()
        elif data.roles is not None:
            log.warning(
                "split %s of %s has query and gallery roles, and evaluate.py searches its queries against its "
                "gallery: use %s:gallery for the index and %s:query as the query to do the same",
                split,
                self.dataset_name,
                split,
                split,
            )
        subset = data if role is None else torch.utils.data.Subset(data, positions.tolist())
        loader = dm._loader(subset, batch_size=batch_size or dm.eval_batch_size, shuffle=False)
        chunks = []
        with _progress(progress, len(subset), f"embedding {split}") as advance:
            for images, _, _ in loader:
                if isinstance(images, EncodedBatch):  # the fast path: decoded where the model runs
                    images = dm._batch_transform(images, self.device)
                chunks.append(self.embed_batch(images))
                advance(len(chunks[-1]))
        names = [f"{self.dataset_name}:{split}/{i}" for i in positions.tolist()]
        return Embeddings(
            torch.cat(chunks),
            names,
            data.labels[positions].clone(),
            self.checkpoint,
            self.checkpoint_sha256,
            self.metric,
        )

    def embed(self, images: str, key: str = "images", **kwargs: Any) -> Embeddings:
        """``images``: an image folder, one image file, or a split (``test``, or ``test:query`` /
        ``test:gallery`` for query/gallery splits). A path that exists wins over a split's name.
        ``key``: the setting that gave ``images``, named in the error."""
        path = Path(images)
        if path.is_dir():
            return self.embed_folder(path, **kwargs)
        if path.is_file():
            return self.embed_files([path], **kwargs)
        split, _, role = images.partition(":")
        if split in SPLITS:
            kwargs.pop("num_workers", None)  # the dataset's own loader settings
            return self.embed_split(split, role or None, **kwargs)
        raise UserError(
            f"{key}={images!r} is neither an image file, a folder, nor a split ({', '.join(SPLITS)})"
        )

    def picture(self, name: str) -> Image.Image | None:
        """The image behind an embedding's name (a file, or an item of this checkpoint's dataset)."""
        prefix = f"{self.dataset_name}:"
        if name.startswith(prefix):
            split, _, position = name[len(prefix) :].partition("/")
            self.datamodule.setup("test")
            if split not in self.datamodule.splits:
                return None
            image = self.datamodule.splits[split].raw_image(int(position))
            if isinstance(image, torch.Tensor):
                array = (image.clamp(0, 1) * 255).byte().permute(1, 2, 0).squeeze(-1).numpy()
                return Image.fromarray(array)
            return image if isinstance(image, Image.Image) else None
        try:
            with Image.open(name) as image:
                return image.convert("RGB")
        except OSError:
            return None


class _RGBThen:
    """PIL image -> RGB -> ``transform`` (picklable for loader workers)."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image.convert("RGB"))


class _TensorLike:
    """PIL image -> the (C, H, W) [0, 1] tensor layout of a tensor dataset -> its ``transform``."""

    def __init__(self, channels: int, height: int, width: int, transform: Callable):
        self.channels, self.size, self.transform = channels, (width, height), transform

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("L" if self.channels == 1 else "RGB")
        if image.size != self.size:
            image = image.resize(self.size, Image.Resampling.BILINEAR)
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).float().div_(255)
        x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
        return self.transform(x)


@contextlib.contextmanager
def _progress(enabled: bool, total: int, what: str) -> Iterator[Callable[[int], None]]:
    """A rich progress bar (or nothing), yielding its advance function."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)


# --- index ---------------------------------------------------------------------------------------------
@dataclass
class SearchResult:
    """Each query's ``k`` neighbours, best first: their rows in the index, names, labels and scores
    (cosine similarity for cosine models, Euclidean distance otherwise)."""

    ids: torch.Tensor
    scores: torch.Tensor
    names: list[list[str]]
    labels: torch.Tensor
    score_name: str


def _faiss():
    from dml.evaluation.backends import faiss_available

    faiss_available()  # quiets faiss's loader before the import
    try:
        import faiss
    except ImportError as e:
        raise UserError("the index needs faiss: pip install faiss-cpu (or faiss-gpu)") from e
    return faiss


class Index:
    """A faiss index of an embeddings file, with the file's names, labels and model.

    Build with :meth:`build`, write with :meth:`save`, read with :meth:`load`, query with :meth:`search`.
    """

    KINDS = ("flat", "ivf", "hnsw")

    def __init__(self, index: Any, meta: dict[str, Any]):
        self.index, self.meta = index, meta
        self.labels = torch.tensor(meta["labels"], dtype=torch.long)

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def names(self) -> list[str]:
        return self.meta["names"]

    def __len__(self) -> int:
        return len(self.meta["names"])

    @classmethod
    def build(
        cls,
        embeddings: Embeddings,
        kind: str = "flat",
        nlist: int | None = None,
        nprobe: int = 16,
        hnsw_m: int = 32,
        ef_search: int = 128,
        recall_queries: int = 1000,
        recall_k: int = 10,
        seed: int = 0,
    ) -> Index:
        """Exact search (``flat``) by default; ``ivf`` (``nlist`` cells, ``nprobe`` searched; default
        nlist 4 sqrt(N)) or ``hnsw`` (``hnsw_m`` links, ``ef_search``) for large galleries, with their
        Recall@``recall_k`` against exact search measured on ``recall_queries`` held-out rows (left out
        of the IVF training)."""
        faiss = _faiss()
        if kind not in cls.KINDS:
            raise UserError(f"kind={kind!r} must be one of {', '.join(cls.KINDS)}")
        x = np.ascontiguousarray(embeddings.vectors.float().numpy())
        n, d = x.shape
        inner = embeddings.metric == "cosine"
        metric = faiss.METRIC_INNER_PRODUCT if inner else faiss.METRIC_L2
        params: dict[str, Any] = {}
        if kind == "ivf":
            nlist = nlist or max(1, int(4 * np.sqrt(n)))
            if nlist > n:
                raise UserError(
                    f"nlist={nlist} is more than the {n} vectors to train the IVF on; lower nlist"
                )
            params = {"nlist": nlist, "nprobe": min(nprobe, nlist)}
        elif kind == "hnsw":
            params = {"hnsw_m": hnsw_m, "ef_search": ef_search}

        def new(rows: np.ndarray) -> Any:
            """The index of ``kind`` over ``rows`` (IVF cells trained on them)."""
            if kind == "flat":
                index = faiss.IndexFlatIP(d) if inner else faiss.IndexFlatL2(d)
            elif kind == "ivf":
                quantizer = faiss.IndexFlatIP(d) if inner else faiss.IndexFlatL2(d)
                index = faiss.IndexIVFFlat(quantizer, d, params["nlist"], metric)
                index.train(rows)
                index.nprobe = params["nprobe"]
            else:
                index = faiss.IndexHNSWFlat(d, hnsw_m, metric)
                index.hnsw.efSearch = ef_search
            index.add(rows)
            return index

        meta = {
            "format": INDEX_FORMAT,
            "kind": kind,
            "params": params,
            "metric": embeddings.metric,
            "dim": d,
            "names": embeddings.names,
            "labels": embeddings.labels.tolist(),
            "checkpoint": embeddings.checkpoint,
            "checkpoint_sha256": embeddings.checkpoint_sha256,
            "recall_vs_exact": None,
        }
        if kind != "flat":
            # Recall against exact search on held-out rows: an index of the other rows (cells trained on
            # them), searched with the held-out ones, which are in neither result.
            held = np.random.default_rng(seed).choice(
                n, size=max(1, min(recall_queries, n // 10)), replace=False
            )
            rest = np.delete(x, held, axis=0)
            if kind == "ivf" and params["nlist"] > len(rest):
                raise UserError(
                    f"nlist={params['nlist']} is more than the {len(rest)} vectors to train on; lower nlist"
                )
            k = min(recall_k, len(rest))
            exact = faiss.IndexFlatIP(d) if inner else faiss.IndexFlatL2(d)
            exact.add(rest)
            _, truth = exact.search(x[held], k)
            _, found = new(rest).search(x[held], k)
            hits = [len(set(a) & set(b)) / k for a, b in zip(truth.tolist(), found.tolist(), strict=True)]
            meta["recall_vs_exact"] = {"k": k, "queries": len(held), "recall": float(np.mean(hits))}
            log.info(
                "%s index: Recall@%d against exact search %.4f on %d held-out queries",
                kind,
                k,
                meta["recall_vs_exact"]["recall"],
                len(held),
            )
        return cls(new(x), meta)

    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """``folder/index.faiss`` and ``folder/meta.json``, written together (atomically)."""
        faiss = _faiss()
        folder = Path(folder)
        _refuse_existing(folder, "out", overwrite, marker="meta.json")
        index = faiss.index_gpu_to_cpu(self.index) if _on_gpu(self.index) else self.index
        with _atomic_path(folder) as tmp:
            tmp.mkdir(parents=True)
            faiss.write_index(index, str(tmp / "index.faiss"))
            (tmp / "meta.json").write_text(json.dumps(self.meta))
        return folder

    @classmethod
    def load(cls, folder: str | Path, gpu: str | bool = "auto") -> Index:
        faiss = _faiss()
        folder = Path(folder)
        meta_file, index_file = folder / "meta.json", folder / "index.faiss"
        if not meta_file.is_file() or not index_file.is_file():
            raise UserError(
                f"index={str(folder)!r} is not an index folder written by index.py (meta.json, index.faiss)"
            )
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != INDEX_FORMAT:
            raise UserError(
                f"{meta_file} is not an index written by index.py (format {meta.get('format')!r})"
            )
        index = faiss.read_index(str(index_file))
        use_gpu = gpu is True or (
            gpu == "auto" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
        )
        if use_gpu and meta["kind"] != "hnsw":
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        return cls(index, meta)

    def check_model(self, checkpoint_sha256: str, what: str = "the query embeddings") -> None:
        """Refuse embeddings of another model than the one this index was built from."""
        if checkpoint_sha256 != self.meta["checkpoint_sha256"]:
            raise UserError(
                f"{what} come from another model than this index: it was built from {self.meta['checkpoint']} "
                f"(sha256 {self.meta['checkpoint_sha256'][:12]}...), they from a checkpoint with sha256 "
                f"{checkpoint_sha256[:12]}...; embeddings of different models are not comparable. Embed with "
                "the index's checkpoint, or build an index from this model's embeddings."
            )

    def search(
        self,
        queries: torch.Tensor | np.ndarray,
        k: int = 10,
        checkpoint_sha256: str | None = None,
        exclude: Sequence[int] | None = None,
    ) -> SearchResult:
        """The ``k`` nearest rows of each query, best first.

        Args:
            queries: (n, d) embeddings of this index's model.
            checkpoint_sha256: the queries' model; another than the index's is refused.
            exclude: per query, a row of the index to leave out of its neighbours (its own, when the query
                is in the index), or -1.
        """
        if checkpoint_sha256 is not None:
            self.check_model(checkpoint_sha256)
        q = torch.as_tensor(queries).float()
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise UserError(
                f"queries of shape {tuple(q.shape)} do not fit this index of {self.dim}-d embeddings: give "
                f"(n, {self.dim}) embeddings of the model {self.meta['checkpoint']}"
            )
        k = min(k, len(self) - (1 if exclude is not None else 0))
        if k < 1:
            raise UserError(f"the index holds {len(self)} items: too few to return neighbours")
        extra = 1 if exclude is not None else 0
        scores, ids = self.index.search(np.ascontiguousarray(q.numpy()), k + extra)
        scores, ids = torch.from_numpy(scores), torch.from_numpy(ids).long()
        if exclude is not None:
            # -2 marks "not in the index" (faiss pads missing neighbours with -1); each row keeps its
            # first k entries that are not the query itself.
            own = torch.as_tensor([i if i >= 0 else -2 for i in exclude], dtype=torch.long)[:, None]
            keep = ids != own
            keep &= keep.cumsum(1) <= k
            ids, scores = ids[keep].view(len(q), k), scores[keep].view(len(q), k)
        euclidean = self.meta["metric"] != "cosine"
        if euclidean:
            scores = scores.clamp_min(0).sqrt()
        names = [[self.names[i] if i >= 0 else "" for i in row] for row in ids.tolist()]
        labels = torch.where(ids >= 0, self.labels[ids.clamp_min(0)], -1)
        return SearchResult(ids, scores, names, labels, "distance" if euclidean else "similarity")


def _on_gpu(index: Any) -> bool:
    return "Gpu" in type(index).__name__


# --- export --------------------------------------------------------------------------------------------
class EmbeddingModel(nn.Module):
    """Backbone + head (+ L2 normalisation, for cosine models): preprocessed images -> embeddings."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def preprocessing(embedder: Embedder) -> dict[str, Any]:
    """What an exported model expects its input to be, as the checkpoint's test transform makes it."""
    dm = embedder.datamodule
    if isinstance(dm, FileBenchmark):
        mean, std = dm._normalization()
        return {
            "input": "RGB image file",
            "resize_shorter_side": dm.resize_size,
            "interpolation": dm.interpolation,
            "center_crop": [dm.image_size, dm.image_size],
            "channel_order": "BGR" if dm.bgr_255 else "RGB",
            "value_range": [0, 255] if dm.bgr_255 else [0, 1],
            "mean": list(mean),
            "std": list(std),
            "layout": "NCHW float32",
        }
    transform, layout = dm.transform("test"), embedder.file_transform()
    channels, (width, height) = layout.channels, layout.size
    return {
        "input": "grayscale image" if channels == 1 else "RGB image",
        "resize": [height, width],
        "interpolation": "bilinear",
        "channel_order": "gray" if channels == 1 else "RGB",
        "value_range": [0, 1],
        "mean": transform.mean.flatten().tolist(),
        "std": transform.std.flatten().tolist(),
        "layout": "NCHW float32",
    }


def export(
    embedder: Embedder,
    out: str | Path,
    formats: Sequence[str] = ("onnx", "torchscript"),
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write ``out/model.onnx`` (dynamic batch axis) and/or ``out/model.torchscript.pt`` with
    ``out/preprocessing.json``; all or nothing."""
    unknown = set(formats) - {"onnx", "torchscript"}
    if unknown or not formats:
        raise UserError(f"formats={list(formats)}: choose from onnx, torchscript")
    out = Path(out)
    _refuse_existing(out, "out", overwrite, marker="preprocessing.json")
    # A copy on the CPU: the embedder's own model stays where it runs.
    model = copy.deepcopy(EmbeddingModel(embedder.module.backbone, embedder.module.head)).cpu().eval()
    pre = preprocessing(embedder)
    size = pre.get("center_crop") or pre["resize"]
    channels = 1 if pre["channel_order"] == "gray" else 3
    example = torch.randn(2, channels, *size)
    written = {}
    with _atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        if "onnx" in formats:
            try:
                import onnx  # noqa: F401
            except ImportError as e:
                raise UserError("ONNX export needs the onnx extra: pip install 'dml[onnx]'") from e
            batch = torch.export.Dim("batch", min=1)
            torch.onnx.export(
                model,
                (example,),
                str(tmp / "model.onnx"),
                input_names=["images"],
                output_names=["embeddings"],
                dynamic_shapes={"images": {0: batch}},
                dynamo=True,
                external_data=False,
            )
            written["onnx"] = out / "model.onnx"
        if "torchscript" in formats:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter(
                    "ignore", FutureWarning
                )  # torch.jit is deprecated, TorchScript files are not
                traced = torch.jit.trace(model, example)
            traced.save(str(tmp / "model.torchscript.pt"))
            written["torchscript"] = out / "model.torchscript.pt"
        meta = pre | {
            "embedding_dim": embedder.dim,
            "metric": embedder.metric,
            "normalized": embedder.metric == "cosine",
            "checkpoint": embedder.checkpoint,
            "checkpoint_sha256": embedder.checkpoint_sha256,
        }
        (tmp / "preprocessing.json").write_text(json.dumps(meta, indent=2))
    return written | {"preprocessing": out / "preprocessing.json"}
