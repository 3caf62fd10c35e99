"""The base model's tokenizer: GPT-NeoX's special-token layout (used by all state-spaces Mamba models) and
the chat templates a prepared model can carry ("zephyr", "chatml")."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mamba_align.utils import UserError

if TYPE_CHECKING:
    from mamba_align.model.source import Source

# Chat templates by name. "zephyr" is HuggingFaceH4/zephyr-7b-beta's template (as alignment-handbook
# ships it); it uses the tokenizer's eos token, here <|endoftext|>, where zephyr has </s>.
CHAT_TEMPLATES = {
    "zephyr": (
        "{% for message in messages %}\n"
        "{% if message['role'] == 'user' %}\n"
        "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
        "{% elif message['role'] == 'system' %}\n"
        "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
        "{% elif message['role'] == 'assistant' %}\n"
        "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
        "{% endif %}\n"
        "{% if loop.last and add_generation_prompt %}\n"
        "{{ '<|assistant|>' }}\n"
        "{% endif %}\n"
        "{% endfor %}"
    ),
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")

# GPT-NeoX tokenizer conventions (EleutherAI/gpt-neox-20b), used by all state-spaces Mamba models.
EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|padding|>"
BOS_ID, EOS_ID, PAD_ID = 0, 0, 1

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json"]


def prepare_tokenizer(src: Source, chat_template: str | None, rows: int):
    """Load the tokenizer, check the GPT-NeoX special ids, set pad and the chat template.

    Returns (tokenizer, tokens added for the template); those must fit in the embedding's `rows`."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    if not any(f in src.files for f in ("tokenizer.json", "tokenizer_config.json")):
        raise UserError(f"tokenizer {src.name}: no tokenizer.json or tokenizer_config.json")
    path = src.fetch(TOKENIZER_FILES)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"tokenizer {src.name}: cannot load: {e}") from e
    vocab = tok.get_vocab()
    for token, want in ((EOS_TOKEN, EOS_ID), (PAD_TOKEN, PAD_ID)):
        if vocab.get(token) != want:
            raise UserError(f"tokenizer {src.name}: {token} has id {vocab.get(token)}, expected {want} "
                            "(GPT-NeoX tokenizer layout)")
    tok.bos_token, tok.eos_token, tok.pad_token = EOS_TOKEN, EOS_TOKEN, PAD_TOKEN
    if len(tok) > rows:
        raise UserError(f"tokenizer {src.name} has {len(tok)} tokens but the model's embedding has only {rows} rows")
    added = []
    if chat_template == "chatml":
        added = [t for t in CHATML_TOKENS if t not in vocab]
        if len(tok) + len(added) > rows:
            raise UserError(f"chat template chatml needs new tokens {added}, but the embedding has only "
                            f"{rows - len(tok)} spare rows ({len(tok)} tokens, {rows} rows)")
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in added], special_tokens=True)
    if chat_template:
        tok.chat_template = CHAT_TEMPLATES[chat_template]
    return tok, added
