from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("key_id", "poly_modulus_degree", "coeff_modulus_bits", "scale_bits", "format_version", "ingest_ports")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    POLY_MODULUS_DEGREE_FIELD_NUMBER: _ClassVar[int]
    COEFF_MODULUS_BITS_FIELD_NUMBER: _ClassVar[int]
    SCALE_BITS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    INGEST_PORTS_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    poly_modulus_degree: int
    coeff_modulus_bits: _containers.RepeatedScalarFieldContainer[int]
    scale_bits: int
    format_version: int
    ingest_ports: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, key_id: _Optional[str] = ..., poly_modulus_degree: _Optional[int] = ..., coeff_modulus_bits: _Optional[_Iterable[int]] = ..., scale_bits: _Optional[int] = ..., format_version: _Optional[int] = ..., ingest_ports: _Optional[_Iterable[int]] = ...) -> None: ...

class CreateRoundRequest(_message.Message):
    __slots__ = ("round_id", "model_spec_json", "expected_clients", "min_clients", "deadline_seconds", "max_weight", "value_bound", "dp_json", "enrolled", "masking_json")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    MIN_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    VALUE_BOUND_FIELD_NUMBER: _ClassVar[int]
    DP_JSON_FIELD_NUMBER: _ClassVar[int]
    ENROLLED_FIELD_NUMBER: _ClassVar[int]
    MASKING_JSON_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    model_spec_json: str
    expected_clients: int
    min_clients: int
    deadline_seconds: float
    max_weight: float
    value_bound: float
    dp_json: str
    enrolled: _containers.RepeatedScalarFieldContainer[str]
    masking_json: str
    def __init__(self, round_id: _Optional[str] = ..., model_spec_json: _Optional[str] = ..., expected_clients: _Optional[int] = ..., min_clients: _Optional[int] = ..., deadline_seconds: _Optional[float] = ..., max_weight: _Optional[float] = ..., value_bound: _Optional[float] = ..., dp_json: _Optional[str] = ..., enrolled: _Optional[_Iterable[str]] = ..., masking_json: _Optional[str] = ...) -> None: ...

class GetRoundRequest(_message.Message):
    __slots__ = ("round_id",)
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    def __init__(self, round_id: _Optional[str] = ...) -> None: ...

class RoundStatus(_message.Message):
    __slots__ = ("round_id", "state", "submitted", "expected", "min_clients", "clients", "deadline_unix", "spec_hash", "key_id", "max_weight", "value_bound", "num_params", "reason", "model_spec_json", "dp_json", "enrolled", "epsilon_round", "epsilon_spent", "epsilon_budget", "delta", "min_cohort", "release_grid", "release_precision", "masking_json", "stage")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    MIN_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    SPEC_HASH_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    VALUE_BOUND_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MODEL_SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    DP_JSON_FIELD_NUMBER: _ClassVar[int]
    ENROLLED_FIELD_NUMBER: _ClassVar[int]
    EPSILON_ROUND_FIELD_NUMBER: _ClassVar[int]
    EPSILON_SPENT_FIELD_NUMBER: _ClassVar[int]
    EPSILON_BUDGET_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    MIN_COHORT_FIELD_NUMBER: _ClassVar[int]
    RELEASE_GRID_FIELD_NUMBER: _ClassVar[int]
    RELEASE_PRECISION_FIELD_NUMBER: _ClassVar[int]
    MASKING_JSON_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    state: str
    submitted: int
    expected: int
    min_clients: int
    clients: _containers.RepeatedScalarFieldContainer[str]
    deadline_unix: float
    spec_hash: str
    key_id: str
    max_weight: float
    value_bound: float
    num_params: int
    reason: str
    model_spec_json: str
    dp_json: str
    enrolled: _containers.RepeatedScalarFieldContainer[str]
    epsilon_round: float
    epsilon_spent: float
    epsilon_budget: float
    delta: float
    min_cohort: int
    release_grid: float
    release_precision: float
    masking_json: str
    stage: str
    def __init__(self, round_id: _Optional[str] = ..., state: _Optional[str] = ..., submitted: _Optional[int] = ..., expected: _Optional[int] = ..., min_clients: _Optional[int] = ..., clients: _Optional[_Iterable[str]] = ..., deadline_unix: _Optional[float] = ..., spec_hash: _Optional[str] = ..., key_id: _Optional[str] = ..., max_weight: _Optional[float] = ..., value_bound: _Optional[float] = ..., num_params: _Optional[int] = ..., reason: _Optional[str] = ..., model_spec_json: _Optional[str] = ..., dp_json: _Optional[str] = ..., enrolled: _Optional[_Iterable[str]] = ..., epsilon_round: _Optional[float] = ..., epsilon_spent: _Optional[float] = ..., epsilon_budget: _Optional[float] = ..., delta: _Optional[float] = ..., min_cohort: _Optional[int] = ..., release_grid: _Optional[float] = ..., release_precision: _Optional[float] = ..., masking_json: _Optional[str] = ..., stage: _Optional[str] = ...) -> None: ...

