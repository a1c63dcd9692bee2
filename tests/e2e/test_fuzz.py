"""docs/openapi.yaml against a live daemon: schemathesis-generated requests, the tiny model.

Every operation of the document gets a bounded, derandomized run of generated requests (valid
ones, then schema-violating ones) sent by schemathesis through a real socket to Hypercorn. A
request passes when it is answered in time, with no 5xx, with a status and content type the
document lists, a JSON body that validates against it, and, for every error (an HTTP error or a
final error line of a stream), a well-formed error object of the route's dialect: Ollama's
``{"error": "..."}`` under /api/, OpenAI's ``{"error": {"message", "type", "param", "code"}}``
under /v1/. All findings are collected first and reported together, one line each.

The daemon runs in the test's trio loop, so schemathesis (blocking, on ``requests``) and
Hypothesis run on a worker thread.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import httpx
import pytest
import trio
import yaml

from conftest import start_daemon

schemathesis = pytest.importorskip("schemathesis")

import hypothesis  # noqa: E402  (a dependency of schemathesis)
from hypothesis import HealthCheck, Phase  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance, response_schema_conformance, status_code_conformance,
)

SPEC = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"

# Not fuzzed: they delete or create models, reach a registry, or store blobs. (Their malformed
# bodies are still sent by test_malformed_bodies_get_dialect_errors, which is harmless.)
NOT_FUZZED = {
    ("DELETE", "/api/delete"), ("POST", "/api/create"), ("POST", "/api/pull"), ("POST", "/api/push"),
    ("POST", "/api/blobs/{digest}"),
}
# Generated requests name these models, so that they reach the model and not only the lookup.
MODELS = ["tiny", "tiny:latest", "tiny-mlx", "no-such-model"]
GENERATION = {"/api/generate", "/api/chat", "/v1/chat/completions", "/v1/completions"}
SAFE_VOCAB = 256  # the tiny model's byte-level BPE has at least the 256 byte tokens
MAX_TOKENS = 4  # every generated request stops after this many tokens
# Examples per operation and mode: enough to reach every branch the schema describes, small
# enough that the file stays well under 90 s on two cores.
EXAMPLES = {GenerationMode.POSITIVE: 12, GenerationMode.NEGATIVE: 8}
HEAVY_EXAMPLES = {GenerationMode.POSITIVE: 20, GenerationMode.NEGATIVE: 10}
HEAVY = GENERATION | {"/api/embed", "/v1/embeddings"}
REQUEST_TIMEOUT = (5, 20)  # (connect, read) seconds: a hang is reported, not waited out
SLOW = 15.0

CONFORMANCE = [not_a_server_error, status_code_conformance, content_type_conformance,
               response_schema_conformance]


def _fuzz_schema() -> dict:
    """The document, narrowed where generated values would only be slow or destructive."""
    raw = yaml.safe_load(SPEC.read_text())
    schema = copy.deepcopy(raw)
    comps = schema["components"]["schemas"]
    comps["ModelName"] = {"type": "string", "enum": MODELS}
    copy_body = schema["paths"]["/api/copy"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    # Copies are cheap (blobs are shared) but must never overwrite the models under test.
    copy_body["properties"]["destination"] = {"type": "string", "pattern": "^fuzz-[a-z0-9]{1,8}$"}
    # num_ctx values select (and load) a runner each; a few distinct sizes cover the branches.
    comps["Options"]["properties"]["num_ctx"] = {"type": "integer", "enum": [16, 512, 2048]}
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


def _bound(case) -> None:
    """Cap what a generated request may cost: at most MAX_TOKENS tokens per sequence.

    Only values that would be accepted are changed; a wrongly typed value is left for the
    server to refuse.
    """
    body = case.body
    if case.path not in GENERATION or not isinstance(body, dict):
        return
    _keep_token_ids_in_vocab(body)

    def small(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_TOKENS

    def int_like(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if case.path.startswith("/api/"):
        opts = body.get("options")
        if opts is None:
            body["options"] = {"num_predict": MAX_TOKENS}
        elif isinstance(opts, dict):
            v = opts.get("num_predict")
            if v is None or (int_like(v) and not small(v)):
                opts["num_predict"] = MAX_TOKENS
        return
    keys = [k for k in ("max_tokens", "max_completion_tokens") if body.get(k) is not None]
    if not keys:
        body["max_tokens"] = MAX_TOKENS
    for k in keys:
        if int_like(body[k]) and body[k] > MAX_TOKENS:
            body[k] = MAX_TOKENS


def _keep_token_ids_in_vocab(body: dict) -> None:
    """Token ids past the vocabulary crash the whole process (see KNOWN_CRASHES), which no
    check can report: until the server refuses them, generated ones are folded into range."""
    def fold(v):
        return v % SAFE_VOCAB if isinstance(v, int) and not isinstance(v, bool) and v >= SAFE_VOCAB else v

    p = body.get("prompt")
    if isinstance(p, list):
        body["prompt"] = [[fold(t) for t in x] if isinstance(x, list) else fold(x) for x in p]
    bias = body.get("logit_bias")
    if isinstance(bias, dict):
        body["logit_bias"] = {k: v for k, v in bias.items()
                              if not (k.lstrip("-").isdigit() and int(k) >= SAFE_VOCAB)}


# ---------------------------------------------------------------------------------------------
# error-object checks (also used by the plain tests below)

def ollama_error_problem(obj) -> str | None:
    if not isinstance(obj, dict) or set(obj) != {"error"} or not isinstance(obj["error"], str) \
            or not obj["error"]:
        return f'not an Ollama error object {{"error": "<message>"}}: {_short(obj)}'
    return None


def openai_error_problem(obj) -> str | None:
    err = obj.get("error") if isinstance(obj, dict) else None
    if not isinstance(obj, dict) or set(obj) != {"error"} or not isinstance(err, dict):
        return f"not an OpenAI error object: {_short(obj)}"
    if set(err) != {"message", "type", "param", "code"}:
        return f"OpenAI error keys {sorted(err)} != ['code', 'message', 'param', 'type']"
    if not isinstance(err["message"], str) or not err["message"] or not isinstance(err["type"], str) \
            or not all(err[k] is None or isinstance(err[k], str) for k in ("param", "code")):
        return f"OpenAI error with wrong field types: {_short(obj)}"
    return None


def error_problem(path: str, obj) -> str | None:
    return (openai_error_problem if path.startswith("/v1/") else ollama_error_problem)(obj)


def _short(obj, n: int = 300) -> str:
    text = obj if isinstance(obj, str) else json.dumps(obj, default=str)
    return text if len(text) <= n else text[:n] + "..."


def _body_problems(path: str, method: str, status: int, ctype: str, text: str) -> list[str]:
    """What is wrong with this response's body, dialect-wise (empty when nothing is)."""
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
        events = [e[len("data: "):] for e in text.split("\n\n") if e.startswith("data: ")]
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
                if p := openai_error_problem(obj):
                    out.append(p)
        if events[-1] != "[DONE]" and not out:
            out.append("event stream did not end with [DONE]")
    return out


