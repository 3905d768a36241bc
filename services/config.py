"""Settings for the services, validated at the edge.

One pydantic-settings model read from (highest precedence first) explicit
overrides, ``DUALTRACK_*`` environment variables (``__`` separates nesting:
``DUALTRACK_MILVUS__URI``), and a TOML file (``DUALTRACK_CONFIG`` or
``./dualtrack.toml``). A bad value becomes a :class:`ConfigError` whose message
names the key, the value and what is allowed -- never a traceback.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from services.kb.access import Acl, AclError, AclRule
from services.kb.classification import Classification, PathRule
from services.kb.sandbox import ParserLimits

PACKAGED_MODEL = "packaged:all-MiniLM-L6-v2"
"""The offline model shipped inside a PyPI wheel: the default, works without a hub."""

DEPLOYMENT_MODEL = "BAAI/bge-small-en-v1.5"
"""What a real deployment sets (384-d, same dimension as the packaged model)."""

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")


class ConfigError(ValueError):
    """A setting is wrong; the message is meant for the operator, verbatim."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IndexSettings(_Section):
    """ANN index built on the vector field. Validated here because Milvus Lite
    accepts unknown index types silently and fails later in the background."""

    type: Literal["HNSW", "IVF_FLAT", "FLAT"] = "HNSW"
    metric: Literal["COSINE", "IP", "L2"] = Field(
        "COSINE",
        description="Vectors are L2-normalised, so all three rank alike; scores are reported "
        "as cosine similarity either way (L2 is accepted for collections indexed by the seed's ORM code).",
    )
    hnsw_m: int = Field(16, ge=4, le=64)
    hnsw_ef_construction: int = Field(200, ge=8, le=1024)
    ivf_nlist: int = Field(1024, ge=1, le=65536)


class SearchSettings(_Section):
    """Query-time knobs: HNSW ``ef`` and IVF ``nprobe``."""

    hnsw_ef: int = Field(64, ge=1, le=32768)
    ivf_nprobe: int = Field(16, ge=1, le=65536)


class MilvusSettings(_Section):
    """Where the knowledge base lives. ``uri`` is a local path (Milvus Lite
    embedded, one process per path) or ``http://host:19530`` (Milvus Lite
    server or Milvus standalone)."""

    uri: str = "http://127.0.0.1:19530"
    collection: str = "knowledge_base"
    token: SecretStr | None = None
    timeout_s: float = Field(
        10.0, gt=0, le=600, description="Deadline of every call but writes: searches, queries, schema calls."
    )
    write_timeout_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="Deadline of one write (upsert, delete). Milvus Lite seals its in-memory rows "
        "into a segment inside the write that takes them past 128 MiB: seconds, and tens of seconds "
        "under load. A write given up and sent again while the seal runs takes Lite minutes.",
    )
    acl_refresh_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="How often the list of distinct access lists is re-read from the registry, "
        "for documents another process wrote (this process's own writes show at once).",
    )
    full_text: bool = Field(
        True,
        description="Keep a BM25 full-text index of chunk text beside the vectors (Milvus' own BM25 "
        "function; Milvus Lite, or Milvus 2.5 or later) and search both, fused. False: dense "
        "search only, for an engine without BM25.",
    )
    index: IndexSettings = IndexSettings()
    search: SearchSettings = SearchSettings()

    @field_validator("collection")
    @classmethod
    def _collection_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("must start with a letter or _ and contain only letters, digits and _")
        return v

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be a local path or http(s)://host:port")
        if "://" in v and not v.startswith(("http://", "https://", "tcp://", "unix:")):
            raise ValueError("scheme must be http:// or https:// (or a local path for Milvus Lite)")
        if "://" in v and "@" in v.split("://", 1)[1] and "@" not in urlsplit(v).netloc:
            # read as a path, the password would be shown wherever the address is
            raise ValueError(
                "has user:password@ with an unescaped / ? or # in it: percent-encode them "
                "(%2F %3F %23), or give the credentials as milvus.token"
            )
        return v

    @property
    def is_embedded(self) -> bool:
        """True when ``uri`` names a local Milvus Lite database path."""
        return "://" not in self.uri and not self.uri.startswith("unix:")


class EmbeddingSettings(_Section):
    """The sentence-transformers model. ``model`` is a local directory, a hub id
    (needs the model in the local cache when offline) or ``packaged:...``."""

    model: str = PACKAGED_MODEL
    query_instruction: str | None = Field(
        None, description="Prefix for queries; None picks the model family's default (BGE)."
    )
    batch_size: int = Field(32, ge=1, le=1024)
    max_seq_length: int | None = Field(
        None, ge=128, le=8192, description="Tokens the model reads of a passage; None: the model's own."
    )
    device: str = "cpu"


