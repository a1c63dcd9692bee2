import pytest

from mlxserve.errors import BadRequest
from mlxserve.specs.templates import (
    CHATML_TEMPLATE, LLAMA3_TEMPLATE, check_template, default_template, is_go_template,
    render_chat,
)

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("text", [
    "{{ .Prompt }}",
    "{{- if .System }}<|system|>{{ .System }}{{ end }}",
    "{{ range .Messages }}{{ .Content }}{{ end }}",
    "{{ range $i, $m := .Messages }}{{ $m.Role }}{{ end }}",
    "{{ if $.Tools }}tools{{ end }}",
])
def test_go_templates_are_recognised_and_refused(text):
    assert is_go_template(text)
    with pytest.raises(BadRequest, match="Go templates are not supported"):
        check_template(text)
    with pytest.raises(BadRequest, match="Go templates"):
        render_chat(text, MSGS)


@pytest.mark.parametrize("text", [
    LLAMA3_TEMPLATE, CHATML_TEMPLATE, "{{ range(3) | list }}", "{{ messages[0]['content'] }}",
    "{% if messages %}{{ end_token }}{% endif %}",
])
def test_jinja_is_not_mistaken_for_go(text):
    assert not is_go_template(text)
    check_template(text)


def test_jinja_syntax_error_names_the_line():
    with pytest.raises(BadRequest, match="line 2"):
        check_template("ok\n{% for m in messages %}\n")


def test_chatml_rendering():
    assert render_chat(CHATML_TEMPLATE, MSGS) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert not render_chat(CHATML_TEMPLATE, MSGS, add_generation_prompt=False).endswith(
        "assistant\n")


def test_llama3_rendering_with_bos():
    out = render_chat(LLAMA3_TEMPLATE, MSGS, bos_token="<|begin_of_text|>")
    assert out == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    # An absent BOS renders as nothing, not as "None".
    assert render_chat(LLAMA3_TEMPLATE, MSGS).startswith("<|start_header_id|>")


def test_hf_conventions():
    t = ("{% for m in messages %}{% if m['role'] == 'bad' %}{{ raise_exception('no bad roles') }}"
         "{% endif %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m | tojson }}{% endfor %}"
         "{% generation %}[{{ strftime_now('%Y') | length }}]{% endgeneration %}"
         "{{ tools | length if tools else 0 }}")
    out = render_chat(t, [{"role": "user", "content": "é"}, {"role": "x", "content": "y"}],
                      tools=[{"name": "f"}])
    assert out == '{"role": "user", "content": "é"}[4]1'
    with pytest.raises(BadRequest, match="no bad roles"):
        render_chat(t, [{"role": "bad", "content": ""}])


def test_trim_and_lstrip_blocks_like_hf():
    t = "{% for m in messages %}\n    {{ m['content'] }}\n{% endfor %}"
    assert render_chat(t, MSGS) == "    Be brief.\n    Hi\n"


def test_sandbox_blocks_attribute_escapes():
    with pytest.raises(BadRequest):
        render_chat("{{ messages.__class__.__mro__ }}", MSGS)


def test_default_template_follows_the_vocabulary():
    assert default_template(["<|start_header_id|>", "a"]) == LLAMA3_TEMPLATE
    assert default_template(["<|im_start|>"]) == CHATML_TEMPLATE
