"""keybatch.writer tests."""
