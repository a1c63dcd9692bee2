"""The path of one generation request, shared by the Ollama and OpenAI routes.

resolve name -> merge options -> acquire a runner lease (may load) -> render and tokenize the
prompt -> submit -> stream chunks. Every await here is a place the request may end: the lease is
released and the sequence cancelled in ``finally`` blocks that do only synchronous work.
"""

from __future__ import annotations

import functools
import math
import time
import uuid
from datetime import UTC
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

import attrs
import trio
from quart import request

from ..actors.metrics import MetricsHandle
from ..actors.runner import RunnerHandle
from ..actors.scheduler import Lease, LoadSpec
from ..actors.sequence import (
    ANY_JSON_OBJECT,
    Chunk,
    LogprobEntry,
    SamplingParams,
    SequenceRequest,
    TokenizerInfo,
    grammar_for_schema,
)
from ..errors import BadRequest, EngineError, Unprocessable
from ..specs import templates, thinking, tools as tool_specs
from ..specs.modelspec import ModelSpec, Options

if TYPE_CHECKING:
    from ..actors.runtime import Runtime
    from ..store.store import ResolvedModel

Message = dict[str, Any]  # a chat message as the templates read it
Tool = dict[str, Any]  # a tool in Ollama's shape (specs/tools.py normalizes every dialect's)

DEFAULT_NUM_CTX = 4096
IMAGES_UNSUPPORTED = "images are not supported by this model"
MAX_IMAGE_BYTES = 20 * 1024 * 1024  # one decoded image; the request body's own cap comes first
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # a small file can still decode to gigabytes


def image_bytes(data: Any, where: str) -> bytes:
    """A base64 image (bare, or a ``data:image/...;base64,`` URL) -> its bytes: PNG, JPEG, GIF,
    WebP or BMP, else a 400. Nothing is fetched: any other URL is refused."""
    import base64
    import binascii

    if not isinstance(data, str) or not data:
        raise BadRequest(f"{where} must be a base64 string")
    if data.startswith("data:"):
        head, sep, data = data.partition(",")
        if not sep or not head.endswith(";base64"):
            raise BadRequest(f"{where} must be a base64 data URL (data:image/png;base64,...)")
    elif data.startswith(("http://", "https://", "file:")):
        raise BadRequest(f"{where}: image URLs are not fetched; send the image as base64 (a data URL)")
    if len(data) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise BadRequest(f"{where} is larger than {MAX_IMAGE_BYTES >> 20} MiB")
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{where} is not valid base64") from None
    # Headers and checksums only (no decoding): a broken image is this request's 400, never a
    # failure in the engine.
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as img:
            kind, (width, height) = img.format, img.size
            img.verify()
    except Exception:
        kind = None
    if kind not in IMAGE_FORMATS:
        raise BadRequest(f"{where} is not a PNG, JPEG, GIF, WebP or BMP image")
    if width * height > MAX_IMAGE_PIXELS:
        raise BadRequest(f"{where} is {width}x{height} pixels, more than {MAX_IMAGE_PIXELS >> 20} megapixels")
    return raw


def _with_image_parts(msg: Message) -> Message:
    """A message with images as the content parts vision chat templates read (an image part per
    image, then the text); the bytes themselves go to the engine, not the template."""
    if "images" not in msg:
        return msg
    out = {k: v for k, v in msg.items() if k != "images"}
    if msg["images"]:
        out["content"] = [{"type": "image"} for _ in msg["images"]] + [
            {"type": "text", "text": msg.get("content") or ""}
        ]
    return out


