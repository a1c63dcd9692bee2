"""docs/openapi.yaml against a live daemon: schemathesis-generated requests, the tiny model.

``test_schemathesis_against_live_daemon`` sends, for every operation the document describes
(except the ones in NOT_FUZZED), its documented examples, then a bounded, derandomized run of
generated valid requests and of schema-violating ones, through a real socket to Hypercorn. A
request passes when it is answered in time, with no 5xx, with a status and content type the
document lists, a JSON body that validates against it, and every error (an HTTP error, or an
error line / event that ends a stream) a well-formed error object of the route's dialect:
Ollama's ``{"error": "..."}`` under /api/, OpenAI's ``{"error": {"message", "type", "param",
"code"}}`` under /v1/. Findings are collected first and reported together, one entry each.

The daemon runs in the test's trio loop, so schemathesis (blocking, on ``requests``) and
Hypothesis run on a worker thread. The other tests pin down what the fuzzer found, one request
each, and the body size limit.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio
import yaml
from support import start_daemon

SPEC = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"

# Not fuzzed: they delete or create models, reach a registry, or store blobs. Their malformed
# bodies are still sent by test_malformed_bodies_get_dialect_errors, which is harmless.
NOT_FUZZED = {
    ("DELETE", "/api/delete"),
    ("POST", "/api/create"),
    ("POST", "/api/pull"),
    ("POST", "/api/push"),
    ("POST", "/api/blobs/{digest}"),
}
MODELS = ["tiny", "tiny:latest", "tiny-mlx"]  # generated requests name real models
GENERATION = {"/api/generate", "/api/chat", "/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/responses"}
# How a named-event stream (Anthropic's, OpenAI Responses') that ended well ends.
LAST_EVENTS = {"/v1/messages": {"message_stop"}, "/v1/responses": {"response.completed", "response.incomplete"}}
MAX_TOKENS = 4  # every generated request stops after this many tokens per sequence
SAFE_VOCAB = 256  # the tiny model's byte-level BPE has at least the 256 byte tokens
# Each distinct top_p / min_p value costs the runner an MLX compile (1.5-3 s here): a few values.
TOP_P = [0.5, 0.9, 1.0]
MIN_P = [0.0, 0.05]
# Examples per operation and mode: enough to reach the branches the schema describes, few
# enough that the whole file stays under 90 s on two cores.
EXAMPLES = {"positive": 12, "negative": 8}
HEAVY_EXAMPLES = {"positive": 30, "negative": 12}
# The newer dialects' routes share the chat route's path past their parsing: the base count serves.
HEAVY = GENERATION - {"/v1/messages", "/v1/responses"} | {"/api/embed", "/v1/embeddings"}
REQUEST_TIMEOUT = (5, 20)  # (connect, read) seconds: a hang is reported, not waited out
SLOW = 10.0


# ---------------------------------------------------------------------------------------------
# error objects


def ollama_error_problem(obj) -> str | None:
    if not isinstance(obj, dict) or set(obj) != {"error"} or not isinstance(obj["error"], str) or not obj["error"]:
        return f'not an Ollama error object {{"error": "<message>"}}: {_short(obj)}'
    return None


def openai_error_problem(obj) -> str | None:
    err = obj.get("error") if isinstance(obj, dict) else None
    if not isinstance(obj, dict) or set(obj) != {"error"} or not isinstance(err, dict):
        return f"not an OpenAI error object: {_short(obj)}"
    if set(err) != {"message", "type", "param", "code"}:
        return f"OpenAI error keys {sorted(err)} != ['code', 'message', 'param', 'type']"
    if (
        not isinstance(err["message"], str)
        or not err["message"]
        or not isinstance(err["type"], str)
        or not all(err[k] is None or isinstance(err[k], str) for k in ("param", "code"))
    ):
        return f"OpenAI error with wrong field types: {_short(obj)}"
    return None


def anthropic_error_problem(obj) -> str | None:
    err = obj.get("error") if isinstance(obj, dict) else None
    if (
        not isinstance(obj, dict)
        or obj.get("type") != "error"
        or not isinstance(err, dict)
        or not isinstance(err.get("type"), str)
        or not isinstance(err.get("message"), str)
        or not err["message"]
    ):
        return f'not an Anthropic error object {{"type": "error", "error": {{"type", "message"}}}}: {_short(obj)}'
    return None


def error_problem(path: str, obj) -> str | None:
    if path.startswith("/v1/messages"):
        return anthropic_error_problem(obj)
    return (openai_error_problem if path.startswith("/v1/") else ollama_error_problem)(obj)


def _short(obj, n: int = 300) -> str:
    text = obj if isinstance(obj, str) else json.dumps(obj, default=str)
    return text if len(text) <= n else text[:n] + "..."


def body_problems(path: str, method: str, status: int, ctype: str, text: str) -> list[str]:
    """What is wrong with a response body, dialect-wise (empty when nothing is)."""
    if method == "HEAD":
        return []
    if status >= 400:
        try:
            obj = json.loads(text)
        except ValueError:
            return [f"error body is not JSON ({ctype}): {_short(text)}"]
        p = error_problem(path, obj)
        return [p] if p else []
    out: list[str] = []
    if ctype.startswith("application/x-ndjson"):
        lines = [line for line in text.split("\n") if line.strip()]
        if not lines:
            return ["empty NDJSON stream"]
        for line in lines:
            try:
                obj = json.loads(line)
            except ValueError:
                return [f"NDJSON line is not JSON: {_short(line)}"]
            if isinstance(obj, dict) and "error" in obj:
                out.append(f"stream ended with an error line: {_short(obj)}")
                if p := ollama_error_problem(obj):
                    out.append(p)
        last = json.loads(lines[-1])
        if isinstance(last, dict) and "error" not in last and "status" not in last and last.get("done") is not True:
            out.append(f"NDJSON stream ended without a final object: {_short(last)}")
    elif ctype.startswith("text/event-stream"):
        # Each event's data (a named event has its "event:" line first).
        events = [
            line[len("data: ") :] for e in text.split("\n\n") for line in e.split("\n") if line.startswith("data: ")
        ]
        if not events:
            return ["empty event stream"]
        for data in events:
            if data == "[DONE]":
                continue
            try:
                obj = json.loads(data)
            except ValueError:
                return [f"SSE data is not JSON: {_short(data)}"]
            if isinstance(obj, dict) and "error" in obj:
                out.append(f"stream ended with an error event: {_short(obj)}")
                # A Responses error event carries an OpenAI error object beside its own fields.
                if p := error_problem(path, {"error": obj["error"]} if path == "/v1/responses" else obj):
                    out.append(p)
        if path in LAST_EVENTS:
            if not out and json.loads(events[-1]).get("type") not in LAST_EVENTS[path]:
                out.append(f"event stream did not end with one of {sorted(LAST_EVENTS[path])}")
        elif events[-1] != "[DONE]" and not out:
            out.append("event stream did not end with [DONE]")
    return out


# ---------------------------------------------------------------------------------------------
# the schemathesis run


def fuzz_schema() -> dict:
    """The document, narrowed where generated values would only be slow or destructive."""
    schema = copy.deepcopy(yaml.safe_load(SPEC.read_text()))
    comps = schema["components"]["schemas"]
    comps["ModelName"] = {"type": "string", "enum": MODELS}
    copy_body = schema["paths"]["/api/copy"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    # Copies are cheap (blobs are shared) but must never overwrite the models under test.
    copy_body["properties"]["destination"] = {"type": "string", "pattern": "^fuzz-[a-z0-9]{1,8}$"}
    opts = comps["Options"]["properties"]
    opts["num_ctx"] = {"type": "integer", "enum": [16, 512, 2048]}  # each size is a runner to load
    opts["top_p"] = {"type": "number", "enum": TOP_P}
    opts["min_p"] = {"type": "number", "enum": MIN_P}
    for name in ("ChatCompletionRequest", "CompletionRequest", "AnthropicMessagesRequest", "ResponsesRequest"):
        comps[name]["properties"]["top_p"] = {"type": "number", "enum": TOP_P}
    # The tiny model has no thinking, vision or insert: those fields would only ever get their
    # 400 (test_api covers it), and hide whatever else the request carries behind it.
    comps["Think"] = {"type": "boolean", "enum": [False]}
    comps["GenerateRequest"]["properties"]["images"]["maxItems"] = 0
    comps["OllamaMessage"]["properties"]["images"]["maxItems"] = 0
    comps["GenerateRequest"]["properties"]["suffix"]["maxLength"] = 0
    comps["CompletionRequest"]["properties"]["suffix"]["maxLength"] = 0
    comps["OpenAIContentPart"]["properties"]["type"]["enum"] = ["text"]
    comps["AnthropicContentBlock"]["properties"]["type"]["enum"].remove("image")
    # Servers ignore unknown top-level fields: generating them only dilutes the examples.
    for item in schema["paths"].values():
        for method, op in item.items():
            if method == "parameters":
                continue
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            target = comps[body["$ref"].rsplit("/", 1)[1]] if "$ref" in body else body
            if target.get("type") == "object":
                target["additionalProperties"] = False
    return schema


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def bound(case) -> None:
    """Cap what a generated request may cost, and keep it from harming the test process.

    Only values of the right type are changed; a wrongly typed value is left for the server to
    refuse. Values that crash the process, stop the daemon or break MLX for every later test in
    this process (OUT_OF_PROCESS), or that make /api/ps fail for the rest of the run (KNOWN_BAD),
    are folded into harmless ones: those requests have their own tests.
    """
    body = case.body
    if not isinstance(body, dict):
        return
    ka = body.get("keep_alive")
    if isinstance(ka, str) and ka.strip().lower().lstrip("+-") == "nan":
        body["keep_alive"] = "5m"
    elif _is_num(ka) and abs(ka) > 1e9:
        body["keep_alive"] = 300
    if case.path not in GENERATION:
        return
    _keep_token_ids_in_vocab(body)
    opts = body.get("options")
    for holder in (opts, body):  # Anthropic's top_k is a top-level field
        if isinstance(holder, dict) and _is_num(holder.get("top_k")) and holder["top_k"] >= SAFE_VOCAB:
            holder["top_k"] = 40
    if isinstance(opts, dict):
        if _is_num(opts.get("min_p")) and opts["min_p"] > 0 and opts["min_p"] not in MIN_P:
            opts["min_p"] = MIN_P[-1]
    for holder in (opts, body):
        if (
            isinstance(holder, dict)
            and _is_num(holder.get("top_p"))
            and 0 < holder["top_p"] < 1
            and holder["top_p"] not in TOP_P
        ):
            holder["top_p"] = TOP_P[-2]
    if case.path.startswith("/api/"):
        opts = body.get("options")
        if opts is None:
            body["options"] = {"num_predict": MAX_TOKENS}
        elif isinstance(opts, dict):
            v = opts.get("num_predict")
            if v is None or (_is_num(v) and not 0 < v <= MAX_TOKENS):
                opts["num_predict"] = MAX_TOKENS
        return
    names = ("max_output_tokens",) if case.path == "/v1/responses" else ("max_tokens", "max_completion_tokens")
    keys = [k for k in names if body.get(k) is not None]
    if not keys:
        body[names[0]] = MAX_TOKENS
    for k in keys:
        if _is_num(body[k]) and body[k] > MAX_TOKENS:
            body[k] = MAX_TOKENS


def _keep_token_ids_in_vocab(body: dict) -> None:
    def fold(v):
        return v % SAFE_VOCAB if isinstance(v, int) and not isinstance(v, bool) and v >= SAFE_VOCAB else v

    p = body.get("prompt")
    if isinstance(p, list):
        body["prompt"] = [[fold(t) for t in x] if isinstance(x, list) else fold(x) for x in p]
    bias = body.get("logit_bias")
    if isinstance(bias, dict):
        body["logit_bias"] = {
            k: v for k, v in bias.items() if not (k.strip().lstrip("+-").isdigit() and int(k) >= SAFE_VOCAB)
        }


class Findings:
    def __init__(self) -> None:
        self.items: dict[tuple, str] = {}  # one per (operation, kind, status, start of detail)
        self.requests = 0
        self.statuses: dict[str, dict[int, int]] = {}

    def add(self, op: str, kind: str, status, detail: str, case) -> None:
        key = (op, kind, status, detail[:60])
        if key not in self.items:
            body = "" if case.body is None or isinstance(case.body, bytes) else _short(case.body, 500)
            self.items[key] = f"{op} -> {status} [{kind}] {detail}\n      {case.method} {case.formatted_path} {body}"

    def report(self) -> str:
        lines = [f"{len(self.items)} finding(s) in {self.requests} requests:"]
        lines += [f"  {v}" for v in sorted(self.items.values())]
        lines += ["statuses per operation:"]
        lines += [f"  {op}: {dict(sorted(c.items()))}" for op, c in sorted(self.statuses.items())]
        return "\n".join(lines)


def check_case(case, session, findings: Findings) -> None:
    op = f"{case.method.upper()} {case.path}"
    bound(case)
    findings.requests += 1
    t0 = time.monotonic()
    try:
        response = case.call(session=session, timeout=REQUEST_TIMEOUT)
    except Exception as exc:  # a timeout (a hang), a reset connection, a daemon that died
        findings.add(op, "no-response", None, f"{exc.__class__.__name__}: {_short(str(exc), 200)}", case)
        return
    elapsed = time.monotonic() - t0
    status = response.status_code
    counts = findings.statuses.setdefault(op, {})
    counts[status] = counts.get(status, 0) + 1
    if elapsed > SLOW:
        findings.add(op, "slow", status, f"answered after {elapsed:.1f} s", case)
    ctype = (response.headers.get("content-type") or [""])[0]  # lower-case keys, list values
    text = response.content.decode("utf-8", "replace") if response.content else ""
    if status >= 500:
        findings.add(op, "5xx", status, _short(text), case)
    for problem in body_problems(case.path, case.method.upper(), status, ctype, text):
        findings.add(op, "body", status, problem, case)
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    try:
        case.validate_response(
            response,
            checks=[not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance],
        )
    except BaseException as exc:  # schemathesis' Failure, or a FailureGroup of them
        for failure in getattr(exc, "exceptions", [exc]):
            title = getattr(failure, "title", failure.__class__.__name__)
            if title.startswith("Server error"):
                continue  # reported above, with its body
            message = _short(str(getattr(failure, "message", failure)), 240)
            findings.add(op, "conformance", status, f"{title}: {message}", case)


def _run(strategy, examples: int, session, findings: Findings) -> None:
    import hypothesis
    from hypothesis import HealthCheck, Phase

    @hypothesis.settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        report_multiple_bugs=False,
        suppress_health_check=list(HealthCheck),
        verbosity=hypothesis.Verbosity.quiet,
    )
    @hypothesis.given(case=strategy)
    def run(case) -> None:
        check_case(case, session, findings)

    run()


def run_schemathesis(base_url: str) -> tuple[Findings, list[str]]:
    import requests
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_dict(fuzz_schema())
    schema.config.update(base_url=base_url)
    findings = Findings()
    ran: list[str] = []
    with requests.Session() as session:
        for result in schema.get_all_operations():
            op = result.ok()
            if (op.method.upper(), op.path) in NOT_FUZZED:
                continue
            for strategy in schema.get_strategies_from_examples(op):  # the documented examples
                _run(strategy, 1, session, findings)
            negatable = len(op.body) > 0 or len(op.path_parameters) > 0 or len(op.query) > 0
            for mode in ["positive"] + (["negative"] if negatable else []):
                _run(
                    op.as_strategy(generation_mode=GenerationMode(mode)),
                    (HEAVY_EXAMPLES if op.path in HEAVY else EXAMPLES)[mode],
                    session,
                    findings,
                )
            ran.append(f"{op.method.upper()} {op.path}")
    return findings, ran


def test_document_covers_every_route():
    """Every route the app serves is in the document, and nothing else is."""
    from mlxserve.http.app import create_app

    class FakeRuntime:
        class settings:
            max_body_bytes = 1024
            host = "127.0.0.1"
            origins = ()
            api_keys = ()

    served = set()
    for rule in create_app(FakeRuntime()).url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = (
            rule.rule.replace("<path:model_id>", "{model}")
            .replace("<digest>", "{digest}")
            .replace("<response_id>", "{response_id}")
        )
        served |= {(m, path) for m in rule.methods - {"OPTIONS"}}
    doc = yaml.safe_load(SPEC.read_text())
    documented = {(m.upper(), p) for p, item in doc["paths"].items() for m in item if m != "parameters"}
    # Werkzeug answers HEAD on every GET route; the document lists HEAD where it is meant for use.
    assert documented - served == set(), "documented but not served"
    assert {(m, p) for m, p in served if m != "HEAD" or (m, p) in documented} - documented == set(), (
        "served but not documented"
    )


async def test_schemathesis_against_live_daemon(models_dir):
    pytest.importorskip("schemathesis")
    with trio.fail_after(150):  # generous: the machine may be shared; requests time out on their own
        async with trio.open_nursery() as nursery:
            d = await start_daemon(nursery, models_dir)
            try:
                findings, ran = await trio.to_thread.run_sync(run_schemathesis, d.url, abandon_on_cancel=True)
            finally:
                d.shutdown.set()
    assert len(ran) == 34 - len(NOT_FUZZED), ran
    assert findings.requests > 250, findings.report()
    assert not findings.items, findings.report()


# ---------------------------------------------------------------------------------------------
# what the fuzzer found, one request each; and the body size limit


def _chat(**extra) -> dict:
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": False,
        "options": {"num_predict": 2, **extra.pop("options", {})},
        **extra,
    }


def _oai(**extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}


def _gen(**extra) -> dict:
    return {
        "model": "tiny",
        "prompt": "hi",
        "stream": False,
        "options": {"num_predict": 2, **extra.pop("options", {})},
        **extra,
    }


# (id, path, body, statuses that would be right). After the request, /api/ps must answer and an
# ordinary request to the same model must still be served: a bad request fails only itself.
KNOWN_BAD = [
    ("negative-seed", "/api/generate", _gen(options={"seed": -5}), {200, 400}),
    ("seed-over-2**64", "/v1/chat/completions", _oai(seed=2**64), {200, 400}),
    ("negative-seed-streamed", "/v1/chat/completions", _oai(seed=-1, stream=True), {200, 400}),
    ("negative-repeat_penalty", "/api/chat", _chat(options={"repeat_penalty": -1}), {400}),
    ("negative-num_ctx", "/api/generate", _gen(options={"num_ctx": -5}), {400}),
    ("template-raises", "/api/generate", _gen(template="{{ 1/0 }}"), {400}),
    ("huge-keep_alive", "/api/generate", _gen(keep_alive=1e308), {200, 400}),
    ("negative-token-id", "/v1/completions", {"model": "tiny", "prompt": [-1], "max_tokens": 2}, {400}),
    ("string-in-token-ids", "/v1/completions", {"model": "tiny", "prompt": [[1, 2], ["a"]], "max_tokens": 2}, {400}),
    ("float-token-id", "/v1/completions", {"model": "tiny", "prompt": [[1.5]], "max_tokens": 2}, {400}),
    ("bool-token-id", "/v1/completions", {"model": "tiny", "prompt": [[1, True]], "max_tokens": 2}, {400}),
]


@pytest.mark.parametrize("path,body,right", [pytest.param(p, b, r, id=i) for i, p, b, r in KNOWN_BAD])
async def test_bad_input_fails_only_its_request(models_dir, path, body, right):
    follow_up = {"/api/generate": _gen(), "/api/chat": _chat()}.get(path, _oai())
    follow_path = path if path.startswith("/api/") else "/v1/chat/completions"
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            d = await start_daemon(nursery, models_dir)
            try:
                async with httpx.AsyncClient(base_url=d.url, timeout=10) as c:
                    r = await c.post(path, json=body)
                    problems = body_problems(path, "POST", r.status_code, r.headers.get("content-type", ""), r.text)
                    assert r.status_code in right and not problems, (r.status_code, r.text[:400])
                    ps = await c.get("/api/ps")
                    assert ps.status_code == 200, ("/api/ps failed", ps.text[:400])
                    after = await c.post(follow_path, json=follow_up)
                    assert after.status_code == 200, ("the next request failed", after.text[:400])
            finally:
                d.shutdown.set()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Requests that harm more than themselves, so they run against a daemon in its own process
# (`mlxctl serve`), restarted after each one that kills it or leaves it unable to sample:
# (id, path, body, statuses that would be right).
OUT_OF_PROCESS = [
    ("token-id-past-vocab", "/v1/completions", {"model": "tiny", "prompt": [100000], "max_tokens": 2}, {400}),
    ("logit_bias-id-past-vocab", "/v1/chat/completions", _oai(logit_bias={"100000": 5}), {400}),
    ("nan-keep_alive", "/api/chat", _chat(keep_alive="nan"), {400}),
    ("min_p-over-1", "/api/chat", _chat(options={"min_p": 5}), {400}),
    ("top_k-past-vocab", "/api/chat", _chat(options={"top_k": 100000}), {200, 400}),
]


class _ServeProcess:
    def __init__(self, nursery: trio.Nursery, models_dir: Path):
        self.nursery, self.models_dir = nursery, models_dir
        self.proc = None
        self.url = ""

    async def start(self) -> None:
        env = {**os.environ, "MLXSERVE_MODELS": str(self.models_dir), "MLXSERVE_HOST": f"127.0.0.1:{_free_port()}"}
        mlxctl = Path(sys.executable).parent / "mlxctl"
        self.proc = await self.nursery.start(
            lambda task_status: trio.run_process(
                [mlxctl, "serve"], env=env, stdout=-1, stderr=-1, check=False, task_status=task_status
            )
        )
        buf = b""
        while b"listening on" not in buf:
            chunk = await self.proc.stdout.receive_some()
            assert chunk, f"mlxctl serve exited: {buf!r}"
            buf += chunk
        self.url = buf.split(b"listening on ", 1)[1].split()[0].decode()

    def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()


async def test_requests_that_harm_the_process(models_dir):
    """Each is refused (or served) alone: the daemon stays up, and the next sampled request to
    the same model is still served."""
    problems = []
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            serve = _ServeProcess(nursery, models_dir)
            try:
                await serve.start()
                for label, path, body, right in OUT_OF_PROCESS:
                    problem = None
                    try:
                        async with httpx.AsyncClient(base_url=serve.url, timeout=10) as c:
                            r = await c.post(path, json=body)
                            await trio.sleep(0.3)  # a corrupted heap may abort a moment later
                            if r.status_code not in right or body_problems(
                                path, "POST", r.status_code, r.headers.get("content-type", ""), r.text
                            ):
                                problem = f"answered {r.status_code} {r.text[:300]}"
                            after = await c.post("/api/chat", json=_chat())
                            if after.status_code != 200:
                                problem = (
                                    f"{problem or 'answered ok'}; the next request got {after.status_code} "
                                    f"{after.text[:200]}"
                                )
                    except httpx.TransportError as exc:
                        await trio.sleep(0.3)
                        problem = f"no answer ({exc.__class__.__name__}); daemon exit status {serve.proc.returncode}"
                    if problem:
                        problems.append(f"{label}: POST {path} {json.dumps(body)}: {problem}")
                        serve.stop()  # start clean for the next one
                        await serve.proc.wait()
                        await serve.start()
            finally:
                serve.stop()
    assert not problems, "\n".join(problems)


# Every route that takes a JSON body, in every dialect (the malformed-body and hostile-shape tests).
JSON_ROUTES = [
    "/api/generate",
    "/api/chat",
    "/api/show",
    "/api/copy",
    "/api/create",
    "/api/pull",
    "/api/push",
    "/api/embed",
    "/api/embeddings",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/responses",
    "/api/delete",
]


def _method(path: str) -> str:
    return "DELETE" if path == "/api/delete" else "POST"


# A known gap, left to the lead: a wrong method on the Anthropic routes answers 405 in OpenAI's
# shape (a routing error never reaches http/anthropic.py's after_request).
async def test_malformed_bodies_get_dialect_errors(daemon):
    problems = []
    malformed = [b"", b"{", b"[]", b"null", b'"text"', b"\xff\xfe", b'{"model": "tiny"', b"NaN"]
    with trio.fail_after(30):
        async with httpx.AsyncClient(base_url=daemon.url, timeout=10) as c:
            for path in JSON_ROUTES:
                method = _method(path)
                for raw in malformed:
                    r = await c.request(method, path, content=raw, headers={"content-type": "application/json"})
                    if r.status_code != 400 or error_problem(path, r.json()):
                        problems.append(f"{method} {path} {raw!r}: {r.status_code} {r.text[:200]}")
                r = await c.get(path)  # the wrong method answers in the route's dialect too
                if r.status_code != 405 or error_problem(path, r.json()):
                    problems.append(f"GET {path}: {r.status_code} {r.text[:200]}")
            for path in ("/api/nope", "/v1/nope"):
                r = await c.post(path, json={})
                if r.status_code != 404 or error_problem(path, r.json()):
                    problems.append(f"POST {path}: {r.status_code} {r.text[:200]}")
    assert not problems, "\n".join(problems)


def _big_chat() -> bytes:
    return json.dumps(_chat(messages=[{"role": "user", "content": "x" * 65536}], max_tokens=1)).encode()


async def _chunks(data: bytes):
    for i in range(0, len(data), 256):
        yield data[i : i + 256]


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
async def test_body_over_limit_is_413(models_dir, path):
    raw = _big_chat()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            d = await start_daemon(nursery, models_dir, max_body_bytes=1024)
            try:
                for label, content in (("content-length", raw), ("chunked", _chunks(raw))):
                    async with httpx.AsyncClient(base_url=d.url, timeout=10) as c:
                        r = await c.post(path, content=content, headers={"content-type": "application/json"})
                    assert r.status_code == 413, (label, r.status_code, r.text[:200])
                    obj = r.json()
                    assert error_problem(path, obj) is None, (label, obj)
                    if path.startswith("/v1/"):
                        assert obj["error"]["code"] == "payload_too_large", obj
                async with httpx.AsyncClient(base_url=d.url, timeout=10) as c:
                    r = await c.post(path, json=_chat(max_tokens=1, options={"num_predict": 1}))
                assert r.status_code == 200, r.text[:200]  # a body under the limit is served
            finally:
                d.shutdown.set()


async def test_connection_is_usable_after_a_413(models_dir):
    """A client that keeps its connection (httpx, requests, both official clients) must get an
    answer to its next request after a refused chunked body."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            d = await start_daemon(nursery, models_dir, max_body_bytes=1024)
            try:
                async with httpx.AsyncClient(base_url=d.url, timeout=5) as c:
                    for label, content in (("content-length", _big_chat()), ("chunked", _chunks(_big_chat()))):
                        r = await c.post("/api/chat", content=content, headers={"content-type": "application/json"})
                        assert r.status_code == 413
                        try:
                            r = await c.get("/api/version")
                        except httpx.ReadTimeout:
                            pytest.fail(f"after a 413 for a {label} body, the next request on the connection hung")
                        assert r.status_code == 200
            finally:
                d.shutdown.set()


