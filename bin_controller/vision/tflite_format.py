"""Just enough of the TFLite flatbuffer format to derive a pooled backbone and write int8 heads.

TensorFlow is never needed on the bin, so the project reads and writes the few tables it
needs itself. Field slots follow tensorflow/lite/schema/schema.fbs.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import flatbuffers
import numpy as np

# TensorType
FLOAT32, INT32, UINT8, INT8 = 0, 2, 3, 9
NUMPY_OF_TYPE = {FLOAT32: np.float32, INT32: np.int32, UINT8: np.uint8, INT8: np.int8}

# BuiltinOperator, with the op version the converter writes for int8 kernels
AVERAGE_POOL_2D, FULLY_CONNECTED, RESHAPE, SOFTMAX = 1, 9, 22, 25
OP_VERSION = {AVERAGE_POOL_2D: 2, FULLY_CONNECTED: 4, RESHAPE: 1, SOFTMAX: 2}

# BuiltinOptions union members
POOL2D_OPTIONS, FULLY_CONNECTED_OPTIONS, SOFTMAX_OPTIONS, RESHAPE_OPTIONS = 5, 8, 9, 17

# ActivationFunctionType, Padding
ACT_NONE, ACT_RELU = 0, 1
PADDING_VALID = 1


class TFLiteFormatError(ValueError):
    """The bytes are not a TFLite model this module understands."""


# --------------------------------------------------------------------------- reading


class _Table:
    """A flatbuffer table: position in the buffer plus its vtable.

    Every read is bounds-checked: struct accepts negative offsets (counted from the end),
    so a damaged offset would otherwise read the wrong bytes instead of failing.
    """

    def __init__(self, buf: bytes | bytearray, pos: int) -> None:
        self.buf = buf
        self.pos = pos
        vtable = pos - _read(buf, "<i", pos)
        self._vt_size = _read(buf, "<H", vtable)
        if self._vt_size < 4 or self._vt_size % 2:
            raise TFLiteFormatError(f"table at byte {pos} has a broken vtable")
        _need(buf, vtable, self._vt_size)
        self._vtable = vtable

    def _field(self, slot: int) -> int:
        off = 4 + 2 * slot
        if off >= self._vt_size:
            return 0
        rel = _read(self.buf, "<H", self._vtable + off)
        return self.pos + rel if rel else 0

    def uint(self, slot: int, default: int = 0) -> int:
        p = self._field(slot)
        return _read(self.buf, "<I", p) if p else default

    def vector_pos(self, slot: int, item_size: int = 1) -> tuple[int, int]:
        """(position of first element, length); (0, 0) when absent."""
        p = self._field(slot)
        if not p:
            return 0, 0
        start = p + _read(self.buf, "<I", p)
        n = _read(self.buf, "<I", start)
        _need(self.buf, start + 4, n * item_size)
        return start + 4, n

    def int_vector(self, slot: int) -> list[int]:
        start, n = self.vector_pos(slot, 4)
        return list(struct.unpack_from(f"<{n}i", self.buf, start)) if n else []

    def tables(self, slot: int) -> list[_Table]:
        start, n = self.vector_pos(slot, 4)
        return [_Table(self.buf, p + _read(self.buf, "<I", p))
                for p in range(start, start + 4 * n, 4)]

    def string(self, slot: int) -> str:
        start, n = self.vector_pos(slot)
        try:
            return bytes(self.buf[start : start + n]).decode("utf-8")
        except UnicodeDecodeError as exc:
            # The runtimes decode names strictly too, so a bad name would fail later anyway.
            raise TFLiteFormatError(f"a name at byte {start} is not UTF-8 text") from exc


def _need(buf: bytes | bytearray, pos: int, size: int) -> None:
    if pos < 0 or pos + size > len(buf):
        raise TFLiteFormatError(
            f"damaged or truncated: an offset points outside the file (byte {pos} of "
            f"{len(buf)})"
        )


def _read(buf: bytes | bytearray, fmt: str, pos: int) -> int:
    _need(buf, pos, struct.calcsize(fmt))
    value: int = struct.unpack_from(fmt, buf, pos)[0]
    return value


def _model(buf: bytes | bytearray) -> _Table:
    if len(buf) < 8 or buf[4:8] != b"TFL3":
        raise TFLiteFormatError("not a TFLite flatbuffer (missing 'TFL3' identifier)")
    return _Table(buf, _read(buf, "<I", 0))


def _subgraphs(buf: bytes | bytearray) -> list[_Table]:
    subgraphs = _model(buf).tables(2)
    if not subgraphs:
        raise TFLiteFormatError("damaged: the model has no subgraph")
    return subgraphs


@contextmanager
def _damaged() -> Iterator[None]:
    """Any slip past the checks above still comes out as the one error callers expect."""
    try:
        yield
    except (struct.error, IndexError, OverflowError, UnicodeDecodeError) as exc:
        raise TFLiteFormatError(f"damaged or truncated: {exc}") from exc


def tensor_names(buf: bytes) -> list[str]:
    """Names of the first subgraph's tensors, by index."""
    with _damaged():
        return [t.string(3) for t in _subgraphs(buf)[0].tables(0)]