@attrs.define
class Generation:
    name: str
    lease: Lease[RunnerHandle]
    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams
    stop: tuple[str, ...]
    logprobs: int | None
    keep_alive: float
    t_start: float
    load_ns: int
    metrics: MetricsHandle
    seq_id: int | None = None
    recv: trio.MemoryReceiveChannel[Chunk] | None = None  # set by the submit
    # filled while streaming
    text: list[str] = attrs.Factory(list)
    token_ids: list[int] = attrs.Factory(list)
    logprob_entries: list[LogprobEntry] = attrs.Factory(list)
    final: Chunk | None = None
    # thinking: the splitter (None: none is done), the reasoning so far, and whether it is shown
    splitter: thinking.Splitter | None = None
    thinking: list[str] = attrs.Factory(list)
    show_thinking: bool = False
    think_budget: int | None = None  # a cap on reasoning tokens (Anthropic's budget_tokens)
    thinking_tokens: int = 0
    raw_chars: int = 0  # characters the engine sent, reasoning and tags included
    markers: dict[int, str] = attrs.Factory(dict)  # special tokens written back into the text

    @property
    def tokenizer(self) -> TokenizerInfo:
        return tokenizer_of(self.lease.handle)

    route: str = ""
    request_id: str = ""
    client: str = ""
    queue_wait_ns: int = 0
    t_first: float | None = None
    _recorded: bool = False

    def record(self, status: int, error: str | BaseException | None = None) -> None:
        """One metrics event and request-log line per request (the first call wins)."""
        if isinstance(error, BaseException):
            error.recorded = True  # type: ignore[attr-defined]  # the app's error handler must not count it again
            error = str(error)
        if self._recorded:
            return
        self._recorded = True
        d = self.durations()
        stats = self.final.stats if self.final is not None else None
        self.metrics.record_nowait(
            "request",
            id=self.request_id,
            route=self.route,
            model=self.name,
            status=status,
            done_reason=self.final.finish if self.final is not None else "cancelled",
            error=error,
            client=self.client,
            queue_wait_ns=self.queue_wait_ns,
            ttft_ns=int((self.t_first - self.t_start) * 1e9) if self.t_first else None,
            cached_tokens=stats.cached_tokens if stats else 0,
            **d,
        )

    def release(self) -> None:
        if self.seq_id is not None:
            self.lease.handle.cancel_nowait(self.seq_id)
        self.lease.release(self.keep_alive)

    def durations(self) -> dict[str, int]:
        s = self.final.stats if self.final is not None else None
        return {
            "total_duration": int((time.perf_counter() - self.t_start) * 1e9),
            "load_duration": self.load_ns,
            "prompt_eval_count": s.prompt_tokens if s else len(self.prompt_ids),
            "prompt_eval_duration": s.prompt_ns if s else 0,
            "eval_count": s.generated_tokens if s else len(self.token_ids),
            "eval_duration": s.eval_ns if s else 0,
        }

    @property
    def done_reason(self) -> str:
        return self.final.finish if self.final is not None and self.final.finish else "stop"


def tokenizer_of(handle: RunnerHandle) -> TokenizerInfo:
    if handle.tokenizer is None:  # the Runner gives every handle its model's tokenizer
        raise EngineError(f"model '{handle.key}' has no tokenizer")
    return handle.tokenizer


def merge_options(spec_params: Options | None, request_options: dict[str, Any] | None) -> Options:
    if request_options is not None and not isinstance(request_options, dict):
        raise BadRequest("options must be an object")
    base = spec_params or Options()
    return base.merged(Options.from_dict(request_options or {}))


def sampling_from(opts: Options, *, logit_bias: dict[int, float] | None = None) -> SamplingParams:
    d = SamplingParams()

    def pick(v: float | None, default: float) -> float:
        return default if v is None else v

    return SamplingParams(
        temperature=float(pick(opts.temperature, d.temperature)),
        top_k=int(pick(opts.top_k, d.top_k)),
        top_p=float(pick(opts.top_p, d.top_p)),
        min_p=float(pick(opts.min_p, d.min_p)),
        typical_p=float(pick(opts.typical_p, d.typical_p)),
        repeat_penalty=float(pick(opts.repeat_penalty, d.repeat_penalty)),
        repeat_last_n=int(pick(opts.repeat_last_n, d.repeat_last_n)),
        presence_penalty=float(pick(opts.presence_penalty, d.presence_penalty)),
        frequency_penalty=float(pick(opts.frequency_penalty, d.frequency_penalty)),
        seed=opts.seed,
        logit_bias=logit_bias,
    )


