"""remote.py and the remote verifier: a fake vLLM server (rewards by hand, round robin, retries, bounded
concurrency, a server that is down, hangs, cuts replies or omits the judgement tokens, sampled c with
per-request seeds), and the math-verify pool (dead workers restarted, signals to the trainer's process
group do not reach the workers)."""
import collections
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from rlvr import remote, verifier_prompt, verifiers
from rlvr.remote import VerifierError
from rlvr.verifiers import VerifierOptions

ROOT = Path(__file__).resolve().parents[1]
OTHER = 5  # a token id that is neither judgement token
# per class of prompt: the probabilities the fake server reports for (YES, NO, OTHER)
PROBS = {"yes": (0.7, 0.2, 0.05), "no": (0.1, 0.8, 0.05), "other": (0.3, 0.1, 0.5)}


class FakeVLLM:
    """A stdlib HTTP server speaking the slice of vLLM's completions API the remote verifier uses.
    `table` maps a prompt (tuple of ids) to its class ("yes", "no", "other"): the greedy first token
    and the probabilities. A request with a seed samples the class from the seed instead (seed % 3).
    `mode`: "ok", "fail" (HTTP `status`), "hang", "cut" (a reply cut short), "omit" (no log-probs for
    the requested ids); `bad` requests get the mode, the rest are served normally."""

    def __init__(self, model_id, yes, no):
        self.model_id, self.yes, self.no = model_id, yes, no
        self.table, self.mode, self.bad, self.status, self.sleep = {}, "ok", 0, 503, 0.0
        self.calls, self.inflight, self.max_inflight, self.seeds = 0, 0, 0, []
        self.api_key, self.auth_seen = None, []  # api_key: answer 401 to requests without "Bearer <it>"
        self.max_model_len, self.prompt_lens = None, []  # what /v1/models says; the length of each prompt sent
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, obj, cut=False):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:len(body) // 3] if cut else body)

            def _refused(self):
                fake.auth_seen.append(self.headers.get("Authorization"))
                if fake.api_key is not None and self.headers.get("Authorization") != f"Bearer {fake.api_key}":
                    self._send(401, {"error": "invalid api key"})
                    return True
                return False

            def do_GET(self):
                if not self._refused():
                    self._send(200, {"data": [{"id": fake.model_id, "max_model_len": fake.max_model_len}]})

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self._refused():
                    return
                with fake.lock:
                    fake.calls += 1
                    fake.inflight += 1
                    fake.max_inflight = max(fake.max_inflight, fake.inflight)
                    mode = fake.mode if fake.bad > 0 else "ok"
                    fake.bad -= mode != "ok"
                    fake.seeds.append(req.get("seed"))
                    fake.prompt_lens.append(len(req["prompt"]))
                try:
                    time.sleep(30 if mode == "hang" else fake.sleep)
                    reply = fake.reply(req, omit=mode == "omit")
                finally:
                    with fake.lock:  # leave the count before replying: the client may send its next request
                        fake.inflight -= 1
                if mode == "fail":
                    self._send(fake.status, {"error": "overloaded"})
                elif mode == "cut":
                    self._send(200, reply, cut=True)
                    self.close_connection = True
                else:
                    self._send(200, reply)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def reply(self, req, omit=False):
        assert req["max_tokens"] == 1 and req["return_tokens_as_token_ids"] and req["logprobs"]
        assert req["logprob_token_ids"] == [self.yes, self.no]
        kind = self.table[tuple(req["prompt"])]
        if req.get("seed") is not None:
            assert req["temperature"] == 1.0
            token = [self.yes, self.no, OTHER][req["seed"] % 3]
        else:
            assert req["temperature"] == 0.0
            token = {"yes": self.yes, "no": self.no, "other": OTHER}[kind]
        lp = dict(zip((self.yes, self.no, OTHER), map(math.log, PROBS[kind])))
        shown = {t: v for t, v in lp.items() if not (omit and t in (self.yes, self.no))}
        shown[token] = lp[token]
        return {"choices": [{"text": "", "logprobs": {
            "tokens": [f"token_id:{token}"], "token_logprobs": [lp[token]],
            "top_logprobs": [{f"token_id:{t}": v for t, v in shown.items()}]}}]}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fakes(tiny_model_dir):
    from rlvr import model

    tok = model.load_tokenizer(tiny_model_dir)
    yes, no = tok.encode("YES", add_special_tokens=False)[0], tok.encode("NO", add_special_tokens=False)[0]
    servers = [FakeVLLM(tiny_model_dir, yes, no) for _ in range(2)]
    yield servers
    for s in servers:
        s.close()


