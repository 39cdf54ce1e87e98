"""The Trainer: a short, device-aware training loop that calls its collaborators.

Each concern lives elsewhere: devices and precision in ``_device``, metrics in ``_metrics``,
progress output in ``_progress``, random streams in ``_rng``, the file format in
``_checkpoint`` and input handling for ``predict`` in ``_predict``. This module wires them into
``fit`` / ``evaluate`` / ``predict`` and the checkpoint round trip.
"""

from __future__ import annotations

import copy
import math
import os
import secrets
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ._checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    atomic_save,
    check_finite,
    cpu_state_dict,
    fingerprint,
    frozen_keys,
    read_checkpoint,
)
from ._device import PrecisionName, eval_mode, resolve_device, resolve_precision
from ._distributed import all_reduce_sum, barrier, broadcast_state, detect, gather_rows, join, rank_and_world
from ._early_stopping import EarlyStopping
from ._features import (
    FeatureSet,
    backbone_key,
    cache_key,
    cache_limit_bytes,
    cacheability,
    compute_features,
    default_cache_dir,
    drop_cache,
    open_features,
    prune_caches,
)
from ._freeze import unfreeze_features
from ._heads import _locate
from ._history import History
from ._metrics import ConfusionMatrix, RunningMean
from ._models import rebuild_model
from ._predict import PredictInput, Prediction, as_items, is_single, to_batch
from ._progress import make_progress
from ._rng import capture_rng, epoch_rng, restore_rng
from ._schedule import adopt_new_group
from ._sources import CachedSource, LoaderSource, make_loader
from ._spec import build_spec
from ._state_dict import state_dict_differences
from ._transforms import ImageTransform, imagenet_transform

__all__ = ["LoadedModel", "Trainer", "load_model"]

Data = Dataset[Any] | DataLoader[Any]


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


