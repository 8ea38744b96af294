"""The remote verifier against a real `vllm serve` of the tiny verifier (CPU, about 60-90 s to start):
rewards equal the local verifier's on the same model, and a server stopped mid-batch is a clear error.

The vLLM interpreter is $RLVR_VLLM_PYTHON (default .venv-vllm/bin/python); skipped without it."""
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request

import pytest
import torch

from rlvr import remote, verifiers
from rlvr.verifiers import VerifierOptions

from conftest import VLLM_PYTHON, requires_vllm
START_TIMEOUT = 300  # seconds; a cold start on 2 CPU cores takes 60-90

pytestmark = requires_vllm


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (api server + engine core), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logfile = tmp_path_factory.mktemp("vllm") / "server.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    with open(logfile, "w") as log:
        proc = subprocess.Popen(
            [VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_model_dir,
             "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited with {proc.returncode}:\n{logfile.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"vLLM server not up after {START_TIMEOUT}s:\n{logfile.read_text()[-3000:]}")
                time.sleep(1)
        yield proc, url
    finally:
        _stop(proc)


QS = ["What is 3 + 4?", "What is 9 - 5? " * 6, "Q", "Name the capital of France.", "2+2", "x" * 40, "y", "解方程"]
REFS = ["7", "4", "A", "Paris", "4", "B", "C", "x=2"]
RESP = ["work\nTherefore, the answer is 7.", "NO", "", "Paris\r\n\r\n", "5", "long " * 30, "Therefore, YES",
        "答案是 2"]


def _spellings(local, tok):
    """The random tiny model rarely says YES or NO. Use the decoded argmax tokens of the rows as the
    positive / negative spellings so c takes several classes and Eq. 4 gives non-trivial values."""
    seqs = [local.prompt.prompt_ids(q, r, a) for q, r, a in zip(QS, REFS, RESP)]
    top = local.last_logits(seqs).argmax(-1).tolist()
    words = []
    for t in sorted(set(top), key=top.count, reverse=True):
        w = tok.decode([t])
        if tok.encode(w, add_special_tokens=False) == [t]:
            words.append(w)
    return (words + ["YES", "NO"])[:2] if len(words) < 2 else words[:2]


@pytest.mark.parametrize("soft_mode", ["eq4", "renorm"])
def test_remote_matches_local_verifier(server, tiny_model_dir, soft_mode):
    from rlvr import model

    _, url = server
    tok = model.load_tokenizer(tiny_model_dir)
    probe = verifiers.LocalVerifier(model.load_model(tiny_model_dir), tok, name="tiny")
    pos, neg = _spellings(probe, tok)
    opts = dict(verifier_positive=pos, verifier_negative=neg, soft_mode=soft_mode, verifier_max_unjudged=1.0,
                verifier_paper_defaults=True)
    local = verifiers.build_verifier(tiny_model_dir, VerifierOptions(verifier_batch_size=3, **opts))
    remote = verifiers.build_verifier(url, VerifierOptions(verifier_concurrency=4, verifier_timeout=60, **opts))
    assert remote.client.model_id == tiny_model_dir and remote.prompt.positive_ids == local.prompt.positive_ids
    jl, jr = local(QS, REFS, RESP), remote(QS, REFS, RESP)
    for name in ("binary", "soft", "p_yes", "judged"):
        torch.testing.assert_close(getattr(jr, name), getattr(jl, name), atol=1e-3, rtol=0, msg=name)
    assert jl.binary.sum() >= 1 and (jl.soft > 0).any()  # not a comparison of zeros


def test_remote_sampled_c_is_seeded_per_request_with_exact_logprobs(server, tiny_model_dir):
    """vLLM honours logprob_token_ids (the judgement tokens' exact log-probabilities, so p_yes equals
    the local verifier's whatever c was drawn) and the per-request seed (same seeds, same c)."""
    from rlvr import model

    _, url = server
    tok = model.load_tokenizer(tiny_model_dir)
    pos, neg = _spellings(verifiers.LocalVerifier(model.load_model(tiny_model_dir), tok, name="tiny"), tok)
    opts = dict(verifier_positive=pos, verifier_negative=neg, verifier_max_unjudged=1.0, verifier_paper_defaults=True)
    local = verifiers.build_verifier(tiny_model_dir, VerifierOptions(**opts))
    remote = verifiers.build_verifier(url, VerifierOptions(verifier_sample=True, **opts))
    seeds = list(range(100, 100 + len(QS)))
    a, b = remote(QS, REFS, RESP, seeds=seeds), remote(QS, REFS, RESP, seeds=seeds)
    assert torch.equal(a.binary, b.binary) and torch.equal(a.judged, b.judged)
    torch.testing.assert_close(a.p_yes, local(QS, REFS, RESP).p_yes, atol=1e-3, rtol=0)


def test_server_stopped_mid_batch_is_a_clear_error(server):
    proc, url = server  # runs last in this module: it stops the shared server
    v = verifiers.build_verifier(url, VerifierOptions(verifier_concurrency=2, verifier_timeout=10, verifier_retries=2,
                                                   verifier_max_unjudged=1.0, verifier_paper_defaults=True))
    v.client.backoff = 0.1
    n = 400
    killer = threading.Timer(1.0, lambda: os.killpg(proc.pid, signal.SIGKILL))
    killer.start()
    t = time.monotonic()
    try:
        with pytest.raises(remote.VerifierError, match=re.escape(url)):
            v(QS * (n // len(QS)), REFS * (n // len(REFS)), RESP * (n // len(RESP)))
    finally:
        killer.cancel()
    assert time.monotonic() - t < 600  # a hang detector: retries end; not a timing
    assert proc.wait(60) is not None