ROWS = (["q1", "q2", "q3", "q4"], ["7", "4", "A", "B"], ["x\nThe answer is 7", "4", "C", "B\n\n"])
KINDS = ["yes", "no", "other", "yes"]


def _remote(servers, backoff=0.5, **options):
    v = verifiers.build_verifier(",".join(s.url for s in servers), VerifierOptions(**{"verifier_paper_defaults": True,
                                                                                  **options}))
    v.client.backoff = backoff
    for q, r, a, k in zip(*ROWS, KINDS):
        for s in servers:
            s.table[tuple(v.prompt.prompt_ids(q, r, a))] = k
    return v


def _one(v):
    return v(ROWS[0][:1], ROWS[1][:1], ROWS[2][:1])


def test_remote_rewards_by_hand_and_round_robin(fakes):
    a, b = fakes
    v = _remote(fakes, verifier_concurrency=2, verifier_timeout=5, verifier_max_unjudged=0.5)
    j = v(*ROWS)
    assert j.binary.tolist() == [1.0, 0.0, 0.0, 1.0] and j.judged.tolist() == [True, True, False, True]
    torch.testing.assert_close(j.soft, torch.tensor([0.7, 1 - 0.8, 0.0, 0.7]))   # Eq. 4 by hand
    torch.testing.assert_close(j.p_yes, torch.tensor([0.7, 0.1, 0.3, 0.7]))
    assert (a.calls, b.calls) == (2, 2)  # round robin over the endpoints
    v.soft_mode = "renorm"  # the unjudged row earns 0; ratio reads it anyway
    torch.testing.assert_close(v(*ROWS).soft, torch.tensor([0.7 / 0.9, 0.1 / 0.9, 0.0, 0.7 / 0.9]))
    v.soft_mode = "ratio"
    torch.testing.assert_close(v(*ROWS).soft, torch.tensor([0.7 / 0.9, 0.1 / 0.9, 0.3 / 0.4, 0.7 / 0.9]))


def test_remote_sampled_c_uses_one_seed_per_request_and_eq4_reads_it(fakes):
    a = fakes[0]
    v = _remote([a], verifier_sample=True, verifier_max_unjudged=1.0)
    j = v(*ROWS, seeds=[3, 4, 5, 2 ** 40 + 6])
    assert sorted(a.seeds) == [3, 4, 5, (2 ** 40 + 6) % 2 ** 31]  # requests run concurrently
    # classes by seed % 3: YES, NO, OTHER, YES; Eq. 4 from that c with each prompt's probabilities
    assert j.binary.tolist() == [1.0, 0.0, 0.0, 1.0]
    torch.testing.assert_close(j.soft, torch.tensor([0.7, 1 - 0.8, 0.0, 0.7]))
    a.seeds.clear()
    v(*ROWS)
    v(*ROWS)  # no seeds given: fresh ones every call, never the same twice
    assert len(set(a.seeds)) == 8 and None not in a.seeds


def test_http_verifier_takes_the_settings_saved_beside_its_tokenizer(fakes, tiny_model_dir, tmp_path):
    import shutil

    from rlvr import config

    student = tmp_path / "student"
    shutil.copytree(tiny_model_dir, student)
    saved = verifier_prompt.VerifierSettings(system_prompt="You grade arithmetic.", template="{reference} vs {response}")
    verifier_prompt.save_settings(student, saved)
    v = verifiers.build_verifier(fakes[0].url, VerifierOptions(verifier_tokenizer=str(student)))
    assert v.prompt.settings == saved
    with pytest.raises(config.ConfigError, match="--verifier_system_prompt ''.*You grade arithmetic"):
        verifiers.build_verifier(fakes[0].url, VerifierOptions(verifier_tokenizer=str(student), verifier_system_prompt=""))
    # the served id has no settings file: refused, unless the user names the template or the paper's defaults
    with pytest.raises(config.ConfigError, match=f"verifier {fakes[0].url} .*no verifier_settings.json.*"
                                                 "--verifier_template FILE or a family .*or pass --verifier_paper_defaults"):
        verifiers.build_verifier(fakes[0].url)
    paper = VerifierOptions(verifier_paper_defaults=True)
    assert verifiers.build_verifier(fakes[0].url, paper).prompt.settings == verifier_prompt.VerifierSettings()
    template = tmp_path / "t.txt"
    template.write_text("{question} {reference} {response}")
    named = verifiers.build_verifier(fakes[0].url, VerifierOptions(verifier_template=str(template)))
    assert named.prompt.settings.template == template.read_text()
    # the judges that only grade (eval, audit, log) take no prompt flags: only --verifier_paper_defaults
    with pytest.raises(config.ConfigError, match="no verifier_settings.json"):
        verifiers.build_verifier(fakes[0].url, VerifierOptions(verifier_template=str(template)), settings_from_flags=False)
    assert verifiers.build_verifier(fakes[0].url, paper, settings_from_flags=False).prompt.settings == \
        verifier_prompt.VerifierSettings()