class Trainer:
    """Train, evaluate, predict with and checkpoint a classifier, on whatever device is there.

    The Trainer is the loop you would write by hand for transfer learning, with the parts that
    are easy to get wrong done right: frozen features stay frozen (BatchNorm included) across
    epochs, metrics are computed without slowing the GPU down, the run is reproducible and can
    be resumed bit for bit, Ctrl-C leaves a usable checkpoint, and checkpoints load safely on
    any machine.

    Args:
        model: The network, typically from :func:`create_model`, :func:`freeze_features` and
            :func:`replace_classifier`. It is moved to ``device``.
        optimizer: Defaults to Adam over the trainable parameters with learning rate ``lr``.
            An optimizer that also holds frozen parameters gets a warning.
        lr: Learning rate of the default optimizer.
        loss_fn: Defaults to ``nn.CrossEntropyLoss()``; called as ``loss_fn(logits, targets)``.
        scheduler: An LR scheduler for ``optimizer``, or a function that makes one from the
            optimizer (useful with the default optimizer); stepped once per epoch.
        device: ``"auto"`` picks CUDA, then Apple MPS, then the CPU.
        precision: ``"auto"`` uses bf16 autocast on CUDA GPUs that support it and fp32
            elsewhere; ``"fp32"``, ``"bf16"`` and ``"fp16"`` (with gradient scaling) force one.
        class_names: Names of the classes, in output order; taken from the training dataset's
            ``classes`` attribute (as ImageFolder has) when not given.
        transform: Preprocessing that ``predict`` applies to paths and images, and that
            checkpoints record; defaults to :func:`imagenet_transform` for the model's weights.
        seed: Seeds shuffling and dropout; a random one is drawn (and checkpointed) when None.
        progress: Show a progress bar (tqdm, on a terminal) or one line per epoch.
        cache_features: Compute the frozen backbone's output once and train the head on it
            every epoch (about 10x faster for VGG16 with frozen features). ``"auto"`` does so
            only when the result is the same as without caching: the part before the head is
            frozen with BatchNorm and dropout frozen, the data is a Dataset, and its transform
            is deterministic (an :func:`imagenet_transform` with ``train=False``, or tensors).
            ``True`` also trusts other transforms to be deterministic; ``False`` never caches.
        cache_dir: Where features too large for memory are kept as memory-mapped files, reused
            by later runs with the same weights, transform and data; default
            ``$VGGTRANSFER_CACHE`` or ``~/.cache/vggtransfer/features``.
        channels_last: Keep convolution weights and input batches in channels-last (NHWC)
            layout, the fast one for GPU tensor cores; ``"auto"`` turns it on for CUDA.
        compile_features: Run the one-time feature pass of feature caching through
            ``torch.compile`` with inductor freezing, which folds the frozen BatchNorm layers
            into the convolutions. Compiling takes tens of seconds, so it pays off on large data
            sets; it is redone whenever the frozen weights change.
        compile_model: Run the training and evaluation steps (forward and backward) through
            ``torch.compile``: the model's when training on images, the head's when training
            on cached features. The speed-up is for GPUs: full fine-tuning of VGG16 was
            measured 1.5x faster compiled on an H200 (bf16, in the figures that led to this
            option; not yet re-measured here); on CPUs compiling costs more than it saves.
            The first step of a fit compiles (about a minute for VGG16), and again after
            :meth:`unfreeze_features`. Dropout uses the same random numbers as without
            compiling, so results agree with an uncompiled run within float tolerance.

    Example:
        >>> import torch, vggtransfer as vt
        >>> from torch.utils.data import TensorDataset
        >>> model = vt.replace_classifier(vt.freeze_features(vt.create_model("vgg11", weights=None)), 2)
        >>> data = TensorDataset(torch.randn(8, 3, 32, 32), torch.tensor([0, 1] * 4))
        >>> trainer = vt.Trainer(model, device="cpu", seed=0, progress=False)
        >>> history = trainer.fit(data, epochs=2, batch_size=4, num_workers=0)
        >>> len(history), trainer.epoch
        (2, 2)
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        lr: float = 1e-3,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        scheduler: Any = None,
        device: str | torch.device = "auto",
        precision: PrecisionName = "auto",
        class_names: Sequence[str] | None = None,
        transform: ImageTransform | Callable[[Any], torch.Tensor] | None = None,
        seed: int | None = None,
        progress: bool = True,
        cache_features: bool | Literal["auto"] = "auto",
        cache_dir: str | os.PathLike[str] | None = None,
        channels_last: bool | Literal["auto"] = "auto",
        compile_features: bool = False,
        compile_model: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Trainer: expected model to be an nn.Module but got {type(model).__name__}")
        launch = detect()
        self.device = resolve_device(device)
        if launch is not None and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", launch.local_rank)  # one GPU per process
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if launch is not None:
            join(launch, self.device)
        self.rank, self.world_size = rank_and_world()
        self.precision = resolve_precision(precision, self.device)
        # channels_last (NHWC) is what tensor cores want for convolutions; on CPUs it rarely helps.
        self.channels_last = self.device.type == "cuda" if channels_last == "auto" else bool(channels_last)
        self.model = model.to(self.device)
        # Every process starts from rank 0's weights, whatever its own initialisation was.
        broadcast_state(unwrap(self.model))
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
        self.lr = lr
        self.optimizer = optimizer if optimizer is not None else self._default_optimizer()
        if optimizer is not None:
            self._warn_if_optimizer_holds_frozen(optimizer)
        self.loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
        if scheduler is not None and not hasattr(scheduler, "state_dict") and callable(scheduler):
            scheduler = scheduler(self.optimizer)
        self.scheduler = scheduler
        self.scaler = self.precision.make_scaler()
        self.class_names = list(class_names) if class_names is not None else None
        self.transform = transform if transform is not None else _default_transform(unwrap(model))
        self.seed = seed if seed is not None else secrets.randbits(62)
        self.progress = make_progress(progress and self.rank == 0)  # rank 0 alone prints
        self.epoch = 0
        self.global_step = 0
        self.history = History()
        self.unfreeze_lr: float | None = None
        if cache_features not in ("auto", True, False):
            raise ValueError(
                f"Trainer: expected cache_features to be 'auto', True or False but got {cache_features!r}"
            )
        self.cache_features = cache_features
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        #: Whether the last ``fit`` trained on cached features, and why not if it did not.
        self.cache_report: dict[str, str] = {}
        self._feature_sets: dict[str, FeatureSet] = {}
        self.compile_features = compile_features
        self.compile_model = compile_model
        self._compiled: tuple[str, nn.Module] | None = None  # (backbone fingerprint, compiled network)
        #: Plain data saved with every checkpoint and restored by load_checkpoint (e.g. a data split).
        self.extra: dict[str, Any] = {}
        self._best: dict[str, Any] = {"value": None, "epoch": None, "wait": 0, "state": None}

    # ------------------------------------------------------------------ set-up helpers

    def _feature_network(self) -> nn.Module:
        """The network for the one-time feature pass: compiled when asked, for these weights."""
        if not self.compile_features:
            return self.network
        key = backbone_key(self.network)
        compiled = self._compiled
        if compiled is None or compiled[0] != key:
            # Inductor freezing turns the weights into constants, so a graph compiled for other
            # weights would silently compute stale features: recompile when they change.
            network: nn.Module = torch.compile(self.network, options={"freezing": True})  # type: ignore[assignment]
            compiled = (key, network)
            self._compiled = compiled
        return compiled[1]

    def _to_device(self, inputs: torch.Tensor) -> torch.Tensor:
        """Move a batch to the device (asynchronously from pinned memory), NHWC if configured."""
        if self.channels_last and inputs.ndim == 4:
            return inputs.to(self.device, non_blocking=True, memory_format=torch.channels_last)
        return inputs.to(self.device, non_blocking=True)

    @property
    def network(self) -> nn.Module:
        """The model without DDP / compile wrappers: what checkpoints save and load."""
        return unwrap(self.model)

    def _default_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(
                "Trainer: the model has no trainable parameters (every requires_grad is False); "
                "give it a new head with vt.replace_classifier(model, num_classes) or call "
                "vt.unfreeze_features(model)"
            )
        # The fused kernel updates all parameters in one pass: same arithmetic, about 4x less
        # time than the per-tensor loop for VGG16's 12.5M-parameter head on a CPU.
        try:
            return torch.optim.Adam(params, lr=self.lr, fused=True)
        except RuntimeError:  # a device or dtype without a fused kernel
            return torch.optim.Adam(params, lr=self.lr)

    def _warn_if_optimizer_holds_frozen(self, optimizer: torch.optim.Optimizer) -> None:
        frozen = sum(1 for group in optimizer.param_groups for p in group["params"] if not p.requires_grad)
        if frozen:
            warnings.warn(
                f"Trainer: the optimizer holds {frozen} frozen parameters (requires_grad=False). "
                f"They are not trained now, but weight decay and momentum buffers are kept for "
                f"them, and they would train at the head's learning rate if unfrozen later. "
                f"HINT: build the optimizer from the trainable parameters only: "
                f"torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=...)",
                UserWarning,
                stacklevel=3,
            )

    def unfreeze_features(self, *, lr: float | None = None) -> None:
        """Start fine-tuning: unfreeze the feature extractor and train it at learning rate ``lr``.

        Calls :func:`unfreeze_features` on the model and adds the newly trainable parameters
        to the optimizer as a new parameter group, so the head keeps its own learning rate.
        A ``scheduler`` learns of the new group: the features start at ``lr`` and from then on
        follow the head's schedule (decays, warm-up, cycles) by the same factors. History
        records their rate as ``features_lr``. Checkpoints record the switch, and
        :meth:`load_checkpoint` repeats it.

        Args:
            lr: Learning rate of the features; defaults to a tenth of the head's current rate.
        """
        if lr is None:
            head = self.optimizer.param_groups[0]
            # A schedule can sit at zero (cosine annealing's end): then a tenth of its base rate.
            lr = (float(head["lr"]) or float(head.get("initial_lr", self.lr))) / 10
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        unfreeze_features(self.network)
        new = [p for p in self.network.parameters() if p.requires_grad and id(p) not in held]
        if new:
            self.optimizer.add_param_group({"params": new, "lr": lr})
            if self.scheduler is not None:
                adopt_new_group(self.scheduler, self.optimizer)
        self.unfreeze_lr = lr

    def _source(
        self,
        data: Data,
        *,
        batch_size: int,
        shuffle: bool,
        num_workers: int | None,
        what: str,
        compute_cache: bool = True,
    ) -> LoaderSource | CachedSource:
        """Batches for ``data``: from cached features when that gives the same result, else images."""
        if isinstance(data, DataLoader):
            if self.world_size > 1:
                raise ValueError(
                    f"{what}: under torchrun, pass a Dataset rather than a DataLoader, so that each of "
                    f"the {self.world_size} processes can be given its own share of it"
                )
            if self.cache_features is True:
                raise ValueError(
                    f"{what}: cache_features=True needs a Dataset, but a DataLoader was given; "
                    f"pass its dataset and batch_size instead"
                )
            self.cache_report[what] = "off: " + str(cacheability(self.network, data))
            return LoaderSource(data, self._step_module(self.model, training=shuffle), self.seed)
        if not isinstance(data, Dataset) or not hasattr(data, "__len__"):
            raise TypeError(
                f"{what}: expected a torch Dataset (with __len__) or a DataLoader but got {type(data).__name__}"
            )
        if len(data) == 0:
            raise ValueError(f"{what}: the dataset is empty; expected at least one (image, label) sample")
        _check_sample(data[0], what)
        features = self._cached(data, batch_size, num_workers, what, compute_cache)
        if features is not None:
            head = _locate(self.network, "Trainer").module
            forward = self._step_module(head, training=shuffle)
            return CachedSource(
                features, forward, batch_size, shuffle, self.seed, self.device, self.rank, self.world_size
            )
        loader = self._make_loader(data, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers)
        return LoaderSource(loader, self._step_module(self.model, training=shuffle), self.seed)

    def _make_loader(
        self, data: Dataset[Any], *, batch_size: int, shuffle: bool, num_workers: int | None
    ) -> DataLoader[Any]:
        """A loader over this process's share of ``data``, shuffled from the run's seed."""
        return make_loader(
            data,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=num_workers,
            seed=self.seed,
            pin_memory=self.device.type == "cuda",
            rank=self.rank,
            world=self.world_size,
        )

    def _step_module(self, module: nn.Module, *, training: bool) -> nn.Module:
        """What computes a step's logits: DDP-wrapped for training under torchrun, compiled if asked."""
        if training and self.world_size > 1:
            # Built per fit, so that it covers exactly the parameters that train now (after an
            # unfreeze, the features too); frozen parameters are left out by DDP itself.
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            module = nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
        if self.compile_model:
            # fallback_random: dropout draws the same random numbers as without compiling, so the
            # results match eager ones within float tolerance and resuming stays bit-exact.
            # torch.compile caches the generated code per module, so later fits reuse it.
            module = torch.compile(module, options={"fallback_random": True})  # type: ignore[assignment]
        return module

    def _cached(
        self, data: Dataset[Any], batch_size: int, num_workers: int | None, what: str, compute: bool
    ) -> FeatureSet | None:
        """The cached features of ``data``, computed now if allowed; None when caching is off."""
        if self.cache_features is False:
            self.cache_report[what] = "off: cache_features=False"
            return None
        reason = cacheability(self.network, data)
        if (
            reason is not None
            and self.cache_features is True
            and not reason.startswith(("the transform", "cannot tell"))
        ):
            raise ValueError(f"{what}: cache_features=True, but {reason}; caching would change the results")
        if reason is not None and self.cache_features == "auto":
            self.cache_report[what] = f"off: {reason}"
            return None
        key = cache_key(self.network, data, self.precision.name)
        if key is not None and key in self._feature_sets:
            self.cache_report[what] = "on (reused)"
            return self._feature_sets[key]
        folder = self.cache_dir or default_cache_dir()
        stored = open_features(folder / f"{key}.bin") if key is not None else None
        report = "on (from disk)" if stored is not None else "on"
        if stored is None:
            if not compute:
                self.cache_report[what] = "off: features not cached by fit"
                return None
            limit = cache_limit_bytes()  # a malformed setting fails here, not after the feature pass
            started = time.perf_counter()
            # Under torchrun each process computes every world_size-th sample, then all share.
            loader = self._make_loader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
            self.progress.start_epoch(0, 0, len(loader), f"caching features for {what}")
            store = folder / f"{key or secrets.token_hex(16)}.bin"
            stored = compute_features(
                self._feature_network(),
                loader,
                device=self.device,
                prepare=self._to_device,
                autocast=self.precision.autocast,
                on_batch=lambda count: self.progress.step(None, count),
                store=store,
                # Distributed shards are gathered in memory; the disk cache is single-process.
                budget_bytes=_memory_budget(self.device) if self.world_size == 1 else 1 << 62,
            )
            if store.exists():  # went to disk
                if key is None:  # no later run can find it: drop the names now, the mapping stays
                    drop_cache(store)
                prune_caches(folder, keep=store, limit_bytes=limit)
            if self.world_size > 1:
                total = len(data)  # type: ignore[arg-type]
                stored = FeatureSet(gather_rows(stored.features, total), gather_rows(stored.targets, total))
            self.progress.message(
                f"feature caching: {len(stored)} samples of {what} through the frozen backbone once "
                f"({time.perf_counter() - started:.1f}s); training the head on them"
            )
        if key is not None:
            self._feature_sets[key] = stored
        self.cache_report[what] = report
        return stored

    # ------------------------------------------------------------------ the loop

    def fit(
        self,
        train: Data,
        val: Data | None = None,
        *,
        epochs: int,
        batch_size: int = 32,
        num_workers: int | None = None,
        early_stopping: EarlyStopping | None = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
    ) -> History:
        """Train until ``epochs`` epochs are done in total, validating after each.

        ``epochs`` is the total to reach, not a count to add: a Trainer resumed from a
        checkpoint saved after epoch 3 and asked for ``epochs=10`` trains epochs 4 to 10.

        Args:
            train: (image tensor, label) samples, as a Dataset (shuffled each epoch from the
                seed, which makes runs reproducible and resumable) or your own DataLoader.
            val: Validation samples, evaluated after every epoch.
            epochs: Total number of epochs to reach.
            batch_size: Samples per step, for Datasets.
            num_workers: Loader processes, for Datasets; default one per usable core but one
                (shared among torchrun's processes on this machine), up to 32.
            early_stopping: Stop when a metric stops improving (and restore the best weights).
            checkpoint_dir: Keep ``last.pt`` (every epoch) and ``best.pt`` (best monitored
                metric: ``early_stopping.monitor``, else ``val_loss``, else ``train_loss``).
                Ctrl-C writes ``interrupted.pt`` there (or in the working directory).

        Returns:
            The :class:`History` of all epochs so far.

        Raises:
            FloatingPointError: the loss became NaN or infinite; names epoch and step.
            KeyboardInterrupt: after saving ``interrupted.pt``.
        """
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ValueError(
                f"fit: expected epochs to be an int >= 0 (the total to reach) but got {epochs!r}"
            )
        monitor = (
            early_stopping.monitor if early_stopping else ("val_loss" if val is not None else "train_loss")
        )
        if monitor.startswith("val_") and val is None:
            raise ValueError(
                f"fit: early stopping monitors {monitor!r} but no validation data was given; pass "
                f"val=... or monitor a training metric, e.g. EarlyStopping(monitor='train_loss')"
            )
        train_source = self._source(
            train, batch_size=batch_size, shuffle=True, num_workers=num_workers, what="fit(train)"
        )
        val_source = (
            None
            if val is None
            else self._source(
                val, batch_size=batch_size, shuffle=False, num_workers=num_workers, what="fit(val)"
            )
        )
        self._adopt_class_names(train)
        stopper = early_stopping or EarlyStopping(monitor=monitor, patience=epochs + 1, restore_best=False)
        folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
        try:
            while self.epoch < epochs:
                record = self._run_epoch(train_source, val_source, self.epoch + 1, epochs)
                improved = stopper.improves(record[monitor], self._best["value"])
                self._update_best(record, monitor, improved, keep_weights=stopper.restore_best)
                if folder is not None:
                    self.save_checkpoint(folder / "last.pt")
                    if improved:
                        self.save_checkpoint(folder / "best.pt")
                if (
                    early_stopping
                    and self._best["wait"] > 0
                    and self._best["wait"] >= early_stopping.patience
                ):
                    self.progress.message(
                        f"early stopping: {monitor} has not improved for {early_stopping.patience} epochs "
                        f"(best {self._best['value']:.4f} at epoch {self._best['epoch']})"
                    )
                    break
        except KeyboardInterrupt:
            path = (folder or Path.cwd()) / "interrupted.pt"
            try:
                self.save_checkpoint(path, interrupted=True)
            except CheckpointError as exc:  # NaN weights: say so, but still stop as asked
                self.progress.message(f"interrupted: no checkpoint written ({exc})")
            else:
                self.progress.message(
                    f"interrupted: saved a checkpoint to {path}; resume with trainer.load_checkpoint(path)"
                )
            raise
        if early_stopping and early_stopping.restore_best and self._best["state"] is not None:
            self._merge_into_model(self._best["state"])
        return self.history

    def _run_epoch(
        self,
        train: LoaderSource | CachedSource,
        val: LoaderSource | CachedSource | None,
        epoch: int,
        epochs: int,
    ) -> dict[str, float]:
        started = time.perf_counter()
        with epoch_rng(self.seed, epoch, self.device):
            train_metrics = self._train_one_epoch(train, epoch, epochs)
        record: dict[str, float] = {
            "epoch": epoch,
            "train_loss": train_metrics["loss"],
            "train_accuracy": train_metrics["accuracy"],
        }
        if val is not None:
            val_metrics = self._evaluate_source(val, confusion=None)
            record.update(val_loss=val_metrics["loss"], val_accuracy=val_metrics["accuracy"])
        record["lr"] = float(self.optimizer.param_groups[0]["lr"])
        if self.unfreeze_lr is not None and len(self.optimizer.param_groups) > 1:
            record["features_lr"] = float(self.optimizer.param_groups[-1]["lr"])
        if self.scheduler is not None:
            if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.scheduler.step(record.get("val_loss", record["train_loss"]))
            else:
                self.scheduler.step()
        record["time_s"] = time.perf_counter() - started
        self.epoch = epoch
        self.history.append(record)
        self.progress.end_epoch(record)
        return record

    def _train_one_epoch(
        self, source: LoaderSource | CachedSource, epoch: int, epochs: int
    ) -> dict[str, float]:
        self.model.train()
        meter = RunningMean(self.device)
        self.progress.start_epoch(epoch, epochs, source.steps, "train")
        for step, (inputs, targets) in enumerate(source.batches(epoch), start=1):
            inputs = self._to_device(inputs)
            targets = targets.to(self.device, non_blocking=True)
            with self.precision.autocast():
                logits = source.forward(inputs)
                loss = self.loss_fn(logits, targets)
            # One sync per step: the NaN check needs it anyway. Under torchrun the check must agree
            # on every process (a NaN on one alone would leave the others waiting in backward).
            loss_value = float(all_reduce_sum(loss.detach().float().reshape(1).clone())[0]) / self.world_size
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"fit: the loss became {loss_value} at epoch {epoch}, step {step}; training stopped "
                    f"before the optimizer applied it and no checkpoint was written from this state. "
                    f"Lower the learning rate (lr={self.optimizer.param_groups[0]['lr']:g} now) or check "
                    f"the inputs and labels of this batch for NaN or out-of-range values"
                )
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.global_step += 1
            meter.update(loss, logits.float(), targets)
            self.progress.step(loss_value, int(targets.shape[0]))
        return RunningMean.summarise(all_reduce_sum(meter.totals()))

    def _update_best(
        self, record: dict[str, float], monitor: str, improved: bool, keep_weights: bool
    ) -> None:
        if improved:
            # Only the trained entries: frozen ones cannot have changed since.
            state = cpu_state_dict(self.network, skip=frozen_keys(self.network)) if keep_weights else None
            self._best = {"value": record[monitor], "epoch": int(record["epoch"]), "wait": 0, "state": state}
        else:
            self._best["wait"] += 1

    # ------------------------------------------------------------------ evaluation

    def _evaluate_source(
        self, source: LoaderSource | CachedSource, confusion: ConfusionMatrix | None
    ) -> dict[str, float]:
        meter = RunningMean(self.device)
        with eval_mode(self.model), torch.no_grad():
            for inputs, targets in source.batches(0):
                inputs = self._to_device(inputs)
                targets = targets.to(self.device, non_blocking=True)
                with self.precision.autocast():
                    logits = source.forward(inputs)
                    loss = self.loss_fn(logits, targets)
                meter.update(loss, logits.float(), targets)
                if confusion is not None:
                    confusion.update(logits.float(), targets)
        return RunningMean.summarise(all_reduce_sum(meter.totals()))

    def evaluate(self, data: Data, *, batch_size: int = 32, num_workers: int | None = None) -> dict[str, Any]:
        """Loss, accuracy, confusion matrix and per-class precision/recall on ``data``.

        Returns:
            ``{"loss", "accuracy", "count", "class_names", "confusion_matrix", "per_class"}``:
            accuracy is a fraction in [0, 1]; ``confusion_matrix[i][j]`` counts samples of class
            ``i`` predicted as ``j``; ``per_class[name]`` has ``precision``, ``recall`` and
            ``support``.
        """
        # Cached features are used when fit already computed them, never computed just for this.
        source = self._source(
            data,
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            what="evaluate",
            compute_cache=False,
        )
        names = self._names(_output_count(self.network))
        confusion = ConfusionMatrix(len(names), self.device)
        metrics = self._evaluate_source(source, confusion)
        all_reduce_sum(confusion.counts)
        report = confusion.report(names)
        return {
            **metrics,
            "count": int(confusion.counts.sum()),
            "class_names": names,
            **report,
        }

    def predict(
        self, inputs: PredictInput | Sequence[PredictInput], *, batch_size: int = 32
    ) -> Prediction | list[Prediction]:
        """Classify images: paths, PIL images or tensors, one or many.

        Always runs in evaluation mode without gradients (the model's mode is restored after).
        Paths and PIL images go through ``transform``, which converts any mode to RGB and
        honours EXIF orientation; uint8 tensors are raw pixels, float tensors are taken as
        already preprocessed.

        Returns:
            One :class:`Prediction` for one input, a list for a list or a batch tensor.
        """
        single = is_single(inputs)
        chunks: list[Any]
        if isinstance(inputs, torch.Tensor) and inputs.ndim == 4:
            chunks = list(torch.split(inputs, batch_size))
        else:
            items = as_items(inputs)
            chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
        predictions: list[Prediction] = []
        with eval_mode(self.model), torch.no_grad():
            for chunk in chunks:
                batch = to_batch(chunk, self.transform).to(self.device)
                with self.precision.autocast():
                    logits = self.model(batch)
                probabilities = logits.float().softmax(dim=1).cpu()
                names = self._names(probabilities.shape[1])
                for row in probabilities:
                    index = int(row.argmax())
                    predictions.append(
                        Prediction(names[index], index, dict(zip(names, row.tolist(), strict=True)))
                    )
        return predictions[0] if single else predictions

    def _names(self, count: int) -> list[str]:
        if self.class_names is not None and len(self.class_names) == count:
            return list(self.class_names)
        return [str(i) for i in range(count)]

    def _adopt_class_names(self, data: Data) -> None:
        dataset: Any = data.dataset if isinstance(data, DataLoader) else data
        while isinstance(dataset, Subset):  # a split of a dataset keeps its classes
            dataset = dataset.dataset
        found = getattr(dataset, "classes", None)
        if not isinstance(found, (list, tuple)) or not all(isinstance(c, str) for c in found):
            return
        if self.class_names is None:
            self.class_names = list(found)
        elif list(found) != self.class_names:
            raise ValueError(
                f"fit: the training data's classes {list(found)} differ from the Trainer's "
                f"class_names {self.class_names}; labels would be misnamed. Pass matching class_names"
            )

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(
        self,
        path: str | os.PathLike[str],
        *,
        head_only: bool = False,
        training_state: bool = True,
        interrupted: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> Path:
        """Write everything needed to resume or to deploy into one file, atomically.

        Args:
            path: Destination; its folder is created. An existing file is replaced only once
                the new one is complete.
            head_only: Store only the trained entries (the head, and BatchNorm layers if they
                train) plus the backbone's identity and fingerprint. Needs a backbone that can
                be rebuilt (pretrained weights).
            training_state: Include what resuming needs beyond the weights: optimizer (Adam
                keeps two values per trained weight), scheduler, scaler, best weights, RNG.
                ``False`` writes a deployment file for :func:`load_model`. With both options,
                VGG16's file shrinks from about 530 MB to the head's 50 MB.
            interrupted: Mark the file as written mid-epoch (``fit`` does this on Ctrl-C).
            extra: Your own plain data (str, int, float, bool, None, lists, dicts) to store
                alongside, such as a data split; defaults to :attr:`extra`.

        Raises:
            CheckpointError: the weights hold NaN or infinity (nothing is written), or
                ``head_only`` was asked for a backbone that cannot be rebuilt.
        """
        network = self.network
        spec = build_spec(network)
        skip = frozen_keys(network) if head_only else set()
        if head_only and not spec.get("weights"):
            raise CheckpointError(
                "save_checkpoint: head_only=True needs a backbone that can be rebuilt from pretrained "
                "weights, but this model was not built by vt.create_model with weights; save a full "
                "checkpoint (head_only=False)"
            )
        # Checked by every process (they hold the same weights), so that all raise together.
        check_finite(network.state_dict(), what="save_checkpoint: the model")
        path = Path(path)
        if self.rank != 0:  # under torchrun rank 0 alone writes; the others wait for it
            barrier()
            return path
        model_state = cpu_state_dict(network, skip=skip)
        data: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": model_state,
            "head_only": head_only,
            "backbone_sha256": fingerprint(network.state_dict(), skip) if head_only else None,
            "build": spec,
            "class_names": self.class_names,
            "transform": self.transform.to_dict() if isinstance(self.transform, ImageTransform) else None,
            "extra": copy.deepcopy(extra if extra is not None else self.extra),
            "trainer": {
                "epoch": self.epoch,
                "global_step": self.global_step,
                "interrupted": interrupted,
                "seed": self.seed,
                "lr": self.lr,
                "precision": self.precision.name,
                "unfreeze_lr": self.unfreeze_lr,
                "history": self.history.to_dict(),
                "resumable": training_state,
            },
        }
        if training_state:
            trainer_state: dict[str, Any] = data["trainer"]
            trainer_state.update(
                optimizer=_to_cpu(self.optimizer.state_dict()),
                scheduler=_to_cpu(self.scheduler.state_dict()) if self.scheduler is not None else None,
                scaler=self.scaler.state_dict(),
                best=_to_cpu(self._best),
                rng=capture_rng(),
            )
        atomic_save(data, path)
        barrier()
        return path

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Restore a checkpoint into this Trainer, to continue training exactly where it stopped.

        Build the Trainer the same way as the one that saved (same architecture, head and
        optimizer type); the checkpoint then restores weights, optimizer, scheduler, gradient
        scaler, epoch, history, early-stopping state, class names, transform and random
        states. If the features were unfrozen for fine-tuning, that is repeated first.

        Everything is checked before anything is changed: on any error the Trainer is as it was.

        Raises:
            CheckpointError: unreadable or unsafe file, unknown format version, other
                architecture, other class count or names, missing or unexpected weights,
                shape mismatches, NaN weights, or an optimizer of another shape.
        """
        data = read_checkpoint(path)
        network = self.network
        _check_identity(data, network, self.class_names, source=str(path))
        state = data["model"]
        trainer_state = data["trainer"]
        if not trainer_state.get("resumable", False):
            raise CheckpointError(
                f"checkpoint {str(path)!r} was saved for deployment (training_state=False): it has "
                f"no optimizer or random states to resume from. Load it with vt.load_model(path)"
            )
        needs_unfreeze = trainer_state.get("unfreeze_lr") is not None and self.unfreeze_lr is None
        if trainer_state.get("unfreeze_lr") is None and self.unfreeze_lr is not None:
            raise CheckpointError(
                f"checkpoint {str(path)!r} was saved before the features were unfrozen, but this "
                f"Trainer has already unfrozen them; load it into a Trainer built like the original"
            )
        target_frozen = set() if needs_unfreeze else frozen_keys(network)
        _check_model_state(
            data, network, state, target_frozen if data["head_only"] else set(), source=str(path)
        )
        _check_optimizer_shape(
            self.optimizer, trainer_state["optimizer"], network, needs_unfreeze, source=str(path)
        )

        # Everything checked: apply.
        if needs_unfreeze:
            self.unfreeze_features(lr=trainer_state["unfreeze_lr"])
        self._merge_into_model(state)
        self.optimizer.load_state_dict(trainer_state["optimizer"])
        if self.scheduler is not None and trainer_state.get("scheduler") is not None:
            self.scheduler.load_state_dict(trainer_state["scheduler"])
        if trainer_state.get("scaler"):
            self.scaler.load_state_dict(trainer_state["scaler"])
        self.epoch = int(trainer_state["epoch"])
        self.global_step = int(trainer_state["global_step"])
        self.seed = int(trainer_state["seed"])
        self.history = History.from_dict(trainer_state["history"])
        self._best = dict(trainer_state["best"])
        if data.get("class_names") is not None:
            self.class_names = list(data["class_names"])
        if data.get("transform") is not None:
            self.transform = ImageTransform.from_dict(data["transform"])
        self.extra = dict(data.get("extra") or {})
        restore_rng(trainer_state["rng"])

    def _merge_into_model(self, state: dict[str, torch.Tensor]) -> None:
        """Load ``state`` (all entries, or the trained subset) with strict key checking."""
        merged = self.network.state_dict()
        merged.update(state)
        self.network.load_state_dict(merged, strict=True)


# ---------------------------------------------------------------------- helpers


def _default_transform(model: nn.Module) -> ImageTransform:
    weights = build_spec(model).get("weights")
    if isinstance(weights, str) and not weights.startswith("file:"):
        return imagenet_transform(weights=weights)
    return imagenet_transform()


def _check_sample(sample: Any, what: str) -> None:
    if not (isinstance(sample, (tuple, list)) and len(sample) == 2):
        raise TypeError(
            f"{what}: expected each sample to be an (image, label) pair but the first one is a "
            f"{type(sample).__name__}"
        )
    image, label = sample
    if not isinstance(image, torch.Tensor):
        raise TypeError(
            f"{what}: expected the image of each sample to be a tensor but the first one is a "
            f"{type(image).__name__}; give the dataset a transform, e.g. "
            f"ImageFolder(root, transform=vt.imagenet_transform())"
        )
    if not isinstance(label, (int, torch.Tensor)) or isinstance(label, bool):
        raise TypeError(
            f"{what}: expected the label of each sample to be an int class index but the first one "
            f"is a {type(label).__name__}"
        )


def _memory_budget(device: torch.device) -> int:
    """Bytes of features to keep in memory before using a memory-mapped file instead."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.3)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return min(8 << 30, int(total * 0.4))


