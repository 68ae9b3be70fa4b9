"""Run under torchrun by tests/test_backend_torch_tp.py: greedy tokens of the torch-tp backend (rank 0 writes)."""

import json
import sys
from pathlib import Path

import torch

from tests.helpers import make_backend


def main(checkpoint: str, out: str) -> None:
    backend = make_backend("torch-tp", Path(checkpoint))
    backend.load()
    prompt = torch.randint(2, 512, (3, 9), generator=torch.Generator().manual_seed(0))
    backend.prepare(3, 9 + 6)
    tokens = [backend.prefill(prompt)]
    for _ in range(5):
        tokens.append(backend.decode(tokens[-1]))
    if backend.is_reporting_rank:
        Path(out).write_text(json.dumps(torch.stack(tokens, dim=1).tolist()))
    backend.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
