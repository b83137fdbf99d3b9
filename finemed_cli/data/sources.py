"""Where `finemed train` and `finemed eval` read records from besides local files: a Hugging Face Hub dataset
`hf:org/name[:config]` with a split; and the `columns:` mapping ({our_field: their_field}) that renames a
source's fields to finemed's, for Hub datasets and local JSONL alike.

Hub datasets keep the conventions of hub models (finemed_cli/hub.py): the local caches first, with no network
call; a download only when the network allows; offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) or out of
reach, a miss is refused at once with the commands that fetch it. Two caches can hold a dataset, and datasets
(5.x) reads only the first of them offline by itself:
- the datasets cache (HF_DATASETS_CACHE, else HF_HOME/datasets): what `load_dataset('org/name', 'config')`
  prepared on a machine with network, `org___name/<config>/<version>/<hash>/*.arrow`;
- the hub cache (HF_HUB_CACHE, else HF_HOME/hub): the repository's files as `hf download --repo-type dataset`
  leaves them, `datasets--org--name/snapshots/<commit>/`, which is loaded here as a local folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finemed_cli.data.jsonl import RecordError, iter_jsonl
from finemed_cli.data.records import OPTION_LETTERS
from finemed_cli.errors import ConfigError, DataError
from finemed_cli.hub import PROBE_TIMEOUT_S, hub_cache_dir, hub_offline_env, parse_hub_ref

logger = logging.getLogger(__name__)

HF_PREFIX = "hf:"
TRAIN_SPLITS = ("train",)
EVAL_SPLITS = ("test", "validation")  # a benchmark's labelled held-out split, test first


@dataclass(frozen=True)
class HubDataset:
    """`hf:org/name` or `hf:org/name:config`."""

    repo_id: str
    config: str | None = None

    def __str__(self) -> str:
        return HF_PREFIX + self.repo_id + (f":{self.config}" if self.config else "")


def parse_hub_dataset(value: str | os.PathLike[str]) -> HubDataset | None:
    """The Hub dataset a data source names, or None for a local path.

    Raises:
        ConfigError: it starts with `hf:` but is not `hf:org/name[:config]`.
    """
    text = str(value)
    if not text.startswith(HF_PREFIX):
        return None
    ref = parse_hub_ref(text[len(HF_PREFIX):])
    if ref is None:
        raise ConfigError(f"{text!r}: write a Hub dataset as hf:org/name or hf:org/name:config "
                          "(e.g. hf:openlifescienceai/medmcqa)")
    return HubDataset(ref.repo_id, ref.gguf)


def column_problems(columns: Any) -> list[str]:
    """What is wrong with a `columns:` mapping (none: it is {our_field: their_field, …})."""
    if not isinstance(columns, dict):
        return [f"expected a mapping {{our_field: their_field}}, e.g. {{question: prompt, answer: label}}, "
                f"got {type(columns).__name__} {columns!r:.40}"]
    return [f"{k!r}: {v!r} is not a column name; write our_field: their_field with both as names"
            for k, v in columns.items() if not (isinstance(k, str) and k and isinstance(v, str) and v)]


def parse_columns(text: str | None) -> dict[str, str]:
    """`question=prompt,options=choices,answer=label` (the command line's form) → {"question": "prompt", …}."""
    columns: dict[str, str] = {}
    for pair in (text or "").split(","):
        ours, sep, theirs = (s.strip() for s in pair.partition("="))
        if not pair.strip():
            continue
        if not (sep and ours and theirs):
            raise ConfigError(f"--columns {text!r}: write our=theirs pairs separated by commas, e.g. "
                              "question=prompt,options=choices,answer=label")
        columns[ours] = theirs
    return columns


def describe_columns(columns: dict[str, str]) -> str:
    return ", ".join(f"{ours}={theirs}" for ours, theirs in columns.items())


def map_columns(obj: Any, columns: dict[str, str] | None, default_id: str | None = None) -> Any:
    """One record with its fields renamed by `columns` ({our_field: their_field}); with a mapping or a
    `default_id` (Hub rows), an integer `answer` beside `options` becomes the option's letter (0 → A) and a
    missing `id` is `default_id`. A record with neither passes as it is.

    Raises:
        RecordError: a mapped column is missing, or an integer answer is not an option's index.
    """
    if not isinstance(obj, dict) or (not columns and default_id is None):
        return obj
    out = dict(obj)
    mapping = f" (columns: {describe_columns(columns)})" if columns else ""
    if columns:
        missing = [theirs for theirs in columns.values() if theirs not in obj]
        if missing:
            raise RecordError(f"no column {', '.join(map(repr, missing))}{mapping}; this record has "
                              f"{', '.join(map(str, list(obj)[:12]))}")
        for theirs in columns.values():  # left under its own name, it could make the record look like another shape
            out.pop(theirs, None)
        out.update({ours: obj[theirs] for ours, theirs in columns.items()})
    answer, options = out.get("answer"), out.get("options")
    if isinstance(answer, int) and not isinstance(answer, bool) and isinstance(options, (list, dict)):
        n = min(len(options), len(OPTION_LETTERS))
        if not 0 <= answer < n:
            raise RecordError(f"'answer' is {answer}, not the index of one of its {len(options)} options "
                              f"(0 to {len(options) - 1}){mapping}")
        out["answer"] = OPTION_LETTERS[answer]
    if default_id is not None and out.get("id") is None:
        out["id"] = default_id
    return out


def mapped_rows(name: str, rows: Iterator[tuple[Any, Any]] | list[tuple[Any, Any]], columns: dict[str, str] | None,
                errors: list[str], ids: str | None = None) -> Iterator[tuple[Any, Any]]:
    """`(label, record)` pairs with `map_columns` applied; a record that cannot be mapped goes to `errors` as
    `name:label: why` and is skipped. `ids`: a prefix that gives id-less records `ids-label` as their id."""
    for label, obj in rows:
        try:
            yield label, map_columns(obj, columns, f"{ids}-{label}" if ids is not None else None)
        except RecordError as e:
            errors.append(f"{name}:{label}: {e}")


def source_rows(source: Path | HubDataset, split: str | None = "train", columns: dict[str, str] | None = None,
                errors: list[str] | None = None, prefer: tuple[str, ...] = TRAIN_SPLITS,
                read: Callable[[Path, list[str]], Iterable[tuple[Any, Any]]] = iter_jsonl,
                ) -> tuple[Any, str | None, Iterator[tuple[Any, Any]]]:
    """A source's name in messages (a file's path), its fingerprint (a Hub snapshot's commit or datasets'
    fingerprint; None for a file, which the caller hashes) and its `(line or row, record)` pairs renamed by
    `columns` (a Hub row's label is its 0-based index). A file is read by `read` (JSONL by default); bad lines
    and records that cannot be mapped go to `errors`. A mapped file's records without an id get `STEM-LINE`."""
    errors = [] if errors is None else errors
    if isinstance(source, HubDataset):
        hub = load_hub_rows(source, split, prefer)
        return hub.name, hub.fingerprint, mapped_rows(hub.name, hub.labelled(), columns, errors, hub.id_prefix)
    ids = source.stem if columns else None
    return source, None, mapped_rows(str(source), read(source, errors), columns, errors, ids)


@dataclass
class HubRows:
    """One split of a Hub dataset."""

    ref: HubDataset
    split: str
    rows: list[dict[str, Any]]
    fingerprint: str  # the snapshot's commit, or datasets' fingerprint of the split

    @property
    def name(self) -> str:
        """How messages name it; its row INDEX is `name:INDEX` (0-based, as `ds[INDEX]`)."""
        return f"{self.ref}[{self.split}]"

    @property
    def id_prefix(self) -> str:
        """What an id-less row's id starts with: `name-split` (its index follows)."""
        return f"{self.ref.repo_id.split('/')[-1]}-{self.split}"

    def labelled(self) -> list[tuple[int, dict[str, Any]]]:
        return list(enumerate(self.rows))


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (as hub models read it) or HF_DATASETS_OFFLINE."""
    flag = os.environ.get("HF_DATASETS_OFFLINE", "").strip().upper()
    return flag in ("1", "ON", "YES", "TRUE") or hub_offline_env()


def datasets_cache_dir() -> str:
    """The datasets cache as the environment names it now (datasets reads it once, at import)."""
    import datasets

    if os.environ.get("HF_DATASETS_CACHE"):
        return os.environ["HF_DATASETS_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "datasets")
    return str(datasets.config.HF_DATASETS_CACHE)


def how_to_fetch(ref: HubDataset) -> str:
    config = f", {ref.config!r}" if ref.config else ""
    return (f"on a machine with network run `python -c \"import datasets; datasets.load_dataset({ref.repo_id!r}"
            f"{config})\"` and copy its datasets cache to {datasets_cache_dir()} (or point HF_DATASETS_CACHE at "
            f"the copy), or run `hf download {ref.repo_id} --repo-type dataset` and copy its hub cache to "
            f"{hub_cache_dir()} (or point HF_HUB_CACHE at it)")


def load_hub_rows(ref: HubDataset, split: str | None, prefer: tuple[str, ...] = TRAIN_SPLITS) -> HubRows:
    """The rows of one split of a Hub dataset: `split`, or (None) the first of `prefer` it has.

    Raises:
        DataError: not cached and not downloadable (offline, out of reach, no such dataset, gated), or no
            such config or split; each names the source and the fix.
    """
    snapshot = _cached_snapshot(ref)
    if snapshot is not None:  # the hub cache: no network call
        return _load_or_explain(ref, str(snapshot), split, prefer, snapshot.name)
    if hub_offline():
        return _from_datasets_cache(ref, split, prefer, "HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set")
    unreachable = _probe(ref)
    if unreachable:
        return _from_datasets_cache(ref, split, prefer, f"the hub cannot be reached ({unreachable})")
    logger.info("loading %s from the hub into %s", ref, datasets_cache_dir())
    return _load_or_explain(ref, ref.repo_id, split, prefer, None)


def _cached_snapshot(ref: HubDataset) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(ref.repo_id, repo_type="dataset", local_files_only=True, cache_dir=hub_cache_dir()))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


@contextlib.contextmanager
def _datasets_offline() -> Iterator[None]:
    """datasets' own offline mode for one call: it reads its cache and makes no network call."""
    import datasets

    saved = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = saved


def _from_datasets_cache(ref: HubDataset, split: str | None, prefer: tuple[str, ...], why: str) -> HubRows:
    with _datasets_offline():
        try:
            return _load(ref, ref.repo_id, split, prefer, None)
        except (ConnectionError, FileNotFoundError):
            pass  # not cached at all: said below
        except (ValueError, OSError, KeyError) as e:  # cached, but not this config (fetch it) or split
            raise _explain(ref, split, e, "" if "split" in str(e).lower() else how_to_fetch(ref)) from None
    raise DataError(f"{ref}: not in the datasets cache ({datasets_cache_dir()}) nor the hub cache ({hub_cache_dir()}), "
                    f"and {why}; {how_to_fetch(ref)}")


def _load_or_explain(ref: HubDataset, path: str, split: str | None, prefer: tuple[str, ...],
                     commit: str | None) -> HubRows:
    try:
        return _load(ref, path, split, prefer, commit)
    except (ValueError, OSError, KeyError) as e:
        raise _explain(ref, split, e) from None


def _load(ref: HubDataset, path: str, split: str | None, prefer: tuple[str, ...], commit: str | None) -> HubRows:
    """One split of the dataset at `path` (a repository id, or a snapshot folder), as plain rows."""
    import datasets

    cache = datasets_cache_dir()
    if split is None and path == ref.repo_id and not datasets.config.HF_HUB_OFFLINE:  # online: ask, then load one
        split = pick_split(ref, datasets.get_dataset_split_names(path, ref.config, cache_dir=cache), prefer)
    if split is None:  # a local folder or the datasets cache: every split is at hand
        whole = datasets.load_dataset(path, ref.config, cache_dir=cache)
        split = pick_split(ref, list(whole), prefer)
        ds = whole[split]
    else:
        ds = datasets.load_dataset(path, ref.config, split=split, cache_dir=cache)
    return HubRows(ref, split, ds.to_list(), commit or ds._fingerprint)


def _explain(ref: HubDataset, split: str | None, error: Exception, extra: str = "") -> DataError:
    """datasets' error (no such config or split, …) as one message naming the source and the fix."""
    text = " ".join(str(error).split()) or type(error).__name__
    low = text.lower()
    fix = ("set split: NAME in the config (eval: --split NAME) to one it has" if "split" in low else
           f"name the config as hf:{ref.repo_id}:CONFIG" if "config" in low else "")
    fixes = "; ".join(f for f in (fix, extra) if f)
    return DataError(f"{ref}{f' split {split!r}' if split else ''}: {text[:400]}" + (f"; {fixes}" if fixes else ""))


def pick_split(ref: HubDataset, names: list[str], prefer: tuple[str, ...]) -> str:
    """The first of `prefer` among a dataset's splits; its only split; else an error listing them."""
    for name in prefer:
        if name in names:
            return name
    if len(names) == 1:
        return names[0]
    raise DataError(f"{ref} has the splits {', '.join(names)} and none of {', '.join(prefer)}; choose one with "
                    "split: NAME in the config (eval: --split NAME)")


def _probe(ref: HubDataset) -> str | None:
    """None when the hub knows the dataset; why not when it cannot be reached. A short timeout, so a dead
    network fails fast (huggingface_hub's own calls wait as long as the socket does)."""
    import httpx
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers

    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    try:
        reply = httpx.get(f"{endpoint}/api/datasets/{ref.repo_id}", headers=build_hf_headers(),
                          timeout=PROBE_TIMEOUT_S, follow_redirects=True)
    except (httpx.HTTPError, OSError) as e:
        return type(e).__name__
    if reply.status_code in (401, 403):
        raise DataError(f"{ref}: the dataset is gated or private: accept its terms on its hub page, then log in "
                        "with `hf auth login` (or set HF_TOKEN) and rerun")
    if reply.status_code == 404:
        raise DataError(f"{ref}: no such dataset on the hub (or it is private); check the id")
    return None if reply.status_code == 200 else f"HTTP {reply.status_code}"
