"""Hub ids, offline-capable and never offline-forced.

A model, embedder or GGUF named by hub id is taken from the local HF cache when it is there (no network call
at all), downloaded with a progress bar when it is not and the network allows, and refused at once, with the
id and how to fetch it, when `HF_HUB_OFFLINE=1` or the hub cannot be reached. huggingface_hub's own calls
have no timeout (`repo_info` waits as long as the socket does), so one probe with a short timeout decides
first: a missing file fails in well under 5 s however the network is down (tests/unit/test_hub.py).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from finemed_cli.errors import ModelError

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0

# What a causal LM or sentence-transformers model needs; .bin weights only when a repo has no safetensors.
MODEL_FILES = ("*.json", "*.safetensors", "*.model", "*.jinja", "*.txt", "*.tiktoken")
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class HubRef:
    """`org/name` (a model repository) or `org/name:FILE.gguf` / `org/name:QUANT` (one GGUF in it)."""

    repo_id: str
    gguf: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f":{self.gguf}" if self.gguf else "")


def parse_hub_ref(value: str) -> HubRef | None:
    """The hub reference a --model/--embedder value spells, or None when it is not one."""
    repo, _, spec = value.partition(":")
    if not _REPO.match(repo) or ".." in repo or "--" in repo:
        return None
    if spec and ("/" in spec or "\\" in spec or ".." in spec):
        return None
    return HubRef(repo, spec or None)


def hub_offline_env() -> bool:
    """Whether the environment forbids the hub (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE), for models and datasets."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.strip().upper() in ("1", "ON", "YES", "TRUE") or bool(constants.HF_HUB_OFFLINE)


def _endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_cache_dir() -> str:
    """The hub cache as the environment names it now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return constants.HF_HUB_CACHE


def _how_to_fetch(ref: HubRef, what: str) -> str:
    files = (f" {ref.gguf}" if ref.gguf.endswith(".gguf") else f" --include '*{ref.gguf}*'") if ref.gguf else ""
    return (f"on a machine with network run `hf download {ref.repo_id}{files}` and copy {hub_cache_dir()} here "
            f"(or pass a local {what} path)")


def _cached(ref: HubRef, patterns: tuple[str, ...] | None) -> Path | None:
    """The cached snapshot of `ref`, or None. Reads the cache only: no network call."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(ref.repo_id, local_files_only=True, cache_dir=hub_cache_dir(),
                                      allow_patterns=list(patterns) if patterns else None))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def _probe(ref: HubRef, what: str) -> list[str]:
    """The repository's file list, asked with a short timeout; a clear error when the hub cannot answer."""
    import httpx
    from huggingface_hub.utils import build_hf_headers

    url = f"{_endpoint()}/api/models/{ref.repo_id}"
    try:
        reply = httpx.get(url, headers=build_hf_headers(), timeout=PROBE_TIMEOUT_S, follow_redirects=True)
    except (httpx.HTTPError, OSError) as e:
        raise ModelError(f"{what} {str(ref)!r} is not in the local HF cache and the hub cannot be reached "
                         f"({type(e).__name__}); {_how_to_fetch(ref, what)}") from None
    if reply.status_code in (401, 403):
        raise ModelError(f"{what} {ref.repo_id!r} is gated or private on the hub: accept its licence on its page, "
                         "then log in with `hf auth login` (or set HF_TOKEN) and rerun")
    if reply.status_code == 404:
        raise ModelError(f"{what} {ref.repo_id!r}: no such repository on the hub (or it is private); check the "
                         "id, or pass a local path")
    if reply.status_code != 200:
        raise ModelError(f"{what} {ref.repo_id!r}: the hub answered HTTP {reply.status_code}; try again later or "
                         f"{_how_to_fetch(ref, what)}")
    try:
        return [s["rfilename"] for s in reply.json().get("siblings", [])]
    except (ValueError, KeyError, TypeError, AttributeError):
        return []


