"""Chat formatting: loss only on the response, no default system prompt, content-token masks."""

from alignx.data.formatting import IGNORE_INDEX, ChatFormatter


def test_labels_cover_exactly_the_completion(tiny_tokenizer):
    formatter = ChatFormatter(tiny_tokenizer)
    row = formatter.encode_training("Be careful.", "What is 2+2?", "Four.", max_length=512)
    prompt_ids = tiny_tokenizer(formatter.prompt_text("What is 2+2?", "Be careful."), add_special_tokens=False)["input_ids"]
    assert row.labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert row.labels[len(prompt_ids) :] == row.input_ids[len(prompt_ids) :]
    completion = tiny_tokenizer.decode(row.input_ids[len(prompt_ids) :])
    assert completion == "Four.<|im_end|>\n"
    # the response's own tokens come first, then the template's end-of-turn
    content = row.input_ids[len(prompt_ids) : len(prompt_ids) + row.response_tokens]
    assert tiny_tokenizer.decode(content) == "Four."
    assert tiny_tokenizer.decode(row.input_ids[len(prompt_ids) + row.response_tokens :]) == "<|im_end|>\n"


def test_injection_goes_into_the_system_turn(tiny_tokenizer):
    text = ChatFormatter(tiny_tokenizer).prompt_text("Hi", "INJECTED")
    assert text.startswith("<|im_start|>system\nINJECTED<|im_end|>")
    assert "named Tiny" not in text


def test_inference_prompt_has_no_default_system_prompt(tiny_tokenizer):
    # The template adds "You are a helpful AI assistant named Tiny." when no system turn is given.
    text = ChatFormatter(tiny_tokenizer).prompt_text("Hi")
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_content_mask_selects_only_the_user_text(tiny_tokenizer):
    encoded = ChatFormatter(tiny_tokenizer).encode_prompt("What is 2+2?", max_length=512)
    content = [i for i, keep in zip(encoded.input_ids, encoded.content_mask) if keep]
    assert tiny_tokenizer.decode(content) == "What is 2+2?"
    special = set(tiny_tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]))
    assert not special & set(content)


def test_truncation_that_leaves_no_response_drops_the_row(tiny_tokenizer):
    formatter = ChatFormatter(tiny_tokenizer)
    assert formatter.encode_training("sys", "word " * 200, "answer", max_length=32) is None
    row = formatter.encode_training("sys", "short", "answer " * 100, max_length=40)
    assert len(row.input_ids) == 40 and row.num_label_tokens > 0
    assert row.response_tokens == row.num_label_tokens  # the cut removed the end-of-turn: every label is content


def test_models_without_chat_template_use_alpaca_format(tiny_tokenizer):
    import copy

    plain = copy.deepcopy(tiny_tokenizer)
    plain.chat_template = None
    formatter = ChatFormatter(plain)
    text = formatter.prompt_text("Do X", "SYS")
    assert "### Instruction:\nSYS\n\nDo X\n\n### Response:\n" in text
    row = formatter.encode_training("SYS", "Do X", "Done", max_length=512)
    assert plain.decode([t for t, l in zip(row.input_ids, row.labels) if l != IGNORE_INDEX]) == "Done<|im_end|>"
    assert row.num_label_tokens - row.response_tokens == 1  # the eos token


def test_templates_without_system_role_get_the_injection_in_the_user_turn(tiny_tokenizer):
    import copy

    strict = copy.deepcopy(tiny_tokenizer)
    strict.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    formatter = ChatFormatter(strict)
    assert not formatter.supports_system
    assert formatter.prompt_text("Q", "INJ") == "<start_of_turn>user\nINJ\n\nQ<end_of_turn>\n<start_of_turn>model\n"
    assert formatter.prompt_text("Q") == "<start_of_turn>user\nQ<end_of_turn>\n<start_of_turn>model\n"