# ---------------------------------------------------------------------------------------------
# the schemathesis run (on a worker thread)

class Findings:
    def __init__(self) -> None:
        self.items: dict[tuple, str] = {}  # de-duplicated by (operation, kind, status)
        self.requests = 0
        self.statuses: dict[str, dict[int, int]] = {}  # per operation: how the requests ended

    def add(self, op: str, kind: str, status, detail: str, case) -> None:
        key = (op, kind, status, detail[:60])
        if key not in self.items:
            body = _short(case.body, 400) if case.body is not None and not isinstance(case.body, bytes) else ""
            where = case.formatted_path if hasattr(case, "formatted_path") else case.path
            self.items[key] = f"{op} -> {status} [{kind}] {detail}\n      {case.method} {where} {body}"


import os
_LOG = open(os.environ["FUZZ_LOG"], "a") if os.environ.get("FUZZ_LOG") else None


def _check_case(case, session, findings: Findings) -> None:
    op = f"{case.method.upper()} {case.path}"
    _bound(case)
    findings.requests += 1
    if _LOG:
        print(case.method, case.formatted_path, json.dumps(case.body, default=str)[:2000], file=_LOG, flush=True)
    t0 = time.monotonic()
    try:
        response = case.call(session=session, timeout=REQUEST_TIMEOUT)
    except Exception as exc:  # a timeout (hang), a reset connection, a malformed response
        findings.add(op, "no-response", None, f"{exc.__class__.__name__}: {_short(str(exc), 200)}", case)
        return
    elapsed = time.monotonic() - t0
    status = response.status_code
    if _LOG:
        print("   ->", status, response.content[:200], file=_LOG, flush=True)
    counts = findings.statuses.setdefault(op, {})
    counts[status] = counts.get(status, 0) + 1
    if elapsed > SLOW:
        findings.add(op, "slow", status, f"answered after {elapsed:.1f} s", case)
    ctype = (response.headers.get("content-type") or [""])[0]  # lower-case keys, list values
    text = response.content.decode("utf-8", "replace") if response.content else ""
    if status >= 500:
        findings.add(op, "5xx", status, _short(text), case)
    for problem in _body_problems(case.path, case.method.upper(), status, ctype or "", text):
        findings.add(op, "body", status, problem, case)
    try:
        case.validate_response(response, checks=CONFORMANCE)
    except BaseException as exc:  # schemathesis' Failure / FailureGroup
        for failure in getattr(exc, "exceptions", [exc]):
            title = getattr(failure, "title", failure.__class__.__name__)
            if title.startswith("Server error"):
                continue  # reported above, with its body
            findings.add(op, "conformance", status, f"{title}: {_short(str(getattr(failure, 'message', failure)), 240)}",
                         case)


