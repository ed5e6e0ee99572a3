"""``decograph.generate`` with Hugging Face-style inputs (``decograph.api.inputs``): a padded
2-D ``input_ids`` with its ``attention_mask`` decodes each row as if alone (left or right
padding), bad shapes name the argument, and ``stop_strings`` end rows exactly where
transformers' ``generate(stop_strings=...)`` ends them. Tiny random models, a character-level
tokenizer (transformers' stop-string matching needs tokens that spell their text)."""
from __future__ import annotations

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

from decograph.api import generate
from decograph.errors import InputError
from decograph.models.tiny import tiny_llama

CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ."      # 64: one token each
PAD = 63
STRATEGIES = ["greedy", "ngram", "anpd", "jacobi", "lookahead"]


def char_tokenizer(eos: str | None = None):
    """A fast tokenizer with one token per character of ``CHARS`` (id = index)."""
    from tokenizers import Tokenizer, decoders
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(BPE({c: i for i, c in enumerate(CHARS)}, merges=[]))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(eos_token_id=None)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def padded(rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids, mask = [], []
    for r in rows:
        fill = width - len(r)
        ids.append([PAD] * fill + r if side == "left" else r + [PAD] * fill)
        mask.append([0] * fill + [1] * len(r) if side == "left" else [1] * len(r) + [0] * fill)
    return torch.tensor(ids), torch.tensor(mask)


ROWS = [[7, 4, 11, 11, 14, 62, 22, 14, 17, 11, 3], [0, 1, 2], [30, 31, 30, 31, 30]]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_padded_row_decodes_as_if_alone(model, strategy: str, side: str) -> None:
    ids, mask = padded(ROWS, side)
    batch = generate(model, None, ids, strategy, 12, attention_mask=mask)
    alone = [generate(model, None, [r], strategy, 12)[0] for r in ROWS]
    assert [r.prompt_ids for r in batch] == ROWS
    assert [r.new_token_ids for r in batch] == [r.new_token_ids for r in alone]


def test_a_mask_of_ones_and_lists_are_accepted(model) -> None:
    rows = [ROWS[0][:4], ROWS[2][:4]]
    as_lists = generate(model, None, rows, "greedy", 5, attention_mask=[[1] * 4, [1] * 4])
    plain = generate(model, None, torch.tensor(rows), "greedy", 5)
    one = generate(model, None, torch.tensor(rows[0]), "greedy", 5, attention_mask=torch.ones(4, dtype=torch.bool))
    assert [r.new_token_ids for r in as_lists] == [r.new_token_ids for r in plain]
    assert one[0].new_token_ids == plain[0].new_token_ids


@pytest.mark.parametrize(("ids", "mask", "message"), [
    (torch.zeros(2, 3, 4, dtype=torch.long), None, "input_ids must be 1-D .* or 2-D .* got shape \\(2, 3, 4\\)"),
    (torch.ones(2, 4, dtype=torch.long), torch.ones(2, 3), "attention_mask has shape \\(2, 3\\) but input_ids \\(2, 4\\)"),
    (torch.ones(2, 4, dtype=torch.long), torch.ones(3, 4), "attention_mask has shape \\(3, 4\\)"),
    (torch.ones(1, 4, dtype=torch.long), torch.tensor([[1, 0, 1, 1]]), "row 0 has padding between tokens"),
    (torch.ones(2, 4, dtype=torch.long), torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]), "row 1 masks every position"),
    (torch.ones(1, 2, dtype=torch.long), torch.tensor([[2, 1]]), "row 0 holds values other than 0 and 1"),
    (["t1 t2"], [[1, 1]], "input_ids must be 1-D or 2-D numbers"),
    ("t1 t2", [1, 1], "input_ids must be token ids"),
    ([[1, 2, 3], [4, 5]], [[1, 1, 1], [1, 1]], "input_ids is ragged"),
    (torch.ones(2, 2, dtype=torch.long), torch.ones(2, 2, 1), "attention_mask must be 1-D or 2-D numbers"),
])
def test_bad_shapes_name_the_argument(model, ids, mask, message: str) -> None:
    with pytest.raises(InputError, match=message):
        generate(model, None, ids, "greedy", 2, attention_mask=mask)


