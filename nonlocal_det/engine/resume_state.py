"""The random states and the position in the training data, saved with every checkpoint so that
``--resume`` continues the data order and the random choices of the run it resumes (Detectron2
restarts its sampler and seeds again); its limits are in docs/reliability.md."""

import contextlib
import itertools
import logging
import random
from collections import namedtuple
from typing import Any, Dict, Iterator, Optional

import numpy as np
import torch
from detectron2.data.common import AspectRatioGroupedDataset, MapDataset, ToIterableDataset
from detectron2.utils import comm
from torch.utils.data import DataLoader, Sampler, get_worker_info

__all__ = ["TrainingResumeState", "get_rng_state", "preserved_rng", "set_rng_state"]

logger = logging.getLogger(__name__)

STATE_VERSION = 1


def _raw_rng_state() -> tuple:
    """The random states as the generators give them (cheap: taken for each image loaded)."""
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state_all()
    return torch.get_rng_state(), np.random.get_state(), random.getstate(), cuda


def _rng_state_dict(raw: tuple) -> Dict[str, Any]:
    cpu, (_, keys, pos, has_gauss, gauss), (version, internal, gauss_next), cuda = raw
    numpy = dict(keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                 has_gauss=int(has_gauss), cached_gaussian=float(gauss))  # fmt: skip
    python = dict(version=int(version), internal=torch.tensor(internal, dtype=torch.int64),
                  gauss_next=gauss_next)  # fmt: skip
    state = {"torch": cpu, "numpy": numpy, "python": python}
    return state if cuda is None else dict(state, cuda=cuda)


