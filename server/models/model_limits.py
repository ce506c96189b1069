"""Bounds on the numbers a model's configuration may ask for (config.pbtxt, or a load request's JSON
config and files), checked before anything is built.

Each of these numbers sizes memory or work that the server spends while it loads or serves, so one
config with a huge value could stall the event loop or exhaust the process for every other model (a
million priority levels once cost 680 MB and 150 ms of loop time per request; a warm-up count of
2^31 kept a load running for hours). Every bound is far above what Triton users configure; the
comment beside each says why it is enough. Errors name the file and field, the value and the bound.
"""

import math

from server.errors import ConfigError

# config.pbtxt, or a load's JSON config: Triton's are a few KB, a large one some tens of KB. The
# bound keeps a wrong file (a model saved as config.pbtxt) from costing seconds of parsing.
MAX_CONFIG_BYTES = 1 << 20
# Rows per execution: Triton users set 1 to a few thousand. TensorRT profiles and CUDA graphs'
# padded sizes are built up to it, and warm-up runs batches of up to it.
MAX_BATCH_SIZE = 65536
# Distinct preferred batch sizes: one to four are usual. Every dispatch looks them up, and CUDA
# graphs capture one graph per size.
MAX_PREFERRED_BATCH_SIZES = 64
# max_queue_delay_microseconds and the adaptive delay: users wait 100 us to 100 ms for a fuller
# batch; a request held a minute for company serves no caller.
MAX_QUEUE_DELAY_US = 60_000_000
# Priority levels: Triton's examples use 2 or 3. The batcher keeps a queue only for levels that have
# requests waiting, so this sizes nothing up front; it keeps a level a small number.
MAX_PRIORITY_LEVELS = 1024
# max_queue_size: requests waiting, each holding its tensors in memory; users set hundreds to
# thousands. A cap above a million caps nothing a machine could hold.
MAX_QUEUE_SIZE = 1_000_000
# default_timeout_microseconds: a request an hour in a queue has been given up on by any client.
MAX_QUEUE_TIMEOUT_US = 3_600_000_000
# Sessions of one version (instance_group count, and count x GPUs): each is a whole onnxruntime
# session (the weights once more) and a thread. 128 is one per core of a two-socket 64-core host,
# or 16 per GPU on an 8-GPU node.
MAX_INSTANCES = 128
# GPU ids in instance_group.gpus: the largest nodes have 16 GPUs.
MAX_GPU_ID = 63
# intra_op_thread_count and inter_op_thread_count: threads of one session. The largest hosts have
# 256 to 512 hardware threads, and calibration never chooses more than the cores.
MAX_SESSION_THREADS = 512
# Intra-op threads of all of a version's sessions together (instances x threads): four times the
# hardware threads of the largest hosts; beyond, thread creation fails halfway through a load.
MAX_VERSION_THREADS = 2048
# inline_run_below_us: a batch run on the event loop stalls every other caller meanwhile.
# Calibration uses 500 us; past 100 ms a thread's handoff (tens of us) is always the better deal.
MAX_INLINE_RUN_US = 100_000
# Versions of one model served at once (version_policy latest num_versions, specific, all): each
# is a whole set of sessions, loaded and calibrated one after another. Users serve one to a few.
MAX_VERSIONS = 64
# Dims of a tensor in a config: ONNX models have rank 8 at most in practice (TensorRT's limit).
MAX_RANK = 32
# Elements of one row of a tensor (its fixed dims multiplied): times MAX_BATCH_SIZE (2^16) this
# stays below 2^63, where the int64 element counts of numpy and onnxruntime overflow.
MAX_ROW_ELEMENTS = 1 << 40
# model_warmup: runs per instance of a sample (Triton's examples use 1 to 10, but a thousand runs
# of a small model take milliseconds, so warm-ups meant to last go higher: the time is bounded by
# --model-load-timeout-secs, this refuses only what a typo gives, like 2^31), samples, and elements
# of one input with its batch (2^26 FP32 is 256 MiB, the largest request accepted by default).
MAX_WARMUP_COUNT = 100_000
MAX_WARMUP_SAMPLES = 64
MAX_WARMUP_ELEMENTS = 1 << 26
# sequence_batching: control inputs, one per control kind (start, end, ready, corrid), each kind
# at most once in Triton too; state pairs, kept per live sequence: a recurrent model has one or two
# per layer, a decoder's cache two per layer, so 256 is a 128-layer cache.
MAX_CONTROL_INPUTS = 4
MAX_STATES = 256
# An initial state is built once at load and copied into every new sequence: the warm-up's bound.
MAX_INITIAL_STATE_ELEMENTS = MAX_WARMUP_ELEMENTS
# max_sequence_idle_microseconds: users set seconds to minutes; a sequence idle a day has been given up on.
MAX_SEQUENCE_IDLE_US = 86_400_000_000
# oldest.max_candidate_sequences: sequences an instance serves at once, each holding its state between
# requests; Triton's example uses 1024.
MAX_CANDIDATE_SEQUENCES = 65536
# `file:` parameters of one load: a model exported with external data has one file per tensor at
# most, hundreds for the largest models.
MAX_LOAD_FILES = 10_000
# config.pbtxt `parameters` holding numbers -> their bound.
PARAMETER_BOUNDS = {
    "intra_op_thread_count": MAX_SESSION_THREADS,
    "inter_op_thread_count": MAX_SESSION_THREADS,
    "inline_run_below_us": MAX_INLINE_RUN_US,
    "adaptive_queue_delay_us": MAX_QUEUE_DELAY_US,
}


