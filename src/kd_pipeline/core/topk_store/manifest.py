"""The top-k artifact's `manifest.json`: what the artifact was made from, how it is encoded,
and the exact bytes of every shard, as a dataclass that round-trips through JSON (sorted keys).

The manifest is the artifact's contract with its readers: a reader refuses a schema version or
codec it does not know, verifies every shard against its sha256 before decoding it, and a
trainer refuses an artifact whose teacher/tokenizer/corpus fields do not match its own
(`Manifest.check_compatible`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from kd_pipeline.core.atomic import sha256_file
from kd_pipeline.core.topk_store.codec import CAPTURE_MODES

__all__ = [
    "COVERAGE_BINS",
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "ArtifactMismatchError",
    "ArtifactSource",
    "Manifest",
    "ManifestMismatchError",
    "ShardInfo",
    "TopKStoreError",
    "check_artifact_compatibility",
    "coverage_histogram",
    "manifest_sha256",
]

SCHEMA_VERSION = 3
"""3: `capture_mode` (`topk`, `top_p`, `sampled`: variable rows) and `capture_params`; shards count
their stored `entries`.
2: per-row teacher log-normalizers at `logz_temperatures` (exact tempered tail mass); read as a
`topk` artifact of version 3.
1: top-k log-probs only; such artifacts are refused (re-extract), they cannot be tempered exactly."""
READABLE_SCHEMA_VERSIONS = (2, 3)
CAPTURE_PARAMS = {"topk": (), "top_p": ("p",), "sampled": ("draws", "proposal_temperature")}
"""Per capture mode, the `capture_params` its consumers read (training: the sampled estimator's
`draws` and `proposal_temperature`); checked to be present when a manifest is built or read."""
MANIFEST_NAME = "manifest.json"
# Teacher top-k coverage (sum of p over the stored top-k, per trained token) is kept as counts in
# this many equal bins over [0, 1]: counts add up across shards and ranks, unlike quantiles.
COVERAGE_BINS = 20
_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


class TopKStoreError(ValueError):
    """Base class of the artifact store's errors about bad files or mismatched artifacts."""


class ManifestMismatchError(TopKStoreError):
    """A manifest field differs from what the caller (trainer, resumed writer, other rank) expects."""


class ArtifactMismatchError(ManifestMismatchError):
    """The top-k artifact was not made for this corpus / student tokenizer / vocabulary / k."""


