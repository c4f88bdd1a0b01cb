"""CUB-200-2011 (Wah et al. 2011): 200 bird species; classes 1-100 train, 101-200 test."""

from __future__ import annotations

from dml.data.datasets.benchmark import FileBenchmark, read_table
from dml.data.preparation import Archive
from dml.errors import UserError


class CUBDataModule(FileBenchmark):
    """Reads ``CUB_200_2011/{images.txt, image_class_labels.txt, images/}`` from CUB_200_2011.tgz."""

    name = "cub"
    archives = (
        Archive(
            "CUB_200_2011.tgz",
            provides="CUB_200_2011",
            url="https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
            md5="97eceeb196236b17998738112f37df78",
            source="https://data.caltech.edu/records/65de6-vp158 (CUB_200_2011.tgz)",
        ),
    )
    num_test_boundary = 100  # classes above it are test classes

    def read_layout(self) -> dict[str, dict[str, list]]:
        base = self.root / "CUB_200_2011"
        paths = dict(read_table(base / "images.txt", (str, str)))
        splits: dict[str, dict[str, list]] = {
            "train": {"path": [], "label": []},
            "test": {"path": [], "label": []},
        }
        for image_id, label in read_table(base / "image_class_labels.txt", (str, int)):
            if image_id not in paths:
                raise UserError(
                    f"{base / 'image_class_labels.txt'} names image {image_id}, absent from images.txt"
                )
            split = "train" if label <= self.num_test_boundary else "test"
            splits[split]["path"].append(f"CUB_200_2011/images/{paths[image_id]}")
            splits[split]["label"].append(label)
        return splits
