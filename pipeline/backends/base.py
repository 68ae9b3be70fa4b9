"""What a benchmark backend implements. The runner owns all timing, so every backend is measured the
same way: it only has to load the model, run a prefill and run one decode step.

A backend never looks for its inputs: the benchmark hands it `BackendInputs` with the explicit path of the
artifact its registry entry declares (manifest already verified), the precision and the device."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.backends.requests import EngineLimits, RequestEngine, StaticBatchEngine


@dataclass(frozen=True)
class BackendInputs:
    backend: str          # the registry name (also the metrics key)
    artifact: Path        # directory of the artifact the registry entry declares for this precision
    precision: str        # precision.name
    device: str           # hardware.device
    num_threads: int = 0  # hardware.num_threads (0 = library default)
    compile: str = "auto"  # benchmark.compile: auto | inductor | eager (backends with a compiled decode step)
    compile_prefill: bool = False  # benchmark.compile_prefill (torch-compiled)
    tp: int = 1           # parallel.tp / parallel.pp, for a backend that spreads over GPUs itself (own_parallelism)
    pp: int = 1
    options: dict[str, Any] = field(default_factory=dict)  # its own config section (BackendSpec.options), as a dict


class Backend(ABC):
    def __init__(self, inputs: BackendInputs):
        self.inputs = inputs
        self.name = inputs.backend
        self.artifact = Path(inputs.artifact)
        self.precision = inputs.precision
        self.device = torch.device(inputs.device)

    @abstractmethod
    def load(self) -> None:
        """Load weights onto the device; called once, untimed."""

    def prepare(self, batch_size: int, max_seq_len: int) -> None:
        """Called before each scenario's runs (static caches size themselves here)."""

    @property
    def is_reporting_rank(self) -> bool:
        """Only this process writes results (all ranks of a distributed backend run the same loop)."""
        return True

    def close(self) -> None:
        """Release what load() set up (process groups, devices)."""

    @abstractmethod
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Start new requests from a [batch, prompt] id tensor; return the first greedy tokens [batch]."""

    @abstractmethod
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed the last tokens [batch]; return the next greedy tokens [batch]."""

    def request_engine(self, limits: EngineLimits) -> RequestEngine:
        """The serving benchmark's engine over this loaded backend: static batches of prefill + decode unless
        the backend has a scheduler of its own (torch-compiled: continuous batching)."""
        return StaticBatchEngine(self, limits)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def layout(self) -> tuple[int, int]:
        """(tp, pp) this backend runs with; 1, 1 unless it is distributed."""
        return 1, 1

    def describe(self) -> dict[str, str]:
        """Facts about this backend worth recording next to its numbers."""
        return {"backend": self.name, "device": str(self.device), "precision": self.precision,
                "artifact": self.artifact.as_posix()}