def _run_operation(op, mode: GenerationMode, examples: int, session, findings: Findings) -> None:
    strategy = op.as_strategy(generation_mode=mode)

    @hypothesis.settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                         phases=[Phase.explicit, Phase.generate], report_multiple_bugs=False,
                         suppress_health_check=list(HealthCheck), verbosity=hypothesis.Verbosity.quiet)
    @hypothesis.given(case=strategy)
    def run(case) -> None:
        _check_case(case, session, findings)

    run()


def _negatable(op) -> bool:
    return len(op.body) > 0 or len(op.path_parameters) > 0 or len(op.query) > 0


def run_schemathesis(base_url: str) -> tuple[Findings, list[str]]:
    import requests

    schema = schemathesis.openapi.from_dict(_fuzz_schema())
    schema.config.update(base_url=base_url)
    findings = Findings()
    ran: list[str] = []
    with requests.Session() as session:
        for result in schema.get_all_operations():
            op = result.ok()
            if (op.method.upper(), op.path) in NOT_FUZZED:
                continue
            modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if _negatable(op) else [])
            for mode in modes:
                examples = (HEAVY_EXAMPLES if op.path in HEAVY else EXAMPLES)[mode]
                _run_operation(op, mode, examples, session, findings)
            ran.append(f"{op.method.upper()} {op.path}")
    return findings, ran


def test_document_covers_every_route():
    """Every route the app serves is in the document, and nothing else is."""
    from mlxserve.http.app import create_app

    class FakeRuntime:
        class settings:
            max_body_bytes = 1024
            host = "127.0.0.1"

    app = create_app(FakeRuntime())
    served = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = rule.rule.replace("<path:model_id>", "{model}").replace("<digest>", "{digest}")
        served |= {(m, path) for m in rule.methods - {"OPTIONS"}}
    doc = yaml.safe_load(SPEC.read_text())
    documented = {(m.upper(), p) for p, item in doc["paths"].items() for m in item if m != "parameters"}
    # Werkzeug answers HEAD for every GET route; the document lists HEAD where it is meant for use.
    served_explicit = {(m, p) for m, p in served if m != "HEAD" or (m, p) in documented}
    assert documented - served == set(), "documented but not served"
    assert served_explicit - documented == set(), "served but not documented"