def test_remote_retries_with_backoff_then_succeeds(fakes):
    a = fakes[0]
    v = _remote([a], backoff=0.2, verifier_concurrency=1, verifier_timeout=5, verifier_retries=3)
    a.mode, a.bad = "fail", 2  # two 503s, then served
    t = time.monotonic()
    assert _one(v).binary.tolist() == [1.0]
    assert time.monotonic() - t >= 0.2 + 0.4 and a.calls == 3  # backoff 0.2 s, then 0.4 s


def test_remote_concurrency_is_bounded(fakes):
    a = fakes[0]
    v = _remote([a], verifier_concurrency=3, verifier_max_unjudged=1.0)
    a.sleep = 0.1  # every request takes 0.1 s
    v(ROWS[0] * 3, ROWS[1] * 3, ROWS[2] * 3)
    assert a.max_inflight == 3


def test_remote_clear_error_when_down(fakes):
    a, b = fakes
    v = _remote([a], backoff=0.01, verifier_concurrency=2, verifier_timeout=2, verifier_retries=2)
    a.mode, a.bad = "fail", 10 ** 6
    with pytest.raises(VerifierError, match=re.escape(a.url) + r".*3 tries.*HTTP 503"):
        v(*ROWS)
    v = _remote([b], backoff=0.01, verifier_concurrency=1, verifier_timeout=2, verifier_retries=2)
    b.mode, b.bad, b.status = "fail", 10 ** 6, 400  # refused requests are not retried
    with pytest.raises(VerifierError, match=re.escape(b.url) + r".*HTTP 400"):
        _one(v)
    assert b.calls == 1
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(VerifierError, match=re.escape(dead) + ".*refused"):
        verifiers.build_verifier(dead, VerifierOptions(verifier_retries=1, verifier_timeout=1))


def test_hung_server_is_reported_within_timeout_times_tries(fakes):
    a = fakes[0]
    v = _remote([a], backoff=0.05, verifier_concurrency=4, verifier_timeout=0.5, verifier_retries=2)
    a.mode, a.bad = "hang", 10 ** 6
    t = time.monotonic()
    with pytest.raises(VerifierError, match=re.escape(a.url) + r".*3 tries.*timed out"):
        v(*ROWS)
    # 3 tries of a 0.5 s timeout: reported in ~1.7 s when idle. The bound is a hang detector, not a timing
    # (a loaded machine may be many times slower): without the per-request timeout this would never return.
    assert time.monotonic() - t < 120


def test_cut_replies_are_retried_then_an_error(fakes):
    a = fakes[0]
    v = _remote([a], backoff=0.01, verifier_concurrency=1, verifier_timeout=2, verifier_retries=2)
    a.mode, a.bad = "cut", 1
    assert _one(v).binary.tolist() == [1.0] and a.calls == 2  # one cut reply, retried
    a.bad = 10 ** 6
    with pytest.raises(VerifierError, match=r"3 tries.*IncompleteRead"):
        _one(v)


def test_a_reply_without_the_judgement_tokens_is_an_error_not_a_zero(fakes):
    a = fakes[0]
    v = _remote([a], verifier_concurrency=2)
    a.mode, a.bad = "omit", 10 ** 6
    with pytest.raises(VerifierError, match=rf"no valid log-probability for judgement token id\(s\) \[{a.no}\]"):
        _one(v)  # greedy YES is in the reply (the chosen token), NO is not


