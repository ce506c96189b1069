"""What the server says about its models, for both transports: a version's configuration in force
and its statistics, as Triton's ModelConfig and ModelStatistics messages (the HTTP transport sends
their JSON mapping, server_info.proto_json). ModelInfo is the
transports' one view of the models: they never hold the repository itself. It is the front end's
one module that reads the engine's process's live state (the repository): in a front-end process
of its own, RemoteInfo (link_client.py) asks the engine's ModelInfo over the link instead."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from server import protocol
from server.frontend.server_info import PLATFORM
from server.models.model_config import CONFIG_TYPE_BY_WIRE
from server.models.repository import READY, ModelRepository, ModelVersion
from server.observe.events import PHASES
from server.observe.statistics import StatisticsRecorder

if TYPE_CHECKING:
    from server.engine.costs import CostLedger


class ModelInfo:
    """What the transports may ask of the models, and nothing more: a version that answers, the
    ready versions of a model, a version's configuration in force, and statistics with cost."""

    def __init__(self, repository: ModelRepository, recorder: StatisticsRecorder, ledger: CostLedger) -> None:
        self._repository, self._recorder, self._ledger = repository, recorder, ledger

    async def model(self, name: str, version: str) -> ModelVersion:
        """The version that answers for (name, version); ModelNotFound or ModelNotReady."""
        return self._repository.get(name, version)

    async def ready_versions(self, name: str) -> list[str]:
        return self._ready(name)

    def _ready(self, name: str) -> list[str]:
        repository = self._repository
        versions = repository.models[name].versions
        return [number for number in repository.version_names(name) if versions[number].state == READY]

    async def config(self, name: str, version: str):
        return model_config_proto(await self.model(name, version))

    async def statistics(self, name: str, version: str):
        """Triton's ModelStatisticsResponse: one version, or every ready one when no name is given."""
        models = self._repository.models
        if name:
            chosen = [await self.model(name, version)]
        else:
            chosen = [models[model].versions[number] for model in sorted(models) for number in self._ready(model)]
        costs = self._ledger.snapshot().models
        response = protocol.ModelStatisticsResponse()
        for model in chosen:
            fill_statistics(response.model_stats.add(), model, self._recorder, costs)
        return response


def model_config_proto(model: ModelVersion):
    """The configuration in force, completed from the graph, as Triton's ModelConfig."""
    settings, pool = model.settings, model.pool
    config = protocol.ModelConfig(
        name=model.name,
        platform=PLATFORM,
        backend="onnxruntime",
        max_batch_size=settings.max_batch_size,
        default_model_filename=settings.model_filename,
    )
    for tensor in settings.inputs:
        config.input.add(name=tensor.name, data_type=CONFIG_TYPE_BY_WIRE[tensor.datatype], dims=tensor.dims)
    for tensor in settings.outputs:
        config.output.add(name=tensor.name, data_type=CONFIG_TYPE_BY_WIRE[tensor.datatype], dims=tensor.dims)
    kind = "KIND_CPU" if pool.device == "cpu" else "KIND_GPU"
    config.instance_group.add(kind=kind, count=pool.instance_count)
    batching = settings.batching
    if settings.sequence is not None:  # Triton's scheduling_choice: sequence or dynamic batching, not both
        settings.sequence.fill_proto(config.sequence_batching)
    elif batching.max_batch_size:
        dynamic = config.dynamic_batching
        dynamic.preferred_batch_size.extend(batching.preferred_batch_sizes)
        dynamic.max_queue_delay_microseconds = batching.max_queue_delay_us
        dynamic.priority_levels = batching.priority_levels
        dynamic.default_priority_level = batching.default_priority_level
        policy = dynamic.default_queue_policy
        policy.max_queue_size = batching.queue_policy.max_queue_size
        policy.default_timeout_microseconds = batching.queue_policy.default_timeout_us
        policy.allow_timeout_override = batching.queue_policy.allow_timeout_override
    # The provider actually in use, not the one asked for.
    config.parameters["execution_provider"].string_value = pool.provider
    config.parameters["device"].string_value = pool.device
    # Exactly what instance 0's session was opened with: a raw baseline can open the same.
    config.parameters["provider_options"].string_value = json.dumps(pool.in_use[0].providers)
    # The session settings in force, whether config.pbtxt set them or calibration chose them.
    choice = pool.choice
    config.parameters["intra_op_thread_count"].string_value = str(choice.intra_op_threads)
    config.parameters["allow_spinning"].string_value = str(int(choice.allow_spinning))
    config.parameters["inline_run_below_us"].string_value = str(choice.inline_run_below_us)
    config.parameters["io_binding"].string_value = str(int(pool.io_binding))
    config.parameters["calibrated"].string_value = ",".join(choice.measured)
    config.parameters["adaptive_queue_delay_us"].string_value = str(settings.batching.adaptive_delay_us)
    return config


def fill_statistics(message, model: ModelVersion, recorder: StatisticsRecorder, costs) -> None:
    stats = recorder.get(model.name, model.version)
    message.name, message.version = model.name, model.version
    message.last_inference = stats.last_inference_ms
    message.inference_count = stats.inference_count
    message.execution_count = stats.execution_count
    totals = message.inference_stats
    for name in ("success", "fail", "queue"):
        _duration(getattr(totals, name), getattr(stats, name))
    for phase in PHASES:
        _duration(getattr(totals, f"compute_{phase}"), stats.compute[phase])
    for size in sorted(stats.batches):
        batch = message.batch_stats.add(batch_size=size)
        for phase in PHASES:
            _duration(getattr(batch, f"compute_{phase}"), stats.batches[size][phase])
    for account in costs:
        if (account.model, account.version) != (model.name, model.version):
            continue
        cost = message.onnxserve_cost.add(device=account.device, dollars=account.dollars)
        if stats.inference_count:
            cost.dollars_per_inference = account.dollars / stats.inference_count
        if account.joules is not None:
            cost.energy_measured, cost.energy_joules = True, account.joules


def _duration(message, duration) -> None:
    message.count, message.ns = duration.count, duration.ns
