"""The link's framing (server/frontend/link.py): frames and bundles handed over whole and in order,
however the reads cut them."""

import numpy as np

from server.frontend import link


def feed(chunks: list[bytes]) -> list[tuple]:
    got = []
    frames = link.Frames(lambda kind, number, head, body: got.append((kind, number, head, bytes(body))), got.append)
    for chunk in chunks:
        frames.data_received(chunk)
    return got


def wire(*buffers_lists) -> bytes:
    return b"".join(bytes(part) for buffers in buffers_lists for part in buffers)


def test_a_bundle_cut_into_single_bytes_arrives_whole_and_in_order():
    bundled = link._bundle(
        [(link.ANSWER, 1, {"a": 1}, 3), (link.ERROR, 2, None, 0), (link.REPLY, 3, [4], 2)], [b"xyz", b"ok"]
    )
    data = wire(bundled, link.frame(link.STATE, 0, {"ready": True}))
    expected = [(link.ANSWER, 1, {"a": 1}, b"xyz"), (link.ERROR, 2, None, b""), (link.REPLY, 3, [4], b"ok")]
    expected.append((link.STATE, 0, {"ready": True}, b""))
    assert feed([data]) == expected
    assert feed([data[i : i + 1] for i in range(len(data))]) == expected


def test_a_big_frame_in_many_reads_is_handed_over_once_complete():
    body = np.arange(1 << 20, dtype=np.uint8).tobytes()
    data = wire(link.frame(link.ANSWER, 7, {"big": True}, [body]), link.frame(link.STATE, 0, None))
    chunks = [data[i : i + 65536] for i in range(0, len(data), 65536)]
    assert feed(chunks) == [(link.ANSWER, 7, {"big": True}, body), (link.STATE, 0, None, b"")]
