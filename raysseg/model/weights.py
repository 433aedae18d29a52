"""Backbone weights: reading the files users have, matching them to a backbone, and the policy.

Readers, chosen by the file's first bytes (not its name):
- MXNet NDArray lists (`.params`): PSA/AffinityNet's ResNet-38 ImageNet weights
  (`ilsvrc-cls_rna-a1_cls1000_ep-0001.params`, the file AuxSegNet's README points to), read with numpy
  (no mxnet), their names mapped to raysseg's `resnet38d` module names;
- torch files (`torch.load(weights_only=True)`): converted ResNet-38 `.pth` files of the PSA family,
  torchvision ResNet state dicts, and raysseg's own checkpoints (their `model_state`), with
  `state_dict` / `model` wrappers and `module.` / `_orig_mod.` / `backbone.` prefixes removed.

Policy: a load must fill every backbone key (batch-norm `num_batches_tracked` counters aside) with a
tensor of the right shape; keys the backbone lacks (`fc.*`, a classifier) are ignored and logged.
Anything else is a `WeightsError` naming the file and the keys, so a run never starts half-initialised.

`model.pretrained`: a path or URI; "torchvision" (resnet50/resnet101, downloads); "none" (random
weights on purpose, with a warning); empty = the backbone's default weights: the packaged ImageNet
weights for efficientnet_lite0, none for small, and an error for the ResNets (no offline default, and
silently training from random weights wastes a run).
One file of about 550 lines: the MXNet reader (a third of it) raises the same `WeightsError`s and
feeds the same `WeightsFile` and key match as the torch reader; apart, they would import each other.
"""

from __future__ import annotations

import logging
import math
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from io import BytesIO
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor, nn

from raysseg import storage
from raysseg.config import ConfigError, ModelConfig
from raysseg.errors import InputError

logger = logging.getLogger(__name__)

# Backbones whose empty `model.pretrained` means a default; the others (the ResNets) need a choice.
PACKAGED_WEIGHTS = ("efficientnet_lite0",)
NO_PRETRAINED_WEIGHTS = ("small",)
TORCHVISION_BACKBONES = ("resnet50", "resnet101")
RANDOM_WEIGHTS = "none"
NAMES_SHOWN = 10  # keys listed in messages before "... and N more"
# The tag of raysseg's own checkpoints (engine/checkpoint.py writes it). It lives here because
# recognising a weights file is this module's job, and the checkpoint module sits above the model.
CHECKPOINT_FORMAT = "raysseg-checkpoint-v1"
# Prefixes that wrappers add to parameter names: DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class WeightsError(InputError):
    """A weights file is unreadable, corrupt, or does not fit the backbone; names file and keys."""


# --------------------------------------------------------------------------------------------
# What a file holds, and how it fits a backbone.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightsFile:
    """Tensors of a weights file under backbone names, and a description of what the file was."""

    source: str
    format: str
    state: dict[str, Tensor]


@dataclass(frozen=True)
class KeyMatch:
    """How a state dict fits a backbone. `wrong_shape`: (key, shape in file, shape of backbone)."""

    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    wrong_shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.matched) and not self.missing and not self.wrong_shape


def _is_counter(key: str) -> bool:
    # Batch-norm step counters: no file format outside torch has them, and frozen BN never reads them.
    return key.endswith("num_batches_tracked")


def match_weights(expected: Mapping[str, Tensor], provided: Mapping[str, Tensor]) -> KeyMatch:
    """Compare a backbone's state dict (`expected`) with a file's tensors by name and shape."""
    match = KeyMatch()
    for key, target in expected.items():
        if key not in provided:
            if not _is_counter(key):
                match.missing.append(key)
        elif tuple(provided[key].shape) != tuple(target.shape):
            match.wrong_shape.append((key, tuple(provided[key].shape), tuple(target.shape)))
        else:
            match.matched.append(key)
    match.unexpected.extend(key for key in provided if key not in expected)
    return match


def _shown(names: list[str], limit: int = NAMES_SHOWN) -> str:
    """The first `limit` names, then how many more there are."""
    text = ", ".join(names[:limit])
    return text + (f", ... and {len(names) - limit} more" if len(names) > limit else "")


