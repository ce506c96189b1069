"""Triton's system shared memory over gRPC and REST, as tritonclient's shared memory utilities use
it (NVIDIA's simple_grpc_shm_client.py, simple_http_shm_client.py and their string variants pass
the same way): regions registered, listed and unregistered;
inputs read from and outputs written into them, with no tensor bytes in the response; every bad
offset, size, name and key refused with INVALID_ARGUMENT naming it; regions kept per tenant."""

import base64
import uuid
import warnings

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient import utils
from tritonclient.utils import InferenceServerException

with warnings.catch_warnings():  # tritonclient's shared memory utilities import pkg_resources, deprecated
    warnings.simplefilter("ignore", UserWarning)
    import tritonclient.utils.shared_memory as shm

from tests import onnx_models
from tests.integration.test_frontends import OWN_CONNECTION
from tests.integration.test_tenants import KEYS, bearer, write_keys

ROW = 16 * 4  # bytes of one INT32 [1, 16] tensor
NO_CUDA = ("no CUDA device is visible", "libcudart")  # why a machine without a GPU refuses CUDA regions


@pytest.fixture
def simple(tmp_path):
    root = tmp_path / "repository"
    onnx_models.write(root, "simple", onnx_models.simple(), "max_batch_size: 8")
    return root


@pytest.fixture(params=["1", "2"], ids=["one-process", "two-front-ends"])
def launch(request, serve):
    """serve() with one process, then with two front-end processes (whose registry is the engine's)."""
    return lambda root, *flags: serve(root, "--frontends", request.param, *flags)


@pytest.fixture
def regions():
    """create(name, size) -> (handle, key) of a new POSIX region; all destroyed after the test."""
    made = []

    def create(name: str, size: int):
        key = f"/onnxserve-test-{uuid.uuid4().hex[:8]}"
        handle = shm.create_shared_memory_region(name, key, size)
        made.append(handle)
        return handle, key

    yield create
    for handle in made:
        shm.destroy_shared_memory_region(handle)


def registered_pair(client, regions, names: tuple[str, str], a, b):
    """An input region holding a then b and an output region of the same size, both registered
    through `client` (tritonclient grpc or http); (input key, output key, output handle)."""
    inputs, in_key = regions(names[0], 2 * ROW)
    outputs, out_key = regions(names[1], 2 * ROW)
    shm.set_shared_memory_region(inputs, [a])
    shm.set_shared_memory_region(inputs, [b], offset=ROW)
    client.register_system_shared_memory(names[0], in_key, 2 * ROW)
    client.register_system_shared_memory(names[1], out_key, 2 * ROW)
    return in_key, out_key, outputs


def shm_input(name: str, region: str, offset: int = 0, size: int = ROW):
    tensor = grpcclient.InferInput(name, [1, 16], "INT32")
    tensor.set_shared_memory(region, size, offset=offset)
    return tensor


def shm_output(name: str, region: str, offset: int = 0, size: int = ROW):
    output = grpcclient.InferRequestedOutput(name)
    output.set_shared_memory(region, size, offset=offset)
    return output


