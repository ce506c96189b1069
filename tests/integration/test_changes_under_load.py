"""Models changed while callers keep calling: reloads (new config, new version, broken new
version), unloads and poll mode drop no accepted request and never answer one with the
wrong model's data; sessions do not leak; cost stays conserved."""

import asyncio
import shutil
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from tests import onnx_models
from tests.conftest import wait_until
from tests.integration.test_model_control import EXPLICIT, answer, index, refused
from tests.prober import open_fds as open_files
from tests.prober import resident_bytes

CALLERS = 64
PRICE_PER_HOUR = 36.0


class Callers:
    """CALLERS concurrent callers of one model, each checking every answer against the
    version that says it answered (version N adds N), until stopped."""

    def __init__(self, url: str, model: str, callers: int = CALLERS) -> None:
        self.url, self.model, self.callers = url, model, callers
        self.answers: dict[str, int] = {}  # version -> requests it answered
        self.wrong: list[str] = []
        self.errors: list[tuple[str, str]] = []  # (status, message)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()))

    def __enter__(self) -> "Callers":
        self._thread.start()
        assert wait_until(lambda: sum(self.answers.values()) >= self.callers, timeout=30), "callers got going"
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)

    def answered(self) -> int:
        return sum(self.answers.values())

    async def _run(self) -> None:
        client = aioclient.InferenceServerClient(self.url)
        try:
            await asyncio.gather(*(self._call(client, caller) for caller in range(self.callers)))
        finally:
            await client.close()

    async def _call(self, client, caller: int) -> None:
        sent = 0
        while not self._stop.is_set():
            rows = 1 + (caller + sent) % 3
            x = (caller * 1000 + sent * 10 + np.arange(rows * 4, dtype=np.float32)).reshape(rows, 4)
            tensor = aioclient.InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            sent += 1
            try:
                result = await client.infer(self.model, [tensor])
            except InferenceServerException as err:
                self.errors.append((err.status(), err.message()))
                await asyncio.sleep(0.01)
                continue
            version = result.get_response().model_version
            if not np.array_equal(result.as_numpy("y"), x + float(version)):
                self.wrong.append(f"caller {caller} request {sent}: version {version} answered {result.as_numpy('y')}")
            self.answers[version] = self.answers.get(version, 0) + 1


def test_reloads_under_load_drop_nothing_and_mix_nothing(tmp_path, serve):
    onnx_models.write(tmp_path, "model", onnx_models.add_constant(1), "max_batch_size: 8")
    server = serve(tmp_path, *EXPLICIT, "--load-model", "model")
    client, pid = server.client(), server.process.pid
    with Callers(server.url, "model") as callers:
        for cycle in range(4):
            for size in (4, 16):  # a new configuration of the same version
                client.load_model("model", config=f'{{"max_batch_size": {size}}}')
                assert client.get_model_config("model").config.max_batch_size == size
                assert answer(client, "model") == ("1", 1.0)
            onnx_models.write(tmp_path, "model", onnx_models.add_constant(2), version=2)
            client.load_model("model")  # a new version takes over
            assert answer(client, "model") == ("2", 2.0)
            (tmp_path / "model" / "3").mkdir()
            (tmp_path / "model" / "3" / "model.onnx").write_bytes(b"broken")
            assert "failed to load" in refused(client.load_model, "model").message()
            assert answer(client, "model") == ("2", 2.0), "a broken new version changes nothing"
            shutil.rmtree(tmp_path / "model" / "3")
            shutil.rmtree(tmp_path / "model" / "2")
            client.load_model("model")  # back to version 1
            assert answer(client, "model") == ("1", 1.0)
            if cycle == 0:
                files, memory = open_files(pid), resident_bytes(pid)
        answered_during = callers.answered()
    assert callers.wrong == []
    assert callers.errors == [], f"{len(callers.errors)} requests failed during reloads: {callers.errors[:3]}"
    assert set(callers.answers) == {"1", "2"} and answered_during > 500
    assert open_files(pid) <= files + 8, "sessions closed: no file descriptors leak across reloads"
    assert resident_bytes(pid) <= memory + 64 * 2**20, "memory stays bounded across reloads"
    assert "failed" not in " ".join(line for line in server.log if "ERROR" in line and "version 3" not in line)