def test_a_padding_id_outside_the_vocabulary_is_fine_when_masked(model) -> None:
    ids = torch.tensor([[10_000, 5, 6], [7, 8, 9]])
    [a, b] = generate(model, None, ids, "greedy", 4, attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]))
    assert a.prompt_ids == [5, 6] and b.prompt_ids == [7, 8, 9]


# ---------------------------------------------------------------- stop strings


def hf_reference(model, tok, rows: list[list[int]], n: int, stops: list[str]) -> list[list[int]]:
    """transformers' greedy generate with ``stop_strings``, each row alone (no EOS): its new tokens."""
    out = []
    for r in rows:
        x = torch.tensor([r])
        y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                           stop_strings=stops, tokenizer=tok, pad_token_id=PAD)
        out.append(y[0, len(r):].tolist())
    return out


@pytest.mark.parametrize("strategy", ["greedy", "anpd", "ngram", "jacobi"])
def test_stop_strings_end_rows_where_transformers_ends_them(model, tok, strategy: str) -> None:
    ids, mask = padded(ROWS, "left")
    free = generate(model, tok, ids, "greedy", 16, attention_mask=mask, eos_token_id=[])
    stops = [free[0].text[5:7], free[1].text[9:12], "zzz"]           # two rows stop, one runs to its budget
    want = hf_reference(model, tok, ROWS, 16, stops)
    got = generate(model, tok, ids, strategy, 16, attention_mask=mask, eos_token_id=[], stop_strings=stops)
    assert [r.new_token_ids for r in got] == want
    assert [r.stats.finish_reason for r in got] == ["stop", "stop", "max_new_tokens"]
    assert got[0].text.endswith(stops[0]) and stops[1] in got[1].text



class Collect(BaseStreamer):
    """A transformers streamer that keeps what it is given."""

    def __init__(self) -> None:
        self.puts: list[list[int]] = []
        self.ended = 0

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.reshape(-1).tolist())

    def end(self) -> None:
        self.ended += 1


def test_a_stopped_row_decodes_no_further_and_streams_up_to_its_stop(model, tok) -> None:
    [free] = generate(model, tok, [ROWS[0]], "greedy", 24)
    stop = free.text[3:5]

    seen = Collect()
    [r] = generate(model, tok, [ROWS[0]], "greedy", 24, stop_strings=stop, streamer=seen)
    assert r.text == free.text[:5] and r.stats.finish_reason == "stop"
    assert r.stats.decode_steps <= r.stats.new_tokens + 1 < free.stats.decode_steps   # cancelled, not run out
    assert seen.puts[0] == ROWS[0] and sum(seen.puts[1:], []) == r.new_token_ids and seen.ended == 1


def test_stop_strings_need_a_tokenizer_and_real_strings(model, tok) -> None:
    with pytest.raises(InputError, match="stop_strings need the model's tokenizer"):
        generate(tiny_llama(seed=3), None, [ROWS[0]], "greedy", 4, stop_strings=["ab"])   # a model never given one
    with pytest.raises(InputError, match="stop_strings must be non-empty strings"):
        generate(model, tok, [ROWS[0]], "greedy", 4, stop_strings=[""])


def test_generate_stream_takes_the_mask_too(model, tok) -> None:
    from decograph.api import generate_stream

    ids, mask = padded(ROWS, "left")
    texts = ["", "", ""]
    for chunk in generate_stream(model, tok, ids, "anpd", 10, attention_mask=mask):
        texts[chunk.row] += chunk.text
    assert texts == [r.text for r in generate(model, tok, ids, "anpd", 10, attention_mask=mask)]
