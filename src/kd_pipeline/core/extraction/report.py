"""Statistics of extraction runs: the per-rank counters, their totals, and `extraction_run.json`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from kd_pipeline.core.atomic import write_json_atomic

RUN_STATS_FILE = "extraction_run.json"


def new_stats() -> dict:
    return {"batches": 0, "samples": 0, "tokens": 0, "padded_tokens": 0, "trained_tokens": 0,
            "target_in_topk": 0, "target_nll_sum": 0.0, "seconds": 0.0}


def record_run(out_dir: Path, run: dict, keep: int = 20) -> None:
    """Append this run's totals to `extraction_run.json` (`runs`, newest last; a resumed or
    repaired artifact has several, a re-run with nothing to do adds one with no tokens)."""
    path = Path(out_dir) / RUN_STATS_FILE
    runs: list = []
    try:
        runs = list(json.loads(path.read_text(encoding="utf-8")).get("runs", []))
    except (OSError, ValueError, AttributeError):
        pass
    write_json_atomic(path, {"runs": (runs + [{**run, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}])[-keep:]})


def last_runs(out_dir: str | os.PathLike) -> tuple[dict | None, dict | None]:
    """(latest run, latest run that computed tokens) from `extraction_run.json`."""
    try:
        runs = json.loads((Path(out_dir) / RUN_STATS_FILE).read_text(encoding="utf-8")).get("runs", [])
    except (OSError, ValueError, AttributeError):
        return None, None
    working = [run for run in runs if run.get("tokens")]
    return (runs[-1] if runs else None), (working[-1] if working else None)


def summarize_runs(all_stats: Sequence[Mapping[str, Any]]) -> dict:
    """Totals over ranks: tokens, trained tokens, wall seconds (slowest rank), tokens/s, and the
    teacher's target statistics over the samples computed in this run."""
    tokens = sum(s["tokens"] for s in all_stats)
    trained = sum(s["trained_tokens"] for s in all_stats)
    seconds = max((s["seconds"] for s in all_stats), default=0.0)
    in_topk = sum(s["target_in_topk"] for s in all_stats)
    nll = sum(s["target_nll_sum"] for s in all_stats)
    return {
        "world_size": len(all_stats),
        "device": all_stats[0]["device"] if all_stats else None,
        "capture_dtype": all_stats[0]["capture_dtype"] if all_stats else None,
        "samples_computed": sum(s["samples"] for s in all_stats),
        "samples_skipped_done": sum(s["samples_skipped_done"] for s in all_stats),
        "repaired_shards": sorted(name for s in all_stats for name in s["repaired_shards"]),
        "restarted": any(s["restarted"] for s in all_stats),
        "tokens": tokens,
        "padded_tokens": sum(s["padded_tokens"] for s in all_stats),
        "trained_tokens": trained,
        "seconds": seconds,
        "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
        "trained_tokens_per_second": round(trained / seconds, 1) if seconds else None,
        "target_in_topk_rate": round(in_topk / trained, 6) if trained else None,
        "teacher_target_nll": round(nll / trained, 6) if trained else None,
        "per_rank": [{key: s[key] for key in ("rank", "samples", "tokens", "trained_tokens", "seconds",
                                              "tokens_per_second")} for s in all_stats],
    }


def artifact_report(topk_dir: str | os.PathLike) -> dict:
    """Tokens, throughput of the last run, top-k coverage and bytes per trained token of an artifact."""
    from kd_pipeline.core.topk_store import MANIFEST_NAME, Manifest

    topk_dir = Path(topk_dir)
    manifest = Manifest.read(topk_dir / MANIFEST_NAME)
    latest, measured = last_runs(topk_dir)
    tokens = manifest.num_trained_tokens
    source = manifest.source
    return {
        "samples": manifest.num_samples,
        "trained_tokens": tokens,
        "shards": len(manifest.shards),
        "bytes": manifest.num_bytes,
        "bytes_per_trained_token": round(manifest.num_bytes / tokens, 2) if tokens else None,
        "k": source.k,
        "capture_mode": source.capture_mode,
        "capture_params": dict(source.capture_params),
        "entries_per_trained_token": entries_per_token(manifest),
        "codec": manifest.codec_name,
        "codec_settings": dict(manifest.codec_settings),
        "capture_dtype": source.capture_dtype,
        "capture_temperature": source.capture_temperature,
        "logz_temperatures": list(source.logz_temperatures),
        "vocab_size": source.vocab_size,
        "topk_coverage": manifest.topk_coverage(),
        # The latest run (a re-run with nothing to do computes no tokens) and the latest run
        # that computed tokens (its throughput and the teacher's target statistics).
        "last_run": _pick(latest, ("finished_at", "samples_computed", "samples_skipped_done", "repaired_shards",
                                   "restarted", "tokens", "seconds")),
        "throughput": _pick(measured, ("finished_at", "device", "capture_dtype", "world_size", "tokens",
                                       "trained_tokens", "seconds", "tokens_per_second", "trained_tokens_per_second",
                                       "target_in_topk_rate", "teacher_target_nll")),
    }


def entries_per_token(manifest) -> float | None:
    """Mean stored entries per trained token of an artifact (`topk_store.Manifest`): k for a
    `topk` artifact (its schema 2 shards do not count their entries), else the shards' count;
    None without trained tokens."""
    if not manifest.num_trained_tokens:
        return None
    if manifest.source.capture_mode == "topk":
        return float(manifest.source.k)
    return round(sum(shard.entries for shard in manifest.shards) / manifest.num_trained_tokens, 3)


def _pick(run: dict | None, keys: tuple[str, ...]) -> dict | None:
    return None if run is None else {key: run.get(key) for key in keys}
