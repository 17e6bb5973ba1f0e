"""The vlm.v1 contract: fresh stubs, the expected services, documented elements, buf lint."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from vlm.v1 import (
    common_pb2,
    encoder_service_pb2,
    encoder_service_pb2_grpc,
    llm_service_pb2,
    llm_service_pb2_grpc,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "protos"
GEN_SCRIPT = REPO_ROOT / "scripts" / "gen_protos.py"
BUF = REPO_ROOT / "node_modules" / ".bin" / "buf"

needs_grpc_tools = pytest.mark.skipif(
    importlib.util.find_spec("grpc_tools") is None,
    reason="grpcio-tools not installed (runtime-only environment); pip install 'grpcio-tools==1.84.0'",
)

# service -> rpc -> (request, response, server streaming)
EXPECTED_RPCS = {
    encoder_service_pb2.DESCRIPTOR.services_by_name["EncoderService"]: {
        "Encode": ("EncodeRequest", "EncodeResponse", False),
        "LookupEmbeddings": ("LookupEmbeddingsRequest", "LookupEmbeddingsResponse", False),
        "GetModelInfo": ("EncoderServiceGetModelInfoRequest", "EncoderServiceGetModelInfoResponse", False),
    },
    llm_service_pb2.DESCRIPTOR.services_by_name["LlmService"]: {
        "Generate": ("GenerateRequest", "GenerateResponse", False),
        "GenerateStream": ("GenerateStreamRequest", "GenerateStreamResponse", True),
        "GetModelInfo": ("LlmServiceGetModelInfoRequest", "LlmServiceGetModelInfoResponse", False),
        "Tokenize": ("TokenizeRequest", "TokenizeResponse", False),
    },
}

# FileDescriptorProto / DescriptorProto / ... field numbers used in SourceCodeInfo paths.
_FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE = 4, 5, 6
_MESSAGE_FIELD, _MESSAGE_NESTED, _MESSAGE_ENUM, _MESSAGE_ONEOF = 2, 3, 4, 8
_ENUM_VALUE = 2
_SERVICE_METHOD = 2


def _run_gen_check() -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(GEN_SCRIPT), "--check"], cwd=REPO_ROOT, capture_output=True, text=True
    )


@needs_grpc_tools
def test_committed_stubs_are_fresh() -> None:
    result = _run_gen_check()
    assert result.returncode == 0, result.stdout + result.stderr


def test_services_have_expected_rpcs() -> None:
    for service, rpcs in EXPECTED_RPCS.items():
        assert set(service.methods_by_name) == set(rpcs), service.full_name
        for name, (request, response, streaming) in rpcs.items():
            method = service.methods_by_name[name]
            assert method.input_type.full_name == f"vlm.v1.{request}"
            assert method.output_type.full_name == f"vlm.v1.{response}"
            assert method.server_streaming is streaming, name
            assert method.client_streaming is False, name


def test_grpc_stubs_expose_every_rpc() -> None:
    for module, service in (
        (encoder_service_pb2_grpc, "EncoderService"),
        (llm_service_pb2_grpc, "LlmService"),
    ):
        servicer = getattr(module, f"{service}Servicer")
        assert hasattr(module, f"{service}Stub")
        assert hasattr(module, f"add_{service}Servicer_to_server")
        for rpc in next(rpcs for svc, rpcs in EXPECTED_RPCS.items() if svc.name == service):
            assert callable(getattr(servicer, rpc)), f"{service}.{rpc}"


def test_tensor_definition_is_exact() -> None:
    # Other code (tensor codec, SDK, services) depends on these exact names and numbers.
    assert dict(common_pb2.DataType.items()) == {
        "DATA_TYPE_UNSPECIFIED": 0,
        "DATA_TYPE_BOOL": 1,
        "DATA_TYPE_UINT8": 2,
        "DATA_TYPE_INT8": 3,
        "DATA_TYPE_INT16": 4,
        "DATA_TYPE_INT32": 5,
        "DATA_TYPE_INT64": 6,
        "DATA_TYPE_FLOAT16": 7,
        "DATA_TYPE_BFLOAT16": 8,
        "DATA_TYPE_FLOAT32": 9,
        "DATA_TYPE_FLOAT64": 10,
    }
    fields = common_pb2.Tensor.DESCRIPTOR.fields
    assert [(f.name, f.number) for f in fields] == [
        ("dtype", 1),
        ("shape", 2),
        ("data", 3),
        ("shared_memory", 4),
    ]
    assert fields[1].type == fields[1].TYPE_INT64 and fields[1].is_repeated
    assert fields[2].type == fields[2].TYPE_BYTES
    assert fields[3].message_type is common_pb2.SharedMemorySlice.DESCRIPTOR
    # vlm_protocol.shared_memory builds slices from these names
    slice_fields = common_pb2.SharedMemorySlice.DESCRIPTOR.fields
    assert [(f.name, f.number, f.type) for f in slice_fields] == [
        ("region", 1, slice_fields[0].TYPE_STRING),
        ("offset", 2, slice_fields[0].TYPE_UINT64),
        ("length", 3, slice_fields[0].TYPE_UINT64),
        ("generation", 4, slice_fields[0].TYPE_UINT64),
    ]
    assert dict(common_pb2.EmbeddingTransport.items()) == {
        "EMBEDDING_TRANSPORT_UNSPECIFIED": 0,
        "EMBEDDING_TRANSPORT_BYTES": 1,
        "EMBEDDING_TRANSPORT_SHARED_MEMORY": 2,
    }


def test_enums_start_with_unspecified() -> None:
    for module in (common_pb2, encoder_service_pb2, llm_service_pb2):
        for enum in module.DESCRIPTOR.enum_types_by_name.values():
            zero = enum.values_by_number[0].name
            assert zero.endswith("_UNSPECIFIED"), f"{enum.full_name} zero value is {zero}"


def test_stream_request_mirrors_unary_request() -> None:
    # Servers may treat both requests alike (even reparse the bytes); that only holds if the
    # two messages stay field-for-field identical.
    unary, stream = descriptor_pb2.DescriptorProto(), descriptor_pb2.DescriptorProto()
    llm_service_pb2.GenerateRequest.DESCRIPTOR.CopyToProto(unary)
    llm_service_pb2.GenerateStreamRequest.DESCRIPTOR.CopyToProto(stream)
    assert list(unary.field) == list(stream.field)
    assert list(unary.oneof_decl) == list(stream.oneof_decl)

    request = llm_service_pb2.GenerateRequest(
        request_id="r1",
        prompt="USER: <image>\nWhat is this? ASSISTANT:",
        multimodal_inputs=[llm_service_pb2.MultimodalInput(content_id="b3:" + "0" * 64)],
        sampling=llm_service_pb2.SamplingParams(max_tokens=8, temperature=0.0, seed=7),
    )
    again = llm_service_pb2.GenerateStreamRequest.FromString(request.SerializeToString())
    assert again.prompt == request.prompt and again.sampling.seed == 7


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (llm_service_pb2.SamplingParams, name)
        for name in (
            "temperature",
            "top_k",
            "top_p",
            "min_p",
            "seed",
            "repetition_penalty",
            "end_id",
            "pad_id",
        )
    ]
    + [
        (llm_service_pb2.OutputOptions, "skip_special_tokens"),
        (llm_service_pb2.GenerateRequest, "add_special_tokens"),
        (llm_service_pb2.GenerateResponse, "stop_token_id"),
    ],
)
def test_unset_is_distinguishable_where_defaults_apply(message, field) -> None:
    descriptor = message.DESCRIPTOR.fields_by_name[field]
    assert descriptor.has_presence, f"{message.DESCRIPTOR.name}.{field} must be proto3 optional"
    instance = message()
    assert not instance.HasField(field)
    setattr(instance, field, 0)
    assert instance.HasField(field)


@pytest.fixture(scope="module")
def source_files(tmp_path_factory: pytest.TempPathFactory) -> list[descriptor_pb2.FileDescriptorProto]:
    """The contract's files parsed by protoc with comments (source info) kept."""
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpcio-tools not installed; needed to parse the .proto sources")
    out = tmp_path_factory.mktemp("descriptors") / "vlm.binpb"
    protos = sorted(p.relative_to(PROTO_ROOT).as_posix() for p in (PROTO_ROOT / "vlm").rglob("*.proto"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"--proto_path={PROTO_ROOT}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *protos,
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    files = list(descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file)
    assert {f.name for f in files} == set(protos)
    return files


def _elements(file: descriptor_pb2.FileDescriptorProto):
    """(qualified name, SourceCodeInfo path) of every element that must be documented."""

    def enum(enum_proto, path, prefix):
        yield f"{prefix}{enum_proto.name}", path
        for i, value in enumerate(enum_proto.value):
            yield f"{prefix}{enum_proto.name}.{value.name}", (*path, _ENUM_VALUE, i)

    def message(msg, path, prefix):
        name = f"{prefix}{msg.name}"
        yield name, path
        for i, field in enumerate(msg.field):
            yield f"{name}.{field.name}", (*path, _MESSAGE_FIELD, i)
        for i, oneof in enumerate(msg.oneof_decl):
            if not oneof.name.startswith("_"):  # synthetic oneofs of proto3 `optional` fields
                yield f"{name}.{oneof.name} (oneof)", (*path, _MESSAGE_ONEOF, i)
        for i, nested in enumerate(msg.nested_type):
            yield from message(nested, (*path, _MESSAGE_NESTED, i), f"{name}.")
        for i, nested_enum in enumerate(msg.enum_type):
            yield from enum(nested_enum, (*path, _MESSAGE_ENUM, i), f"{name}.")

    for i, msg in enumerate(file.message_type):
        yield from message(msg, (_FILE_MESSAGE, i), "")
    for i, enum_proto in enumerate(file.enum_type):
        yield from enum(enum_proto, (_FILE_ENUM, i), "")
    for i, service in enumerate(file.service):
        yield service.name, (_FILE_SERVICE, i)
        for j, method in enumerate(service.method):
            yield f"{service.name}.{method.name}", (_FILE_SERVICE, i, _SERVICE_METHOD, j)


def test_every_element_has_a_leading_comment(source_files) -> None:
    undocumented = []
    checked = 0
    for file in source_files:
        comments = {tuple(loc.path): loc.leading_comments.strip() for loc in file.source_code_info.location}
        for name, path in _elements(file):
            checked += 1
            if not comments.get(path):
                undocumented.append(f"{file.name}: {name}")
    assert checked > 200, "walked suspiciously few elements"
    assert not undocumented, "missing leading comments:\n" + "\n".join(undocumented)


def test_buf_lint_passes() -> None:
    if not BUF.exists():
        pytest.skip("node_modules/.bin/buf missing (run `npm ci`); CI runs `npx buf lint protos` separately")
    result = subprocess.run([str(BUF), "lint", "protos"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
