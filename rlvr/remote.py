"""Work done outside this process, and nothing about what it means: the vLLM completions client
(first output token and the exact log-probabilities of chosen tokens) and the math-verify worker pool.
verifiers.py and rules.py turn both into judgements. Imports no project file and nothing heavy (the math-verify
workers run this file as a script, so they start without torch).

    python remote.py math-worker SECONDS   # one math-verify worker: reads [reference, answer] JSON lines,
                                           # writes 1 / 0, at most SECONDS of CPU each (what MathPool starts)
"""
from __future__ import annotations

import http.client
import itertools
import json
import logging
import math
import os
import random
import re
import select
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)


class VerifierError(RuntimeError):
    """A verifier could not judge (server down, bad reply, a worker that keeps dying): never scored 0."""


# ----------------------------------------------------------------------------------------------
# vLLM's OpenAI-compatible /v1/completions

_RETRY_HTTP = {408, 429, 500, 502, 503, 504}  # overloaded or restarting: worth another try
API_KEY_ENV = "RLVR_VERIFIER_API_KEY"  # the key of servers started with `vllm serve --api-key`: sent as a bearer token
# a URL's user info: everything after "://" up to the last "@" before a space, a quote or the next URL, as
# urllib reads the host after the last "@" (a password may hold "@" or "/": http://alice:p@ss/w0rd@host)
_USERINFO = re.compile(r"(?<=://)(?:(?![A-Za-z][\w+.-]*://)[^\s'\"<>])*@")
# what a server may echo of a request: its bearer token, or any Authorization / API-key header's value
_SECRET_VALUES = [re.compile(r"(?i)(\b(?:proxy-)?authorization\b[\"']?\s*[:=]\s*[\"']?)[^\"'\r\n,;}]+"),  # Basic x, Bearer y
                  re.compile(r"(?i)(\bbearer\s+)[^\s\"',;}]+"),
                  re.compile(r"(?i)(\b(?:x-)?api[-_]?key\b[\"']?\s*[:=]\s*[\"']?)[^\s\"',;}]+")]


def redact(text: str) -> str:
    """`text` with the credentials of every URL in it (scheme://user:password@host) replaced by ***."""
    return _USERINFO.sub("***@", text)


def scrub(text: str, environ=os.environ) -> str:
    """What a server said, fit to show or log: without the API key (wherever it appears: a 401 body
    "invalid key: Bearer sk-...", a 500 echoing the request's headers), any bearer token, Authorization
    or API-key header value, and URL credentials. Scrub a body before cutting it short: a cut key would
    no longer match."""
    key = environ.get(API_KEY_ENV)
    if key:
        text = text.replace(key, "***")
    for pattern in _SECRET_VALUES:
        text = pattern.sub(lambda m: m.group(1) + "***", text)
    return redact(text)


def url_credentials(spec: str) -> str | None:
    """Why a verifier spec (http(s)://... endpoints, comma-separated) cannot be used as given, or None:
    credentials in a URL are refused (they would show in process lists, logs and config files); the
    key goes in $RLVR_VERIFIER_API_KEY. The reason never holds the credentials."""
    if redact(spec) != spec:  # user info, as urllib reads it (up to the last "@"), in any endpoint
        return (f"credentials in a URL are refused (they would show in process lists and logs); put the key "
                f"in ${API_KEY_ENV} (sent as Authorization: Bearer)")
    return None


