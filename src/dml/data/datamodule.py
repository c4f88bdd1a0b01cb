"""RetrievalDataModule: class-disjoint train / validation / test splits and their loaders."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from dml.data.ahead import DecodeAhead, Prefetched
from dml.data.decoding import fallbacks
from dml.data.fast_path import PIPELINES, BatchTransform, EncodedBatch, EncodedCollate
from dml.data.preprocessing import Preprocessing
from dml.data.samplers import ClassBalancedBatchSampler, RandomBatchSampler
from dml.data.splits import ImageSource, RawSplit, RetrievalSplit
from dml.errors import UserError
from dml.evaluation.protocol import EvaluationProtocol
from dml.log import get_logger

log = get_logger(__name__)

SAMPLERS = ("class_balanced", "random")


class RetrievalDataModule(L.LightningDataModule):
    """Base for every benchmark: subclasses read the raw train and test splits, this class does the rest.

    Training labels are remapped to 0..C-1 (proxies index them); evaluation splits keep their class ids.
    With ``val_classes > 0`` the last ``val_classes`` training classes form a validation split for model
    selection; otherwise validation runs on the test split, as the papers' protocols do, and the log
    says so.

    Args:
        batch_size: global training batch: P classes x K samples, or B random items.
        samples_per_class: K, with the class-balanced sampler.
        sampler: ``class_balanced`` (P x K batches, :class:`ClassBalancedBatchSampler`) or ``random``
            (plain random batches, :class:`RandomBatchSampler`).
        num_train_classes: the number of training classes the config promises (proxies are sized by it);
            checked against the data.
        val_classes: training classes held out for validation.
        heldout_per_class: images of each training class kept out of training, as a ``heldout`` split
            scored by their original class ids (the EPS paper's "train digits" columns); 0 for none.
        eval_batch_size: batch size of the evaluation loaders.
        num_workers, pin_memory, persistent_workers: DataLoader settings.
        pipeline: ``classic`` (decode and augment in the loader workers), ``fast`` (the workers read
            encoded bytes; decode and augment batched on the device, see :mod:`dml.data.fast_path`) or
            ``auto`` (fast when training on a GPU from image files).
        decode_ahead: on the fast path, decode and transform the next training batches in a thread while
            the step runs (:mod:`dml.data.ahead`); ``auto``: on a GPU.
        seed: seed of the batch sampler.
        recall_ks: the K of Recall@K in this benchmark's protocol.
    """

    name = "base"
    has_fast_path = False  # subclasses that implement encoded()
    fast_by_default = False  # pipeline=auto takes the fast path on a GPU (image files, not in-memory data)
    draws_val_classes = False  # the reader draws the val_classes itself (a raw "val" split), not the base

    def __init__(
        self,
        batch_size: int = 60,
        samples_per_class: int = 2,
        sampler: str = "class_balanced",
        num_train_classes: int | None = None,
        val_classes: int = 0,
        heldout_per_class: int = 0,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        pipeline: str = "classic",
        decode_ahead: bool | str = "auto",
        seed: int = 0,
        recall_ks: Sequence[int] = (1, 2, 4, 8),
    ):
        super().__init__()
        if sampler not in SAMPLERS:
            raise UserError(f"dataset.sampler={sampler!r} is not one of {', '.join(SAMPLERS)}")
        if pipeline not in PIPELINES:
            raise UserError(f"dataset.pipeline={pipeline!r} is not one of {', '.join(PIPELINES)}")
        if pipeline == "fast" and not self.has_fast_path:
            raise UserError(
                f"dataset.pipeline=fast: {self.name} has no fast input path (its images are not encoded "
                "files); use dataset.pipeline=classic"
            )
        self.pipeline = pipeline
        if decode_ahead not in (True, False, "auto"):
            raise UserError(f"dataset.decode_ahead={decode_ahead!r} must be true, false or auto")
        self.decode_ahead = decode_ahead
        self._batch_transform: BatchTransform | None = None
        if sampler == "class_balanced" and (samples_per_class < 1 or batch_size % samples_per_class):
            raise UserError(
                f"dataset.batch_size={batch_size} must be a multiple of dataset.samples_per_class={samples_per_class}"
            )
        self.batch_size, self.samples_per_class, self.sampler = batch_size, samples_per_class, sampler
        self.num_train_classes, self.val_classes = num_train_classes, val_classes
        if heldout_per_class < 0:
            raise UserError(f"dataset.heldout_per_class={heldout_per_class} must be 0 or more")
        self.heldout_per_class = heldout_per_class
        self.eval_batch_size, self.num_workers, self.seed = eval_batch_size, num_workers, seed
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.recall_ks = list(recall_ks)
        self.splits: dict[str, RetrievalSplit] = {}

    # --- for subclasses -------------------------------------------------------------------------------
    channel_choices: tuple[int, ...] = ()  # the values its ``channels`` setting takes

    @property
    def input_channels(self) -> int | None:
        """Channels of the images it gives the model (``None``: not known before the data are read)."""
        shape = getattr(self, "image_shape", None)
        return int(shape[0]) if shape else None

    def load_raw(self) -> dict[str, RawSplit]:
        """Read the benchmark: {"train": RawSplit, "test": RawSplit}."""
        raise NotImplementedError

    def train_label_of(self, class_ids: torch.Tensor) -> torch.Tensor:
        """Training label of each original class id (identity; MNIST's parity mode overrides it)."""
        return class_ids

    def preprocessing(self) -> Preprocessing:
        """How an image becomes the model's input: the one description that the classic transform, the fast
        path's batched transform, the embedder and an export's ``preprocessing.json`` derive from."""
        raise NotImplementedError

    def transform(self, stage: str) -> Callable | None:
        """The classic path's transform of a loaded item for ``train`` or evaluation (``eval``)."""
        return self.preprocessing().transform(stage)

    def encoded(self, source: ImageSource) -> ImageSource:
        """The fast path's source: the images of ``source`` as encoded bytes (1-D uint8 tensors)."""
        raise NotImplementedError

    @property
    def fast(self) -> bool:
        """Whether batches take the fast path: ``pipeline=fast``, or ``auto`` training on a GPU."""
        if self.pipeline != "auto":
            return self.pipeline == "fast"
        trainer = getattr(self, "trainer", None)
        return self.fast_by_default and trainer is not None and trainer.strategy.root_device.type == "cuda"

    # --- shared ---------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            self._build_splits()
        self._hand_over_protocols()

    def _read(self) -> dict[str, RawSplit]:
        """:meth:`load_raw`, once."""
        if getattr(self, "_raw", None) is None:
            self._raw = self.load_raw()
        return self._raw

    def training_classes(self) -> int:
        """How many classes training sees (what proxies are sized by), read from the data."""
        train = self._read()["train"]
        train_idx, _, _ = self._partition(train)
        return int(torch.unique(self.train_label_of(train.class_ids[train_idx])).numel())

    def _partition(self, train: RawSplit) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Positions in the raw training split: (training, validation, held out)."""
        classes = torch.unique(train.class_ids)
        if self.draws_val_classes:
            val_set = classes[:0]
        elif self.val_classes < 0 or self.val_classes >= len(classes):
            raise UserError(
                f"dataset.val_classes={self.val_classes} must be between 0 and {len(classes) - 1} "
                f"(the training split of {self.name} has {len(classes)} classes)"
            )
        else:
            val_set = classes[len(classes) - self.val_classes :] if self.val_classes else classes[:0]
        in_val = torch.isin(train.class_ids, val_set)
        train_idx, val_idx = torch.nonzero(~in_val).flatten(), torch.nonzero(in_val).flatten()
        train_idx, heldout_idx = self._hold_out(train_idx, train.class_ids)
        return train_idx, val_idx, heldout_idx

    def _build_splits(self) -> None:
        raw = self._read()
        train, test = raw["train"], raw["test"]
        fast = self.fast
        if fast:
            self._batch_transform = self.preprocessing().batch_transform()
            log.info(
                "%s: fast input path (encoded bytes from the loader, decoded and augmented in batches)",
                self.name,
            )

        def make(
            source: ImageSource, positions: torch.Tensor, labels: torch.Tensor, stage: str, **kw
        ) -> RetrievalSplit:
            if fast:
                return RetrievalSplit(self.encoded(source), positions, labels, None, raw_source=source, **kw)
            return RetrievalSplit(source, positions, labels, self.transform(stage), **kw)

        for split_name, split in raw.items():
            if len(split.class_ids) == 0:
                raise UserError(
                    f"the {split_name} split of dataset {self.name} is empty; check the dataset's class settings "
                    "(e.g. dataset.train_digits / dataset.test_digits) and its files"
                )
        train_idx, val_idx, heldout_idx = self._partition(train)
        if len(heldout_idx):
            self.splits["heldout"] = make(train.source, heldout_idx, train.class_ids[heldout_idx], "eval")
        _, train_labels = torch.unique(self.train_label_of(train.class_ids[train_idx]), return_inverse=True)
        self.splits["train"] = make(train.source, train_idx, train_labels, "train")
        if len(val_idx):
            self.splits["val"] = make(train.source, val_idx, train.class_ids[val_idx], "eval")
        if "val" in raw:
            val = raw["val"]
            self.splits["val"] = make(
                val.source, torch.arange(len(val.class_ids)), val.class_ids, "eval", roles=val.roles
            )
        self.splits["test"] = make(
            test.source,
            torch.arange(len(test.class_ids)),
            test.class_ids,
            "eval",
            roles=test.roles,
            extra_labels=test.extra_labels,
        )
        found = self.splits["train"].num_classes
        if self.num_train_classes is not None and found != self.num_train_classes:
            raise UserError(
                f"dataset.num_train_classes={self.num_train_classes} but the training split of {self.name} has "
                f"{found} classes; set dataset.num_train_classes={found}"
            )
        self.num_train_classes = found
        log.info(
            "%s: %s",
            self.name,
            ", ".join(f"{k} {len(v)} images / {v.num_classes} classes" for k, v in self.splits.items()),
        )
        if "val" not in self.splits:
            log.info(
                "no validation classes held out (dataset.val_classes=0): validation runs on the test split"
            )

    def _hold_out(
        self, train_idx: torch.Tensor, class_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(training positions, held-out positions): the last ``heldout_per_class`` images of each class."""
        k = self.heldout_per_class
        if not k:
            return train_idx, train_idx[:0]
        ids = class_ids[train_idx]
        keep, held = [], []
        for c in torch.unique(ids):
            members = train_idx[ids == c]
            if len(members) <= k:
                raise UserError(
                    f"dataset.heldout_per_class={k} leaves no training image of class {int(c)} "
                    f"({len(members)} images); lower it"
                )
            keep.append(members[:-k])
            held.append(members[-k:])
        return torch.cat(keep).sort().values, torch.cat(held).sort().values

    def evaluation_protocol(self, stage: str) -> EvaluationProtocol:
        """How the split evaluated at ``stage`` (``val`` or ``test``) is scored."""
        split = self.splits[self.val_split_name if stage == "val" else "test"]
        return EvaluationProtocol(
            recall_ks=tuple(self.recall_ks),
            roles=split.roles,
            extra_labels=dict(split.extra_labels),
            raw_image=split.raw_image,
        )

    def _hand_over_protocols(self) -> None:
        # Once, when the splits are known: the module being fitted or tested learns how to score them.
        module: Any = self.trainer.lightning_module if self.trainer is not None else None
        if module is not None and hasattr(module, "set_evaluation_protocols"):
            module.set_evaluation_protocols({s: self.evaluation_protocol(s) for s in ("val", "test")})

    def summary(self) -> str:
        """Classes and images of each split, one line each."""
        lines = []
        for name, split in self.splits.items():
            line = f"{name:>5}: {len(split):>7} images, {split.num_classes:>6} classes"
            if split.roles is not None:
                line += f" ({int((split.roles == 0).sum())} queries, {int((split.roles == 1).sum())} gallery)"
            lines.append(line)
        return "\n".join(lines)

    @property
    def val_split_name(self) -> str:
        return "val" if "val" in self.splits else "test"

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def train_dataloader(self) -> DataLoader:
        world, rank = self._world()
        labels = self.splits["train"].labels
        if self.sampler == "random":
            sampler: Sampler = RandomBatchSampler(len(labels), self.batch_size, self.seed, world, rank)
        else:
            sampler = ClassBalancedBatchSampler(
                labels,
                classes_per_batch=self.batch_size // self.samples_per_class,
                samples_per_class=self.samples_per_class,
                seed=self.seed,
                num_replicas=world,
                rank=rank,
            )
        loader = self._loader(self.splits["train"], batch_sampler=sampler, train=True)
        trainer, transform = getattr(self, "trainer", None), self._batch_transform
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        if (
            transform is None
            or self.decode_ahead is False
            or (self.decode_ahead == "auto" and device.type != "cuda")
        ):
            return loader
        ahead = DecodeAhead(
            loader, lambda batch: transform(batch, device, self.augmentation_generator()), device
        )
        return cast(DataLoader, ahead)

    def eval_loader(self, data: str | Dataset, batch_size: int | None = None) -> DataLoader:
        """Batches of a split (by name) or of a subset of one, in order, for evaluating or embedding; on the
        fast path its images are still encoded: :meth:`decode` them where the model runs. Under DDP each
        process gets its share."""
        data = self.splits[data] if isinstance(data, str) else data
        world, rank = self._world()
        sampler: Sampler | None = DistributedSampler(data, world, rank, shuffle=False) if world > 1 else None
        return self._loader(
            data, batch_size=batch_size or self.eval_batch_size, sampler=sampler, shuffle=False
        )

    def decode(
        self, images: Any, device: torch.device | str, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """A batch's images from :meth:`eval_loader` (or the training loader) as the model's input on
        ``device``: the fast path's encoded images decoded and transformed there (training batches
        augmented, drawing from ``generator``); classic batches as they are."""
        if not isinstance(images, EncodedBatch):
            return images
        return cast(BatchTransform, self._batch_transform)(images, device, generator)  # set on the fast path

    def _loader(self, data: Dataset, train: bool = False, **kwargs: Any) -> DataLoader:
        if self._batch_transform is not None:
            kwargs["collate_fn"] = EncodedCollate(train)
        return DataLoader(
            data,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,  # on the fast path, the batch's byte buffer (EncodedBatch.pin_memory)
            persistent_workers=self.persistent_workers,
            **kwargs,
        )

    def teardown(self, stage: str) -> None:
        if self._batch_transform is not None and fallbacks():
            log.info(
                "%d JPEG(s) that the batched decoder refused were decoded on the CPU in this process (%s)",
                fallbacks(),
                stage,
            )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Fast path: decode and augment the batch's encoded images on the device its labels went to,
        drawing the augmentation from :meth:`augmentation_generator`; then the trainer's precision
        converts them as it does classic batches (bf16-true)."""
        if isinstance(batch[0], Prefetched):  # decoded ahead, on the input stream
            images = batch[0].images_on_current_stream()
        elif isinstance(batch[0], EncodedBatch):
            encoded = batch[0]
            generator = self.augmentation_generator() if encoded.train else None
            images = self.decode(encoded, batch[1].device, generator)
        else:
            return batch
        labels, positions = batch[1], batch[2]
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            images = trainer.precision_plugin.convert_input(images)
        return images, labels, positions

    def augmentation_generator(self) -> torch.Generator:
        """The fast path's augmentation RNG: seeded from (seed, epoch, rank), so that each process draws
        its own crops and flips and a run resumed at an epoch boundary draws what it would have."""
        world, rank = self._world()
        trainer = getattr(self, "trainer", None)
        epoch = trainer.current_epoch if trainer is not None else 0
        key = (epoch, rank)
        if getattr(self, "_generator_key", None) != key:
            self._generator = torch.Generator().manual_seed(hash((self.seed, epoch, rank)) % 2**63)
            self._generator_key = key
        return self._generator

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader(self.val_split_name)

    def test_dataloader(self) -> DataLoader:
        return self.eval_loader("test")
