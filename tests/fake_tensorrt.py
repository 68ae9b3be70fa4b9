"""A CPU stand-in for the `tensorrt` module, computing with onnxruntime: the subset of the TensorRT 10.12+/11
Python runtime API that pipeline/backends/tensorrt.py calls, with the same names and return conventions (bools
and None, not exceptions), and the rules the real runtime enforces:

* a shape outside the context's selected optimization profile is refused (set_input_shape returns False);
* only the first context starts with profile 0; any other must select a profile first, and contexts alive at
  once hold different profiles (set_optimization_profile_async returns False otherwise);
* an output's shape is known only once every input shape is set (get_tensor_shape raises before, where
  TensorRT answers -1 dims: stricter, so a backend that allocates too early fails loudly);
* a weight-streaming budget is set before any execution context exists (the setter raises after);
* execute_async_v3 returns False while an input shape or any tensor address (null included) is missing, or
  while a stripped plan has not been refitted.

execute_async_v3 really computes: it reads each input from its raw CPU address, runs the ONNX model in
onnxruntime and writes each output to the address it was given. Every run is recorded in `engine.runs`.

A "plan" is JSON naming the ONNX model and the profiles (serialize_plan writes one). Install the module with
monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt)."""

from __future__ import annotations

import ctypes
import enum
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.engines.profiles import input_shapes

__version__ = "10.13.0"


class Logger:
    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = Severity

    def __init__(self, min_severity: Severity = Severity.WARNING):
        self.min_severity = min_severity
        self.messages: list[str] = []

    def log(self, severity: Severity, msg: str) -> None:
        if severity <= self.min_severity:
            self.messages.append(msg)


class DataType(enum.Enum):
    FLOAT = np.float32
    HALF = np.float16
    BF16 = "bfloat16"  # numpy has none: the stand-in cannot move bf16 buffers
    INT8 = np.int8
    INT32 = np.int32
    INT64 = np.int64
    BOOL = np.bool_


float32, float16, bfloat16 = DataType.FLOAT, DataType.HALF, DataType.BF16
int8, int32, int64 = DataType.INT8, DataType.INT32, DataType.INT64
ORT_TYPES = {"tensor(float)": float32, "tensor(float16)": float16, "tensor(bfloat16)": bfloat16,
             "tensor(int8)": int8, "tensor(int32)": int32, "tensor(int64)": int64, "tensor(bool)": DataType.BOOL}


