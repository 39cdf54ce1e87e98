"""Freezing the feature extractor so that frozen really means frozen.

``requires_grad_(False)`` alone stops gradients but not BatchNorm: in training mode a BatchNorm
layer normalises with the batch's statistics and overwrites its running mean and variance on every
forward pass, so a "frozen" VGG16_bn drifts away from its pretrained state and behaves differently
in training and evaluation. Calling ``.eval()`` on the frozen part is undone by the next
``model.train()``, which every training loop calls.

vggtransfer therefore gives each module of the frozen part a forward pre-hook that switches it to
evaluation mode right before it runs. Whatever ``model.train()`` did in between, the frozen part
computes with its running statistics, leaves every tensor of its state dict bitwise unchanged, and
its dropout is inactive. The hooks change no parameter names, so state dicts stay compatible with
torchvision's; :func:`unfreeze_features` removes them.
"""

from __future__ import annotations

from typing import Literal, TypeVar

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._heads import declares_classifier, is_appended, locate_head
from ._spec import record

__all__ = [
    "BatchNormPolicy",
    "feature_extractor",
    "freeze_features",
    "frozen_keys",
    "held_in_eval",
    "unfreeze_features",
]

BatchNormPolicy = Literal["frozen", "trainable"]

M = TypeVar("M", bound=nn.Module)

_HOOK_ATTR = "_vggtransfer_eval_hook"


def _stay_in_eval_mode(module: nn.Module, args: object) -> None:
    # Runs before module.forward: undo whatever model.train() set since the last call.
    module.training = False


def feature_extractor(model: nn.Module) -> tuple[list[nn.Module], list[nn.Parameter]]:
    """The part of ``model`` that :func:`freeze_features` freezes.

    Returns:
        The frozen submodules and any parameters held directly by ``model`` outside them (such
        as ViT's ``class_token``):

        * a model made by :func:`append_classifier`: the whole wrapped network, ``model.net``;
        * a model with a ``features`` module (VGG, AlexNet, DenseNet, MobileNet, EfficientNet,
          ConvNeXt, Swin, SqueezeNet): ``model.features``;
        * any other model with a recognised head (ResNet, RegNet, ViT, MaxViT, ...): everything
          but the head;
        * a timm model: everything but the classifier it declares, so for ConvNeXt's
          ``"head.fc"`` the head's normalisation is frozen too.

    Raises:
        TypeError: the model has no ``features`` module and no recognisable head.

    Example:
        >>> import vggtransfer as vt
        >>> model = vt.create_model("resnet18", weights=None)
        >>> modules, params = vt.feature_extractor(model)
        >>> [name for name, child in model.named_children() if all(child is not m for m in modules)]
        ['fc']

    """
    if is_appended(model):
        return [model.get_submodule("net")], []
    features = getattr(model, "features", None)
    # A timm model's declared classifier wins over a `features` attribute (timm's VGG has both,
    # with `pre_logits` between them): everything but that classifier is its feature extractor.
    if isinstance(features, nn.Module) and not declares_classifier(model):
        return [features], []
    head = locate_head(model, "freeze_features")
    return _all_but(model, head.name)


def _all_but(model: nn.Module, path: str) -> tuple[list[nn.Module], list[nn.Parameter]]:
    """Every child of ``model`` but the one at ``path``; for a dotted path, its siblings' too.

    For ``"head.fc"`` that is every child but ``head``, plus ``head``'s children but ``fc`` (the
    head's pooling and normalisation) and the parameters held directly by ``model`` and ``head``.
    """
    modules: list[nn.Module] = []
    params = list(model.parameters(recurse=False))
    node = model
    parts = path.split(".")
    for depth, part in enumerate(parts):
        modules += [child for name, child in node.named_children() if name != part]
        node = node.get_submodule(part)
        if depth < len(parts) - 1:
            params += list(node.parameters(recurse=False))
    return modules, params


