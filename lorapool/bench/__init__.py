"""Benchmarks: ratios measured side by side in one run, printed and written as JSON.

Run them with ``python -m lorapool bench <scenario>``. Benchmarks are not
tests: nothing here asserts on wall-clock speed.
"""

__all__: list[str] = []