async def test_schemathesis_against_live_daemon(models_dir):
    with trio.fail_after(85):
        async with trio.open_nursery() as nursery:
            d = await start_daemon(nursery, models_dir)
            try:
                findings, ran = await trio.to_thread.run_sync(run_schemathesis, d.url, abandon_on_cancel=True)
            finally:
                d.shutdown.set()
    assert len(ran) == 26 - len(NOT_FUZZED), ran
    assert findings.requests > 200
    for op, counts in sorted(findings.statuses.items()):
        print(f"{op}: {dict(sorted(counts.items()))}")
    report = "\n".join(f"  {line}" for line in sorted(findings.items.values()))
    assert not findings.items, f"{len(findings.items)} finding(s) in {findings.requests} requests:\n{report}"


# ---------------------------------------------------------------------------------------------
# plain tests

POST_ROUTES = ["/api/generate", "/api/chat", "/api/show", "/api/copy", "/api/create", "/api/pull",
               "/api/push", "/api/embed", "/api/embeddings", "/v1/chat/completions", "/v1/completions",
               "/v1/embeddings"]
MALFORMED = [b"", b"{", b"[]", b"null", b'"text"', b"\xff\xfe", b'{"model": "tiny"']


async def test_malformed_bodies_get_dialect_errors(daemon):
    problems = []
    with trio.fail_after(30):
        async with httpx.AsyncClient(base_url=daemon.url, timeout=10) as c:
            for path in POST_ROUTES + ["/api/delete"]:
                method = "DELETE" if path == "/api/delete" else "POST"
                for raw in MALFORMED:
                    r = await c.request(method, path, content=raw, headers={"content-type": "application/json"})
                    if r.status_code != 400:
                        problems.append(f"{method} {path} {raw!r}: {r.status_code} {r.text[:200]}")
                        continue
                    if p := error_problem(path, r.json()):
                        problems.append(f"{method} {path} {raw!r}: {p}")
                # the wrong method and an unknown path answer in the route's dialect too
                r = await c.get(path)
                if r.status_code != 405 or error_problem(path, r.json()):
                    problems.append(f"GET {path}: {r.status_code} {r.text[:200]}")
            for path in ("/api/nope", "/v1/nope"):
                r = await c.post(path, json={})
                if r.status_code != 404 or error_problem(path, r.json()):
                    problems.append(f"POST {path}: {r.status_code} {r.text[:200]}")
    assert not problems, "\n".join(problems)


def _chunked(data: bytes):
    async def gen():
        for i in range(0, len(data), 256):
            yield data[i:i + 256]
    return gen()


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
async def test_body_over_limit_is_413(models_dir, path):
    big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 4096}], "stream": False,
           "options": {"num_predict": 1}, "max_tokens": 1}
    raw = json.dumps(big).encode()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            d = await start_daemon(nursery, models_dir, max_body_bytes=1024)
            try:
                async with httpx.AsyncClient(base_url=d.url, timeout=10) as c:
                    for label, kw in (("content-length", {"content": raw}),
                                      ("chunked", {"content": _chunked(raw)})):
                        r = await c.post(path, headers={"content-type": "application/json"}, **kw)
                        assert r.status_code == 413, (label, r.status_code, r.text[:200])
                        obj = r.json()
                        assert error_problem(path, obj) is None, (label, obj)
                        if path.startswith("/v1/"):
                            assert obj["error"]["code"] == "payload_too_large", obj
                    # a body under the limit is still served
                    small = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": False,
                             "options": {"num_predict": 1}, "max_tokens": 1}
                    r = await c.post(path, json=small)
                    assert r.status_code == 200, r.text[:200]
            finally:
                d.shutdown.set()
