"""OpenAI's Responses API: /v1/responses, with stored responses for previous_response_id.

Input items become a chat-completions conversation and run through the chat route's rendering,
constrained decoding (tools, text.format) and batch. Errors are OpenAI's shape (the app's /v1/
error handlers).
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict

import attrs
from quart import Blueprint, current_app, request

from ..actors.sequence import ANY_JSON_OBJECT, grammar_for_schema
from ..errors import BadRequest, NotFound
from ..specs.tools import CallStream, call_schema
from . import relay
from .common import field, json_body, json_response, runtime
from .openai import reasoning_think, template_call

bp = Blueprint("responses", __name__)
STORE_KEY = "mlxserve.responses"


@attrs.define
class _Stored:
    response: dict
    history: list[dict]  # the conversation so far (input and output), without instructions
    expires: float
    input_items: list[dict] = attrs.Factory(list)  # this request's input, for GET .../input_items


class ResponseStore:
    """Responses kept for previous_response_id and GET: the newest ``max_items``, each for
    ``ttl`` seconds. One per app; only the event loop touches it, so it needs no lock."""

    def __init__(self, max_items: int = 1000, ttl: float = 3600.0, clock=time.monotonic):
        self.max_items, self.ttl, self._clock = max_items, ttl, clock
        self._items: OrderedDict[str, _Stored] = OrderedDict()

    def put(self, response: dict, history: list[dict], input_items: list[dict] | None = None) -> None:
        self._items[response["id"]] = _Stored(response, history, self._clock() + self.ttl, input_items or [])
        self._items.move_to_end(response["id"])
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def get(self, rid: str) -> _Stored:
        now = self._clock()
        while self._items and next(iter(self._items.values())).expires <= now:
            self._items.popitem(last=False)  # oldest first: they expire in insertion order
        found = self._items.get(rid)
        if found is None:
            raise NotFound(f"response '{rid}' not found")
        return found

    def delete(self, rid: str) -> None:
        self.get(rid)
        del self._items[rid]


@bp.record_once
def _own_store(state) -> None:
    state.app.extensions[STORE_KEY] = ResponseStore()


def _store() -> ResponseStore:
    return current_app.extensions[STORE_KEY]


_TEXT_PARTS = {"input_text": "text", "output_text": "text", "text": "text", "refusal": "refusal"}


def _parts_text(content, where: str) -> str:
    return relay.parts_text(content, where, _TEXT_PARTS, ("input_image",))


def _images_apart(content, where: str, role: str) -> tuple:
    """A user message's ``input_image`` parts (data URLs, decoded in generation.start) apart from
    the rest of its content."""
    if role != "user" or not isinstance(content, list):
        return content, []
    rest, images = [], []
    for k, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") == "input_image"):
            rest.append(part)
        elif isinstance(part.get("image_url"), str):
            images.append(part["image_url"])
        else:
            raise BadRequest(f"{where}[{k}]: an input_image needs image_url (a data URL); file_id is not supported")
    return rest, images


def _input(inp) -> list[dict]:
    """input (a string or items) -> chat messages; function calls join the assistant turn."""
    if isinstance(inp, str):
        return [{"role": "user", "content": inp}]
    if not isinstance(inp, list):
        raise BadRequest("input must be a string or an array of input items")
    out: list[dict] = []
    for i, item in enumerate(inp):
        if not isinstance(item, dict):
            raise BadRequest(f"input[{i}] must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            role = {"developer": "system"}.get(item.get("role"), item.get("role"))
            if role not in ("user", "system", "assistant"):
                raise BadRequest(f"input[{i}].role must be user, system, developer or assistant")
            content, images = _images_apart(item.get("content"), f"input[{i}].content", role)
            out.append(
                {
                    "role": role,
                    "content": _parts_text(content, f"input[{i}].content"),
                    **({"images": images} if images else {}),
                }
            )
        elif kind == "function_call":
            call = template_call(
                {
                    "id": item.get("call_id"),
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")},
                },
                i,
            )
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append(
                {
                    "role": "tool",
                    "tool_call_id": item.get("call_id"),
                    "content": _parts_text(item.get("output", ""), f"input[{i}].output"),
                }
            )
        elif kind == "reasoning":
            continue  # no model here reasons: earlier reasoning is not replayed
        else:
            raise BadRequest(f"input[{i}].type '{kind}' is not supported")
    return out


def _tools(body: dict) -> list[dict]:
    return relay.function_tools(body.get("tools"), "function", None, lambda t: t)


def _grammar(body: dict, tools: list[dict]) -> str | None:
    choice = body.get("tool_choice", "auto")
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise BadRequest("tool_choice must be none, auto, required or {type: function, name}")
        return grammar_for_schema(call_schema(tools, choice["name"]))
    if choice not in ("auto", "none", "required"):
        raise BadRequest("tool_choice must be none, auto, required or {type: function, name}")
    if choice == "required":
        if not tools:
            raise BadRequest("tool_choice 'required' needs tools")
        return grammar_for_schema(call_schema(tools))
    fmt = (field(body, "text", dict) or {}).get("format") or {"type": "text"}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        return grammar_for_schema(ANY_JSON_OBJECT)
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise BadRequest("text.format.schema must be a JSON schema object")
        return grammar_for_schema(fmt["schema"])
    if kind != "text":
        raise BadRequest("text.format.type must be text, json_object or json_schema")
    return None


@bp.post("/v1/responses")
async def create():
    body = await json_body()
    name = field(body, "model", str, required=True)
    instructions = field(body, "instructions", str)
    previous = field(body, "previous_response_id", str)
    stored = _store()  # the streamed body runs outside the app's context
    history = stored.get(previous).history if previous else []
    turn = _input(body.get("input"))
    tools = _tools(body)
    grammar = _grammar(body, tools)
    active = tools if body.get("tool_choice", "auto") != "none" else None
    max_tokens = field(body, "max_output_tokens", int)
    if max_tokens is not None and max_tokens < 1:
        raise BadRequest("max_output_tokens must be positive")
    think = reasoning_think({"reasoning": field(body, "reasoning", dict)})
    effort = (body.get("reasoning") or {}).get("effort")
    store = field(body, "store", bool, default=True)
    stream = field(body, "stream", bool, default=False)
    opts = relay.sampling_options(field(body, "temperature", float), field(body, "top_p", float), None)
    conversation = [*history, *turn]
    system = [{"role": "system", "content": instructions}] if instructions else []
    rt = runtime()
    resolved = await rt.store.resolve(name)
    gen = await relay.start(
        rt,
        resolved,
        opts,
        messages=system + conversation,
        tools=active,
        grammar=grammar,
        max_tokens=max_tokens,
        think=think,
        think_strict=False,
    )  # clients send reasoning to every model
    rid, created = f"resp_{uuid.uuid4().hex}", int(time.time())
    msg_id, rs_id = f"msg_{uuid.uuid4().hex}", f"rs_{uuid.uuid4().hex}"

    def response(status: str, output: list[dict], usage: dict | None) -> dict:
        return {
            "id": rid,
            "object": "response",
            "created_at": created,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": instructions,
            "max_output_tokens": max_tokens,
            "model": name,
            "output": output,
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": previous,
            "reasoning": {"effort": effort, "summary": None},
            "store": store,
            "temperature": opts["temperature"],
            "top_p": opts["top_p"],
            "text": body.get("text") or {"format": {"type": "text"}},
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [],
            "truncation": "disabled",
            "usage": usage,
            "user": None,
            "metadata": body.get("metadata") or {},
        }

    def message_item(text: str, status: str = "completed", item_id: str | None = None) -> dict:
        return {
            "id": item_id or msg_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": [] if status != "completed" else [_text_part(text)],
        }

    def reasoning_item(thought: str, status: str = "completed") -> dict:
        return {
            "id": rs_id,
            "type": "reasoning",
            "status": status,
            "summary": [],
            "content": [{"type": "reasoning_text", "text": thought}] if status == "completed" else [],
        }

    def call_item(call: dict) -> dict:
        return {
            "id": f"fc_{uuid.uuid4().hex}",
            "type": "function_call",
            "status": "completed",
            "call_id": f"call_{uuid.uuid4().hex[:24]}",
            "name": call["name"],
            "arguments": json.dumps(call["arguments"], ensure_ascii=False),
        }

    def said_calls(items: list[dict]) -> list[dict]:
        return [
            template_call({"id": o["call_id"], "function": {"name": o["name"], "arguments": o["arguments"]}}, 0)
            for o in items
            if o["type"] == "function_call"
        ]

    def finished(streamed: list[dict] | None = None) -> tuple[dict, list[dict]]:
        """The final response, and the conversation to store with it. ``streamed``: the output
        items as the stream sent them; without, the same items made from the whole answer
        (reasoning, the text before any call, each call)."""
        if streamed is None:
            text, thought = "".join(gen.text), "".join(gen.thinking)
            calls: list[dict] = []
            if active:
                reader = CallStream(active)
                text, calls = reader.feed(text)
                rest, more = reader.finish()
                text, calls = text + rest, calls + more
            if calls and body.get("parallel_tool_calls") is False:
                calls = calls[:1]
            streamed = [reasoning_item(thought)] if thought else []
            streamed += [message_item(text)] if text or not calls else []
            streamed += [call_item(c) for c in calls]
        prompt, out, cached = relay.usage_counts(gen)
        usage = {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": out,
            "output_tokens_details": {"reasoning_tokens": gen.thinking_tokens},
            "total_tokens": prompt + out,
        }
        output = streamed
        shown = "".join(c["text"] for o in output if o["type"] == "message" for c in o["content"])
        said: dict = {"role": "assistant", "content": shown}
        if said_calls(output):
            said["tool_calls"] = said_calls(output)
        status = "incomplete" if gen.done_reason == "length" else "completed"
        final = response(status, output, usage)
        if store:
            stored.put(final, [*conversation, said], _input_items(body.get("input")))
        return final, output

    if not stream:
        await relay.drain_all([gen])
        return json_response(finished()[0])

    seq = iter(range(1 << 62))

    def event(kind: str, **data) -> bytes:
        return relay.sse(kind, {"type": kind, "sequence_number": next(seq), **data})

    async def events(chunks):
        yield event("response.created", response=response("in_progress", [], None))
        yield event("response.in_progress", response=response("in_progress", [], None))
        # Output items stream in their order: reasoning and text as they come, each function
        # call as it completes (specs/tools.CallStream holds back text that may become a call).
        items: list[dict] = []
        parts: dict[int, list[str]] = {}  # an open item's reasoning or text so far, by index
        calls_in = CallStream(active) if active else None
        single = body.get("parallel_tool_calls") is False

        def open_item(kind: str) -> list[bytes]:
            """The item of ``kind`` to write to: the open one, or a new one after closing it."""
            if items and items[-1]["status"] == "in_progress" and items[-1]["type"] == kind:
                return []
            out, i = close(), len(items)
            parts[i] = []
            if kind == "reasoning":
                item = {**reasoning_item("", "in_progress"), "id": rs_id if i == 0 else f"rs_{uuid.uuid4().hex}"}
                items.append(item)
                return [*out, event("response.output_item.added", output_index=i, item=item)]
            first = not any(o["type"] == "message" for o in items)
            items.append(message_item("", "in_progress", None if first else f"msg_{uuid.uuid4().hex}"))
            ids = {"item_id": items[i]["id"], "output_index": i, "content_index": 0}
            return [
                *out,
                event("response.output_item.added", output_index=i, item=items[i]),
                event("response.content_part.added", **ids, part=_text_part("")),
            ]

        def close() -> list[bytes]:
            if not items or items[-1]["status"] != "in_progress":
                return []
            i, item = len(items) - 1, items[-1]
            text = "".join(parts.pop(i))
            ids = {"item_id": item["id"], "output_index": i, "content_index": 0}
            if item["type"] == "reasoning":
                items[i] = {**reasoning_item(text), "id": item["id"]}
                return [
                    event("response.reasoning_text.done", **ids, text=text),
                    event("response.output_item.done", output_index=i, item=items[i]),
                ]
            items[i] = message_item(text, item_id=item["id"])
            return [
                event("response.output_text.done", **ids, text=text, logprobs=[]),
                event("response.content_part.done", **ids, part=_text_part(text)),
                event("response.output_item.done", output_index=i, item=items[i]),
            ]

        def add(kind: str, text: str) -> list[bytes]:
            if not text:
                return []
            out = open_item(kind)
            i = len(items) - 1
            parts[i].append(text)
            ids = {"item_id": items[i]["id"], "output_index": i, "content_index": 0}
            if kind == "reasoning":
                return [*out, event("response.reasoning_text.delta", **ids, delta=text)]
            return [*out, event("response.output_text.delta", **ids, delta=text, logprobs=[])]

        def add_calls(calls: list[dict]) -> list[bytes]:
            out = []
            for c in calls:
                if single and any(o["type"] == "function_call" for o in items):
                    break
                out += close()
                i, item = len(items), call_item(c)
                items.append(item)
                out += [
                    event(
                        "response.output_item.added",
                        output_index=i,
                        item={**item, "arguments": "", "status": "in_progress"},
                    ),
                    event(
                        "response.function_call_arguments.delta",
                        item_id=item["id"],
                        output_index=i,
                        delta=item["arguments"],
                    ),
                    event(
                        "response.function_call_arguments.done",
                        item_id=item["id"],
                        output_index=i,
                        name=item["name"],
                        arguments=item["arguments"],
                    ),
                    event("response.output_item.done", output_index=i, item=item),
                ]
            return out

        async for c in chunks:
            for e in add("reasoning", getattr(c, "thinking", "")):
                yield e
            text, calls = calls_in.feed(c.text) if calls_in else (c.text, [])
            for e in add("message", text) + add_calls(calls):
                yield e
        text, calls = calls_in.finish() if calls_in else ("", [])
        for e in add("message", text) + add_calls(calls):
            yield e
        if not any(o["type"] in ("message", "function_call") for o in items):
            for e in open_item("message"):  # an empty answer still has its (empty) message
                yield e
        for e in close():
            yield e
        final, _ = finished(items)
        yield event(f"response.{final['status']}", response=final)

    def error_event(exc) -> bytes:
        err = {"message": str(exc), "type": exc.kind, "code": exc.kind, "param": None}
        return event("error", message=str(exc), code=exc.kind, param=None, error=err)

    return relay.sse_response(rt, gen, events, error_event)


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


@bp.get("/v1/responses/<response_id>")
async def retrieve(response_id: str):
    return json_response(_store().get(response_id).response)


_ITEM_ID_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


def _input_items(inp) -> list[dict]:
    """The request's input (already validated by ``_input``) as OpenAI lists it back: items
    with ids, a message's text as input_text parts."""
    out = []
    for item in [{"role": "user", "content": inp}] if isinstance(inp, str) else inp:
        item = {"type": "message", **item}
        if item["type"] == "message":
            if isinstance(item.get("content"), str):
                item["content"] = [{"type": "input_text", "text": item["content"]}]
            item.setdefault("status", "completed")
        item.setdefault("id", f"{_ITEM_ID_PREFIX.get(item['type'], 'item')}_{uuid.uuid4().hex}")
        out.append(item)
    return out


@bp.get("/v1/responses/<response_id>/input_items")
async def input_items(response_id: str):
    """OpenAI's cursor list: ``order`` (desc by default), ``limit`` (1-100, 20), ``after`` an item id."""
    items = _store().get(response_id).input_items
    order = request.args.get("order", "desc")
    if order not in ("asc", "desc"):
        raise BadRequest("order must be asc or desc")
    try:
        limit = int(request.args.get("limit", 20))
    except ValueError:
        raise BadRequest("limit must be an integer between 1 and 100") from None
    if not 1 <= limit <= 100:
        raise BadRequest("limit must be an integer between 1 and 100")
    seq = items if order == "asc" else items[::-1]
    after = request.args.get("after")
    if after is not None:
        at = next((i for i, x in enumerate(seq) if x["id"] == after), None)
        if at is None:
            raise BadRequest(f"after: response '{response_id}' has no input item '{after}'")
        seq = seq[at + 1 :]
    page = seq[:limit]
    return json_response(
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(seq) > limit,
        }
    )


@bp.delete("/v1/responses/<response_id>")
async def delete(response_id: str):
    _store().delete(response_id)
    return json_response({"id": response_id, "object": "response.deleted", "deleted": True})
