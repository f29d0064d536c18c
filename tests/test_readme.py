"""The README example runs and prints what it says."""

import contextlib
import io
import pathlib
import re


def test_readme_example_runs():
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(code, "README.md", "exec"), {})
    out = buf.getvalue().splitlines()
    assert out[0] == "[5. 7. 3.]"
    assert out[1] == "[ 3. 10.  8.]"
    assert out[2] == "[(4,), (18,), (10,)]"
    assert out[3].split() == ["[3]", "[17]", "[9]"]
    assert out[4] == "[3. 3. 3. 3.]"
    assert out[5] == "3.0 0.0"
