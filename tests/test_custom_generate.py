"""decograph as a transformers ``custom_generate`` (``decograph.hf_generate``), in both forms
transformers 5.25 takes: the callable and the directory with ``custom_generate/generate.py``.

``model.generate(..., custom_generate=...)`` must return what transformers' greedy ``generate``
returns (the padded prompt, then each row's new ids, finished rows padded with
``pad_token_id``), honour the generation config and the call's overrides, and refuse what
decograph does not do. Tiny random models for the argument handling; the real default model
(``real_model``) for equality on left-padded chat prompts, with EOS lists and stop strings."""
from __future__ import annotations

import pytest
import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput

from decograph.errors import InputError, UnsupportedError
from decograph.hf_generate import CUSTOM_GENERATE_DIR, custom_generate, install_custom_generate
from decograph.models.tiny import tiny_llama

from tests.test_api_inputs import PAD, Collect, char_tokenizer, padded

DIRECTORY = str(CUSTOM_GENERATE_DIR)
FORMS = {"callable": {"custom_generate": custom_generate},
         "directory": {"custom_generate": DIRECTORY, "trust_remote_code": True}}
ROWS = [[7, 4, 11, 11, 14, 62, 22, 14, 17, 11, 3], [0, 1, 2], [30, 31, 30, 31, 30]]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(eos_token_id=None)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return padded(ROWS, "left")


def eos_ids(model, batch) -> list[int]:
    """Two tokens greedy decoding really produces mid-way in rows 0 and 1: an EOS list that ends
    those rows early and at different lengths."""
    ids, mask = batch
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=PAD)
    return [int(out[0, ids.shape[1] + 4]), int(out[1, ids.shape[1] + 7])]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("strategy", ["anpd", "ngram", "jacobi"])
def test_equals_transformers_greedy_with_an_eos_list(model, batch, form: str, strategy: str) -> None:
    ids, mask = batch
    eos = eos_ids(model, batch)
    want = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                          pad_token_id=PAD)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=PAD,
                         strategy=strategy, **FORMS[form])
    assert (want[:, ids.shape[1]:] == PAD).any()                 # some rows did end early
    assert torch.equal(got, want)


@pytest.mark.parametrize("form", FORMS)
def test_the_models_generation_config_and_the_output_object(batch, form: str) -> None:
    m = tiny_llama(eos_token_id=None)
    ids, mask = batch
    m.generation_config.eos_token_id = eos_ids(m, batch)
    m.generation_config.pad_token_id = 62
    m.generation_config.max_length = ids.shape[1] + 9           # max_length, not max_new_tokens
    want = m.generate(ids, attention_mask=mask, do_sample=False, return_dict_in_generate=True)
    got = m.generate(ids, attention_mask=mask, return_dict_in_generate=True, **FORMS[form])
    assert isinstance(got, GenerateDecoderOnlyOutput) and torch.equal(got.sequences, want.sequences)
    assert want.sequences.shape[1] <= ids.shape[1] + 9 and (want.sequences[:, ids.shape[1]:] == 62).any()


def test_stop_strings_in_the_directory_form_equal_transformers(model, tok, batch) -> None:
    ids, mask = batch
    free = model.generate(ids, attention_mask=mask, max_new_tokens=14, do_sample=False, pad_token_id=PAD)
    stops = [tok.decode(free[0, ids.shape[1] + 3: ids.shape[1] + 5]), tok.decode(free[2, -3:-1])]
    kw = dict(attention_mask=mask, max_new_tokens=14, stop_strings=stops, tokenizer=tok, pad_token_id=PAD,
              eos_token_id=PAD)
    want = model.generate(ids, do_sample=False, **kw)
    got = model.generate(ids, strategy="anpd", **FORMS["directory"], **kw)
    assert torch.equal(got, want)


def test_the_callable_form_cannot_see_a_tokenizer_so_stop_strings_fail_in_transformers(model, tok, batch) -> None:
    ids, mask = batch
    with pytest.raises(ValueError, match="could not locate a tokenizer"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, stop_strings=["ab"], tokenizer=tok,
                       custom_generate=custom_generate)



@pytest.mark.parametrize("form", FORMS)
def test_streamers_get_the_prompt_then_every_new_token_once(model, form: str) -> None:
    x = torch.tensor([ROWS[0]])
    seen = Collect()
    out = model.generate(x, max_new_tokens=10, streamer=seen, pad_token_id=PAD, strategy="ngram", **FORMS[form])
    assert seen.puts[0] == ROWS[0] and sum(seen.puts[1:], []) == out[0, len(ROWS[0]):].tolist()
    assert seen.ended == 1 and out.shape[1] == len(ROWS[0]) + 10