def _output_count(model: nn.Module) -> int:
    head = build_spec(model).get("head")
    if head:
        return int(head["num_classes"])
    found = _locate(model, "Trainer")
    last = found.layers[found.projections[-1]]
    return int(getattr(last, "out_features", getattr(last, "out_channels", 0)))


def _to_cpu(obj: Any) -> Any:
    """A copy of nested dicts/lists/tuples with every tensor moved to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


def _check_identity(
    data: dict[str, Any], network: nn.Module, class_names: list[str] | None, *, source: str
) -> None:
    saved_arch = data["build"].get("arch")
    my_arch = build_spec(network).get("arch")
    if saved_arch and my_arch and saved_arch != my_arch:
        raise CheckpointError(
            f"checkpoint {source!r} was saved from a {saved_arch!r} model but this model is a "
            f"{my_arch!r}; build the same architecture (vt.create_model({saved_arch!r}, ...)) or use "
            f"vt.load_model(path)"
        )
    saved_names = data.get("class_names")
    outputs = _output_count(network)
    if saved_names is not None and len(saved_names) != outputs:
        raise CheckpointError(
            f"checkpoint {source!r} has {len(saved_names)} classes {saved_names} but this model has "
            f"{outputs} outputs; build it with vt.replace_classifier(model, {len(saved_names)})"
        )
    if saved_names is not None and class_names is not None and list(saved_names) != list(class_names):
        raise CheckpointError(
            f"checkpoint {source!r} has classes {saved_names} but this Trainer has {class_names}; "
            f"predictions would be misnamed"
        )


def _check_model_state(
    data: dict[str, Any], network: nn.Module, state: dict[str, torch.Tensor], frozen: set[str], *, source: str
) -> None:
    current = network.state_dict()
    if data["head_only"]:
        if fingerprint(current, frozen) != data.get("backbone_sha256"):
            raise CheckpointError(
                f"checkpoint {source!r} holds only a head trained on a specific backbone "
                f"({data['build'].get('arch')}, weights {data['build'].get('weights')}), and this "
                f"model's frozen backbone differs from it; build the model with those weights"
            )
        current = {k: v for k, v in current.items() if k not in frozen}
    differences = state_dict_differences(current, state)
    if differences:
        raise CheckpointError(
            f"checkpoint {source!r} does not fit this model; nothing was loaded:\n  "
            + "\n  ".join(differences)
        )
    check_finite(state, what=f"checkpoint {source!r}")


def _check_optimizer_shape(
    optimizer: torch.optim.Optimizer,
    saved: dict[str, Any],
    network: nn.Module,
    needs_unfreeze: bool,
    *,
    source: str,
) -> None:
    sizes = [len(group["params"]) for group in optimizer.param_groups]
    if needs_unfreeze:
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        sizes.append(sum(1 for p in network.parameters() if id(p) not in held))
    saved_sizes = [len(group["params"]) for group in saved.get("param_groups", [])]
    if sizes != saved_sizes:
        raise CheckpointError(
            f"checkpoint {source!r} holds optimizer state for parameter groups of sizes {saved_sizes} "
            f"but this Trainer's optimizer would have {sizes}; build the Trainer with the same "
            f"optimizer and freezing as the one that saved it"
        )


class LoadedModel(NamedTuple):
    """What :func:`load_model` returns: unpack it as ``model, class_names, transform``."""

    model: nn.Module
    class_names: list[str] | None
    transform: ImageTransform


def load_model(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a checkpoint into a freshly built model, ready for inference.

    The model is rebuilt from the checkpoint's build record (architecture, head, freeze
    policy), so no training code or data is needed; a head-only checkpoint rebuilds the
    pretrained backbone (from torchvision's cache or the recorded local file) and checks its
    fingerprint before attaching the head.

    Args:
        path: A checkpoint written by :meth:`Trainer.save_checkpoint`.
        device: Where to put the model.

    Returns:
        ``LoadedModel(model, class_names, transform)``: the model in eval mode, the class names
        (or None), and the evaluation transform it was trained with.

    Raises:
        CheckpointError: the file is unreadable, unsafe, of an unknown version, or its content
            does not fit the architecture it names.
        WeightsNotAvailableError: a head-only checkpoint's backbone weights cannot be found.

    Example:
        >>> import tempfile, vggtransfer as vt
        >>> model = vt.replace_classifier(vt.create_model("resnet18", weights=None), 2)
        >>> trainer = vt.Trainer(model, device="cpu", class_names=["cat", "dog"], progress=False)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = trainer.save_checkpoint(f"{folder}/pets.pt", training_state=False)
        ...     model, class_names, transform = vt.load_model(path)
        >>> class_names, model.fc[-1].out_features, model.training
        (['cat', 'dog'], 2, False)
    """
    data = read_checkpoint(path)
    try:
        network = rebuild_model(data["build"], pretrained=data["head_only"])
    except ValueError as exc:
        raise CheckpointError(f"cannot rebuild the model of checkpoint {str(path)!r}: {exc}") from None
    frozen = frozen_keys(network) if data["head_only"] else set()
    _check_model_state(data, network, data["model"], frozen, source=str(path))
    merged = network.state_dict()
    merged.update(data["model"])
    network.load_state_dict(merged, strict=True)
    settings = data.get("transform")
    transform = (
        ImageTransform.from_dict({**settings, "train": False}) if settings else _default_transform(network)
    )
    names = data.get("class_names")
    return LoadedModel(network.to(resolve_device(device)).eval(), list(names) if names else None, transform)