def _model_patterns(files: list[str]) -> tuple[str, ...]:
    if any(f.endswith(".safetensors") for f in files) or not files:
        return MODEL_FILES
    return MODEL_FILES + ("*.bin",)


def pick_gguf(ref: HubRef, files: list[str]) -> str:
    """The one GGUF file `ref` names among a repository's files: an exact name, or a quant tag (Q4_K_M)."""
    ggufs = sorted(f for f in files if f.endswith(".gguf"))
    if ref.gguf and ref.gguf.endswith(".gguf"):
        if ref.gguf in ggufs or not ggufs:
            return ref.gguf
        raise ModelError(f"{ref.repo_id} has no file {ref.gguf!r}; it has {', '.join(ggufs[:8])}")
    if ref.gguf:
        tag = ref.gguf.lower()
        hits = [f for f in ggufs if re.search(rf"(^|[-_.]){re.escape(tag)}([-_.]|$)",
                                              Path(f).stem.lower() + ".")]
    else:
        hits = ggufs
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise ModelError(f"{ref}: no GGUF file matches; the repository has {', '.join(ggufs[:8]) or 'none'}")
    raise ModelError(f"{ref}: several GGUF files match ({', '.join(hits[:8])}); name one, e.g. "
                     f"{ref.repo_id}:{hits[0]}")


def hub_snapshot(ref: HubRef, what: str = "model") -> Path:
    """A local directory holding `ref`'s model files (the cache when it has them; a download otherwise)."""
    cached = _cached(ref, MODEL_FILES)
    if cached is not None and ((cached / "config.json").is_file() or (cached / "modules.json").is_file()):
        return cached
    ggufs = sorted(p.name for p in cached.glob("*.gguf")) if cached is not None else []
    if ggufs:
        raise ModelError(f"{ref.repo_id} holds only GGUF files; name one, e.g. {ref.repo_id}:{ggufs[0]}")
    if hub_offline_env():
        raise ModelError(f"{what} {ref.repo_id!r} is not in the local HF cache ({hub_cache_dir()}) and "
                         f"HF_HUB_OFFLINE is set; {_how_to_fetch(ref, what)}")
    patterns = _model_patterns(_probe(ref, what))
    # Mistral's repos also hold the same weights as consolidated.safetensors (a second copy): not needed here
    return _download(ref, what, lambda api: api.snapshot_download(ref.repo_id, allow_patterns=list(patterns),
                                                                  ignore_patterns=["consolidated*"],
                                                                  cache_dir=hub_cache_dir()))


def hub_gguf(ref: HubRef) -> Path:
    """The local path of the GGUF file `ref` names (cache first, then a download)."""
    cached = _cached(ref, ("*.gguf",))
    if cached is not None:
        present = sorted(str(p.relative_to(cached)) for p in cached.rglob("*.gguf"))
        try:
            return cached / pick_gguf(ref, present)
        except ModelError:
            if hub_offline_env():
                raise
    if hub_offline_env():
        raise ModelError(f"GGUF {str(ref)!r} is not in the local HF cache ({hub_cache_dir()}) and HF_HUB_OFFLINE "
                         f"is set; {_how_to_fetch(ref, 'GGUF')}")
    name = pick_gguf(ref, _probe(ref, "GGUF"))
    return _download(ref, "GGUF", lambda api: api.hf_hub_download(ref.repo_id, name, cache_dir=hub_cache_dir()))


def _download(ref: HubRef, what: str, fetch) -> Path:  # noqa: ANN001 - a one-line callable
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    from huggingface_hub.utils import enable_progress_bars

    enable_progress_bars()  # transformers' loading turns them off; a download should show one
    logger.info("downloading %s %s from %s into %s", what, ref, _endpoint(), hub_cache_dir())
    try:
        return Path(fetch(huggingface_hub))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"downloading {what} {str(ref)!r} failed: {first[:200]}; rerun to resume, or "
                         f"{_how_to_fetch(ref, what)}") from None

