"""The protobuf wire format of a big ModelInferRequest, read by hand in a codec thread before
protobuf parses it (grpc_codec.parse_request): its raw contents found as views of the wire bytes,
and every field, tensor, BYTES element and typed value counted against its bound first, so that
what a request can make protobuf spend is bounded before protobuf starts."""

import numpy as np
from google.protobuf.message import DecodeError

from server.errors import InvalidInput, shown
from server.frontend.request_limits import MAX_REQUEST_RANK
from server.tensors import DATATYPES

# Wire tags (field number << 3 | wire type; 2: length-delimited, 0: varint) the codec reads itself.
INPUT_TAG = 5 << 3 | 2  # ModelInferRequest.inputs = 5
OUTPUT_TAG = 6 << 3 | 2  # ModelInferRequest.outputs = 6
RAW_INPUT_TAG = 7 << 3 | 2  # ModelInferRequest.raw_input_contents = 7
SHAPE_PACKED_TAG, SHAPE_TAG = 3 << 3 | 2, 3 << 3 | 0  # InferInputTensor.shape = 3, packed or not
CONTENTS_TAG = 5 << 3 | 2  # InferInputTensor.contents = 5
NAME_TAG, DATATYPE_TAG = (
    1 << 3 | 2,
    2 << 3 | 2,
)  # ModelInferRequest.model_name and InferInputTensor.name = 1; .datatype = 2
# InferTensorContents' numeric fields by number: (name, the wire type of one unpacked value, the
# bytes of a packed value; 0: a varint, one of whose bytes, its last, is below 0x80).
TYPED_FIELDS = {
    1: ("bool_contents", 0, 0),
    2: ("int_contents", 0, 0),
    3: ("int64_contents", 0, 0),
    4: ("uint_contents", 0, 0),
    5: ("uint64_contents", 0, 0),
    6: ("fp32_contents", 5, 4),
    7: ("fp64_contents", 1, 8),
}
BYTES_CONTENTS_TAG = 8 << 3 | 2  # InferTensorContents.bytes_contents = 8: one byte, 0x42, before each entry
CHUNK = 1 << 20  # bytes of packed varints counted at once (a bool a byte, for np.count_nonzero)
# Fields of a big message walked in a codec thread, at every depth together: the request's names,
# id and parameters, its inputs, outputs and raw contents, and each tensor's own fields. A model of
# a thousand inputs needs ~7000; at ~1 us a field, a message of more is refused within ~15 ms.
MAX_FIELDS = 1 << 14
# Top-level fields walked on the event loop (~0.25 ms at most) to find a big message's raw contents;
# a message of more goes to a codec thread. A request has a few, and two per input.
LOOP_FIELDS = 256


class OverBudget(Exception):
    """The walk ran out of fields."""


def declared_elements(shape) -> int | None:
    """The element count a shape declares, as far as weighing goes (decode_request checks it)."""
    if len(shape) > MAX_REQUEST_RANK:
        return None
    count = 1
    for dim in shape:
        count *= max(dim, 0)
    return count