class ChunkingSettings(_Section):
    """Sentence-aware chunking bounds, in the embedding model's own tokens (the embedded
    title/section head included), so no chunk text is past what the model reads."""

    max_tokens: int | None = Field(
        None,
        ge=128,
        le=8192,
        description="Tokens a chunk is embedded with, head included; None: all the model reads "
        "(its max_seq_length less special tokens). Never more than that.",
    )
    min_tokens: int = Field(
        96, ge=1, le=8192, description="A section change closes a chunk once it holds this many tokens."
    )
    overlap_tokens: int = Field(
        32,
        ge=0,
        le=4096,
        description="Trailing sentences (at most this many tokens) repeated in the next chunk.",
    )
    max_chars: int = Field(
        12000, ge=100, le=16000, description="Hard cap: 16000 chars x 4 bytes fits the 65535-byte VARCHAR."
    )

    @model_validator(mode="before")
    @classmethod
    def _word_keys(cls, data: Any) -> Any:
        """Chunk bounds were once counted in words: name the key that replaced each."""
        if isinstance(data, dict):
            for old in ("min_words", "max_words", "overlap_words"):
                if old in data:
                    new = old.replace("words", "tokens")
                    raise ValueError(
                        f"chunking.{old} = {data[old]!r}: chunks are sized in the embedding model's "
                        f"tokens; set chunking.{new} instead"
                    )
        return data

    @model_validator(mode="after")
    def _bounds(self) -> ChunkingSettings:
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if self.overlap_tokens >= self.min_tokens:
            raise ValueError(
                f"overlap_tokens ({self.overlap_tokens}) must be < min_tokens ({self.min_tokens})"
            )
        return self


class PathRuleSetting(_Section):
    pattern: str
    classification: Classification


class ClassificationSettings(_Section):
    """Where labels come from besides front-matter and sidecars."""

    default: Classification = Classification.INTERNAL
    path_rules: list[PathRuleSetting] = []

    def rules(self) -> list[PathRule]:
        return [PathRule(r.pattern, r.classification) for r in self.path_rules]


class AclRuleSetting(_Section):
    pattern: str
    groups: list[str] = []
    users: list[str] = []

    def rule(self) -> AclRule:
        where = f"access.path_rules[{self.pattern!r}]"
        try:
            return AclRule(self.pattern, Acl.of(self.groups, self.users, where))
        except AclError as exc:
            raise ValueError(str(exc)) from None


class AccessSettings(_Section):
    """Who may read documents whose sources state no access list (see ``services.kb.access``)."""

    default_groups: list[str] = Field(
        ["*"],
        min_length=1,
        description='Groups that may read a document no source gave an ACL; "*" is every signed-in '
        "principal. Uploads by a contributor default to the contributor's own groups instead.",
    )
    path_rules: list[AclRuleSetting] = []

    @field_validator("default_groups")
    @classmethod
    def _groups(cls, groups: list[str]) -> list[str]:
        try:
            Acl.of(groups, where="access.default_groups")
        except AclError as exc:
            raise ValueError(str(exc)) from None
        return groups

    @field_validator("path_rules")
    @classmethod
    def _rules(cls, rules: list[AclRuleSetting]) -> list[AclRuleSetting]:
        for r in rules:
            r.rule()
        return rules

    def default(self) -> Acl:
        return Acl.of(self.default_groups, where="access.default_groups")

    def rules(self) -> list[AclRule]:
        return [r.rule() for r in self.path_rules]


class AuditSettings(_Section):
    """The audit trail: one hash-chained record per request (``services.audit``)."""

    enabled: bool = Field(True, description="Off only for a throw-away local stack; a site keeps it on.")
    dir: Path | None = Field(
        None, description="Where the log lives; default $XDG_STATE_HOME/dualtrack/audit (~/.local/state/...)."
    )
    questions: Literal["hash", "text", "none"] = Field(
        "hash",
        description="How a question is recorded: its SHA-256 (default: equal questions can be matched, "
        "the text is not kept), the text itself (opt-in: it may be confidential) or not at all.",
    )
    journald: bool = Field(False, description="Also write each record to standard error (the journal).")
    fsync: bool = Field(False, description="fsync after every record (survives power loss; slower).")
    max_bytes: int = Field(64 * 1024 * 1024, ge=4096, description="Rotate the file past this size.")
    keep: int = Field(90, ge=1, description="Rotated files to keep.")

    def directory(self) -> Path:
        if self.dir is not None:
            return self.dir
        state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(state) / "dualtrack" / "audit"


