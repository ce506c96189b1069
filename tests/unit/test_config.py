"""Settings from flags and env, and config.pbtxt validation, without a server."""

import asyncio
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import grpc
import pytest

from server.config import ServerSettings, parse_server_settings
from server.config_checks import MAX_GRPC_IDLE_SECS
from server.errors import ConfigError
from server.frontend.process_limits import grpc_options
from server.frontends import frontend_count
from server.models.model_config import WarmupInput, load_model_settings, settings_from_json

ROOT = Path(__file__).resolve().parents[2]


def test_flags_win_over_environment_and_defaults(tmp_path):
    env = {"ONNXSERVE_GRPC_PORT": "9001", "ONNXSERVE_METRICS_PORT": "9002", "ONNXSERVE_STRICT_READINESS": "false"}
    settings = parse_server_settings(["--model-repository", str(tmp_path), "--grpc-port", "7001"], env)
    assert (settings.grpc_port, settings.metrics_port, settings.strict_readiness) == (7001, 9002, False)
    assert settings.grpc_max_message_bytes >= 256 * 1024 * 1024


def test_device_prices_say_where_they_came_from(tmp_path):
    repo = ["--model-repository", str(tmp_path)]
    env = {"ONNXSERVE_DEVICE_PRICE": "cpu=0.2, cuda:0=4.1"}
    from_env = parse_server_settings(repo, env).device_price
    assert [(p.device, p.dollars_per_hour, p.source) for p in from_env] == [("cpu", 0.2, "env"), ("cuda:0", 4.1, "env")]
    from_flags = parse_server_settings([*repo, "--device-price", "CUDA:1=2"], env).device_price
    assert [(p.device, p.dollars_per_hour, p.source) for p in from_flags] == [("cuda:1", 2.0, "flag")]


@pytest.mark.parametrize(
    "argv, env, message",
    [
        (["--grpc-port", "70000"], {}, "--grpc-port: 70000"),
        ([], {"ONNXSERVE_METRICS_PORT": "many"}, "ONNXSERVE_METRICS_PORT"),
        (["--model-repository", "/no/such/dir"], {}, "--model-repository: /no/such/dir"),
        (["--log-level", "LOUD"], {}, "--log-level"),
        (["--device-price", "gpu0=4"], {}, "--device-price: 'gpu0=4'"),
        (["--device-price", "cpu=-1"], {}, "--device-price: 'cpu=-1'"),
        (["--device-price", "cpu=1", "--device-price", "cpu=2"], {}, "priced twice"),
        ([], {"ONNXSERVE_DEVICE_PRICE": "cuda:0=cheap"}, "ONNXSERVE_DEVICE_PRICE: 'cuda:0=cheap'"),
        (["--model-control-mode", "auto"], {}, "--model-control-mode: 'auto'"),
        (
            ["--tensorrt-cache-dir", "/no/such/cache"],
            {},
            "--tensorrt-cache-dir: /no/such/cache is not a writable directory",
        ),
        (["--http-port", "-2"], {}, "--http-port: -2"),
        (["--frontends", "-1"], {}, "--frontends: -1 is negative"),
        ([], {"ONNXSERVE_FRONTENDS": "many"}, "ONNXSERVE_FRONTENDS: 'many' is neither a whole number nor 'auto'"),
        (["--frontends", "257"], {}, "--frontends"),
        (["--repository-poll-secs", "0"], {}, "--repository-poll-secs: 0"),
        (["--load-model", "mlp"], {}, "--load-model: \\['mlp'\\] needs --model-control-mode explicit"),
        (["--grpc-restricted-protocol", "model-repository"], {}, "GROUP\\[,GROUP...\\]:HEADER=VALUE"),
        (["--grpc-restricted-protocol", "admin:key=value"], {}, "'admin:key=value'"),
        (["--grpc-restricted-protocol", "statistics:key="], {}, "'statistics:key='"),
        (
            ["--grpc-restricted-protocol", "statistics:a=1", "--grpc-restricted-protocol", "statistics:b=2"],
            {},
            "restricted twice",
        ),
    ],
)
def test_bad_settings_name_the_flag(tmp_path, argv, env, message):
    if "--model-repository" not in argv:
        argv = argv + ["--model-repository", str(tmp_path)]
    with pytest.raises(ConfigError, match=message):
        parse_server_settings(argv, env)


