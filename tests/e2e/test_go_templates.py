"""An Ollama Go template in a Modelfile, end to end: translated, it prompts the model exactly as
the equivalent Jinja template does; one that cannot be translated is a 400 at create."""

from __future__ import annotations

from pathlib import Path

import httpx
import trio

from mlxserve.testing import tinymodel

CHATML_GO = (Path(__file__).parents[1] / "specs" / "data" / "gotemplates" / "chatml.gotmpl").read_text()
MSGS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there"},
    {"role": "user", "content": "The capital of France?"},
]


async def test_a_go_template_prompts_as_its_jinja_twin(daemon):
    with trio.fail_after(300):  # creates and two loads on a busy machine
        async with httpx.AsyncClient(base_url=daemon.url, timeout=240) as c:
            for name, template in (("go", CHATML_GO), ("jinja", tinymodel.CHATML)):
                r = await c.post(
                    "/api/create", json={"model": name, "from": "tiny", "template": template, "stream": False}
                )
                assert r.status_code == 200, r.text
            show = (await c.post("/api/show", json={"model": "go"})).json()
            answers = [
                (
                    await c.post(
                        "/api/chat",
                        json={
                            "model": m,
                            "messages": MSGS,
                            "stream": False,
                            "options": {"temperature": 0, "num_predict": 8},
                        },
                    )
                ).json()
                for m in ("go", "jinja")
            ]
            bad = await c.post(
                "/api/create",
                json={"model": "bad", "from": "tiny", "stream": False, "template": '{{ template "other" . }}'},
            )
    assert show["template"] == CHATML_GO  # shown as written, as Ollama shows it
    go, jinja = answers
    assert go["prompt_eval_count"] == jinja["prompt_eval_count"] > 10
    assert go["message"]["content"] == jinja["message"]["content"]
    assert bad.status_code == 400 and "does not translate" in bad.json()["error"]
