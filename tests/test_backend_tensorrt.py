"""pipeline/backends/tensorrt.py on tests/fake_tensorrt.py (onnxruntime behind the TensorRT runtime API, enforcing
its rules): greedy tokens equal the onnxruntime backend's, each call runs on the context of the profile that holds
it, the KV cache stays in torch tensors, and every failure is one line. The test marked `tensorrt` builds and runs
a real engine (TensorRT and a CUDA GPU)."""

from __future__ import annotations

import sys

import pytest
import torch

from pipeline import artifacts
from pipeline.backends.base import BackendInputs
from pipeline.backends.tensorrt import PLAN_FILE, TensorRTBackend
from pipeline.engines import trt_build
from pipeline.errors import PipelineError
from tests import fake_tensorrt
from tests.helpers import make_backend

pytest_plugins = ["tests.fixtures_onnx"]

STEPS = 24
ONE = {"all": {"batch": [1, 2, 4], "seq": [1, 8, 16], "past": [0, 8, 64]}}
TWO = {"prefill": {"batch": [1, 2, 4], "seq": [1, 8, 16], "past": [0, 0, 0]},
       "decode": {"batch": [1, 2, 4], "seq": [1, 1, 1], "past": [1, 16, 64]}}
# Holds batch <= 2, an 8-token prompt and 3 decode steps (past 8, 9, 10).
TIGHT = {"prefill": {"batch": [1, 2, 2], "seq": [1, 8, 8], "past": [0, 0, 0]},
         "decode": {"batch": [1, 2, 2], "seq": [1, 1, 1], "past": [1, 8, 10]}}


def _greedy(backend, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    tokens = [backend.prefill(prompt)]
    for _ in range(steps - 1):
        tokens.append(backend.decode(tokens[-1]))
    return torch.stack(tokens, dim=1)


def _dims(model) -> tuple[int, int, int]:
    return model.num_layers, model.num_kv_heads, model.hidden_size // model.num_heads


def engine_artifact(root, onnx_dir, model, profiles, *, stripped=False, plan=None, **changes):
    """An engine artifact as stage build_engine leaves it (model.plan + manifest.json), its plan for the fake."""
    onnx_path = onnx_dir / "model.onnx"
    root.mkdir(parents=True)
    (root / PLAN_FILE).write_bytes(plan or fake_tensorrt.serialize_plan(onnx_path, profiles, stripped=stripped))
    num_layers, kv_heads, head_dim = _dims(model)
    fields = dict(kind="trt-engine", precision="fp32", profiles=profiles, num_layers=num_layers, kv_heads=kv_heads,
                  head_dim=head_dim, kv_dtype="float32", strip_plan=stripped,
                  refit_source=str(onnx_path) if stripped else None, tensorrt_version=fake_tensorrt.__version__)
    artifacts.write_manifest(root, **{**fields, **changes})
    return root


def backend_for(artifact, precision="fp32", device="cpu", **options) -> TensorRTBackend:
    return TensorRTBackend(BackendInputs(backend="tensorrt", artifact=artifact, precision=precision, device=device,
                                         options=options))


@pytest.fixture
def trt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt)
    return fake_tensorrt


