"""Decoding ahead: the fast path's next training batches decoded and transformed by a thread of their own
while the current step runs.

The input stream (:func:`~dml.data.decoding.input_stream`) lets the GPU decode batch N+1 while it computes
step N, but only if the host queues that decode before step N ends. Anything in the step that reads a
value back (Lightning, under DDP, reads a broadcast flag before every batch; a metric logged to the
progress bar is read every few steps) holds the host until the device is idle, and the decode then runs
alone. Here a thread takes the loader's batches, decodes and transforms each on the input stream and
marks it with an event; the training loop receives the finished images and makes the compute stream
wait for that event (:meth:`Prefetched.images_on_current_stream`), so no read in the step can delay a
decode. Batches are made in order, from one thread: the augmentation draws what it draws without it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from dml.data.decoding import cuda_device, input_stream
from dml.data.fast_path import EncodedBatch

_END = object()


class Prefetched:
    """A batch's images, made on the input stream by the decoding thread, and the event that marks them
    done (None off CUDA). A plain object: Lightning's transfer to the device leaves it as it is."""

    __slots__ = ("event", "images")

    def __init__(self, images: torch.Tensor, event: torch.cuda.Event | None):
        self.images, self.event = images, event

    def images_on_current_stream(self) -> torch.Tensor:
        """The images, safe to use on the caller's current stream: it waits for the event, and their
        memory is not reused until its work queued so far is done."""
        if self.event is None:
            return self.images
        stream = torch.cuda.current_stream(self.images.device)
        stream.wait_event(self.event)
        self.images.record_stream(stream)
        return self.images


class DecodeAhead:
    """The batches of a fast-path training loader, ``(Prefetched, labels, positions)``, made ``depth`` ahead
    by a thread. ``transform``: an :class:`~dml.data.fast_path.EncodedBatch` to its images on ``device``
    (called in the thread, in order). Forwards ``len``, ``sampler`` and ``batch_sampler`` to the loader, so
    that Lightning counts its batches and sets its sampler's epoch."""

    def __init__(
        self,
        loader: DataLoader,
        transform: Callable[[EncodedBatch], torch.Tensor],
        device: torch.device | str,
        depth: int = 2,
    ):
        self.loader, self.transform, self.device, self.depth = loader, transform, cuda_device(device), depth
        self._stop: threading.Event | None = None

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def sampler(self) -> Any:
        return self.loader.sampler

    @property
    def batch_sampler(self) -> Any:
        return self.loader.batch_sampler

    @property
    def dataset(self) -> Any:
        return self.loader.dataset

    def __iter__(self) -> Iterator[tuple[Prefetched, Any, Any]]:
        if self._stop is not None:
            self._stop.set()  # an epoch left early: its thread ends at its next batch
        stop = self._stop = threading.Event()
        made: queue.Queue = queue.Queue(maxsize=self.depth)
        thread = threading.Thread(target=self._work, args=(made, stop), daemon=True, name="dml-decode-ahead")
        thread.start()
        try:
            while True:
                item = made.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():  # unblock a thread waiting to hand over a batch
                with contextlib.suppress(queue.Empty):
                    made.get(timeout=0.05)

    def _work(self, made: queue.Queue, stop: threading.Event) -> None:
        try:
            cuda = self.device.type == "cuda"
            if cuda:
                torch.cuda.set_device(self.device)
            for encoded, labels, positions in self.loader:
                if stop.is_set():
                    return
                event = None
                if cuda:
                    stream = input_stream(self.device)
                    with torch.cuda.stream(stream):
                        images = self.transform(encoded)
                    event = torch.cuda.Event()
                    event.record(stream)
                else:
                    images = self.transform(encoded)
                if not _put(made, (Prefetched(images, event), labels, positions), stop):
                    return
            _put(made, _END, stop)
        except BaseException as e:  # noqa: BLE001 - handed to the training loop, which raises it
            _put(made, e, stop)


def _put(made: queue.Queue, item: object, stop: threading.Event) -> bool:
    """Hand ``item`` over unless the consumer has stopped; whether it was."""
    while not stop.is_set():
        try:
            made.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False