@dataclass(frozen=True)
class ArtifactSource:
    """What produced an artifact's numbers; fixed before the first shard is written.

    Attributes:
        teacher_path: where the teacher was loaded from (as given to the extraction).
        teacher_config_sha256: sha256 of the teacher's canonical config.
        teacher_weights_sha256: sha256 of the teacher's weights.
        tokenizer_sha256: sha256 of the tokenizer (the corpus and student must share it).
        vocab_size: teacher vocabulary size; every stored id is below it.
        k: top-k entries stored per trained token.
        capture_dtype: dtype of the teacher forward that produced the logits ("bfloat16", ...).
        capture_temperature: temperature applied before the log-softmax (1.0: none).
        corpus_fingerprint: fingerprint of the tokenized corpus the rows belong to.
        logz_temperatures: the teacher temperatures at which every row stores its
            log-normalizer (the `logz` columns, in this order): sorted, distinct, always
            including `capture_temperature` (whose column is 0 up to rounding). A training
            temperature outside this list cannot use `tail_bucket` exactly.
    """

    teacher_path: str
    teacher_config_sha256: str
    teacher_weights_sha256: str
    tokenizer_sha256: str
    vocab_size: int
    k: int
    capture_dtype: str
    capture_temperature: float
    corpus_fingerprint: str
    logz_temperatures: tuple[float, ...] = ()
    capture_mode: str = "topk"
    capture_params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.capture_mode not in CAPTURE_MODES:
            raise ValueError(f"ArtifactSource.capture_mode must be one of {list(CAPTURE_MODES)}, "
                             f"got {self.capture_mode!r}")
        object.__setattr__(self, "capture_params", dict(self.capture_params))
        self._check_capture_params()
        for name in ("teacher_path", "teacher_config_sha256", "teacher_weights_sha256", "tokenizer_sha256",
                     "capture_dtype", "corpus_fingerprint"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"ArtifactSource.{name} must be a str, got {getattr(self, name)!r}")
        if not isinstance(self.vocab_size, int) or self.vocab_size < 1:
            raise ValueError(f"ArtifactSource.vocab_size must be a positive int, got {self.vocab_size!r}")
        if not isinstance(self.k, int) or not 1 <= self.k <= self.vocab_size:
            raise ValueError(f"ArtifactSource.k must be an int in [1, vocab_size], got {self.k!r}")
        if not (isinstance(self.capture_temperature, (int, float)) and self.capture_temperature > 0):
            raise ValueError(f"ArtifactSource.capture_temperature must be > 0, got {self.capture_temperature!r}")
        object.__setattr__(self, "capture_temperature", float(self.capture_temperature))
        temperatures = self.logz_temperatures
        if isinstance(temperatures, (str, bytes)) or not all(
                isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t > 0
                for t in temperatures):
            raise ValueError(f"ArtifactSource.logz_temperatures must be finite numbers > 0, got {temperatures!r}")
        object.__setattr__(self, "logz_temperatures",
                           tuple(sorted({float(t) for t in temperatures} | {self.capture_temperature})))

    def _check_capture_params(self) -> None:
        """The `capture_params` keys the mode's readers use (`extraction.capture.CaptureConfig.
        manifest_params` writes them), present and positive numbers; a manifest's reader names its
        file (`Manifest.from_dict`)."""
        for key in CAPTURE_PARAMS[self.capture_mode]:
            value = self.capture_params.get(key)
            if key not in self.capture_params:
                raise ValueError(f"ArtifactSource.capture_params of a {self.capture_mode!r} artifact has no "
                                 f"{key!r} (it holds {sorted(self.capture_params)}; a {self.capture_mode!r} "
                                 f"artifact needs {list(CAPTURE_PARAMS[self.capture_mode])}): re-extract it")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"ArtifactSource.capture_params[{key!r}] of a {self.capture_mode!r} artifact must "
                                 f"be a number > 0, got {value!r}")

    @property
    def logz_scales(self) -> tuple[float, ...]:
        """Per `logz` column, the scale `s = capture_temperature / temperature` that tempers the
        stored distribution to that temperature (`p**s / Z_s`)."""
        return tuple(self.capture_temperature / t for t in self.logz_temperatures)

    def logz_column(self, target_logits_scale: float, needed_by: str = "training") -> int:
        """Index of the `logz` column for a loss that tempers the stored log-probs by
        `target_logits_scale` (teacher temperature `capture_temperature / target_logits_scale`).

        Raises:
            ArtifactMismatchError: the artifact holds no log-normalizer at that temperature;
                the message names the temperatures it has.
        """
        temperature = self.capture_temperature / float(target_logits_scale)
        for column, held in enumerate(self.logz_temperatures):
            if math.isclose(held, temperature, rel_tol=1e-6):
                return column
        raise ArtifactMismatchError(
            f"{needed_by} tempers the teacher to temperature {temperature:g} (capture temperature "
            f"{self.capture_temperature:g} / target_logits_scale {float(target_logits_scale):g}), but the artifact "
            f"holds teacher log-normalizers only at temperatures {list(self.logz_temperatures)}: use a "
            f"target_logits_scale of {[round(self.capture_temperature / t, 6) for t in self.logz_temperatures]}, "
            "topk_normalization 'renormalize' (exact at any temperature), or re-extract with that temperature in "
            "teacher_logits.logz_temperatures")