@pytest.fixture
def engine(tmp_path, onnx_export, default_cfg):
    """engine(profiles, **changes) -> a new engine artifact directory (see engine_artifact)."""
    count = iter(range(100))
    return lambda profiles, **kw: engine_artifact(tmp_path / f"engine{next(count)}", onnx_export[0],
                                                  default_cfg.model, profiles, **kw)


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(2, 512, (2, 8), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def ort_tokens(onnx_export, prompt) -> torch.Tensor:
    backend = make_backend("onnxruntime", onnx_export[0])
    backend.load()
    return _greedy(backend, prompt, STEPS)


def test_greedy_tokens_equal_onnxruntime(trt, engine, prompt, ort_tokens):
    backend = backend_for(engine(ONE))
    backend.load()
    tokens = _greedy(backend, prompt, STEPS)
    assert tokens.dtype == ort_tokens.dtype and tokens.device == ort_tokens.device
    assert torch.equal(tokens, ort_tokens)
    assert len(backend.engine.runs) == STEPS and len(backend.engine.contexts) == 1
    # a new prefill starts from an empty cache again (the runner repeats generations)
    assert torch.equal(_greedy(backend, prompt, 4), ort_tokens[:, :4])


def test_prefill_and_decode_run_on_their_own_profiles_context(trt, engine, prompt, ort_tokens):
    backend = backend_for(engine(TWO))
    backend.load()
    assert torch.equal(_greedy(backend, prompt, 6), ort_tokens[:, :6])
    runs = backend.engine.runs
    assert [r.profile for r in runs] == [0, 1, 1, 1, 1, 1]
    prefill, decode = runs[0].context, runs[1].context
    assert prefill is not decode and all(r.context is decode for r in runs[1:])
    assert backend.contexts == {0: prefill, 1: decode}
    # a second generation reuses both contexts; neither ever switched its profile
    assert torch.equal(_greedy(backend, prompt, 3), ort_tokens[:, :3])
    assert [r.context for r in runs[6:]] == [prefill, decode, decode] and len(backend.engine.contexts) == 2
    assert (prefill.active_optimization_profile, decode.active_optimization_profile) == (0, 1)
    assert prefill.profile_changes == decode.profile_changes == 1
    assert prefill.strategy == decode.strategy == trt.ExecutionContextAllocationStrategy.ON_PROFILE_CHANGE


@pytest.mark.parametrize("call, shapes", [
    (lambda b, p: b.prefill(torch.cat([p, p[:1]])), "batch=3 seq=8 past=0"),
    (lambda b, p: b.prefill(torch.cat([p, p[:, :1]], dim=1)), "batch=2 seq=9 past=0"),
    (lambda b, p: _greedy(b, p, 5), "batch=2 seq=1 past=11")])
def test_a_call_no_profile_holds_fails_before_execute(trt, engine, prompt, call, shapes):
    backend = backend_for(engine(TIGHT))
    backend.load()
    with pytest.raises(PipelineError, match=f"no optimization profile holds {shapes} .*tensorrt.profiles") as e:
        call(backend, prompt)
    assert "\n" not in str(e.value)
    ran = len(backend.engine.runs)
    assert ran == (4 if "past=11" in shapes else 0)  # prefill + 3 decodes ran, the failing call did not


def test_prepare_checks_the_last_decode_step(trt, engine):
    backend = backend_for(engine(TIGHT))
    backend.load()
    backend.prepare(2, 8 + 4)  # last decode: past 10
    with pytest.raises(PipelineError, match="batch=2 seq=1 past=11 .*tensorrt.profiles"):
        backend.prepare(2, 8 + 5)
    with pytest.raises(PipelineError, match="batch=3 seq=1 past=10"):
        backend.prepare(3, 8 + 4)
    assert not backend.engine.runs


def _one_line_error(backend, match):
    with pytest.raises(PipelineError, match=match) as e:
        backend.load()
    assert "\n" not in str(e.value)


def test_precision_must_match_the_manifest(trt, engine):
    _one_line_error(backend_for(engine(ONE, precision="fp16")),
                    r"manifest.json: the engine was built for precision fp16, not precision.name=fp32; "
                    r"rebuild it with `dvc repro build_engine`")


def test_a_missing_plan_names_the_file(trt, engine):
    artifact = engine(ONE)
    (artifact / PLAN_FILE).unlink()
    _one_line_error(backend_for(artifact), "model.plan: not found in the artifact handed to backend tensorrt")


@pytest.mark.parametrize("plan", [b"\x7fELF not a plan", "another TensorRT"])
def test_a_plan_that_does_not_deserialize(trt, engine, onnx_export, plan):
    if plan == "another TensorRT":
        plan = fake_tensorrt.serialize_plan(onnx_export[0] / "model.onnx", ONE, version="10.0.1")
    _one_line_error(backend_for(engine(ONE, plan=plan)),
                    r"model.plan: TensorRT 10.13.0 cannot deserialize it .*`dvc repro build_engine`")


def test_kv_cache_stays_in_torch_tensors(trt, engine, default_cfg, prompt, monkeypatch):
    num_layers, kv_heads, head_dim = _dims(default_cfg.model)
    backend = backend_for(engine(ONE))
    backend.load()

    def through_numpy(self, *args, **kwargs):
        raise AssertionError("a tensor went through numpy")

    monkeypatch.setattr(torch.Tensor, "numpy", through_numpy)
    token = backend.prefill(prompt)
    # the empty past of a prefill points at the scratch tensor (TensorRT wants non-null addresses)
    assert backend.engine.runs[0].addresses["past_key_values.0.key"] == backend.scratch.data_ptr() != 0
    for step in range(3):
        past = backend.past
        assert len(past) == 2 * num_layers and all(type(t) is torch.Tensor for t in past)
        assert all(t.shape == (2, kv_heads, 8 + step, head_dim) and t.dtype == torch.float32 for t in past)
        token = backend.decode(token)
        # the presents were fed back as the next past by address: no copy
        fed = backend.engine.runs[-1].addresses
        assert [fed[name] for name in backend.past_names] == [t.data_ptr() for t in past]


def test_a_stripped_plan_is_refitted_from_its_onnx(trt, engine, prompt, ort_tokens):
    backend = backend_for(engine(ONE, stripped=True))
    backend.load()
    assert torch.equal(_greedy(backend, prompt, 4), ort_tokens[:, :4])


def test_a_stripped_plan_without_its_refit_source(trt, engine, tmp_path):
    missing = tmp_path / "onnx" / "model.onnx"
    _one_line_error(backend_for(engine(ONE, stripped=True, refit_source=str(missing))),
                    f"{missing}: the ONNX model to refit the stripped plan .* is missing")


@pytest.mark.parametrize("gib, budget", [(0.5, 1 << 29), (None, 1 << 20)])
def test_weight_streaming_budget(trt, engine, prompt, ort_tokens, gib, budget):
    backend = backend_for(engine(ONE), weight_streaming=True, weight_streaming_budget_gib=gib)
    backend.load()  # the fake refuses a budget set once a context exists
    assert backend.engine.weight_streaming_budget_v2 == budget
    assert torch.equal(backend.prefill(prompt), ort_tokens[:, 0])


def test_describe(trt, engine):
    backend = backend_for(engine(TWO))
    backend.load()
    facts = backend.describe()
    assert facts["tensorrt_version"] == "10.13.0" and facts["profiles"] == "prefill,decode"
    assert facts["kv_dtype"] == "float32" and facts["engine_device_memory_bytes"] == "0"
    backend.close()
    assert backend.engine is None and "tensorrt_version" not in backend.describe()


def test_the_fake_enforces_the_runtime_rules(onnx_export, default_cfg, prompt):
    """The fake refuses what TensorRT refuses, so the tests above could fail."""
    trt = fake_tensorrt
    onnx_path = onnx_export[0] / "model.onnx"
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(trt.serialize_plan(onnx_path, TWO))
    first, second = engine.create_execution_context(), engine.create_execution_context()
    assert not second.set_input_shape("input_ids", (2, 8))  # only the first context starts with a profile
    assert not second.set_optimization_profile_async(0, 0)  # profile 0 is the first context's
    assert second.set_optimization_profile_async(1, 0)
    assert not second.set_input_shape("input_ids", (2, 8))  # decode holds seq 1 only

    num_layers, kv_heads, head_dim = _dims(default_cfg.model)
    feeds = {"input_ids": prompt, "attention_mask": torch.ones(2, 8, dtype=torch.int64),
             "position_ids": torch.arange(8).expand(2, 8).contiguous()}
    scratch = torch.zeros(1)
    with pytest.raises(RuntimeError, match="before the shapes"):
        first.get_tensor_shape("logits")
    for name in [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]:
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            shape = tuple(feeds[name].shape) if name in feeds else (2, kv_heads, 0, head_dim)
            assert first.set_input_shape(name, shape)
            first.set_tensor_address(name, feeds[name].data_ptr() if name in feeds else scratch.data_ptr())
    logits = torch.zeros(first.get_tensor_shape("logits"))
    first.set_tensor_address("logits", logits.data_ptr())
    assert not first.execute_async_v3(0)  # the presents have no address
    presents = [torch.zeros(first.get_tensor_shape(f"present.{i}.{kind}"))
                for i in range(num_layers) for kind in ("key", "value")]
    for i, t in enumerate(presents):
        first.set_tensor_address(f"present.{i // 2}.{('key', 'value')[i % 2]}", t.data_ptr())
    assert first.execute_async_v3(0) and logits.abs().sum() > 0 and presents[0].abs().sum() > 0
    assert not first.set_input_shape("past_key_values.0.key", (2, kv_heads, 1, head_dim))  # prefill holds past 0

    stripped = trt.Runtime(trt.Logger()).deserialize_cuda_engine(trt.serialize_plan(onnx_path, TWO, stripped=True))
    context = stripped.create_execution_context()
    context.shapes, context.addresses = first.shapes, first.addresses
    assert not context.execute_async_v3(0)  # no weights until refitted
    with pytest.raises(RuntimeError, match="before any execution context"):
        stripped.weight_streaming_budget_v2 = 1


@pytest.mark.tensorrt
def test_a_real_engine_matches_onnxruntime(tmp_path, onnx_export, default_cfg, prompt, ort_tokens):
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install -e '.[tensorrt]')")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    num_layers, kv_heads, head_dim = _dims(default_cfg.model)
    # The build stage's own code (pipeline/engines/trt_build.py), TF32 off: plain fp32 math, as onnxruntime's on
    # CPU, so no near-tie flips.
    section = {**default_cfg.dataclass_dict("tensorrt"), "profiles": ONE, "tf32": False, "timing_cache": False}
    settings = trt_build.settings(section, onnx_export[0] / "model.onnx", num_layers=num_layers, kv_heads=kv_heads,
                                  head_dim=head_dim, timing_cache=None)
    root = tmp_path / "engine"
    root.mkdir()
    metrics = trt_build.build(trt, settings, root, tmp_path / "build.log")
    assert metrics["engine_layers"] > 0 and (root / trt_build.LAYERS_FILE).is_file()
    artifacts.write_manifest(root, kind="trt-engine", precision="fp32", profiles=ONE, num_layers=num_layers,
                             kv_heads=kv_heads, head_dim=head_dim, kv_dtype="float32", strip_plan=False,
                             refit_source=None, tensorrt_version=trt.__version__)
    backend = backend_for(root, device="cuda")
    backend.load()
    tokens = _greedy(backend, prompt.cuda(), STEPS)
    assert tokens.is_cuda and backend.past[0].is_cuda
    assert torch.equal(tokens.cpu(), ort_tokens)
