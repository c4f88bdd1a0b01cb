"""Omniglot (Lake et al. 2015): 50 alphabets; 30 background alphabets train, 20 evaluation ones test.

The EPS protocol trains on alphabet labels and evaluates on alphabets (coarse) and on characters (fine).
"""

from __future__ import annotations

from dml.data.datasets.benchmark import FileBenchmark
from dml.data.preparation import Archive
from dml.data.splits import RawSplit
from dml.errors import UserError

BASE_URL = "https://github.com/brendenlake/omniglot/raw/master/python/"


class OmniglotDataModule(FileBenchmark):
    """Reads ``images_background/<alphabet>/<character>/*.png`` and ``images_evaluation/...``.

    Args:
        label_mode: ``alphabet`` (EPS) or ``character``: the labels to train and to evaluate with; the
            other set is evaluated too, under ``<stage>/<other>/...``.
        **kwargs: see :class:`FileBenchmark`.
    """

    name = "omniglot"
    archives = tuple(
        Archive(
            f"{part}.zip",
            provides=part,
            url=BASE_URL + f"{part}.zip",
            md5=md5,
            source=BASE_URL + f"{part}.zip",
        )
        for part, md5 in (
            ("images_background", "68d2efa1b9178cc56df9314c21c6e718"),
            ("images_evaluation", "6b91aef0f799c5bb55b94e3f2daec811"),
        )
    )

    def __init__(self, root: str, label_mode: str = "alphabet", **kwargs):
        if label_mode not in ("alphabet", "character"):
            raise UserError(f"dataset.label_mode must be 'alphabet' or 'character', got {label_mode!r}")
        super().__init__(root, **kwargs)
        self.label_mode = label_mode

    def load_raw(self) -> dict[str, RawSplit]:
        # The index holds alphabets as labels and characters as the fine set, whatever the label mode.
        raw = super().load_raw()
        for split in raw.values():
            alphabets, characters = split.class_ids, split.extra_labels.pop("fine")
            if self.label_mode == "alphabet":
                split.class_ids, split.extra_labels = alphabets, {"character": characters}
            else:
                split.class_ids, split.extra_labels = characters, {"alphabet": alphabets}
        return raw

    def read_layout(self) -> dict[str, dict[str, list]]:
        splits, alphabet_id, character_id = {}, 0, 0
        for split, part in (("train", "images_background"), ("test", "images_evaluation")):
            columns: dict[str, list] = {"path": [], "label": [], "fine": []}
            alphabets = sorted(p for p in (self.root / part).iterdir() if p.is_dir())
            if not alphabets:
                raise UserError(f"{self.root / part} holds no alphabet folders; extract {part}.zip again")
            for alphabet in alphabets:
                for character in sorted(p for p in alphabet.iterdir() if p.is_dir()):
                    for image in sorted(character.glob("*.png")):
                        columns["path"].append(str(image.relative_to(self.root)))
                        columns["label"].append(alphabet_id)
                        columns["fine"].append(character_id)
                    character_id += 1
                alphabet_id += 1
            splits[split] = columns
        return splits