class ContributionRecord(_message.Message):
    __slots__ = ("client_id", "digest", "seeds_digest", "tag", "certificate", "signature")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SEEDS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    digest: bytes
    seeds_digest: bytes
    tag: bytes
    certificate: bytes
    signature: bytes
    def __init__(self, client_id: _Optional[str] = ..., digest: _Optional[bytes] = ..., seeds_digest: _Optional[bytes] = ..., tag: _Optional[bytes] = ..., certificate: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("format_version", "round_id", "client_id", "key_id", "spec_hash", "num_ciphertexts", "num_chunks", "digest", "contribution")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_HASH_FIELD_NUMBER: _ClassVar[int]
    NUM_CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    round_id: str
    client_id: str
    key_id: str
    spec_hash: str
    num_ciphertexts: int
    num_chunks: int
    digest: bytes
    contribution: ContributionRecord
    def __init__(self, format_version: _Optional[int] = ..., round_id: _Optional[str] = ..., client_id: _Optional[str] = ..., key_id: _Optional[str] = ..., spec_hash: _Optional[str] = ..., num_ciphertexts: _Optional[int] = ..., num_chunks: _Optional[int] = ..., digest: _Optional[bytes] = ..., contribution: _Optional[_Union[ContributionRecord, _Mapping]] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("index", "c0", "seeds", "digest")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    C0_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    index: int
    c0: _containers.RepeatedScalarFieldContainer[bytes]
    seeds: _containers.RepeatedScalarFieldContainer[bytes]
    digest: bytes
    def __init__(self, index: _Optional[int] = ..., c0: _Optional[_Iterable[bytes]] = ..., seeds: _Optional[_Iterable[bytes]] = ..., digest: _Optional[bytes] = ...) -> None: ...

class SubmitMessage(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("round_id", "client_id", "submitted", "already_accepted")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_FIELD_NUMBER: _ClassVar[int]
    ALREADY_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    client_id: str
    submitted: int
    already_accepted: bool
    def __init__(self, round_id: _Optional[str] = ..., client_id: _Optional[str] = ..., submitted: _Optional[int] = ..., already_accepted: bool = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("round_id", "wait_seconds")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    wait_seconds: float
    def __init__(self, round_id: _Optional[str] = ..., wait_seconds: _Optional[float] = ...) -> None: ...

class AggregateHeader(_message.Message):
    __slots__ = ("round_id", "key_id", "spec_hash", "contributions", "clients", "num_ciphertexts", "num_chunks", "digest", "records")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_HASH_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    NUM_CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    key_id: str
    spec_hash: str
    contributions: int
    clients: _containers.RepeatedScalarFieldContainer[str]
    num_ciphertexts: int
    num_chunks: int
    digest: bytes
    records: _containers.RepeatedCompositeFieldContainer[ContributionRecord]
    def __init__(self, round_id: _Optional[str] = ..., key_id: _Optional[str] = ..., spec_hash: _Optional[str] = ..., contributions: _Optional[int] = ..., clients: _Optional[_Iterable[str]] = ..., num_ciphertexts: _Optional[int] = ..., num_chunks: _Optional[int] = ..., digest: _Optional[bytes] = ..., records: _Optional[_Iterable[_Union[ContributionRecord, _Mapping]]] = ...) -> None: ...

class AggregateMessage(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: AggregateHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[AggregateHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class CancelRoundRequest(_message.Message):
    __slots__ = ("round_id", "reason")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    reason: str
    def __init__(self, round_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ListRoundsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RoundSummary(_message.Message):
    __slots__ = ("round_id", "state", "submitted", "expected", "created_unix", "reason")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    state: str
    submitted: int
    expected: int
    created_unix: float
    reason: str
    def __init__(self, round_id: _Optional[str] = ..., state: _Optional[str] = ..., submitted: _Optional[int] = ..., expected: _Optional[int] = ..., created_unix: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class RoundList(_message.Message):
    __slots__ = ("rounds",)
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    rounds: _containers.RepeatedCompositeFieldContainer[RoundSummary]
    def __init__(self, rounds: _Optional[_Iterable[_Union[RoundSummary, _Mapping]]] = ...) -> None: ...

class MaskRequest(_message.Message):
    __slots__ = ("round_id", "client_id", "stage", "payload_json", "wait_seconds")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_JSON_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    client_id: str
    stage: str
    payload_json: str
    wait_seconds: float
    def __init__(self, round_id: _Optional[str] = ..., client_id: _Optional[str] = ..., stage: _Optional[str] = ..., payload_json: _Optional[str] = ..., wait_seconds: _Optional[float] = ...) -> None: ...

class MaskReply(_message.Message):
    __slots__ = ("ready", "payload_json", "stage")
    READY_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_JSON_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    payload_json: str
    stage: str
    def __init__(self, ready: bool = ..., payload_json: _Optional[str] = ..., stage: _Optional[str] = ...) -> None: ...