class IngestSettings(_Section):
    """Limits that keep one bad upload from hurting the service."""

    max_file_bytes: int = Field(16 * 1024 * 1024, ge=1024, le=1024**3)
    max_chunks_per_document: int = Field(2000, ge=1, le=1_000_000)
    insert_batch: int = Field(256, ge=1, le=10000)
    max_batch_documents: int = Field(
        64,
        ge=1,
        le=1000,
        description="Most files one POST /v1/documents/batch may carry (their bytes together "
        "stay within max_file_bytes).",
    )
    parser_cpu_s: int = Field(
        60,
        ge=1,
        le=3600,
        description="CPU seconds one document's parse may use (it runs in a child process of its own).",
    )
    parser_memory_mb: int = Field(
        2048,
        ge=256,
        le=65536,
        description="Address space one document's parse may use, in MiB (the child's RLIMIT_AS).",
    )
    parser_timeout_s: float = Field(
        120.0, gt=0, le=3600, description="Wall-clock seconds one document's parse may take."
    )

    def parser_limits(self) -> ParserLimits:
        return ParserLimits(self.parser_cpu_s, self.parser_memory_mb, self.parser_timeout_s)


class RetrievalSettings(_Section):
    top_k: int = Field(5, ge=1, le=100)
    score_threshold: float | None = Field(None, ge=-1.0, le=1.0)
    answer_sentences: int = Field(3, ge=1, le=20)
    fusion: Literal["rrf", "weighted"] = Field(
        "rrf",
        description="How the dense and the BM25 result lists are merged (milvus.full_text): "
        "reciprocal rank fusion, or a weighted sum of normalised scores (keyword_weight).",
    )
    rrf_k: int = Field(60, ge=1, le=16384, description="RRF's k: larger flattens the rank weights.")
    keyword_weight: float = Field(
        0.5, ge=0.0, le=1.0, description="fusion = 'weighted': the BM25 list's weight (dense: 1 - it)."
    )


ASYMMETRIC_ALGORITHMS = (
    *("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"),
    *("ES256", "ES384", "ES512", "EdDSA"),
)
"""Signature algorithms an access token may use: public-key ones only (``none`` and the HMAC
family would let anyone who knows the published key sign)."""


def loopback_or_https(url: str, key: str) -> str:
    """``url`` must be https, or http to a loopback address (a test or local provider)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    loopback = host == "localhost" or host.startswith("127.") or host == "::1"
    if parts.scheme == "https" or (parts.scheme == "http" and loopback):
        return url  # unchanged: an issuer is compared byte for byte (Entra's v1 ends in "/")
    raise ValueError(f"{key} must be an https:// URL (http:// only to a loopback address), got {url!r}")


class ClaimSettings(_Section):
    """Where the identity provider puts what the gateway needs (names differ: Entra ID uses
    ``groups``/``roles``, Keycloak ``groups``/``realm_access.roles``, Okta ``groups``)."""

    subject: str = Field("sub", min_length=1)
    groups: str = Field("groups", min_length=1, description="Dotted path to a list of group names.")
    roles: str = Field("roles", min_length=1, description="Dotted path to a list of role names.")
    role_map: dict[str, Literal["monitor", "reader", "contributor", "admin"]] = Field(
        default_factory=dict,
        description="The provider's role names (in the roles claim) -> dualtrack roles; none by default, "
        "so every role above reader is granted explicitly. Set `roles` to the groups claim's path "
        "to grant roles by group.",
    )
    default_role: Literal["monitor", "reader", "contributor", "admin", "none"] = Field(
        "reader", description="The role of a signed-in user none of whose roles is mapped ('none': refuse)."
    )
    clearance_by_group: dict[str, Classification] = Field(
        default_factory=dict,
        description="A group's clearance; a user's clearance is the highest of its groups'.",
    )
    default_clearance: Classification = Classification.INTERNAL


class OidcSettings(_Section):
    """Sign-in with the company's identity provider: bearer JWT access tokens checked against
    the issuer's published keys (JWKS)."""

    issuer: str = Field(description="The provider's issuer URL, exactly as its tokens carry it.")
    audience: list[str] = Field(min_length=1, description="Accepted ``aud`` values (this API).")
    jwks_uri: str | None = Field(None, description="Default: from the issuer's discovery document.")
    algorithms: list[str] = Field(default_factory=lambda: ["RS256"], min_length=1)
    leeway_s: float = Field(30.0, ge=0, le=300, description="Clock skew allowed on exp/nbf/iat.")
    jwks_max_age_s: float = Field(
        600.0, gt=0, le=86_400, description="How long fetched keys are used before they are refreshed."
    )
    jwks_refetch_interval_s: float = Field(
        10.0, ge=0, le=3600, description="At most one fetch this often for a token with an unknown key id."
    )
    jwks_timeout_s: float = Field(5.0, gt=0, le=60)
    max_token_bytes: int = Field(8192, ge=512, le=65_536)
    authorized_parties: list[str] = Field(
        default_factory=list,
        description="When set, the client a token was issued to (``azp``; RFC 9068's "
        "``client_id``; Okta's ``cid``; Entra ID v1's ``appid``) must be one of these: a token "
        "another application obtained for the same audience is refused.",
    )
    require_access_token_type: bool = Field(
        False,
        description="Accept only RFC 9068 access tokens (header ``typ: at+jwt``), for providers "
        "that issue them: an ID token can then never be replayed as an access token.",
    )
    claims: ClaimSettings = ClaimSettings()

    @field_validator("issuer")
    @classmethod
    def _issuer(cls, v: str) -> str:
        return loopback_or_https(v, "gateway.oidc.issuer")

    @field_validator("jwks_uri")
    @classmethod
    def _jwks(cls, v: str | None) -> str | None:
        return None if v is None else loopback_or_https(v, "gateway.oidc.jwks_uri")

    @field_validator("algorithms")
    @classmethod
    def _algorithms(cls, v: list[str]) -> list[str]:
        bad = [a for a in v if a not in ASYMMETRIC_ALGORITHMS]
        if bad:
            raise ValueError(
                f"gateway.oidc.algorithms: {bad} not allowed; allowed: {', '.join(ASYMMETRIC_ALGORITHMS)}"
            )
        return v