@dataclass(frozen=True)
class ShardInfo:
    """One Parquet shard as written: enough to verify it and to sum statistics without opening it.

    Attributes:
        file: file name inside the artifact directory.
        rank: rank that wrote it; index: its number among that rank's shards.
        rows: samples (Parquet rows); trained_tokens: top-k rows over all its samples.
        bytes: file size; sha256: hex digest of the file.
        coverage_histogram: counts of trained tokens per `COVERAGE_BINS` bin of sum_k p.
        coverage_sum: sum over trained tokens of sum_k p (for the mean).
        entries: stored (id, log-prob) entries over its rows (rows x k for `topk`); None in
            schema 2 manifests.
    """

    file: str
    rank: int
    index: int
    rows: int
    trained_tokens: int
    bytes: int
    sha256: str
    coverage_histogram: tuple[int, ...]
    coverage_sum: float
    entries: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "coverage_histogram", tuple(int(c) for c in self.coverage_histogram))
        if len(self.coverage_histogram) != COVERAGE_BINS:
            raise ValueError(f"shard {self.file}: coverage_histogram needs {COVERAGE_BINS} bins, "
                             f"got {len(self.coverage_histogram)}")
        if sum(self.coverage_histogram) != self.trained_tokens:
            raise ValueError(f"shard {self.file}: coverage_histogram counts {sum(self.coverage_histogram)} tokens, "
                             f"trained_tokens is {self.trained_tokens}")


def coverage_histogram(topk_logprobs: np.ndarray) -> tuple[np.ndarray, float]:
    """Histogram (COVERAGE_BINS counts over [0, 1]) and sum of per-row top-k mass sum_k p.

    Args:
        topk_logprobs: (n, k) full-vocabulary log-probs.
    """
    coverage = np.exp(np.asarray(topk_logprobs, dtype=np.float64)).sum(axis=1)
    bins = np.clip((coverage * COVERAGE_BINS).astype(np.int64), 0, COVERAGE_BINS - 1)
    return np.bincount(bins, minlength=COVERAGE_BINS), float(coverage.sum())


