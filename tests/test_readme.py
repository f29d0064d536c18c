"""The README examples run and print what they say."""

import contextlib
import io
import pathlib
import re


def run_block(index: int) -> list[str]:
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[index]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(code, "README.md", "exec"), {})
    return buf.getvalue().splitlines()


def test_readme_models_example_runs():
    out = run_block(1)
    assert out == ["(3, 384) [ True  True False]", "True"]


def test_readme_example_runs():
    out = run_block(0)
    assert out[0] == "[5. 7. 3.]"
    assert out[1] == "[ 3. 10.  8.]"
    assert out[2] == "[(4,), (18,), (10,)]"
    assert out[3].split() == ["[3]", "[17]", "[9]"]
    assert out[4] == "[3. 3. 3. 3.]"
    assert out[5] == "3.0 0.0"


def test_readme_transforms_example_runs():
    out = run_block(2)
    assert out[0] == "True 0.5"
    assert out[1] == "Quantized 1280 bytes vs 8192"
    assert out[2] == "(2, 384)"
