"""A byte-bounded cache of prompt embeddings, so text encoders run once per caption on small sets without
the cache growing with a large one (a FLUX T5 embedding of 512 tokens is 8 MB; a million captions would not fit)."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

DEFAULT_PROMPT_CACHE_MB = 2048


def _nbytes(embeds: object) -> int:
    """Bytes held by one PromptEmbeds-like value (its tensors)."""
    return sum(t.numel() * t.element_size() for t in vars(embeds).values() if hasattr(t, "element_size"))


class PromptCache:
    """Least-recently-used embeddings up to ``max_bytes``; the empty prompt, which guidance needs at every
    step, is kept outside the budget. ``max_bytes=0`` caches nothing but the empty prompt."""

    def __init__(self, max_bytes: int = DEFAULT_PROMPT_CACHE_MB << 20):
        if max_bytes < 0:
            raise ValueError(f"prompt cache size {max_bytes} bytes must be 0 or more")
        self.max_bytes, self.bytes = max_bytes, 0
        self._entries: OrderedDict[str, object] = OrderedDict()
        self._empty: object | None = None

    def __len__(self) -> int:
        return len(self._entries) + (self._empty is not None)

    def lookup(self, prompts: list[str], encode: Callable[[list[str]], list[object]]) -> list[object]:
        """The embeddings of ``prompts`` in order, encoding the missing ones (each once) in one ``encode`` call."""
        found = {prompt: self._get(prompt) for prompt in dict.fromkeys(prompts)}
        missing = [prompt for prompt, embeds in found.items() if embeds is None]
        if missing:
            for prompt, embeds in zip(missing, encode(missing)):
                found[prompt] = embeds
                self._put(prompt, embeds)
        return [found[p] for p in prompts]

    def _get(self, prompt: str) -> object | None:
        if prompt == "":
            return self._empty
        embeds = self._entries.get(prompt)
        if embeds is not None:
            self._entries.move_to_end(prompt)
        return embeds

    def _put(self, prompt: str, embeds: object) -> None:
        if prompt == "":
            self._empty = embeds
            return
        size = _nbytes(embeds)
        if size > self.max_bytes:
            return
        self._entries[prompt] = embeds
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= _nbytes(evicted)