class CompletionsClient:
    """Requests to one or more vLLM servers (round robin), `concurrency` at a time from threads.
    A request that fails (refused, reset, timed out, cut short, HTTP 5xx/429) is retried on the next
    endpoint after an exponential backoff; one that still fails after `retries` is a VerifierError
    naming the endpoints and the last cause, and the rest of the batch is cancelled. A server that
    hangs is therefore reported after about timeout x (retries + 1) plus the backoff."""

    def __init__(self, endpoints: list[str], timeout: float, retries: int, concurrency: int, backoff: float = 0.5):
        if not endpoints:
            raise ValueError("CompletionsClient needs at least one endpoint")
        refused = url_credentials(",".join(endpoints))
        if refused:
            raise VerifierError(f"verifier endpoint {redact(','.join(endpoints))}: {refused}")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self._headers = {"Content-Type": "application/json"}
        if os.environ.get(API_KEY_ENV):  # read once; never logged (the headers are never printed)
            self._headers["Authorization"] = f"Bearer {os.environ[API_KEY_ENV]}"
        self.timeout, self.retries, self.concurrency, self.backoff = timeout, retries, concurrency, backoff
        self._next = itertools.count()  # round robin over endpoints, shared by all threads
        served = self._request("GET", "/v1/models", None)["data"][0]
        self.model_id: str = served["id"]
        self.max_model_len: int | None = served.get("max_model_len")  # vLLM says how long a prompt may be

    def first_token(self, prompts: list[list[int]], token_ids: list[int], seeds: list[int] | None) -> list[dict]:
        """Per prompt: {"token": the first output token (greedy, or sampled with that prompt's seed),
        "logprobs": {id: exact log-probability} for every id in token_ids, "top": every {id: logprob}
        the server returned}. A reply without the exact log-probability of a requested id is a
        VerifierError: guessing 0 for it would be a silent wrong reward."""
        return self._each(prompts, seeds, lambda p, seed, stop: self._first_token(p, token_ids, seed, stop))

    def generate(self, prompts: list[list[int]], max_tokens: int, seeds: list[int] | None) -> list[list[int]]:
        """Per prompt: the token ids the server writes, up to max_tokens (greedy, or sampled with that
        prompt's seed): a generating verifier's reasoning."""
        return self._each(prompts, seeds, lambda p, seed, stop: self._generate(p, max_tokens, seed, stop))

    def _each(self, prompts: list[list[int]], seeds: list[int] | None, request) -> list:
        """request(prompt, seed, stop) for every prompt, `concurrency` at a time, in order."""
        if not prompts:
            return []
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        stop = threading.Event()
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(prompts)))
        try:
            return list(pool.map(lambda i: request(prompts[i], seeds and seeds[i], stop), range(len(prompts))))
        finally:  # on an error: drop queued requests and stop retries; requests in flight end by their timeout
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)

    def _generate(self, prompt: list[int], max_tokens: int, seed: int | None, stop: threading.Event) -> list[int]:
        payload = {"model": self.model_id, "prompt": prompt, "max_tokens": max_tokens, "logprobs": 1,
                   "return_tokens_as_token_ids": True, "top_p": 1.0, "temperature": 0.0 if seed is None else 1.0}
        if seed is not None:
            payload["seed"] = seed
        reply = self._request("POST", "/v1/completions", payload, stop)
        try:
            return [_token_id(t) for t in reply["choices"][0]["logprobs"]["tokens"]]
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise VerifierError(f"verifier {self.model_id} at {','.join(self.endpoints)}: unexpected completions "
                                f"reply {scrub(str(reply))[:300]}") from e

    def _first_token(self, prompt: list[int], token_ids: list[int], seed: int | None, stop: threading.Event) -> dict:
        # logprob_token_ids: vLLM returns these ids' log-probabilities over the whole vocabulary (plus
        # the chosen token's), instead of the top-k, so p(YES) and p(NO) are exact even when small.
        payload = {"model": self.model_id, "prompt": prompt, "max_tokens": 1, "logprobs": 1,
                   "logprob_token_ids": token_ids, "return_tokens_as_token_ids": True, "top_p": 1.0,
                   "temperature": 0.0 if seed is None else 1.0}
        if seed is not None:
            payload["seed"] = seed
        reply = self._request("POST", "/v1/completions", payload, stop)
        try:
            lp = reply["choices"][0]["logprobs"]
            top = {_token_id(k): float(v) for k, v in lp["top_logprobs"][0].items()}
            token = _token_id(lp["tokens"][0])
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise VerifierError(f"verifier {self.model_id} at {','.join(self.endpoints)}: unexpected completions "
                                f"reply {scrub(str(reply))[:300]}") from e
        missing = [i for i in token_ids if not top.get(i, math.nan) <= 0.0]  # absent, NaN or > 0
        if missing:
            raise VerifierError(
                f"verifier {self.model_id} at {','.join(self.endpoints)}: the reply has no valid log-probability "
                f"for judgement token id(s) {missing} (it returned {dict(list(top.items())[:10])}); the server must "
                "honour logprob_token_ids (vLLM 0.32 or later), or p(YES) and p(NO) would be guesses")
        return {"token": token, "logprobs": {i: top[i] for i in token_ids}, "top": top}

    def _request(self, method: str, path: str, payload: dict | None, stop: threading.Event | None = None) -> dict:
        start = next(self._next)
        causes = []
        for attempt in range(self.retries + 1):
            endpoint = self.endpoints[(start + attempt) % len(self.endpoints)]
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1) * (1 + 0.1 * random.random()))
            if stop is not None and stop.is_set():  # another request of the batch failed for good
                raise VerifierError(f"verifier endpoint {endpoint}: request cancelled after another failed")
            data = None if payload is None else json.dumps(payload).encode()
            req = urllib.request.Request(endpoint + path, data=data, method=method, headers=self._headers)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    body = resp.read()
            except urllib.error.HTTPError as e:
                detail = scrub(e.read(1 << 16).decode(errors="replace"))[:500]  # scrubbed whole, then cut
                if e.code not in _RETRY_HTTP:  # a request the server refuses will not work on retry
                    hint = (f" (an API key is read from ${API_KEY_ENV}: " + ("is it the server's?)" if API_KEY_ENV in
                            os.environ else "unset)")) if e.code in (401, 403) else ""
                    raise VerifierError(f"verifier endpoint {endpoint}{path}: HTTP {e.code}: {detail}{hint}") from e
                causes.append((endpoint, f"HTTP {e.code} {detail}"))
                continue
            except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, cut short
                causes.append((endpoint, scrub(repr(getattr(e, "reason", e)))))
                continue
            try:
                return json.loads(body)
            except ValueError:  # a reply cut short that still had a complete header
                causes.append((endpoint, f"reply is not JSON: {scrub(repr(body))[:200]}"))
        raise VerifierError(f"verifier endpoint(s) {', '.join(sorted({e for e, _ in causes}))} failed {len(causes)} "
                            f"tries for {path} (timeout {self.timeout}s each); last cause: {causes[-1][1]}")