def match_problems(match: KeyMatch) -> list[str]:
    """Why a load with this match fails (empty when it succeeds)."""
    if not match.matched and not match.wrong_shape:
        return [
            "no key matches the backbone (the file starts with "
            f"{_shown(match.unexpected, 5) or 'nothing'}; the backbone expects "
            f"{_shown(match.missing, 5)})"
        ]
    problems = [
        f"'{key}' has shape {file_shape} in the file, the backbone expects {model_shape}"
        for key, file_shape, model_shape in match.wrong_shape[:NAMES_SHOWN]
    ]
    if len(match.wrong_shape) > NAMES_SHOWN:
        problems.append(f"... and {len(match.wrong_shape) - NAMES_SHOWN} more of the wrong shape")
    if match.missing:
        problems.append(
            f"{len(match.missing)} backbone keys missing from the file: {_shown(match.missing)}"
        )
    return problems


def check_match(match: KeyMatch, weights: WeightsFile) -> None:
    """Raise `WeightsError` naming the file and keys unless every backbone key is filled."""
    problems = match_problems(match)
    if problems:
        raise WeightsError(
            f"weights file '{weights.source}' ({weights.format}) does not fit the backbone: "
            + "; ".join(problems)
        )


def load_state(backbone: nn.Module, weights: WeightsFile) -> KeyMatch:
    """Load `weights` into `backbone` under the policy; returns the match (unexpected keys logged)."""
    match = match_weights(backbone.state_dict(), weights.state)
    check_match(match, weights)
    # Only the matched keys: the check above has judged the rest (counters missing are harmless).
    chosen = {k: weights.state[k] for k in match.matched}
    backbone.load_state_dict(chosen, strict=False)
    logger.info(
        "pretrained weights '%s' (%s): %d tensors loaded",
        weights.source,
        weights.format,
        len(chosen),
    )
    if match.unexpected:
        logger.info(
            "pretrained weights '%s': %d keys that are not backbone keys ignored: %s",
            weights.source,
            len(match.unexpected),
            _shown(match.unexpected),
        )
    return match


def load_backbone_weights(backbone: nn.Module, source: str) -> KeyMatch:
    """Read `source` (path or URI, any supported format) and load it into `backbone`."""
    return load_state(backbone, read_weights(source))


# --------------------------------------------------------------------------------------------
# Reading files.
# --------------------------------------------------------------------------------------------

_MXNET_LIST_MAGIC = 0x112
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_OPCODE = 0x80  # torch's legacy (non-zip) format starts with a pickle PROTO opcode


def read_weights(source: str) -> WeightsFile:
    """Read any supported weights file at a local path or URI; a missing file is FileNotFoundError."""
    source = os.path.expanduser(source)
    try:
        payload = storage.seekable_source(source)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"pretrained weights '{source}': no such file") from error
    stream = open(payload, "rb") if isinstance(payload, str) else payload  # noqa: SIM115
    try:
        head = stream.read(8)
        stream.seek(0)
        if len(head) == 8 and struct.unpack("<Q", head)[0] == _MXNET_LIST_MAGIC:
            arrays, version = read_mxnet_params(stream, _stream_size(stream), source)
            return _psa_weights(source, arrays, version)
    finally:
        if isinstance(payload, str):
            stream.close()
    if head.startswith(_ZIP_MAGIC) or head[:1] == bytes([_PICKLE_OPCODE]):
        return _torch_weights(source, payload)
    described = "an empty file" if not head else f"unknown content (starts with {head.hex()})"
    raise WeightsError(
        f"weights file '{source}': {described}; expected an MXNet .params file or a torch file"
    )


def read_state_dict(source: str) -> dict[str, Tensor]:
    """The tensors of a weights file under backbone names (see `read_weights`)."""
    return read_weights(source).state


def _stream_size(stream: BinaryIO) -> int:
    position = stream.tell()
    size = stream.seek(0, os.SEEK_END)
    stream.seek(position)
    return size