def test_model_control_flags_and_their_environment(tmp_path):
    repo = ["--model-repository", str(tmp_path)]
    env = {
        "ONNXSERVE_MODEL_CONTROL_MODE": "explicit",
        "ONNXSERVE_LOAD_MODEL": "mlp, add_sub",
        "ONNXSERVE_GRPC_RESTRICTED_PROTOCOL": "model-repository,statistics:Admin-Key=a=b;inference:token=t",
    }
    settings = parse_server_settings(repo, env)
    assert settings.model_control_mode == "explicit" and settings.load_model == ("mlp", "add_sub")
    first, second = settings.grpc_restricted_protocol
    assert (first.groups, first.header, first.value) == (("model-repository", "statistics"), "admin-key", "a=b")
    assert "RepositoryModelLoad" in first.methods and "ModelStatistics" in first.methods
    assert second.methods == ("ModelInfer", "ModelStreamInfer")
    flags = parse_server_settings([*repo, "--model-control-mode", "poll", "--repository-poll-secs", "2.5"], {})
    assert (flags.model_control_mode, flags.repository_poll_secs, flags.load_model) == ("poll", 2.5, ())
    assert parse_server_settings(repo, {}).model_control_mode == "none"


def write_config(tmp_path: Path, text: str) -> Path:
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.pbtxt").write_text(text)
    return model


def test_triton_style_config_parses(tmp_path):
    model = write_config(
        tmp_path,
        """
        name: "m" platform: "onnxruntime_onnx" max_batch_size: 8
        input [{ name: "x" data_type: TYPE_FP32 dims: [ 4 ] }]
        dynamic_batching { preferred_batch_size: [ 8, 4 ] max_queue_delay_microseconds: 100
          priority_levels: 2 default_priority_level: 1
          default_queue_policy { max_queue_size: 10 default_timeout_microseconds: 5000 allow_timeout_override: true } }
        instance_group [{ kind: KIND_CPU count: 2 }]
        version_policy { latest { num_versions: 2 } }
        parameters { key: "intra_op_thread_count" value { string_value: "1" } }
        parameters { key: "inline_run_below_us" value { string_value: "40" } }
        optimization { execution_accelerators { gpu_execution_accelerator [{ name: "tensorrt"
          parameters { key: "precision_mode" value: "FP16" } }] } }
        """,
    )
    settings = load_model_settings(model)
    assert settings.max_batch_size == 8
    assert settings.inputs[0].datatype == "FP32" and settings.inputs[0].dims == (4,)
    assert settings.batching.preferred_batch_sizes == (4, 8)
    assert settings.batching.queue_policy.max_queue_size == 10
    assert settings.batching.priority_levels == 2
    assert (settings.session.instance_kind, settings.session.instance_count) == ("cpu", 2)
    assert settings.session.inline_run_below_us == 40
    assert settings.session.intra_op_threads == 1
    assert settings.session.gpu_accelerators[0].name == "tensorrt"
    assert settings.version_policy.select([1, 2, 3]) == [2, 3]


def test_no_config_means_derive_everything(tmp_path):
    (tmp_path / "m").mkdir()
    settings = load_model_settings(tmp_path / "m")
    assert settings.max_batch_size is None and settings.inputs == ()


@pytest.mark.parametrize(
    "text, fragment",
    [
        ('name: "other"', "name: 'other' differs"),
        ('platform: "tensorflow_savedmodel"', "platform"),
        ("max_batch_size: 4 dynamic_batching { preferred_batch_size: [ 8 ] }", "preferred_batch_size: 8"),
        ('input [{ name: "x" dims: [ 4 ] }]', "input[0].data_type"),
        ('input [{ name: "x" data_type: TYPE_FP32 dims: [ -2 ] }]', "input[0].dims"),
        ('parameters { key: "turbo" value { string_value: "1" } }', "parameters['turbo']"),
        ("instance_group [{ count: 1 }, { count: 1 }]", "instance_group"),
        ('optimization { execution_accelerators { gpu_execution_accelerator [{ name: "warp" }] } }', "'warp'"),
        (
            "max_batch_size: 4 dynamic_batching { priority_levels: 1 default_priority_level: 3 }",
            "default_priority_level",
        ),
        (
            'model_warmup [{ inputs { key: "x" value { data_type: TYPE_FP32 dims: [1] zero_data: true } } }]',
            "model_warmup[0].name",
        ),
        ('model_warmup [{ name: "w" }]', "model_warmup[0].inputs: empty"),
        (
            'model_warmup [{ name: "w" inputs { key: "x" value { dims: [1] zero_data: true } } }]',
            "inputs['x'].data_type",
        ),
        (
            'model_warmup [{ name: "w" inputs { key: "x" value { data_type: TYPE_FP32 dims: [-1] zero_data: true } } }]',
            "dims: [-1]",
        ),
        (
            'model_warmup [{ name: "w" inputs { key: "x" value { data_type: TYPE_FP32 dims: [1] } } }]',
            "set one of zero_data",
        ),
        (
            'model_warmup [{ name: "w" inputs { key: "x" value { data_type: TYPE_FP32 dims: [1] input_data_file: "../x" } } }]',
            "inside <model>/warmup/",
        ),
    ],
)
def test_bad_config_names_file_and_field(tmp_path, text, fragment):
    model = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_model_settings(model)
    assert str(model / "config.pbtxt") in str(error.value)
    assert fragment in str(error.value)


