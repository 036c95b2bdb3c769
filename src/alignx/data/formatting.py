"""Chat formatting, loss masks and content-token masks.

Training rows use the base model's chat template: system turn = the axis's injection prompt, user turn =
instruction (+ input), assistant turn = response; the loss sees only the assistant's tokens. Models
without a chat template get an Alpaca-style template. Templates that reject a system role (Gemma's)
get the injection prepended to the user turn instead.

Router and calibrator features need the prompt exactly as it arrives at inference: no injection and no
*default* system prompt (SmolLM2's template silently adds one), and they pool only the user's own
content tokens, because template tokens such as SmolLM2's ``<|im_start|>`` carry activations of norm
~25,000 that swamp any average that includes them.
"""

from __future__ import annotations

from dataclasses import dataclass

from jinja2.exceptions import TemplateError

IGNORE_INDEX = -100
ALPACA_PROMPT = "### Instruction:\n{system}{user}\n\n### Response:\n"
_SENTINEL = "\x00alignx-system\x00"


@dataclass
class EncodedExample:
    """Token ids of one training row and its labels (``IGNORE_INDEX`` wherever no loss is taken).

    ``response_tokens``: how many of the labelled tokens are the response's own text; the labels after them are
    the template's end-of-turn (SmolLM2: ``<|im_end|>\n``). Training learns both; an evaluation of what a model
    says scores the content apart, because on a one-line answer the end-of-turn can cost as much as the rest."""

    input_ids: list[int]
    labels: list[int]
    response_tokens: int

    @property
    def num_label_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass
class EncodedPrompt:
    """Token ids of a prompt and a mask of the tokens that belong to the user's own text."""

    input_ids: list[int]
    content_mask: list[bool]


class ChatFormatter:
    """Turns (system, user, response) into token ids for one tokenizer, chat template or not."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.supports_system = self.has_template and self._template_accepts_system()

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _template_accepts_system(self) -> bool:
        try:
            text = self._render([{"role": "system", "content": _SENTINEL}, {"role": "user", "content": "x"}], True)
        except TemplateError:
            return False
        return _SENTINEL in text

    def prompt_text(self, user: str, system: str | None = None) -> str:
        """The text the model sees before it answers. ``system=None`` means no system turn at all."""
        if not self.has_template:
            prefix = f"{system}\n\n" if system else ""
            return self._bos_text() + ALPACA_PROMPT.format(system=prefix, user=user)
        if system and not self.supports_system:
            return self._render([{"role": "user", "content": f"{system}\n\n{user}"}], True)
        if system:
            return self._render([{"role": "system", "content": system}, {"role": "user", "content": user}], True)
        return self._prompt_without_default_system(user)

    def _prompt_without_default_system(self, user: str) -> str:
        """Render a lone user turn, cutting out any system turn the template would add on its own."""
        if not self.supports_system:
            return self._render([{"role": "user", "content": user}], True)
        system_only = self._render([{"role": "system", "content": _SENTINEL}], False)
        full = self._render([{"role": "system", "content": _SENTINEL}, {"role": "user", "content": user}], True)
        if not full.startswith(system_only):  # system text is woven into the user turn (Llama-2 style)
            return self._render([{"role": "user", "content": user}], True)
        text = full[len(system_only) :]
        bos = self._bos_text()
        if bos and system_only.startswith(bos) and not text.startswith(bos):
            text = bos + text
        return text

    def completion_text(self, response: str) -> str:
        """What follows the prompt in a training row: the response and the template's end-of-turn."""
        if not self.has_template:
            return response + (self.tokenizer.eos_token or "")
        # Render a one-turn conversation with and without the answer; the difference is the completion.
        messages = [{"role": "user", "content": _SENTINEL}]
        prompt = self._render(messages, True)
        full = self._render(messages + [{"role": "assistant", "content": response}], False)
        if not full.startswith(prompt):
            raise ValueError("chat template renders the assistant turn in a way AlignX cannot split")
        return full[len(prompt) :]

    def _bos_text(self) -> str:
        return self.tokenizer.bos_token or ""

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_training(self, system: str, user: str, response: str, max_length: int) -> EncodedExample | None:
        """Token ids and labels of one row; ``None`` when truncation leaves no response token to learn."""
        prompt_ids = self._ids(self.prompt_text(user, system))
        completion = self.completion_text(response)
        encoding = self.tokenizer(completion, add_special_tokens=False, return_offsets_mapping=True)
        completion_ids = encoding["input_ids"]
        start = completion.find(response.strip())
        if start < 0:
            raise ValueError("chat template rewrites the response text in a way AlignX cannot locate")
        end = start + len(response.strip())  # the template's end-of-turn follows
        response_tokens = sum(1 for token_start, _ in encoding["offset_mapping"] if token_start < end)
        input_ids = (prompt_ids + completion_ids)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            return None
        return EncodedExample(input_ids=input_ids, labels=labels,
                              response_tokens=min(response_tokens, len(labels) - len(prompt_ids)))

    def encode_prompt(self, user: str, max_length: int) -> EncodedPrompt:
        """Ids of the inference-time prompt and the mask of the user's content tokens (first ``max_length``)."""
        text = self.prompt_text(user)
        start = text.rfind(user)
        end = start + len(user)
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoding["input_ids"][:max_length]
        offsets = encoding["offset_mapping"][:max_length]
        mask = [tok_end > start and tok_start < end and tok_end > tok_start for tok_start, tok_end in offsets]
        if not any(mask):
            raise ValueError(f"no content tokens found for prompt {user[:60]!r}")
        return EncodedPrompt(input_ids=ids, content_mask=mask)