def strip_wrapper_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Parameter names without "module." / "_orig_mod." prefixes (from wrapped models)."""
    stripped = {}
    for name, value in state.items():
        while name.startswith(_WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        stripped[name] = value
    return stripped


def _torch_weights(source: str, payload: str | BytesIO) -> WeightsFile:
    if isinstance(payload, BytesIO):
        payload.seek(0)
    try:
        loaded = torch.load(payload, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated, corrupt or pickled files
        raise WeightsError(
            f"weights file '{source}': not a readable torch file ({error})"
        ) from error
    notes = []
    if (
        isinstance(loaded, dict)
        and loaded.get("format") == CHECKPOINT_FORMAT
        and "model_state" in loaded
    ):
        args = loaded.get("model_args") or {}
        notes.append(f"raysseg checkpoint of backbone '{args.get('backbone', '?')}'")
        loaded = loaded["model_state"]
    for wrapper in ("state_dict", "model"):  # training scripts often wrap the weights
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
            notes.append(f"'{wrapper}' entry")
            loaded = loaded[wrapper]
    if not isinstance(loaded, dict) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise WeightsError(f"weights file '{source}': expected a mapping of names to tensors")
    state = strip_wrapper_prefixes(loaded)
    if any(key.startswith("backbone.") for key in state):  # a whole model: keep its backbone
        notes.append("its 'backbone.' keys")
        state = {
            k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")
        }
    described = f"torch file, {len(state)} tensors" + "".join(f"; {n}" for n in notes)
    return WeightsFile(source=source, format=described, state=state)


# --------------------------------------------------------------------------------------------
# MXNet NDArray lists (mxnet src/ndarray/ndarray.cc, NDArray::Save / NDArray::Load), little-endian:
#   uint64 0x112, uint64 reserved, uint64 count, `count` arrays, uint64 count, `count` names
#   (uint64 length + bytes, "arg:" / "aux:" prefixed). One array:
#   V2: uint32 0xF993fac9, int32 storage type (0 = dense), shape, context, int32 type flag, data
#   V1: uint32 0xF993fac8, shape, context, int32 type flag, data
#   legacy: the first uint32 is the shape's ndim, then ndim uint32 dims, context, type flag, data
#   shape (V1/V2) = uint32 ndim + ndim int64 dims; context = int32 device type + int32 device id;
#   an array of ndim 0 is empty and ends after its shape.
# --------------------------------------------------------------------------------------------

_NDARRAY_V1_MAGIC = 0xF993FAC8
_NDARRAY_V2_MAGIC = 0xF993FAC9
_NDARRAY_V3_MAGIC = 0xF993FACA  # numpy-shape semantics; not written by the MXNet 1.x of PSA's era
_MAX_NDIM = 32
_MXNET_DTYPES = {
    0: np.float32,
    1: np.float64,
    2: np.float16,
    3: np.uint8,
    4: np.int32,
    5: np.int8,
    6: np.int64,
    7: np.bool_,
}


class _ByteReader:
    """Sequential little-endian reads; running out of bytes is a `WeightsError` naming the file."""

    def __init__(self, stream: BinaryIO, size: int, source: str) -> None:
        self.stream, self.size, self.source = stream, size, source
        self.offset = 0

    def fail(self, message: str) -> WeightsError:
        return WeightsError(f"weights file '{self.source}': {message} (at byte {self.offset})")

    def need(self, count: int, what: str) -> None:
        if count > self.size - self.offset:
            raise self.fail(
                f"truncated or corrupt: {what} needs {count} bytes, the file has "
                f"{self.size - self.offset} left"
            )

    def take(self, count: int, what: str) -> bytes:
        self.need(count, what)
        data = self.stream.read(count)
        if len(data) != count:  # the file shrank while being read
            raise self.fail(f"truncated: {what} ends after {len(data)} of {count} bytes")
        self.offset += count
        return data

    def scalar(self, code: str, what: str) -> int:
        return struct.unpack("<" + code, self.take(struct.calcsize(code), what))[0]

    def array(self, dtype: type[np.generic], count: int, what: str) -> np.ndarray:
        little = np.dtype(dtype).newbyteorder("<")
        # Checked before allocating: a corrupt shape must not ask for terabytes.
        self.need(count * little.itemsize, what)
        # Into a preallocated array: a ResNet-38 weight is read once, with no intermediate bytes.
        out = np.empty(count, dtype=little)
        read = self.stream.readinto(memoryview(out).cast("B")) if out.nbytes else 0
        if read != out.nbytes:
            raise self.fail(f"truncated: {what} ends after {read} of {out.nbytes} bytes")
        self.offset += out.nbytes
        return out


def read_mxnet_params(
    stream: BinaryIO, size: int, source: str
) -> tuple[dict[str, np.ndarray], str]:
    """Arrays of an MXNet NDArray-list file by name ("arg:"/"aux:" kept), and the array version."""
    reader = _ByteReader(stream, size, source)
    if reader.scalar("Q", "the file header") != _MXNET_LIST_MAGIC:
        raise reader.fail("not an MXNet NDArray list (bad magic number)")
    reader.scalar("Q", "the reserved header field")
    count = reader.scalar("Q", "the array count")
    reader.need(4 * count, f"{count} arrays")  # every array has at least a 4-byte header
    arrays, versions = [], set()
    for index in range(count):
        array, version = _read_ndarray(reader, index)
        arrays.append(array)
        versions.add(version)
    names = _read_names(reader, count)
    if len(set(names)) != len(names):
        raise reader.fail("the same array name appears twice")
    return dict(zip(names, arrays, strict=True)), "/".join(sorted(versions))


def _read_ndarray(reader: _ByteReader, index: int) -> tuple[np.ndarray, str]:
    what = f"array {index}"
    magic = reader.scalar("I", f"{what}: header")
    if magic == _NDARRAY_V2_MAGIC:
        storage = reader.scalar("i", f"{what}: storage type")
        if storage != 0:
            raise reader.fail(f"{what} has storage type {storage}; only dense (0) is supported")
        version, shape = "V2", _read_shape(reader, "q", what)
    elif magic == _NDARRAY_V1_MAGIC:
        version, shape = "V1", _read_shape(reader, "q", what)
    elif magic == _NDARRAY_V3_MAGIC:
        raise reader.fail(f"{what}: NDArray V3 (numpy-shape semantics) is not supported")
    elif magic <= _MAX_NDIM:  # legacy: no magic, the number is the ndim of uint32 dims
        version = "legacy"
        shape = tuple(reader.scalar("I", f"{what}: shape") for _ in range(magic))
    else:
        raise reader.fail(f"{what}: not an NDArray header (0x{magic:08x})")
    if not shape:
        return np.zeros(0, dtype=np.float32), version  # MXNet's "none" array: nothing follows
    reader.scalar("i", f"{what}: device type")
    reader.scalar("i", f"{what}: device id")
    flag = reader.scalar("i", f"{what}: type flag")
    if flag not in _MXNET_DTYPES:
        raise reader.fail(f"{what}: unknown data type flag {flag}")
    count = math.prod(shape)  # a Python int: no overflow on a corrupt shape
    return reader.array(_MXNET_DTYPES[flag], count, f"{what} data").reshape(shape), version


def _read_shape(reader: _ByteReader, dim_code: str, what: str) -> tuple[int, ...]:
    ndim = reader.scalar("i", f"{what}: ndim")
    if not 0 <= ndim <= _MAX_NDIM:
        raise reader.fail(f"{what}: corrupt shape (ndim {ndim})")
    dims = tuple(reader.scalar(dim_code, f"{what}: shape") for _ in range(ndim))
    if any(d < 0 for d in dims):
        raise reader.fail(f"{what}: corrupt shape {dims}")
    return dims


def _read_names(reader: _ByteReader, count: int) -> list[str]:
    name_count = reader.scalar("Q", "the name count")
    if name_count != count:
        raise reader.fail(f"{name_count} names for {count} arrays (the names are needed)")
    names = []
    for index in range(name_count):
        length = reader.scalar("Q", f"name {index}: length")
        raw = reader.take(length, f"name {index}")
        try:
            names.append(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise reader.fail(f"name {index} is not text") from error
    return names


# --------------------------------------------------------------------------------------------
# PSA's MXNet names -> raysseg's resnet38d names (what PSA's `convert_mxnet_to_torch` does):
#   conv1a_weight                      -> conv1a.weight
#   res{S}a_{branch}_weight            -> b{S}.conv_{branch}.weight   (first block of stage S)
#   res{S}b{K}_{branch}_weight         -> b{S}_{K}.conv_{branch}.weight
#   bn{S}a_{branch}_{gamma|beta|moving_mean|moving_var}
#                                      -> b{S}.bn_{branch}.{weight|bias|running_mean|running_var}
#   bn7_{gamma|...}                    -> bn7.{weight|...}
# Anything else (the ImageNet classifier `linear1000_*`) keeps its name and is reported unexpected.
# --------------------------------------------------------------------------------------------

_BN_PARAMS = {
    "gamma": "weight",
    "beta": "bias",
    "moving_mean": "running_mean",
    "moving_var": "running_var",
}
_PSA_BLOCK_KEY = re.compile(
    r"(?P<kind>res|bn)(?P<stage>\d)(?P<block>a|b\d+)_(?P<branch>branch[0-9a-z]+)_(?P<param>\w+)"
)


def psa_to_resnet38d(name: str) -> str:
    """raysseg's resnet38d key for one PSA MXNet array name (prefix "arg:"/"aux:" allowed)."""
    bare = name.removeprefix("arg:").removeprefix("aux:")
    if bare == "conv1a_weight":
        return "conv1a.weight"
    if bare.startswith("bn7_") and bare[4:] in _BN_PARAMS:
        return f"bn7.{_BN_PARAMS[bare[4:]]}"
    found = _PSA_BLOCK_KEY.fullmatch(bare)
    if not found:
        return bare
    stage, block = found["stage"], found["block"]
    module = f"b{stage}" if block == "a" else f"b{stage}_{block[1:]}"
    if found["kind"] == "res" and found["param"] == "weight":
        return f"{module}.conv_{found['branch']}.weight"
    if found["kind"] == "bn" and found["param"] in _BN_PARAMS:
        return f"{module}.bn_{found['branch']}.{_BN_PARAMS[found['param']]}"
    return bare


