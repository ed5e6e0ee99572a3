"""Unseeded sampling varies between calls; seeded sampling does not."""
from __future__ import annotations

from decograph.api import generate
from decograph.models.tiny import tiny_llama


def test_unseeded_sampling_differs_between_calls():
    model = tiny_llama(vocab_size=64, seed=3)
    prompts = [[1, 2, 3]] * 8

    def run(seed):
        return [r.new_token_ids for r in generate(model, None, prompts, strategy="ngram", max_new_tokens=12,
                                                  do_sample=True, seed=seed)]

    assert run(None) != run(None)       # 8 x 12 sampled tokens: a repeat has probability ~0
    assert run(5) == run(5)
