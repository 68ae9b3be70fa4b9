"""Fault class 2 of issue 19: secrets. Credentials in a tracking URI (user:password@, tokens in the query
string), in any other configured value, or in the environment (HF_TOKEN, MLFLOW_TRACKING_PASSWORD/TOKEN,
AWS_*) never reach console output, MLflow params/tags/artifacts, pending-run records or any file a run
writes; params.yaml refuses them (it is committed and recorded by DVC experiments); and a URI with
credentials reaches an MLflow server that requires them instead of being deferred.

The authenticated server is a real `mlflow server` behind a small basic-auth reverse proxy written here
(MLflow's own `--app-name basic-auth` needs Flask-WTF, which is not installed)."""

from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from pipeline import config, tracking
from pipeline.errors import ConfigError, PipelineError, redact
from tests.conftest import ROOT
from tests.helpers import MlflowServer, copy_project, free_port, project_env, run

USER = "planted-user"
URI_PW = "PlantedUriPw9137"  # the password in the tracking URI; also what the proxy accepts
QUERY_TOKEN = "PlantedQueryTok5521"
ACCESS_TOKEN = "PlantedAccessTok8802"
SIG = "PlantedSig7730"
ENV_SECRETS = {"HF_TOKEN": "hf_PlantedHubTok4410", "MLFLOW_TRACKING_PASSWORD": "PlantedEnvPw2286",
               "MLFLOW_TRACKING_TOKEN": "PlantedMlflowTok3391", "AWS_SECRET_ACCESS_KEY": "PlantedAwsSecret6604",
               "AWS_SESSION_TOKEN": "PlantedAwsSession1175"}
PLANTED = [URI_PW, QUERY_TOKEN, ACCESS_TOKEN, SIG, *ENV_SECRETS.values(),
           base64.b64encode(f"{USER}:{URI_PW}".encode()).decode()]  # the Authorization header's value
LABEL = "tiny fp32 tp1pp1"