def validate(buf: bytes) -> None:
    """Raise TFLiteFormatError unless every subgraph's tensor table reads cleanly.

    The runtimes verify the flatbuffer themselves but decode tensor names only when asked,
    so a damaged name would otherwise surface as UnicodeDecodeError mid-classification.
    """
    with _damaged():
        for subgraph in _subgraphs(buf):
            for tensor in subgraph.tables(0):
                tensor.string(3)


def truncate_at_tensor(buf: bytes, tensor_name: str) -> bytes:
    """Return a model whose only output is `tensor_name`, with every later operator dropped.

    Works in place on a copy: the subgraph's operator vector is shortened (the converter
    writes operators in execution order) and the single output index is rewritten. The
    result is checked by the caller to give bit-identical features to the original.
    """
    with _damaged():
        return _truncate(bytearray(buf), tensor_name)


def _truncate(data: bytearray, tensor_name: str) -> bytes:
    subgraph = _subgraphs(data)
    if len(subgraph) != 1:
        raise TFLiteFormatError("only single-subgraph models can be truncated")
    sg = subgraph[0]
    names = [t.string(3) for t in sg.tables(0)]
    if tensor_name not in names:
        raise TFLiteFormatError(f"no tensor named {tensor_name!r} in the model")
    target = names.index(tensor_name)
    ops = sg.tables(3)
    producer = next((i for i, op in enumerate(ops) if target in op.int_vector(2)), None)
    if producer is None:
        raise TFLiteFormatError(f"tensor {tensor_name!r} is not produced by any operator")
    out_start, out_len = sg.vector_pos(2, 4)
    if out_len < 1:
        raise TFLiteFormatError("model has no outputs")
    ops_start, _ = sg.vector_pos(3, 4)
    struct.pack_into("<I", data, ops_start - 4, producer + 1)
    struct.pack_into("<I", data, out_start - 4, 1)
    struct.pack_into("<i", data, out_start, target)
    return bytes(data)


@dataclass(frozen=True)
class DenseInt8:
    """One FULLY_CONNECTED layer of an int8 head, as real numbers: `weight` [out, in] and
    `bias` dequantized, `relu` from its fused activation."""

    weight: np.ndarray
    bias: np.ndarray
    relu: bool


def _tensor_array(model: _Table, tensor: _Table, dtype: type) -> np.ndarray:
    """A constant tensor's values, dequantized with its per-tensor or per-channel (axis 0)
    scales."""
    buffers = model.tables(4)
    index = tensor.uint(2)
    if not 0 < index < len(buffers):
        raise TFLiteFormatError(f"tensor {tensor.string(3)!r} is not a constant")
    start, n = buffers[index].vector_pos(0)
    shape = tensor.int_vector(0)
    values: np.ndarray = np.frombuffer(bytes(tensor.buf[start:start + n]), dtype=dtype)
    if values.size != int(np.prod(shape)):
        raise TFLiteFormatError(f"tensor {tensor.string(3)!r}: {values.size} values for "
                                f"shape {shape}")
    values = values.reshape(shape).astype(np.float64)
    quant_pos = tensor._field(4)
    if not quant_pos:
        return values
    quant = _Table(tensor.buf, quant_pos + _read(tensor.buf, "<I", quant_pos))
    s_start, s_n = quant.vector_pos(2, 4)
    z_start, z_n = quant.vector_pos(3, 8)
    scales = np.frombuffer(bytes(tensor.buf[s_start:s_start + 4 * s_n]), "<f4")
    zeros = np.frombuffer(bytes(tensor.buf[z_start:z_start + 8 * z_n]), "<i8")
    if not s_n:
        return values
    if s_n not in (1, shape[0]) or z_n not in (0, 1, s_n):
        raise TFLiteFormatError(f"tensor {tensor.string(3)!r}: quantized along an axis "
                                "other than the first")
    per_row = (-1,) + (1,) * (len(shape) - 1)
    zero = zeros.reshape(per_row) if z_n > 1 else (zeros[0] if z_n else 0)
    return (values - zero) * scales.astype(np.float64).reshape(per_row)


