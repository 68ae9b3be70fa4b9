"""Where weights come from besides random init: a local directory or the Hugging Face hub.

Only safetensors, config and tokenizer files are taken (never pickles), trust_remote_code is never
used, and the hub token is read from HF_TOKEN and passed straight to huggingface_hub, never logged."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import DISK_FULL, PipelineError, read_json, redact
from pipeline.model.hf_config import HF_KEYS
from pipeline.progress import progress_bar

# What to do about a damaged file of a local or hub checkpoint.
REFETCH = "re-download or re-export the model"
# What to do when the hub cannot be used.
LOCAL_COPY = ("use a local copy: model.source=local model.local_dir=<a directory with config.json, *.safetensors and "
              "tokenizer.json>, or HF_HUB_OFFLINE=1 with the model in the Hugging Face cache (HF_HOME)")
# OSErrors of the local disk met while downloading: not the hub's fault, so not reported as a download failure.
LOCAL_FAULTS = DISK_FULL | {errno.EACCES, errno.EPERM, errno.EROFS}
# Files a Llama checkpoint needs; anything else in the source (pickles, original/ folders) is skipped.
ALLOW_PATTERNS = [
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
]


def _wanted(path: Path) -> bool:
    from fnmatch import fnmatch

    return any(fnmatch(path.name, pattern) for pattern in ALLOW_PATTERNS)


def check_checkpoint_dir(src: Path, label: str) -> dict[str, Any]:
    """Refuse what we must not or cannot load; return config.json. Every file taken is parsed (the JSON files,
    tokenizer.json, the safetensors headers), so a truncated or corrupt one fails here with its name, not deep
    inside a later stage; a model or tokenizer that needs its own code (auto_map) is refused."""
    from safetensors import safe_open
    from tokenizers import Tokenizer

    if not src.is_dir():
        raise PipelineError(f"{label}: {src} is not a directory")
    config_path = src / "config.json"
    if not config_path.is_file():
        raise PipelineError(f"{label}: {config_path} is missing; a Hugging Face model directory needs config.json")
    hf_config = read_json(config_path, REFETCH)
    absent = [hf for hf in HF_KEYS.values() if hf != "num_key_value_heads"  # absent = as many as the query heads
              and not (type(hf_config.get(hf)) is int and hf_config[hf] > 0)]
    if absent:
        raise PipelineError(f"{config_path}: {', '.join(absent)} missing or not a positive integer (a Llama "
                            f"config.json has them); {REFETCH}")
    taken = {p.name: read_json(p, REFETCH) for p in sorted(src.glob("*.json")) if _wanted(p)}
    for name in ("config.json", "tokenizer_config.json"):
        if (taken.get(name) or {}).get("auto_map"):
            raise PipelineError(f"{src / name}: has auto_map (it needs its own Python code); trust_remote_code is "
                                f"never used, so it is refused: use a model that transformers' own classes load")
    weights = sorted(src.glob("*.safetensors"))
    if not weights:
        pickles = [p.name for p in src.glob("*.bin")] + [p.name for p in src.glob("*.pt*")]
        hint = f" (found {', '.join(pickles[:3])}: pickle checkpoints are refused, convert them to safetensors)" if pickles else ""
        raise PipelineError(f"{label}: no *.safetensors in {src}{hint}")
    for path in weights:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    f.get_slice(name)  # reads the header entry; data offsets are validated by safetensors
        except Exception as e:  # safetensors raises its own SafetensorError and OSError
            raise PipelineError(f"{path}: unreadable safetensors file ({str(e).splitlines()[0]}); re-download or re-export it") from None
    if (src / "tokenizer.json").is_file():
        try:
            Tokenizer.from_file(str(src / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
            raise PipelineError(f"{src / 'tokenizer.json'}: unreadable tokenizer "
                                f"({(str(e).splitlines() or [type(e).__name__])[0]}); {REFETCH}") from None
    return hf_config


def local_files(src: Path) -> tuple[dict[str, Any], list[Path]]:
    """A checked local checkpoint: (its config.json, the files the weights stage copies from it)."""
    src = Path(src).expanduser().resolve()
    hf_config = check_checkpoint_dir(src, "model.local_dir")
    return hf_config, [p for p in sorted(src.iterdir()) if p.is_file() and _wanted(p)]


def copy_files(files: list[Path], dst: Path) -> None:
    with progress_bar(f"copy {files[0].parent.name}", total=sum(p.stat().st_size for p in files),
                      unit="bytes") as advance:
        for p in files:
            shutil.copyfile(p, dst / p.name)
            advance(p.stat().st_size)


@dataclass(frozen=True)
class HubSnapshot:
    """A hub revision resolved to its commit, with the files download_hub will take from it."""
    hub_id: str
    sha: str
    sizes: dict[str, int | None]  # repo path -> bytes (None where the listing gave no size)
    cached: Path | None = None  # HF_HUB_OFFLINE=1: its folder in the Hugging Face cache, which download_hub copies

    @property
    def total_bytes(self) -> int | None:
        """Bytes to download, or None when the listing did not give every size."""
        if not self.sizes or None in self.sizes.values():
            return None
        return sum(self.sizes.values())


def _token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


@contextlib.contextmanager
def _hub_errors(hub_id: str, revision: str | None) -> Iterator[None]:
    from huggingface_hub import constants, utils
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    # The transport's (httpx) connect/timeout errors are not OSErrors; the module is the one huggingface_hub uses.
    transport = getattr(getattr(utils, "httpx", None), "TransportError", ())
    try:
        yield
    except GatedRepoError:
        raise PipelineError(f"model.hub_id={hub_id}: gated repository; accept its licence on huggingface.co and "
                            f"export HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise PipelineError(f"model.hub_id={hub_id}: repository not found (or private without HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise PipelineError(f"model.revision={revision}: no such revision in {hub_id}") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        if e.errno in LOCAL_FAULTS:
            raise  # the disk, not the hub: the weights stage's atomic_dir and run() name the path
        if isinstance(e, LocalEntryNotFoundError) and constants.HF_HUB_OFFLINE:
            raise PipelineError(f"model.hub_id={hub_id}: HF_HUB_OFFLINE=1 and revision {revision or 'main'} is not "
                                f"in the Hugging Face cache ({constants.HF_HUB_CACHE}); download it once with the "
                                f"network (HF_HUB_OFFLINE=0), or {LOCAL_COPY}") from None
        # The hub's message may hold the URL with HF_ENDPOINT's credentials or a signed CDN link: masked.
        raise PipelineError(f"model.hub_id={hub_id}: download failed ({redact(str(e).splitlines()[0])}); check the "
                            f"network, or {LOCAL_COPY}") from None
    except transport as e:
        raise PipelineError(f"model.hub_id={hub_id}: the hub at {redact(constants.ENDPOINT)} is unreachable "
                            f"({redact((str(e).splitlines() or [type(e).__name__])[0])}); check the network and "
                            f"HF_ENDPOINT, or {LOCAL_COPY}") from None


def resolve_hub(hub_id: str, revision: str | None) -> HubSnapshot:
    """Resolve revision to a commit (so the manifest pins exactly what was downloaded) and list the
    files ALLOW_PATTERNS selects, with their sizes, before anything is downloaded."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled
    from huggingface_hub.utils import filter_repo_objects

    with _hub_errors(hub_id, revision):
        try:
            info = HfApi(token=_token()).model_info(hub_id, revision=revision, files_metadata=True)
        except OfflineModeIsEnabled:
            return _cached_snapshot(hub_id, revision)
    # The same selection snapshot_download makes with these allow_patterns.
    wanted = filter_repo_objects(info.siblings or [], allow_patterns=ALLOW_PATTERNS, key=lambda s: s.rfilename)
    sizes = {s.rfilename: s.size if s.size is not None else getattr(s.lfs, "size", None) for s in wanted}
    return HubSnapshot(hub_id, info.sha, sizes)