@dataclass(frozen=True)
class Manifest:
    """Everything `manifest.json` holds. Build with `Manifest.create`, load with `Manifest.read`.

    Besides the fields, the JSON carries derived totals and the coverage summary for people and
    tools (`num_samples`, `num_trained_tokens`, `num_bytes`, `topk_coverage`); `from_dict`
    checks them against the shards.
    """

    source: ArtifactSource
    codec_name: str
    codec_settings: Mapping[str, Any]
    shard_tokens: int
    samples_per_row_group: int
    world_size: int
    shards: tuple[ShardInfo, ...] = ()
    schema_version: int = SCHEMA_VERSION

    # Flat field names (JSON keys, `field_value` names) besides the ArtifactSource ones and "shards".
    _OWN_FIELDS = ("codec_name", "codec_settings", "shard_tokens", "samples_per_row_group", "world_size",
                   "schema_version")

    @property
    def num_samples(self) -> int:
        return sum(shard.rows for shard in self.shards)

    @property
    def num_trained_tokens(self) -> int:
        return sum(shard.trained_tokens for shard in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(shard.bytes for shard in self.shards)

    def topk_coverage(self) -> dict[str, Any]:
        """Mean, histogram and approximate quantiles (bin interpolation) of sum_k p per trained token."""
        counts = np.zeros(COVERAGE_BINS, dtype=np.int64)
        total = 0.0
        for shard in self.shards:
            counts += np.asarray(shard.coverage_histogram, dtype=np.int64)
            total += shard.coverage_sum
        tokens = int(counts.sum())
        summary: dict[str, Any] = {"histogram": counts.tolist(), "bins": COVERAGE_BINS,
                                   "mean": total / tokens if tokens else None}
        cumulative = np.cumsum(counts)
        quantiles = {}
        for q in _QUANTILES:
            if not tokens:
                quantiles[f"p{round(q * 100):02d}"] = None
                continue
            target = q * tokens
            b = int(np.searchsorted(cumulative, target))
            below = cumulative[b - 1] if b else 0
            fraction = (target - below) / counts[b] if counts[b] else 0.0
            quantiles[f"p{round(q * 100):02d}"] = round((b + fraction) / COVERAGE_BINS, 6)
        summary["quantiles"] = quantiles
        return summary

    @classmethod
    def create(cls, source: ArtifactSource, codec_name: str, codec_settings: Mapping[str, Any], *,
               shard_tokens: int, samples_per_row_group: int, world_size: int,
               shards: Sequence[ShardInfo] = ()) -> "Manifest":
        return cls(source=source, codec_name=codec_name, codec_settings=dict(codec_settings),
                   shard_tokens=int(shard_tokens), samples_per_row_group=int(samples_per_row_group),
                   world_size=int(world_size), shards=tuple(shards))

    def with_shards(self, shards: Sequence[ShardInfo]) -> "Manifest":
        return Manifest(self.source, self.codec_name, dict(self.codec_settings), self.shard_tokens,
                        self.samples_per_row_group, self.world_size, tuple(shards), self.schema_version)

    def header(self) -> dict[str, Any]:
        """Every field except the shards: what two parts of one artifact must agree on."""
        header = asdict(self.source)
        header.update(codec_name=self.codec_name, codec_settings=dict(self.codec_settings),
                      shard_tokens=self.shard_tokens, samples_per_row_group=self.samples_per_row_group,
                      world_size=self.world_size, schema_version=self.schema_version)
        return header

    def field_value(self, name: str) -> Any:
        """Value of a manifest field by its flat name (`vocab_size`, `codec_name`, ...)."""
        header = self.header()
        if name not in header:
            raise ValueError(f"unknown manifest field {name!r}; fields: {sorted(header)}")
        return header[name]

    def check_compatible(self, expected: Mapping[str, Any], against: str = "the caller") -> None:
        """Raise if any named field differs from the expected value.

        Args:
            expected: field name (see `header()`) -> the value the caller needs.
            against: who holds the expected values, for the message, e.g. "the student tokenizer".

        Raises:
            ManifestMismatchError: e.g. "manifest field 'vocab_size' is 49152 but the student
                tokenizer has 32000"; the first mismatching field in sorted name order.
        """
        for name in sorted(expected):
            actual, wanted = self.field_value(name), expected[name]
            if not _same(actual, wanted):
                raise ManifestMismatchError(f"manifest field {name!r} is {actual!r} but {against} has {wanted!r}")

    # -- JSON ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = self.header()
        data["shards"] = [asdict(shard) | {"coverage_histogram": list(shard.coverage_histogram)}
                          for shard in self.shards]
        data.update(num_samples=self.num_samples, num_trained_tokens=self.num_trained_tokens,
                    num_bytes=self.num_bytes, topk_coverage=self.topk_coverage())
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], origin: str = "manifest") -> "Manifest":
        """Inverse of `to_dict`.

        Raises:
            TopKStoreError: unsupported schema version, missing or unknown fields, or totals that
                disagree with the shards; the message names `origin` and the field.
        """
        data = dict(data)
        version = data.get("schema_version")
        if version == 2:  # the same fields, a topk artifact: read as version 3
            data.update(capture_mode=data.get("capture_mode", "topk"), capture_params=data.get("capture_params", {}),
                        schema_version=SCHEMA_VERSION)
            version = SCHEMA_VERSION
        if version != SCHEMA_VERSION:
            why = (" (version 1 artifacts have no per-row teacher log-normalizers, so the tempered tail is "
                   "not known)" if version == 1 else "")
            # A mismatch (not just a bad file): a resumed extraction over it starts over.
            raise ManifestMismatchError(
                f"{origin}: unsupported schema_version {version!r} (this code reads versions "
                f"{list(READABLE_SCHEMA_VERSIONS)})"
                f"{why}; re-extract: `kedro run --pipelines teacher_logits`")
        derived = {name: data.pop(name, None) for name in ("num_samples", "num_trained_tokens", "num_bytes",
                                                           "topk_coverage")}
        source_names = [f.name for f in fields(ArtifactSource)]
        known = set(source_names) | set(cls._OWN_FIELDS) | {"shards"}
        unknown = sorted(set(data) - known)
        missing = sorted(known - set(data))
        if unknown or missing:
            raise TopKStoreError(f"{origin}: unknown fields {unknown} / missing fields {missing}")
        try:
            source = ArtifactSource(**{name: data[name] for name in source_names})
            shards = tuple(ShardInfo(**shard) for shard in data["shards"])
        except (TypeError, ValueError) as error:
            raise TopKStoreError(f"{origin}: {error}") from error
        manifest = cls(source=source, codec_name=data["codec_name"], codec_settings=dict(data["codec_settings"]),
                       shard_tokens=data["shard_tokens"], samples_per_row_group=data["samples_per_row_group"],
                       world_size=data["world_size"], shards=shards, schema_version=version)
        for name in ("num_samples", "num_trained_tokens", "num_bytes"):
            if derived[name] is not None and derived[name] != getattr(manifest, name):
                raise TopKStoreError(f"{origin}: field {name!r} is {derived[name]} but the shards add up to "
                                     f"{getattr(manifest, name)}")
        return manifest

    @classmethod
    def read(cls, path: str | os.PathLike) -> "Manifest":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise
        except (OSError, ValueError) as error:  # unreadable or not JSON (e.g. a torn hand copy)
            raise TopKStoreError(f"{path}: not a readable manifest ({error})") from error
        return cls.from_dict(data, origin=str(path))


