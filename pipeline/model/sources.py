"""Where weights come from besides random init: a local directory or the Hugging Face hub.

Only safetensors, config and tokenizer files are taken (never pickles), trust_remote_code is never
used, and the hub token is read from HF_TOKEN and passed straight to huggingface_hub, never logged."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.progress import progress_bar

# Files a Llama checkpoint needs; anything else in the source (pickles, original/ folders) is skipped.
ALLOW_PATTERNS = [
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
]


def _wanted(path: Path) -> bool:
    from fnmatch import fnmatch

    return any(fnmatch(path.name, pattern) for pattern in ALLOW_PATTERNS)


def check_checkpoint_dir(src: Path, label: str) -> dict[str, Any]:
    """Refuse what we must not or cannot load; return config.json. Safetensors headers are parsed, so a
    truncated or corrupt file fails here with its name, not deep inside a later stage."""
    from safetensors import safe_open

    if not src.is_dir():
        raise PipelineError(f"{label}: {src} is not a directory")
    config_path = src / "config.json"
    if not config_path.is_file():
        raise PipelineError(f"{label}: {config_path} is missing; a Hugging Face model directory needs config.json")
    try:
        hf_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise PipelineError(f"{config_path}: not valid JSON ({e.msg})") from None
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
    if hf_config.get("auto_map"):
        raise PipelineError(f"{config_path}: has auto_map (custom code); trust_remote_code is not supported")
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
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

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
        raise PipelineError(f"model.hub_id={hub_id}: download failed ({str(e).splitlines()[0]}); check the "
                            f"network, or download it yourself and use model=local") from None


def resolve_hub(hub_id: str, revision: str | None) -> HubSnapshot:
    """Resolve revision to a commit (so the manifest pins exactly what was downloaded) and list the
    files ALLOW_PATTERNS selects, with their sizes, before anything is downloaded."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects

    with _hub_errors(hub_id, revision):
        info = HfApi(token=_token()).model_info(hub_id, revision=revision, files_metadata=True)
    # The same selection snapshot_download makes with these allow_patterns.
    wanted = filter_repo_objects(info.siblings or [], allow_patterns=ALLOW_PATTERNS, key=lambda s: s.rfilename)
    sizes = {s.rfilename: s.size if s.size is not None else getattr(s.lfs, "size", None) for s in wanted}
    return HubSnapshot(hub_id, info.sha, sizes)


def download_hub(snapshot: HubSnapshot, dst: Path) -> dict[str, Any]:
    """snapshot_download of the resolved commit into dst; returns config.json."""
    from huggingface_hub import snapshot_download

    with _hub_errors(snapshot.hub_id, snapshot.sha):
        snapshot_download(repo_id=snapshot.hub_id, revision=snapshot.sha, local_dir=str(dst),
                          allow_patterns=ALLOW_PATTERNS, token=_token())
    shutil.rmtree(dst / ".cache", ignore_errors=True)  # huggingface_hub's download metadata
    return check_checkpoint_dir(dst, f"model.hub_id={snapshot.hub_id}")
