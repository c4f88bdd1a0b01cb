"""Embedding images with a trained checkpoint: files, folders, or a split of its dataset."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from omegaconf import open_dict
from PIL import Image

from dml.builders import build_data_and_module, fast_by_default
from dml.checkpoints import load_checkpoint
from dml.data.images import UnsupportedPixels, open_image
from dml.errors import UserError, whole_number
from dml.inference.embeddings import Embeddings
from dml.io import file_sha256
from dml.log import get_logger

if TYPE_CHECKING:
    from dml.inference.predicting import Inputs
    from dml.models.module import DMLModule

log = get_logger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SPLITS = ("train", "val", "heldout", "test")
ROLES = {"query": 0, "gallery": 1}  # RawSplit.roles


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


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` (the GPU when there is one), ``cpu``, ``cuda`` or ``cuda:<n>``, checked against this machine.
    A GPU comes back numbered (``cuda`` is ``cuda:<current device>``), as Lightning's devices are: the fast
    path's JPEG decoder is kept per device, and ``cuda`` and ``cuda:0`` would build two.

    Raises:
        UserError: not a device name, or a GPU that this machine does not have.
    """
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UserError(f"device={device!r} is not a device: use auto, cpu, cuda or cuda:<n>") from e
    if chosen.type not in ("cpu", "cuda"):
        raise UserError(f"device={device!r}: the model runs on the CPU or a CUDA GPU; use auto, cpu or cuda")
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={device!r} but no CUDA GPU is visible here: use device=cpu (or auto)")
    if chosen.type == "cuda" and (chosen.index or 0) >= torch.cuda.device_count():
        raise UserError(
            f"device={device!r} but this machine has {torch.cuda.device_count()} GPU(s), numbered from 0"
        )
    if chosen.type == "cuda" and chosen.index is None:
        chosen = torch.device("cuda", torch.cuda.current_device())
    return chosen