def _psa_weights(source: str, arrays: dict[str, np.ndarray], version: str) -> WeightsFile:
    state: dict[str, Tensor] = {}
    for name, array in arrays.items():
        key = psa_to_resnet38d(name)
        if key in state:
            raise WeightsError(f"weights file '{source}': two arrays map to '{key}' ('{name}')")
        state[key] = torch.from_numpy(array)
    described = f"MXNet .params, NDArray {version}, {len(arrays)} arrays, PSA ResNet-38 names"
    return WeightsFile(source=source, format=described, state=state)


# --------------------------------------------------------------------------------------------
# model.pretrained: what it means per backbone, checked before any cluster work, and applied.
# --------------------------------------------------------------------------------------------


def pretrained_choice(backbone: str, pretrained: str | None) -> str:
    """What `pretrained` asks of `backbone`: "skip" (None: weights come later, e.g. from a
    checkpoint), "random", "untrained" (small: no pretrained weights exist), "packaged",
    "torchvision" or "file". Raises `WeightsError` when it cannot be honoured.
    """
    if pretrained is None:
        return "skip"
    value = pretrained.strip()
    if value.lower() == RANDOM_WEIGHTS:
        return "random"
    if value == "torchvision":
        if backbone not in TORCHVISION_BACKBONES:
            raise WeightsError(
                f"pretrained='torchvision' is only for {'/'.join(TORCHVISION_BACKBONES)}, "
                f"not '{backbone}'"
            )
        return "torchvision"
    if value:
        return "file"
    if backbone in PACKAGED_WEIGHTS:
        return "packaged"
    if backbone in NO_PRETRAINED_WEIGHTS:
        return "untrained"
    options = "a weights file (path or URI: a torch state dict, PSA's ResNet-38 .params, a raysseg "
    options += "checkpoint; check one with `raysseg weights inspect`)"
    if backbone in TORCHVISION_BACKBONES:
        options += ", 'torchvision' (downloads ImageNet weights; needs network)"
    raise WeightsError(
        f"empty for backbone '{backbone}', which has no default weights offline; set "
        f"model.pretrained to {options}, or to 'none' to train from random weights on purpose"
    )


