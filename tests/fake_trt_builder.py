"""The builder half of a stand-in `tensorrt` module (TensorRT 10.12+ / 11 names), for tests on machines without
TensorRT; its runtime half is tests/fake_tensorrt.py, which loads and runs the plans built here. It records
every call and enforces what the real library would reject: a network not created strongly typed, a profile
naming an input the ONNX graph lacks or giving it the wrong rank or fixed dims, a shape range that is not
min <= opt <= max, a dynamic input left without a shape in some profile, precision flags (gone in TensorRT 11),
set_timing_cache without its ignore_mismatch argument."""

from __future__ import annotations

import enum
import types

from tests import fake_tensorrt

RUNTIME = ("Logger", "Runtime", "TensorIOMode", "ExecutionContextAllocationStrategy", "Refitter", "OnnxParserRefitter",
           "LayerInformationFormat", "float32", "float16", "bfloat16", "int8", "int32", "int64", "bool")


def make(version: str = "10.13.0", strongly_typed_value: int = 1, fail_build: bool = False,
         parser_errors: tuple[str, ...] = ()) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    calls: list[tuple] = []
    trt.calls = calls

    class _Severity(enum.Enum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    class ILogger:
        Severity = _Severity

        def __init__(self):
            calls.append(("ILogger.__init__",))

    class IProgressMonitor:
        def __init__(self):
            calls.append(("IProgressMonitor.__init__",))

    trt.ILogger, trt.IProgressMonitor = ILogger, IProgressMonitor
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag",
                                                     {"STRONGLY_TYPED": strongly_typed_value})
    trt.MemoryPoolType = enum.Enum("MemoryPoolType", "WORKSPACE TACTIC_DRAM")
    trt.ProfilingVerbosity = enum.Enum("ProfilingVerbosity", "DETAILED LAYER_NAMES_ONLY NONE")
    trt.HardwareCompatibilityLevel = enum.Enum("HardwareCompatibilityLevel", "NONE AMPERE_PLUS SAME_COMPUTE_CAPABILITY")
    # TensorRT 11's BuilderFlag: no FP16/BF16/INT8/FP8 members, so code setting them fails here as it would there.
    trt.BuilderFlag = enum.Enum("BuilderFlag", "TF32 REFIT STRIP_PLAN WEIGHT_STREAMING REFIT_IDENTICAL DEBUG")

    class Network:
        def __init__(self, flags):
            if not flags & (1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)):
                raise AssertionError("network not created STRONGLY_TYPED")
            self.inputs: dict[str, list] = {}
            self.onnx = None

    class ParserError:
        def __init__(self, desc):
            self._desc = desc

        def node(self):
            return 3

        def node_name(self):
            return "node_mul_3"

        def node_operator(self):
            return "Mul"

        def desc(self):
            return self._desc

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.errors = network, [ParserError(d) for d in parser_errors]

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

        def parse_from_file(self, path):
            import onnx

            calls.append(("parse_from_file", path))
            graph = onnx.load(path, load_external_data=False).graph
            self.network.onnx = path
            for value in graph.input:
                dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
                self.network.inputs[value.name] = dims
            return not self.errors

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, low, opt, high):
            self.shapes[name] = (tuple(low), tuple(opt), tuple(high))

    class TimingCache:
        def __init__(self, blob):
            self.blob = bytes(blob)

        def serialize(self):
            return self.blob + b"+timed"

    class Config:
        def __init__(self):
            self.flags, self.profiles, self.pools, self.cache = {"TF32"}, [], {}, None
            self.progress_monitor = None

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool.name] = size

        def set_flag(self, flag):
            self.flags.add(flag.name)

        def clear_flag(self, flag):
            self.flags.discard(flag.name)

        def add_optimization_profile(self, profile):
            self.profiles.append(profile.shapes)
            return len(self.profiles) - 1

        def create_timing_cache(self, blob):
            return TimingCache(blob)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            calls.append(("create_network", flags))
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            if not config.profiles:
                raise AssertionError("no optimization profile")
            for i, profile in enumerate(config.profiles):
                for name, dims in network.inputs.items():
                    if -1 in dims and name not in profile:
                        raise AssertionError(f"profile {i}: dynamic input {name} has no shape")
                for name, (low, opt, high) in profile.items():
                    if name not in network.inputs:
                        raise AssertionError(f"profile {i}: {name} is not a network input")
                    dims = network.inputs[name]
                    for shape in (low, opt, high):
                        if len(shape) != len(dims) or any(d != -1 and d != s for d, s in zip(dims, shape)):
                            raise AssertionError(f"profile {i}: {name} shape {shape} does not fit {dims}")
                    if not all(a <= b <= c for a, b, c in zip(low, opt, high)):
                        raise AssertionError(f"profile {i}: {name} is not min <= opt <= max")
            calls.append(("build", sorted(config.flags), config.pools, config.builder_optimization_level,
                          config.profiling_verbosity.name, config.hardware_compatibility_level.name))
            if config.progress_monitor is not None:
                monitor = config.progress_monitor
                monitor.phase_start("Building engine", None, 2)
                monitor.step_complete("Building engine", 0)
                monitor.phase_finish("Building engine")
            if fail_build:
                self.logger.log(_Severity.ERROR, "out of memory while timing tactics")
                return None
            # A plan tests/fake_tensorrt.py runs: the graph and each profile's (batch, seq, past) ranges.
            dims = {f"profile{i}": {"batch": [s[0] for s in p["input_ids"]], "seq": [s[1] for s in p["input_ids"]],
                                    "past": [s[2] for s in p["past_key_values.0.key"]]}
                    for i, p in enumerate(config.profiles)}
            return fake_tensorrt.serialize_plan(network.onnx, dims, stripped="STRIP_PLAN" in config.flags)

    trt.Builder, trt.OnnxParser = Builder, OnnxParser
    for name in RUNTIME:
        setattr(trt, name, getattr(fake_tensorrt, name))
    return trt
