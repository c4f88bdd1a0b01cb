"""Image benchmarks read from their official files: preparation, image loading and transforms."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import cast

import torch
from PIL import Image

from dml.data.datamodule import RetrievalDataModule
from dml.data.fast_path import EncodedFiles
from dml.data.images import UnsupportedPixels, open_image, unreadable_message
from dml.data.preparation import Archive, check_images, ensure_files, read_index, resized_copy, write_index
from dml.data.preprocessing import Preprocessing
from dml.data.splits import ImageSource, RawSplit
from dml.errors import UserError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageFiles:
    """Images decoded from disk on demand (never all held in memory), as RGB PIL images."""

    def __init__(self, root: Path, paths: Sequence[str]):
        self.root, self.paths = Path(root), list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        path = self.root / self.paths[index]
        try:
            return open_image(path)
        except (OSError, UnsupportedPixels) as e:
            raise UserError(unreadable_message(path, e)) from e


def read_table(path: Path, columns: Sequence[type], skip: int = 0, source: str = "") -> list[tuple]:
    """Rows of a whitespace-separated text file after ``skip`` header lines, each converted by ``columns``.

    Raises:
        UserError: the file is missing, or a row has another number of fields or a value that does not
            convert; the message names the file, the line and the row.
    """
    if not path.is_file():
        raise UserError(
            f"{path} is missing; the dataset folder is incomplete: put a good copy of the official archive "
            "in the dataset folder (a folder dml extracted is extracted again from a new archive; delete one "
            "you extracted yourself)"
        )
    names = " ".join(c.__name__ for c in columns)
    rows = []
    for number, line in enumerate(path.read_text().splitlines()[skip:], start=skip + 1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != len(columns):
                raise ValueError(f"{len(fields)} fields")
            rows.append(tuple(convert(field) for convert, field in zip(columns, fields, strict=True)))
        except ValueError as e:
            raise UserError(
                f"{path}, line {number}: {line.strip()!r} is not a row of {len(columns)} fields ({names}): {e}; "
                f"the file is damaged: get the official one again{f' from {source}' if source else ''}"
            ) from e
    return rows


class FileBenchmark(RetrievalDataModule):
    """A benchmark distributed as image files plus label files.

    Subclasses list their official ``archives`` and implement ``read_layout``. ``prepare_data`` (run once,
    on one process) finds or downloads the archives under ``root``, extracts them, checks every image and
    writes ``dml_index.json``; later runs start from that index. Delete it to prepare again.

    Args:
        root: the dataset's folder, ``${paths.data_dir}/<name>`` in the configs.
        image_size: crop size; resize_size: the shorter side before the test centre crop; ``None``
            takes them from the backbone (see :meth:`use_backbone_config`).
        mean, std: normalisation; ``None`` takes the backbone's (set by :meth:`use_backbone_config`).
        bgr_255: feed BGR in [0, 255] (then mean and std are in that scale); ``None`` takes the
            backbone's (true for BN-Inception).
        interpolation: resize interpolation (``bilinear``, ``bicubic``); ``None`` takes the backbone's.
        crop_scale: the area fraction range of the training's random resized crops (torchvision's
            default (0.08, 1); ViT recipes often use (0.2, 1)).
        hflip: random horizontal flips in training.
        skip_bad_images: leave out unreadable images instead of failing preparation.
        download: fetch missing archives from their official URL when reachable.
        resized_cache: read the images from a one-time copy resized to a shorter side of
            ``resize_size`` (JPEG, see :func:`~dml.data.preparation.resized_copy`): smaller files, faster
            decoding; training crops then come from the resized image.
        channels: always 3 (images are read as RGB; grayscale ones are replicated).
        **kwargs: see :class:`RetrievalDataModule`.
    """

    archives: tuple[Archive, ...] = ()
    has_fast_path = fast_by_default = True
    channel_choices = (3,)
    input_channels = 3

    def __init__(
        self,
        root: str,
        image_size: int | None = 224,
        resize_size: int | None = 256,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        bgr_255: bool | None = None,
        interpolation: str | None = None,
        crop_scale: Sequence[float] = (0.08, 1.0),
        hflip: bool = True,
        skip_bad_images: bool = False,
        download: bool = True,
        resized_cache: bool = False,
        channels: int = 3,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if channels != 3:
            raise UserError(f"dataset.channels={channels}: {self.name} images are read as RGB (3 channels)")
        self.root = Path(root).expanduser()
        self.image_size, self.resize_size, self.bgr_255, self.hflip = image_size, resize_size, bgr_255, hflip
        self.mean, self.std = mean, std
        if interpolation not in (None, "bilinear", "bicubic"):
            raise UserError(f"dataset.interpolation must be bilinear, bicubic or null, got {interpolation!r}")
        self.interpolation = interpolation
        if len(crop_scale) != 2 or not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise UserError(
                f"dataset.crop_scale={list(crop_scale)} must be [low, high] with 0 < low <= high <= 1"
            )
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.skip_bad_images, self.download = skip_bad_images, download
        self.resized_cache = resized_cache

    # --- for subclasses -------------------------------------------------------------------------------
    def read_layout(self) -> dict[str, dict[str, list]]:
        """Read the official label files: {"train": columns, "test": columns}.

        Columns: ``path`` (relative to ``root``) and ``label`` (class id); optionally ``role`` (0 query,
        1 gallery) and ``fine`` (a second label set).
        """
        raise NotImplementedError

    # --- preparation ----------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if read_index(self.root) is None:
            self._prepare()
        self._image_root()  # the resized copy, on one process

    def _image_root(self) -> Path:
        """Where the images are read from: the dataset folder, or its resized copy."""
        if not self.resized_cache:
            return self.root
        self.preprocessing()  # resize_size from the backbone when the config left it null
        splits = read_index(self.root)
        assert splits is not None and self.resize_size is not None  # prepared, and set just above
        paths = [path for columns in splits.values() for path in columns["path"]]
        return resized_copy(self.root, paths, self.resize_size)

    def _prepare(self) -> None:
        ensure_files(self.root, self.name, self.archives, download=self.download)
        splits = self.read_layout()
        bad = check_images(
            self.root, [p for s in splits.values() for p in s["path"]], self.skip_bad_images, self.name
        )
        if bad:
            for columns in splits.values():
                keep = [i for i, p in enumerate(columns["path"]) if p not in bad]
                for key in columns:
                    columns[key] = [columns[key][i] for i in keep]
        write_index(self.root, splits, len(bad))

    def load_raw(self) -> dict[str, RawSplit]:
        splits = read_index(self.root)
        if splits is None:
            self.prepare_data()
            splits = read_index(self.root)
        assert splits is not None  # prepared just above
        out, images = {}, self._image_root()
        for name, columns in splits.items():
            fine = {"fine": torch.tensor(columns["fine"])} if "fine" in columns else {}
            out[name] = RawSplit(
                ImageFiles(images, columns["path"]),
                torch.tensor(columns["label"], dtype=torch.long),
                roles=torch.tensor(columns["role"]) if "role" in columns else None,
                extra_labels=fine,
            )
        return out

    # --- transforms -----------------------------------------------------------------------------------
    def use_backbone_config(self, data_config: dict) -> None:
        """Fill what the dataset config left null from the backbone's pretrained config (timm's
        ``resolve_model_data_config``): mean, std, crop size, the resize before the centre crop
        (crop size / crop_pct), interpolation and channel order (BGR 0-255 for Caffe-style weights)."""
        self.mean = self.mean if self.mean is not None else tuple(data_config.get("mean", IMAGENET_MEAN))
        self.std = self.std if self.std is not None else tuple(data_config.get("std", IMAGENET_STD))
        if self.image_size is None:
            self.image_size = int(data_config.get("input_size", (3, 224, 224))[-1])
        if self.resize_size is None:
            self.resize_size = int(round(self.image_size / data_config.get("crop_pct", 0.875)))
        if self.interpolation is None:
            self.interpolation = data_config.get("interpolation", "bilinear")
            if self.interpolation not in ("bilinear", "bicubic"):
                self.interpolation = "bilinear"
        if self.bgr_255 is None:
            self.bgr_255 = bool(data_config.get("bgr_255", False))

    def preprocessing(self) -> Preprocessing:
        """Resize the shorter side, centre-crop (random resized crops and flips in training), normalise; RGB,
        or BGR in [0, 255] with ``bgr_255``. What the config left null comes from the backbone (see
        :meth:`use_backbone_config`), or from ImageNet's defaults."""
        if None in (self.image_size, self.resize_size, self.interpolation, self.bgr_255):
            self.use_backbone_config({})
        assert self.image_size is not None and self.resize_size is not None and self.interpolation is not None
        bgr = bool(self.bgr_255)
        return Preprocessing(
            mean=tuple(self.mean if self.mean is not None else IMAGENET_MEAN),
            std=tuple(self.std if self.std is not None else IMAGENET_STD),
            resize=self.resize_size,
            center_crop=(self.image_size, self.image_size),
            interpolation=self.interpolation,
            channel_order="BGR" if bgr else "RGB",
            value_range=255 if bgr else 1,
            crop_scale=self.crop_scale,
            hflip=self.hflip,
        )

    def encoded(self, source: ImageSource) -> ImageSource:
        files = cast(ImageFiles, source)  # the source load_raw made
        return EncodedFiles(files.root, files.paths)
