"""The scale-out rollout engine: any OpenAI-compatible /v1/completions server (vLLM, SGLang,
`transformers serve`, a hosted provider) that the operator configured (backend.rollouts.registry).

Before a run, `check_model` asks the server to read fingerprint prompts and compares the token
counts it reports with the analysed model's tokenizer (another model's tokenizer reads them
differently: resampling with it would be another experiment), and finds out what the server
accepts: token-id prompts (vLLM does; else text) and `n` (else one request per rollout).
Requests run `concurrency` at a time, each retried with exponential backoff on connection
errors, 429 and 5xx; continuations are yielded as they arrive, so the caller saves them at once
and a failed or restarted job resumes with what is missing.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

from backend.errors import JobCancelled
from backend.rollouts.base import (Continuation, EngineError, Progress, Prompt, RolloutMeter,
                                   SamplingParams)
from backend.rollouts.registry import EndpointConfig

log = logging.getLogger(__name__)

FINGERPRINTS = ("Thought anchors: 17 × 23 = 391, so the answer is \\boxed{391}.",
                "naïve café — résumé; 東京タワー ß ∑ ∫ 🙂 ¿qué?",
                "def f(x):\n\treturn x ** 2  # 0x1F, 3.14159e-10")
MAX_N = 16  # continuations asked for in one request when the server honours n
REQUEST_TIMEOUT_S = 900
CHECK_TTL_S = 600  # a passed model check is trusted this long (each job would repeat it)
_checked: dict[tuple, tuple[float, bool, bool]] = {}  # -> (when, token_prompts, honours_n)


class _Refused(Exception):
    """A request the server answered with a client error: retrying will not help."""


class EndpointEngine:
    def __init__(self, config: EndpointConfig, tokenizer):
        self.config, self.tokenizer = config, tokenizer
        self.name = config.name
        self.token_prompts = False
        self.honours_n = False

    # --- HTTP -------------------------------------------------------------------------------
    def _post(self, body: dict) -> dict:
        """POST /completions with retries; raises EngineError when the server is gone."""
        data = json.dumps({"model": self.config.model, **body}).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.config.api_key_env or "", "")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        last = ""
        for attempt in range(self.config.retries + 1):
            if attempt:
                time.sleep(self.config.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(self.config.base_url + "/completions", data,
                                             headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode(errors="replace")
                if e.code != 429 and e.code < 500:
                    raise _Refused(f"HTTP {e.code}: {detail}") from e
                last = f"HTTP {e.code}: {detail}"
            except (urllib.error.URLError, OSError, ValueError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            log.warning("Endpoint %s (%s): %s", self.name, self.config.base_url, last)
        raise EngineError(f"Rollout endpoint '{self.name}' does not answer ({last}; "
                          f"{self.config.retries + 1} attempts).")

    # --- the model check ----------------------------------------------------------------------
    def check_model(self) -> None:
        """Refuse a server whose model is not the analysed one; learn what it accepts."""
        key = (self.config, self.tokenizer.name_or_path, len(self.tokenizer))
        if key in _checked and time.monotonic() - _checked[key][0] < CHECK_TTL_S:
            _, self.token_prompts, self.honours_n = _checked[key]
            return
        self._check_tokenizer()
        ids = self.tokenizer(FINGERPRINTS[0])["input_ids"]
        try:
            reply = self._post({"prompt": ids, "max_tokens": 1, "temperature": 0})
            self.token_prompts = (reply.get("usage") or {}).get("prompt_tokens") == len(ids)
        except _Refused:
            self.token_prompts = False
        try:
            reply = self._post({"prompt": FINGERPRINTS[0], "max_tokens": 1, "n": 2})
            self.honours_n = len(reply.get("choices", ())) == 2
        except _Refused:
            self.honours_n = False
        _checked[key] = (time.monotonic(), self.token_prompts, self.honours_n)

    def _check_served(self, reply: dict) -> None:
        """Every reply names its model: a server restarted with another one is caught."""
        served = str(reply.get("model", self.config.model)).split("@")[0]
        if served != self.config.model:
            raise EngineError(f"Rollout endpoint '{self.name}' answers with model '{served}', "
                              f"not '{self.config.model}'.")

    def _check_tokenizer(self) -> None:
        for text in FINGERPRINTS:
            try:
                reply = self._post({"prompt": text, "max_tokens": 1, "temperature": 0})
            except _Refused as e:
                raise EngineError(f"Rollout endpoint '{self.name}' refused a completion "
                                  f"request ({e}).") from e
            self._check_served(reply)
            theirs = (reply.get("usage") or {}).get("prompt_tokens")
            ours = len(self.tokenizer(text)["input_ids"])
            if theirs is None:
                raise EngineError(f"Rollout endpoint '{self.name}' reports no token usage: "
                                  "its model cannot be checked against the analysed one.")
            if theirs != ours:
                raise EngineError(
                    f"Rollout endpoint '{self.name}' serves another model: its tokenizer reads "
                    f"a fingerprint prompt as {theirs} tokens, the analysed model's as {ours}. "
                    "Resampling with another model is a different experiment: pick an "
                    "endpoint that serves the analysed model.")

    # --- the run ------------------------------------------------------------------------------
    def _requests(self, prompts: list[Prompt], params: SamplingParams):
        """(prompt, first continuation index within it, how many) per request."""
        for p in prompts:
            step = min(MAX_N, p.n) if self.honours_n and not p.max_new_tokens else 1
            for j in range(0, p.n, step):
                yield p, j, min(step, p.n - j)

    def _complete(self, prompt: Prompt, j: int, count: int,
                  params: SamplingParams) -> list[Continuation]:
        if self.token_prompts or prompt.text is None:
            body_prompt = list(prompt.token_ids)
        else:
            body_prompt = prompt.text
        seed = (params.seed or 0) * 1_000_003 + zlib.crc32(repr(prompt.key).encode()) + \
            7919 * (prompt.first_index + j)
        body = {"prompt": body_prompt, "max_tokens": prompt.cap(j, params.max_new_tokens),
                "temperature": params.temperature, "top_p": params.top_p, "n": count,
                "seed": seed % 2**31}
        try:
            reply = self._post(body)
        except _Refused as e:
            raise EngineError(f"Rollout endpoint '{self.name}' refused a request ({e}).") from e
        self._check_served(reply)
        choices = sorted(reply.get("choices", ()), key=lambda c: c.get("index", 0))
        if len(choices) < count:
            raise EngineError(f"Rollout endpoint '{self.name}' returned {len(choices)} "
                              f"continuations for {count}.")
        out = []
        for k, choice in enumerate(choices[:count]):
            text = choice.get("text") or ""
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            reason = "length" if choice.get("finish_reason") == "length" else "stop"
            out.append(Continuation(prompt.key, prompt.first_index + j + k, ids, text, reason))
        return out

    def run(self, prompts: Iterable[Prompt], params: SamplingParams,
            progress: Progress | None = None,
            should_stop: Callable[[], bool] | None = None) -> Iterator[Continuation]:
        prompts = [p for p in prompts if p.n > 0]
        meter = RolloutMeter(sum(p.n for p in prompts))
        results: queue.Queue = queue.Queue()
        pool = ThreadPoolExecutor(self.config.concurrency, thread_name_prefix="rollouts")
        futures = []
        for p, j, count in self._requests(prompts, params):
            future = pool.submit(self._complete, p, j, count, params)
            future.add_done_callback(results.put)
            futures.append(future)
        try:
            for _ in futures:
                while True:
                    if should_stop is not None and should_stop():
                        raise JobCancelled("Rollouts cancelled.")
                    try:
                        future = results.get(timeout=0.2)
                        break
                    except queue.Empty:
                        continue
                error = future.exception()
                if error is not None:
                    raise EngineError(f"{error} {meter.done:,} of {meter.total:,} rollouts "
                                      "were saved: run the analysis again to resume.") from error
                for continuation in future.result():
                    meter.add(continuation)
                    yield continuation
                if progress is not None:
                    progress(meter)
        finally:
            for future in futures:
                future.cancel()
            pool.shutdown(wait=False, cancel_futures=True)