def freeze_features(model: M, *, batchnorm: BatchNormPolicy = "frozen") -> M:
    """Freeze the feature extractor of ``model`` in place, BatchNorm included.

    Transfer learning trains a new head on top of features learnt on ImageNet. Freezing the
    feature extractor keeps those features exactly as they were: its parameters stop receiving
    gradients and, with ``batchnorm="frozen"``, every BatchNorm layer in it keeps normalising
    with its pretrained running statistics and never updates them, even in training mode, even
    after later ``model.train()`` calls. Dropout inside the frozen part is inactive. After
    ``model.train()``, a forward and backward pass and an optimizer step, every tensor of the
    frozen part's state dict (weights, ``running_mean``, ``running_var``,
    ``num_batches_tracked``) is bitwise unchanged.

    Which part is frozen is described in :func:`feature_extractor`; in short ``model.features``
    when it exists, otherwise everything but the classifier head.

    Args:
        model: The model to freeze.
        batchnorm: ``"frozen"`` (default) freezes BatchNorm affine parameters *and* statistics.
            ``"trainable"`` lets BatchNorm layers of the frozen part keep training: their affine
            parameters get gradients and their running statistics update in training mode;
            useful when the new images differ strongly from ImageNet.

    Returns:
        ``model`` itself. Calling it again replaces the previous policy.

    Raises:
        TypeError: the model has no ``features`` module and no recognisable head.
        ValueError: ``batchnorm`` is not one of the two policies.

    Example:
        >>> import vggtransfer as vt
        >>> model = vt.freeze_features(vt.create_model("vgg11_bn", weights=None))
        >>> any(p.requires_grad for p in model.features.parameters())
        False
        >>> all(p.requires_grad for p in model.classifier.parameters())
        True

    """
    if batchnorm not in ("frozen", "trainable"):
        raise ValueError(
            f"freeze_features: expected batchnorm to be 'frozen' or 'trainable' but got {batchnorm!r}"
        )
    modules, root_params = feature_extractor(model)
    unfreeze_features(model)
    for param in root_params:
        param.requires_grad_(False)
    for part in modules:
        for module in part.modules():
            if batchnorm == "trainable" and isinstance(module, _BatchNorm):
                continue
            for param in module.parameters(recurse=False):
                param.requires_grad_(False)
            setattr(module, _HOOK_ATTR, module.register_forward_pre_hook(_stay_in_eval_mode))
            module.training = False
    record(model, freeze={"batchnorm": batchnorm})
    return model


def unfreeze_features(model: M) -> M:
    """Undo :func:`freeze_features` in place, for a fine-tuning phase that trains every layer.

    The feature extractor's parameters get ``requires_grad=True`` again and its modules follow
    ``model.train()`` / ``model.eval()`` like the rest of the model. Fine-tune with a learning
    rate well below the head's (for example 10x lower) so the pretrained features are adjusted
    rather than overwritten.

    Returns:
        ``model`` itself.

    Example:
        >>> import vggtransfer as vt
        >>> model = vt.unfreeze_features(vt.freeze_features(vt.create_model("vgg11", weights=None)))
        >>> all(p.requires_grad for p in model.parameters())
        True

    """
    modules, root_params = feature_extractor(model)
    for module in model.modules():
        handle = module.__dict__.pop(_HOOK_ATTR, None)
        if handle is not None:
            handle.remove()
            module.training = model.training
    for param in root_params:
        param.requires_grad_(True)
    for part in modules:
        part.requires_grad_(True)
    record(model, freeze=None)
    return model


def held_in_eval(module: nn.Module) -> bool:
    """Whether :func:`freeze_features` holds ``module`` in evaluation mode (its own hook, not nested)."""
    return _HOOK_ATTR in module.__dict__


def frozen_keys(model: nn.Module) -> set[str]:
    """State-dict keys that ``freeze_features`` froze: never trained, so head-only files skip them.

    A key is frozen when it is a parameter with ``requires_grad=False``, or a buffer (BatchNorm
    statistics) of a module that ``freeze_features`` holds in evaluation mode.
    """
    keys = {name for name, param in model.named_parameters() if not param.requires_grad}
    for module_name, module in model.named_modules():
        if held_in_eval(module):
            prefix = f"{module_name}." if module_name else ""
            keys.update(prefix + name for name, _ in module.named_buffers(recurse=False))
    return keys & set(model.state_dict())