def _token_id(key: str) -> int:
    """'token_id:123' (return_tokens_as_token_ids) -> 123."""
    return int(re.fullmatch(r"token_id:(-?\d+)", key).group(1))


# ----------------------------------------------------------------------------------------------
# math-verify in worker processes

TRAILING_PUNCT = ".,;:!?。，"
_DELIMITERS = ("$", "\\boxed", "\\(", "\\[")
# LaTeX that is not prose: \text{...}-like arguments and environment names, then any other command
_LATEX = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname|begin|end)\s*\{[^}]*\}|\\[A-Za-z]+")
_WORD = re.compile(r"[^\W\d_]{2,}")  # two or more letters in a row
_MATH_WORDS = {"sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh",
               "log", "ln", "exp", "lim", "max", "min", "gcd", "lcm", "mod", "det", "pi", "inf", "infty", "sqrt"}


def math_candidates(text: str) -> list:
    """math-verify's reading of one final answer, chosen by what the text is:
    - delimited math ($...$, \\(...\\), \\[...\\], \\boxed{...}) or prose ("3 bolts.", "x equals 2.",
      "Melanie started with 18 vacuum cleaners."): math-verify's own extraction, as
      math_verify.parse(text) does it (it finds the number or expression the sentence ends on);
    - bare math ("x+1", "2\\sqrt{2}", "\\frac{1}{2}", "(1,2)"): parsed as LaTeX, i.e. inside $...$.
      Plain parse reads "1+x" as 1 and "2\\sqrt{2}" as 2, a match for a reference of 1 or 2.
    Prose is text with a word of two or more letters outside LaTeX commands and math functions.
    Wrapping prose in $...$ (what rule:math did before) turns it into a product of symbols. An escaped
    dollar (\\$36) is a currency sign and is dropped first: math-verify reads it as a delimiter.
    Measured on tests/data/math_final_lines.jsonl (1,666 public labelled rows): agreement 97.5%,
    plain math-verify 93.4%, the old always-wrap rule 86.8%."""
    from math_verify import parse

    text = text.replace("\\$", "").strip()  # an escaped dollar is a currency sign, not a math delimiter
    if any(d in text for d in _DELIMITERS) or _is_prose(text):
        return parse(text, parsing_timeout=None)
    wrapped = parse("$" + text.rstrip(TRAILING_PUNCT + " ") + "$", parsing_timeout=None)
    return wrapped or parse(text, parsing_timeout=None)