def test_remote_unjudged_share_names_the_tokens(fakes):
    a = fakes[0]
    v = _remote([a], verifier_max_unjudged=0.2)
    with pytest.raises(VerifierError, match=r"1 of 4 first tokens \(25%\) were neither 'YES' nor 'NO'.*answered "
                                            r"instead: \{"):
        v(*ROWS)


# ---------------------------------------------------------------------------------------------- math pool


def test_math_equal_reads_prose_and_bare_latex():
    assert remote.math_equal("18", "Melanie started with 18 vacuum cleaners.")
    assert remote.math_equal("x+1", "1+x") and not remote.math_equal("1", "1+x")
    assert remote.math_equal("\\frac{14}{3}", "so $f(-2)+f(-1)=\\boxed{\\frac{14}{3}}$")
    assert not remote.math_equal("2", "2\\sqrt{2}") and remote.math_equal("\\text{(C)}", "\\boxed{\\text{C}}")
    assert remote.math_equal("324", "Therefore, the total cost will be \\$324.")  # currency, not a delimiter
    assert remote.math_equal("\\$36", "$$\\frac{\\$14.40}{.4}=\\boxed{\\$36}$$")


def test_dead_worker_is_restarted_and_its_item_retried():
    pool = remote.MathPool(workers=1, timeout=3.0)
    try:
        assert pool([("7", "7")]) == [True]
        first = pool.procs[0].pid
        os.kill(first, signal.SIGKILL)  # died between calls
        assert pool([("7", "7"), ("7", "8")]) == [True, False] and pool.procs[0].pid != first
        # killed while judging: restarted and the answer retried (here it then runs out of its time)
        threading.Timer(0.5, lambda: os.kill(pool.procs[0].pid, signal.SIGKILL)).start()
        assert pool([("1", "$9^{9^{9}}$"), ("2", "2")]) == [False, True] and pool.timeouts == 1
        # an item that kills every worker it is given (as a crash inside sympy would) is an error
        with pytest.raises(VerifierError, match=r"3 math-verify workers died judging reference 'None' .*exit status 1"):
            pool([("1", "1"), (None, "x")])
        assert pool([("2", "2")]) == [True] and pool.timeouts == 1  # and the pool still works
    finally:
        pool.close()


SIGTERM_CHILD = textwrap.dedent("""
    import signal, sys, time
    sys.path.insert(0, sys.argv[1])
    from rlvr import remote
    got = []
    signal.signal(signal.SIGTERM, lambda s, f: got.append(s))  # like checkpoint.StopSignal: finish the step
    pool = remote.MathPool(workers=2, timeout=30.0)
    assert pool([("1", "1"), ("2", "2")]) == [True, True]
    print("pids", *[p.pid for p in pool.procs], flush=True)
    while not got:
        time.sleep(0.05)
    judged = pool([("x+1", "1+x"), ("3", "It takes 3 bolts."), ("3", "4")])
    print("after", *[p.pid for p in pool.procs], *judged, flush=True)
""")


