"""Prompt formats and tokenisation of question/answer pairs (TOFU style).

A QA example becomes one right-padded sequence ``prompt + answer + EOS``:

    input_ids      int32[T]  prompt tokens, answer tokens, EOS, then pad
    attention_mask int32[T]  1 on real tokens, 0 on padding
    labels         int32[T]  -100 on the prompt and on padding, else = input_ids

Labels are *unshifted* (HF convention, see WORKSPACE.md): the logits at position t
score ``labels[t + 1]``.

Masking follows TOFU (``data_module.convert_raw_data_to_model_format``) and
open-unlearning (``preprocess_chat_instance``): the prompt is tokenised *alone* and its
length is the boundary; the full text ``prompt + answer`` is tokenised in one go and
its first ``len(prompt_ids)`` labels are set to -100. An EOS is appended after the answer
and scored (TOFU labels the first pad position, which is EOS, the same way).

Caveat on the boundary: tokenising ``prompt`` alone and ``prompt + answer`` need not
agree on the prompt's tokens (a BPE merge may cross the boundary, e.g. a prompt ending
in a space followed by a word). :func:`encode_qa` checks that ``full_ids[:n_prompt] ==
prompt_ids`` and warns once per format when they differ; the boundary then stays at
``n_prompt`` exactly as TOFU does (so one answer token may be masked or one prompt
token scored). The shipped formats end their prompt with ``]`` (llama2), ``:`` (plain,
whose space before the answer goes with the answer: ``answer_prefix=" "``, because a
trailing space alone would tokenise as a lone ``▁``/``Ġ`` that the full text merges into
the answer's first word) or a newline / special token (chat templates), where
SentencePiece-style and byte-level BPE tokenisers do not merge across (checked in the
tests on both kinds).

Formats (``PromptFormat``, registry :data:`FORMATS`):

- ``llama2``: TOFU's Llama-2 config: ``"[INST] " + q + " [/INST]"``, answer tag ``""``;
  the tokenizer adds BOS.
- ``plain``: ``"Question: " + q + "\\nAnswer:"`` then ``" " + answer``, for tiny test
  tokenizers without a chat template; the tokenizer adds its special tokens (if any).
- ``chat``: the tokenizer's own chat template, ``apply_chat_template([user msg],
  add_generation_prompt=True)`` then the answer appended and EOS; the rendered string
  already holds BOS where the template wants it, so it is tokenised with
  ``add_special_tokens=False``.
- ``chatml`` / ``llama3`` / ``zephyr``: as ``chat``, with a built-in Jinja template used
  when the tokenizer has none (SmolLM2 uses ChatML).
- ``auto``: ``chat`` when the tokenizer has a chat template, else ``plain``.

System prompt (chat formats only): ``"<format>@<preset>"`` (e.g. ``"chat@Llama-3.2-1B-Instruct"``)
adds the system message, and the ``date_string`` template variable, of a preset in
:data:`SYSTEM_PROMPTS`: ``helpful`` ("You are a helpful assistant."), ``helpful-dated`` (the
same plus ``date_string="10 Apr 2025"``, which Llama-3.x templates render as a "Today Date"
line) and one preset per model config of open-unlearning (``configs/model/*.yaml``
``template_args``: ``system_prompt`` and ``date_string``). :func:`with_system_prompt` also
takes a literal system prompt. The default is no system prompt (TOFU's original code).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

IGNORE_INDEX = -100

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

ZEPHYR_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class PromptFormat:
    """How a question becomes a prompt.

    Either tag based (``question_start + question + question_end``, tokenised with the
    tokenizer's special tokens, e.g. BOS) or chat-template based (``use_chat_template``;
    ``fallback_template`` is used when the tokenizer has no ``chat_template``).
    """

    name: str
    question_start: str = ""
    question_end: str = ""
    answer_prefix: str = ""
    use_chat_template: bool = False
    fallback_template: str | None = None
    system_prompt: str | None = None
    date_string: str | None = None  # chat-template variable (Llama-3.x "Today Date" line)


FORMATS: dict[str, PromptFormat] = {
    "llama2": PromptFormat("llama2", question_start="[INST] ", question_end=" [/INST]"),
    "plain": PromptFormat("plain", question_start="Question: ", question_end="\nAnswer:", answer_prefix=" "),
    "chat": PromptFormat("chat", use_chat_template=True),
    "chatml": PromptFormat("chatml", use_chat_template=True, fallback_template=CHATML_TEMPLATE),
    "llama3": PromptFormat("llama3", use_chat_template=True, fallback_template=LLAMA3_TEMPLATE),
    "zephyr": PromptFormat("zephyr", use_chat_template=True, fallback_template=ZEPHYR_TEMPLATE),
}


HELPFUL = "You are a helpful assistant."
OU_DATE = "10 Apr 2025"

# name -> (system prompt, date_string). open-unlearning's configs/model/*.yaml template_args
# (models with apply_chat_template False or no system_prompt get none).
SYSTEM_PROMPTS: dict[str, tuple[str | None, str | None]] = {
    "none": (None, None),
    "helpful": (HELPFUL, None),
    "helpful-dated": (HELPFUL, OU_DATE),
    "Llama-2-7b-hf": (None, None),
    "Llama-2-13b-hf": (None, None),
    "Llama-2-7b-chat-hf": (None, None),
    "phi-1_5": (None, None),
    "gemma-7b-it": (None, None),
    "Llama-3.1-8B-Instruct": (HELPFUL, OU_DATE),
    "Llama-3.2-1B-Instruct": (HELPFUL, OU_DATE),
    "Llama-3.2-3B-Instruct": (HELPFUL, OU_DATE),
    "zephyr-7b-beta": (HELPFUL, OU_DATE),
    "Phi-3.5-mini-instruct": (HELPFUL, None),
    "Qwen2.5-1.5B-Instruct": (HELPFUL, None),
    "Qwen2.5-3B-Instruct": (HELPFUL, None),
    "Qwen2.5-7B-Instruct": (HELPFUL, None),
}


def with_system_prompt(fmt: str | PromptFormat, tokenizer, system: str | None) -> PromptFormat:
    """``fmt`` with a system prompt: ``system`` is a name in :data:`SYSTEM_PROMPTS` (its
    system message and date_string) or a literal system message; ``None`` / ``""`` leaves
    ``fmt`` as it is. Only chat-template formats take a system prompt (ValueError otherwise)."""
    f = resolve_format(fmt, tokenizer)
    if not system:
        return f
    sp, date = SYSTEM_PROMPTS.get(system, (system, None))
    if sp is None and date is None:
        return dataclasses.replace(f, system_prompt=None, date_string=None)
    if not f.use_chat_template:
        raise ValueError(
            f"system prompt {system!r}: prompt format {f.name!r} has no chat template, so it cannot take a "
            "system message; use a chat format (chat, chatml, llama3, zephyr) or no system prompt"
        )
    tag = system if system in SYSTEM_PROMPTS else "custom"
    return dataclasses.replace(f, name=f"{f.name}@{tag}", system_prompt=sp, date_string=date)


def register_format(fmt: PromptFormat) -> None:
    """Add (or replace) a named format in :data:`FORMATS`."""
    FORMATS[fmt.name] = fmt


def resolve_format(fmt: str | PromptFormat, tokenizer) -> PromptFormat:
    """Name or PromptFormat -> PromptFormat; ``"auto"`` picks ``chat`` when the tokenizer
    has a chat template, else ``plain``."""
    if isinstance(fmt, PromptFormat):
        return fmt
    if "@" in fmt:
        base, _, preset = fmt.partition("@")
        if preset not in SYSTEM_PROMPTS:
            raise ValueError(f"prompt format {fmt!r}: unknown system prompt preset {preset!r}; "
                             f"choose one of {sorted(SYSTEM_PROMPTS)}")
        return with_system_prompt(base, tokenizer, preset)
    if fmt == "auto":
        return FORMATS["chat"] if getattr(tokenizer, "chat_template", None) else FORMATS["plain"]
    if fmt not in FORMATS:
        raise ValueError(f"unknown prompt format {fmt!r}; choose one of {sorted(FORMATS) + ['auto']}")
    return FORMATS[fmt]


def _pad_id(tokenizer) -> int:
    pid = tokenizer.pad_token_id
    if pid is None:
        pid = tokenizer.eos_token_id
    if pid is None:
        raise ValueError("tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token")
    return int(pid)


def prompt_text(tokenizer, question: str, fmt: str | PromptFormat) -> tuple[str, bool]:
    """The prompt string for ``question`` and whether to tokenise it with special tokens.

    Returns ``(text, add_special_tokens)``; chat templates render their own BOS so they
    are tokenised with ``add_special_tokens=False``.
    """
    f = resolve_format(fmt, tokenizer)
    if not f.use_chat_template:
        return f.question_start + question + f.question_end, True
    template = getattr(tokenizer, "chat_template", None) or f.fallback_template
    if not template:
        raise ValueError(
            f"prompt format {f.name!r} needs a chat template but the tokenizer has none; "
            "use --prompt-format llama2/plain/chatml/llama3/zephyr or set tokenizer.chat_template"
        )
    messages = []
    if f.system_prompt:
        messages.append({"role": "system", "content": f.system_prompt})
    messages.append({"role": "user", "content": question})
    extra = {"date_string": f.date_string} if f.date_string is not None else {}
    text = tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True, **extra
    )
    return text, False


def _ids(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


_warned_boundary: set[str] = set()


def encode_prompt(tokenizer, question: str, fmt: str | PromptFormat = "auto") -> list[int]:
    """Token ids of the prompt alone (for generation; no answer, no padding)."""
    text, special = prompt_text(tokenizer, question, fmt)
    return _ids(tokenizer, text, special)


def encode_qa(
    tokenizer,
    question: str,
    answer: str,
    fmt: str | PromptFormat = "auto",
    max_length: int = 256,
) -> dict[str, np.ndarray]:
    """Tokenise one QA pair for training / scoring (right-padded to ``max_length``).

    Returns ``dict(input_ids, attention_mask, labels)``, each ``int32[max_length]``;
    labels are -100 on the prompt (boundary = length of the prompt tokenised alone) and
    on padding. The sequence is ``prompt + answer + EOS``; an answer that overflows is
    truncated (the EOS is then lost, as in TOFU). Raises ``ValueError`` when the prompt
    alone leaves no room for a single answer token.
    """
    f = resolve_format(fmt, tokenizer)
    text, special = prompt_text(tokenizer, question, f)
    prompt_ids = _ids(tokenizer, text, special)
    full_ids = _ids(tokenizer, text + f.answer_prefix + answer, special)
    n_prompt = len(prompt_ids)
    if n_prompt >= max_length:
        raise ValueError(
            f"prompt for question {question[:60]!r} is {n_prompt} tokens (prompt format {f.name!r}), "
            f"which leaves no room for its answer ({len(full_ids) - n_prompt} tokens) within "
            f"max_length={max_length}; raise max_length (e.g. to {max(2 * max_length, len(full_ids) + 1)})"
        )
    if full_ids[:n_prompt] != prompt_ids and f.name not in _warned_boundary:
        _warned_boundary.add(f.name)
        warnings.warn(
            f"prompt format {f.name!r}: the prompt tokenises differently alone and inside the full "
            f"sequence (question {question[:40]!r}); the label boundary stays at the prompt's own "
            "length, as TOFU does",
            stacklevel=2,
        )
    eos = tokenizer.eos_token_id
    if eos is not None and (len(full_ids) == 0 or full_ids[-1] != eos):
        full_ids = full_ids + [int(eos)]
    full_ids = full_ids[:max_length]
    n = len(full_ids)
    input_ids = np.full((max_length,), _pad_id(tokenizer), dtype=np.int32)
    input_ids[:n] = full_ids
    attention_mask = np.zeros((max_length,), dtype=np.int32)
    attention_mask[:n] = 1
    labels = np.full((max_length,), IGNORE_INDEX, dtype=np.int32)
    labels[n_prompt:n] = input_ids[n_prompt:n]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def encode_qa_batch(
    tokenizer,
    questions: Sequence[str],
    answers: Sequence[str],
    fmt: str | PromptFormat = "auto",
    max_length: int = 256,
) -> dict[str, np.ndarray]:
    """:func:`encode_qa` over pairs, stacked: each value ``int32[N, max_length]``."""
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    encoded = [encode_qa(tokenizer, q, a, fmt, max_length) for q, a in zip(questions, answers)]
    if not encoded:
        return {k: np.zeros((0, max_length), np.int32) for k in ("input_ids", "attention_mask", "labels")}
    return {k: np.stack([e[k] for e in encoded]) for k in encoded[0]}


def left_pad(batch_of_id_lists: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token id lists for generation.

    Returns ``(ids int32[B, L], mask int32[B, L])`` with ``L = length`` or the longest
    list; the mask is 1 on real tokens.
    """
    longest = max((len(x) for x in batch_of_id_lists), default=0)
    L = longest if length is None else int(length)
    if L < longest:
        raise ValueError(f"left_pad length={L} is shorter than the longest prompt ({longest} tokens)")
    ids = np.full((len(batch_of_id_lists), L), int(pad_id), dtype=np.int32)
    mask = np.zeros((len(batch_of_id_lists), L), dtype=np.int32)
    for i, x in enumerate(batch_of_id_lists):
        if len(x):
            ids[i, L - len(x):] = np.asarray(x, dtype=np.int32)
            mask[i, L - len(x):] = 1
    return ids, mask
