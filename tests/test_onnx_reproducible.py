"""Export and calibrate give the same bytes from another checkout, another source path and another
output directory, so DVC does not rerun them (or what depends on them) for a second clone or a queued
experiment."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytest_plugins = ["tests.fixtures_onnx"]

CALIB = {"num_samples": 4, "seq_len": 8}  # small: what is compared is the bytes, not the accuracy

OTHER_CHECKOUT = """
import json, sys
from pathlib import Path
import pipeline
from pipeline.calibrate import quantize
from pipeline.export import export_onnx

src, out = Path(sys.argv[1]), Path(sys.argv[2])
export_onnx(src, out / "onnx")
quantize(out / "onnx" / "model.onnx", src, out / "int8", **json.loads(sys.argv[3]))
print(json.dumps({"pipeline": pipeline.__file__}))
"""


def _digests(root: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())}


@pytest.fixture(scope="module")
def other_checkout(onnx_tiny_dir, tmp_path_factory) -> dict[str, Path]:
    """The pipeline package copied to another directory and run from there (a second clone, or DVC's
    temp workspace for a queued experiment), on a copy of the weights at another absolute path."""
    base = tmp_path_factory.mktemp("clone-b")
    checkout = base / "checkout"
    shutil.copytree(ROOT / "pipeline", checkout / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    src = base / "elsewhere" / "weights"
    shutil.copytree(onnx_tiny_dir, src)
    out = base / "outputs"
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    run = subprocess.run([sys.executable, "-c", OTHER_CHECKOUT, str(src), str(out), json.dumps(CALIB)], cwd=checkout,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    used = Path(json.loads(run.stdout.strip().splitlines()[-1])["pipeline"])
    assert used.parent == checkout / "pipeline"  # the copy ran, not this checkout's package
    return {"checkout": checkout, "src": src, "onnx": out / "onnx", "int8": out / "int8"}


def _local_roots(*extra: Path) -> list[bytes]:
    roots = {ROOT, Path(sys.prefix), Path(sys.base_prefix), Path.home(), *extra}
    return [str(r).encode() for r in roots if len(r.parts) > 1]


def test_export_is_byte_identical_across_checkouts(onnx_tiny_dir, onnx_export, other_checkout):
    out_dir, manifest = onnx_export
    assert _digests(other_checkout["onnx"]) == _digests(out_dir)
    assert set(_digests(out_dir)) == {"model.onnx", "manifest.json"}
    weights_manifest = (onnx_tiny_dir / "manifest.json").read_bytes()
    assert manifest["source_manifest_sha256"] == hashlib.sha256(weights_manifest).hexdigest()
    assert "model_dir" not in manifest


def test_int8_is_byte_identical_across_checkouts(onnx_tiny_dir, onnx_export, other_checkout, tmp_path):
    from pipeline.calibrate import quantize

    quantize(onnx_export[0] / "model.onnx", onnx_tiny_dir, tmp_path / "int8", **CALIB)
    here = _digests(tmp_path / "int8")
    assert set(here) == {"model.onnx", "calibration.json", "manifest.json"}
    assert _digests(other_checkout["int8"]) == here


def test_outputs_name_no_local_path(onnx_tiny_dir, onnx_export, other_checkout):
    roots = _local_roots(onnx_tiny_dir, onnx_export[0], *other_checkout.values())
    for root in (onnx_export[0], other_checkout["onnx"], other_checkout["int8"]):
        for f in root.iterdir():
            data = f.read_bytes()
            assert b"stack_trace" not in data, f
            for r in roots:
                assert r not in data, (f, r)
    # what calibrate reads from the metadata survives the stripping
    import onnx

    graph = onnx.load(str(onnx_export[0] / "model.onnx"), load_external_data=False).graph
    assert all(any(p.key == "pkg.torch.onnx.name_scopes" for p in n.metadata_props)
               for n in graph.node if n.op_type == "MatMul")


def test_strip_local_paths_reaches_subgraphs_functions_and_doc_strings():
    import onnx
    from onnx import TensorProto, helper

    from pipeline.export import strip_local_paths

    here = "/home/someone/checkout"
    trace = f'File "{here}/pipeline/export.py", line 80, in forward'

    def node(op, inputs, outputs, **attrs):
        n = helper.make_node(op, inputs, outputs, **attrs)
        helper.set_metadata_props(n, {"pkg.torch.onnx.stack_trace": "File \"/anywhere/x.py\", line 1",
                                      "pkg.torch.onnx.name_scopes": "['', 'lm_head']", "note": trace})
        return n

    out = helper.make_tensor_value_info("t", TensorProto.FLOAT, [1])
    branch = helper.make_graph([node("Identity", ["x"], ["t"])], "branch", [], [out])
    fn = helper.make_function("local", "Twice", ["a"], ["b"], [node("Add", ["a", "a"], ["b"])],
                              [helper.make_opsetid("", 18)])
    helper.set_metadata_props(fn, {"pkg.torch.onnx.stack_trace": trace})
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    helper.set_metadata_props(x, {"origin": trace})
    main = node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)
    main.doc_string = trace
    graph = helper.make_graph([main, node("Twice", ["y"], ["z"], domain="local")], "main", [cond, x],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, functions=[fn], opset_imports=[helper.make_opsetid("", 18),
                                                                      helper.make_opsetid("local", 1)])
    model.doc_string = "exported from " + here
    assert here.encode() in model.SerializeToString()

    # per node: stack_trace + the "note" naming `here`; two If branches, two graph nodes, one function
    # node; plus the function's own entry, x's entry, and two doc_strings
    assert strip_local_paths(model, [here]) == 2 * 5 + 1 + 1 + 2
    data = model.SerializeToString()
    assert here.encode() not in data and b"stack_trace" not in data and b"/anywhere/x.py" not in data
    assert data.count(b"pkg.torch.onnx.name_scopes") == 5  # harmless metadata stays
    onnx.checker.check_model(model)
    assert strip_local_paths(model, [here]) == 0


def test_stripping_a_model_with_external_data_keeps_the_weights_file(onnx_export, tmp_path):
    """Models over 2 GB keep their weights in model.onnx.data: stripping rewrites the graph file only, and
    the graph still points at the untouched weights."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from pipeline.export import _strip_local_paths_in_file

    model = onnx.load(str(onnx_export[0] / "model.onnx"))
    expected = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        helper.set_metadata_props(n, {"pkg.torch.onnx.stack_trace": f'File "{tmp_path}/x.py", line 1'})
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data")
    data = (tmp_path / "model.onnx.data").read_bytes()
    _strip_local_paths_in_file(path, [str(tmp_path)])
    assert (tmp_path / "model.onnx.data").read_bytes() == data
    assert b"stack_trace" not in path.read_bytes() and str(tmp_path).encode() not in path.read_bytes()
    onnx.checker.check_model(str(path), full_check=True)
    loaded = onnx.load(str(path))
    assert {i.name for i in loaded.graph.initializer} == set(expected)
    for i in loaded.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(i), expected[i.name])