def details(spec: ModelSpec) -> dict[str, Any]:
    """Ollama's "details" object for a model."""
    return spec.details()


def kv_estimate(spec: ModelSpec, ctx: int, sequences: int) -> int:
    """K and V for every layer, a full batch at the context window, 4-byte floats (the CPU path
    runs f32); 0 when the model's shape is unknown."""
    info = spec.model_info or {}
    arch = spec.family or "llama"

    def positive(v: Any) -> int | None:
        return v if isinstance(v, int) and v > 0 else None

    layers = positive(info.get(f"{arch}.block_count"))
    hidden = positive(info.get(f"{arch}.embedding_length"))
    heads = positive(info.get(f"{arch}.attention.head_count"))
    kv_heads = positive(info.get(f"{arch}.attention.head_count_kv", heads))
    if layers is None or hidden is None or heads is None or kv_heads is None:
        return 0
    # gemma, qwen3 and gpt-oss heads are not hidden / heads wide: GGUF says so in key/value_length
    k_dim = info.get(f"{arch}.attention.key_length") or hidden // heads
    v_dim = info.get(f"{arch}.attention.value_length") or k_dim
    return int(layers * kv_heads * (k_dim + v_dim) * ctx * 4 * sequences)


def load_spec(resolved: ResolvedModel, num_ctx: int | None, num_parallel: int = 1) -> LoadSpec:
    spec = resolved.spec
    ctx = num_ctx or min(spec.context_length or DEFAULT_NUM_CTX, DEFAULT_NUM_CTX)
    return LoadSpec(
        kv_bytes=kv_estimate(spec, ctx, num_parallel),
        key=f"{resolved.digest}|ctx={ctx}",
        name=resolved.display,
        digest=resolved.digest,
        size=resolved.size,
        num_ctx=ctx,
        details=details(spec),
        resolved=resolved,
    )


async def acquire(
    rt: Runtime, resolved: ResolvedModel, opts: Options, keep_alive: float
) -> tuple[Lease[RunnerHandle], int]:
    t0 = time.perf_counter()
    spec = load_spec(resolved, opts.num_ctx, rt.settings.num_parallel)
    lease = await rt.scheduler.acquire_as(RunnerHandle, spec, keep_alive)
    waited = time.perf_counter() - t0
    load_seconds = lease.handle.load_seconds
    # Report load time only to the requests that actually waited for that load.
    load_ns = int(min(waited, load_seconds) * 1e9) if waited > 0.05 else 0
    return lease, load_ns


MIN_CHARS_PER_TOKEN = 16


def prompt_char_limit(tok: TokenizerInfo, context_length: int) -> int:
    """More characters than this cannot fit ``context_length`` tokens, whatever they say: such a
    prompt is refused (or cut) before it is tokenized, and renders stop at twice this."""
    return context_length * max(MIN_CHARS_PER_TOKEN, int(tok.max_token_chars))


def _too_many_chars(n: int, context_length: int) -> Unprocessable:
    return Unprocessable(
        f"prompt is {n} characters, more than the context window of {context_length} "
        f"tokens can hold; raise num_ctx or shorten the prompt"
    )


