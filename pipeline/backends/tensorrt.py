"""Backend `tensorrt`: a TensorRT engine of the exported ONNX decoder (stage build_engine), greedy.

Torch tensors are the engine's I/O buffers: each call sets every input's shape and every tensor's address on an
execution context (`set_tensor_address(name, tensor.data_ptr())`) and enqueues the engine on torch's current
stream with `execute_async_v3`, so it orders with torch's own work and needs no pycuda. The presents of one step
are the next step's past tensors: the KV cache stays on the device as torch tensors, and the argmax runs there.

The interface is pipeline/onnx_io.py's, the same graph the onnxruntime backend runs, with the same semantics: no
padding, positions length..length+seq, an all-ones attention mask over past + new tokens. Shapes are dynamic
within the engine's optimization profiles (tensorrt.profiles, recorded in the artifact's manifest in
profile-index order): each call runs on the first profile that holds its (batch, seq, past). Every profile has
its own execution context, selected once, so no call ever switches a context's profile (a switch costs a setup
on the stream, and contexts in use at once must hold different profiles).

tensorrt is imported in load() only, so importing this module needs neither TensorRT nor a GPU."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline import artifacts
from pipeline.backends.base import Backend
from pipeline.engines.profiles import DIMS, covering_profile
from pipeline.engines.trt_build import PLAN_FILE
from pipeline.errors import PipelineError
from pipeline.onnx_io import input_names, output_names
from pipeline.precision import BY_LONG_NAME, torch_dtype

REBUILD = "rebuild it with `dvc repro build_engine`"
MANIFEST_FIELDS = ("precision", "profiles", "num_layers", "kv_heads", "head_dim", "kv_dtype")


def torch_dtypes(trt) -> dict:
    return {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
            trt.int8: torch.int8, trt.int32: torch.int32, trt.int64: torch.int64, trt.bool: torch.bool}


class TensorRTBackend(Backend):
    def __init__(self, inputs):
        super().__init__(inputs)
        self.plan_path = self.artifact / PLAN_FILE

    def load(self) -> None:
        manifest = artifacts.read_manifest(self.artifact)
        manifest_path = self.artifact / artifacts.MANIFEST
        missing = [k for k in MANIFEST_FIELDS if k not in manifest]
        if missing:
            raise PipelineError(f"{manifest_path}: no {', '.join(missing)}; not a TensorRT engine artifact, {REBUILD}")
        if manifest["precision"] != self.precision:
            raise PipelineError(f"{manifest_path}: the engine was built for precision {manifest['precision']}, "
                                f"not precision.name={self.precision}; {REBUILD}")
        if not self.plan_path.is_file():
            raise PipelineError(f"{self.plan_path}: not found in the artifact handed to backend tensorrt; {REBUILD}")
        self.profiles = manifest["profiles"]
        self.profile_index = {name: i for i, name in enumerate(self.profiles)}  # manifest order = engine order
        self.num_layers, self.kv_heads, self.head_dim, self.kv_dtype = (
            manifest[k] for k in ("num_layers", "kv_heads", "head_dim", "kv_dtype"))

        import tensorrt as trt

        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)  # kept: the engine must not outlive its runtime
        self.engine = self.runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self.engine is None:
            raise PipelineError(f"{self.plan_path}: TensorRT {trt.__version__} cannot deserialize it (built by "
                                f"TensorRT {manifest.get('tensorrt_version')} or for another GPU); {REBUILD}")
        if manifest.get("strip_plan"):
            self._refit(Path(manifest["refit_source"]))  # relative to the project root, where stages run
        if self.inputs.options.get("weight_streaming"):
            # Must be set before any execution context exists.
            gib = self.inputs.options.get("weight_streaming_budget_gib")
            self.engine.weight_streaming_budget_v2 = (
                self.engine.get_weight_streaming_automatic_budget() if gib is None else int(gib * 2**30))
        self._check_interface(manifest_path)
        self.contexts: dict[int, object] = {}  # profile index -> its execution context
        # TensorRT wants a non-null address for every tensor, and an empty torch tensor may have data_ptr 0:
        # empty tensors (the past of a prefill) point here instead. It is never read (0 elements).
        self.scratch = torch.empty(1, dtype=torch.float32, device=self.device)
        self.past: list[torch.Tensor] = []
        self.length = 0

    def _refit(self, source: Path) -> None:
        """A stripped plan carries no weights: refit them from the ONNX model it was built from."""
        if not source.is_file():
            raise PipelineError(f"{source}: the ONNX model to refit the stripped plan {self.plan_path} from is "
                                f"missing (manifest refit_source); rebuild it with `dvc repro build_engine`")
        refitter = self.trt.Refitter(self.engine, self.logger)
        if not self.trt.OnnxParserRefitter(refitter, self.logger).refit_from_file(str(source)) \
                or not refitter.refit_cuda_engine():
            raise PipelineError(f"{source}: refitting the stripped plan {self.plan_path} from it failed (see the "
                                f"TensorRT log above); {REBUILD}")

    def _check_interface(self, manifest_path: Path) -> None:
        engine, trt = self.engine, self.trt
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        if set(self.input_names) != set(input_names(self.num_layers)) or \
                set(self.output_names) != set(output_names(self.num_layers)):
            raise PipelineError(f"{self.plan_path}: its I/O tensors are not the ONNX decoder's with "
                                f"num_layers={self.num_layers} (pipeline/onnx_io.py); {REBUILD}")
        if engine.num_optimization_profiles != len(self.profiles):
            raise PipelineError(f"{manifest_path}: lists {len(self.profiles)} profiles but the plan has "
                                f"{engine.num_optimization_profiles}; {REBUILD}")
        dtypes = torch_dtypes(trt)
        self.dtypes = {n: dtypes[engine.get_tensor_dtype(n)] for n in names}
        self.past_names = input_names(self.num_layers)[3:]
        self.present_names = output_names(self.num_layers)[1:]
        kv = BY_LONG_NAME.get(self.kv_dtype)  # the precision table's "float16" -> fp16 -> torch.float16
        if kv is None or self.dtypes[self.past_names[0]] != torch_dtype(kv):
            raise PipelineError(f"{manifest_path}: kv_dtype={self.kv_dtype} but the plan's past tensors are "
                                f"{self.dtypes[self.past_names[0]]}; {REBUILD}")

    def _stream(self) -> int:
        # CPU runs only under the tests' stand-in module, which takes any handle.
        return torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0

    def _profile(self, batch: int, seq: int, past: int) -> str:
        name = covering_profile(self.profiles, batch, seq, past)
        if name is None:
            have = "; ".join(f"{p}: " + " ".join(f"{d} {dims[d][0]}-{dims[d][2]}" for d in DIMS)
                             for p, dims in self.profiles.items())
            raise PipelineError(f"{self.plan_path}: no optimization profile holds batch={batch} seq={seq} "
                                f"past={past} ({have}); widen tensorrt.profiles and rebuild (dvc repro build_engine)")
        return name

    def _context(self, profile: str):
        """The execution context of `profile`, made and bound to it on first use."""
        index = self.profile_index[profile]
        if index not in self.contexts:
            # ON_PROFILE_CHANGE: each context's device memory is sized for its own profile, not for the largest.
            strategy = self.trt.ExecutionContextAllocationStrategy.ON_PROFILE_CHANGE
            context = self.engine.create_execution_context(strategy)
            if not context.set_optimization_profile_async(index, self._stream()):
                raise PipelineError(f"{self.plan_path}: TensorRT refused optimization profile {index} ({profile}); "
                                    f"{REBUILD}")
            self.contexts[index] = context
        return self.contexts[index]

    def prepare(self, batch_size: int, max_seq_len: int) -> None:
        # Shapes are dynamic within the profiles: nothing to size. The last decode step of a generation of
        # max_seq_len tokens feeds 1 token after max_seq_len - 2 cached ones; fail before the timed runs.
        if max_seq_len >= 3:
            self._profile(batch_size, 1, max_seq_len - 2)

    def _step(self, ids: torch.Tensor, past: list[torch.Tensor]) -> torch.Tensor:
        """Run one forward on ids [batch, seq] after self.length cached tokens; keep the presents."""
        batch, seq = ids.shape
        context = self._context(self._profile(batch, seq, self.length))
        positions = torch.arange(self.length, self.length + seq, dtype=torch.int64, device=self.device)
        feeds = {"input_ids": ids,
                 # No padding in benchmark batches: every cached and new position is attended.
                 "attention_mask": torch.ones(batch, self.length + seq, dtype=torch.int64, device=self.device),
                 "position_ids": positions.expand(batch, seq).contiguous(),
                 **dict(zip(self.past_names, past))}
        for name in self.input_names:
            tensor = feeds[name]
            address = tensor.data_ptr() if tensor.numel() else self.scratch.data_ptr()
            if not (context.set_input_shape(name, tuple(tensor.shape)) and context.set_tensor_address(name, address)):
                raise PipelineError(f"{self.plan_path}: TensorRT rejected input {name} of shape "
                                    f"{tuple(tensor.shape)}; {REBUILD}")
        outputs = {}
        for name in self.output_names:
            # Resolved from the input shapes set above.
            outputs[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=self.dtypes[name],
                                        device=self.device)
            context.set_tensor_address(name, outputs[name].data_ptr())
        # feeds and outputs hold every tensor whose address TensorRT was given until the engine is enqueued;
        # after that the caching allocator reuses their memory only for work on this same stream, which runs
        # after the engine.
        if not context.execute_async_v3(self._stream()):
            raise PipelineError(f"{self.plan_path}: execute_async_v3 failed for batch={batch} seq={seq} "
                                f"past={self.length} (see the TensorRT log above)")
        self.past = [outputs[name] for name in self.present_names]
        self.length += seq
        return outputs["logits"][:, -1].argmax(dim=-1)

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to(self.device, torch.int64).contiguous()
        self.length = 0
        empty = (ids.shape[0], self.kv_heads, 0, self.head_dim)
        return self._step(ids, [torch.empty(empty, dtype=self.dtypes[n], device=self.device)
                                for n in self.past_names])

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._step(tokens.to(self.device, torch.int64).reshape(-1, 1).contiguous(), self.past)

    def close(self) -> None:
        # Contexts before the engine, the engine before its runtime: TensorRT's destruction order.
        self.contexts = {}
        self.past = []
        self.engine = self.runtime = None

    def describe(self) -> dict[str, str]:
        facts = super().describe()
        if getattr(self, "engine", None) is not None:
            facts.update(tensorrt_version=self.trt.__version__, profiles=",".join(self.profiles),
                         kv_dtype=self.kv_dtype)
            if hasattr(self.engine, "device_memory_size_v2"):
                facts["engine_device_memory_bytes"] = str(self.engine.device_memory_size_v2)
        return facts