class AuthProxy:
    """HTTP reverse proxy to 127.0.0.1:`upstream` that answers 401 unless the request carries HTTP basic
    auth for user:password (the Authorization header is not passed on)."""

    def __init__(self, upstream: int, user: str, password: str):
        expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.refused = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if self.headers.get("Authorization") != expected:
                    proxy.refused += 1
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                skip = {"authorization", "host", "connection", "transfer-encoding", "keep-alive"}
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                conn = http.client.HTTPConnection("127.0.0.1", upstream, timeout=120)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                finally:
                    conn.close()
                self.send_response(response.status)
                for k, v in response.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "keep-alive"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def uri(self, userinfo: str = "") -> str:
        return f"http://{userinfo + '@' if userinfo else ''}127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """A real mlflow server that only answers through a basic-auth proxy: (server, proxy)."""
    root = tmp_path_factory.mktemp("mlflow")
    server = MlflowServer(root, free_port())
    server.start()
    proxy = AuthProxy(server.port, USER, URI_PW)
    try:
        yield server, proxy
    finally:
        proxy.stop()
        server.stop()


def _all_runs(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("llama3-inference")
    return client, (client.search_runs([exp.experiment_id]) if exp else [])


def _leaks(text: str | bytes, where: str) -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    return [f"{where}: {secret}" for secret in PLANTED if secret.encode() in data]


# --- the mask ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("https://user:s3cret@mlflow.example.com/x", "https://***@mlflow.example.com/x"),
    ("http://tok@host:5000", "http://***@host:5000"),
    ("see http://u:p@ss@host/path ok", "see http://***@host/path ok"),  # an unescaped @ in the password
    ("https://host/a?token=abc123&x=1", "https://host/a?token=***&x=1"),
    ("https://host/?access_token=abc&sig=def#frag", "https://host/?access_token=***&sig=***#frag"),
    ("https://acct.blob.core.windows.net/c?sv=2021&se=x&sig=AbC%2Bd", "https://acct.blob.core.windows.net/c?sv=2021&se=x&sig=***"),
    ("s3://b/k?X-Amz-Signature=f00&X-Amz-Credential=AKIA/x", "s3://b/k?X-Amz-Signature=***&X-Amz-Credential=***"),
    ("Authorization: Bearer abcdef123456", "Authorization: Bearer ***"),
    ("failed (https://h/?token=abc123); retry", "failed (https://h/?token=***); retry"),
    ("sqlite:///x.db", "sqlite:///x.db"),
    ("https://huggingface.co/meta-llama/Meta-Llama-3-8B", "https://huggingface.co/meta-llama/Meta-Llama-3-8B"),
    ("mail me at a@b.c, tokens=5 and key_size=3", "mail me at a@b.c, tokens=5 and key_size=3"),
    ("Basic statistics: Token embeddings", "Basic statistics: Token embeddings"),
])
def test_redact_masks_userinfo_query_credentials_and_auth_headers(text, expected, monkeypatch):
    for key in list(os.environ):
        monkeypatch.delenv(key)  # nothing from the caller's environment may change the expected text
    assert redact(text) == expected


def test_redact_masks_values_of_secret_environment_variables(monkeypatch):
    for key, value in ENV_SECRETS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HF_ENDPOINT", f"https://mirror-user:{URI_PW}@hf-mirror.example.com")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # not a secret: TOKENIZERS is not TOKEN
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")  # a user name is not a secret
    text = " ".join([*ENV_SECRETS.values(), f"password {URI_PW} alone", "false", "alice"])
    masked = redact(text)
    assert not _leaks(masked, "redact()")
    assert masked.endswith("false alice") and masked.count("***") == len(ENV_SECRETS) + 1
    monkeypatch.setenv("GIT_REMOTE", "https://ghp_PlantedGitTok@github.com/o/r")  # a token alone as userinfo
    assert redact("pushed with ghp_PlantedGitTok") == "pushed with ***"


# --- params.yaml refuses credentials ---------------------------------------------------------------------------


@pytest.mark.parametrize("override, key", [
    (f"tracking.uri=http://{USER}:{URI_PW}@mlflow.example.com:5000", "tracking.uri"),
    (f"tracking.uri='https://mlflow.example.com/?token={QUERY_TOKEN}'", "tracking.uri"),
    (f"serving.dataset_path='https://data.example.com/sharegpt.json?sig={SIG}'", "serving.dataset_path"),
])
def test_credentials_in_the_config_are_refused_in_one_line_that_does_not_repeat_them(override, key, tmp_path, capsys):
    """A credential in params.yaml would be committed with it, recorded in dvc.lock (for the sections stages
    declare) and in every DVC experiment commit: compose and every stage refuse it and say where to put it."""
    from pipeline.__main__ import main

    out = tmp_path / "params.yaml"
    assert main(["compose", "--conf", str(ROOT / "conf"), "--output", str(out), override]) == 1
    err = capsys.readouterr().err.strip()
    assert not out.exists()
    assert len(err.splitlines()) == 1 and key in err and "environment" in err, err
    assert not _leaks(err, "compose error")
    # A params.yaml edited by hand (or by `dvc exp run -S`): every stage's config.load refuses it.
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    section, _, leaf = key.partition(".")
    raw[section][leaf] = yaml.safe_load(override.partition("=")[2])
    out.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as caught:
        config.load(out)
    assert key in str(caught.value) and not _leaks(str(caught.value), "config.load error")


def test_no_stage_declares_the_tracking_section():
    """dvc.lock records the params each stage declares: tracking (a URI) must never be among them."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    declared = {p for s in stages.values() for p in s.get("params") or [] if isinstance(p, str)}
    assert not any(p == "tracking" or p.startswith("tracking.") for p in declared)


# --- messages of lower layers ----------------------------------------------------------------------------------


def test_hub_errors_do_not_repeat_endpoint_credentials(monkeypatch):
    from huggingface_hub.errors import HfHubHTTPError

    from pipeline.model import sources

    monkeypatch.setenv("HF_TOKEN", ENV_SECRETS["HF_TOKEN"])
    url = f"https://{USER}:{URI_PW}@hf-mirror.example.com/api/models/org/m?token={QUERY_TOKEN}"
    with pytest.raises(PipelineError) as caught:
        with sources._hub_errors("org/m", None):
            response = type("Response", (), {"headers": {}, "request": None})()  # what the error reads of it
            raise HfHubHTTPError(f"502 Server Error: Bad Gateway for url: {url} ({ENV_SECRETS['HF_TOKEN']})",
                                 response=response)
    assert "hf-mirror.example.com" in str(caught.value) and not _leaks(str(caught.value), "hub error")


