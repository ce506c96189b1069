"""Message classes for our protos, built in a private descriptor pool.

protoc's *_pb2 modules would register `inference.*` in protobuf's process-wide
pool, where tritonclient registers its own copies of the same names: whichever
is imported second fails. A private pool lets onnxserve and tritonclient live
in one process (tests, or an application embedding both).
"""

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from server.protos_generated import FILE_DESCRIPTOR_SET

SERVICE_NAME = "inference.GRPCInferenceService"

POOL = descriptor_pool.DescriptorPool()
for _file in descriptor_pb2.FileDescriptorSet.FromString(FILE_DESCRIPTOR_SET).file:
    POOL.Add(_file)
# Reflection answers from one pool: give it the health and reflection services too.
for _module in (health_pb2, reflection_pb2):
    POOL.AddSerializedFile(_module.DESCRIPTOR.serialized_pb)


def _message(full_name: str) -> type:
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(full_name))


def _inference(name: str) -> type:
    return _message(f"inference.{name}")


SERVICE = POOL.FindServiceByName(SERVICE_NAME)

ServerLiveResponse = _inference("ServerLiveResponse")
ServerReadyResponse = _inference("ServerReadyResponse")
ModelReadyResponse = _inference("ModelReadyResponse")
ServerMetadataResponse = _inference("ServerMetadataResponse")
ModelMetadataResponse = _inference("ModelMetadataResponse")
ModelInferRequest = _inference("ModelInferRequest")
ModelInferResponse = _inference("ModelInferResponse")
ModelStreamInferResponse = _inference("ModelStreamInferResponse")
ModelConfigResponse = _inference("ModelConfigResponse")
RepositoryIndexResponse = _inference("RepositoryIndexResponse")
ModelStatisticsResponse = _inference("ModelStatisticsResponse")
InferParameter = _inference("InferParameter")
ModelConfig = _inference("ModelConfig")
ModelInstanceGroup = _inference("ModelInstanceGroup")
DataType = POOL.FindEnumTypeByName("inference.DataType")
OnnxModel = _message("onnxserve.onnx.ModelProto")  # op types only: see protos/onnx_graph.proto


def request_class(method: str) -> type:
    """The request message class of one RPC of the inference service."""
    return message_factory.GetMessageClass(SERVICE.methods_by_name[method].input_type)


def response_class(method: str) -> type:
    return message_factory.GetMessageClass(SERVICE.methods_by_name[method].output_type)


def unary(channel, method: str):
    """A callable for one unary RPC of the inference service on `channel` (grpc or grpc.aio):
    the request message in, the response message out."""
    return channel.unary_unary(
        f"/{SERVICE_NAME}/{method}",
        request_serializer=request_class(method).SerializeToString,
        response_deserializer=response_class(method).FromString,
    )
