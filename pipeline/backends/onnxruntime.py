"""Backend `onnxruntime`: the exported decoder (pipeline/export.py) run by onnxruntime, greedy.

The KV cache stays inside onnxruntime: outputs are bound with IO binding, so each step's
present.{i}.key/.value OrtValues are bound as the next step's past_key_values inputs without a
round trip through numpy. Only the logits are copied to the host (for the argmax), so on CUDA each
step also pays one [batch, seq, vocab] device-to-host copy (the graph returns logits for every
position, which evaluate needs; for long prompts with a 128k vocabulary that copy is large).

Which graph: the benchmark hands over the directory its registry entry declares (artifacts/onnx for fp32,
artifacts/onnx_int8 for int8). load() checks that the graph matches the precision label (int8 needs
QuantizeLinear nodes, fp32 must have none), so a result labelled int8 is never an fp32 run or the other way round."""

from __future__ import annotations


import numpy as np
import torch

from pipeline.backends.base import Backend
from pipeline.errors import PipelineError
from pipeline.onnx_io import MODEL_FILE




class OnnxRuntimeBackend(Backend):
    def __init__(self, inputs):
        super().__init__(inputs)
        self.onnx_path = self.artifact / MODEL_FILE

    def load(self) -> None:
        import onnx
        import onnxruntime as ort

        from pipeline.onnx_io import ort_session

        precision = self.precision
        if not self.onnx_path.is_file():
            raise PipelineError(f"{self.onnx_path}: not found in the artifact handed to backend onnxruntime; "
                                f"rebuild it (dvc repro)")
        ops = {n.op_type for n in onnx.load(str(self.onnx_path), load_external_data=False).graph.node}
        self.quantized = "QuantizeLinear" in ops
        if self.quantized != (precision == "int8"):
            found = "an INT8 QDQ graph" if self.quantized else "no QuantizeLinear nodes (an fp32 graph)"
            want = "onnx_int8/model.onnx from the calibrate stage" if precision == "int8" else \
                "onnx/model.onnx from the export stage"
            raise PipelineError(f"{self.onnx_path}: precision.name={precision} but the graph has {found}; "
                                f"point the backend at {want}")
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise PipelineError("hardware.device=cuda but onnxruntime has no CUDAExecutionProvider; install "
                                    "onnxruntime-gpu (the `gpu` extra) or use hardware=cpu")
            providers, self.ort_device = ["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda"
        else:
            providers, self.ort_device = ["CPUExecutionProvider"], "cpu"
        self.session = ort_session(self.onnx_path, providers=providers, num_threads=self.inputs.num_threads)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.past_names = [n.replace("present.", "past_key_values.") for n in self.output_names[1:]]
        kv = {i.name: i.shape for i in self.session.get_inputs() if i.name.startswith("past_key_values.")}
        if not kv or set(kv) != set(self.past_names):
            raise PipelineError(f"{self.onnx_path}: not a decoder with KV cache (expected past_key_values.{{i}}.key/"
                                f".value inputs matching present.{{i}} outputs); re-export it with pipeline.export")
        self.kv_heads, self.head_dim = kv[self.past_names[0]][1], kv[self.past_names[0]][3]
        self.past: list = []
        self.length = 0

    def _ortvalue(self, array: np.ndarray):
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.ort_device, 0)

    def _step(self, ids: np.ndarray, past: list) -> torch.Tensor:
        """Run one forward on ids [batch, seq] after self.length cached tokens; keep the presents."""
        batch, seq = ids.shape
        binding = self.session.io_binding()
        binding.bind_ortvalue_input("input_ids", self._ortvalue(ids.astype(np.int64)))
        # No padding in benchmark batches: every cached and new position is attended.
        binding.bind_ortvalue_input("attention_mask", self._ortvalue(np.ones((batch, self.length + seq), np.int64)))
        positions = np.arange(self.length, self.length + seq, dtype=np.int64)
        binding.bind_ortvalue_input("position_ids", self._ortvalue(np.broadcast_to(positions, (batch, seq))))
        for name, value in zip(self.past_names, past):
            binding.bind_ortvalue_input(name, value)
        # ORT allocates the outputs: presents on the device (they grow by seq each step), logits on the
        # host, where the argmax runs.
        binding.bind_output("logits", "cpu")
        for name in self.output_names[1:]:
            binding.bind_output(name, self.ort_device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self.past = list(outputs[1:])
        self.length += seq
        logits = outputs[0].numpy()[:, -1]
        return torch.from_numpy(logits.argmax(axis=-1)).to(self.device)

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.detach().cpu().numpy()
        self.length = 0
        empty = np.zeros((ids.shape[0], self.kv_heads, 0, self.head_dim), dtype=np.float32)
        return self._step(ids, [self._ortvalue(empty) for _ in self.past_names])

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._step(tokens.detach().cpu().numpy()[:, None], self.past)

    def describe(self) -> dict[str, str]:
        facts = super().describe()
        if hasattr(self, "session"):
            facts.update(onnx_graph="int8-qdq" if self.quantized else "fp32",
                         execution_provider=self.session.get_providers()[0])
        return facts