class GatewaySettings(_Section):
    """The HTTP front door. Listens on loopback and requires an API key unless a
    deployment says otherwise."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    auth_enabled: bool = True
    api_key: SecretStr | None = Field(
        None, description="The bootstrap admin key: one shared secret with every right; off unless set."
    )
    api_key_file: Path | None = None
    public_url: str | None = Field(None, description="Base URL used in citation links.")
    oidc: OidcSettings | None = Field(None, description="Company sign-in; off when not set.")
    keys_file: Path | None = Field(None, description="Service API keys (`dualtrack keys`); off when not set.")
    tls_cert_file: Path | None = Field(
        None, description="PEM certificate (chain) the gateway serves HTTPS with; with tls_key_file."
    )
    tls_key_file: Path | None = Field(None, description="The certificate's private key (PEM).")
    insecure_http: bool = Field(
        False,
        description="Serve plain HTTP on a non-loopback address: only behind a TLS-terminating proxy "
        "on the same host, since bearer keys and answers would otherwise cross the network in clear.",
    )
    max_request_bytes: int = Field(
        2 * 1024 * 1024,
        ge=1024,
        le=1024**3,
        description="Largest body of any request but an upload (those: ingest.max_file_bytes), "
        "refused from its Content-Length before it is read.",
    )

    @model_validator(mode="after")
    def _open_only_on_loopback(self) -> GatewaySettings:
        loopback = self.host in ("localhost", "::1") or self.host.startswith("127.")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            given = "tls_cert_file" if self.tls_cert_file is not None else "tls_key_file"
            raise ValueError(f"gateway.{given} is set alone: HTTPS needs both tls_cert_file and tls_key_file")
        if not loopback and self.tls_cert_file is None and not self.insecure_http:
            raise ValueError(
                f"gateway.host = {self.host!r} without gateway.tls_cert_file and tls_key_file: bearer keys "
                "and confidential answers would cross the network in clear; give it a certificate (or set "
                "gateway.insecure_http = true behind a TLS-terminating proxy on this host)"
            )
        if not self.auth_enabled and not loopback:
            raise ValueError(
                f"gateway.auth_enabled = false with gateway.host = {self.host!r}: without sign-in "
                "everyone is an admin who reads every label, so the gateway may only listen on loopback"
            )
        return self

    def base_url(self) -> str:
        scheme = "https" if self.tls_cert_file is not None else "http"
        return (self.public_url or f"{scheme}://{self.host}:{self.port}").rstrip("/")


DLP_ENTITIES = (
    *("CREDIT_CARD", "IBAN_CODE", "EMAIL_ADDRESS", "PHONE_NUMBER", "US_SSN", "UK_NINO"),
    *("DE_TAX_ID", "DE_PASSPORT", "DE_ID_CARD", "DE_SOCIAL_SECURITY"),
    *("BIC_ACCOUNT", "PASSPORT", "DATE_OF_BIRTH", "POSTAL_ADDRESS"),
)
"""Personal data the DLP scanner (``services/llm/dlp.py``) looks for: Presidio's entity names and
the project's own (BIC_ACCOUNT, PASSPORT, DATE_OF_BIRTH, POSTAL_ADDRESS)."""


