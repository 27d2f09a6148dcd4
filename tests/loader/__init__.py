"""keybatch.loader tests."""
