import pytest

from mlxserve.errors import ModelfileError
from mlxserve.specs.modelfile import parse_modelfile, render_modelfile
from mlxserve.specs.modelspec import ModelSpec, Options

FULL = '''# a comment
FROM ./model.gguf

PARAMETER temperature 0.7
PARAMETER num_ctx 4096
PARAMETER stop "<|im_end|>"
PARAMETER stop <|endoftext|>
PARAMETER use_mmap false
TEMPLATE """{% for m in messages %}
{{ m['content'] }}
{% endfor %}"""
SYSTEM "You are a \\"helpful\\" assistant #1"
ADAPTER ./lora
LICENSE MIT
LICENSE """Apache
2.0"""
MESSAGE user Is the sky blue?
MESSAGE assistant """Yes."""
'''


def test_all_instructions():
    mf = parse_modelfile(FULL)
    assert mf.from_ == "./model.gguf" and mf.from_line == 2
    assert mf.parameters == {
        "temperature": 0.7,
        "num_ctx": 4096,
        "stop": ["<|im_end|>", "<|endoftext|>"],
        "use_mmap": False,
    }
    assert mf.template == "{% for m in messages %}\n{{ m['content'] }}\n{% endfor %}"
    assert mf.system == 'You are a "helpful" assistant #1'
    assert mf.adapter == "./lora"
    assert mf.license == ["MIT", "Apache\n2.0"]
    assert mf.messages == [{"role": "user", "content": "Is the sky blue?"}, {"role": "assistant", "content": "Yes."}]


def test_instructions_are_case_insensitive():
    mf = parse_modelfile("from llama3\nParameter Temperature 1\nsYsTeM hi\nmessage USER yo\n")
    assert mf.from_ == "llama3" and mf.parameters == {"temperature": 1.0}
    assert mf.system == "hi" and mf.messages == [{"role": "user", "content": "yo"}]


def test_multiline_layout_newlines_are_dropped():
    mf = parse_modelfile('FROM x\nSYSTEM """\nYou are\n  helpful.\n"""\n')
    assert mf.system == "You are\n  helpful."


def test_last_template_and_system_win():
    mf = parse_modelfile("FROM x\nSYSTEM a\nSYSTEM b\n")
    assert mf.system == "b"


@pytest.mark.parametrize(
    "text, line, words",
    [
        ("FROM x\nFROOM y\n", 2, "unknown instruction 'FROOM'"),
        ("# only a comment\nSYSTEM hi\n", 2, "missing FROM"),
        ("", 1, "missing FROM"),
        ("FROM x\n\nPARAMETER bogus 1\n", 3, "bogus"),
        ("FROM x\nPARAMETER num_ctx lots\n", 2, "num_ctx"),
        ("FROM x\nPARAMETER temperature\n", 2, "missing value"),
        ("FROM x\nPARAMETER use_mmap maybe\n", 2, "use_mmap"),
        ("FROM x\nMESSAGE robot hello\n", 2, "role"),
        ('FROM x\nSYSTEM """never\nclosed\n', 2, "unterminated"),
        ('FROM x\nSYSTEM "open\n', 2, "unterminated"),
        ('FROM x\nSYSTEM "a" b\n', 2, "after the closing"),
        ("FROM x\nFROM y\n", 2, "second FROM"),
        ("FROM\n", 1, "missing value for FROM"),
        ("FROM x\nADAPTER a\nADAPTER b\n", 3, "one ADAPTER"),
    ],
)
def test_errors_carry_line_numbers(text, line, words):
    with pytest.raises(ModelfileError) as info:
        parse_modelfile(text)
    assert info.value.line == line
    assert str(info.value).startswith(f"line {line}: ")
    assert words in str(info.value)


def test_render_round_trips():
    spec = ModelSpec(
        format="gguf",
        template='{{ "x" }}\n{{ messages }}',
        system="Be brief.",
        parameters=Options(temperature=0.2, num_ctx=2048, stop=["<|im_end|>", 'say "hi"'], extra={"use_mmap": True}),
        license="MIT\nlicense",
        messages=[{"role": "user", "content": "hi there"}],
    )
    text = render_modelfile("smollm2:135m", spec)
    mf = parse_modelfile(text)
    assert mf.from_ == "smollm2:135m"
    assert mf.template == spec.template and mf.system == spec.system
    assert Options.from_dict(mf.parameters) == spec.parameters
    assert mf.license == [spec.license] and mf.messages == spec.messages