class EndpointSettings(_Section):
    """An LLM endpoint: a Triton model (``/v2/models/<model>/generate[_stream]``) or an
    OpenAI-compatible server (``/v1/chat/completions``)."""

    kind: Literal["triton", "openai"] = "triton"
    url: str = Field(pattern=r"^https?://[^\s/]+(:\d+)?(/.*)?$")
    model: str = Field("ensemble", min_length=1, max_length=200)
    triton_inputs: Literal["ensemble", "llmapi"] = Field(
        "ensemble",
        description="Input names the Triton model takes: the inflight-batching ensemble's, or the "
        "LLM-API model's (sampling_param_*, streaming; cumulative text_output).",
    )
    api_key: SecretStr | None = Field(
        None, description="Bearer token (OpenAI key, or the JWT Istio expects)."
    )
    api_key_file: Path | None = None
    connect_timeout_s: float = Field(2.0, gt=0, le=60)
    first_token_timeout_s: float = Field(
        15.0, gt=0, le=3600, description="Time to the first token (the floor when timeouts are measured)."
    )
    request_timeout_s: float = Field(
        120.0, gt=0, le=7200, description="A whole generation (the floor when timeouts are measured)."
    )
    timeouts: Literal["fixed", "measured"] = Field(
        "fixed",
        description="measured: deadlines follow the endpoint's measured speed (a warm-up request at "
        "start, then every answer) -- for a CPU model whose first token takes minutes on a long prompt.",
    )
    timeout_margin: float = Field(
        3.0,
        ge=1.0,
        le=20.0,
        description="Measured deadlines: this many times what the model needs at its measured speed.",
    )
    tokenizer: Path | None = Field(
        None,
        description="The served model's tokenizer: a Hugging Face tokenizer directory (the model "
        "repository's) or the GGUF file llama.cpp serves. Unset: prompt tokens are approximated.",
    )
    reasoning: bool = Field(
        False, description="The model writes <think>...</think> before its answer (DeepSeek-R1 and distills)."
    )
    reasoning_opened: bool | None = Field(
        None,
        description="The chat template opens <think> in the prompt, so output starts inside it; "
        "unset: read from the tokenizer's template (false without one).",
    )

    def bearer(self) -> str | None:
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        if self.api_key_file is not None:
            return self.api_key_file.read_text(encoding="utf-8").strip()
        return None


class RoutingSettings(_Section):
    """What may go to the cloud, decided on what would be sent (``services/llm/router.py``):
    labels of every passage in the prompt and of whatever the knowledge base holds that resembles
    the question or an earlier turn (found without the client's filter), earlier answers the
    gateway can vouch for, and a DLP scan of the exact outbound prompt."""

    cloud_classifications: list[Classification] = Field(
        default_factory=lambda: [Classification.PUBLIC, Classification.INTERNAL],
        description="Labels that may go to the cloud; never confidential.",
    )
    dlp_entities: list[str] = Field(
        default_factory=lambda: list(DLP_ENTITIES),
        description="Personal data that keeps a request local (DLP entity names).",
    )
    dlp_min_score: float = Field(0.4, ge=0.0, le=1.0, description="A finding at or above this score counts.")
    dlp_allow: list[str] = Field(
        default_factory=list,
        description="Exact values that are not personal data: the organisation's published contacts "
        "(support@..., a switchboard number) that public documents may carry to the cloud.",
    )
    custom_patterns: dict[str, str] = Field(
        default_factory=dict, description="name -> regular expression; a match keeps the request local."
    )
    probe_k: int = Field(5, ge=1, le=50, description="Chunks the unfiltered probe looks at per text.")
    probe_score: float = Field(
        0.5,
        ge=-1.0,
        le=1.0,
        description="Similarity at which a probed chunk counts as carried by the question or a turn.",
    )
    conversation_memory: int = Field(
        50_000,
        ge=0,
        description="Answers remembered so a client's earlier assistant turns can be vouched for.",
    )

    @field_validator("custom_patterns")
    @classmethod
    def _compiles(cls, v: dict[str, str]) -> dict[str, str]:
        for name, pattern in v.items():
            if not _NAME.match(name):
                raise ValueError(f"pattern name {name!r} must be an identifier")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"pattern {name!r} is not a valid regular expression: {exc}") from None
        return v

    @field_validator("cloud_classifications")
    @classmethod
    def _never_confidential(cls, v: list[Classification]) -> list[Classification]:
        if Classification.CONFIDENTIAL in v:
            raise ValueError("may not include 'confidential': confidential content never leaves the premises")
        return v

    @field_validator("dlp_entities")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - set(DLP_ENTITIES))
        if unknown:
            raise ValueError(f"unknown entities {unknown}; known: {', '.join(DLP_ENTITIES)}")
        return v


class BreakerSettings(_Section):
    """Circuit breaker on the cloud endpoint."""

    failure_threshold: int = Field(3, ge=1, le=100, description="Consecutive failures that open it.")
    reset_timeout_s: float = Field(5.0, gt=0, le=3600, description="Open this long before a trial request.")
    probe_interval_s: float = Field(1.0, gt=0, le=600, description="Health probe of the cloud while open.")