def test_unload_under_load_answers_what_it_accepted_and_leaves_other_models_alone(tmp_path, serve):
    onnx_models.write(tmp_path, "leaving", onnx_models.add_constant(1))
    onnx_models.write(tmp_path, "staying", onnx_models.add_constant(1))
    server = serve(tmp_path, *EXPLICIT, "--load-model", "*")
    with Callers(server.url, "leaving", 32) as leaving, Callers(server.url, "staying", 32) as staying:
        server.client().unload_model("leaving")
        time.sleep(0.2)  # answers sent before the unload returned reach the callers
        before = leaving.answered()
        time.sleep(0.5)
        assert leaving.answered() == before, "nothing is answered by an unloaded model"
    assert leaving.wrong == [] and staying.wrong == [] and staying.errors == []
    assert leaving.errors, "callers after the unload were refused"
    for status, message in leaving.errors:
        assert status in ("StatusCode.UNAVAILABLE", "StatusCode.NOT_FOUND"), (status, message)
        assert "leaving" in message and "unloaded" in message
    assert server.metric("onnxserve_requests_total", model="leaving", version="1", outcome="error") == 0


def test_cost_stays_conserved_across_loads_and_unloads(tmp_path, serve):
    onnx_models.write(tmp_path, "first", onnx_models.add_constant(1))
    onnx_models.write(tmp_path, "second", onnx_models.add_constant(1))
    server = serve(tmp_path, *EXPLICIT, "--load-model", "first", "--device-price", f"cpu={PRICE_PER_HOUR}")
    client = server.client()
    with Callers(server.url, "first", 8):
        client.load_model("second")
        with Callers(server.url, "second", 8):
            client.load_model("first", config='{"max_batch_size": 4}')
            client.unload_model("second")
        client.load_model("second")
    client.unload_model("first")
    samples = server.samples()
    models = sum(
        samples.get("onnxserve_cost_dollars_total", model=m, version="1", device="cpu") for m in ("first", "second")
    )
    idle = samples.get("onnxserve_idle_cost_dollars_total", device="cpu")
    priced = samples.get("onnxserve_device_seconds_total", device="cpu") * PRICE_PER_HOUR / 3600
    assert models > 0 and idle > 0
    assert models + idle == pytest.approx(priced, rel=1e-6)


POLL = ("--model-control-mode", "poll", "--repository-poll-secs", "0.5")


def test_poll_mode_follows_added_changed_and_removed_models_within_two_periods(tmp_path, serve):
    onnx_models.write(tmp_path, "polled", onnx_models.add_constant(1), "max_batch_size: 8")
    server = serve(tmp_path, *POLL)
    client = server.client()
    assert answer(client, "polled") == ("1", 1.0)
    assert "not allowed with --model-control-mode poll" in refused(client.load_model, "polled").message()

    def picked_up(check) -> float:
        started = time.monotonic()
        assert wait_until(check, timeout=5, interval=0.05)
        return time.monotonic() - started

    onnx_models.write(tmp_path, "polled", onnx_models.add_constant(2), version=2)
    assert picked_up(lambda: answer(client, "polled")[0] == "2") <= 1.0 + 0.5  # two periods, and a load
    (tmp_path / "polled" / "config.pbtxt").write_text("max_batch_size: 16")
    assert picked_up(lambda: client.get_model_config("polled").config.max_batch_size == 16) <= 1.5
    shutil.rmtree(tmp_path / "polled" / "2")
    assert picked_up(lambda: answer(client, "polled")[0] == "1") <= 1.5
    onnx_models.write(tmp_path, "added", onnx_models.add_constant(5))
    assert picked_up(lambda: client.is_model_ready("added")) <= 1.5
    shutil.rmtree(tmp_path / "added")
    assert picked_up(lambda: not client.is_model_ready("added")) <= 1.5
    # not ready from the moment it starts unloading; unavailable once its sessions have closed
    assert wait_until(lambda: index(client)[("added", "1")] == ("UNAVAILABLE", "unloaded"), timeout=5)


def test_poll_mode_does_not_load_a_file_still_being_written(tmp_path, serve):
    onnx_models.write(tmp_path, "growing", onnx_models.add_constant(1))
    server = serve(tmp_path, *POLL)
    client = server.client()
    content = onnx_models.add_constant(3).SerializeToString()
    target = tmp_path / "growing" / "3" / "model.onnx"
    target.parent.mkdir()
    with open(target, "wb") as handle:  # written slowly, over four poll periods
        for start in range(0, len(content), max(1, len(content) // 10)):
            handle.write(content[start : start + max(1, len(content) // 10)])
            handle.flush()
            time.sleep(0.2)
            assert answer(client, "growing") == ("1", 1.0)
    assert wait_until(lambda: answer(client, "growing")[0] == "3", timeout=5)
    assert answer(client, "growing") == ("3", 3.0)
    assert "version 3 failed to load" not in server.log_text(), "the half-written file was never tried"
