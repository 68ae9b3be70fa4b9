"""What a benchmark backend implements. The runner owns all timing, so every backend is measured the
same way: it only has to load the model, run a prefill and run one decode step."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import torch

from pipeline.config import HardwareConfig, PrecisionConfig


class Backend(ABC):
    name: ClassVar[str]
    # True: the benchmark launches the worker under torchrun with parallel.tp * parallel.pp ranks.
    distributed: ClassVar[bool] = False
    supported_precisions: ClassVar[tuple[str, ...]] = ("fp32", "fp16", "bf16")

    def __init__(self, model_dir: Path, precision: PrecisionConfig, hardware: HardwareConfig):
        self.model_dir = Path(model_dir)
        self.precision = precision
        self.hardware = hardware
        self.device = torch.device(hardware.device)

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

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def describe(self) -> dict[str, str]:
        """Facts about this backend worth recording next to its numbers."""
        return {"backend": self.name, "device": str(self.device), "precision": self.precision.name}