class LLMSettings(_Section):
    """The answering model(s). Without ``cloud`` and ``local`` the extractive answerer answers."""

    @field_validator("cloud")
    @classmethod
    def _cloud_over_tls(cls, v: EndpointSettings | None) -> EndpointSettings | None:
        """Prompts and the JWT leave the premises: only over TLS (loopback is for tests/tunnels)."""
        if v is not None and v.url.startswith("http://"):
            host = v.url[len("http://") :].split("/", 1)[0].rsplit(":", 1)[0].strip("[]")
            if host not in ("127.0.0.1", "localhost", "::1"):
                raise ValueError("the cloud endpoint must use https:// (plain http only to loopback)")
        return v

    cloud: EndpointSettings | None = None
    local: EndpointSettings | None = None
    system_prompt: str = Field(
        "You answer questions using only the numbered context passages. Cite the passages you use "
        "as [n]. If the context does not contain the answer, say so.",
        min_length=1,
        max_length=8000,
    )
    context_token_budget: int = Field(3000, ge=64, le=1_000_000, description="Tokens of context in a prompt.")
    max_prompt_tokens: int = Field(
        8000, ge=128, le=1_000_000, description="Longer prompts are refused (413)."
    )
    max_tokens: int = Field(512, ge=1, le=100_000, description="Default generated tokens per answer.")
    temperature: float | None = Field(
        None,
        ge=0,
        le=2,
        description="Sampling temperature when a request sets none (None: the model's default).",
    )
    max_reasoning_tokens: int = Field(
        2048,
        ge=1,
        le=100_000,
        description="A reasoning model's thinking, on top of max_tokens; past it the "
        "answer fails (and fails over) rather than running on.",
    )
    link_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts answers may link to or show images from, besides the gateway's own "
        "(public_url); every other link and image is removed from model output.",
    )
    transport_retries: int = Field(1, ge=0, le=5, description="Retries on connection errors only.")
    routing: RoutingSettings = RoutingSettings()
    breaker: BreakerSettings = BreakerSettings()


_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


