"""Triton's shared memory routes over REST: /v2/systemsharedmemory/[region/NAME/]status,
/register and /unregister (server/frontend/shared_regions.py holds the regions), and
/v2/cudasharedmemory/..., which lists nothing, unregisters nothing and refuses to register, saying
why (it needs a GPU and cudaIpc handles)."""

from server.errors import InvalidInput, shown
from server.frontend.http_codec import JSON_TYPE, json_body
from server.frontend.shared_regions import SharedRegions


def shared_memory(regions: SharedRegions, kind: str, action: str, name: str, given: dict, tenant: str):
    """(status, body, headers) of one shared memory route; `action`: shm_status, shm_register or
    shm_unregister; `name`: the region's, or "" for all the tenant's."""
    if kind == "cudasharedmemory":
        if action == "shm_register":
            raise InvalidInput("CUDA shared memory is not served yet (it needs a GPU and cudaIpc handles)")
        if action == "shm_status" and name:
            raise InvalidInput(f"unable to find cuda shared memory region: '{shown(name)}'")
        return (200, json_body([]), JSON_TYPE) if action == "shm_status" else (200, b"", ())
    if action == "shm_status":
        listed = regions.status(name, tenant)
        return (
            200,
            json_body([{"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size} for r in listed]),
            JSON_TYPE,
        )
    if action == "shm_unregister":
        regions.unregister(name, tenant)
        return 200, b"", ()
    key, offset, size = given.get("key"), given.get("offset", 0), given.get("byte_size")
    if not isinstance(key, str) or not all(isinstance(v, int) and not isinstance(v, bool) for v in (offset, size)):
        raise InvalidInput("a registration needs 'key' (a string), 'offset' and 'byte_size' (integers)")
    regions.register(name, key, offset, size, tenant)
    return 200, b"", ()
