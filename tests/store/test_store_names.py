import pytest

from mlxserve.errors import InvalidName
from mlxserve.store.names import ModelName, parse_name


@pytest.mark.parametrize(
    "text, parts, display",
    [
        ("smollm2", ("registry.ollama.ai", "library", "smollm2", "latest"), "smollm2:latest"),
        ("SmolLM2:135M", ("registry.ollama.ai", "library", "smollm2", "135m"), "smollm2:135m"),
        ("me/tiny-llama:v1.0_q4", ("registry.ollama.ai", "me", "tiny-llama", "v1.0_q4"), "me/tiny-llama:v1.0_q4"),
        ("localhost:5000/ns/model:tag", ("localhost:5000", "ns", "model", "tag"), "localhost:5000/ns/model:tag"),
        ("127.0.0.1:8080/library/x", ("127.0.0.1:8080", "library", "x", "latest"), "127.0.0.1:8080/library/x:latest"),
        ("registry.ollama.ai/library/llama3.2:1b", ("registry.ollama.ai", "library", "llama3.2", "1b"), "llama3.2:1b"),
    ],
)
def test_valid_names(text, parts, display):
    name = parse_name(text)
    assert name.path_parts() == parts
    assert name.display() == display
    assert parse_name(str(name)) == name


def test_default_registry_is_configurable():
    name = parse_name("x", default_registry="127.0.0.1:5000")
    assert name == ModelName("127.0.0.1:5000", "library", "x", "latest")
    assert name.display("127.0.0.1:5000") == "x:latest"
    assert name.display() == "127.0.0.1:5000/library/x:latest"


@pytest.mark.parametrize(
    "text, why",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("../x", "'..'"),
        ("a/../b", "'..'"),
        ("x:..", "'..'"),
        ("/abs/path", "must not start with '/'"),
        ("a/b/c/d", "too many"),
        ("a//b", "empty path component"),
        ("x:", "tag"),
        ("-x", "invalid model"),
        (".hidden", "invalid model"),
        ("sp ace", "invalid model"),
        ("a\\b", "backslash"),
        ("x:" + "t" * 129, "invalid tag"),
        ("n" * 81, "invalid model"),
        ("h" * 300 + "/ns/" + "n" * 50, "longer than 350"),
        ("bad_host!/ns/x", "invalid registry"),
        ("ns!/x", "invalid namespace"),
    ],
)
def test_invalid_names(text, why):
    with pytest.raises(InvalidName, match="invalid model name") as info:
        parse_name(text)
    assert why in str(info.value)


def test_not_a_string():
    with pytest.raises(InvalidName):
        parse_name(None)  # type: ignore[arg-type]
