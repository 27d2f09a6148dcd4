"""The demo: keybatch against one transaction per operation. Not public API.

Run it from the repository root with `python -m examples.demo`; the code is the
package `keybatch_demo` next to this file.
"""