def read_dense_head(buf: bytes) -> list[DenseInt8]:
    """The dense layers of a head model: FULLY_CONNECTED operators (int8 weights, int32
    bias) in order, optionally followed by a SOFTMAX. What a teach needs to keep a trained
    head's labels exactly as they are; anything else in the model is refused."""
    with _damaged():
        model = _model(buf)
        codes = []
        for code in model.tables(1):
            p = code._field(3)
            codes.append(_read(buf, "<i", p) if p else _read(buf, "<b", code._field(0)))
        graph = _subgraphs(buf)[0]
        tensors = graph.tables(0)
        layers: list[DenseInt8] = []
        ops = graph.tables(3)
        for i, op in enumerate(ops):
            kind = codes[op.uint(0)]
            if kind == SOFTMAX and i == len(ops) - 1:
                break
            if kind != FULLY_CONNECTED:
                raise TFLiteFormatError(f"operator {i} is not a dense layer (builtin {kind})")
            inputs = op.int_vector(1)
            if len(inputs) < 3 or inputs[2] < 0:
                raise TFLiteFormatError(f"dense layer {i} has no bias")
            weight_t, bias_t = tensors[inputs[1]], tensors[inputs[2]]
            weight_type = NUMPY_OF_TYPE.get(_read(buf, "<b", weight_t._field(1)))
            if weight_type not in (np.int8, np.float32):
                raise TFLiteFormatError(f"dense layer {i}: weights neither int8 nor float")
            bias_type = np.int32 if weight_type is np.int8 else np.float32
            weight = _tensor_array(model, weight_t, weight_type)
            bias = _tensor_array(model, bias_t, bias_type)
            opt_pos = op._field(4)
            activation = ACT_NONE
            if opt_pos:
                options = _Table(buf, opt_pos + _read(buf, "<I", opt_pos))
                p = options._field(0)
                activation = _read(buf, "<b", p) if p else ACT_NONE
            if activation not in (ACT_NONE, ACT_RELU):
                raise TFLiteFormatError(f"dense layer {i}: activation {activation} is not "
                                        "none or relu")
            layers.append(DenseInt8(weight, bias, activation == ACT_RELU))
        if not layers:
            raise TFLiteFormatError("the model has no dense layer")
        return layers


# --------------------------------------------------------------------------- writing


@dataclass
class Tensor:
    name: str
    shape: list[int]
    dtype: int
    scale: float | None = None
    zero_point: int = 0
    data: np.ndarray | None = None  # constant tensors only


@dataclass
class Op:
    code: int
    inputs: list[int]
    outputs: list[int]
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Graph:
    tensors: list[Tensor] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)

    def add(self, tensor: Tensor) -> int:
        self.tensors.append(tensor)
        return len(self.tensors) - 1


def _int_vector(b: flatbuffers.Builder, values: list[int]) -> int:
    b.StartVector(4, len(values), 4)
    for v in reversed(values):
        b.PrependInt32(int(v))
    end: int = b.EndVector()
    return end


def _offset_vector(b: flatbuffers.Builder, offsets: list[int]) -> int:
    b.StartVector(4, len(offsets), 4)
    for o in reversed(offsets):
        b.PrependUOffsetTRelative(o)
    end: int = b.EndVector()
    return end


def _options(b: flatbuffers.Builder, op: Op) -> tuple[int, int]:
    o = op.options
    if op.code == FULLY_CONNECTED:
        b.StartObject(4)
        b.PrependInt8Slot(0, o.get("activation", ACT_NONE), 0)
        return FULLY_CONNECTED_OPTIONS, b.EndObject()
    if op.code == SOFTMAX:
        b.StartObject(1)
        b.PrependFloat32Slot(0, o.get("beta", 1.0), 0.0)
        return SOFTMAX_OPTIONS, b.EndObject()
    if op.code == AVERAGE_POOL_2D:
        b.StartObject(6)
        b.PrependInt8Slot(0, PADDING_VALID, 0)
        b.PrependInt32Slot(1, o["stride"], 0)
        b.PrependInt32Slot(2, o["stride"], 0)
        b.PrependInt32Slot(3, o["filter"], 0)
        b.PrependInt32Slot(4, o["filter"], 0)
        b.PrependInt8Slot(5, ACT_NONE, 0)
        return POOL2D_OPTIONS, b.EndObject()
    if op.code == RESHAPE:
        shape = _int_vector(b, o["new_shape"])
        b.StartObject(1)
        b.PrependUOffsetTRelativeSlot(0, shape, 0)
        return RESHAPE_OPTIONS, b.EndObject()
    raise TFLiteFormatError(f"writer does not know operator {op.code}")


