"""Hub models: a Hugging Face Hub id ``org/name[@revision]`` resolved to a snapshot directory of the Hub cache.

huggingface_hub does the fetching, into its usual cache and with its progress bars, once per file: gated
models take the token of ``HF_TOKEN`` or ``hf auth login``. Only what hexgen serves from is fetched: the
config, the tokenizer files and the safetensors weights (the shards ``model.safetensors.index.json`` names,
when there is one), never ``.bin`` pickles. ``HF_ENDPOINT``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE=1``
(serve from the cache, never ask the Hub) are read at each call.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

INDEX = "model.safetensors.index.json"
# Every file a model is served from, besides its weights (config.json first: the one every model has).
SERVED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    INDEX,
)
_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"  # the Hub's limit: 96 characters
_REPO = re.compile(rf"{_PART}/{_PART}", re.ASCII)
_REVISION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(?:/[A-Za-z0-9_][A-Za-z0-9_.-]*)*", re.ASCII)
MAX_REVISION_CHARS = 255
ID_FORM = "a Hub id org/name[@revision] (letters, digits, '-', '_', '.')"


class HubError(ValueError):
    """A model named on the Hub that cannot be had: a malformed id, or one neither the Hub nor the cache
    provides. The message is the one-line reason."""


@dataclass(frozen=True)
class HubId:
    repo: str  # org/name
    revision: str | None = None  # a branch, tag or commit; None: the repository's default branch

    def __str__(self) -> str:
        return self.repo if self.revision is None else f"{self.repo}@{self.revision}"


@dataclass(frozen=True)
class HubSettings:
    """Where to fetch from and keep the files (None: huggingface_hub's own default), and whether to stay off
    the network."""

    endpoint: str | None = None
    cache_dir: str | None = None
    offline: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> HubSettings:
        """``HF_ENDPOINT``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` (1, true, yes or on) from ``env``."""
        offline = env.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
        return cls(env.get("HF_ENDPOINT", "").rstrip("/") or None, env.get("HF_HUB_CACHE") or None, offline)


def parse_hub_id(text: str) -> HubId:
    """``org/name`` or ``org/name@revision``; HubError saying what is wrong otherwise. O(len(text))."""
    repo, at, revision = text.partition("@")
    if not _REPO.fullmatch(repo) or "--" in repo or ".." in repo or repo.endswith(".git"):
        raise HubError(f"model {text!r} is neither a local directory nor {ID_FORM}")
    if at and (not _REVISION.fullmatch(revision) or ".." in revision or len(revision) > MAX_REVISION_CHARS):
        raise HubError(f"model {text!r}: {revision!r} after '@' is not a revision (a branch, tag or commit)")
    return HubId(repo, revision if at else None)


def hub_id_of(model: str) -> HubId | None:
    """The Hub id ``model`` names; None when it is an existing path or a bare name (a preset, a path the
    caller reports). HubError for a malformed id. O(len(model)) plus one stat."""
    if ("/" not in model and "@" not in model) or Path(model).expanduser().exists():
        return None
    return parse_hub_id(model)


def local_model(model: str, *, config_only: bool = False, env: Mapping[str, str] | None = None) -> str:
    """What to read ``model`` from: ``model`` itself unless it is a Hub id, else its snapshot directory,
    fetched first where the cache lacks it (only config.json with ``config_only``). HubError if it cannot be."""
    hub_id = hub_id_of(model)
    if hub_id is None:
        return model
    return str(snapshot(hub_id, HubSettings.from_env(os.environ if env is None else env), config_only=config_only))


def model_name(model: str) -> str:
    """What to call a served model: ``org/name`` for a snapshot of the Hub cache
    (``.../models--org--name/snapshots/<commit>``), else the directory's last part (or ``model`` as given)."""
    path = Path(model)
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        org, _, name = path.parent.parent.name.removeprefix("models--").partition("--")
        if org and name:
            return f"{org}/{name}"
    return path.name or model


def snapshot(hub_id: HubId, settings: HubSettings, *, config_only: bool = False) -> Path:
    """The snapshot directory of ``hub_id`` with the files hexgen serves from (``config_only``: config.json),
    fetching what the cache lacks. Two rounds: the small files, then the weights the index names (every
    top-level ``*.safetensors`` without one) at the commit the first round resolved. HubError if it cannot."""
    root = _fetch(hub_id, hub_id.revision, ["config.json"] if config_only else list(SERVED_FILES), settings)
    if config_only:
        return root
    root = _fetch(hub_id, root.name, _weight_patterns(root), settings)
    if not any(root.glob("*.safetensors")):
        raise HubError(f"{hub_id} has no safetensors weights on the Hub (hexgen never loads .bin pickles)")
    return root


def _weight_patterns(root: Path) -> list[str]:
    """The shard names of ``root``'s index, or every ``*.safetensors`` when it has none."""
    index = root / INDEX
    if not index.is_file():
        return ["*.safetensors"]
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return sorted({str(name) for name in weight_map.values()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise HubError(f"{index}: not a safetensors index ({exc})") from None


def _fetch(hub_id: HubId, revision: str | None, patterns: list[str], settings: HubSettings) -> Path:
    """``snapshot_download`` of the top-level files matching ``patterns``; its failures as HubError."""
    import httpx2
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        path = snapshot_download(
            hub_id.repo,
            revision=revision,
            allow_patterns=patterns,
            ignore_patterns=["*/*"],
            cache_dir=settings.cache_dir,
            endpoint=settings.endpoint,
            local_files_only=settings.offline,
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, httpx2.TransportError, OSError) as exc:
        raise HubError(describe_failure(hub_id, exc, settings)) from None
    return Path(path)


def describe_failure(hub_id: HubId, exc: BaseException, settings: HubSettings) -> str:
    """One line saying why ``hub_id`` could not be fetched, from huggingface_hub's (or its HTTP client's)
    exception, and what to do about it."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = _endpoint(settings)
    if isinstance(exc, GatedRepoError):
        return _gated(hub_id, where)
    if isinstance(exc, RepositoryNotFoundError):
        return f"{hub_id.repo} is not a local directory, and {where} has no model {hub_id.repo} (private? set HF_TOKEN)"
    if isinstance(exc, RevisionNotFoundError):
        return f"{hub_id.repo} has no revision {hub_id.revision!r} on {where}"
    if isinstance(exc, LocalEntryNotFoundError):
        return _not_cached(hub_id, exc, settings)
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "an error"
        return f"{where} answered {status} for {hub_id}: {_first_line(exc)}"
    if isinstance(exc, OSError):
        return f"cannot write {hub_id} into the Hub cache {_cache(settings)}: {exc.strerror or exc}"
    return f"fetching {hub_id} from {where} failed ({type(exc).__name__}: {_first_line(exc)}); run again to resume"


def _gated(hub_id: HubId, where: str) -> str:
    from huggingface_hub import get_token

    terms = f"{where.rstrip('/')}/{hub_id.repo}"
    if get_token() is None:
        return f"{hub_id.repo} is gated: accept its terms at {terms}, then set HF_TOKEN or run `hf auth login`"
    return f"{hub_id.repo} is gated and your Hugging Face token has no access to it: accept its terms at {terms}"


def _not_cached(hub_id: HubId, exc: BaseException, settings: HubSettings) -> str:
    from huggingface_hub.errors import IncompleteSnapshotError

    cache = _cache(settings)
    held = "holds only part of" if isinstance(exc, IncompleteSnapshotError) else "does not hold"
    if settings.offline or _offline_at_import():
        return f"HF_HUB_OFFLINE is set and the Hub cache {cache} {held} {hub_id}: fetch it once with network access"
    cause = exc.__cause__ or exc.__context__
    reason = f"{type(cause).__name__}: {_first_line(cause)}" if cause is not None else _first_line(exc)
    return f"cannot reach {_endpoint(settings)} ({reason}) and the Hub cache {cache} {held} {hub_id}"


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _endpoint(settings: HubSettings) -> str:
    from huggingface_hub import constants

    return settings.endpoint or constants.ENDPOINT


def _cache(settings: HubSettings) -> str:
    from huggingface_hub import constants

    return settings.cache_dir or constants.HF_HUB_CACHE


def _offline_at_import() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)
