"""TensorRT-LLM checkpoint (stage convert_trtllm) -> engines, by `trtllm-build` (TensorRT-LLM <= 1.2: the engine
flow was removed after 1.2.x). Written against 1.2's `tensorrt_llm/commands/build.py`; never run here.

`command()` turns the `trtllm.build` params section into the argument list (tested as data); `build()` runs it,
streaming its output to the console and to a log that outlives a failed build."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any, Mapping

from pipeline.errors import PipelineError
from pipeline.progress import console

TIMING_CACHE_FILE = "model.cache"
# trtllm.build keys passed as `--<key> <value>`, in this order (plugin switches take enable/disable).
ARGUMENTS = ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "kv_cache_type",
             "gpt_attention_plugin", "gemm_plugin", "use_paged_context_fmha", "multiple_profiles", "use_fused_mlp",
             "tokens_per_block", "profiling_verbosity")


def command(build: Mapping[str, Any], checkpoint_dir: Path, output_dir: Path, world_size: int,
            executable: str = "trtllm-build") -> list[str]:
    """The trtllm-build command line. Workers build ranks in parallel, one per GPU: never more than ranks."""
    args = [executable, "--checkpoint_dir", str(checkpoint_dir), "--output_dir", str(output_dir)]
    for key in ARGUMENTS:
        args += [f"--{key}", str(build[key])]
    args += ["--workers", str(min(int(build["workers"]), world_size)),
             "--output_timing_cache", str(Path(output_dir) / TIMING_CACHE_FILE)]
    return args


def check_checkpoint(manifest: Mapping[str, Any], where: Path, precision: str, tp: int, pp: int) -> None:
    """The checkpoint must be the one params.yaml asks for: same layout and dtype."""
    if manifest.get("skipped"):
        raise PipelineError(f"{where}: not converted ({manifest.get('reason')}); trtllm-build needs it: add trtllm "
                            f"to convert.formats")
    if (manifest.get("tp"), manifest.get("pp")) != (tp, pp):
        raise PipelineError(f"{where}: converted for tp={manifest.get('tp')} pp={manifest.get('pp')}, params.yaml "
                            f"asks tp={tp} pp={pp}; rerun dvc repro convert_trtllm")
    if manifest.get("dtype") != precision:
        raise PipelineError(f"{where}: converted as {manifest.get('dtype')}, precision.name is {precision}; set "
                            f"convert.dtype=null (or {precision}) and rerun dvc repro convert_trtllm")


def build(args: list[str], log_path: Path) -> dict[str, Any]:
    """Run trtllm-build; its output goes to the console and to log_path. Returns metrics."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    last = ""
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(" ".join(args) + "\n")
        try:
            proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        except FileNotFoundError:
            raise PipelineError(f"{args[0]} is not on PATH (it comes with tensorrt-llm <= 1.2: pip install -e "
                                f"'.[trtllm]')") from None
        for line in proc.stdout:
            log.write(line)
            console.print(line.rstrip(), highlight=False, markup=False)
            last = line.strip() or last
        code = proc.wait()
    if code != 0:
        raise PipelineError(f"trtllm-build failed (exit code {code}): {last[:300]}; the whole output is in {log_path}")
    return {"build_s": round(time.perf_counter() - t0, 2)}