def at_most(value: int, bound: int, where: str, field_name: str) -> int:
    """`value`, or ConfigError naming the file and field, the value and the bound."""
    if value > bound:
        raise ConfigError(f"{where}: {field_name}: {value} exceeds onnxserve's limit of {bound}")
    return value


def check_size(size: int, unit: str, where: str) -> None:
    """A config's size, before it is parsed."""
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: {size} {unit} exceeds onnxserve's limit of {MAX_CONFIG_BYTES}")


def check(proto, where: str) -> None:
    """ConfigError for the first number of a parsed ModelConfig above its bound."""
    if proto.HasField("max_batch_size"):
        at_most(proto.max_batch_size, MAX_BATCH_SIZE, where, "max_batch_size")
    for kind, tensors in (("input", proto.input), ("output", proto.output)):
        for index, tensor in enumerate(tensors):
            _dims(tensor.dims, 1, where, f"{kind}[{index}].dims")
    _dynamic_batching(proto.dynamic_batching, where)
    if proto.HasField("sequence_batching"):
        _sequence_batching(proto.sequence_batching, where)
    for index, group in enumerate(proto.instance_group):
        at_most(group.count, MAX_INSTANCES, where, f"instance_group[{index}].count")
        for gpu in group.gpus:
            if gpu < 0:
                raise ConfigError(f"{where}: instance_group[{index}].gpus: {gpu} is negative")
            at_most(gpu, MAX_GPU_ID, where, f"instance_group[{index}].gpus")
        sessions = max(1, group.count) * max(1, len(set(group.gpus)))
        at_most(sessions, MAX_INSTANCES, where, f"instance_group[{index}].count x gpus")
    _version_policy(proto.version_policy, where)
    at_most(len(proto.model_warmup), MAX_WARMUP_SAMPLES, where, "model_warmup (samples)")
    for index, sample in enumerate(proto.model_warmup):
        _warmup(sample, where, f"model_warmup[{index}]")


def check_threads(instances: int, intra_op_threads: int, where: str) -> None:
    """The intra-op threads a version's sessions start in all."""
    field_name = "instance_group[0].count x parameters['intra_op_thread_count']"
    at_most(instances * intra_op_threads, MAX_VERSION_THREADS, where, field_name)


