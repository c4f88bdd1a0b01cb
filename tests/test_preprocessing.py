"""One Preprocessing: the classic transform it derives is torchvision's standard one, bit for bit, and its
checks name the setting to change."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from dml.data.preprocessing import Preprocessing
from dml.errors import UserError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def photo(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_the_evaluation_transform_is_torchvision_s(interpolation):
    mode = T.InterpolationMode(interpolation)
    pre = Preprocessing(MEAN, STD, resize=256, center_crop=(224, 224), interpolation=interpolation)
    reference = T.Compose([T.Resize(256, mode), T.CenterCrop(224), T.ToTensor(), T.Normalize(MEAN, STD)])
    for height, width in ((300, 417), (333, 256), (500, 500)):
        image = photo(height, width)
        assert torch.equal(pre.transform("eval")(image), reference(image))


def test_the_training_transform_draws_as_torchvision_s():
    pre = Preprocessing(MEAN, STD, resize=256, center_crop=(224, 224), crop_scale=(0.2, 1.0))
    reference = T.Compose(
        [
            T.RandomResizedCrop(224, scale=(0.2, 1.0)),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )
    image = photo(300, 417)
    torch.manual_seed(3)
    ours = [pre.transform("train")(image) for _ in range(4)]
    torch.manual_seed(3)
    theirs = [reference(image) for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_bgr_0_255_and_gray_repeated():
    bgr = Preprocessing(
        (104.0, 117.0, 128.0),
        (1.0, 1.0, 1.0),
        resize=8,
        center_crop=(8, 8),
        channel_order="BGR",
        value_range=255,
    )
    image = photo(8, 8)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()
    expected = pixels.flip(0) - torch.tensor([104.0, 117.0, 128.0]).view(3, 1, 1)
    assert torch.equal(bgr.transform("eval")(image), expected)
    gray = Preprocessing((0.5,) * 3, (0.25,) * 3, resize=(4, 4), color="L", channels=3)
    x = gray.transform("eval")(photo(9, 7))
    assert x.shape == (3, 4, 4) and torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])


@pytest.mark.parametrize(
    "settings, said",
    [
        (
            dict(resize=30, center_crop=(20, 40)),
            "dataset.resize_size=30 is smaller than dataset.image_size=40",
        ),
        (dict(resize=(20, 20), center_crop=(10, 50)), "center_crop=[10, 50] is larger than resize=[20, 20]"),
        (dict(resize=32, interpolation="nearest"), "dataset.interpolation='nearest' must be one of"),
        (dict(resize=32, channels=1), "need one value per channel (1)"),
    ],
)
def test_settings_that_cannot_work_are_named(settings, said):
    with pytest.raises(UserError, match=said.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        Preprocessing(MEAN, STD, **settings)


def test_the_json_says_its_format_and_steps():
    pre = Preprocessing(MEAN, STD, resize=256, center_crop=(224, 224)).to_json()
    assert pre["format"] == "dml preprocessing 2" and len(pre["steps"]) == 6
    assert "halves to even" in pre["steps"][2] and pre["center_crop"] == [224, 224] and pre["resize"] == 256