def test_sigterm_to_the_trainers_process_group_does_not_reach_the_workers():
    """torchrun (and a scheduler) send SIGTERM to the trainer's whole process group; the workers live
    in their own session, so the step being judged finishes with the same workers."""
    child = subprocess.Popen([sys.executable, "-c", SIGTERM_CHILD, str(ROOT)], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)  # its own group, as a trainer launched by torchrun
    try:
        pids = child.stdout.readline().split()
        assert pids[0] == "pids", pids
        os.killpg(child.pid, signal.SIGTERM)
        after = child.stdout.readline().split()
        assert child.wait(60) == 0
        assert after[:3] == ["after", *pids[1:]] and after[3:] == ["True", "True", "False"]
    finally:
        if child.poll() is None:
            child.kill()
    for pid in pids[1:]:  # and the workers went with the pool when the process exited
        deadline = time.monotonic() + 120  # a generous bound: they are killed at once, the wait is for the OS
        while _alive(int(pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(int(pid))


ORPHAN_CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from rlvr import remote
    pool = remote.MathPool(workers=1, timeout=1.0)
    pool([("1", "1")])
    print(pool.procs[0].pid, flush=True)
    pool([("1", "$9^{9^{9}}$")])  # killed while this answer is being computed
""")


def test_a_worker_orphaned_mid_answer_ends_by_its_own_cpu_limit():
    """A trainer killed with SIGKILL cannot kill its workers; the one computing an endless answer stops
    at its own CPU limit (2 x timeout + 1 s) instead of running forever."""
    child = subprocess.Popen([sys.executable, "-c", ORPHAN_CHILD, str(ROOT)], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    worker = int(child.stdout.readline())
    time.sleep(0.3)
    child.kill()
    child.wait()
    try:
        # its CPU limit is 3 s of CPU time, which a loaded machine may stretch over many seconds of wall time
        deadline = time.monotonic() + 300
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(worker)
    finally:
        if _alive(worker):
            os.kill(worker, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone for our purpose
        return f.read().split(") ")[-1][0] != "Z"


def test_worker_that_cannot_start_is_a_clear_error(monkeypatch):
    pool = remote.MathPool(workers=1, start_timeout=30.0)
    monkeypatch.setattr(remote.sys, "executable", "/bin/false")
    with pytest.raises(VerifierError, match="math-verify worker .* did not start"):
        pool([("1", "1")])


# ----------------------------------------------------------------------------------------------
# credentials (issue 21): an API key from the environment, never from (or in) a URL


def test_the_api_key_goes_from_the_environment_to_a_bearer_header_and_nowhere_else(fakes, monkeypatch):
    server = fakes[0]
    server.api_key = "sk-test-1234567890"
    monkeypatch.delenv(remote.API_KEY_ENV, raising=False)
    with pytest.raises(VerifierError) as e:
        _remote([server])
    assert "HTTP 401" in str(e.value) and remote.API_KEY_ENV in str(e.value) and "unset" in str(e.value)
    monkeypatch.setenv(remote.API_KEY_ENV, "sk-wrong")
    with pytest.raises(VerifierError, match="is it the server's"):
        _remote([server])
    monkeypatch.setenv(remote.API_KEY_ENV, server.api_key)
    j = _one(_remote([server]))
    assert j.judged.tolist() == [True] and set(server.auth_seen[-2:]) == {"Bearer sk-test-1234567890"}
    server.mode, server.bad = "fail", 10 ** 6  # an error message of a keyed client: no key in it
    v = _remote([server], backoff=0.0, verifier_retries=0)
    with pytest.raises(VerifierError) as e:
        _one(v)
    assert server.api_key not in str(e.value) and server.api_key not in repr(vars(v.client).get("endpoints"))


def test_credentials_in_a_url_are_refused_and_never_shown(fakes):
    host = fakes[0].url.removeprefix("http://")
    for url in (f"http://user:hunter2secret@{host}", f"http://{fakes[1].url[7:]},https://hunter2secret@{host}"):
        with pytest.raises(VerifierError) as e:
            verifiers.build_verifier(url)
        assert "hunter2secret" not in str(e.value) and "***@" in str(e.value) and remote.API_KEY_ENV in str(e.value)
    assert remote.redact("at http://u:p@h:1/v1 and https://k@h2") == "at http://***@h:1/v1 and https://***@h2"
    assert fakes[0].calls == 0 and fakes[1].calls == 0  # refused before any request


def test_metrics_config_holds_no_url_credentials(tmp_path):
    from rlvr import metrics

    m = metrics.Metrics(str(tmp_path), {"verifier": "http://u:hunter2secret@h:8000", "n": 1}, "p", None, "disabled")
    m.close()
    text = (tmp_path / "config.json").read_text()
    assert "hunter2secret" not in text and json.loads(text) == {"verifier": "http://***@h:8000", "n": 1}


def test_a_remote_verifier_cuts_answers_to_the_servers_max_model_len(fakes, capsys):
    fakes[0].max_model_len = 400
    v = _remote(fakes[:1])
    assert v.prompt.max_len == 400
    fakes[0].table = collections.defaultdict(lambda: "yes")
    j = v(["q", "q"], ["7", "7"], ["x " * 3000 + "7", "7"])
    assert j.judged.tolist() == [True, True] and max(fakes[0].prompt_lens[-2:]) <= 399 and v.prompt.cut == 1
    assert "1 of 2 answers were longer than its 400 positions" in capsys.readouterr().err