def check_pretrained(model_config: ModelConfig) -> str:
    """`pretrained_choice` of a config, as a `ConfigError` naming `model.pretrained`; a local
    weights file must exist. Cheap (nothing is read): for commands to call before Ray starts.
    """
    try:
        choice = pretrained_choice(model_config.backbone, model_config.pretrained)
    except WeightsError as error:
        raise ConfigError(f"config key 'model.pretrained': {error}") from error
    source = os.path.expanduser(model_config.pretrained.strip())
    if choice == "file" and storage.is_local(source):
        path = storage.resolve(source)[1]
        if not os.path.isfile(path):
            raise ConfigError(
                f"config key 'model.pretrained': '{source}' is not a file "
                f"(working directory: {os.getcwd()})"
            )
    return choice


def describe_inspection(weights: WeightsFile, match: KeyMatch, limit: int = NAMES_SHOWN) -> str:
    """`raysseg weights inspect`'s report: format, then each key group with a count and names."""
    lines = [f"file: {weights.source}", f"format: {weights.format}"]
    groups = (("matched", match.matched), ("missing", match.missing))
    groups += (("unexpected", match.unexpected),)
    for label, names in groups:
        lines.append(f"{label}: {len(names)}" + (f": {_shown(names, limit)}" if names else ""))
    lines.append(f"wrong shape: {len(match.wrong_shape)}")
    lines.extend(
        f"  {key}: file {file_shape}, backbone {model_shape}"
        for key, file_shape, model_shape in match.wrong_shape[:limit]
    )
    if len(match.wrong_shape) > limit:
        lines.append(f"  ... and {len(match.wrong_shape) - limit} more")
    problems = match_problems(match)
    lines.append(
        "the load would fail: " + "; ".join(problems) if problems else "the load would succeed"
    )
    return "\n".join(lines)


__all__ = [
    "CHECKPOINT_FORMAT",
    "KeyMatch",
    "WeightsError",
    "WeightsFile",
    "check_match",
    "check_pretrained",
    "describe_inspection",
    "load_backbone_weights",
    "load_state",
    "match_problems",
    "match_weights",
    "pretrained_choice",
    "psa_to_resnet38d",
    "read_mxnet_params",
    "read_state_dict",
    "read_weights",
    "strip_wrapper_prefixes",
]
