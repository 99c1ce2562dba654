#!/usr/bin/env bash
# Writes tests/fixtures/tokenizer/gemma3.json: token ids llama.cpp's
# llama-tokenize (scripts/build-llama-cpp.sh) gives for a set of hard strings
# on Gemma 3 270M (scripts/fetch-gemma3.sh). Each case is run as
#   llama-tokenize -m MODEL --stdin --ids --no-escape --log-disable [--no-parse-special]
# with the text on stdin (BOS added as the model asks). Checked by
# tests/it/inference_tokenizer.rs (gemma3_matches_llama_tokenize).
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS=$(scripts/build-llama-cpp.sh)
MODEL=${SHOAL_GEMMA3:-$(scripts/fetch-gemma3.sh)}
python3 - "$TOOLS/bin/llama-tokenize" "$MODEL" tests/fixtures/tokenizer/gemma3.json <<'PY'
import json, subprocess, sys
tool, model, out = sys.argv[1:]
texts = [
    "Hello world",
    " Hello world",
    "Hello  world   with    runs     of spaces",
    "  leading and trailing  ",
    "tabs\tand\t\ttabs\t\t\tend",
    "new\nline\n\nparagraph\n\n\n\nend\n",
    "\n\n\n",
    "mixed \t \n whitespace\r\n crlf",
    "digits 0 12 345 6789 1234567890 3.14159 1,000,000",
    "it's we're they've I'm you'll he'd DON'T",
    "Größere Übungen für Äpfel — naïve café, déjà vu.",
    "Привет, как дела?",
    "你好，世界！今天天气很好。",
    "日本語のテキストとカタカナ、ひらがな。",
    "한국어 텍스트입니다",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "Emoji: 🦀🔥👍🏽 and ZWJ 👨‍👩‍👧",
    "fn main() {\n    println!(\"{}\", 1 + 2);\n}\n",
    "def f(x):\n\treturn x**2  # square\n",
    "<html><body class=\"x\">&amp;</body></html>",
    "email@example.com https://example.org/path?q=1&r=2#frag",
    "\u00a0non-breaking\u2009thin\u3000ideographic",
    "",
    " ",
    "a",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "<bos><eos><pad><unk><mask>",
]
cases = []
for special in (False, True):
    for t in texts:
        args = [tool, "-m", model, "--stdin", "--ids", "--no-escape", "--log-disable"]
        if not special:
            args.append("--no-parse-special")
        r = subprocess.run(args, input=t.encode(), capture_output=True, check=True)
        ids = json.loads(r.stdout.decode().strip().splitlines()[-1])
        cases.append({"text": t, "parse_special": special, "ids": ids})
with open(out, "w") as f:
    f.write('{"model": "gemma-3-270m-Q4_K_M.gguf", "tool": "llama-tokenize (llama-cpp-python 0.3.36)",\n')
    f.write(' "add_bos": true, "cases": [\n')
    f.write(",\n".join("  " + json.dumps(c, ensure_ascii=False) for c in cases))
    f.write("\n]}\n")
print(f"{len(cases)} cases -> {out}", file=sys.stderr)
PY
