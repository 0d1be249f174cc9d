"""The top-level packages import only downward: controller → policies → workers, no cycles."""

from __future__ import annotations

from pathlib import Path

from bench.import_directions import directions

ROOT = Path(__file__).resolve().parents[1]
LAYER = {"workers": 0, "policies": 1, "controller": 2}


def test_no_module_level_import_points_up_a_layer():
    upward = {
        (source, target): count
        for (source, target), count in directions(ROOT).items()
        if LAYER[target] > LAYER[source]
    }
    assert upward == {}, f"imports against the layering (controller → policies → workers): {upward}"


def test_the_counter_sees_the_imports_that_are_there():
    """So the test above cannot pass by counting nothing."""
    counts = directions(ROOT)
    assert counts[("controller", "policies")] > 0 and counts[("policies", "workers")] > 0
