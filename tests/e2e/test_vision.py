"""Images in, through every dialect, on the tiny random LLaVA (mlxserve.testing.tinyvision)
imported with create: the image reaches the model (greedy answers differ per image, the prompt
grows by the image's tokens), it batches with text, and a client that leaves frees its slot."""

from __future__ import annotations

import base64
import os
import shutil

import httpx
import pytest
import trio

pytest.importorskip("mlx_vlm")

from support import leave_when, start_daemon  # noqa: E402

from mlxserve.testing import tinyvision  # noqa: E402

LLAVA = "llava:latest"
RED = base64.b64encode(tinyvision.png((255, 0, 0))).decode()
BLUE = base64.b64encode(tinyvision.png((0, 0, 255), stripes=True)).decode()
GREEDY = {"temperature": 0, "num_predict": 8, "repeat_penalty": 1.0}


@pytest.fixture(scope="module")
def vision_store(tmp_path_factory, tiny_store_template):
    from mlxserve.store.store import Store

    root = tmp_path_factory.mktemp("vision-store")
    shutil.copytree(tiny_store_template, root, dirs_exist_ok=True, copy_function=os.link, symlinks=True)
    src = tinyvision.write_llava_dir(tmp_path_factory.mktemp("llava-src"))
    # Greedy by default: the Anthropic SDK has no temperature to send.
    Store(root).create("llava", f"FROM {src}\nPARAMETER temperature 0\nPARAMETER repeat_penalty 1.0\n", base_dir=root)
    return root


@pytest.fixture
async def vdaemon(tmp_path, vision_store):
    dst = tmp_path / "models"
    shutil.copytree(vision_store, dst, copy_function=os.link, symlinks=True)
    async with trio.open_nursery() as nursery:
        d = await start_daemon(nursery, dst)
        yield d
        d.shutdown.set()


def chat(images=None, text="What is this?", **options):
    msg = {"role": "user", "content": text, **({"images": images} if images is not None else {})}
    return {"model": "llava", "messages": [msg], "stream": False, "options": {**GREEDY, **options}}


async def test_show_and_tags_report_vision(vdaemon):
    with trio.fail_after(30):
        async with httpx.AsyncClient(base_url=vdaemon.url, timeout=30) as c:
            show = (await c.post("/api/show", json={"model": "llava"})).json()
            tiny = (await c.post("/api/show", json={"model": "tiny"})).json()
            tags = {m["name"]: m for m in (await c.get("/api/tags")).json()["models"]}
    assert "vision" in show["capabilities"] and "completion" in show["capabilities"]
    assert "vision" not in tiny["capabilities"]
    assert "vision" in tags[LLAVA]["capabilities"]
    assert show["details"]["family"] == "llava"


async def test_ollama_chat_and_generate_see_the_image(vdaemon):
    with trio.fail_after(120):
        async with httpx.AsyncClient(base_url=vdaemon.url, timeout=120) as c:
            red = (await c.post("/api/chat", json=chat([RED]))).json()
            blue = (await c.post("/api/chat", json=chat([BLUE]))).json()
            plain = (await c.post("/api/chat", json=chat())).json()
            gen = [
                (
                    await c.post(
                        "/api/generate",
                        json={
                            "model": "llava",
                            "prompt": "What is this?",
                            "images": [img],
                            "stream": False,
                            "options": GREEDY,
                        },
                    )
                ).json()
                for img in (RED, BLUE)
            ]
    assert red["message"]["content"] != blue["message"]["content"]
    # The template's one placeholder became the image's tokens.
    assert red["prompt_eval_count"] == plain["prompt_eval_count"] + tinyvision.IMAGE_TOKENS
    assert gen[0]["response"] == red["message"]["content"]  # the same prompt either way
    assert gen[1]["response"] == blue["message"]["content"]