def test_generated_protos_are_up_to_date():
    result = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_a_json_config_parses_like_config_pbtxt():
    settings = settings_from_json(
        '{"max_batch_size": "16", "dynamic_batching": {"max_queue_delay_microseconds": 100},'
        ' "model_warmup": [{"name": "w", "batch_size": 2, "count": 3,'
        ' "inputs": {"x": {"data_type": "TYPE_FP32", "dims": [4], "random_data": true}}}]}',
        "m",
    )
    assert settings.max_batch_size == 16 and settings.batching.max_queue_delay_us == 100
    (sample,) = settings.warmup
    assert (sample.name, sample.batch_size, sample.count) == ("w", 2, 3)
    assert sample.inputs[0] == WarmupInput("x", "FP32", (4,), "random")
    for text, fragment in (
        ("{max_batch_size: 4}", "not a JSON ModelConfig"),
        ('{"turbo": 1}', "turbo"),
        ('{"name": "n"}', "differs"),
    ):
        with pytest.raises(ConfigError, match="load request parameter 'config'") as error:
            settings_from_json(text, "m")
        assert fragment in str(error.value)


WARMUP_INPUT = 'inputs { key: "x" value { data_type: TYPE_FP32 dims: [%s] zero_data: true } }'


@pytest.mark.parametrize(
    "text, field, value, bound",
    [
        ("max_batch_size: 100000", "max_batch_size", 100000, 65536),
        ("dynamic_batching { priority_levels: 1000000 }", "dynamic_batching.priority_levels", 1000000, 1024),
        ("dynamic_batching { preferred_batch_size: [ 70000 ] }", "dynamic_batching.preferred_batch_size", 70000, 65536),
        (
            "dynamic_batching { preferred_batch_size: [ %s ] }" % ", ".join(map(str, range(1, 70))),
            "dynamic_batching.preferred_batch_size (distinct sizes)",
            69,
            64,
        ),
        (
            "dynamic_batching { max_queue_delay_microseconds: 18446744073709551615 }",
            "dynamic_batching.max_queue_delay_microseconds",
            18446744073709551615,
            60000000,
        ),
        (
            "dynamic_batching { default_queue_policy { max_queue_size: 4294967295 } }",
            "dynamic_batching.default_queue_policy.max_queue_size",
            4294967295,
            1000000,
        ),
        (
            "dynamic_batching { default_queue_policy { default_timeout_microseconds: 4000000000 } }",
            "dynamic_batching.default_queue_policy.default_timeout_microseconds",
            4000000000,
            3600000000,
        ),
        ("instance_group [{ count: 2147483647 }]", "instance_group[0].count", 2147483647, 128),
        ("instance_group [{ count: 32 gpus: [0, 1, 2, 3, 4, 5] }]", "instance_group[0].count x gpus", 192, 128),
        ("instance_group [{ gpus: [64] }]", "instance_group[0].gpus", 64, 63),
        (
            'parameters { key: "intra_op_thread_count" value { string_value: "100000" } }',
            "parameters['intra_op_thread_count']",
            100000,
            512,
        ),
        (
            'parameters { key: "inter_op_thread_count" value { string_value: "4096" } }',
            "parameters['inter_op_thread_count']",
            4096,
            512,
        ),
        (
            'instance_group [{ count: 16 }] parameters { key: "intra_op_thread_count" value { string_value: "512" } }',
            "instance_group[0].count x parameters['intra_op_thread_count']",
            8192,
            2048,
        ),
        (
            'parameters { key: "inline_run_below_us" value { string_value: "10000000" } }',
            "parameters['inline_run_below_us']",
            10000000,
            100000,
        ),
        (
            'parameters { key: "adaptive_queue_delay_us" value { string_value: "99999999999" } }',
            "parameters['adaptive_queue_delay_us']",
            99999999999,
            60000000,
        ),
        (
            "version_policy { latest { num_versions: 4294967295 } }",
            "version_policy.latest.num_versions",
            4294967295,
            64,
        ),
        (
            "version_policy { specific { versions: [%s] } }" % ", ".join(map(str, range(1, 100))),
            "version_policy.specific.versions",
            99,
            64,
        ),
        (
            'input [{ name: "x" data_type: TYPE_FP32 dims: [%s] }]' % ", ".join(["1"] * 40),
            "input[0].dims (rank)",
            40,
            32,
        ),
        (
            'output [{ name: "y" data_type: TYPE_FP32 dims: [1048576, 1048576, 2] }]',
            "output[0].dims (elements of one row)",
            2199023255552,
            1099511627776,
        ),
        (
            'model_warmup [{ name: "w" count: 2147483647 %s }]' % (WARMUP_INPUT % "4"),
            "model_warmup[0].count",
            2147483647,
            100000,
        ),
        (
            'model_warmup [{ name: "w" batch_size: 4000000 %s }]' % (WARMUP_INPUT % "4"),
            "model_warmup[0].batch_size",
            4000000,
            65536,
        ),
        (
            'model_warmup [{ name: "w" batch_size: 64 %s }]' % (WARMUP_INPUT % "3, 1024, 1024"),
            "model_warmup[0].inputs['x'].dims (elements with the batch)",
            201326592,
            67108864,
        ),
        (" ".join(['model_warmup [{ name: "w" %s }]' % (WARMUP_INPUT % "4")] * 65), "model_warmup (samples)", 65, 64),
    ],
)
def test_numbers_that_size_memory_or_work_are_bounded(tmp_path, text, field, value, bound):
    model = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_model_settings(model)
    expected = f"{model / 'config.pbtxt'}: {field}: {value} exceeds onnxserve's limit of {bound}"
    assert expected in str(error.value)