def refused(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as error:
        call()
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT", error.value
    return error.value


def test_inputs_and_outputs_cross_in_shared_memory_and_the_response_carries_no_tensor_bytes(simple, regions, launch):
    server = launch(simple)
    client = server.client()
    assert "system_shared_memory" in client.get_server_metadata().extensions
    assert (
        "system_shared_memory" in httpclient.InferenceServerClient(server.http_url).get_server_metadata()["extensions"]
    )
    a, b = np.arange(16, dtype=np.int32), np.full(16, 3, dtype=np.int32)
    in_key, out_key, outputs = registered_pair(client, regions, ("in", "out"), a, b)
    listed = client.get_system_shared_memory_status(as_json=True)["regions"]
    assert {name: (r["key"], int(r["byte_size"])) for name, r in listed.items()} == {
        "in": (in_key, 2 * ROW),
        "out": (out_key, 2 * ROW),
    }

    result = client.infer(
        "simple",
        [shm_input("INPUT0", "in"), shm_input("INPUT1", "in", offset=ROW)],
        outputs=[shm_output("OUTPUT0", "out"), shm_output("OUTPUT1", "out", offset=ROW)],
    )
    assert not result.get_response().raw_output_contents, "the outputs are in the region, not the message"
    assert list(result.get_output("OUTPUT0").shape) == [1, 16]
    np.testing.assert_array_equal(shm.get_contents_as_numpy(outputs, np.int32, [1, 16]).ravel(), a + b)
    np.testing.assert_array_equal(shm.get_contents_as_numpy(outputs, np.int32, [1, 16], offset=ROW).ravel(), a - b)

    client.unregister_system_shared_memory("in")
    assert list(client.get_system_shared_memory_status(as_json=True)["regions"]) == ["out"]
    message = refused(lambda: client.infer("simple", [shm_input("INPUT0", "in"), shm_input("INPUT1", "in", ROW)]))
    assert "unable to find system shared memory region: 'in'" in message.message()
    client.unregister_system_shared_memory()
    assert not client.get_system_shared_memory_status(as_json=True).get("regions")


def test_shared_memory_mixes_with_tensors_in_the_message(simple, regions, serve):
    client = serve(simple).client()
    a, b = np.arange(16, dtype=np.int32).reshape(1, 16), np.ones((1, 16), dtype=np.int32)
    handle, key = regions("mixed", 2 * ROW)
    shm.set_shared_memory_region(handle, [b])
    client.register_system_shared_memory("mixed", key, 2 * ROW)
    plain = grpcclient.InferInput("INPUT0", [1, 16], "INT32")
    plain.set_data_from_numpy(a)
    result = client.infer(
        "simple",
        [plain, shm_input("INPUT1", "mixed")],
        outputs=[grpcclient.InferRequestedOutput("OUTPUT0"), shm_output("OUTPUT1", "mixed", offset=ROW)],
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.int32, [1, 16], offset=ROW), a - b)


def test_bad_regions_offsets_and_sizes_are_refused_naming_them(simple, regions, launch):
    client = launch(simple).client()
    handle, key = regions("small", 2 * ROW)
    assert (
        "key '/no-such-key'"
        in refused(lambda: client.register_system_shared_memory("x", "/no-such-key", ROW)).message()
    )
    assert (
        "does not fit" in refused(lambda: client.register_system_shared_memory("x", key, ROW, offset=2 * ROW)).message()
    )
    client.register_system_shared_memory("small", key, 2 * ROW)
    assert "registered already" in refused(lambda: client.register_system_shared_memory("small", key, ROW)).message()
    beyond = refused(
        lambda: client.infer("simple", [shm_input("INPUT0", "small", ROW + 4), shm_input("INPUT1", "small")])
    )
    assert "'small' holds 128 bytes; offset 68 + size 64 does not fit" in beyond.message()
    wrong_size = refused(
        lambda: client.infer("simple", [shm_input("INPUT0", "small", size=60), shm_input("INPUT1", "small")])
    )
    assert "shared_memory_byte_size 60" in wrong_size.message() and "needs 64" in wrong_size.message()
    unknown = refused(lambda: client.infer("simple", [shm_input("INPUT0", "other"), shm_input("INPUT1", "small")]))
    assert "'other'" in unknown.message()
    too_small = refused(
        lambda: client.infer(
            "simple",
            [shm_input("INPUT0", "small"), shm_input("INPUT1", "small")],
            outputs=[shm_output("OUTPUT0", "small", size=32)],
        )
    )
    assert "64 bytes do not fit" in too_small.message() and "'small'" in too_small.message()
    x = np.arange(16, dtype=np.int32).reshape(1, 16)
    plain = [grpcclient.InferInput(name, [1, 16], "INT32") for name in ("INPUT0", "INPUT1")]
    for tensor in plain:
        tensor.set_data_from_numpy(x)
    np.testing.assert_array_equal(client.infer("simple", plain).as_numpy("OUTPUT0"), 2 * x)  # still serving