async def test_openai_anthropic_and_responses_clients_send_images(vdaemon):
    import anthropic
    import openai

    def calls():
        oa = openai.OpenAI(base_url=f"{vdaemon.url}/v1", api_key="x", max_retries=0)
        an = anthropic.Anthropic(base_url=vdaemon.url, api_key="x", max_retries=0)
        out = {}
        for name, img in (("red", RED), ("blue", BLUE)):
            r = oa.chat.completions.create(
                model="llava",
                temperature=0,
                max_tokens=8,
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What is this?"},
                            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{img}"}},
                        ],
                    }
                ],
            )
            m = an.messages.create(
                model="llava",
                max_tokens=8,
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": img}},
                            {"type": "text", "text": "What is this?"},
                        ],
                    }
                ],
            )
            rs = oa.responses.create(
                model="llava",
                temperature=0,
                max_output_tokens=8,
                input=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "input_text", "text": "What is this?"},
                            {"type": "input_image", "image_url": f"data:image/png;base64,{img}"},
                        ],
                    }
                ],
            )
            out[name] = (
                r.choices[0].message.content,
                r.usage.prompt_tokens,
                m.content[0].text,
                m.usage.input_tokens,
                rs.output_text,
                rs.usage.input_tokens,
            )
        plain = oa.chat.completions.create(
            model="llava", temperature=0, max_tokens=8, messages=[{"role": "user", "content": "What is this?"}]
        )
        return out, plain

    with trio.fail_after(180):
        out, plain = await trio.to_thread.run_sync(calls)
    red, blue = out["red"], out["blue"]
    # All three dialects render the same prompt: the same greedy answer for one image.
    assert red[0] == red[2] == red[4] and blue[0] == blue[2] == blue[4]
    assert red[0] != blue[0]
    assert red[1] == red[3] == red[5] == plain.usage.prompt_tokens + tinyvision.IMAGE_TOKENS


async def test_image_batches_with_a_text_request(vdaemon):
    text = {"model": "llava", "prompt": "Hello world", "stream": False, "options": {**GREEDY, "num_predict": 24}}
    image = chat([RED], num_predict=24)
    with trio.fail_after(120):
        async with httpx.AsyncClient(base_url=vdaemon.url, timeout=120) as c:
            alone = [(await c.post("/api/generate", json=text)).json(), (await c.post("/api/chat", json=image)).json()]
            together: dict = {}

            async def send(key, path, body):
                together[key] = (await c.post(path, json=body)).json()

            runner = await vdaemon.runner(LLAVA)
            async with trio.open_nursery() as n:
                n.start_soon(send, "text", "/api/generate", text)
                n.start_soon(send, "image", "/api/chat", image)
                await runner.wait_until(lambda s: s.running == 2)  # both in the batch at once
    assert together["text"]["response"] == alone[0]["response"]
    assert together["image"]["message"]["content"] == alone[1]["message"]["content"]


async def test_leaving_a_vision_request_frees_its_slot(vdaemon):
    body = {**chat([RED], num_predict=1500), "stream": True}
    with trio.fail_after(90):
        async with httpx.AsyncClient(base_url=vdaemon.url, timeout=60) as c:
            await c.post("/api/generate", json={"model": "llava"})
            runner = await vdaemon.runner(LLAVA)
            await leave_when(c, runner, ("/api/chat", body), lambda s: s.running == 1)
            await runner.wait_until(lambda s: s.running == 0)
    _, finish, stats = runner.finished()[-1]
    assert finish == "cancelled" and stats.generated_tokens < 750


@pytest.mark.parametrize(
    "path,body,message",
    [
        (
            "/api/chat",
            {"model": "tiny", "messages": [{"role": "user", "content": "x", "images": [RED]}]},
            "does not support images",
        ),
        (
            "/api/chat",
            {"model": "llava", "messages": [{"role": "user", "content": "x", "images": ["bm90IGFuIGltYWdl"]}]},
            "is not a PNG, JPEG, GIF, WebP or BMP image",
        ),
        ("/api/generate", {"model": "llava", "prompt": "x", "images": ["%%%"]}, "not valid base64"),
        ("/api/generate", {"model": "llava", "prompt": "x", "images": "abc"}, "must be a list of base64 strings"),
        (
            "/v1/chat/completions",
            {
                "model": "llava",
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}],
                    }
                ],
            },
            "not fetched",
        ),
        (
            "/v1/chat/completions",
            {
                "model": "tiny",
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{RED}"}}],
                    }
                ],
            },
            "images are not supported",
        ),
        (
            "/v1/messages",
            {
                "model": "llava",
                "max_tokens": 4,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}],
                    }
                ],
            },
            "not fetched",
        ),
        (
            "/v1/responses",
            {"model": "llava", "input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]},
            "file_id is not supported",
        ),
    ],
)
async def test_bad_images_are_400s(vdaemon, path, body, message):
    with trio.fail_after(60):
        async with httpx.AsyncClient(base_url=vdaemon.url, timeout=60) as c:
            r = await c.post(path, json={**body, "stream": False})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert message in (err if isinstance(err, str) else err["message"])
