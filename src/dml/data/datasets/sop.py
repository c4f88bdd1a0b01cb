"""Stanford Online Products (Oh Song et al. 2016): 22,634 products; 11,318 train / 11,316 test classes."""

from __future__ import annotations

from dml.data.datasets.benchmark import FileBenchmark, read_table
from dml.data.preparation import Archive


class SOPDataModule(FileBenchmark):
    """Reads ``Stanford_Online_Products/{Ebay_train.txt, Ebay_test.txt, <super>_final/}``."""

    name = "sop"
    archives = (
        Archive(
            "Stanford_Online_Products.zip",
            provides="Stanford_Online_Products",
            url="ftp://cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip",
            sha256="b04fa78210e69fab050ce73939550e1cd0f96890bdd98ec9fee732c3b756ef48",
            source="https://cvgl.stanford.edu/projects/lifted_struct/ (Stanford_Online_Products.zip)",
        ),
    )

    def read_layout(self) -> dict[str, dict[str, list]]:
        base = self.root / "Stanford_Online_Products"
        splits = {}
        for split, filename in (("train", "Ebay_train.txt"), ("test", "Ebay_test.txt")):
            # header: image_id class_id super_class_id path
            rows = read_table(base / filename, (int, int, int, str), skip=1)
            splits[split] = {
                "path": [f"Stanford_Online_Products/{row[3]}" for row in rows],
                "label": [row[1] for row in rows],
            }
        return splits
