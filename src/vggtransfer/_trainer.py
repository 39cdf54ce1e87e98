"""The Trainer: fit, evaluate, predict and checkpoint, as a short loop over named collaborators.

The loop is :meth:`Trainer.fit` and its two epoch halves. The rest lives in the module named
after it: ``_runtime`` (device, torchrun, precision, layout, DDP/compile), ``_sources`` with
``_feature_cache`` (images or cached features), ``_optimizer`` (optimizer and schedule),
``_early_stopping`` (best epoch), ``_checkpoint`` (payload, checks, epoch files), ``_class_weights``
(the weighted training loss), ``_callbacks``, ``_predict``, ``_tta`` and ``_lr_finder``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ._arguments import check_cache_dir, check_epochs, check_trainer_inputs
from ._callbacks import AnyCallback, Callbacks
from ._checkpoint import EpochFiles, TrainingObjects, load_trainer, save_trainer
from ._class_weights import ClassWeights, ClassWeightsSetting
from ._early_stopping import BestTracker, EarlyStopping
from ._feature_cache import CacheMode, FeatureCache
from ._heads import known_output_count, output_count
from ._history import History
from ._lr_finder import LRFinder, check_range, range_test
from ._metrics import ConfusionMatrix, RunningMean, check_finite_loss
from ._optimizer import build_optimizer, build_scheduler, step_scheduler, unfreeze_into
from ._predict import PredictInput, Prediction, names_for, predict
from ._progress import make_progress
from ._rng import epoch_rng
from ._runtime import Precision, PrecisionName, Runtime, eval_mode, unwrap
from ._sources import BatchSource, Data, batch_source, class_names_of
from ._transforms import ImageTransform, default_transform
from ._tta import check_tta

__all__ = ["Trainer"]


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
            every epoch (about 10x faster for frozen VGG16). ``"auto"`` does so only where that
            changes no result (frozen backbone, a Dataset, a deterministic transform); ``True``
            also trusts opaque transforms, and raises where caching would change results;
            ``False`` never caches. :attr:`cache_report` says what was decided, and why.
        cache_views: For a random training transform (``imagenet_transform(train=True)``, or
            any with ``deterministic = False``): compute the features of this many augmented
            views of every training image once, and train each epoch on one view per image,
            chosen from the seed. Off by default: a random transform then turns caching off.
        cache_dir: Where features past the memory budget are kept as memory-mapped files, for
            later runs with the same weights, transform and data; default ``$VGGTRANSFER_CACHE``
            or ``~/.cache/vggtransfer/features`` (budgets and limits: docs/trainer.md).
        persist_cache: Also write cached features that fit in memory to ``cache_dir``, so that
            later Trainers and processes with the same weights, transform and data reuse them.
        channels_last: Keep convolution weights and input batches in channels-last (NHWC)
            layout, the fast one for GPU tensor cores; ``"auto"`` turns it on for CUDA.
        compile_features: Run the feature pass through ``torch.compile`` with inductor
            freezing (frozen BatchNorm folded into the convolutions); pays off on large data.
        compile_model: Run the training and evaluation steps through ``torch.compile`` (the
            head's alone on cached features). Meant for GPUs: the first step compiles (about a
            minute for VGG16); results agree with an uncompiled run within float tolerance.
        class_weights: Weight the training loss per class, as Keras' ``class_weight``: a list of
            one weight per class, or ``"balanced"`` for ``n_samples / (n_classes * count)`` from
            the training labels at ``fit`` (see :attr:`class_weights`). Validation and
            :meth:`evaluate` losses stay unweighted, comparable across runs.
        callbacks: Objects with ``on_epoch_end(record)`` and/or ``on_fit_end(history)``
            (:class:`Callback`), such as :class:`CSVLogger` and :class:`TensorBoardLogger`;
            called in order, on rank 0 only under torchrun.

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
        cache_features: CacheMode = "auto",
        cache_dir: str | os.PathLike[str] | None = None,
        cache_views: int | None = None,
        persist_cache: bool = False,
        channels_last: bool | Literal["auto"] = "auto",
        compile_features: bool = False,
        compile_model: bool = False,
        class_weights: ClassWeightsSetting = None,
        callbacks: Sequence[AnyCallback] = (),
    ) -> None:
        # Everything is checked before the model moves or the process joins a torchrun group.
        self.lr, self.seed, self.class_names, weights, hooks = check_trainer_inputs(
            model, optimizer=optimizer, lr=lr, loss_fn=loss_fn, scheduler=scheduler, class_names=class_names,
            transform=transform, seed=seed, class_weights=class_weights, callbacks=callbacks,
        )  # fmt: skip
        self._weights = ClassWeights(weights)
        folder = check_cache_dir(cache_dir, "Trainer")
        self._cache = FeatureCache(cache_features, folder, compile_features, cache_views, persist_cache)
        self.runtime = Runtime.start(
            device=device, precision=precision, channels_last=channels_last, compile_model=compile_model
        )
        self.model = self.runtime.place(model)
        self.seed = self.runtime.agree_on(self.seed)  # a drawn seed is rank 0's: one shuffling order for all
        self.optimizer = build_optimizer(self.model, optimizer, self.lr)
        self.loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
        self.scheduler = build_scheduler(scheduler, self.optimizer)
        self.scaler = self.runtime.precision.make_scaler()
        self.transform = transform if transform is not None else default_transform(self.network)
        self.progress = make_progress(progress and self.runtime.rank == 0)  # rank 0 alone prints
        self._callbacks = Callbacks(hooks, self.runtime.rank)  # rank 0 alone calls them too
        self._train_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = self.loss_fn
        self.epoch = 0
        self.global_step = 0
        self.history = History()
        #: The features' learning rate once :meth:`unfreeze_features` was called, else None.
        self.unfreeze_lr: float | None = None
        #: Plain data saved with every checkpoint and restored by load_checkpoint (e.g. a data split).
        self.extra: dict[str, Any] = {}
        self._best = BestTracker()

    # ------------------------------------------------------------------ what the run is made of

    @property
    def network(self) -> nn.Module:
        """The model without DDP / compile wrappers: what checkpoints save and load."""
        return unwrap(self.model)

    @property
    def device(self) -> torch.device:
        """Where the model and batches live."""
        return self.runtime.device

    @property
    def precision(self) -> Precision:
        """The autocast dtype and gradient scaling in use."""
        return self.runtime.precision

    @property
    def channels_last(self) -> bool:
        """Whether batches and convolution weights use the NHWC layout."""
        return self.runtime.channels_last

    @property
    def world_size(self) -> int:
        """Number of torchrun processes (1 alone)."""
        return self.runtime.world_size

    @property
    def class_weights(self) -> list[float] | None:
        """The class weights in effect: those given, ``"balanced"``'s once ``fit`` computed them, or None."""
        return self._weights.weights

    @property
    def cache_report(self) -> dict[str, str]:
        """Per role, ``"fit(train)"`` / ``"fit(val)"`` / ``"evaluate"`` / ``"find_lr"``: ``"on"`` or ``"off: <why>"``."""
        return self._cache.report

    def unfreeze_features(self, *, lr: float | None = None) -> None:
        """Start fine-tuning: unfreeze the feature extractor and train it at learning rate ``lr``.

        The newly trainable parameters join the optimizer as a new group, so the head keeps its
        own rate; from ``lr`` they follow the head's schedule by the same factors. History
        records their rate as ``features_lr``; :meth:`load_checkpoint` repeats the switch.

        Args:
            lr: Learning rate of the features; defaults to a tenth of the head's current rate.
        """
        self.unfreeze_lr = unfreeze_into(self.network, self.optimizer, self.scheduler, lr=lr, base_lr=self.lr)

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
        epochs = check_epochs(epochs)
        files, sources = self._prepare(train, val, batch_size, num_workers, early_stopping, checkpoint_dir)
        try:
            while self.epoch < epochs:
                record = self._run_epoch(*sources, epochs)
                improved = self._best.update(record, self.network)
                files.after_epoch(self.save_checkpoint, improved=improved)
                self._callbacks.epoch_end(record)  # after the checkpoints: a raising callback loses nothing
                if self._best.should_stop:
                    self.progress.message(self._best.stop_message())
                    break
        except KeyboardInterrupt:
            files.interrupted(lambda path: self.save_checkpoint(path, interrupted=True), self.progress)
            raise
        self._best.restore(self.network)
        self._callbacks.fit_end(self.history)
        return self.history

    def _prepare(
        self, train: Data, val: Data | None, batch_size: int, num_workers: int | None,
        early_stopping: EarlyStopping | None, checkpoint_dir: str | os.PathLike[str] | None,
    ) -> tuple[EpochFiles, tuple[BatchSource, BatchSource | None]]:  # fmt: skip
        """Check fit's arguments, in this order, then make the data sources and the training loss."""
        self._best.watch(early_stopping, has_val=val is not None)
        files = EpochFiles(checkpoint_dir)
        train_source = self._source(train, "fit(train)", batch_size, num_workers, shuffle=True)
        val_source = None if val is None else self._source(val, "fit(val)", batch_size, num_workers)
        outputs = known_output_count(self.network)
        self.class_names = class_names_of(train, self.class_names, outputs)
        self._train_loss = self._weights.training_loss(
            train, self.loss_fn, outputs=outputs, names=self.class_names, device=self.device
        )
        return files, (train_source, val_source)

    def _run_epoch(self, train: BatchSource, val: BatchSource | None, epochs: int) -> dict[str, float]:
        """Train one epoch, evaluate, step the schedule, record."""
        epoch = self.epoch + 1
        started = time.perf_counter()
        with epoch_rng(self.seed, epoch, self.device):
            metrics = self._train_epoch(train, epoch, epochs)
        record: dict[str, float] = {
            "epoch": epoch,
            "train_loss": metrics["loss"],
            "train_accuracy": metrics["accuracy"],
        }
        if val is not None:
            metrics = self._evaluate_source(val)
            record.update(val_loss=metrics["loss"], val_accuracy=metrics["accuracy"])
        record["lr"] = float(self.optimizer.param_groups[0]["lr"])
        if self.unfreeze_lr is not None and len(self.optimizer.param_groups) > 1:
            record["features_lr"] = float(self.optimizer.param_groups[-1]["lr"])
        step_scheduler(self.scheduler, record)
        record["time_s"] = time.perf_counter() - started
        self.epoch = epoch
        self.history.append(record)
        self.progress.end_epoch(record)
        return record

    def _train_epoch(self, source: BatchSource, epoch: int, epochs: int) -> dict[str, float]:
        self.model.train()
        meter = RunningMean(self.device)
        self.progress.start_epoch(epoch, epochs, source.steps, "train")
        for step, batch in enumerate(source.batches(epoch), start=1):
            logits, targets, loss = self._forward(source, batch, self._train_loss)
            # One sync per step, for the NaN check. Under torchrun it must agree on every process
            # (a NaN on one alone would leave the others waiting in backward).
            loss_value = self.runtime.mean_across(loss)
            check_finite_loss(loss_value, epoch, step, self.optimizer.param_groups[0]["lr"])
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()  # type: ignore[no-untyped-call]  # untyped in torch's stubs
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.global_step += 1
            meter.update(loss, logits, targets)
            self.progress.step(loss_value, int(targets.shape[0]))
        return RunningMean.summarise(self.runtime.sum_across(meter.totals()))

    def _evaluate_source(
        self, source: BatchSource, confusion: ConfusionMatrix | None = None
    ) -> dict[str, float]:
        meter = RunningMean(self.device)
        with eval_mode(self.model), torch.no_grad():
            for batch in source.batches(0):
                logits, targets, loss = self._forward(source, batch, self.loss_fn)
                meter.update(loss, logits, targets)
                if confusion is not None:
                    confusion.update(logits, targets)
        return RunningMean.summarise(self.runtime.sum_across(meter.totals()))

    def _forward(
        self,
        source: BatchSource,
        batch: tuple[torch.Tensor, torch.Tensor],
        loss_fn: Callable[..., torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step both phases share: to the device, autocast, forward, loss. Logits are fp32."""
        inputs, targets = self.runtime.to_device(batch[0]), batch[1].to(self.device, non_blocking=True)
        with self.runtime.autocast():
            logits = source.forward(inputs)
            loss = loss_fn(logits, targets)
        return logits.float(), targets, loss

    # fmt: off
    def _source(
        self, data: Data, what: str, batch_size: int, num_workers: int | None, *,
        shuffle: bool = False, compute_cache: bool = True, tta: bool = False,
    ) -> BatchSource:
        """Batches of ``data`` for the role ``what`` (``"fit(train)"``, ``"fit(val)"``, ``"evaluate"``)."""
        return batch_source(
            data, model=self.model, what=what, batch_size=batch_size, shuffle=shuffle,
            num_workers=num_workers, seed=self.seed, runtime=self.runtime, cache=self._cache,
            progress=self.progress, compute_cache=compute_cache, tta=tta,
            class_labels=isinstance(self.loss_fn, nn.CrossEntropyLoss),  # other losses: labels unchecked
        )
    # fmt: on

    def find_lr(
        self, train: Data, *, start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 100,
        batch_size: int = 32, num_workers: int | None = None,
    ) -> LRFinder:  # fmt: skip
        """The learning-rate range test (Smith 2015, fastai's ``lr_find``); the Trainer is left as it was.

        Trains up to ``steps`` batches of ``train`` (cached features when the backbone is frozen)
        while every group's rate rises exponentially from ``start_lr`` to ``end_lr``, and stops
        once the loss diverges. Weights, gradients, optimizer, scheduler, scaler, modes and random
        states are then restored bit for bit, also after an error; see :class:`LRFinder`.

        Example:
            >>> import torch, vggtransfer as vt
            >>> from torch.utils.data import TensorDataset
            >>> model = vt.replace_classifier(vt.freeze_features(vt.create_model("resnet18", weights=None)), 2)
            >>> data = TensorDataset(torch.randn(8, 3, 32, 32), torch.tensor([0, 1] * 4))
            >>> trainer = vt.Trainer(model, device="cpu", seed=0, progress=False)
            >>> result = trainer.find_lr(data, steps=5, batch_size=4, num_workers=0)
            >>> 1e-7 <= result.suggestion <= 10, trainer.epoch
            (True, 0)
        """
        plan = check_range(start_lr, end_lr, steps, batch_size, num_workers)
        return range_test(
            lambda: self._source(train, "find_lr", batch_size, num_workers, shuffle=True), plan=plan,
            model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
            loss_fn=self.loss_fn, runtime=self.runtime, progress=self.progress, seed=self.seed,
        )  # fmt: skip

    # ------------------------------------------------------------------ evaluation and prediction

    def evaluate(
        self, data: Data, *, batch_size: int = 32, num_workers: int | None = None, tta: bool = False
    ) -> dict[str, Any]:
        """Loss, accuracy, balanced accuracy, confusion matrix and per-class precision/recall/F1 on ``data``.

        Cached features are used when ``fit`` already computed them for this data, never
        computed just for this. ``tta=True`` scores the mean softmax of each image and its horizontal
        flip, on the images; the loss is the cross-entropy of that mean (so it needs cross-entropy).

        Returns:
            ``{"loss", "accuracy", "balanced_accuracy", "count", "class_names", "confusion_matrix",
            "per_class"}``: accuracies are fractions in [0, 1], balanced = mean recall over the classes
            present in ``data``; ``confusion_matrix[i][j]`` counts class ``i`` predicted as ``j``;
            ``per_class[name]`` has ``precision``, ``recall``, ``f1`` and ``support``.
        """
        tta = check_tta(tta, "evaluate", self.loss_fn)
        source = self._source(data, "evaluate", batch_size, num_workers, compute_cache=False, tta=tta)
        names = names_for(self.class_names, output_count(self.network))
        confusion = ConfusionMatrix(len(names), self.device)
        metrics = self._evaluate_source(source, confusion)
        self.runtime.sum_across(confusion.counts)
        return {
            **metrics,
            "count": int(confusion.counts.sum()),
            "class_names": names,
            **confusion.report(names),
        }

    def predict(
        self, inputs: PredictInput | Sequence[PredictInput], *, batch_size: int = 32, tta: bool = False
    ) -> Prediction | list[Prediction]:
        """Classify images: paths, PIL images or tensors, one or many.

        Always runs in evaluation mode without gradients (the model's mode is restored after),
        on the images themselves: cached features are never used. Paths and PIL images go
        through ``transform``, which converts any mode to RGB and honours EXIF orientation;
        uint8 tensors are raw pixels, float tensors are taken as already preprocessed.
        ``tta=True`` averages the softmax of each preprocessed image and of its horizontal flip.

        Returns:
            One :class:`Prediction` for one input, a list for a list or a batch tensor.
        """
        return predict(
            self.model, inputs, transform=self.transform, class_names=self.class_names,
            runtime=self.runtime, batch_size=batch_size, tta=tta,
        )  # fmt: skip

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
            head_only: Store only the trained entries plus the backbone's identity and
                fingerprint; needs a backbone that can be rebuilt (pretrained weights).
            training_state: Include optimizer, scheduler, scaler, best weights and RNG for
                resuming; ``False`` writes a deployment file for :func:`load_model`. With both
                options VGG16's file shrinks from about 530 MB to the head's 50 MB.
            interrupted: Mark the file as written mid-epoch (``fit`` does this on Ctrl-C).
            extra: Your own plain data (str, int, float, bool, None, lists, dicts) to store
                alongside, such as a data split; defaults to :attr:`extra`.

        Raises:
            CheckpointError: the weights hold NaN or infinity (nothing is written), or
                ``head_only`` was asked for a backbone that cannot be rebuilt.
        """
        return save_trainer(
            self, path, self._training_objects(), head_only=head_only, training_state=training_state,
            interrupted=interrupted, extra=extra,
        )  # fmt: skip

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Restore a checkpoint into this Trainer, to continue training exactly where it stopped.

        Build the Trainer as the one that saved was built (architecture, head, optimizer type,
        ``cache_views``); weights, optimizer, scheduler, scaler, epoch, history, early stopping,
        class names, transform, class weights in effect and random states are restored, and an
        unfreeze is repeated. Everything is checked before anything changes: on any error the
        Trainer is as it was.

        Raises:
            CheckpointError: unreadable or unsafe file, unknown format version, other
                architecture, other class count or names, missing or unexpected weights,
                shape mismatches, NaN weights, an optimizer of another shape, or another
                ``class_weights`` setting (the run would train towards another objective).
        """
        load_trainer(self, path, self._training_objects())

    def _training_objects(self) -> TrainingObjects:
        return TrainingObjects(
            self.optimizer, self.scheduler, self.scaler, self._best, self._cache.views, self._weights
        )