class ExecutionContextAllocationStrategy(enum.Enum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


def serialize_plan(onnx_path: Path, profiles: dict, *, stripped: bool = False, version: str = __version__) -> bytes:
    """What the stand-in deserializes: the ONNX model (structure and, unless stripped, weights) and the profiles
    in index order. A plan of another `version` does not deserialize, as a real one of another TensorRT."""
    return json.dumps({"tensorrt_version": version, "onnx": str(onnx_path), "profiles": profiles,
                       "stripped": stripped}).encode()


def _buffer(address: int, shape: tuple[int, ...], dtype: DataType) -> np.ndarray:
    """The array at a raw CPU address (a view: writing to it writes the caller's tensor)."""
    if dtype is bfloat16:
        raise TypeError("the fake tensorrt moves no bfloat16 buffers (numpy has no bfloat16)")
    count = int(np.prod(shape))
    if count == 0:
        return np.zeros(shape, dtype.value)
    nbytes = count * np.dtype(dtype.value).itemsize
    raw = np.ctypeslib.as_array((ctypes.c_byte * nbytes).from_address(address))
    return raw.view(dtype.value).reshape(shape)


class Runtime:
    def __init__(self, logger: Logger):
        self.logger = logger

    def deserialize_cuda_engine(self, serialized: bytes):
        try:
            plan = json.loads(bytes(serialized))
        except (UnicodeDecodeError, json.JSONDecodeError):
            plan = {}
        if plan.get("tensorrt_version") != __version__:
            self.logger.log(Logger.ERROR, "the plan was built by another TensorRT version or is not a plan")
            return None
        return ICudaEngine(plan, self.logger)


@dataclass
class Run:
    """One execute_async_v3: which context ran it, on which profile, with which shapes and addresses."""
    context: "IExecutionContext"
    profile: int
    shapes: dict
    addresses: dict


class ICudaEngine:
    def __init__(self, plan: dict, logger: Logger):
        self.logger = logger
        self.profiles = list(plan["profiles"].values())
        self.has_weights = not plan["stripped"]
        self.refittable = plan["stripped"]
        self.contexts: list[IExecutionContext] = []
        self.runs: list[Run] = []
        self._budget = 0
        self._load(plan["onnx"])

    def _load(self, onnx_path) -> None:
        import onnxruntime as ort

        self.onnx_path = str(onnx_path)
        self.session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        self.io = {t.name: (TensorIOMode.INPUT, ORT_TYPES[t.type]) for t in inputs}
        self.io.update({t.name: (TensorIOMode.OUTPUT, ORT_TYPES[t.type]) for t in outputs})
        past = [t for t in inputs if t.name.startswith("past_key_values.")]
        self.num_layers, self.kv_heads, self.head_dim = len(past) // 2, past[0].shape[1], past[0].shape[3]
        self.vocab = next(t for t in outputs if t.name == "logits").shape[2]

    @property
    def num_io_tensors(self) -> int:
        return len(self.io)

    def get_tensor_name(self, index: int) -> str:
        return list(self.io)[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self.io[name][0] if name in self.io else TensorIOMode.NONE

    def get_tensor_dtype(self, name: str) -> DataType:
        return self.io[name][1]

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.profiles)

    def profile_shapes(self, index: int) -> dict:
        return input_shapes(self.profiles[index], self.num_layers, self.kv_heads, self.head_dim)

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
        return list(self.profile_shapes(profile_index)[name])

    @property
    def device_memory_size_v2(self) -> int:
        return 0  # onnxruntime allocates its own scratch

    @property
    def weight_streaming_budget_v2(self) -> int:
        return self._budget

    @weight_streaming_budget_v2.setter
    def weight_streaming_budget_v2(self, nbytes: int) -> None:
        if self.contexts:
            raise RuntimeError("weight_streaming_budget_v2 must be set before any execution context is created")
        self._budget = int(nbytes)

    def get_weight_streaming_automatic_budget(self) -> int:
        return 1 << 20

    def create_engine_inspector(self) -> "EngineInspector":
        return EngineInspector(self)

    def create_execution_context(self, strategy=ExecutionContextAllocationStrategy.STATIC) -> "IExecutionContext":
        # As TensorRT: the first context created selects profile 0 implicitly, the others none.
        context = IExecutionContext(self, 0 if not self.contexts else None)
        context.strategy = strategy
        self.contexts.append(context)
        return context


class IExecutionContext:
    def __init__(self, engine: ICudaEngine, profile):
        self.engine = engine
        self.active_optimization_profile = profile
        self.profile_changes = 0  # set_optimization_profile_async calls that took effect
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}

    def _inputs(self) -> list[str]:
        return [n for n, (mode, _) in self.engine.io.items() if mode is TensorIOMode.INPUT]

    def _refuse(self, msg: str) -> bool:
        self.engine.logger.log(Logger.ERROR, msg)
        return False

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
        if not 0 <= profile_index < self.engine.num_optimization_profiles:
            return self._refuse(f"profile {profile_index} does not exist")
        if any(c is not self and c.active_optimization_profile == profile_index for c in self.engine.contexts):
            return self._refuse(f"profile {profile_index} is held by another execution context")
        self.active_optimization_profile = profile_index
        self.profile_changes += 1
        self.shapes.clear()  # shapes were checked against the old profile
        return True

    def set_input_shape(self, name: str, shape) -> bool:
        if self.active_optimization_profile is None:
            return self._refuse("no optimization profile selected on this context")
        if self.engine.get_tensor_mode(name) is not TensorIOMode.INPUT:
            return self._refuse(f"{name} is not an input")
        low, _, high = self.engine.profile_shapes(self.active_optimization_profile)[name]
        shape = tuple(int(d) for d in shape)
        if len(shape) != len(low) or not all(lo <= d <= hi for lo, d, hi in zip(low, shape, high)):
            return self._refuse(f"{name} shape {shape} is outside profile {self.active_optimization_profile} "
                                f"[{low}, {high}]")
        self.shapes[name] = shape
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if self.engine.get_tensor_mode(name) is TensorIOMode.INPUT:
            return self.shapes[name]
        missing = [n for n in self._inputs() if n not in self.shapes]
        if missing:
            raise RuntimeError(f"get_tensor_shape({name}) before the shapes of inputs {missing} are set")
        batch, seq = self.shapes["input_ids"]
        if name == "logits":
            return batch, seq, self.engine.vocab
        past = self.shapes["past_key_values.0.key"][2]
        return batch, self.engine.kv_heads, past + seq, self.engine.head_dim

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if name not in self.engine.io:
            return self._refuse(f"{name} is not an I/O tensor")
        self.addresses[name] = int(memory)
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        engine = self.engine
        if not isinstance(stream_handle, int):
            return self._refuse(f"stream handle {stream_handle!r} is not an integer")
        if self.active_optimization_profile is None:
            return self._refuse("no optimization profile selected on this context")
        if not engine.has_weights:
            return self._refuse("the plan is stripped of its weights and was not refitted")
        if self.strategy is ExecutionContextAllocationStrategy.USER_MANAGED:
            return self._refuse("USER_MANAGED context without device memory (the fake has no set_device_memory)")
        missing = [n for n in self._inputs() if n not in self.shapes]
        missing += [n for n in engine.io if not self.addresses.get(n)]
        if missing:
            return self._refuse(f"shapes or addresses missing for {missing}")
        feeds = {n: _buffer(self.addresses[n], self.shapes[n], engine.io[n][1]).copy() for n in self._inputs()}
        names = [n for n in engine.io if n not in feeds]
        for name, value in zip(names, engine.session.run(names, feeds)):
            shape = self.get_tensor_shape(name)
            if value.shape != shape:
                raise AssertionError(f"{name}: onnxruntime computed {value.shape}, get_tensor_shape said {shape}")
            _buffer(self.addresses[name], shape, engine.io[name][1])[...] = value
        engine.runs.append(Run(self, self.active_optimization_profile, dict(self.shapes), dict(self.addresses)))
        return True


