"""Triton's shared memory routes over REST: /v2/systemsharedmemory/[region/NAME/]status, /register
and /unregister, and the same under /v2/cudasharedmemory/ (server/frontend/shared_regions.py holds
the regions, cuda_regions.py the CUDA ones)."""

import base64
import binascii

from server.errors import InvalidInput, shown
from server.frontend.http_codec import JSON_TYPE, json_body
from server.frontend.shared_regions import SharedRegions


async def shared_memory(regions: SharedRegions, kind: str, action: str, name: str, given: dict, tenant: str):
    """(status, body, headers) of one shared memory route; `action`: shm_status, shm_register or
    shm_unregister; `name`: the region's, or "" for all the tenant's."""
    if kind == "cudasharedmemory":
        return await _cuda(regions, action, name, given, tenant)
    if action == "shm_status":
        listed = await regions.status(name, tenant)
        return (
            200,
            json_body([{"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size} for r in listed]),
            JSON_TYPE,
        )
    if action == "shm_unregister":
        await regions.unregister(name, tenant)
        return 200, b"", ()
    key, offset, size = given.get("key"), given.get("offset", 0), given.get("byte_size")
    if not isinstance(key, str) or not all(isinstance(v, int) and not isinstance(v, bool) for v in (offset, size)):
        raise InvalidInput("a registration needs 'key' (a string), 'offset' and 'byte_size' (integers)")
    await regions.register(name, key, offset, size, tenant)
    return 200, b"", ()


async def _cuda(regions: SharedRegions, action: str, name: str, given: dict, tenant: str):
    """/v2/cudasharedmemory/...: tritonclient sends the cudaIpcMemHandle_t as {"b64": ...}."""
    if action == "shm_status":
        listed = await regions.status_cuda(name, tenant)
        rows = [{"name": r.name, "device_id": r.device_id, "byte_size": r.byte_size} for r in listed]
        return 200, json_body(rows), JSON_TYPE
    if action == "shm_unregister":
        await regions.unregister_cuda(name, tenant)
        return 200, b"", ()
    handle, device, size = given.get("raw_handle"), given.get("device_id", 0), given.get("byte_size")
    encoded = handle.get("b64") if isinstance(handle, dict) else None
    if not isinstance(encoded, str) or not all(isinstance(v, int) and not isinstance(v, bool) for v in (device, size)):
        raise InvalidInput(
            "a CUDA registration needs 'raw_handle' ({\"b64\": base64 of the cudaIpcMemHandle_t}), "
            "'device_id' and 'byte_size' (integers)"
        )
    try:
        raw = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise InvalidInput(f"CUDA shared memory region '{shown(name)}': raw_handle.b64 is not base64") from None
    await regions.register_cuda(name, raw, device, size, tenant)
    return 200, b"", ()
