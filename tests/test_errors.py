"""The exception hierarchy."""

from __future__ import annotations

import pytest

import keybatch


@pytest.mark.parametrize(
    ("cls", "base"),
    [
        (keybatch.BatchError, keybatch.KeybatchError),
        (keybatch.LoadError, keybatch.BatchError),
        (keybatch.SaveError, keybatch.BatchError),
        (keybatch.ProcessorStopped, keybatch.KeybatchError),
        (keybatch.Overloaded, keybatch.KeybatchError),
        (keybatch.KeybatchError, Exception),
    ],
)
def test_hierarchy(cls: type[Exception], base: type[Exception]) -> None:
    assert issubclass(cls, base)


def test_batch_errors_carry_the_key() -> None:
    error = keybatch.LoadError(b"k", "load of key b'k' failed")
    assert error.key == b"k"
    assert str(error) == "load of key b'k' failed"


def test_public_names_live_in_public_modules() -> None:
    for name in keybatch.__all__:
        module = getattr(keybatch, name).__module__
        assert module in ("keybatch", "keybatch.writer", "keybatch.loader"), name
