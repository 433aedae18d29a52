"""Tiny ONNX models written byte by byte (the `onnx` package is not a dependency).

An ONNX file is a protobuf `ModelProto`; the few messages needed here are encoded by hand from the
field numbers of onnx.proto, and onnxruntime loads the result like any exported model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

# onnx.proto enum values used below
FLOAT = 1  # TensorProto.DataType
ATTRIBUTE_INTS = 7  # AttributeProto.AttributeType
ATTRIBUTE_INT = 2


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _int_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _bytes_field(number: int, payload: bytes | str) -> bytes:
    data = payload.encode() if isinstance(payload, str) else payload
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _value_info(name: str, shape: Sequence[int | str]) -> bytes:
    dims = b"".join(
        _bytes_field(1, _bytes_field(2, d) if isinstance(d, str) else _int_field(1, d))
        for d in shape
    )
    tensor = _int_field(1, FLOAT) + _bytes_field(2, dims)
    return _bytes_field(1, name) + _bytes_field(2, _bytes_field(1, tensor))


def _attribute_ints(name: str, values: Sequence[int]) -> bytes:
    ints = b"".join(_int_field(8, v) for v in values)
    return _bytes_field(1, name) + ints + _int_field(20, ATTRIBUTE_INTS)


def _attribute_int(name: str, value: int) -> bytes:
    return _bytes_field(1, name) + _int_field(3, value) + _int_field(20, ATTRIBUTE_INT)


def write_onnx(
    path: Path,
    op_type: str,
    input_shape: Sequence[int | str],
    output_shape: Sequence[int | str],
    attributes: bytes = b"",
) -> Path:
    """A one-node model x -> op_type -> y (opset 13) with the declared shapes."""
    node = (
        _bytes_field(1, "x")
        + _bytes_field(2, "y")
        + _bytes_field(3, "node")
        + _bytes_field(4, op_type)
        + attributes
    )
    graph = (
        _bytes_field(1, node)
        + _bytes_field(2, "g")
        + _bytes_field(11, _value_info("x", input_shape))
        + _bytes_field(12, _value_info("y", output_shape))
    )
    opset = _bytes_field(1, "") + _int_field(2, 13)
    model = _int_field(1, 7) + _bytes_field(2, "raysseg-tests") + _bytes_field(7, graph)
    path.write_bytes(model + _bytes_field(8, opset))
    return path


def saliency_onnx(path: Path, size: int | str = "H") -> Path:
    """A valid saliency net: (N, 3, H, W) image -> channel mean (N, 1, H, W)."""
    attributes = _bytes_field(5, _attribute_ints("axes", [1])) + _bytes_field(
        5, _attribute_int("keepdims", 1)
    )
    width = size if isinstance(size, int) else "W"
    return write_onnx(path, "ReduceMean", ["N", 3, size, width], ["N", 1, size, width], attributes)


def three_channel_onnx(path: Path) -> Path:
    """Not a saliency net: its output keeps 3 channels (an image-to-image model)."""
    return write_onnx(path, "Sigmoid", ["N", 3, "H", "W"], ["N", 3, "H", "W"])


def classifier_onnx(path: Path) -> Path:
    """Not a saliency net: a (N, 10) vector in, (N, 10) out."""
    return write_onnx(path, "Sigmoid", ["N", 10], ["N", 10])