def _same(actual: Any, wanted: Any) -> bool:
    """Equality where 1 == 1.0 but True != 1, and NaN never matches."""
    if isinstance(actual, bool) or isinstance(wanted, bool):
        return type(actual) is type(wanted) and actual == wanted
    if isinstance(actual, float) or isinstance(wanted, float):
        try:
            return float(actual) == float(wanted)
        except (TypeError, ValueError):
            return False
    return actual == wanted


def manifest_sha256(directory: str | os.PathLike) -> str | None:
    """sha256 of an artifact's `manifest.json` (its identity: every shard's sha256 is inside), or
    None when the directory has none."""
    path = Path(directory) / MANIFEST_NAME
    return sha256_file(path) if path.is_file() else None


def check_artifact_compatibility(manifest: Manifest, *, corpus_fingerprint: str, vocab_size: int,
                                 tokenizer_hash: str | None = None, k: int | None = None,
                                 teacher_identity: Mapping[str, Any] | None = None,
                                 teacher_dir: str | os.PathLike | None = None) -> int:
    """Refuse a top-k artifact made for another corpus, tokenizer, vocabulary, teacher or a
    smaller k: the check every consumer of an artifact (training, evaluation) runs, through
    `check_compatible`.

    Args:
        manifest: the artifact's manifest (`TopKReader.manifest`).
        corpus_fingerprint: `TokenizedCorpus.fingerprint` of the corpus the consumer reads.
        vocab_size: rows of the student's lm_head.
        tokenizer_hash: `models.identity.tokenizer_hash` of the student's tokenizer (None: not checked).
        k: top-k columns the consumer uses (None: all of the artifact's).
        teacher_identity: `models.identity.model_identity` of the prepared teacher folder
            (`config_sha256`, `weights_sha256`); a teacher swapped since the extraction (same
            tokenizer, other weights) keeps the corpus fingerprint, so only this tells. None: not
            checked.
        teacher_dir: that folder, for the message.

    Returns:
        The k to use.

    Raises:
        ArtifactMismatchError: naming the first mismatching manifest field.
    """
    teacher = dict(teacher_identity or {})
    teacher_holder = f"the teacher folder {teacher_dir}" if teacher_dir is not None else "the teacher"
    checks = (
        ("corpus_fingerprint", corpus_fingerprint, "the tokenized corpus"),
        ("tokenizer_sha256", tokenizer_hash, "the student tokenizer"),
        ("vocab_size", vocab_size, "the student lm_head"),
        ("teacher_config_sha256", teacher.get("config_sha256"), teacher_holder),
        ("teacher_weights_sha256", teacher.get("weights_sha256"), teacher_holder),
    )
    for name, expected, holder in checks:
        if expected is None:
            continue
        try:
            manifest.check_compatible({name: expected}, against=holder)
        except ManifestMismatchError as error:
            raise ArtifactMismatchError(
                f"top-k artifact {error}: the artifact was made for another corpus or teacher; "
                "re-run `kedro run --pipelines teacher_logits`"
            ) from None
    stored_k = manifest.source.k
    if k is not None and not 1 <= k <= stored_k:
        raise ArtifactMismatchError(
            f"top-k artifact manifest field 'k' is {stored_k} but the run asks for k={k}: use a k between 1 "
            "and the artifact's, or regenerate the artifact with a larger k"
        )
    return int(stored_k if k is None else k)