def write_model(graph: Graph, description: str = "smartbin") -> bytes:
    """Serialize a single-subgraph model. Constant tensors get their own buffers."""
    b = flatbuffers.Builder(1024)
    codes = sorted({op.code for op in graph.ops})

    buffer_offsets = []
    b.StartObject(1)  # buffer 0: the empty sentinel every model has
    buffer_offsets.append(b.EndObject())
    tensor_buffer = []
    for t in graph.tensors:
        if t.data is None:
            tensor_buffer.append(0)
            continue
        raw = np.ascontiguousarray(t.data, dtype=NUMPY_OF_TYPE[t.dtype]).tobytes()
        b.StartVector(1, len(raw), 16)  # 16-byte alignment lets kernels read in place
        b.head = b.head - len(raw)
        b.Bytes[b.head : b.head + len(raw)] = raw
        vec = b.EndVector()
        b.StartObject(1)
        b.PrependUOffsetTRelativeSlot(0, vec, 0)
        buffer_offsets.append(b.EndObject())
        tensor_buffer.append(len(buffer_offsets) - 1)

    tensor_offsets = []
    for t, buf_index in zip(graph.tensors, tensor_buffer, strict=True):
        name = b.CreateString(t.name)
        shape = _int_vector(b, t.shape)
        quant = 0
        if t.scale is not None:
            b.StartVector(4, 1, 4)
            b.PrependFloat32(float(t.scale))
            scale = b.EndVector()
            b.StartVector(8, 1, 8)
            b.PrependInt64(int(t.zero_point))
            zp = b.EndVector()
            b.StartObject(7)
            b.PrependUOffsetTRelativeSlot(2, scale, 0)
            b.PrependUOffsetTRelativeSlot(3, zp, 0)
            quant = b.EndObject()
        b.StartObject(5)
        b.PrependUOffsetTRelativeSlot(0, shape, 0)
        b.PrependInt8Slot(1, t.dtype, -1)  # -1 forces the field to be written even when 0
        b.PrependUint32Slot(2, buf_index, 0xFFFFFFFF)
        b.PrependUOffsetTRelativeSlot(3, name, 0)
        if quant:
            b.PrependUOffsetTRelativeSlot(4, quant, 0)
        tensor_offsets.append(b.EndObject())

    op_offsets = []
    for op in graph.ops:
        ins = _int_vector(b, op.inputs)
        outs = _int_vector(b, op.outputs)
        opt_type, opt = _options(b, op)
        b.StartObject(5)
        b.PrependUint32Slot(0, codes.index(op.code), 0xFFFFFFFF)
        b.PrependUOffsetTRelativeSlot(1, ins, 0)
        b.PrependUOffsetTRelativeSlot(2, outs, 0)
        b.PrependUint8Slot(3, opt_type, 0)
        b.PrependUOffsetTRelativeSlot(4, opt, 0)
        op_offsets.append(b.EndObject())

    tensors_vec = _offset_vector(b, tensor_offsets)
    inputs_vec = _int_vector(b, graph.inputs)
    outputs_vec = _int_vector(b, graph.outputs)
    ops_vec = _offset_vector(b, op_offsets)
    sg_name = b.CreateString("main")
    b.StartObject(5)
    b.PrependUOffsetTRelativeSlot(0, tensors_vec, 0)
    b.PrependUOffsetTRelativeSlot(1, inputs_vec, 0)
    b.PrependUOffsetTRelativeSlot(2, outputs_vec, 0)
    b.PrependUOffsetTRelativeSlot(3, ops_vec, 0)
    b.PrependUOffsetTRelativeSlot(4, sg_name, 0)
    subgraph = b.EndObject()

    code_offsets = []
    for code in codes:
        b.StartObject(4)
        b.PrependInt8Slot(0, min(code, 127), -1)
        b.PrependInt32Slot(2, OP_VERSION[code], 0)
        b.PrependInt32Slot(3, code, -1)
        code_offsets.append(b.EndObject())

    codes_vec = _offset_vector(b, code_offsets)
    subgraphs_vec = _offset_vector(b, [subgraph])
    buffers_vec = _offset_vector(b, buffer_offsets)
    desc = b.CreateString(description)
    b.StartObject(5)
    b.PrependUint32Slot(0, 3, 0)
    b.PrependUOffsetTRelativeSlot(1, codes_vec, 0)
    b.PrependUOffsetTRelativeSlot(2, subgraphs_vec, 0)
    b.PrependUOffsetTRelativeSlot(3, desc, 0)
    b.PrependUOffsetTRelativeSlot(4, buffers_vec, 0)
    model = b.EndObject()
    b.Finish(model, file_identifier=b"TFL3")
    return bytes(b.Output())