def test_values_at_the_bounds_load(tmp_path):
    model = write_config(
        tmp_path,
        "max_batch_size: 65536 dynamic_batching { priority_levels: 1024 preferred_batch_size: [ 1, 65536 ]"
        " max_queue_delay_microseconds: 60000000 default_queue_policy { max_queue_size: 1000000"
        " default_timeout_microseconds: 3600000000 } } instance_group [{ count: 128 }]"
        ' parameters { key: "intra_op_thread_count" value { string_value: "16" } }'
        ' model_warmup [{ name: "w" batch_size: 16 count: 100000 %s }]' % (WARMUP_INPUT % "4096, 1024"),
    )
    settings = load_model_settings(model)
    assert settings.batching.priority_levels == 1024 and settings.warmup[0].count == 100000


def test_a_huge_config_is_refused_before_it_is_parsed(tmp_path):
    model = write_config(tmp_path, "max_batch_size: 4\n" + "# padding\n" * 120_000)
    with pytest.raises(ConfigError, match=r"config.pbtxt: 1200018 bytes exceeds onnxserve's limit of 1048576"):
        load_model_settings(model)
    with pytest.raises(ConfigError, match="load request parameter 'config': 2000002 characters exceeds"):
        settings_from_json('"' + "x" * 2_000_000 + '"', "m")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model-load-timeout-secs", "0"], "--model-load-timeout-secs: 0.0 is outside"),
        (["--model-load-timeout-secs", "100000"], "--model-load-timeout-secs: 100000.0 is outside"),
        (
            ["--usage-log-buffer-records", "100000000"],
            "--usage-log-buffer-records: 100000000 exceeds onnxserve's limit of 1048576",
        ),
        (
            ["--default-max-batch-size", "1000000"],
            "--default-max-batch-size: 1000000 exceeds onnxserve's limit of 65536",
        ),
        (
            ["--default-max-queue-size", "2000000"],
            "--default-max-queue-size: 2000000 exceeds onnxserve's limit of 1000000",
        ),
        (["--default-max-queue-size", "-1"], "--default-max-queue-size: -1 is negative"),
        (["--exit-timeout-secs", "100000"], "--exit-timeout-secs: 100000.0 is outside \\[0, 3600\\]"),
        (["--log-repeat-secs", "1e6"], "--log-repeat-secs: 1000000.0 is outside \\[0, 86400\\]"),
        (["--grpc-max-connection-idle-secs", "2147483.648"], "--grpc-max-connection-idle-secs: 2147483.648 is outside"),
        (
            ["--grpc-max-concurrent-streams", "3000000000"],
            "--grpc-max-concurrent-streams: 3000000000 is outside 1 .. 2147483647",
        ),
        (
            ["--grpc-max-connections", "3000000000"],
            "--grpc-max-connections: 3000000000 exceeds onnxserve's limit of 1048576",
        ),
        (
            ["--http-max-connections", "10000000"],
            "--http-max-connections: 10000000 exceeds onnxserve's limit of 1048576",
        ),
        (
            ["--metrics-max-connections", "10000000"],
            "--metrics-max-connections: 10000000 exceeds onnxserve's limit of 1048576",
        ),
        (["--default-max-batch-size", "0"], "--default-max-batch-size: 0 must be >= 1"),
    ],
)
def test_server_limits_are_bounded_too(tmp_path, argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_server_settings([*argv, "--model-repository", str(tmp_path)], {})
    assert parse_server_settings(["--model-repository", str(tmp_path)], {}).model_load_timeout_secs == 1800


SECONDS_FLAGS = [spec.name for spec in fields(ServerSettings) if spec.type is float]


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "1e309"])
@pytest.mark.parametrize("name", SECONDS_FLAGS)
def test_every_float_setting_is_a_finite_number(tmp_path, name, text):
    """argparse's float() takes these, and NaN passes any one-sided test such as `< 0`."""
    flag = "--" + name.replace("_", "-")
    with pytest.raises(ConfigError, match=f"^{flag}: "):
        parse_server_settings([f"{flag}={text}", "--model-repository", str(tmp_path)], {})