def test_a_tenants_regions_are_its_own(simple, regions, launch, tmp_path):
    keys = write_keys(tmp_path / "keys.json", KEYS)
    client = launch(simple, "--api-keys", str(keys)).client()
    handle, key = regions("a", 2 * ROW)
    shm.set_shared_memory_region(handle, [np.ones(32, dtype=np.int32)])
    client.register_system_shared_memory("a", key, 2 * ROW, headers=bearer("key-of-a"))
    assert not client.get_system_shared_memory_status(headers=bearer("key-of-b"), as_json=True).get("regions")
    request = [shm_input("INPUT0", "a"), shm_input("INPUT1", "a", ROW)]
    assert "'a'" in refused(lambda: client.infer("simple", request, headers=bearer("key-of-b"))).message()
    client.unregister_system_shared_memory("a", headers=bearer("key-of-b"))  # not B's to remove
    result = client.infer("simple", request, headers=bearer("key-of-a"))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.full((1, 16), 2, dtype=np.int32))


def test_cuda_shared_memory_without_a_gpu_says_why_it_cannot_register(simple, launch):
    client = launch(simple).client()
    client.unregister_cuda_shared_memory()  # nothing registered: nothing to do, as tritonclient's examples expect
    assert not client.get_cuda_shared_memory_status(as_json=True).get("regions")
    short = refused(lambda: client.register_cuda_shared_memory("gpu", base64.b64encode(b"a cudaIpc handle"), 0, 64))
    assert "raw_handle is 16 bytes; a cudaIpcMemHandle_t is 64" in short.message()
    message = refused(lambda: client.register_cuda_shared_memory("gpu", base64.b64encode(bytes(64)), 0, 64)).message()
    assert "unable to register CUDA shared memory region 'gpu'" in message
    assert any(reason in message for reason in NO_CUDA), message
    assert not client.get_cuda_shared_memory_status(as_json=True).get("regions")


def test_a_streams_requests_read_and_write_shared_memory_too(simple, regions, launch):
    client = launch(simple).client()
    handle, key = regions("streamed", 4 * ROW)
    shm.set_shared_memory_region(handle, [np.arange(32, dtype=np.int32)])
    client.register_system_shared_memory("streamed", key, 4 * ROW)
    answers = []
    client.start_stream(lambda result, error: answers.append(error or result))
    inputs = [shm_input("INPUT0", "streamed"), shm_input("INPUT1", "streamed", ROW)]
    client.async_stream_infer("simple", inputs, request_id="plain")
    client.async_stream_infer(
        "simple", inputs, outputs=[shm_output("OUTPUT0", "streamed", 2 * ROW)], request_id="placed"
    )
    client.stop_stream()
    assert len(answers) == 2
    by_id = {answer.get_response().id: answer for answer in answers}
    expected = np.arange(16, dtype=np.int32) + np.arange(16, 32, dtype=np.int32)
    np.testing.assert_array_equal(by_id["plain"].as_numpy("OUTPUT0").ravel(), expected)  # inputs from the region
    assert not by_id["placed"].get_response().raw_output_contents
    np.testing.assert_array_equal(
        shm.get_contents_as_numpy(handle, np.int32, [1, 16], offset=2 * ROW).ravel(), expected
    )


def test_a_region_named_but_never_registered_is_refused_not_ignored(simple, serve):
    client = serve(simple).client()
    x = np.arange(16, dtype=np.int32).reshape(1, 16)
    plain = [grpcclient.InferInput(name, [1, 16], "INT32") for name in ("INPUT0", "INPUT1")]
    for tensor in plain:
        tensor.set_data_from_numpy(x)
    message = refused(lambda: client.infer("simple", plain, outputs=[shm_output("OUTPUT0", "nowhere")]))
    assert "unable to find system shared memory region: 'nowhere'" in message.message()
    message = refused(lambda: client.infer("simple", [shm_input("INPUT0", "nowhere"), plain[1]]))
    assert "'nowhere'" in message.message()