def _cached_snapshot(hub_id: str, revision: str | None) -> HubSnapshot:
    """HF_HUB_OFFLINE=1: the revision's snapshot in the Hugging Face cache (resolved through its refs/ to the
    commit, so the manifest pins it as a download would), copied by download_hub instead of downloaded."""
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(repo_id=hub_id, revision=revision, allow_patterns=ALLOW_PATTERNS,
                                    local_files_only=True))
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and _wanted(p)]
    return HubSnapshot(hub_id, folder.name, {p.name: p.stat().st_size for p in files}, cached=folder)


def download_hub(snapshot: HubSnapshot, dst: Path) -> dict[str, Any]:
    """snapshot_download of the resolved commit into dst (a copy of the cached one under HF_HUB_OFFLINE=1);
    returns config.json."""
    from huggingface_hub import snapshot_download

    if snapshot.cached is not None:
        copy_files([snapshot.cached / name for name in snapshot.sizes], dst)
        return check_checkpoint_dir(dst, f"model.hub_id={snapshot.hub_id}")
    with _hub_errors(snapshot.hub_id, snapshot.sha):
        snapshot_download(repo_id=snapshot.hub_id, revision=snapshot.sha, local_dir=str(dst),
                          allow_patterns=ALLOW_PATTERNS, token=_token())
    shutil.rmtree(dst / ".cache", ignore_errors=True)  # huggingface_hub's download metadata
    return check_checkpoint_dir(dst, f"model.hub_id={snapshot.hub_id}")
