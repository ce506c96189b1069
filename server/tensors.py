"""Tensors as every part of the server names them: the datatype table (wire, numpy and onnxruntime
names of each type), tensor specs, a model version's signature, and a decoded request, which is
what a front end hands the engine. Decoding and encoding are the front end's
(server/frontend/tensor_codec.py)."""

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from server.errors import InvalidInput, shown


@dataclass(frozen=True)
class Datatype:
    wire: str  # KServe v2 datatype string
    numpy: np.dtype | None  # None for BYTES, which decodes to an object array of str
    ort: str  # onnxruntime's type string for the same tensor
    contents_field: str | None  # InferTensorContents field for typed contents; None = raw only


DATATYPES = {
    d.wire: d
    for d in (
        Datatype("BOOL", np.dtype(np.bool_), "tensor(bool)", "bool_contents"),
        Datatype("UINT8", np.dtype("<u1"), "tensor(uint8)", "uint_contents"),
        Datatype("UINT16", np.dtype("<u2"), "tensor(uint16)", "uint_contents"),
        Datatype("UINT32", np.dtype("<u4"), "tensor(uint32)", "uint_contents"),
        Datatype("UINT64", np.dtype("<u8"), "tensor(uint64)", "uint64_contents"),
        Datatype("INT8", np.dtype("<i1"), "tensor(int8)", "int_contents"),
        Datatype("INT16", np.dtype("<i2"), "tensor(int16)", "int_contents"),
        Datatype("INT32", np.dtype("<i4"), "tensor(int32)", "int_contents"),
        Datatype("INT64", np.dtype("<i8"), "tensor(int64)", "int64_contents"),
        Datatype("FP16", np.dtype("<f2"), "tensor(float16)", None),
        Datatype("FP32", np.dtype("<f4"), "tensor(float)", "fp32_contents"),
        Datatype("FP64", np.dtype("<f8"), "tensor(double)", "fp64_contents"),
        Datatype("BYTES", None, "tensor(string)", "bytes_contents"),
    )
}
DATATYPE_BY_ORT = {d.ort: d for d in DATATYPES.values()}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as callers see it: shape includes the batch dimension (-1) when the model batches."""

    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 = any size


@dataclass(frozen=True)
class Signature:
    """What a model version accepts and returns; `label` prefixes every error message."""

    model: str
    version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int  # 0 = no batch dimension
    hidden: tuple["TensorSpec", ...] = ()  # inputs the server feeds, never the caller: a sequence's controls and state

    @property
    def run_inputs(self) -> tuple["TensorSpec", ...]:
        """Every input a run of the model takes."""
        return self.inputs + self.hidden

    @property
    def label(self) -> str:
        return f"model '{self.model}' version {self.version}"

    @cached_property
    def input_specs(self) -> dict[str, TensorSpec]:
        return {spec.name: spec for spec in self.inputs}

    @cached_property
    def output_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.outputs)

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise InvalidInput(
            f"{self.label}: unknown input '{shown(name)}'; the model's inputs are {self._names(self.inputs)}"
        )

    def output(self, name: str) -> TensorSpec:
        for spec in self.outputs:
            if spec.name == name:
                return spec
        raise InvalidInput(
            f"{self.label}: unknown requested output '{shown(name)}'; the model's outputs are {self._names(self.outputs)}"
        )

    @staticmethod
    def _names(specs: Iterable[TensorSpec]) -> list[str]:
        return [s.name for s in specs]


@dataclass(frozen=True, slots=True)
class DecodedRequest:
    feeds: dict[str, np.ndarray]
    rows: int  # batch rows (1 for a model without a batch dimension)
    outputs: tuple[str, ...]  # requested output names, in the order asked


def concrete_shape(spec: TensorSpec, batch: int, variable: int) -> tuple[int, ...]:
    """The spec's shape: a variable first dimension is `batch`, the other variable ones `variable`."""
    shape = [variable if dim == -1 else dim for dim in spec.shape]
    if spec.shape and spec.shape[0] == -1:
        shape[0] = batch
    return tuple(shape)


def zeros(spec: TensorSpec, batch: int = 1, variable: int = 1) -> np.ndarray:
    """Zeros of the spec's shape: a variable first dimension is `batch`, the other variable ones `variable`."""
    shape = concrete_shape(spec, batch, variable)
    if spec.datatype == "BYTES":
        return np.full(shape, "", dtype=object)
    return np.zeros(shape, dtype=DATATYPES[spec.datatype].numpy)