def find_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` and its subfolders, by suffix, in sorted order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class Embedder:
    """A trained model with its preprocessing: images in, embeddings out.

    Use :meth:`from_checkpoint`; the model runs on ``device`` (``auto``: the GPU when there is one).
    """

    def __init__(
        self,
        module: DMLModule,
        datamodule: Any,
        checkpoint: Path,
        device: str = "auto",
        precision: str = "32-true",
    ):
        self.device = resolve_device(device)
        # As evaluate.py runs the model: at the training precision.
        self.autocast = {
            "bf16-mixed": torch.bfloat16,
            "bf16-true": torch.bfloat16,
            "16-mixed": torch.float16,
        }.get(str(precision))
        if self.autocast is torch.float16 and self.device.type != "cuda":
            self.autocast = None
        self.module = module.eval().to(self.device)
        self.datamodule = datamodule
        self.checkpoint = str(Path(checkpoint).resolve())  # found again from any folder
        self.checkpoint_sha256 = file_sha256(checkpoint)
        self.metric: str = module.metric
        self.dataset_name: str = getattr(datamodule, "name", "data")

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str = "auto",
        dataset_root: str | None = None,
        pipeline: str = "auto",
    ) -> Embedder:
        """The model and preprocessing of a checkpoint written by ``train.py``; ``dataset_root``: where its
        dataset is now, if it moved since training (only splits need it). The dataset is read where it
        is, never downloaded. ``pipeline``: how a split's images are read (``classic`` or ``fast``, see the
        dataset's ``pipeline``); ``auto`` takes the checkpoint's own, as ``evaluate.py`` does, and where
        that is ``auto`` too, the fast path's batched decoding for image files on a GPU."""
        chosen = resolve_device(device)  # before the checkpoint is read
        path = Path(path)
        if not path.is_file():
            raise UserError(f"ckpt_path={str(path)!r} does not exist; give a checkpoint written by train.py")
        if dataset_root is not None and not Path(dataset_root).expanduser().is_dir():
            raise UserError(
                f"dataset_root={str(dataset_root)!r} is not a folder; give the folder that now holds the "
                "checkpoint's dataset"
            )
        run_cfg, state_dict, data_state = load_checkpoint(path)
        if dataset_root is not None:
            run_cfg.dataset.root = str(Path(dataset_root).expanduser())
        if "download" in run_cfg.dataset:  # a dataset that moved is not fetched again into its old folder
            run_cfg.dataset.download = False
        if pipeline == "auto":  # the checkpoint's own choice, as evaluate.py makes it
            pipeline = str(run_cfg.dataset.get("pipeline", "classic"))
        if pipeline == "auto":  # no trainer here: the device it runs on decides
            pipeline = "fast" if chosen.type == "cuda" and fast_by_default(run_cfg.dataset) else "classic"
        with open_dict(run_cfg):
            run_cfg.dataset.pipeline = pipeline
        datamodule, module = build_data_and_module(run_cfg, data_state)
        module.load_state_dict(state_dict)
        return cls(module, datamodule, path, device, run_cfg.get("trainer", {}).get("precision", "32-true"))

    @property
    def dim(self) -> int:
        return int(cast(Any, self.module.head).out_dim)

    # --- preprocessing ----------------------------------------------------------------------------------
    def file_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """Image file -> the tensor the model was evaluated on (see :meth:`RetrievalDataModule.preprocessing`)."""
        return self.datamodule.preprocessing().transform("eval")

    # --- the checkpoint's dataset -------------------------------------------------------------------------
    def require_dataset(self, why: str) -> Any:
        """The checkpoint's datamodule with its splits read, for ``why`` (named in the error).

        Raises:
            UserError: the dataset is not where it was when the model trained (nor at ``dataset_root``);
                the message says to give ``dataset_root=``.
        """
        dm = self.datamodule
        if dm.splits:
            return dm
        root = getattr(dm, "root", None)
        moved = (
            f"{why} needs the dataset {self.dataset_name} of checkpoint {self.checkpoint}, read from {root} "
            "when it trained"
        )
        if root is not None and not Path(root).is_dir():
            raise UserError(
                f"{moved}, and {root} is not there now: give its folder with dataset_root=<folder>"
            )
        try:
            dm.setup("test")
        except UserError as e:
            if root is None:
                raise
            raise UserError(f"{e}\n{moved}; if it moved, give its folder with dataset_root=<folder>") from e
        return dm

    def _split_positions(self, split: str, role: str | None) -> tuple[Any, torch.Tensor]:
        """The split's dataset and the positions in it that ``role`` (query, gallery, or all) takes."""
        dm = self.require_dataset(f"images={split}{f':{role}' if role else ''}")
        if split not in dm.splits:
            raise UserError(f"split {split!r} is not in dataset {self.dataset_name}: {', '.join(dm.splits)}")
        data = dm.splits[split]
        if role is None:
            return data, torch.arange(len(data))
        if data.roles is None:
            raise UserError(
                f"split {split!r} of {self.dataset_name} has no query/gallery roles: drop ':{role}'"
            )
        if role not in ROLES:
            raise UserError(f"{split}:{role}: the role must be query or gallery")
        return data, torch.nonzero(data.roles == ROLES[role]).flatten()

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
        whole_number(batch_size, "batch_size")
        whole_number(num_workers, "num_workers", least=0)
        files = [Path(p) for p in paths]
        loader = torch.utils.data.DataLoader(
            _Files(files, self.file_transform()),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=_collate,
        )
        order, chunks, skipped = [], [], []
        with _progress(progress, len(files), "embedding") as advance:
            for ids, images, bad in loader:
                if images is not None:
                    order += ids
                    chunks.append(self.embed_batch(images))
                for i, error in bad:
                    skipped.append({"path": str(files[i].resolve()), "error": error})
                    log.warning("skipped %s: %s", files[i], error)
                advance(len(ids) + len(bad))
        if not order:
            listed = "; ".join(f"{s['path']} ({s['error']})" for s in skipped[:3])
            raise UserError(f"none of the {len(files)} images could be read: {listed}")
        names = [str(files[i].resolve()) for i in order]
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
        return self.embed_files(cast(list[Path], self.resolve(str(folder))), **kwargs)  # a folder: its files

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
        if batch_size is not None:
            whole_number(batch_size, "batch_size")
        data, positions = self._split_positions(split, role)
        dm = self.datamodule
        if role is None and data.roles is not None:
            log.warning(
                "split %s of %s has query and gallery roles, and evaluate.py searches its queries against its "
                "gallery: use %s:gallery for the index and %s:query as the query to do the same",
                split,
                self.dataset_name,
                split,
                split,
            )
        subset = data if role is None else torch.utils.data.Subset(data, positions.tolist())
        chunks = []
        with _progress(progress, len(subset), f"embedding {split}") as advance:
            for images, _, _ in dm.eval_loader(subset, batch_size):
                # the fast path's images are decoded where the model runs; a file it cannot decode is named
                chunks.append(self.embed_batch(dm.decode(images, self.device)))
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

    def resolve(self, images: str, key: str = "images") -> list[Path] | tuple[str, str | None]:
        """What ``images`` names (see :meth:`embed`): image files, or (split, role); ``key``: the setting
        that gave it, named in the error."""
        path = Path(images)
        if path.is_dir():
            paths = find_images(path)
            if not paths:
                raise UserError(
                    f"{key}={images!r} holds no image files ({', '.join(IMAGE_SUFFIXES)}), in any subfolder"
                )
            return paths
        if path.is_file():
            return [path]
        split, _, role = images.partition(":")
        if split in SPLITS:
            return split, role or None
        raise UserError(
            f"{key}={images!r} is neither an image file, a folder, nor a split ({', '.join(SPLITS)})"
        )

    def class_names(self) -> dict[int, str]:
        """The names of the classes of the checkpoint's data, where they are known (a user's folder or
        table); empty otherwise."""
        names = getattr(self.datamodule, "class_names", None)
        try:
            return dict(names()) if callable(names) else {}
        except UserError:  # the data are not where they were: ids only
            return {}

    def inputs(self, source: list[Path] | tuple[str, str | None]) -> Inputs:
        """What :meth:`resolve` made of ``images``, as the names and items a run embeds, in order."""
        from dml.inference.predicting import Inputs

        if isinstance(source, list):
            return Inputs([str(p.resolve()) for p in source], files=source)
        split, role = source
        data, positions = self._split_positions(split, role)
        names = [f"{self.dataset_name}:{split}/{i}" for i in positions.tolist()]
        return Inputs(names, split=data, positions=positions.tolist())

    def count(self, source: list[Path] | tuple[str, str | None]) -> int:
        """How many images :meth:`embed` would embed for ``source`` (from :meth:`resolve`), embedding none."""
        return len(source) if isinstance(source, list) else len(self._split_positions(*source)[1])

    def embed(
        self, images: str | list[Path] | tuple[str, str | None], key: str = "images", **kwargs: Any
    ) -> Embeddings:
        """``images``: an image folder, one image file, or a split (``test``, or ``test:query`` /
        ``test:gallery`` for query/gallery splits), or what :meth:`resolve` made of one. A path that
        exists wins over a split's name. ``key``: the setting that gave ``images``, named in the error."""
        source = self.resolve(images, key) if isinstance(images, str) else images
        if isinstance(source, list):
            return self.embed_files(source, **kwargs)
        kwargs.pop("num_workers", None)  # the dataset's own loader settings
        return self.embed_split(*source, **kwargs)

    def picture(self, name: str) -> Image.Image | None:
        """The image behind an embedding's name (a file, or an item of this checkpoint's dataset)."""
        prefix = f"{self.dataset_name}:"
        if name.startswith(prefix):
            split, _, position = name[len(prefix) :].partition("/")
            self.require_dataset(f"the picture of {name}")
            if split not in self.datamodule.splits:
                return None
            image = self.datamodule.splits[split].raw_image(int(position))
            if isinstance(image, torch.Tensor):
                array = (image.clamp(0, 1) * 255).byte().permute(1, 2, 0).squeeze(-1).numpy()
                return Image.fromarray(array)
            return image if isinstance(image, Image.Image) else None
        try:
            return open_image(name)
        except (OSError, UnsupportedPixels):
            return None


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