def test_bytes_tensors_cross_in_shared_memory_in_the_wires_form(tmp_path, regions, launch):
    """BYTES inputs and outputs length-prefixed, as tritonclient serializes them (NVIDIA's
    simple_grpc_shm_string_client.py does the same)."""
    root = tmp_path / "repository"
    onnx_models.write(root, "simple_string", onnx_models.simple_string(), "max_batch_size: 8")
    client = launch(root).client()
    a = np.array([str(n).encode() for n in range(16)], dtype=np.object_).reshape(1, 16)
    b = np.array([b"1"] * 16, dtype=np.object_).reshape(1, 16)
    wire_a, wire_b = utils.serialize_byte_tensor(a), utils.serialize_byte_tensor(b)
    size_a, size_b = utils.serialized_byte_size(wire_a), utils.serialized_byte_size(wire_b)
    inputs, in_key = regions("strings-in", size_a + size_b)
    outputs, out_key = regions("strings-out", 2 * 256)
    shm.set_shared_memory_region(inputs, [wire_a])
    shm.set_shared_memory_region(inputs, [wire_b], offset=size_a)
    client.register_system_shared_memory("strings-in", in_key, size_a + size_b)
    client.register_system_shared_memory("strings-out", out_key, 2 * 256)
    tensors = [grpcclient.InferInput("INPUT0", [1, 16], "BYTES"), grpcclient.InferInput("INPUT1", [1, 16], "BYTES")]
    tensors[0].set_shared_memory("strings-in", size_a)
    tensors[1].set_shared_memory("strings-in", size_b, offset=size_a)
    result = client.infer(
        "simple_string",
        tensors,
        outputs=[shm_output("OUTPUT0", "strings-out", size=256), shm_output("OUTPUT1", "strings-out", 256, 256)],
    )
    assert list(result.get_output("OUTPUT1").shape) == [1, 16]
    sums = shm.get_contents_as_numpy(outputs, np.object_, [1, 16])
    differences = shm.get_contents_as_numpy(outputs, np.object_, [1, 16], offset=256)
    assert [int(value) for value in sums.ravel()] == [n + 1 for n in range(16)]
    assert [int(value) for value in differences.ravel()] == [n - 1 for n in range(16)]


def test_over_rest_the_same_regions_serve_as_tritonclient_http_uses_them(simple, regions, launch):
    server = launch(simple)
    client = httpclient.InferenceServerClient(server.http_url)
    client.unregister_cuda_shared_memory()
    a, b = np.arange(16, dtype=np.int32), np.full(16, 5, dtype=np.int32)
    _, _, outputs = registered_pair(client, regions, ("rest-in", "rest-out"), a, b)
    assert {r["name"]: r["byte_size"] for r in client.get_system_shared_memory_status()} == {
        "rest-in": 2 * ROW,
        "rest-out": 2 * ROW,
    }
    tensors = [httpclient.InferInput(name, [1, 16], "INT32") for name in ("INPUT0", "INPUT1")]
    tensors[0].set_shared_memory("rest-in", ROW)
    tensors[1].set_shared_memory("rest-in", ROW, offset=ROW)
    wanted = [httpclient.InferRequestedOutput(name, binary_data=True) for name in ("OUTPUT0", "OUTPUT1")]
    wanted[0].set_shared_memory("rest-out", ROW)
    wanted[1].set_shared_memory("rest-out", ROW, offset=ROW)
    result = client.infer("simple", tensors, outputs=wanted)
    assert result.get_output("OUTPUT0")["shape"] == [1, 16] and "data" not in result.get_output("OUTPUT0")
    np.testing.assert_array_equal(shm.get_contents_as_numpy(outputs, np.int32, [1, 16]).ravel(), a + b)
    np.testing.assert_array_equal(shm.get_contents_as_numpy(outputs, np.int32, [1, 16], offset=ROW).ravel(), a - b)

    tensors[1].set_shared_memory("rest-in", ROW, offset=ROW + 4)
    with pytest.raises(InferenceServerException) as beyond:
        client.infer("simple", tensors)
    assert beyond.value.status() == "400" and "offset 68 + size 64 does not fit" in beyond.value.message()
    client.unregister_system_shared_memory("rest-in")
    assert [r["name"] for r in client.get_system_shared_memory_status()] == ["rest-out"]
    with pytest.raises(InferenceServerException, match="unable to register CUDA shared memory region 'gpu'") as error:
        client.register_cuda_shared_memory("gpu", base64.b64encode(bytes(64)), 0, 64)
    assert error.value.status() == "400" and any(reason in error.value.message() for reason in NO_CUDA)
    client.close()