class CdcSettings(_Section):
    """Debezium change events from one source table, mapped to documents: each row is a
    document whose text is ``content_column``; ``op: d`` deletes it."""

    bootstrap_servers: str = Field(
        min_length=1,
        description="The site's own Kafka (Kafka Connect's brokers): CDC rows are read from "
        "the premises, never from the cloud's brokers.",
    )
    security_protocol: Literal["PLAINTEXT", "SSL"] = "PLAINTEXT"
    ca_file: Path | None = Field(None, description="CA bundle for SSL; the system store when unset.")
    topic: str = Field(description="The Debezium topic, e.g. ``kb.public.articles``.")
    dead_letter_topic: str = Field(
        "",
        description="On the site's broker; empty means ``<topic>.dlq``. Rows refused there keep "
        "their content: it never left the premises.",
    )
    table: str = Field(
        description="``schema.table`` (or ``db.table``) the events must come from; others are "
        "dead-lettered, so a mis-routed topic never writes into the knowledge base."
    )
    id_column: str = "id"
    content_column: str = "body"
    title_column: str | None = "title"
    classification_column: str | None = Field(
        None, description="A column holding public/internal/confidential; else classification.default."
    )
    format: Literal["txt", "md", "html"] = Field("md", description="How the content column is parsed.")
    doc_id_prefix: str = Field("cdc-", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$|^$")

    @field_validator("topic", "dead_letter_topic")
    @classmethod
    def _topic(cls, v: str) -> str:
        if v and not _TOPIC.match(v):
            raise ValueError("must be 1-249 characters of letters, digits, '.', '_' or '-'")
        return v

    @property
    def dlq_topic(self) -> str:
        return self.dead_letter_topic or f"{self.topic}.dlq"


def _brokers(servers: str) -> set[str]:
    """``host:port`` entries as compared: lower case, no trailing dot, Kafka's port by default."""
    out = set()
    for entry in servers.split(","):
        host, _, port = (
            entry.strip().lower().rpartition(":") if ":" in entry else (entry.strip().lower(), "", "")
        )
        if host or port:
            out.add(f"{host.rstrip('.')}:{port or '9092'}")
    return out


_AWS = re.compile(r"\.amazonaws\.com(\.cn)?$")
_ORIGIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_ORIGIN_RULE = "1-128 letters, digits, '.', '_', ':' or '-', starting with a letter or digit"


class SyncSettings(_Section):
    """Knowledge sync over Kafka (``services.sync``). Production: MSK over TLS with IAM
    (``SASL_SSL`` + ``AWS_MSK_IAM``) or SCRAM; local and tests: ``PLAINTEXT`` on loopback.
    The connection keys come from the cloud stack's outputs (the kb_sync role writes them)."""

    bootstrap_servers: str = Field(
        "", description="host:port,host:port (stack output kafkaBootstrapBrokers)."
    )
    topic: str = "knowledge_updates"
    dead_letter_topic: str = Field(
        "", description="Where unprocessable events go with the reason; empty means ``<topic>.dlq``."
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["AWS_MSK_IAM", "SCRAM-SHA-512", "SCRAM-SHA-256"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ca_file: Path | None = Field(None, description="CA bundle for TLS; the system store when unset.")
    aws_region: str | None = Field(None, description="For AWS_MSK_IAM; else AWS_REGION from the environment.")
    site_id: str = Field(
        "", description="This site's name in events it publishes; empty means the host name."
    )
    group_id: str = Field(
        "dualtrack-kb-sync",
        min_length=1,
        description="One group per knowledge base: every store must read every partition.",
    )
    publish: bool = Field(False, description="Publish this site's ingests and deletes (opt-in).")
    publish_vectors: bool = Field(
        True, description="Ship chunk vectors so receivers with the same model skip re-embedding."
    )
    max_classification: Classification = Field(
        Classification.INTERNAL,
        description="The most sensitive label that may leave the site; confidential never does.",
    )
    outbox_path: Path = Field(
        Path(".dualtrack/sync-outbox.db"),
        description="Durable queue between a local write and the broker's acknowledgement.",
    )
    create_topics: bool = Field(True, description="Create missing topics (MSK has auto-creation off).")
    partitions: int = Field(6, ge=1, le=1000)
    replication_factor: int = Field(3, ge=1, le=10)
    retention_ms: int = Field(
        7 * 24 * 3600 * 1000,
        ge=3600 * 1000,
        le=365 * 24 * 3600 * 1000,
        description="How long the updates topic keeps events (1 hour to 365 days; set on the topic "
        "when it is created and whenever the consumer starts): an erased document's events are "
        "gone from the brokers after it. A site that joins later is seeded with "
        "``dualtrack sync publish-existing`` at each publishing site.",
    )
    signing_key_file: Path | None = Field(
        None,
        description="This site's Ed25519 private key (PEM; ``dualtrack sync keygen``): every event "
        "published is signed with it. Required to publish while require_signatures is on.",
    )
    trusted_keys: dict[str, list[str]] = Field(
        {},
        description="origin -> the base64 Ed25519 public keys its events may be signed with (more "
        "than one during a rotation). An event is applied only if signed by a key of the origin it names.",
    )
    require_signatures: bool = Field(
        True,
        description="Refuse (dead-letter) unsigned, wrongly signed and replayed events. Off only in "
        "a lab: then anyone who can write to the topic can write into this knowledge base.",
    )
    max_clock_skew_s: float = Field(
        300.0,
        ge=0,
        le=3600,
        description="How far a publisher's clock may run ahead of this host's; an event sent longer "
        "ago than retention_ms plus this is a replay.",
    )
    shared_writers: list[str] = Field(
        [],
        description="Origins whose events may replace or delete a document that another origin "
        "owns here ('*': every trusted origin). Empty: only a document's owner (the origin that "
        "created it; this site for its own uploads) changes it.",
    )
    max_message_bytes: int = Field(
        8 * 1024 * 1024,
        ge=64 * 1024,
        le=100 * 1024 * 1024,
        description="Largest event (topic max.message.bytes); a larger one is sent without its "
        "vectors, and refused (logged, counted) if still too large.",
    )
    batch_size: int = Field(500, ge=1, le=100_000, description="Events applied per Milvus round trip.")
    session_timeout_ms: int = Field(10_000, ge=1000, le=300_000)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(9464, ge=0, le=65535, description="0 turns /metrics off.")
    cdc: CdcSettings | None = None

    @field_validator("topic", "dead_letter_topic")
    @classmethod
    def _topic(cls, v: str) -> str:
        if v and not _TOPIC.match(v):
            raise ValueError("must be 1-249 characters of letters, digits, '.', '_' or '-'")
        return v

    @field_validator("max_classification")
    @classmethod
    def _never_confidential(cls, v: Classification) -> Classification:
        if v is Classification.CONFIDENTIAL:
            raise ValueError("confidential content never leaves the premises: use public or internal")
        return v

    @field_validator("trusted_keys")
    @classmethod
    def _trusted(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        from services.sync.signing import SigningError, parse_public

        for origin, keys in v.items():
            if not _ORIGIN.match(origin):
                raise ValueError(f"origin {origin[:40]!r} is not a site name ({_ORIGIN_RULE})")
            for i, text in enumerate(keys):
                try:
                    parse_public(text, f"[{origin!r}][{i}]")
                except SigningError as exc:
                    raise ValueError(str(exc)) from None
        return v

    @field_validator("shared_writers")
    @classmethod
    def _writers(cls, v: list[str]) -> list[str]:
        for origin in v:
            if origin != "*" and not _ORIGIN.match(origin):
                raise ValueError(f"{origin[:40]!r} is neither '*' nor a site name ({_ORIGIN_RULE})")
        return v

    @model_validator(mode="after")
    def _cdc_on_premises(self) -> SyncSettings:
        if self.cdc is None:
            return self
        shared = _brokers(self.cdc.bootstrap_servers) & _brokers(self.bootstrap_servers)
        cloud = [b for b in _brokers(self.cdc.bootstrap_servers) if _AWS.search(b.rsplit(":", 1)[0])]
        if shared or cloud:
            why = "also in sync.bootstrap_servers (the cloud's)" if shared else "an AWS (MSK) broker"
            raise ValueError(
                f"cdc.bootstrap_servers {self.cdc.bootstrap_servers!r} names "
                f"{sorted(shared or cloud)[0]!r}, {why}: a site's database rows are read from its own "
                "Kafka on the premises, never the cloud's"
            )
        return self

    @model_validator(mode="after")
    def _security(self) -> SyncSettings:
        if self.sasl_mechanism and self.security_protocol != "SASL_SSL":
            raise ValueError(f"sasl_mechanism {self.sasl_mechanism} needs security_protocol SASL_SSL")
        if self.security_protocol == "SASL_SSL" and not self.sasl_mechanism:
            raise ValueError("security_protocol SASL_SSL needs sasl_mechanism (AWS_MSK_IAM or SCRAM-SHA-512)")
        if (self.sasl_mechanism or "").startswith("SCRAM") and not (
            self.sasl_username and self.sasl_password
        ):
            raise ValueError(f"sasl_mechanism {self.sasl_mechanism} needs sasl_username and sasl_password")
        return self

    @property
    def dlq_topic(self) -> str:
        return self.dead_letter_topic or f"{self.topic}.dlq"

    @property
    def segment_ms(self) -> int:
        """When the topics roll a new segment: an eighth of the retention, at least 10 minutes
        (Kafka deletes whole segments, so an event lives at most retention plus this)."""
        return min(max(self.retention_ms // 8, 600_000), self.retention_ms)

    @property
    def replay_window_s(self) -> float:
        """The longest an honest message can still be on the topic, as this host's clock sees it."""
        return (self.retention_ms + self.segment_ms) / 1000 + self.max_clock_skew_s

    @property
    def origin(self) -> str:
        return self.site_id or socket.gethostname()


class Settings(BaseSettings):
    """Everything the knowledge base and gateway need."""

    model_config = SettingsConfigDict(
        env_prefix="DUALTRACK_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    milvus: MilvusSettings = MilvusSettings()
    embedding: EmbeddingSettings = EmbeddingSettings()
    chunking: ChunkingSettings = ChunkingSettings()
    classification: ClassificationSettings = ClassificationSettings()
    access: AccessSettings = AccessSettings()
    audit: AuditSettings = AuditSettings()
    ingest: IngestSettings = IngestSettings()
    retrieval: RetrievalSettings = RetrievalSettings()
    gateway: GatewaySettings = GatewaySettings()
    llm: LLMSettings = LLMSettings()
    sync: SyncSettings = SyncSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = config_file()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)


def config_file() -> Path | None:
    """The TOML settings file in effect: ``DUALTRACK_CONFIG`` or ``./dualtrack.toml``."""
    explicit = os.environ.get("DUALTRACK_CONFIG")
    if explicit:
        return Path(explicit)
    local = Path("dualtrack.toml")
    return local if local.is_file() else None


def load_settings(**overrides: Any) -> Settings:
    """Build :class:`Settings`, turning validation failures into one readable error."""
    cfg = config_file()
    if cfg is not None and not cfg.is_file():
        raise ConfigError(f"DUALTRACK_CONFIG={cfg}: file not found")
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, cfg)) from None
    except (OSError, ValueError) as exc:  # unreadable / malformed TOML, or an env value that is not JSON
        if "EnvSettingsSource" in str(exc):
            raise ConfigError(
                f"cannot read settings from the environment: {exc}; a DUALTRACK_* variable holding a "
                "list or a mapping takes JSON (e.g. DUALTRACK_SYNC__SHARED_WRITERS='[\"*\"]')"
            ) from None
        raise ConfigError(f"{cfg}: cannot read settings: {exc}") from None


def format_validation_error(exc: ValidationError, cfg: Path | None = None) -> str:
    """One line per problem: ``key = value: what is allowed`` plus where to set it."""
    lines = ["invalid settings:"]
    for err in exc.errors(include_url=False):
        key = ".".join(str(p) for p in err["loc"])
        env = "DUALTRACK_" + "__".join(str(p) for p in err["loc"]).upper()
        value = err.get("input")
        shown = "<missing>" if err["type"] == "missing" else _redact(key, value)
        lines.append(f"  - {key} = {shown}: {err['msg']} (env {env}" + (f" or {cfg})" if cfg else ")"))
    return "\n".join(lines)


def _redact(key: str, value: object) -> str:
    text = repr(_masked(key, value))
    return text if len(text) <= 120 else text[:117] + "..."


def _masked(key: str, value: object) -> object:
    """``value`` with every secret in it masked: a section-wide error (a model validator) shows
    the whole section, whose other keys may hold the API key or a password."""
    if any(s in key.lower() for s in ("key", "token", "password", "secret")) and not key.endswith("_file"):
        return "***"
    if key.endswith("uri") and isinstance(value, str) and "@" in value:
        return value.split("://", 1)[0] + "://***@" + value.rsplit("@", 1)[1]
    if isinstance(value, dict):
        return {k: _masked(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(key, v) for v in value]
    return value
