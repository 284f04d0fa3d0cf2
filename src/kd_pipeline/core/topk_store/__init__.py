"""Teacher top-k artifact store: a directory of Parquet shards plus `manifest.json`.

Write with `TopKShardWriter` (atomic shards, resumable, one writer per rank, `merge_manifests`
on rank 0), read with `TopKReader` (random access by sample id, sha256-verified shards, decoding
into torch tensors). Payloads go through a registered codec: `raw` (exact reference) or
`logquant_zstd` (compact default). Layout and contracts: docs/architecture.md.
"""

from kd_pipeline.core.topk_store.codec import (
    CODECS,
    RawCodec,
    TopKArrays,
    TopKCodec,
    get_codec,
    register_codec,
)
from kd_pipeline.core.topk_store.logquant import LogQuantZstdCodec
from kd_pipeline.core.topk_store.manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    ArtifactMismatchError,
    ArtifactSource,
    Manifest,
    ManifestMismatchError,
    ShardInfo,
    TopKStoreError,
    check_artifact_compatibility,
    manifest_sha256,
)
from kd_pipeline.core.topk_store.reader import (
    DEFAULT_FULL_VERIFY_MAX_BYTES,
    VERIFY_MODES,
    MissingSampleError,
    ShardCorruptError,
    TopKBatch,
    TopKReader,
    TopKSample,
)
from kd_pipeline.core.topk_store.writer import TopKShardWriter, merge_manifests

DEFAULT_CODEC = LogQuantZstdCodec.name

__all__ = [
    "CODECS",
    "DEFAULT_CODEC",
    "DEFAULT_FULL_VERIFY_MAX_BYTES",
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "ArtifactMismatchError",
    "ArtifactSource",
    "LogQuantZstdCodec",
    "Manifest",
    "ManifestMismatchError",
    "MissingSampleError",
    "RawCodec",
    "ShardCorruptError",
    "ShardInfo",
    "TopKArrays",
    "TopKBatch",
    "TopKCodec",
    "TopKReader",
    "TopKSample",
    "TopKShardWriter",
    "TopKStoreError",
    "VERIFY_MODES",
    "check_artifact_compatibility",
    "get_codec",
    "manifest_sha256",
    "merge_manifests",
    "register_codec",
]