def test_stage_error_lines_and_tracebacks_are_masked(tmp_path):
    """Whatever a stage or the CLI writes to stdout/stderr (its error line, a library's warning, the
    traceback of an unforeseen error) goes through the mask."""
    script = tmp_path / "leaky.py"
    script.write_text(
        "import sys, warnings\n"
        "from pipeline.errors import PipelineError\n"
        "from stages._main import run\n"
        f"URL = 'http://{USER}:{URI_PW}@h:1/?token={QUERY_TOKEN}'\n"
        "def main():\n"
        "    print('stdout', URL)\n"
        "    warnings.warn('library warning ' + URL)\n"
        "    if sys.argv[1] == 'pipeline':\n"
        "        raise PipelineError('serving.dataset_path=' + URL + ' not found; HF_TOKEN=' + "
        f"'{ENV_SECRETS['HF_TOKEN']}')\n"
        "    raise RuntimeError('unforeseen ' + URL)\n"
        "run(main)\n")
    env = project_env(PYTHONPATH=str(ROOT), HF_TOKEN=ENV_SECRETS["HF_TOKEN"])
    for kind, code in (("pipeline", 1), ("unforeseen", 1)):
        proc = subprocess.run([sys.executable, str(script), kind], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == code, proc.stderr
        assert "stdout http://***@h:1/?token=***" in proc.stdout
        assert "library warning http://***@h:1/?token=***" in proc.stderr
        assert ("error: serving.dataset_path=" if kind == "pipeline" else "RuntimeError: unforeseen") in proc.stderr
        assert not _leaks(proc.stdout + proc.stderr, f"{kind} output")


# --- an authenticated URI works ---------------------------------------------------------------------------------


def test_an_authenticated_uri_is_published_not_deferred(auth_server, store, default_cfg, monkeypatch, capsys):
    """Credentials in MLFLOW_TRACKING_URI, or MLflow's own MLFLOW_TRACKING_USERNAME/PASSWORD, reach a server
    that requires them (the health probe included); wrong ones are deferred with a line saying what to set."""
    server, proxy = auth_server
    cfg = dataclasses.replace(default_cfg, tracking=dataclasses.replace(default_cfg.tracking, experiment="auth"))
    # 1. user:password@ in the URI: published; the credentials are not left in the process environment.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.uri(f"{USER}:{URI_PW}"))
    with tracking.stage_run("weights", cfg) as stage:
        stage.log_metrics({"parameter_count": 1})
    assert tracking.pending_records() == [], capsys.readouterr().err
    assert "MLFLOW_TRACKING_PASSWORD" not in os.environ and "MLFLOW_TRACKING_USERNAME" not in os.environ
    # 2. A clean URI with MLflow's own environment variables.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.uri())
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", URI_PW)
    with tracking.stage_run("export_onnx", cfg):
        pass
    assert tracking.pending_records() == []
    # 3. A wrong password: deferred, and the warning says the server refused the credentials.
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "WrongPlantedPw4471")
    with tracking.stage_run("calibrate", cfg):
        pass
    err = capsys.readouterr().err
    assert len(tracking.pending_records()) == 1
    assert "401" in err and "MLFLOW_TRACKING_USERNAME" in err and "WrongPlantedPw4471" not in err and URI_PW not in err
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", URI_PW)
    client = MlflowClient(tracking_uri=proxy.uri())
    runs = client.search_runs([client.get_experiment_by_name("auth").experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted([LABEL, f"weights · {LABEL}", f"export_onnx · {LABEL}"])
    assert all(r.info.status == "FINISHED" for r in runs)


# --- the scan --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_no_planted_secret_in_any_output_of_real_stages(auth_server, tmp_path):
    """Real stages and the backfill CLI with planted secrets (a tracking URI with user:password@, ?token=,
    access_token= and sig=, and HF_TOKEN, MLFLOW_TRACKING_PASSWORD/TOKEN, AWS_* in the environment): first
    with MLflow unreachable (a failing and a succeeding stage deferred to .tracking/pending), then with it
    reachable behind basic auth (a stage published directly, the pending records backfilled). Then every
    file of the project, the server's store and artifacts, every run's params/tags/artifacts and every
    process's stdout/stderr are scanned for the planted strings."""
    server, proxy = auth_server
    project = copy_project(tmp_path / "project")
    # The checkout's own files (this test's source among them) hold the planted strings: scan what the run
    # wrote or changed.
    before = {p: p.read_bytes() for p in project.rglob("*") if p.is_file()}
    dead = (f"http://{USER}:{URI_PW}@127.0.0.1:{free_port()}/mlflow?token={QUERY_TOKEN}"
            f"&access_token={ACCESS_TOKEN}&sig={SIG}")
    outputs: list[tuple[str, str]] = []

    def stage(args: list[str], uri: str, ok: bool = True) -> None:
        env = project_env(MLFLOW_TRACKING_URI=uri, **ENV_SECRETS)
        if ok:
            proc = run(args, project, env)
        else:
            proc = subprocess.run(args, cwd=project, env=env, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 1 and "error:" in proc.stderr, proc.stderr
        outputs.append((" ".join(args), proc.stdout + proc.stderr))

    # MLflow unreachable: convert_ft fails (no weights yet), weights succeeds; both runs are deferred.
    stage(["python", "-m", "stages.convert_ft"], dead, ok=False)
    stage(["python", "-m", "stages.weights"], dead)
    assert len(list((project / ".tracking/pending").iterdir())) == 2
    assert all("MLflow tracking failed" in out for _, out in outputs)
    pending = {p: p.read_bytes() for p in (project / ".tracking").rglob("*") if p.is_file()}  # gone once backfilled
    assert any(p.name == "record.json" for p in pending)
    # Reachable behind basic auth, credentials only in the URI: published directly, then the backfill.
    authed = proxy.uri(f"{USER}:{URI_PW}")
    stage(["python", "-m", "stages.convert_ft"], authed)
    assert "MLflow tracking failed" not in outputs[-1][1]
    stage(["python", "-m", "pipeline", "backfill"], authed)
    assert list((project / ".tracking/pending").iterdir()) == []

    env = {**os.environ, "MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": URI_PW}
    old = {k: os.environ.get(k) for k in env if k.startswith("MLFLOW_TRACKING_")}
    os.environ.update({k: env[k] for k in old})
    try:
        client, runs = _all_runs(proxy.uri())
        stages = sorted((r.data.tags.get("dvc.stage"), r.info.status) for r in runs
                        if r.data.tags.get("pipeline.kind") == "stage")
        assert stages == [("convert_ft", "FAILED"), ("convert_ft", "FINISHED"), ("weights", "FINISHED")]
        leaks: list[str] = []
        downloads = tmp_path / "downloads"
        for r in runs:
            fields = {**r.data.params, **r.data.tags, "run_name": r.info.run_name}
            leaks += _leaks(json.dumps(fields), f"run {r.info.run_name} params/tags")
            target = downloads / r.info.run_id
            target.mkdir(parents=True)
            client.download_artifacts(r.info.run_id, "", str(target))
        assert any(downloads.rglob("params.yaml")) and any(downloads.rglob("manifest.json"))
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    for cmd, out in outputs:
        leaks += _leaks(out, f"output of {cmd}")
    leaks += [leak for path, data in pending.items() for leak in _leaks(data, str(path))]
    scanned = []
    for root in (project, server.root, downloads):
        for path in root.rglob("*"):
            if path.is_file() and ".git" not in path.relative_to(root).parts and before.get(path) != path.read_bytes():
                leaks += _leaks(path.read_bytes(), str(path))
                scanned.append(path)
    written = {p.relative_to(project).parts[0] for p in scanned if p.is_relative_to(project)}
    assert {"artifacts", "metrics", ".dvc"} <= written, written
    assert not leaks, "\n".join(leaks)
