import pytest

from mlxserve.errors import BadRequest
from mlxserve.specs.templates import (
    CHATML_TEMPLATE,
    LLAMA3_TEMPLATE,
    check_template,
    default_template,
    is_go_template,
    render_chat,
)

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    "text",
    [
        "{{ .Prompt }}",
        "{{- if .System }}<|system|>{{ .System }}{{ end }}",
        "{{ range .Messages }}{{ .Content }}{{ end }}",
        "{{ range $i, $m := .Messages }}{{ $m.Role }}{{ end }}",
        "{{ if $.Tools }}tools{{ end }}",
    ],
)
def test_go_templates_are_recognised_and_translated(text):
    assert is_go_template(text)
    check_template(text)  # tests/specs/test_spec_gotemplates.py checks what they render
    assert isinstance(render_chat(text, MSGS), str)


@pytest.mark.parametrize(
    "text",
    [
        LLAMA3_TEMPLATE,
        CHATML_TEMPLATE,
        "{{ range(3) | list }}",
        "{{ messages[0]['content'] }}",
        "{% if messages %}{{ end_token }}{% endif %}",
    ],
)
def test_jinja_is_not_mistaken_for_go(text):
    assert not is_go_template(text)
    check_template(text)


def test_jinja_syntax_error_names_the_line():
    with pytest.raises(BadRequest, match="line 2"):
        check_template("ok\n{% for m in messages %}\n")


def test_chatml_rendering():
    assert render_chat(CHATML_TEMPLATE, MSGS) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert not render_chat(CHATML_TEMPLATE, MSGS, add_generation_prompt=False).endswith("assistant\n")


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
    t = (
        "{% for m in messages %}{% if m['role'] == 'bad' %}{{ raise_exception('no bad roles') }}"
        "{% endif %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m | tojson }}{% endfor %}"
        "{% generation %}[{{ strftime_now('%Y') | length }}]{% endgeneration %}"
        "{{ tools | length if tools else 0 }}"
    )
    out = render_chat(t, [{"role": "user", "content": "é"}, {"role": "x", "content": "y"}], tools=[{"name": "f"}])
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


# ---- limits: a template is user code ----
from mlxserve.specs.templates import RenderTimeout, RenderTooLong, TemplateLimit  # noqa: E402

CAP = 100_000


@pytest.mark.parametrize(
    "text",
    [
        "{{ 'x' * 10**7 }}",
        "{{ (['x' * 1000] * 10000) | join }}",
        "{% set ns = namespace(l=['x' * 1000]) %}{% for i in range(8) %}{% set ns.l = ns.l + ns.l %}{% endfor %}"
        "{{ ns.l | join }}",
        "{{ 'x' | center(10**7) }}",
        "{{ 'x'.ljust(10**7) }}",
        "{{ '{:>9999999}'.format(1) }}",
        "{{ '%9999999d' % 1 }}",
        "{{ '%9999999d' | format(1) }}",
        "{{ ('x\n' * 1000) | indent(1000, true) }}",
        "{% set s = 'a' * 1000 %}{{ s.replace('a', 'b' * 1000) }}",
        "{% set ns = namespace(s='x') %}{% for i in range(24) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
        "{% set ns = namespace(s='x') %}{% for i in range(24) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
        "{% set x = 'x' * 50000 %}{% for i in range(10000) %}{{ x }}{% endfor %}",
        "{% set x = 'x' * 50000 %}{% set y %}{% for i in range(200) %}{{ x }}{% endfor %}{% endset %}{{ y|length }}",
    ],
)
def test_templates_cannot_build_more_than_the_cap(text):
    with pytest.raises(RenderTooLong, match="characters"):
        render_chat(text, MSGS, max_chars=CAP)


@pytest.mark.parametrize(
    "text",
    [
        "{% for i in range(100000) %}{% for j in range(100) %}{% endfor %}{% endfor %}",
        "{% for a in messages * 300 %}{% for b in messages * 300 %}{% for c in messages * 300 %}"
        "{% endfor %}{% endfor %}{% endfor %}",  # no call, no output: only the loops tick
    ],
)
def test_templates_stop_at_the_deadline(text):
    with pytest.raises(RenderTimeout, match="longer than 0.2 s"):
        render_chat(text, MSGS, seconds=0.2)


@pytest.mark.parametrize(
    "text, error",
    [
        ("{{ range(100000) | batch(1) | sum(start=[]) | length }}", "adds numbers only"),
        ("{{ lipsum(3) }}", "lipsum"),
        ("{{ 10 ** 100000 }}", "power too large"),
        ("{{ range(10**6) | length }}", "range"),
    ],
)
def test_other_expensive_constructs_are_refused(text, error):
    with pytest.raises(BadRequest, match=error) as info:
        render_chat(text, MSGS, max_chars=CAP)
    assert not isinstance(info.value, TemplateLimit) or "characters" in str(info.value)


def test_the_output_itself_is_capped():
    pieces = "{% for m in messages %}{{ m.content }}{% endfor %}"
    with pytest.raises(RenderTooLong, match="longer than 1000 characters"):
        render_chat(pieces, [{"role": "user", "content": "y" * 400}] * 3, max_chars=1000)
    # Content within the cap renders whole; the limits are per render.
    out = render_chat(CHATML_TEMPLATE, [{"role": "user", "content": "y" * 90_000}], max_chars=CAP)
    assert out.count("y") == 90_000


def test_limits_keep_jinja_semantics():
    t = (
        "{{ 'a' ~ 1 ~ none }}|{% for x in [1, 2] %}{{ loop.index }}/{{ loop.length }}{{ '!' if loop.last }}"
        "{% else %}empty{% endfor %}|{% for x in [] %}x{% else %}empty{% endfor %}|"
        "{{ messages | map(attribute='role') | join(',') }}|{{ range(3) | list }}|{{ range(3) | reverse | list }}|"
        "{{ {'b': 1, 'a': 2} | dictsort | first | first }}|{{ messages[0] | tojson(indent=1) | length > 0 }}|"
        "{% for m in messages if m.role == 'user' %}{{ m.content }}{% endfor %}|{{ '%s-%d' % ('x', 3) }}|"
        "{{ '{}!'.format('hi') }}|{{ 'ab' * 2 }}|{{ 2 ** 10 }}|{{ [1] + [2] }}"
    )
    assert render_chat(t, MSGS) == (
        "a1None|1/22/2!|empty|system,user|[0, 1, 2]|[2, 1, 0]|a|True|Hi|x-3|hi!|abab|1024|[1, 2]"
    )
    nested = "{% for m in messages recursive %}{{ m.role }}{% endfor %}"
    assert render_chat(nested, MSGS) == "systemuser"
