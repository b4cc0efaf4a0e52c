"""Assistant-only loss with chat templates that have no {% generation %} markers, and end-of-turn stops.

The templates are the shapes real models ship (ChatML as SmolLM2/Qwen2.5, Llama 3's headers) on a tiny
tokenizer; tests/realmodel/ checks the same on SmolLM2's own tokenizer."""

import itertools

import pytest

from tasks.machinery.chat import assistant_only_dataset, end_of_turn, has_generation_markers, stop_token_ids, \
    tokenize_assistant_only

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ '<|begin_of_text|>' }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# drops the earlier assistant turns' reasoning when more follows: a prefix renders differently from the whole
DROPS_HISTORY = ("{% for message in messages %}{% if message['role'] == 'assistant' and not loop.last %}"
                 "<|im_start|>assistant\n(...)<|im_end|>\n{% else %}<|im_start|>{{ message['role'] }}\n"
                 "{{ message['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>", "<|end_of_text|>"]

PROMPT = [{"role": "system", "content": "Be brief.", "tool_calls": None, "tool_call_id": None, "name": None},
          {"role": "user", "content": "Hi there", "tool_calls": None, "tool_call_id": None, "name": None}]
COMPLETION = [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"},
              {"role": "assistant", "content": "It is 4."}]


def _tokenizer(template: str, eos: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["Hello there, what is 2+2? It is 4. Be brief. system user assistant"] * 4,
                            trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos)
    fast.chat_template = template
    return fast


def _trained(tokenizer, encoded) -> list[str]:
    pairs = zip(encoded["input_ids"], encoded["assistant_masks"])
    return [tokenizer.decode([i for i, _ in run]) for on, run in itertools.groupby(pairs, key=lambda p: p[1]) if on]


def test_chatml_without_markers_trains_each_assistant_reply_and_its_end_of_turn_only():
    tokenizer = _tokenizer(CHATML, "<|im_end|>")
    assert not has_generation_markers(tokenizer)
    encoded = tokenize_assistant_only(tokenizer, PROMPT, COMPLETION, "row 1")
    assert _trained(tokenizer, encoded) == ["Hello!<|im_end|>", "It is 4.<|im_end|>"]
    assert end_of_turn(tokenizer) == "<|im_end|>"


def test_llama3_headers_without_markers_and_a_stop_at_eot():
    tokenizer = _tokenizer(LLAMA3, "<|end_of_text|>")
    encoded = tokenize_assistant_only(tokenizer, PROMPT, COMPLETION, "row 1")
    assert _trained(tokenizer, encoded) == ["Hello!<|eot_id|>", "It is 4.<|eot_id|>"]
    # EOS alone would let generation run past the end of the turn
    assert end_of_turn(tokenizer) == "<|eot_id|>"
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert set(stop_token_ids(tokenizer)) == {tokenizer.eos_token_id, eot}


def test_a_template_that_renders_a_prefix_differently_is_refused_with_the_row():
    import datasets

    tokenizer = _tokenizer(DROPS_HISTORY, "<|im_end|>")
    rows = datasets.Dataset.from_list([{"prompt": PROMPT[1:], "completion": COMPLETION[:1]},
                                       {"prompt": PROMPT[1:], "completion": COMPLETION}])
    with pytest.raises(ValueError, match=r"sft/train row 2: the chat template renders .* generation"):
        assistant_only_dataset(rows, tokenizer)


def test_the_demo_template_keeps_trls_marker_path():
    from tasks.machinery.modeling import CHAT_TEMPLATE

    tokenizer = _tokenizer(CHAT_TEMPLATE, "<|im_end|>")
    assert has_generation_markers(tokenizer)


def test_a_reply_with_weight_zero_is_context(tmp_path):
    """An OpenAI fine-tuning row's `weight: 0` turn, as the data stage stores it, is not trained."""
    import json

    from tasks.kinds.prepare_data import DataConfig, DatasetSource, prepare_data
    from tasks.machinery.splits import load_split

    row = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                        {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 5.",
                                                                       "weight": 0},
                        {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "It is 4."}]}
    (tmp_path / "openai.jsonl").write_text(json.dumps(row) + "\n")
    prepare_data(DataConfig(sft=DatasetSource(source=str(tmp_path / "openai.jsonl")), eval_fraction=0.0,
                            near_dedup={"enabled": False}), tmp_path / "out", 0)
    stored = load_split(tmp_path / "out", "sft", "train")[0]
    tokenizer = _tokenizer(CHATML, "<|im_end|>")
    encoded = tokenize_assistant_only(tokenizer, stored["prompt"], stored["completion"], "row 1")
    assert _trained(tokenizer, encoded) == ["Hello!<|im_end|>", "It is 4.<|im_end|>"]
