"""The GPU check's step `sequence_state` (bench/gpu_check.py): sequences whose implicit state the
server keeps on the instance's device between requests (server/engine/device_state.py). Eight
sequences of the accumulator stand-in (bench/make_models.py) send twenty values each at once, so
that their requests share batches and each batch's state input is gathered on the device from
several sequences' rows; every answer must be its own sequence's running sum, and the server's log
must say the state is kept on the device. With --cpu the model runs through IO binding on the CPU,
the same path with host memory for the device."""

import threading

import numpy as np

from bench.gpu_steps import Context, Failed  # gpu_steps.SEQUENCES: the model's config
from bench.grpc_client import Client
from server import protocol

MODEL = "accumulator"
SEQUENCES, STEPS = 8, 20
KEPT = f"model '{MODEL}' version 1: sequences' implicit state kept on each instance's device"


def sequence_state(ctx: Context) -> dict:
    server = ctx.serve()
    found = {"model": MODEL, "sequences": SEQUENCES, "steps": STEPS, "wrong": [], "batch_rows": []}
    callers = [threading.Thread(target=_sequence, args=(server.url, key, found)) for key in range(1, SEQUENCES + 1)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(120)
    rows = found.pop("batch_rows")
    found["largest_batch"], found["kept_on_device"] = max(rows, default=0), KEPT in server.log_text()
    found["summary"] = (
        f"{SEQUENCES} sequences x {STEPS} requests: {len(found['wrong'])} wrong answers, batches of up to "
        f"{found['largest_batch']} sequences; state kept on the device: {found['kept_on_device']}"
    )
    if found["wrong"] or len(rows) != SEQUENCES * STEPS or not found["kept_on_device"]:
        raise Failed(found["summary"], found)
    return found


def _sequence(url: str, key: int, found: dict) -> None:
    rng, total = np.random.default_rng(key), 0
    with Client(url) as client:
        for step in range(STEPS):
            value = int(rng.integers(-50, 50))
            total += value
            try:
                response = client.call("ModelInfer", _request(key, value, step == 0, step == STEPS - 1))
            except Exception as err:  # noqa: BLE001 - a failed request is a wrong answer, recorded
                found["wrong"].append({"sequence": key, "step": step, "error": str(err)[-300:]})
                continue
            got = int(np.frombuffer(response.raw_output_contents[0], dtype=np.int32)[0])
            if got != total:
                found["wrong"].append({"sequence": key, "step": step, "got": got, "want": total})
            found["batch_rows"].append(response.parameters["onnxserve_batch_rows"].int64_param)


def _request(key: int, value: int, start: bool, end: bool):
    request = protocol.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="INPUT", datatype="INT32", shape=[1, 1])
    request.raw_input_contents.append(np.array([[value]], dtype=np.int32).tobytes())
    request.outputs.add(name="OUTPUT")
    request.parameters["sequence_id"].int64_param = key
    request.parameters["sequence_start"].bool_param = start
    request.parameters["sequence_end"].bool_param = end
    return request