def get_rng_state() -> Dict[str, Any]:
    """The states of torch's CPU generator (and CUDA's, once initialised), numpy's global
    generator and Python's ``random``, as tensors and numbers (loadable with
    ``torch.load(weights_only=True)``)."""
    return _rng_state_dict(_raw_rng_state())


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore the states of :func:`get_rng_state`. CUDA's are restored when they were saved and
    this process sees as many devices (else logged and left as seeded)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            logger.warning(
                f"The checkpoint holds the random states of {len(cuda)} CUDA device(s), this "
                f"process sees {torch.cuda.device_count()}: CUDA's random states stay as seeded"
            )


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Inside, the random generators may be used; on leaving, they are back in the states they
    had on entering (an evaluation during training leaves the training's random choices as they
    would have been without it)."""
    state = get_rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def _as_dict(rng):
    return _rng_state_dict(rng) if isinstance(rng, tuple) else rng


class _ResumableSampler(Sampler):
    """Yields ``sampler``'s indices from position ``start`` on (the first ``start`` are skipped,
    not loaded). In the main process it counts the positions taken (``taken``) and keeps the
    last index, and restores ``rng_to_restore`` (if set) before its first index."""

    def __init__(self, sampler: Sampler):
        self.sampler, self.start, self.taken = sampler, 0, 0
        self.last_index: Optional[int] = None
        self.rng_to_restore: Optional[Dict[str, Any]] = None

    def __iter__(self):
        in_main = get_worker_info() is None
        if in_main:
            rng, self.rng_to_restore = self.rng_to_restore, None
            if rng is not None:
                set_rng_state(rng)
        self.taken = self.start
        for index in itertools.islice(iter(self.sampler), self.start, None):
            if in_main:
                self.last_index = index
                self.taken += 1
            yield index


# An image taken from the index sequence, waiting in an aspect-ratio bucket.
_Waiting = namedtuple("_Waiting", "item position index rng")


class _TrackedItems:
    """What an ``AspectRatioGroupedDataset`` iterates: its ``DataLoader``, counting the images
    taken, keeping those still in a bucket (with their index and the random state they were
    loaded with, when loaded in the main process), and on resume loading the waiting images of
    the checkpoint again before continuing."""

    def __init__(self, loader: DataLoader, grouped: AspectRatioGroupedDataset, sampler):
        self.loader, self.grouped, self.sampler = loader, grouped, sampler
        self.mapped = loader.dataset.dataset  # map-style: index -> loaded image
        self.taken, self.waiting, self.replay = 0, [], []
        self.rng_to_restore: Optional[Dict[str, Any]] = None

    def prune(self) -> None:
        """Forget the images that left the buckets (went into a batch)."""
        in_buckets = {id(d) for bucket in self.grouped._buckets for d in bucket}
        self.waiting = [w for w in self.waiting if id(w.item) in in_buckets]

    def __iter__(self):
        iterator = iter(self.loader)  # creating it draws from torch's generator (its seed)
        replay, self.replay = self.replay, []
        for r in replay:
            set_rng_state(r["rng"])
            item = self.mapped[r["index"]]
            self.waiting.append(_Waiting(item, r["position"], r["index"], r["rng"]))
            yield item
        rng, self.rng_to_restore = self.rng_to_restore, None
        if rng is not None:
            set_rng_state(rng)
        self.taken = self.sampler.start
        in_main = self.loader.num_workers == 0
        while True:
            self.prune()
            state = _raw_rng_state() if in_main else None
            try:
                item = next(iterator)
            except StopIteration:
                return
            index = self.sampler.last_index if in_main else None
            self.waiting.append(_Waiting(item, self.taken, index, state))
            self.taken += 1
            yield item


def _stages(data_loader):
    """(batch_size, DataLoader, AspectRatioGroupedDataset or None) of a Detectron2 train loader,
    or a string saying why it cannot be resumed."""
    grouped, inner = None, getattr(data_loader, "dataset", None)
    if isinstance(data_loader, MapDataset) and isinstance(inner, AspectRatioGroupedDataset):
        data_loader = inner  # build_batch_data_loader with a collate_fn
    if isinstance(data_loader, AspectRatioGroupedDataset):
        grouped, loader, batch_size = data_loader, data_loader.dataset, data_loader.batch_size
    else:
        loader, batch_size = data_loader, getattr(data_loader, "batch_size", None)
    if not isinstance(loader, DataLoader) or not isinstance(loader.dataset, ToIterableDataset):
        return (
            f"the train loader is a {type(data_loader).__name__}, not Detectron2's "
            "build_detection_train_loader over a map-style dataset"
        )
    if not loader.dataset.shard_sampler:
        return "the train loader's sampler is sharded by the dataset itself"
    return batch_size, loader, grouped


class TrainingResumeState:
    """The random states and the train loader's position (indices taken, images waiting in the
    aspect-ratio buckets) of a run, as a checkpointable.

    Args:
        data_loader: the trainer's train loader (``build_detection_train_loader``'s result). Its
            sampler is wrapped so that it can start at a saved position; an unsupported loader is
            left as it is (its data order restarts on resume, logged).
    """

    def __init__(self, data_loader):
        self.loaded, self._resumed, self._tracked = False, "", None
        stages = _stages(data_loader)
        self.unsupported: Optional[str] = stages if isinstance(stages, str) else None
        if self.unsupported:
            return
        self._batch_size, self._loader, grouped = stages
        self._sampler = _ResumableSampler(self._loader.dataset.sampler)
        self._loader.dataset.sampler = self._sampler
        if grouped is not None:
            self._tracked = _TrackedItems(self._loader, grouped, self._sampler)
            grouped.dataset = self._tracked

    def _data_state(self) -> Optional[Dict[str, Any]]:
        if self.unsupported:
            return None
        waiting = []
        if self._tracked is not None:
            self._tracked.prune()
            position = self._tracked.taken
            waiting = [
                {"position": w.position, "index": w.index, "rng": _as_dict(w.rng)}
                for w in self._tracked.waiting
            ] + self._tracked.replay  # the checkpoint's, if no image was taken since
        elif self._loader.num_workers == 0:
            position = self._sampler.taken
        else:
            return None  # batches made in the workers: the main process does not see positions
        seed = getattr(self._sampler.sampler, "_seed", None)
        return {
            "position": position,
            "waiting": waiting,
            "dataset_size": len(self._loader.dataset.dataset),
            "batch_size": self._batch_size,
            "num_workers": self._loader.num_workers,
            "world_size": comm.get_world_size(),
            "sampler_seed": seed if isinstance(seed, int) else None,
        }

    def state_dict(self) -> Dict[str, Any]:
        """The random states now and the data position (None for an unsupported loader)."""
        return {"version": STATE_VERSION, "rng": get_rng_state(), "data": self._data_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Set the sampler to the saved position and prepare the waiting images and the random
        states; they are applied when the resumed training takes its first image."""
        self.loaded = True
        main = comm.get_rank() == 0
        rng = state["rng"] if main else None
        data, why = state.get("data"), None
        if self.unsupported:
            why = self.unsupported
        elif data is None:
            why = (
                "the checkpoint holds no data position (its train loader was not supported, or "
                "made its batches in worker processes without aspect-ratio grouping)"
            )
        else:
            now = {
                "dataset_size": len(self._loader.dataset.dataset),
                "batch_size": self._batch_size,
                "world_size": comm.get_world_size(),
            }
            changed = [f"{k} {data[k]} -> {v}" for k, v in now.items() if data[k] != v]
            if changed:
                why = "the training data changed since the checkpoint: " + ", ".join(changed)
        if why:
            self._resumed = f"the data order restarts from the beginning: {why}"
            if rng is not None:
                set_rng_state(rng)  # no data stream to restore them in: now
            return
        sampler = self._sampler.sampler
        if data["sampler_seed"] is not None and getattr(sampler, "_seed", None) is not None:
            sampler._seed = data["sampler_seed"]  # SEED -1: the shuffle seed of the first run
        self._sampler.start = self._sampler.taken = data["position"]
        replay = [w for w in data["waiting"] if w["index"] is not None]
        notes = []
        if not main:
            replay = []
            notes.append("random states as seeded (the checkpoint holds the main process's)")
        elif len(replay) < len(data["waiting"]) or self._loader.num_workers > 0:
            notes.append(
                "with DATALOADER.NUM_WORKERS > 0 the workers' random states start afresh and "
                "the images that waited in the aspect-ratio buckets are skipped"
            )
        if self._tracked is not None:
            self._tracked.taken = data["position"]
            self._tracked.replay = replay
            self._tracked.rng_to_restore = rng
        else:
            self._sampler.rng_to_restore = rng
        self._resumed = (
            f"the data order continues at position {data['position']} of the sampler's "
            f"sequence ({len(replay)} waiting image(s) loaded again), with the random states of "
            "the checkpoint" + "".join(f"; {n}" for n in notes)
        )

    def log_resume(self, path: str = "the checkpoint") -> None:
        """Log how the resumed run continues (call after resuming from ``path``)."""
        if not self.loaded:
            logger.warning(
                f"{path} holds no data position or random state (saved by an older version): "
                "the data order restarts from the beginning of the sampler's sequence and the "
                "random states are those seeded from SEED"
            )
        elif self._resumed.startswith("the data order restarts"):
            logger.warning(f"Resumed from {path}: {self._resumed}")
        else:
            logger.info(f"Resumed from {path}: {self._resumed}")