class LayerInformationFormat(enum.Enum):
    ONELINE = 0
    JSON = 1


class EngineInspector:
    """The engine inspector's JSON, as DETAILED verbosity shapes it: one layer per ONNX node (nothing fuses here)."""

    def __init__(self, engine: ICudaEngine):
        self.engine = engine

    def get_engine_information(self, fmt: LayerInformationFormat) -> str:
        import onnx

        graph = onnx.load(self.engine.onnx_path, load_external_data=False).graph
        layers = [{"Name": n.name, "LayerType": n.op_type} for n in graph.node]
        return json.dumps({"Layers": layers, "Bindings": list(self.engine.io)}) if fmt is LayerInformationFormat.JSON \
            else "\n".join(layer["Name"] for layer in layers)


class Refitter:
    def __init__(self, engine: ICudaEngine, logger: Logger):
        self.engine = engine
        self.logger = logger
        self.source = None

    def refit_cuda_engine(self) -> bool:
        if not self.engine.refittable or self.source is None:
            self.logger.log(Logger.ERROR, "engine not refittable, or no weights given")
            return False
        self.engine._load(self.source)  # the weights come from the refit file
        self.engine.has_weights = True
        return True


class OnnxParserRefitter:
    def __init__(self, refitter: Refitter, logger: Logger):
        self.refitter = refitter
        self.logger = logger

    def refit_from_file(self, model: str) -> bool:
        if not Path(model).is_file():
            self.logger.log(Logger.ERROR, f"{model}: cannot open")
            return False
        self.refitter.source = model
        return True


bool = DataType.BOOL  # trt.bool; it shadows the builtin in this module, where no code calls bool()