def test_settings_at_their_bounds_start_grpc(tmp_path):
    """Every integer grpc core takes as a channel argument fits its C int at the highest accepted value."""
    highest = parse_server_settings(
        [
            "--model-repository",
            str(tmp_path),
            "--grpc-max-concurrent-streams",
            str(2**31 - 1),
            "--grpc-max-connections",
            str(1 << 20),
            "--grpc-max-connection-idle-secs",
            str(MAX_GRPC_IDLE_SECS),
            "--grpc-handshake-timeout-secs",
            "3600",
            "--grpc-max-message-bytes",
            str(2**31 - 1),
        ],
        {},
    )
    assert max(value for _, value in grpc_options(highest)) <= 2**31 - 1

    async def build() -> None:
        await grpc.aio.server(options=grpc_options(highest)).stop(None)  # OverflowError past a C int

    asyncio.run(build())


def test_a_number_out_of_range_exits_2_naming_the_flag(tmp_path):
    """Refused before anything starts: a usage error (exit 2), not grpc's OverflowError (exit 1)."""
    result = subprocess.run(
        [sys.executable, "-m", "server", "--model-repository", str(tmp_path), "--grpc-max-connections", "3000000000"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 2 and "--grpc-max-connections: 3000000000" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("argv", "env", "held"),
    [
        (["--frontends", "auto"], {}, 0),
        (["--frontends", "AUTO"], {}, 0),
        ([], {"ONNXSERVE_FRONTENDS": "auto"}, 0),
        ([], {"ONNXSERVE_FRONTENDS": "3"}, 3),
        (["--frontends", "2"], {"ONNXSERVE_FRONTENDS": "auto"}, 2),
        ([], {}, 1),
    ],
)
def test_frontends_take_a_count_or_auto(tmp_path, argv, env, held):
    assert parse_server_settings(["--model-repository", str(tmp_path), *argv], env).frontends == held


@pytest.mark.parametrize(
    ("cores", "chosen"),
    [(1, 1), (2, 1), (3, 2), (4, 3), (8, 7), (9, 8), (16, 8), (64, 8)],
)
def test_auto_front_ends_follow_the_cores_as_measured(cores, chosen):
    """One process below 3 cores (2 front ends served less than one on 2); else one per core beside
    the engine's, as many as one engine keeps up with."""
    assert frontend_count(0, cores) == chosen
    assert frontend_count(5, cores) == 5, "a count given is kept"
