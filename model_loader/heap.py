"""A serving process's long-lived heap, kept out of the garbage collector's way.

lmdeploy, torch and transformers leave ~740,000 long-lived objects, and a full collection walks every tracked
object while holding the interpreter, so every stream stands still meanwhile: 25 full collections of up to 508 ms
in one bench run on the H200 (bench/results). `gc.freeze` is the standard library's answer for a heap that lives as
long as the process; objects made later stay collectable.
"""

from __future__ import annotations

import gc

# a full collection only after this many collections of the middle generation (Python's default: 10)
FULL_COLLECTION_EVERY = 100


def freeze_long_lived() -> int:
    """Leave what is alive now out of every later collection and make full collections rarer; returns how many
    objects were frozen."""
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)
    gc.collect()
    gc.freeze()  # last: a frozen heap says both are done
    return gc.get_freeze_count()
