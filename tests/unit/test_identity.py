"""API key files, tenant sources and their precedence, and the bound on tenant series."""

import asyncio
import hashlib
import json

import pytest

from server.errors import ConfigError, Unauthenticated
from server.frontend.identity import Authenticator, TenantLabels, read_key_file


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_file(tmp_path, document) -> str:
    path = tmp_path / "keys.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return str(path)


GOOD = {
    "keys": [{"sha256": digest("k1"), "tenant": "team-a", "name": "ci"}],
    "certificates": {"client-7": "team-c"},
    "tenants": {"team-a": {"budget_dollars_per_hour": 2.5}},
}


@pytest.mark.parametrize(
    "document, named",
    [
        ("{not json", "not valid JSON"),
        ([], "must hold a JSON object"),
        ({"keys": []}, "'keys' must be a non-empty list"),
        ({"keys": [{"sha256": "abc", "tenant": "t"}]}, "keys[0].sha256: must be 64 hex digits"),
        ({"keys": [{"sha256": digest("k"), "tenant": "unknown"}]}, "keys[0].tenant"),
        ({"keys": [{"sha256": digest("k"), "tenant": "t", "key": "k"}]}, "keys[0]: unknown fields ['key']"),
        ({"keys": [{"sha256": digest("k"), "tenant": "t"}] * 2}, "keys[1].sha256: the same key is listed twice"),
        (
            {"keys": [{"sha256": digest("k"), "tenant": "t"}], "tenants": {"t": {"budget_dollars_per_hour": -1}}},
            "budget_dollars_per_hour",
        ),
        ({"keys": [{"sha256": digest("k"), "tenant": "t"}], "plaintext": ["k"]}, "unknown fields ['plaintext']"),
    ],
)
def test_a_bad_key_file_names_the_file_and_the_field(tmp_path, document, named):
    path = key_file(tmp_path, document)
    with pytest.raises(ConfigError) as raised:
        read_key_file(path)
    assert path in str(raised.value) and named in str(raised.value) and "--api-keys" in str(raised.value)


def test_the_key_names_the_tenant_and_outranks_certificate_and_header(tmp_path):
    auth = Authenticator(key_file(tmp_path, GOOD), trust_header=True, mutual_tls=True, max_tenant_series=10)
    identity = auth.identify("Bearer k1", "client-7", "team-claimed")
    assert (identity.tenant, identity.source) == ("team-a", "api_key")
    assert auth.identify("bearer  k1 ", None, None).tenant == "team-a"
    assert auth.identify(None, "client-7", "team-claimed").tenant == "team-c", "a listed certificate stands for a key"
    with pytest.raises(Unauthenticated, match="required"):
        auth.identify(None, "client-8", "team-claimed")
    with pytest.raises(Unauthenticated, match="not valid"):
        auth.identify("Bearer wrong", "client-7", None)
    with pytest.raises(Unauthenticated, match="not valid"):
        auth.identify("Bearer k2", None, None)
    assert auth.refused == {"missing": 1, "invalid": 2}
    assert auth.keys.budgets == {"team-a": 2.5}


def test_without_keys_the_certificate_then_a_trusted_header_name_the_tenant(tmp_path):
    mapped = Authenticator("", trust_header=True, mutual_tls=True, max_tenant_series=10)
    assert mapped.identify(None, "client-7", "team-claimed").tenant == "client-7"
    assert mapped.identify(None, None, "team-claimed").source == "header"
    assert mapped.identify(None, None, "other").tenant == "unknown", "reserved names cannot be claimed"
    untrusted = Authenticator("", trust_header=False, mutual_tls=False, max_tenant_series=10)
    assert not untrusted.reads_calls
    assert untrusted.identify("Bearer k1", None, "team-claimed").tenant == "unknown"


def test_the_key_file_maps_certificate_names_to_tenants(tmp_path):
    auth = Authenticator(key_file(tmp_path, GOOD), trust_header=False, mutual_tls=True, max_tenant_series=10)
    assert auth.certificate_tenant("client-7") == "team-c"
    assert auth.certificate_tenant("client-9") == "client-9"
    assert auth.certificate_tenant("bad\nname") == "unknown"


def test_tenants_past_the_limit_fold_into_other_and_are_counted_once():
    labels = TenantLabels(2)
    assert [labels.label(t) for t in ("a", "unknown", "b", "c", "a", "d", "c")] == [
        "a",
        "unknown",
        "b",
        "other",
        "a",
        "other",
        "other",
    ]
    assert labels.folded == 2


def test_a_reload_swaps_the_key_file_object_that_open_streams_compare(tmp_path):
    """ModelStreamInfer checks a message's key again once `auth.keys` is another object: follow()
    must replace it on every reload, never change it in place."""
    path = key_file(tmp_path, GOOD)
    auth = Authenticator(path, trust_header=False, mutual_tls=False, max_tenant_series=10)
    before = auth.keys

    async def reload() -> None:
        follower = asyncio.create_task(auth.follow(period=0.01))
        key_file(tmp_path, {"keys": [{"sha256": digest("k2"), "tenant": "team-b"}]})
        for _ in range(500):
            if auth.keys is not before:
                break
            await asyncio.sleep(0.01)
        follower.cancel()

    asyncio.run(reload())
    assert auth.keys is not before and before.keys, "the old object is left as it was"
    with pytest.raises(Unauthenticated, match="not valid"):
        auth.identify("Bearer k1", None, None)
    assert auth.identify("Bearer k2", None, None).tenant == "team-b"
    with pytest.raises(Unauthenticated, match="required"):
        auth.identify(None, None, None)  # a certificate that names no one (two CNs) counts as none