def _chat_messages(resolved: ResolvedModel, messages: list[Message]) -> list[Message]:
    spec = resolved.spec
    msgs: list[Message] = list(spec.messages or []) + list(messages)
    if spec.system and not any(m.get("role") == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": spec.system})
    return msgs


def chat_template(resolved: ResolvedModel, tok: TokenizerInfo) -> str:
    """The template a model's prompts are rendered with. The Go template of a model pulled from
    an Ollama registry gives way to the GGUF's own Jinja one when it has one; any other Go
    template (a Modelfile's) is translated (specs/gotemplate.py)."""
    template = resolved.spec.template
    if template and tok.chat_template and _pulled_from_ollama(resolved) and templates.is_go_template(template):
        return tok.chat_template
    return template or tok.chat_template or templates.CHATML_TEMPLATE


def _pulled_from_ollama(resolved: ResolvedModel) -> bool:
    from ..store.manifest import SPEC_MEDIA_TYPE

    config = (getattr(resolved, "manifest", None) or {}).get("config") or {}
    return bool(config.get("mediaType", SPEC_MEDIA_TYPE) != SPEC_MEDIA_TYPE)


@attrs.define
class _Renderer:
    """One request's chat template and what every render of it needs."""

    template: str
    bos_token: str
    eos_token: str
    max_chars: int
    variables: dict[str, Any] = attrs.Factory(dict)  # enable_thinking, reasoning_effort

    @classmethod
    def of(
        cls,
        resolved: ResolvedModel,
        tok: TokenizerInfo,
        max_chars: int = templates.DEFAULT_MAX_CHARS,
        variables: dict[str, Any] | None = None,
    ) -> _Renderer:
        return cls(
            chat_template(resolved, tok), tok.bos_token or "", tok.eos_token or "", max_chars, dict(variables or {})
        )

    def __call__(self, msgs: list[Message], tools: list[Tool] | None = None) -> str:
        msgs = [_with_image_parts(m) for m in msgs]
        return templates.render_chat(
            self.template,
            msgs,
            add_generation_prompt=True,
            tools=tools,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            max_chars=self.max_chars,
            **self.variables,
        )

    def renders_tools(self, msgs: list[Message], tools: list[Tool]) -> bool:
        """Whether the template writes ``tools`` at all, tried on the messages never dropped."""
        probe = [m for m in msgs[:-1] if m.get("role") == "system"] + msgs[-1:]
        return self(probe, tools) != self(probe)


def _encode_rendered(tok: TokenizerInfo, text: str) -> list[int]:
    ids = tok.encode(text, add_bos=False)
    if tok.bos_token_id is not None and tok.add_bos and (not ids or ids[0] != tok.bos_token_id):
        ids.insert(0, tok.bos_token_id)
    return ids


def fit_chat(
    resolved: ResolvedModel,
    tok: TokenizerInfo,
    messages: list[Message],
    tools: list[Tool] | None,
    context_length: int,
    *,
    truncate: bool = False,
    variables: dict[str, Any] | None = None,
) -> list[int]:
    """The conversation's prompt ids. As Ollama, when it overflows the window the oldest
    non-system messages (never the last one) are dropped until it fits, leaving room to answer.

    The fewest messages to drop is found by bisection: O(log n) renders, none of them longer
    than the window could hold, so a conversation of thousands of turns costs a dozen renders.
    A template that ignores ``tools`` gets them as a system message (``with_tool_prompt``).
    Blocking: runs on a worker thread.
    """
    limit = prompt_char_limit(tok, context_length)
    render = _Renderer.of(resolved, tok, max_chars=2 * limit, variables=variables)
    msgs = _chat_messages(resolved, messages)
    if truncate and msgs:  # generate's truncate: keep the end, as for a raw prompt
        msgs[-1] = {**msgs[-1], "content": (msgs[-1].get("content") or "")[-limit:]}
    kept = [m for m in msgs[:-1] if m.get("role") == "system"] + msgs[-1:]
    kept_chars = sum(len(m.get("content") or "") for m in kept)
    if kept_chars > limit and not truncate:
        raise _too_many_chars(kept_chars, context_length)
    if tools and not render.renders_tools(msgs, tools):
        msgs, tools = tool_specs.with_tool_prompt(msgs, tools), None
    first = len(msgs) - len(messages)  # the model's own messages are never dropped
    droppable = [i for i in range(max(first, 0), len(msgs) - 1) if msgs[i].get("role") != "system"]

    def without(k: int) -> list[Message]:
        gone = set(droppable[:k])
        return [m for i, m in enumerate(msgs) if i not in gone]

    def fitting(k: int) -> list[int] | None:
        try:
            text = render(without(k), tools)
        except templates.RenderTooLong:
            return None
        if len(text) > limit:
            return None
        ids = _encode_rendered(tok, text)
        return ids if len(ids) < context_length else None

    ids = fitting(0)
    if ids is None:  # the fewest dropped that fits: fewer messages never make a longer prompt
        lo, hi = 1, len(droppable)
        while lo <= hi:
            mid = (lo + hi) // 2
            found = fitting(mid)
            if found is None:
                lo = mid + 1
            else:
                ids, hi = found, mid - 1
    if ids is not None:
        return ids
    # Nothing fits: the shortest prompt goes on, and budget() or truncation decides.
    try:
        text = render(without(len(droppable)), tools)
    except templates.RenderTooLong:
        if kept_chars > limit:
            raise _too_many_chars(kept_chars, context_length) from None
        raise
    if len(text) > limit and not truncate:
        raise _too_many_chars(len(text), context_length)
    return _encode_rendered(tok, text)


def raw_prompt_ids(
    tok: TokenizerInfo, text: str, context_length: int, *, add_bos: bool | None, truncate: bool = False
) -> list[int]:
    """A raw prompt's ids; one too long to fit is refused, or cut to its end, before the whole
    of it is tokenized. Blocking: runs on a worker thread."""
    limit = prompt_char_limit(tok, context_length)
    if len(text) > limit:
        if not truncate:
            raise _too_many_chars(len(text), context_length)
        text = text[-limit:]
    return tok.encode(text, add_bos=add_bos)


def budget(prompt_len: int, context_length: int, num_predict: int | None, cap: int | None = None) -> int:
    room = context_length - prompt_len
    if room <= 0:
        raise Unprocessable(
            f"prompt is {prompt_len} tokens, which does not fit the context window of "
            f"{context_length} tokens; raise num_ctx or shorten the prompt"
        )
    n = room if num_predict is None or num_predict < 0 else min(num_predict, room)
    if cap is not None:
        n = min(n, cap)
    return max(n, 1)


async def start(
    rt: Runtime,
    resolved: ResolvedModel,
    opts: Options,
    keep_alive: float,
    *,
    messages: list[Message] | None = None,
    prompt_text: str | None = None,
    images: list[str] | None = None,
    prompt_ids: list[int] | None = None,
    tools: list[Tool] | None = None,
    logprobs: int | None = None,
    logit_bias: dict[int, float] | None = None,
    max_tokens: int | None = None,
    prefix_ids: list[int] | None = None,
    truncate: bool = False,
    grammar: str | None = None,
    split_thinking: bool = False,
    think: thinking.Think = None,
    think_budget: int | None = None,
    think_strict: bool = True,
) -> Generation:
    """Acquire, render, tokenize and submit. The caller must ``release()`` the result.

    With ``split_thinking`` the answer's reasoning is taken apart from its text (see
    specs/thinking.py): ``think`` is the request's wish, the template decides what it can do
    (asking a model that cannot think is a 400 only when ``think_strict``)."""
    t_start = t_acquire = time.perf_counter()
    # ``images``: a raw prompt's; a message's own are under its "images" key (base64 or data URLs).
    images = list(images or []) + [i for m in messages or () for i in m.get("images") or ()]
    if images and "vision" not in (resolved.spec.capabilities or ()):
        raise BadRequest(f'"{resolved.display}" does not support images ({IMAGES_UNSUPPORTED})')
    image_data = [image_bytes(x, f"image {k + 1}") for k, x in enumerate(images)]
    lease, load_ns = await acquire(rt, resolved, opts, keep_alive)
    queue_wait_ns = int((time.perf_counter() - t_acquire) * 1e9)
    try:
        tok = tokenizer_of(lease.handle)
        ctx = lease.handle.context_length
        think_plan = (
            thinking.plan(chat_template(resolved, tok), think, resolved.display, strict=think_strict)
            if split_thinking
            else None
        )
        if prompt_ids is None:
            # Rendering and tokenizing take time in proportion to the input: off the event loop.
            work: Callable[[], list[int]]
            if messages is not None:
                work = functools.partial(
                    fit_chat,
                    resolved,
                    tok,
                    messages,
                    tools,
                    ctx,
                    truncate=truncate,
                    variables=think_plan.template_vars if think_plan else None,
                )
            else:
                work = functools.partial(
                    raw_prompt_ids,
                    tok,
                    prompt_text or "",
                    ctx,
                    add_bos=None if not prefix_ids else False,
                    truncate=truncate,
                )
            prompt_ids = await trio.to_thread.run_sync(work, abandon_on_cancel=True)
            if prefix_ids:  # Ollama's "context": the earlier conversation's token ids
                check_token_ids(prefix_ids, tok.vocab_size, "context")
                prompt_ids = list(prefix_ids) + prompt_ids
        if not prompt_ids:
            raise BadRequest("prompt is empty after tokenization")
        check_token_ids(prompt_ids, tok.vocab_size, "prompt")
        if truncate and len(prompt_ids) >= lease.handle.context_length:
            prompt_ids = prompt_ids[-(lease.handle.context_length - 1) :]
        check_logit_bias(logit_bias, tok.vocab_size)
        n = budget(
            len(prompt_ids), lease.handle.context_length, max_tokens if max_tokens is not None else opts.num_predict
        )
        gen = Generation(
            name=resolved.display,
            lease=lease,
            prompt_ids=list(prompt_ids),
            max_tokens=n,
            params=sampling_from(opts, logit_bias=logit_bias),
            stop=tuple(opts.stop or ()),
            logprobs=logprobs,
            keep_alive=keep_alive,
            t_start=t_start,
            load_ns=load_ns,
            metrics=rt.metrics,
            route=request.path,
            request_id=uuid.uuid4().hex[:16],
            client=request.remote_addr or "",
            queue_wait_ns=queue_wait_ns,
        )
        if split_thinking or tools:
            gen.markers = marker_tokens(tok)
        if think_plan is not None:
            # Whether the answer starts inside the reasoning is in the prompt's last few tokens.
            gen.splitter = think_plan.splitter(tok.decode(gen.prompt_ids[-8:], skip_special=False))
            gen.show_thinking, gen.think_budget = think_plan.show, think_budget
        gen.seq_id, gen.recv = lease.handle.submit_nowait(
            SequenceRequest(
                prompt_ids=gen.prompt_ids,
                max_tokens=n,
                params=gen.params,
                stop=gen.stop,
                logprobs=logprobs,
                grammar=grammar,
                images=tuple(image_data),
            )
        )
    except BaseException:
        lease.release(keep_alive)
        raise
    return gen


def marker_tokens(tok: TokenizerInfo) -> dict[int, str]:
    """The tokens that open or close reasoning or a tool call which this tokenizer holds as
    special, so that decoding drops them (Mistral's [TOOL_CALLS], Llama 3's <|python_tag|>...):
    their ids and text."""
    out: dict[int, str] = {}
    for text in (thinking.OPEN, thinking.CLOSE, *tool_specs.MARKER_TOKENS):
        i = tok.tokenizer.token_to_id(text)
        if i is not None and tok.decode([i]) == "":
            out[i] = text
    return out


def _with_markers(gen: Generation, chunk: Chunk) -> Chunk:
    """The chunk with its marker tokens written back, when its text is its tokens' alone (a
    chunk that completes a character begun in the one before is left as it is)."""
    if not any(t in gen.markers for t in chunk.token_ids):
        return chunk
    tok = gen.tokenizer
    if tok.decode(chunk.token_ids) != chunk.text:
        return chunk
    parts: list[str] = []
    run: list[int] = []
    for t in chunk.token_ids:
        if t in gen.markers:
            parts += [tok.decode(run), gen.markers[t]]
            run = []
        else:
            run.append(t)
    return attrs.evolve(chunk, text="".join(parts) + tok.decode(run))


@attrs.frozen
class Piece(Chunk):
    """A chunk whose ``text`` is answer only; ``thinking`` is the reasoning it carried (empty
    when the request does not see reasoning)."""

    thinking: str = ""


def _split(gen: Generation, splitter: thinking.Splitter, chunk: Chunk) -> Piece:
    """The chunk's text taken apart into reasoning and answer; at the reasoning budget the
    sequence ends as if at its token limit."""
    was_thinking = splitter.thinking
    thought, said = splitter.feed(chunk.text)
    finish = chunk.finish
    if was_thinking:
        gen.thinking_tokens += len(chunk.token_ids)
    if (
        finish is None
        and gen.think_budget is not None
        and splitter.thinking
        and gen.thinking_tokens >= gen.think_budget
    ):
        if gen.seq_id is not None:
            gen.lease.handle.cancel_nowait(gen.seq_id)
        gen.seq_id, finish = None, "length"
    if finish is not None:
        more_thought, more_said = splitter.finish()
        thought, said = thought + more_thought, said + more_said
    if not gen.show_thinking:
        thought = ""
    gen.thinking.append(thought)
    return Piece(**{**attrs.asdict(chunk, recurse=False), "text": said, "finish": finish}, thinking=thought)


async def chunks(gen: Generation) -> AsyncIterator[Chunk]:
    """Yields the engine's chunks (``Piece``s when thinking is split); the last one carries
    ``finish``. Raises EngineError on failure."""
    recv = gen.recv
    assert recv is not None, "chunks() of a generation not yet submitted"
    async with recv:
        async for chunk in recv:
            if chunk.finish in ("error", "cancelled"):  # the requester did not ask for this
                gen.final = chunk
                raise EngineError(chunk.error or "generation failed")
            if gen.t_first is None and chunk.token_ids:
                gen.t_first = time.perf_counter()
            gen.raw_chars += len(chunk.text)
            if gen.markers:
                chunk = _with_markers(gen, chunk)
            if gen.splitter is not None:
                chunk = _split(gen, gen.splitter, chunk)
            gen.text.append(chunk.text)
            gen.token_ids.extend(chunk.token_ids)
            if chunk.logprobs:
                gen.logprob_entries.extend(chunk.logprobs)
            if chunk.finish is not None:
                gen.final = chunk
            yield chunk
            if chunk.finish is not None:
                return
    raise EngineError("the model stopped before finishing this request")


def now_iso() -> str:
    from datetime import datetime

    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def grammar_for_format(fmt: Any) -> str | None:
    """Ollama's ``format``: "json" (any JSON object) or a JSON schema; "" or None: free text."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return grammar_for_schema(ANY_JSON_OBJECT)
    if isinstance(fmt, dict):
        return grammar_for_schema(fmt)
    raise BadRequest('format must be "json" or a JSON schema object')


def token_text(tok: TokenizerInfo, token_id: int) -> str:
    return tok.decode([token_id], skip_special=False)


def check_token_ids(ids: Any, vocab_size: int, what: str) -> None:
    """Token ids from a client index the embedding table directly: out of range is a crash."""
    if not isinstance(ids, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in ids
    ):
        raise BadRequest(f"{what} must be a list of token ids between 0 and {vocab_size - 1}")


def check_logit_bias(bias: dict[int, float] | None, vocab_size: int) -> None:
    if bias and not all(0 <= t < vocab_size and math.isfinite(v) for t, v in bias.items()):
        raise BadRequest(f"logit_bias keys must be token ids between 0 and {vocab_size - 1} with finite values")


def check_top_logprobs(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 20:
        raise BadRequest("top_logprobs must be an integer between 0 and 20")
    return n
