"""A benchmark's splits: their images (any random-access source), class ids, and the query/gallery roles
and extra label sets their evaluation protocol uses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch.utils.data import Dataset


class ImageSource(Protocol):
    """Random access to the raw images of one split."""

    def __len__(self) -> int: ...

    def load(self, index: int) -> Any: ...


@dataclass
class RawSplit:
    """A split as read from disk: its images and each image's original class id.

    Attributes:
        roles: for query/gallery protocols (In-Shop), 0 for a query and 1 for a gallery item.
        extra_labels: other label sets to evaluate with, by name (Omniglot's fine character labels).
    """

    source: ImageSource
    class_ids: torch.Tensor
    roles: torch.Tensor | None = None
    extra_labels: dict[str, torch.Tensor] = field(default_factory=dict)


class RetrievalSplit(Dataset):
    """Items (image, label, position) of one split; the position lets DDP evaluation drop duplicates.

    ``roles`` and ``extra_labels`` (see :class:`RawSplit`) are indexed by position, like ``labels``.
    """

    def __init__(
        self,
        source: ImageSource,
        indices: torch.Tensor,
        labels: torch.Tensor,
        transform: Callable | None,
        roles: torch.Tensor | None = None,
        extra_labels: dict[str, torch.Tensor] | None = None,
        raw_source: ImageSource | None = None,
    ):
        self.raw_source = raw_source if raw_source is not None else source
        self.source, self.indices, self.labels, self.transform = (
            source,
            indices.long(),
            labels.long(),
            transform,
        )
        self.roles, self.extra_labels = roles, dict(extra_labels or {})

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int, int]:
        image = self.source.load(int(self.indices[i]))
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[i]), i

    def raw_image(self, position: int) -> Any:
        """The item at ``position`` decoded, without the transform (its raw source: on the fast path
        the items themselves are encoded bytes)."""
        return self.raw_source.load(int(self.indices[position]))

    @property
    def num_classes(self) -> int:
        return int(torch.unique(self.labels).numel())
