"""client_sdk.embedding_transport: the setting, the auto decision and the fallback (no servers)."""

from __future__ import annotations

from types import SimpleNamespace

import grpc
import pytest
from vlm.v1 import common_pb2

import client_sdk
from client_sdk.embedding_transport import TransportChoice, is_local_address, resolve_embedding_transport
from client_sdk.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError

SHM = common_pb2.EMBEDDING_TRANSPORT_SHARED_MEMORY
BYTES = common_pb2.EMBEDDING_TRANSPORT_BYTES
OFFERS = SimpleNamespace(shared_memory_available=True)
LACKS = SimpleNamespace(shared_memory_available=False)


def test_setting_argument_environment_default_and_validation(monkeypatch):
    monkeypatch.delenv("VLM_EMBEDDING_TRANSPORT", raising=False)
    assert client_sdk.Client("localhost:1", "localhost:2").settings.embedding_transport == "auto"
    monkeypatch.setenv("VLM_EMBEDDING_TRANSPORT", "bytes")
    assert client_sdk.Client("localhost:1", "localhost:2").settings.embedding_transport == "bytes"
    client = client_sdk.AsyncClient("localhost:1", "localhost:2", embedding_transport="Shared_Memory")
    assert client.settings.embedding_transport == "shared_memory"  # the argument wins
    with pytest.raises(InvalidArgumentError, match="embedding_transport must be one of"):
        client_sdk.Client("localhost:1", "localhost:2", embedding_transport="shm")
    monkeypatch.setenv("VLM_EMBEDDING_TRANSPORT", "grpc")
    with pytest.raises(InvalidArgumentError, match=r"\$VLM_EMBEDDING_TRANSPORT must be one of"):
        client_sdk.Client("localhost:1", "localhost:2")
    assert resolve_embedding_transport(None, {}) == "auto"


@pytest.mark.parametrize(
    ("address", "local"),
    [
        ("localhost:50051", True),
        ("127.0.0.1:50051", True),
        ("127.3.2.1:1", True),
        ("[::1]:50052", True),
        ("dns:///localhost:50051", True),
        ("dns://8.8.8.8/localhost:50051", True),
        ("ipv4:127.0.0.1:1,127.0.0.2:2", True),
        ("ipv6:[::1]:50052", True),
        ("unix:/run/vlm/llm.sock", True),
        ("unix:///run/vlm/llm.sock", True),
        ("unix-abstract:vlm", True),
        ("encoder:50051", False),
        ("dns:///encoder:50051", False),
        ("10.0.0.5:50051", False),
        ("ipv4:127.0.0.1:1,10.0.0.2:2", False),
        ("[2001:db8::1]:50051", False),
        ("localhost.example.com:1", False),
    ],
)
def test_local_addresses(address, local):
    assert is_local_address(address) is local


def test_auto_needs_both_services_and_local_addresses():
    choice = TransportChoice("auto", "127.0.0.1:1", "localhost:2")
    assert not choice.needs_llm_info(LACKS) and choice.output_transport(LACKS) == BYTES
    assert choice.needs_llm_info(OFFERS)
    assert choice.output_transport(OFFERS) == BYTES  # the LLM service not asked yet
    choice.set_llm_info(SimpleNamespace(accepts_shared_memory=True))
    assert not choice.needs_llm_info(OFFERS)  # asked once per client
    assert choice.output_transport(OFFERS) == SHM

    refusing = TransportChoice("auto", "127.0.0.1:1", "localhost:2")
    refusing.set_llm_info(SimpleNamespace(accepts_shared_memory=False))
    assert refusing.output_transport(OFFERS) == BYTES

    remote = TransportChoice("auto", "encoder:1", "localhost:2")
    assert not remote.needs_llm_info(OFFERS) and remote.output_transport(OFFERS) == BYTES

    assert TransportChoice("bytes", "localhost:1", "localhost:2").output_transport(OFFERS) == BYTES
    explicit = TransportChoice("shared_memory", "encoder:1", "llm:2")  # the caller knows best
    assert explicit.output_transport(LACKS) == SHM and not explicit.needs_llm_info(OFFERS)


def _refusal(region: str | None = "vlm-emb-1-" + "a" * 32) -> FailedPreconditionError:
    exc = FailedPreconditionError("no", code=grpc.StatusCode.FAILED_PRECONDITION)
    exc.shared_memory_region = region
    return exc


def test_fall_back_only_in_auto_for_a_shared_memory_refusal(caplog):
    choice = TransportChoice("auto", "localhost:1", "localhost:2")
    choice.set_llm_info(SimpleNamespace(accepts_shared_memory=True))
    assert not choice.fall_back(_refusal(None), used_shared_memory=True)  # another FAILED_PRECONDITION
    assert not choice.fall_back(
        NotFoundError("gone", code=grpc.StatusCode.NOT_FOUND), used_shared_memory=True
    )
    assert not choice.fall_back(_refusal(), used_shared_memory=False)  # that request sent no references
    assert not choice.disabled
    assert choice.fall_back(_refusal(), used_shared_memory=True)
    assert choice.fall_back(_refusal(""), used_shared_memory=True)  # the encoder's refusal names no region
    assert choice.disabled and choice.output_transport(OFFERS) == BYTES
    assert sum("refused" in r.getMessage() for r in caplog.records) == 1  # one warning per client

    explicit = TransportChoice("shared_memory", "localhost:1", "localhost:2")
    assert not explicit.fall_back(_refusal(), used_shared_memory=True)  # explicit mode raises instead
    assert not TransportChoice("bytes", "localhost:1", "localhost:2").fall_back(_refusal(), True)
