"""A stream whose client sends faster than it reads its answers: the server stops reading the
stream's next message once a window of answers waits unsent, so HTTP/2's flow control holds the
client back instead of the server's memory; once the client reads, every answer arrives, in order."""

import threading
import time

import grpc
import numpy as np

from server import protocol
from tests import onnx_models
from tests.conftest import wait_until
from tests.prober import resident_bytes

ROW_VALUES = 64 * 1024  # FP32 values: 256 KiB in, 256 KiB out per request
REQUESTS = 1200  # 300 MiB of answers, over four times the stream's byte window (64 MiB): without
# the window, the server read every request and held 300 MiB more of answers nobody read
MIB = 1 << 20


def request(index: int) -> bytes:
    message = protocol.ModelInferRequest(model_name="echo", id=str(index))
    message.inputs.add(name="input", datatype="FP32", shape=[1, ROW_VALUES])
    message.raw_input_contents.append(np.full((1, ROW_VALUES), index, np.float32).tobytes())
    return message.SerializeToString()


def test_a_stream_that_is_not_read_stops_being_read_and_loses_nothing(tmp_path, serve):
    onnx_models.write(tmp_path, "echo", onnx_models.identity("FP32", shape=("batch", ROW_VALUES)), "max_batch_size: 8")
    server = serve(tmp_path)
    channel = grpc.insecure_channel(server.url, options=[("grpc.max_receive_message_length", -1)])
    call = channel.stream_stream(
        f"/{protocol.SERVICE_NAME}/ModelStreamInfer", request_serializer=None, response_deserializer=None
    )
    sent = threading.Event()

    def requests():
        for index in range(REQUESTS):
            yield request(index)
        sent.set()

    before = resident_bytes(server.process.pid)
    answers = call(requests(), timeout=120)  # nothing read yet: grpc sends the requests meanwhile

    def served() -> float:
        return server.metric("onnxserve_requests_total", model="echo", version="1", outcome="ok")

    wait_until(lambda: served() > 0, timeout=30)
    time.sleep(2)  # the server answers what it read, then waits for the client to read
    held = served()
    grown = (resident_bytes(server.process.pid) - before) / MIB
    assert not sent.is_set() and grown < 200, (
        f"{held} of {REQUESTS} served, +{grown:.0f} MiB, while nobody read the answers"
    )
    got = [protocol.response_class("ModelStreamInfer").FromString(answer) for answer in answers]
    assert [answer.error_message for answer in got] == [""] * REQUESTS
    assert [answer.infer_response.id for answer in got] == [str(index) for index in range(REQUESTS)]
    values = [np.frombuffer(answer.infer_response.raw_output_contents[0], np.float32) for answer in got]
    assert all(value[0] == index and value[-1] == index for index, value in enumerate(values))
    assert served() == REQUESTS
    channel.close()
