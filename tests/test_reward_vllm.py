"""The remote verifier against a real `vllm serve` (CPU, about 60-90 s to start, so one server for the
module): it serves a student written by `train_verifier.py sft` with a non-default system prompt; rewards
equal the local verifier's on the same model, both read the settings saved beside the weights, and a
server stopped mid-batch is a clear error.

The vLLM interpreter is $RLVR_VLLM_PYTHON (default .venv-vllm/bin/python); skipped without it."""
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request

import json

import pytest
import torch

from rlvr import remote, verifiers
from rlvr.verifiers import VerifierOptions
from worlds import toy
import train_verifier as TV

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
def served(tiny_model_dir, tmp_path_factory):
    """The model the module's server serves: the tiny model distilled for a few steps on judged rows, with a
    non-default system prompt (so both sides must read it from verifier_settings.json)."""
    tmp = tmp_path_factory.mktemp("student")
    (tmp / "labels.jsonl").write_text("".join(json.dumps(r.to_json()) + "\n" for r in toy.judge_rows("near:64", seed=7)))
    result = TV.run(["sft", "--student", tiny_model_dir, "--data", str(tmp / "labels.jsonl"), "--out_dir",
                     str(tmp / "run"), "--pack", "false", "--batch_size", "8", "--micro_batch_size", "8",
                     "--epochs", "3", "--lr", "1e-3", "--verifier_system_prompt", "Judge.", "--wandb_mode", "disabled"])
    return result["final"]


@pytest.fixture(scope="module")
def server(served, tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logfile = tmp_path_factory.mktemp("vllm") / "server.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    with open(logfile, "w") as log:
        proc = subprocess.Popen(
            [VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", served,
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
    """A student of a few steps need not say YES or NO first. Use the decoded argmax tokens of the rows
    (then YES, NO) as the positive / negative spellings so c takes several classes and Eq. 4 gives
    non-trivial values."""
    seqs = [local.prompt.prompt_ids(q, r, a) for q, r, a in zip(QS, REFS, RESP)]
    top = local.last_logits(seqs).argmax(-1).tolist()
    words = []
    for t in sorted(set(top), key=top.count, reverse=True):
        w = tok.decode([t])
        if tok.encode(w, add_special_tokens=False) == [t]:
            words.append(w)
    return (words + [w for w in ("YES", "NO") if w not in words])[:2]


@pytest.mark.parametrize("soft_mode", ["eq4", "renorm"])
def test_remote_matches_local_verifier(server, served, soft_mode):
    from rlvr import model

    _, url = server
    tok = model.load_tokenizer(served)
    probe = verifiers.LocalVerifier(model.load_model(served), tok, name="tiny")
    pos, neg = _spellings(probe, tok)
    opts = dict(verifier_positive=pos, verifier_negative=neg, soft_mode=soft_mode, verifier_max_unjudged=1.0,
                verifier_paper_defaults=True)
    local = verifiers.build_verifier(served, VerifierOptions(verifier_batch_size=3, **opts))
    remote = verifiers.build_verifier(url, VerifierOptions(verifier_concurrency=4, verifier_timeout=60, **opts))
    assert remote.client.model_id == served and remote.prompt.positive_ids == local.prompt.positive_ids
    jl, jr = local(QS, REFS, RESP), remote(QS, REFS, RESP)
    for name in ("binary", "soft", "p_yes", "judged"):
        torch.testing.assert_close(getattr(jr, name), getattr(jl, name), atol=1e-3, rtol=0, msg=name)
    assert jl.binary.sum() >= 1 and (jl.soft > 0).any()  # not a comparison of zeros


def test_remote_sampled_c_is_seeded_per_request_with_exact_logprobs(server, served):
    """vLLM honours logprob_token_ids (the judgement tokens' exact log-probabilities, so p_yes equals
    the local verifier's whatever c was drawn) and the per-request seed (same seeds, same c)."""
    from rlvr import model

    _, url = server
    tok = model.load_tokenizer(served)
    pos, neg = _spellings(verifiers.LocalVerifier(model.load_model(served), tok, name="tiny"), tok)
    opts = dict(verifier_positive=pos, verifier_negative=neg, verifier_max_unjudged=1.0, verifier_paper_defaults=True)
    local = verifiers.build_verifier(served, VerifierOptions(**opts))
    remote = verifiers.build_verifier(url, VerifierOptions(verifier_sample=True, **opts))
    seeds = list(range(100, 100 + len(QS)))
    a, b = remote(QS, REFS, RESP, seeds=seeds), remote(QS, REFS, RESP, seeds=seeds)
    assert torch.equal(a.binary, b.binary) and torch.equal(a.judged, b.judged)
    torch.testing.assert_close(a.p_yes, local(QS, REFS, RESP).p_yes, atol=1e-3, rtol=0)


def test_student_scores_the_same_locally_and_through_vllm(server, served):
    _, url = server
    rows = toy.judge_rows("near:24", seed=8)
    qs, refs, resp = ([getattr(r, k) for r in rows] for k in ("question", "reference", "response"))
    # a few steps on YES/NO: the first token need not be a judgement token yet, so coverage is not checked
    local = verifiers.build_verifier(served, VerifierOptions(verifier_batch_size=5, verifier_max_unjudged=1,
                                                             verifier_paper_defaults=True))
    remote = verifiers.build_verifier(url, VerifierOptions(verifier_concurrency=4, verifier_timeout=60,
                                                           verifier_paper_defaults=True, verifier_max_unjudged=1))
    assert remote.client.model_id == served
    assert local.prompt.settings.system_prompt == remote.prompt.settings.system_prompt == "Judge."
    jl, jr = local(qs, refs, resp), remote(qs, refs, resp)
    for name in ("binary", "soft", "p_yes"):
        torch.testing.assert_close(getattr(jr, name), getattr(jl, name), atol=1e-3, rtol=0, msg=name)
    # the student says YES somewhere, with p(YES) well above a flat 1/vocab
    assert jl.binary.sum() >= 1 and jl.p_yes.min() > 3 / len(local.prompt.tokenizer)


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