@pytest.mark.parametrize("form", FORMS)
def test_sampling_follows_torchs_seed_and_returns_several_sequences(model, batch, form: str) -> None:
    ids, mask = batch
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=True, temperature=0.8, top_k=20, top_p=0.9,
              pad_token_id=PAD, **FORMS[form])
    torch.manual_seed(0)
    a = model.generate(ids, **kw)
    torch.manual_seed(0)
    b = model.generate(ids, **kw)
    assert torch.equal(a, b) and a.shape == (3, ids.shape[1] + 8)
    many = model.generate(ids, num_return_sequences=2, **kw)
    assert many.shape == (6, ids.shape[1] + 8) and torch.equal(many[::2, : ids.shape[1]], ids)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(("option", "message"), [
    ({"num_beams": 2}, "num_beams=2 is not supported \\(beam search"),
    ({"repetition_penalty": 1.3}, "repetition_penalty=1.3 is not supported"),
    ({"output_scores": True, "return_dict_in_generate": True}, "output_scores=True is not supported"),
    ({"min_new_tokens": 3}, "min_new_tokens=3 is not supported"),
    ({"no_repeat_ngram_size": 2}, "no_repeat_ngram_size=2"),
])
def test_what_decograph_does_not_do_is_refused(model, batch, form: str, option: dict, message: str) -> None:
    ids, mask = batch
    with pytest.raises(UnsupportedError, match=message):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=PAD, **option, **FORMS[form])


def test_custom_logits_processors_and_stray_arguments_are_refused(model, batch) -> None:
    from transformers import LogitsProcessorList, MinLengthLogitsProcessor

    ids, mask = batch
    procs = LogitsProcessorList([MinLengthLogitsProcessor(3, eos_token_id=PAD)])
    for form in FORMS.values():
        with pytest.raises(UnsupportedError, match="(logits_processor|MinLengthLogitsProcessor)"):
            model.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=PAD, logits_processor=procs,
                           **form)
    with pytest.raises(InputError, match="unexpected arguments \\['colour'\\]"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, colour="blue", **FORMS["directory"])


def test_an_installed_directory_makes_decograph_the_models_generate(model, batch, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path / "m")
    install_custom_generate(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True)
    ids, mask = batch
    want = model.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=False, pad_token_id=PAD)
    got = loaded.generate(input_ids=ids, attention_mask=mask, max_new_tokens=9, pad_token_id=PAD, strategy="ngram")
    assert torch.equal(got, want)


# ---------------------------------------------------------------- the real default model

QUESTIONS = ["Name three colors.", "What is the capital of France? Answer in one sentence.",
             "Write a haiku about autumn leaves falling in the quiet forest."]


def chat_batch(tok) -> tuple[list[list[int]], dict[str, torch.Tensor]]:
    """The questions through the chat template, as ids and as a left-padded batch."""
    rows = [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]) for q in QUESTIONS]
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return rows, {"input_ids": ids, "attention_mask": mask}


def hf_rows(model, rows: list[list[int]], n: int, **kw) -> list[list[int]]:
    """transformers' greedy generate on each row alone: its new ids (to its EOS or stop)."""
    out = []
    with torch.inference_mode():
        for r in rows:
            x = torch.tensor([r])
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, **kw)
            out.append(y[0, len(r):].tolist())
    return out


def as_hf_batch(inputs: dict[str, torch.Tensor], news: list[list[int]], pad: int) -> torch.Tensor:
    width, longest = inputs["input_ids"].shape[1], max(map(len, news))
    out = torch.full((len(news), width + longest), pad, dtype=torch.long)
    out[:, :width] = inputs["input_ids"]
    for i, new in enumerate(news):
        out[i, width: width + len(new)] = torch.tensor(new)
    return out


@pytest.fixture(scope="module")
def real(default_model):
    """The default model, the chat batch, and transformers' greedy new ids for each row alone."""
    model, tok = default_model
    rows, inputs = chat_batch(tok)
    return model, tok, rows, inputs, hf_rows(model, rows, 24, pad_token_id=2)


def upto(new: list[int], ends: list[int]) -> list[int]:
    """Greedy ids under an EOS list: the free run, cut after its first end token."""
    for i, t in enumerate(new):
        if t in ends:
            return new[: i + 1]
    return new


@pytest.mark.real_model
@pytest.mark.parametrize("form", FORMS)
def test_real_model_left_padded_batch_with_an_eos_list(real, form: str) -> None:
    model, tok, rows, inputs, free = real
    eos = [2] + [f[len(f) // 2] for f in free[:2]]       # <|im_end|> and two tokens greedy really emits
    want = as_hf_batch(inputs, [upto(f[:20], eos) for f in free], 2)
    got = model.generate(**inputs, max_new_tokens=20, eos_token_id=eos, strategy="anpd", **FORMS[form])
    assert torch.equal(got, want)
    assert (want[:, inputs["input_ids"].shape[1]:] == 2).any()      # a row ended before the others


@pytest.mark.real_model
def test_real_model_stop_strings_equal_transformers(real) -> None:
    model, tok, rows, inputs, free = real
    stops = [s for s in (tok.decode(free[0][3:6]).strip(), tok.decode(free[2][8:11]).strip()) if s]
    want = as_hf_batch(inputs, hf_rows(model, rows, 24, stop_strings=stops, tokenizer=tok, pad_token_id=2), 2)
    out = model.generate(**inputs, max_new_tokens=24, stop_strings=stops, tokenizer=tok, strategy="anpd",
                         return_dict_in_generate=True, **FORMS["directory"])
    assert torch.equal(out.sequences, want)
    assert (want[:, inputs["input_ids"].shape[1]:] == 2).any()      # a row stopped before the others