class Walk:
    """A message's fields, walked as protobuf reads them, every field at any depth spent from one
    budget: the work done before a message is refused is bounded, whatever its size or shape.

    On the way, what upb would spend memory on before any check could run: many fields (a flood
    of empty `outputs`, or of a tensor's `parameters`, costs upb ~40 bytes for each 2 on the
    wire), an input's rank (a packed shape of 100M dims is 800 MB in the arena and 3.6 GB as a
    tuple of Python ints), and typed BYTES elements (an empty one is 2 bytes on the wire and ~30
    in the arena, before the shape can say how many there should be)."""

    def __init__(self, data: bytes, budget: int) -> None:
        self.data, self.left = data, budget
        self.model = (0, 0)  # the model name, as (start, end) in data
        # each input's typed contents: its name, datatype and declared element count, and the
        # contents' (start, end) in data
        self.typed: list[tuple[str, str, int, tuple[int, int]]] = []

    def split(self, check_tensors: bool) -> tuple[list[memoryview], list[memoryview]]:
        """(every top-level field but raw_input_contents, in parts; the raw_input_contents in
        order). `check_tensors`: walk each input and output too (their fields, rank and contents)."""
        view = memoryview(self.data)
        rest: list[memoryview] = []
        raw: list[memoryview] = []
        kept = 0  # rest holds data[kept:field] once a raw field ends the run
        for tag, field, start, end in self.fields(0, len(self.data)):
            if tag == RAW_INPUT_TAG:
                rest.append(view[kept:field])
                raw.append(view[start:end])
                kept = end
            elif tag == NAME_TAG:
                self.model = (start, end)
            elif check_tensors and tag in (INPUT_TAG, OUTPUT_TAG):
                self._check_tensor(start, end, tag == INPUT_TAG)
        rest.append(view[kept:])
        return rest, raw

    def _check_tensor(self, start: int, end: int, is_input: bool) -> None:
        """Refuse an input whose shape has more than MAX_REQUEST_RANK dims; note its contents."""
        dims = packed = 0
        name = datatype = (0, 0)
        shape: list[tuple[int, int]] = []  # the shape's fields, packed or not, as (start, end) in data
        contents: list[tuple[int, int]] = []
        for tag, _, value_start, value_end in self.fields(start, end):
            if not is_input:  # a requested output: its fields are only counted
                continue
            if tag == SHAPE_PACKED_TAG:
                packed += value_end - value_start
                shape.append((value_start, value_end))
            elif tag == SHAPE_TAG:
                dims += 1
                shape.append((value_start, value_end))
            elif tag == CONTENTS_TAG:
                contents.append((value_start, value_end))
            elif tag == NAME_TAG:
                name = (value_start, value_end)
            elif tag == DATATYPE_TAG:
                datatype = (value_start, value_end)
            if dims + -(-packed // 10) > MAX_REQUEST_RANK:  # a packed dim takes 1 to 10 bytes
                raise InvalidInput(
                    f"an input's shape has more than {MAX_REQUEST_RANK} dims; models have at most {MAX_REQUEST_RANK}"
                )
        if contents:
            declared = 1  # the rank is bounded now: the dims can be read
            for dim in (dim for span in shape for dim in _varints(self.data, *span)):
                declared = min(declared * (dim if dim < 1 << 63 else 0), 1 << 40)  # a negative int64 counts as 0
            self.typed += [(self._text(name), self._text(datatype), declared, span) for span in contents]

    def check_bytes_contents(self, most: int) -> None:
        """Refuse more than `most` bytes_contents entries in all the inputs together. Each entry's
        tag is a 0x42 byte, so their count is at most the 0x42 bytes in the contents, counted at C
        speed; only when that bound is past `most` are the entries counted one by one."""
        if sum(self.data.count(BYTES_CONTENTS_TAG, start, end) for *_, (start, end) in self.typed) <= most:
            return
        count = 0
        for *_, (start, end) in self.typed:
            count += self._bytes_entries(start, end, most - count)
            if count > most:
                raise InvalidInput(
                    f"the request has more than {most} BYTES elements in bytes_contents; at most {most} per request "
                    "(--max-bytes-elements)"
                )

    def check_typed_contents(self, most: int) -> None:
        """Refuse, before protobuf parses them, typed numeric contents past what the input's shape
        declares (for a numeric datatype) or past `most` in all the inputs together. A varint
        value may be one byte on the wire and 8 in protobuf's arena: 256 MiB
        of them declared as one element were 2 GiB parsed before decode_request counted them. A
        packed field is counted at C speed (the bytes below 0x80 of its varints, or its length
        over the width of its values); unpacked values are fields, spent from the walk's budget."""
        total, inputs = 0, {}  # inputs: name -> (its values so far, their count by field)
        numeric, other = [], []  # numeric inputs' contents; BYTES and FP16 ones', bounded by the cap only
        for name, datatype, declared, span in self.typed:
            wire = DATATYPES.get(datatype)
            if wire is not None and wire.numpy is not None and wire.contents_field:
                numeric.append((name, declared, span))
            else:
                other.append((name, None, span))
        for name, expected, (start, end) in numeric:  # most often one packed field each: a step
            total = self._count_input(name, expected, start, end, most, total, inputs)
        # A typed BYTES request's entries would each be a step: first a bound, at C speed, on the
        # values they may hide (a varint ends in a byte below 0x80; a fixed value takes 4 bytes or
        # 8), and the entries walked only when it is past the cap.
        if total + sum(self._upper_bound(start, end) for _, _, (start, end) in other) <= most:
            return
        for name, expected, (start, end) in other:
            total = self._count_input(name, expected, start, end, most, total, inputs)

    def _count_input(
        self, name: str, expected: int | None, start: int, end: int, most: int, total: int, inputs: dict
    ) -> int:
        """`total` plus the values of input `name`'s contents data[start:end], refusing more than it
        `expected` (None: any number) or more than `most` in all."""
        before, counts = inputs.get(name, (0, {}))
        left = most - total if expected is None else min(most - total, expected - before)
        found, stopped = self._typed_values(start, end, left, counts)
        inputs[name] = (before + found, counts)
        total += found
        where = f"model '{shown(self._text(self.model))}': input '{shown(name)}'"
        if expected is not None and before + found > expected:
            fields = ", ".join(f"{field}: {count}" for field, count in counts.items())
            more = " or more" if stopped else ""
            raise InvalidInput(
                f"{where}: {before + found}{more} typed values ({fields}); expected {expected} for its shape"
            )
        if total > most:
            raise InvalidInput(
                f"{where}: the request has more than {most} typed values; at most {most} per request "
                "(--max-typed-elements): send big tensors as raw_input_contents"
            )
        return total

    def _upper_bound(self, start: int, end: int) -> int:
        """At least the numeric values in contents data[start:end], counted at C speed."""
        return self._below_0x80(start, end) + (end - start) // 4

    def _below_0x80(self, start: int, end: int) -> int:
        """The bytes below 0x80 in data[start:end], counted a MiB at a time."""
        return sum(
            int(np.count_nonzero(np.frombuffer(self.data, np.uint8, min(CHUNK, end - at), at) < 0x80))
            for at in range(start, end, CHUNK)
        )

    def _text(self, span: tuple[int, int]) -> str:
        return self.data[span[0] : span[1]].decode(errors="replace")

    def _typed_values(self, start: int, end: int, most: int, counts: dict[str, int]) -> tuple[int, bool]:
        """(the numeric values in InferTensorContents data[start:end], counted field by field into
        `counts`, up to past `most`; whether the count stopped there, short of the end).
        bytes_contents entries are skipped (check_bytes_contents counted them), other fields
        spent from the budget."""
        data, total, offset = self.data, 0, start
        while offset < end and total <= most:
            if data[offset] == BYTES_CONTENTS_TAG and offset + 1 < end and data[offset + 1] < 0x80:
                offset += 2 + data[offset + 1]  # a short bytes_contents entry, in fewest steps
                continue
            tag, after = _read_varint(data, offset)
            value_start, offset = self._value(tag, after, end)
            typed = TYPED_FIELDS.get(tag >> 3)
            if typed is None or tag & 7 not in (2, typed[1]):  # protobuf keeps a wrong wire type as unknown bytes
                if tag != BYTES_CONTENTS_TAG:
                    self._spend()
                continue
            field, _, width = typed
            if tag & 7 != 2:  # one value, unpacked
                self._spend()
                found = 1
            elif width:
                found = (offset - value_start) // width
            else:  # packed varints: each ends in its one byte below 0x80
                found = self._below_0x80(value_start, offset)
            counts[field] = counts.get(field, 0) + found
            total += found
        if offset > end:
            raise DecodeError(f"a field at byte {offset} runs past its message")
        return total, offset < end

    def _bytes_entries(self, start: int, end: int, most: int) -> int:
        """The bytes_contents entries in InferTensorContents data[start:end], up to one past `most`
        (~0.1 us each); its other fields are spent from the budget."""
        data, count, offset = self.data, 0, start
        while offset < end and count <= most:
            if data[offset] == BYTES_CONTENTS_TAG and offset + 1 < end and data[offset + 1] < 0x80:
                count += 1  # an entry of under 128 bytes, the case that costs memory: in fewest steps
                offset += 2 + data[offset + 1]
                continue
            tag, after = _read_varint(data, offset)
            if tag == BYTES_CONTENTS_TAG:
                count += 1
            else:
                self._spend()
            offset = self._value(tag, after, end)[1]
        if offset > end:
            raise DecodeError(f"a field at byte {offset} runs past its message")
        return count

    def fields(self, start: int, end: int):
        """(tag, field start, value start, value end) of each protobuf field in data[start:end]."""
        offset = start
        while offset < end:
            self._spend()
            tag, after = _read_varint(self.data, offset)
            value_start, value_end = self._value(tag, after, end)
            yield tag, offset, value_start, value_end
            offset = value_end

    def _spend(self) -> None:
        if not self.left:
            raise OverBudget
        self.left -= 1

    def _value(self, tag: int, offset: int, end: int) -> tuple[int, int]:
        """(start, end) of the value of a field whose tag ends before `offset`."""
        wire = tag & 7
        if wire == 2:
            length, start = _read_varint(self.data, offset)
            stop = start + length
        elif wire == 0:
            start, stop = offset, _read_varint(self.data, offset)[1]
        elif wire in (1, 5):
            start, stop = offset, offset + (8 if wire == 1 else 4)
        elif wire == 3:
            start, stop = offset, self._group_end(tag >> 3, offset, end)
        else:  # 4, an end of group with none open; 6 and 7 do not exist
            raise DecodeError(f"wire type {wire} at byte {offset}")
        if stop > end:
            raise DecodeError(f"a field at byte {offset} runs past its message")
        return start, stop

    def _group_end(self, number: int, offset: int, end: int) -> int:
        """The offset after the group of field `number` whose fields start at `offset`. Groups are
        proto2's, unknown to this proto3 message: protobuf keeps one (whatever its field number) as
        unknown bytes, so it is skipped here as protobuf skips it, nested groups and all."""
        open_groups = [number]  # a list, not recursion: the budget, not the stack, bounds the depth
        while open_groups:
            if offset >= end:
                raise DecodeError(f"a group at byte {offset} does not end")
            self._spend()
            tag, offset = _read_varint(self.data, offset)
            if tag & 7 == 4:
                if open_groups.pop() != tag >> 3:
                    raise DecodeError(f"a group's end at byte {offset} does not match its start")
            elif tag & 7 == 3:
                open_groups.append(tag >> 3)
            else:
                offset = self._value(tag, offset, end)[1]
        return offset


def _read_varint(data: bytes, offset: int) -> tuple[int, int]:
    """(value, offset after it) of the varint at `offset`."""
    value = shift = 0
    for index in range(offset, min(offset + 10, len(data))):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, index + 1
        shift += 7
    raise DecodeError(f"a varint at byte {offset} does not end")


def _varints(data: bytes, start: int, end: int) -> list[int]:
    """The varints of a packed field data[start:end] (a shape's: at most MAX_REQUEST_RANK)."""
    values, offset = [], start
    while offset < end:
        value, offset = _read_varint(data, offset)
        values.append(value)
    return values