# ---------------------------------------------------------------------------------------------
# hostile shapes: deep nesting, lone surrogates, foreign origins, Host spelled in capitals


def _nested_object(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


def _nested_schema(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def _surrogates(path: str) -> bytes:
    """A request of ``path`` whose strings hold lone surrogates (json.dumps writes them as
    ``\\udXXX`` escapes, as a JavaScript or Java client can)."""
    lone = "\ud800x\udfff"
    body = {
        "/api/generate": _gen(prompt=lone, system=lone),
        "/api/chat": _chat(messages=[{"role": "system", "content": lone}, {"role": "user", "content": lone}]),
        "/v1/chat/completions": _oai(messages=[{"role": "user", "content": lone}]),
        "/v1/completions": {"model": "tiny", "prompt": lone, "max_tokens": 2},
        "/api/embed": {"model": "tiny", "input": [lone]},
        "/v1/embeddings": {"model": "tiny", "input": lone},
        "/v1/messages": {
            "model": "tiny",
            "max_tokens": 2,
            "system": lone,
            "messages": [{"role": "user", "content": lone}],
        },
        "/v1/responses": {"model": "tiny", "input": lone, "instructions": lone, "max_output_tokens": 2},
        "/api/show": {"model": lone},
    }[path]
    return json.dumps(body).encode()


def _hostile_requests():
    """(label, method, path, body, headers, statuses that would be right)."""
    json_ct = {"content-type": "application/json"}
    for path in JSON_ROUTES:
        method = _method(path)
        yield "array-100k-deep", method, path, b"[" * 100_000 + b"]" * 100_000, json_ct, {400}
        yield (
            "object-5k-deep-in-a-field",
            method,
            path,
            f'{{"model": "tiny", "prompt": {_nested_object(5000)}}}'.encode(),
            json_ct,
            {400},
        )
    deep = _nested_schema(300)
    for path, body in (
        ("/api/chat", _chat(format=deep)),
        ("/api/generate", _gen(format=deep)),
        (
            "/v1/chat/completions",
            _oai(response_format={"type": "json_schema", "json_schema": {"name": "deep", "schema": deep}}),
        ),
    ):
        yield "schema-300-deep", "POST", path, json.dumps(body).encode(), json_ct, {400}
    for path in (
        "/api/generate",
        "/api/chat",
        "/v1/chat/completions",
        "/v1/completions",
        "/api/embed",
        "/v1/embeddings",
        "/v1/messages",
        "/v1/responses",
    ):
        yield "lone-surrogates", "POST", path, _surrogates(path), json_ct, {200}
    yield "lone-surrogate-in-a-name", "POST", "/api/show", _surrogates("/api/show"), json_ct, {400, 404}
    yield "host-in-capitals", "POST", "/api/show", b'{"model": "tiny"}', {**json_ct, "host": "LOCALHOST"}, {200}
    for path in JSON_ROUTES:  # last: unrefused, these would delete and copy the models above
        # A page elsewhere posting text/plain: refused before the body is even looked at.
        yield (
            "foreign-origin",
            _method(path),
            path,
            b'{"model": "tiny"}',
            {"content-type": "text/plain", "origin": "https://evil.example"},
            {403},
        )


async def test_hostile_shapes_get_dialect_errors_never_500(daemon):
    problems = []
    with trio.fail_after(120):
        async with httpx.AsyncClient(base_url=daemon.url, timeout=30) as c:
            for label, method, path, raw, headers, right in _hostile_requests():
                r = await c.request(method, path, content=raw, headers=headers)
                found = body_problems(path, method, r.status_code, r.headers.get("content-type", ""), r.text)
                if r.status_code not in right or found:
                    problems.append(f"{label}: {method} {path}: {r.status_code} {r.text[:200]} {found}")
            # The lone surrogate became U+FFFD, as Ollama's decoder makes it.
            r = await c.post(
                "/api/show", content=_surrogates("/api/show"), headers={"content-type": "application/json"}
            )
            if "\ufffdx\ufffd" not in r.json().get("error", ""):
                problems.append(f"lone surrogates not replaced: {r.text[:200]}")
    assert not problems, "\n".join(problems)
