"""The JAX, Flax and Keras snippets of README.md and clients/python/README.md run as written
against the real server: the clients README's in order in one namespace holding `target`, as
it says; README.md's with its address, localhost:50051, replaced by the test server's."""

import re

import pytest
from conftest import REPO

pytest.importorskip("flax")
pytest.importorskip("keras")
pytest.importorskip("torch")

_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def _section(path, title):
    text = path.read_text()
    start = text.index(title)
    end = text.find("\n## ", start + len(title))
    return _BLOCK.findall(text[start : end if end != -1 else None])


def test_client_readme_jax_flax_keras_snippets(target):
    blocks = _section(REPO / "clients" / "python" / "README.md", "## JAX, Flax and Keras 3")
    assert len(blocks) == 5
    namespace = {"target": target}
    for block in blocks:
        exec(compile(block, "clients/python/README.md", "exec"), namespace)  # noqa: S102
    assert namespace["model"].out.kernel.sharding.spec == namespace["P"](None, "model")


def test_readme_jax_flax_keras_snippet(target):
    blocks = [
        block
        for block in _section(REPO / "README.md", "## Python: NumPy, PyTorch, JAX, Flax and Keras")
        if "weightinit.jax" in block
    ]
    assert len(blocks) == 1
    code = blocks[0].replace('"localhost:50051"', repr(target))
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102
