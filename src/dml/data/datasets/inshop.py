"""In-Shop Clothes Retrieval (Liu et al. 2016): 3,997 training items; test queries against a gallery."""

from __future__ import annotations

from dml.data.datasets.benchmark import FileBenchmark, read_table
from dml.data.preparation import Archive
from dml.errors import UserError

SOURCE = "the DeepFashion In-shop Clothes Retrieval Benchmark, https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html"


class InShopDataModule(FileBenchmark):
    """Reads ``img/`` (from img.zip) and ``Eval/list_eval_partition.txt``; the test split holds the
    14,218 queries (role 0) and the 12,612 gallery images (role 1), and queries search the gallery."""

    name = "inshop"
    archives = (
        Archive("img.zip", provides="img", source=f"{SOURCE} (Img/img.zip)"),
        Archive(
            "Eval/list_eval_partition.txt",
            provides="Eval/list_eval_partition.txt",
            source=f"{SOURCE} (Eval/list_eval_partition.txt)",
        ),
    )

    def read_layout(self) -> dict[str, dict[str, list]]:
        path = self.root / "Eval" / "list_eval_partition.txt"
        # a count, a header, then: image_name item_id evaluation_status
        rows = read_table(path, (str, str, str), skip=2, source=SOURCE)
        splits: dict[str, dict[str, list]] = {
            "train": {"path": [], "label": []},
            "test": {"path": [], "label": [], "role": []},
        }
        roles = {"query": 0, "gallery": 1}
        for row in rows:
            if row[2] not in ("train", "query", "gallery") or not (
                row[1].startswith("id_") and row[1][3:].isdigit()
            ):
                raise UserError(
                    f"{path}: unexpected line {' '.join(row)!r}; download the official file again from {SOURCE}"
                )
            image, item, status = row
            split = splits["train"] if status == "train" else splits["test"]
            split["path"].append(image)
            split["label"].append(int(item[3:]))
            if status != "train":
                split["role"].append(roles[status])
        return splits
