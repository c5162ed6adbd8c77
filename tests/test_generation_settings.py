"""Greedy decoding and the sliders: what reaches lmdeploy, and what the UI must say has no effect."""

from __future__ import annotations

import pytest

from model_loader.engines.lmdeploy_config import generation_config, openai_payload
from model_loader.engines.seam import GenSettings, ignored_settings


def test_greedy_is_top_1_with_the_penalty_kept():
    """lmdeploy resets repetition_penalty to 1.0 when do_sample is off; top-1 sampling keeps it and is greedy."""
    g = generation_config(GenSettings(temperature=0, top_p=0.5, top_k=40, repetition_penalty=1.3, seed=7))
    assert (g.do_sample, g.top_k, g.top_p, g.temperature, g.repetition_penalty, g.random_seed) == (True, 1, 1.0, 1.0, 1.3, None)
    api = openai_payload(GenSettings(temperature=0, top_p=0.5, repetition_penalty=1.3, seed=7))
    assert (api["top_k"], api["top_p"], api["repetition_penalty"]) == (1, 1.0, 1.3) and "seed" not in api


@pytest.mark.parametrize(
    ("settings", "ignored"),
    [
        (GenSettings(), []),
        (GenSettings(temperature=0), ["top_p", "top_k"]),
        (GenSettings(temperature=0, top_p=1.0, top_k=1, seed=0), []),
        (GenSettings(temperature=0, seed=42), ["top_p", "top_k", "seed"]),
        (GenSettings(temperature=0.7, top_k=1), ["temperature", "top_p"]),
        (GenSettings(temperature=0.7, top_k=1, top_p=1.0), ["temperature"]),
    ],
)
def test_ignored_settings_names_the_sliders_without_effect(settings, ignored):
    assert ignored_settings(settings) == ignored


def test_sampling_settings_map_unchanged():
    s = GenSettings(temperature=0.7, top_p=0.9, top_k=20, repetition_penalty=1.1, seed=3)
    g = generation_config(s)
    assert (g.do_sample, g.temperature, g.top_p, g.top_k, g.repetition_penalty, g.random_seed) == (True, 0.7, 0.9, 20, 1.1, 3)
    assert not ignored_settings(s)