def _dims(
    dims, batch: int, where: str, field_name: str, limit: int = MAX_ROW_ELEMENTS, what: str = "elements of one row"
) -> None:
    at_most(len(dims), MAX_RANK, where, f"{field_name} (rank)")
    elements = batch * math.prod(dim for dim in dims if dim > 0)  # -1 and bad dims: checked where they are read
    at_most(elements, limit, where, f"{field_name} ({what})")


def _dynamic_batching(dynamic, where: str) -> None:
    field_name = "dynamic_batching"
    at_most(dynamic.priority_levels, MAX_PRIORITY_LEVELS, where, f"{field_name}.priority_levels")
    for size in dynamic.preferred_batch_size:
        at_most(size, MAX_BATCH_SIZE, where, f"{field_name}.preferred_batch_size")
    distinct = len(set(dynamic.preferred_batch_size))
    at_most(distinct, MAX_PREFERRED_BATCH_SIZES, where, f"{field_name}.preferred_batch_size (distinct sizes)")
    at_most(
        dynamic.max_queue_delay_microseconds, MAX_QUEUE_DELAY_US, where, f"{field_name}.max_queue_delay_microseconds"
    )
    policy = dynamic.default_queue_policy
    at_most(policy.max_queue_size, MAX_QUEUE_SIZE, where, f"{field_name}.default_queue_policy.max_queue_size")
    at_most(
        policy.default_timeout_microseconds,
        MAX_QUEUE_TIMEOUT_US,
        where,
        f"{field_name}.default_queue_policy.default_timeout_microseconds",
    )


def _sequence_batching(batching, where: str) -> None:
    field_name = "sequence_batching"
    idle = batching.max_sequence_idle_microseconds
    at_most(idle, MAX_SEQUENCE_IDLE_US, where, f"{field_name}.max_sequence_idle_microseconds")
    at_most(len(batching.control_input), MAX_CONTROL_INPUTS, where, f"{field_name}.control_input (inputs)")
    at_most(len(batching.state), MAX_STATES, where, f"{field_name}.state (states)")
    for index, state in enumerate(batching.state):
        _dims(state.dims, 1, where, f"{field_name}.state[{index}].dims")
        for number, initial in enumerate(state.initial_state):
            initial_field = f"{field_name}.state[{index}].initial_state[{number}].dims"
            _dims(initial.dims, 1, where, initial_field, MAX_INITIAL_STATE_ELEMENTS, "elements")
    for strategy in ("direct", "oldest"):
        delay = getattr(batching, strategy).max_queue_delay_microseconds
        at_most(delay, MAX_QUEUE_DELAY_US, where, f"{field_name}.{strategy}.max_queue_delay_microseconds")
    oldest = batching.oldest
    candidates = oldest.max_candidate_sequences
    at_most(candidates, MAX_CANDIDATE_SEQUENCES, where, f"{field_name}.oldest.max_candidate_sequences")
    for size in oldest.preferred_batch_size:
        at_most(size, MAX_BATCH_SIZE, where, f"{field_name}.oldest.preferred_batch_size")
    distinct = len(set(oldest.preferred_batch_size))
    at_most(distinct, MAX_PREFERRED_BATCH_SIZES, where, f"{field_name}.oldest.preferred_batch_size (distinct sizes)")


def _version_policy(policy, where: str) -> None:
    choice = policy.WhichOneof("policy_choice")
    if choice == "latest":
        at_most(policy.latest.num_versions, MAX_VERSIONS, where, "version_policy.latest.num_versions")
    elif choice == "specific":
        at_most(len(set(policy.specific.versions)), MAX_VERSIONS, where, "version_policy.specific.versions")


def _warmup(sample, where: str, field_name: str) -> None:
    at_most(sample.count, MAX_WARMUP_COUNT, where, f"{field_name}.count")
    at_most(sample.batch_size, MAX_BATCH_SIZE, where, f"{field_name}.batch_size")
    for name, given in sorted(sample.inputs.items()):
        _dims(
            given.dims,
            max(1, sample.batch_size),
            where,
            f"{field_name}.inputs[{name!r}].dims",
            MAX_WARMUP_ELEMENTS,
            "elements with the batch",
        )
