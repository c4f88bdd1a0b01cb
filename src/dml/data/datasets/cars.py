"""Cars196 (Krause et al. 2013): 196 car models; classes 1-98 train, 99-196 test."""

from __future__ import annotations

import numpy as np
from scipy.io import loadmat

from dml.data.datasets.benchmark import FileBenchmark
from dml.data.preparation import Archive
from dml.errors import UserError

SOURCE = "the Stanford Cars page, https://ai.stanford.edu/~jkrause/cars/car_dataset.html"


class CarsDataModule(FileBenchmark):
    """Reads ``car_ims/`` (from car_ims.tgz) and the annotations of ``cars_annos.mat``."""

    name = "cars"
    archives = (
        Archive(
            "car_ims.tgz",
            provides="car_ims",
            url="http://imagenet.stanford.edu/internal/car196/car_ims.tgz",
            md5="d5c8f0aa497503f355e17dc7886c3f14",
            source=SOURCE,
        ),
        Archive(
            "cars_annos.mat",
            provides="cars_annos.mat",
            url="http://imagenet.stanford.edu/internal/car196/cars_annos.mat",
            md5="b407c6086d669747186bd1d764ff9dbc",
            source=SOURCE,
        ),
    )

    def read_layout(self) -> dict[str, dict[str, list]]:
        path = self.root / "cars_annos.mat"
        try:
            annotations = np.atleast_1d(loadmat(path, squeeze_me=True)["annotations"])
            images = [str(a) for a in annotations["relative_im_path"]]
            labels = [int(c) for c in annotations["class"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(
                f"{path} is not a readable Cars196 annotation file ({e}); download it again from {SOURCE}"
            ) from e
        splits: dict[str, dict[str, list]] = {
            "train": {"path": [], "label": []},
            "test": {"path": [], "label": []},
        }
        for image, label in zip(images, labels, strict=True):
            split = "train" if label <= 98 else "test"
            splits[split]["path"].append(image)
            splits[split]["label"].append(label)
        return splits