def _is_prose(text: str) -> bool:
    return any(w.lower() not in _MATH_WORDS for w in _WORD.findall(_LATEX.sub(" ", text)))


def math_equal(reference: str, answer: str) -> bool:
    """math_verify.verify of the two readings (math_candidates); no time bound of its own (MathPool's)."""
    from math_verify import verify

    return bool(verify(math_candidates(reference), math_candidates(answer), timeout_seconds=None))


def _math_worker(cpu_seconds: float) -> None:
    import resource

    logging.disable(logging.CRITICAL)  # math-verify logs every parse failure
    math_equal("1", "1")  # import math_verify and sympy before saying ready
    print("ready", flush=True)
    for line in sys.stdin:  # EOF (the parent closed stdin or died): exit
        # The parent kills a worker at its deadline; if the parent itself was killed mid-answer, this
        # CPU limit (SIGXCPU) ends the answer instead, so no orphan computes 9^(9^9) forever.
        spent = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
        resource.setrlimit(resource.RLIMIT_CPU, (math.ceil(spent + cpu_seconds), resource.RLIM_INFINITY))
        reference, answer = json.loads(line)
        print(int(math_equal(reference, answer)), flush=True)


class MathPool:
    """`workers` persistent math-verify processes, each judging one (reference, answer) at a time under
    a hard time bound. math-verify's own bound (signal.alarm) works only in a main thread and cannot
    interrupt C code (sympy's big integers), so the parent kills a worker that passes its deadline.

    Workers start in their own session (start_new_session=True): the signals a launcher sends to the
    trainer's process group (torchrun's SIGTERM, Ctrl-C's SIGINT) do not reach them, so a pre-empted
    run finishes judging the step it is on. A worker that dies is restarted and its item retried; an
    item that kills `attempts` workers in a row is a VerifierError. Only an answer that runs out of its
    own time bound scores 0, and is counted in `timeouts`."""

    def __init__(self, workers: int = 2, timeout: float = 5.0, start_timeout: float = 120.0, attempts: int = 3):
        self.workers, self.timeout, self.start_timeout, self.attempts = workers, timeout, start_timeout, attempts
        self.procs: list[subprocess.Popen | None] = [None] * workers
        self.timeouts = 0  # answers scored 0 because they ran out of time (cumulative)
        # kill the workers when the pool is collected or the interpreter exits: they ignore our signals
        weakref.finalize(self, MathPool._kill_all, self.procs)

    def __call__(self, pairs: list[tuple[str, str]]) -> list[bool]:
        """math_equal(reference, answer) for each (reference, answer) pair."""
        results: list[bool] = [False] * len(pairs)
        tries = [0] * len(pairs)
        todo = list(range(len(pairs)))[::-1]
        busy: dict[int, tuple[int, float]] = {}  # worker -> (pair index, deadline)
        try:
            while todo or busy:
                for w in range(self.workers):
                    if w not in busy and todo:
                        i = todo.pop()
                        tries[i] += 1
                        self._send(w, pairs[i])  # may start the worker (imports sympy: seconds on a busy machine)
                        busy[w] = (i, time.monotonic() + self.timeout)  # so the answer's own time starts after it
                alive = [self.procs[w].stdout for w in busy if self.procs[w]]
                wait = max(0.0, min(d for _, d in busy.values()) - time.monotonic()) if len(alive) == len(busy) else 0
                ready, _, _ = select.select(alive, [], [], wait)
                for w in list(busy):
                    i, deadline = busy[w]
                    line = self.procs[w].stdout.readline().strip() if self.procs[w] and self.procs[w].stdout in ready \
                        else None
                    if line in ("0", "1"):
                        results[i] = line == "1"
                    elif line is not None or self.procs[w] is None:  # died (a crash in sympy, a kill) or garbled
                        cause = self._stop(w, grace=1.0)
                        if tries[i] >= self.attempts:
                            raise VerifierError(f"rule:math: {tries[i]} math-verify workers died judging reference "
                                                f"{str(pairs[i][0])[:80]!r} with answer {str(pairs[i][1])[:80]!r}; "
                                                f"last: {cause}")
                        log.warning("rule:math: a worker died (%s); restarting it and retrying the answer", cause)
                        todo.append(i)
                    elif time.monotonic() >= deadline:
                        self.timeouts += 1
                        log.warning("rule:math: an answer ran past %.1fs and scores 0 (%d so far): %r",
                                    self.timeout, self.timeouts, pairs[i][1][:80])
                        self._stop(w)
                    else:
                        continue
                    del busy[w]
        except BaseException:  # a busy worker's late reply must not be read as the next call's answer
            for w in busy:
                self._stop(w)
            raise
        return results

    def _send(self, w: int, pair: tuple[str, str]) -> None:
        """Give worker w one pair, starting it first if needed. A worker that dies before it has the pair
        is left stopped: the loop counts that as a death and retries the pair."""
        if self.procs[w] is None or self.procs[w].poll() is not None:
            self._stop(w)
            self._start(w)
        try:
            self.procs[w].stdin.write(json.dumps(list(pair)) + "\n")
            self.procs[w].stdin.flush()
        except OSError:  # BrokenPipeError: it died just now
            self._stop(w)

    def _start(self, w: int) -> None:
        with tempfile.TemporaryFile() as err:  # a file, not a pipe: a chatty worker can never block on it
            proc = subprocess.Popen([sys.executable, __file__, "math-worker", str(2 * self.timeout + 1)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1,
                                    start_new_session=True)  # the trainer's group signals do not reach it
            self.procs[w] = proc
            try:
                ready, _, _ = select.select([proc.stdout], [], [], self.start_timeout)
                first = proc.stdout.readline().strip() if ready else ""
            except BaseException:  # e.g. Ctrl-C while it starts: leave no half-started worker behind
                self._stop(w)
                raise
            if first != "ready":
                self._stop(w)
                err.seek(0)
                tail = err.read()[-1500:].decode(errors="replace").strip()
                raise VerifierError(f"rule:math: the math-verify worker ({sys.executable} {__file__} math-worker) "
                                    f"did not start within {self.start_timeout:.0f}s: {tail or 'no output'}")

    def _stop(self, w: int, grace: float = 0.0) -> str:
        """Kill worker w (if alive, after `grace` seconds to exit by itself); returns how it ended."""
        proc, self.procs[w] = self.procs[w], None
        return "not running" if proc is None else MathPool._end(proc, grace)

    @staticmethod
    def _end(proc: subprocess.Popen, grace: float = 0.0) -> str:
        try:
            code = proc.wait(grace) if grace else proc.poll()
        except subprocess.TimeoutExpired:
            code = None
        if code is None:
            proc.kill()
            proc.wait()
        for f in (proc.stdin, proc.stdout):
            try:
                f.close()
            except OSError:  # flushing into a dead pipe
                pass
        return f"exit status {code}" if code is not None else "killed"

    def close(self) -> None:
        MathPool._kill_all(self.procs)

    @staticmethod
    def _kill_all(procs: list) -> None:
        for i, proc in enumerate(procs):
            if proc is not None:
                MathPool._end(proc)
            procs[i] = None


if __name__ == "__main__" and sys.argv[1:2] == ["math-worker"]:
    _math_worker(float(sys.argv[2]))