def test_with_front_end_processes_a_region_registered_through_one_serves_through_every_one(simple, regions, serve):
    """Each new connection lands on either front end: a region registered through one is read and
    written through both, and once unregistered through one, no front end uses it."""
    server = serve(simple, "--frontends", "2")
    a, b = np.arange(16, dtype=np.int32), np.full(16, 2, dtype=np.int32)
    _, _, outputs = registered_pair(server.client(), regions, ("in", "out"), a, b)
    request = [shm_input("INPUT0", "in"), shm_input("INPUT1", "in", ROW)]
    clients = [grpcclient.InferenceServerClient(server.url, channel_args=OWN_CONNECTION) for _ in range(12)]
    answered_by = set()
    for client in clients:
        result = client.infer("simple", request, outputs=[shm_output("OUTPUT0", "out")])
        answered_by.add(result.get_response().parameters["onnxserve_frontend"].int64_param)
        np.testing.assert_array_equal(shm.get_contents_as_numpy(outputs, np.int32, [1, 16]).ravel(), a + b)
    assert answered_by == {1, 2}

    clients[0].unregister_system_shared_memory("in")
    for client in clients:
        message = refused(lambda: client.infer("simple", request)).message()  # noqa: B023
        assert "unable to find system shared memory region: 'in'" in message


def test_big_outputs_are_written_into_their_regions_in_a_codec_thread(tmp_path, regions, serve):
    """Outputs past the offload weight (a 2 MiB tensor) are written into shared memory off the event
    loop, with the response's encoding: over unary gRPC, a stream and REST alike."""
    width = 1 << 19  # FP32 [1, 524288]: 2 MiB a row
    onnx_models.write(tmp_path, "wide", onnx_models.identity("FP32", ("batch", width)), "max_batch_size: 4")
    server = serve(tmp_path)
    client, size = server.client(), 4 * width
    handle, key = regions("wide", 4 * size)
    values = np.random.default_rng(5).standard_normal((1, width), dtype=np.float32)
    shm.set_shared_memory_region(handle, [values])
    client.register_system_shared_memory("wide", key, 4 * size)

    def wide_input(module):
        tensor = module.InferInput("input", [1, width], "FP32")
        tensor.set_shared_memory("wide", size)
        return tensor

    def wide_output(module, slot: int):
        output = (
            module.InferRequestedOutput("output", binary_data=True)
            if module is httpclient
            else module.InferRequestedOutput("output")
        )
        output.set_shared_memory("wide", size, offset=slot * size)
        return output

    client.infer("wide", [wide_input(grpcclient)], outputs=[wide_output(grpcclient, 1)])
    answers = []
    client.start_stream(lambda result, error: answers.append(error or result))
    client.async_stream_infer("wide", [wide_input(grpcclient)], outputs=[wide_output(grpcclient, 2)])
    client.stop_stream()
    rest = httpclient.InferenceServerClient(server.http_url)
    rest.infer("wide", [wide_input(httpclient)], outputs=[wide_output(httpclient, 3)])
    assert len(answers) == 1 and not answers[0].get_response().raw_output_contents, answers
    for slot in (1, 2, 3):
        placed = shm.get_contents_as_numpy(handle, np.float32, [1, width], offset=slot * size)
        np.testing.assert_array_equal(placed, values, err_msg=f"slot {slot}")
